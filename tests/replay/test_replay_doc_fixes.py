"""Defects found in review of docs/replay.md against the code, and of bad input the
replay let through: page-crossing writes in `sppkit run`, what a `--record` holds,
`sweep()` missing from the package, `--elf NAME`, JSON keys and plot formats left out,
dask's traceback before the one-line error, damaged Parquet pages read as records,
and outputs written over (or into) the input trace."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sppkit import Vm
from sppkit.cli import main
from sppkit.engines.replay import (
    TRACE_DTYPE,
    ProtectionModel,
    TraceFormatError,
    read_trace,
    replay,
    replay_arrays,
    write_native,
)

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "replay.md"
FULL = 0xFFFF_FFFF
LACKEY = """\
I  00401000,4
 S 00601000,8
 S 00601080,8
I  00401004,4
 M 00601100,4
"""


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def doc_text() -> str:
    """docs/replay.md, whitespace normalised (sentences run across lines)."""
    return " ".join(DOC.read_text(encoding="utf-8").split())


def one_line_error(r, *needles, code=2):
    assert r.exit_code == code, (r.exit_code, r.output)
    assert "Traceback" not in r.output and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("sppkit: error: "), line
    for n in needles:
        assert n in line, (n, line)
    return line


def records(rows) -> np.ndarray:
    out = np.zeros(len(rows), TRACE_DTYPE)
    for i, row in enumerate(rows):
        out[i] = row
    return out


# ------------------------------------------------------------------ 1. page-crossing writes in `sppkit run`
def _vm_write(maps: dict[int, int], gpa: int, size: int) -> dict:
    """``vm.write`` of one whole write (as an engine hands it) on a Vm with ``maps``."""
    vm = Vm()
    lo = min(maps)
    vm.add_memslot(0, lo << 12, (max(maps) - lo + 1) << 12)
    vm.enable_spp("eager")
    for g, m in maps.items():
        vm.set_subpage_access(g, [m])
    vm.write(gpa, b"\0" * size)
    return vm.stats()


@pytest.mark.parametrize("first_denied, run_pg, replay_pg", [(False, 2, 2), (True, 1, 2)],
                         ids=["allowed", "denied-on-first-page"])
def test_doc_page_crossing_writes_of_sppkit_run(first_denied, run_pg, replay_pg):
    """Defect 1: docs/replay.md said `sppkit run` counts a page-crossing write "once in
    page_granular"; Vm.write counts every page of an allowed crossing write (2) and
    1 only when the first page is denied (its second page is not reached).  The doc
    now says so; the figures are checked here against Vm.write and the replay."""
    # two pages each holding a protected sub-page; the write covers sub-page 31 of the
    # first and sub-page 0 of the second (writable)
    maps = {0x10: FULL & ~(1 << (31 if first_denied else 5)), 0x11: FULL & ~(1 << 7)}
    st = _vm_write(maps, 0x10FF8, 16)
    assert st["page_granular"] == run_pg
    assert st["violations"] == (1 if first_denied else 0)
    res = replay_arrays(ProtectionModel(maps, spp_mode="eager"), [records([(0x10FF8, 16, 0)])])
    assert res.page_granular_exits == replay_pg and res.violations == st["violations"]
    doc = doc_text()
    assert "counts it once in `page_granular`" not in doc
    assert "an allowed crossing write counts 2 when both its pages hold one" in doc
    assert "A write denied on its first page counts that page only (1 in `page_granular`)" in doc


# ------------------------------------------------------------------ 2. what a --record holds
def test_doc_record_says_which_writes_each_engine_records():
    """Defect 2: docs/replay.md said a --record file holds only writes to pages the
    run's policy protected; under Unicorn every guest write is recorded (a memory hook
    on all of RAM), under KVM only the writes to protected pages.  (The behaviour
    itself: test_cli_sweep.py::test_unicorn_record_holds_writes_to_unprotected_pages.)"""
    pytest.importorskip("unicorn", reason="the Unicorn engine needs unicorn (pip install unicorn)")
    from sppkit.engines.base import EngineBase
    from sppkit.engines.kvm.engine import KvmEngine
    from sppkit.engines.unicorn import UnicornEngine

    assert UnicornEngine.records_every_write and not KvmEngine.records_every_write
    assert not EngineBase.records_every_write
    doc = doc_text()
    assert "so a recording holds the writes to the pages the policy of that run protected" not in doc
    assert "**Unicorn** (`--engine unicorn`): **every** guest write" in doc
    assert "**KVM**: only the writes that reach the VMM, i.e. those to pages holding a protected sub-page" in doc


# ------------------------------------------------------------------ 3. sweep() exported
def test_sweep_and_the_documented_api_are_exported_from_the_package(tmp_path):
    """Defect 3: docs/replay.md lists sweep() with the Python API, but
    `from sppkit.engines.replay import sweep` failed (it lived only in the submodule).
    Every function the doc's API sentence names is now in the package and its
    __all__."""
    import builtins
    import importlib

    import sppkit.engines.replay as pkg
    from sppkit.engines.replay import SweepModel, sweep

    assert sweep is importlib.import_module("sppkit.engines.replay.sweep").sweep
    (sentence,) = [s for s in re.split(r"(?<=\.) ", doc_text()) if s.startswith("In Python (all from")]
    names = {n for n in re.findall(r"`(\w+)(?:\(\))?`", sentence) if n != "sppkit" and not hasattr(builtins, n)}
    assert {"replay", "sweep", "convert_trace", "open_trace", "read_trace", "TraceRecorder", "SweepModel"} <= names
    for n in names:
        assert n in pkg.__all__ and hasattr(pkg, n), n
    p = tmp_path / "t.npz"
    write_native(p, records([(0x601000, 8, 1), (0x601080, 8, 2)]))
    res = sweep(p, SweepModel([("a", 0x601000, 0x80)]))
    assert [(r.name, r.violations) for r in res.rows] == [("a", 1)]


# ------------------------------------------------------------------ 4. --elf NAME
def test_replay_elf_takes_a_bundled_guest_name(tmp_path):
    """Defect 4: `sppkit replay --elf mixed` was refused ("File 'mixed' does not
    exist"), and the doc's `--elf <the guest ELF>` did not say where that ELF is.
    --elf now takes a bundled program's name, as `sppkit run` does."""
    from sppkit.guests import build_guest, load_elf, toolchain_status

    ok, why = toolchain_status()
    if not ok:
        pytest.skip(f"the bundled guest cannot be built: {why}")
    elf = build_guest("mixed")
    secret = load_elf(elf).symbol("secret")
    t = tmp_path / "t.csv"
    t.write_text(f"{secret.addr:#x},8,0x401000\n{secret.addr + 0x1000:#x},8,0x401004\n")
    by_name = invoke("replay", t, "--elf", "mixed", "--protect", "secret", "--json")
    by_path = invoke("replay", t, "--elf", elf, "--protect", "secret", "--json")
    assert by_name.exit_code == 0, by_name.output
    a, b = json.loads(by_name.stdout), json.loads(by_path.stdout)
    assert a | {"elapsed_seconds": 0, "writes_per_second": 0} == b | {"elapsed_seconds": 0, "writes_per_second": 0}
    assert a["violations"] == 1 and a["top_subpages"][0]["symbol"] == "secret"
    doc = doc_text()
    assert "`~/.cache/sppkit/guests/mixed-<hash>.elf`" in doc and "(`--elf mixed`)" in doc


def test_replay_elf_unknown_name_lists_the_bundled_programs(tmp_path):
    """Defect 4: a value of --elf that is neither a file nor a bundled program is one
    line naming --elf and the bundled programs (no gcc needed: nothing is built)."""
    t = tmp_path / "t.lackey"
    t.write_text(LACKEY)
    r = invoke("replay", t, "--elf", "nosuchguest", "--protect", "0:1")
    one_line_error(r, "'--elf'", "'nosuchguest' is neither a file nor a bundled guest program", "mixed")


def test_replay_elf_a_file_of_the_name_wins(tmp_path, monkeypatch):
    """Defect 4: as for `sppkit run`, a file named like a bundled program is the file
    (here not an ELF: refused as such, nothing built)."""
    monkeypatch.chdir(tmp_path)
    Path("mixed").write_text("not an ELF\n")
    Path("t.lackey").write_text(LACKEY)
    one_line_error(invoke("replay", "t.lackey", "--elf", "mixed", "--protect", "0:1"), "mixed", "not an ELF file")


# ------------------------------------------------------------------ 5. JSON keys and plot formats
def _doc_json_keys() -> set[str]:
    text = DOC.read_text(encoding="utf-8")
    table = text[text.index("`--json` prints one object"):text.index("### Cost model")]
    keys: set[str] = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            keys.update(re.findall(r"`(\w+)`", line.split(" | ")[0]))
    return keys


def test_doc_json_table_names_every_key_of_the_replay_json(tmp_path):
    """Defect 5: the JSON key table of docs/replay.md lacked `trace` (and `plot`,
    with --plot), which the replay JSON has."""
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    t = tmp_path / "t.lackey"
    t.write_text(LACKEY)
    r = invoke("replay", t, "--protect", "0x601000:0x80", "--json", "--plot", tmp_path / "p.png")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert {"trace", "plot"} <= set(d)
    assert set(d) <= _doc_json_keys(), set(d) - _doc_json_keys()


@pytest.mark.parametrize("suffix, magic", [(".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_plot_format_follows_the_suffix_as_documented(tmp_path, suffix, magic):
    """Defect 5: --plot writes the format its suffix names, but docs/replay.md spoke of
    PNG only."""
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    t = tmp_path / "t.lackey"
    t.write_text(LACKEY)
    out = tmp_path / f"p{suffix}"
    r = invoke("replay", t, "--protect", "0x601000:0x80", "--plot", out)
    assert r.exit_code == 0, r.output
    assert out.read_bytes().startswith(magic)
    assert f"`{suffix}`" in doc_text()


# ------------------------------------------------------------------ 6. dask: no traceback
def _sppkit() -> list[str]:
    script = Path(sys.executable).with_name("sppkit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sppkit.cli"]


@pytest.mark.parametrize("bad", ["truncated-npz", "strict-csv", "sweep-truncated-npz"])
def test_dask_bad_shard_is_one_line_without_a_traceback(tmp_path, bad):
    """Defect 6: `sppkit replay DIR --dask` printed dask's worker log of the failed task
    ("Compute Failed ... Traceback: ...") before sppkit's one-line error when a shard
    was bad (a truncated .npz; a malformed CSV line with --strict).  That log is now
    silenced for sppkit's own dask run."""
    pytest.importorskip("dask.distributed", reason="dask[distributed] is not installed (sppkit[distributed])")
    d = tmp_path / "shards"
    d.mkdir()
    extra = []
    if bad.endswith("truncated-npz"):
        write_native(d / "a.npz", records([(0x1080, 8, 1)]))
        full = tmp_path / "full.npz"
        write_native(full, records([(0x1080, 8, 1), (0x1088, 8, 2)]))
        (d / "b.npz").write_bytes(full.read_bytes()[:200])
        needle = "b.npz"
    else:
        (d / "a.csv").write_text("0x1080,8\nbad\n")
        (d / "b.csv").write_text("0x1088,8\n")
        extra, needle = ["--strict"], "a.csv:2"
    if bad.startswith("sweep"):
        extra.append("--sweep")
    p = subprocess.run([*_sppkit(), "replay", str(d), "--protect", "0x1080:8", "--dask", "--workers", "1",
                        "--no-progress", *extra], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "Compute Failed" not in p.stderr, p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("sppkit: error: ") and needle in line, line


def test_dask_worker_log_level_is_restored(tmp_path):
    """Defect 6: the worker logger is silenced only for the run, then restored."""
    pytest.importorskip("dask.distributed", reason="dask[distributed] is not installed (sppkit[distributed])")
    import logging

    from sppkit.engines.replay.replay import maps_from_ranges

    d = tmp_path / "shards"
    d.mkdir()
    (d / "a.csv").write_text("0x1080,8\nbad\n")
    log = logging.getLogger("distributed.worker")
    before = log.level
    log.setLevel(logging.WARNING)
    try:
        with pytest.raises(TraceFormatError, match=r"a\.csv:2"):
            replay(d, ProtectionModel(maps_from_ranges([(0x1080, 8)])), strict=True, dask=True, workers=1)
        assert log.level == logging.WARNING
    finally:
        log.setLevel(before)


# ------------------------------------------------------------------ 7. Parquet page checksums
def _pq_with_checksums():
    pytest.importorskip("pyarrow", reason="Parquet traces need pyarrow (sppkit[parquet])")
    import pyarrow
    import pyarrow.parquet as pq

    from sppkit.engines.replay.formats import _parquet_option

    if not (_parquet_option(pq.ParquetWriter, "write_page_checksum")
            and _parquet_option(pq.ParquetFile, "page_checksum_verification")):
        pytest.skip(f"pyarrow {pyarrow.__version__} has no Parquet page checksums (pyarrow >= 15)")
    return pq


def _flip_in_data_page(p: Path, pq) -> None:
    """Flip one byte near the end of the gpa column's data page (its values)."""
    col = pq.ParquetFile(p).metadata.row_group(0).column(0)
    assert col.path_in_schema == "gpa"
    start = col.dictionary_page_offset or col.data_page_offset
    at = start + col.total_compressed_size - 3
    assert at > col.data_page_offset
    raw = bytearray(p.read_bytes())
    raw[at] ^= 0x01
    p.write_bytes(bytes(raw))


def test_damaged_parquet_page_is_a_trace_error(tmp_path):
    """Defect 7: Parquet traces were written without page checksums and read without
    verification: a flipped byte in a data page was replayed as a wrong address.  Now
    every page carries a CRC-32 that the reader checks: a TraceFormatError naming the
    file, and one line (exit 2) on the command line."""
    pq = _pq_with_checksums()
    recs = records([(0x5A5A_0000_0000 + 8 * i, 8, 0x401000 + i) for i in range(1000)])
    p = tmp_path / "t.parquet"
    write_native(p, recs)
    assert np.array_equal(read_trace(p), recs)
    _flip_in_data_page(p, pq)
    with pytest.raises(TraceFormatError, match=r"t\.parquet: unreadable Parquet trace: .*(CRC|checksum)"):
        read_trace(p)
    one_line_error(invoke("replay", p, "--protect", "0x1000:8", "--json"), "t.parquet", "unreadable Parquet trace")


def test_converted_parquet_trace_has_page_checksums(tmp_path):
    """Defect 7: `sppkit trace convert ... OUT.parquet` (the same writer) is verified as
    it is read back."""
    pq = _pq_with_checksums()
    src = tmp_path / "t.csv"
    src.write_text("".join(f"{0x601000 + 8 * i:#x},8,{0x401000 + i:#x}\n" for i in range(1000)))
    out = tmp_path / "c.parquet"
    r = invoke("trace", "convert", src, out)
    assert r.exit_code == 0, r.output
    _flip_in_data_page(out, pq)
    one_line_error(invoke("replay", out, "--protect", "0x601000:8"), "c.parquet", "unreadable Parquet trace")


# ------------------------------------------------------------------ 8. outputs over or into the input
def test_convert_into_the_input_shard_directory_is_refused(tmp_path):
    """Defect 8: `sppkit trace convert ok ok/x.npz` wrote into the input directory, so a
    later replay of `ok` read the new file as a shard.  Refused by name, nothing
    written (also in Python, and a directory of shards written into it)."""
    from sppkit.engines.replay import convert_trace

    ok = tmp_path / "ok"
    ok.mkdir()
    write_native(ok / "a.npz", records([(0x1080, 8, 1)]))
    for args in (["trace", "convert", ok, ok / "x.npz"], ["trace", "convert", ok, ok, "--shard-records", "1"],
                 ["trace", "convert", ok, ok / "x.parquet"]):
        one_line_error(invoke(*args), "would write into the input shard directory", str(ok))
        assert sorted(os.listdir(ok)) == ["a.npz"]
    with pytest.raises(ValueError, match="would write into the input shard directory"):
        convert_trace(ok, ok / "y.npz")
    assert sorted(os.listdir(ok)) == ["a.npz"]
    r = invoke("trace", "convert", ok, ok / "sub.npz", "--shard-records", "1")  # a subdirectory is not read
    assert r.exit_code == 0, r.output


def test_plot_over_the_input_trace_is_refused(tmp_path):
    """Defect 8: `sppkit replay t.png --format csv --plot t.png` replaced the input
    trace by the plot.  --plot now refuses a file of the input, or a path in its shard
    directory, before the replay (and plot_replay in Python)."""
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    from sppkit.engines.replay.replay import maps_from_ranges
    from sppkit.engines.replay.report import plot_replay

    t = tmp_path / "t.png"
    t.write_text("0x1080,8\n")
    before = t.read_bytes()
    one_line_error(invoke("replay", t, "--format", "csv", "--protect", "0x1080:8", "--plot", t),
                   "'--plot'", "would overwrite the input")
    assert t.read_bytes() == before
    sd = tmp_path / "shards"
    sd.mkdir()
    (sd / "a.csv").write_text("0x1080,8\n")
    one_line_error(invoke("replay", sd, "--protect", "0x1080:8", "--plot", sd / "p.png"),
                   "'--plot'", "would write into the input shard directory")
    assert os.listdir(sd) == ["a.csv"]
    res = replay(t, ProtectionModel(maps_from_ranges([(0x1080, 8)])), "csv")
    with pytest.raises(ValueError, match="would overwrite the input"):
        plot_replay(res, t)
    assert t.read_bytes() == before


def test_plot_dash_is_refused(tmp_path, monkeypatch):
    """Defect 8: `--plot -` wrote a file named "-" ("-" usually means standard output).
    Refused; ./- still names such a file."""
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    monkeypatch.chdir(tmp_path)
    Path("t.lackey").write_text(LACKEY)
    one_line_error(invoke("replay", "t.lackey", "--protect", "0x601000:8", "--plot", "-"),
                   "'--plot'", "'-': standard output is not supported")
    assert not Path("-").exists()
    r = invoke("replay", "t.lackey", "--protect", "0x601000:8", "--plot", "./-")
    assert r.exit_code == 0, r.output
    assert Path("-").read_bytes()[:4] == b"\x89PNG"


def test_plot_check_leaves_a_bad_trace_to_the_trace(tmp_path):
    """Defect 8 (its fix): checking --plot against the input must not report a shard
    directory that holds nothing as a bad --plot: that stays TRACE's error."""
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    d = tmp_path / "empty"
    d.mkdir()
    line = one_line_error(invoke("replay", d, "--protect", "0:1", "--plot", tmp_path / "p.png"),
                          "directory holds no trace shards")
    assert "--plot" not in line
