"""Defects found in review of the trace replay, one group of tests each: a bad CRC-32
in a stored .npz member, numbers of thousands of digits, `--top 0`, malformed lackey
I lines at shard boundaries, negative columns in the Python API, and lines dropped
without a word."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from sppkit.cli import main
from sppkit.engines.replay import TRACE_DTYPE, ProtectionModel, Replayer, replay, replay_arrays, write_native
from sppkit.engines.replay.formats import (
    Diagnostics,
    MalformedRecord,
    TraceFormatError,
    convert_trace,
    detect_format,
    open_trace,
    read_trace,
)
from sppkit.engines.replay.replay import maps_from_ranges
from sppkit.engines.replay.sweep import SweepModel, sweep


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------------------- 1. CRC-32 of stored members
def _records(n=1000):
    recs = np.zeros(n, TRACE_DTYPE)
    recs["gpa"] = 0x5A5A_0000_0000 + 8 * np.arange(n, dtype=np.uint64)
    recs["size"] = 8
    recs["rip"] = 0x40_1000 + np.arange(n, dtype=np.uint64)
    return recs


def _data_offset(path, member: str) -> int:
    """Where the records of ``member`` (a stored .npy) start in the file."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    assert info.compress_type == zipfile.ZIP_STORED
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
        return f.tell()


def _damaged(tmp_path, member: str, record: int, name="bad.npz"):
    """A native trace whose ``member`` has one byte of record ``record`` flipped (the
    zip directory, CRC included, untouched)."""
    p = tmp_path / name
    write_native(p, _records())
    at = _data_offset(p, member) + record * {"gpa.npy": 8, "size.npy": 2, "rip.npy": 8}[member]
    raw = bytearray(p.read_bytes())
    raw[at] ^= 0x01
    p.write_bytes(bytes(raw))
    with zipfile.ZipFile(p) as z:
        assert z.testzip() == member  # the damage zipfile sees
    return p


@pytest.mark.parametrize("member", ["gpa.npy", "size.npy", "rip.npy"])
@pytest.mark.parametrize("chunk_records", [1, 7, 1000, 1 << 20])
def test_stored_npz_member_with_a_bad_crc_is_an_error(tmp_path, member, chunk_records):
    """Defect 1: stored .npz members were read in place with no CRC-32 check: a flipped
    byte was replayed as a wrong value, though docs/replay.md promises a one-line error
    naming the file for a bad CRC."""
    p = _damaged(tmp_path, member, 37)
    with pytest.raises(TraceFormatError, match=rf"bad\.npz: member {member}: bad CRC-32"):
        read_trace(p, chunk_records=chunk_records)
    with pytest.raises(TraceFormatError, match="bad CRC-32"):  # even when the damaged byte parses fine
        replay(p, ProtectionModel(maps_from_ranges([(0x5A5A_0000_0000, 8)])), chunk_records=chunk_records)
    good = tmp_path / "good.npz"
    write_native(good, _records())
    assert np.array_equal(read_trace(good, chunk_records=chunk_records), _records())


@pytest.mark.parametrize("record", [5, 150_000, 199_999])
def test_large_chunks_read_ahead_are_checked_too(tmp_path, record):
    """Defect 1: chunks of 2**16 records or more are read one ahead in a worker thread
    (which hides the CRC's cost); the damage is found there too, and a reader closed
    early stops that thread."""
    n = 200_000
    p = tmp_path / "big.npz"
    write_native(p, _records(n))
    assert np.array_equal(read_trace(p, chunk_records=1 << 16), _records(n))
    src = open_trace(p, chunk_records=1 << 16)
    it = src.columns()
    assert len(next(it)[0]) == 1 << 16
    assert any(t.name.startswith("sppkit-trace-read") for t in threading.enumerate())
    it.close()
    assert not any(t.name.startswith("sppkit-trace-read") for t in threading.enumerate())
    raw = bytearray(p.read_bytes())
    raw[_data_offset(p, "rip.npy") + 8 * record + 2] ^= 0x80
    p.write_bytes(bytes(raw))
    with pytest.raises(TraceFormatError, match=r"big\.npz: member rip\.npy: bad CRC-32"):
        read_trace(p, chunk_records=1 << 16)


def test_empty_stored_member_with_a_bad_crc_is_an_error(tmp_path):
    """Defect 1: the CRC of a member without records covers its .npy header."""
    p = tmp_path / "empty.npz"
    write_native(p, np.zeros(0, TRACE_DTYPE))
    at = _data_offset(p, "size.npy") - 2  # in the header's padding
    raw = bytearray(p.read_bytes())
    raw[at] = ord("\t") if raw[at] == ord(" ") else ord(" ")
    p.write_bytes(bytes(raw))
    with pytest.raises(TraceFormatError, match=r"empty\.npz: member size\.npy: bad CRC-32"):
        read_trace(p)


def test_bad_crc_on_the_command_line(tmp_path):
    """Defect 1: one line, exit status 2; a conversion leaves no output."""
    p = _damaged(tmp_path, "gpa.npy", 500)
    r = invoke("replay", p, "--protect", "0x5A5A00000000:8", "--json")
    assert r.exit_code == 2 and "bad.npz: member gpa.npy: bad CRC-32" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    out = tmp_path / "out.npz"
    r = invoke("trace", "convert", p, out)
    assert r.exit_code == 2 and "bad CRC-32" in r.stderr and not out.exists()


# ------------------------------------------------------------------------------- 2. thousands of digits
BIG = "9" * 5000


@pytest.mark.parametrize("fmt, text, line", [
    ("csv", f"0x10000,8\n1,{BIG}\n0x10000,8\n", 2),
    ("csv", f"0x10000,8\n{BIG},8\n", 2),
    ("csv", f"0x10000,8\n1,8,{BIG}\n", 2),
    ("csv", f"0x10000,8\n1,0x{'f' * 5000}\n", 2),  # read fine, but its message printed 6000 decimal digits
    ("lackey", f"I  400000,3\n S 10000,8\n S 10000,{BIG}\n", 3),
])
def test_a_number_of_thousands_of_digits_is_a_malformed_record(tmp_path, fmt, text, line):
    """Defect 2: a field of more than 4300 decimal digits (Python's int-string limit)
    aborted the read with a bare ValueError naming neither file nor line, even without
    strict: it is a malformed record like any other."""
    p = tmp_path / f"d.{fmt}"
    p.write_text(text)
    diag = Diagnostics()
    recs = read_trace(p, fmt, diagnostics=diag)
    assert len(recs) >= 1 and diag.skipped == 1
    assert diag.examples[0].startswith(f"{p}:{line}: ") and len(diag.examples[0]) < 300
    with pytest.raises(MalformedRecord, match=rf"d\.{fmt}:{line}: "):
        read_trace(p, fmt, strict=True)
    r = invoke("replay", p, "--format", fmt, "--protect", "0x10000:8", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["skipped_records"] == 1 and f"d.{fmt}:{line}:" in r.stderr
    r = invoke("replay", p, "--format", fmt, "--protect", "0x10000:8", "--strict")
    assert r.exit_code == 2 and f"d.{fmt}:{line}:" in r.stderr and "Traceback" not in r.stderr


def test_leading_zeros_do_not_count_as_digits(tmp_path):
    """Defect 2: a value written with thousands of leading zeros is that value (as in hex)."""
    p = tmp_path / "z.csv"
    p.write_text(f"{'0' * 5000}4096,{'0' * 5000}8,0x{'0' * 5000}7\n")
    assert read_trace(p, strict=True).tolist() == [(4096, 8, 7)]
    q = tmp_path / "z.lackey"
    q.write_text(f"I  400000,3\n S 1000,{'0' * 5000}8\n")
    assert read_trace(q, "lackey", strict=True).tolist() == [(0x1000, 8, 0x400000)]


# ------------------------------------------------------------------------------- 3. --top 0
def test_top_zero_means_all_rows(tmp_path):
    """Defect 3: `--top 0` ("0 = all" in --help) gave empty top lists; so did
    to_dict(top=0) and the top_* methods in Python."""
    p = tmp_path / "t.lackey"
    p.write_text("I  400000,3\n S 10000,8\nI  400003,3\n S 10080,8\n S 11000,8\n")
    r = invoke("replay", p, "--protect", "0x10000:0x100", "--protect", "0x11000:8", "--top", "0", "--json")
    d = json.loads(r.stdout)
    assert (len(d["top_pages"]), len(d["top_subpages"]), len(d["top_ips"])) == (2, 3, 2)
    r = invoke("replay", p, "--protect", "0x10000:0x100", "--protect", "0x11000:8", "--top", "1", "--json")
    d = json.loads(r.stdout)
    assert (len(d["top_pages"]), len(d["top_subpages"]), len(d["top_ips"])) == (1, 1, 1)
    r = invoke("replay", p, "--protect", "0x10000:0x100", "--top", "0")
    assert r.exit_code == 0 and "top violated sub-pages" in r.stdout
    res = replay(p, ProtectionModel(maps_from_ranges([(0x10000, 0x100), (0x11000, 8)])))
    assert res.to_dict(top=0)["top_subpages"] == res.to_dict(top=None)["top_subpages"] != []
    assert res.top_pages(0) == res.top_pages(None) and res.top_ips(0) == res.top_ips(None)
    sw = sweep(p, SweepModel([("a", 0x10000, 0x80), ("b", 0x10080, 0x80), ("c", 0x11000, 8)]))
    assert len(sw.to_dict(0)["sweep"]) == 3


# ------------------------------------------------------------------------------- 4. shards
def _random_lackey(rnd: random.Random) -> list[str]:
    lines = []
    for _ in range(rnd.randint(0, 40)):
        c = rnd.random()
        if c < 0.25:
            lines.append(f"I  {0x400000 + rnd.randrange(64):08x},{rnd.randint(1, 9)}")
        elif c < 0.4:
            lines.append(rnd.choice(["I  zz,3", "I  40100z,3", f"I  {'f' * 20},3", "I  fffffffffffffffe,3"]))
        elif c < 0.75:
            lines.append(f" {rnd.choice('SM')} {0x10000 + rnd.randrange(2 * 4096):08x},{rnd.choice([1, 8, 200])}")
        elif c < 0.85:
            lines.append(f" L {0x10000:08x},8")
        elif c < 0.9:
            lines.append(" S 1000z,8")
        else:
            lines.append(rnd.choice(["==1== hi", ""]))
    return lines


def _reasons(examples):
    return [e.split(": ", 1)[1] for e in examples]  # without "path:line"


@pytest.mark.parametrize("seed", range(40))
def test_shards_report_what_the_concatenated_trace_does(tmp_path, seed):
    """Defect 4: a malformed lackey I line that no store depends on was not counted in
    one file but was when it ended a shard: skipped_records depended on where the trace
    was cut.  Replay, sweep, convert and read_trace of the shards now skip exactly the
    records (and report the messages) of one pass over the concatenated trace."""
    rnd = random.Random(seed)
    lines = _random_lackey(rnd)
    cuts = sorted(rnd.sample(range(len(lines) + 1), min(len(lines) + 1, rnd.randint(1, 5))))
    whole = tmp_path / "whole.lackey"
    whole.write_text("".join(ln + "\n" for ln in lines))
    d = tmp_path / "shards"
    d.mkdir()
    bounds = [0, *cuts, len(lines)]
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        (d / f"part-{k:03d}.lackey").write_text("".join(ln + "\n" for ln in lines[a:b]))
    model = ProtectionModel(maps_from_ranges([(0x10000, 0x100), (0x11f80, 0x80)]))
    r1, r2 = replay(whole, model, "lackey"), replay(d, model, "lackey")
    assert (r2.writes, r2.violations, r2.ip_violations()) == (r1.writes, r1.violations, r1.ip_violations())
    assert r2.skipped_records == r1.skipped_records
    assert _reasons(r2.c.examples) == _reasons(r1.c.examples)
    sm = SweepModel([("a", 0x10000, 0x100)])
    s1, s2 = sweep(whole, sm, "lackey"), sweep(d, sm, "lackey")
    assert s2.counters.skipped == s1.counters.skipped == r1.skipped_records
    c1 = convert_trace(whole, tmp_path / "c1.npz", "lackey")
    c2 = convert_trace(d, tmp_path / "c2.npz", "lackey")
    assert c2["skipped_records"] == c1["skipped_records"] == r1.skipped_records
    d1, d2 = Diagnostics(), Diagnostics()
    assert np.array_equal(read_trace(whole, "lackey", diagnostics=d1), read_trace(d, "lackey", diagnostics=d2))
    assert d2.skipped == d1.skipped == r1.skipped_records and _reasons(d2.examples) == _reasons(d1.examples)


@pytest.mark.parametrize("parts, reported", [
    (["I  zz,3\n", "I  401000,3\n S 10000,8\n"], False),  # the reviewer's case: no store takes its IP
    (["I  zz,3\n", " S 10000,8\nI  401000,3\n"], True),  # the next shard's first store does
    (["I  zz,3\n", " L 10000,8\n", "", " M 10000,8\n"], True),  # through shards without I lines or stores
    (["I  zz,3\n", " L 10000,8\n", "I  401000,3\n", " S 10000,8\n"], False),
    (["I  zz,3\n S 10000,8\n", "I  401000,3\n"], True),  # used in its own shard
    (["I  zz,3\n"], False),  # the end of the trace
])
def test_bad_last_instruction_line_of_a_shard(tmp_path, parts, reported):
    """Defect 4: the last I line of a shard is reported if malformed only when a store
    takes its IP from it, as in the concatenated trace, also with dask."""
    d = tmp_path / "d"
    d.mkdir()
    for k, text in enumerate(parts):
        (d / f"part-{k}.lackey").write_text(text)
    whole = tmp_path / "whole.lackey"
    whole.write_text("".join(parts))
    model = ProtectionModel(maps_from_ranges([(0x10000, 8)]))
    r1, r2 = replay(whole, model, "lackey"), replay(d, model, "lackey")
    assert r1.skipped_records == r2.skipped_records == reported
    assert [e.split(": ")[0] for e in r1.c.examples] == [f"{whole}:1"] * reported
    assert [e.split(": ")[0] for e in r2.c.examples] == [f"{d / 'part-0.lackey'}:1"] * reported
    assert r1.ip_violations() == r2.ip_violations()
    try:
        import dask.distributed  # noqa: F401
    except ImportError:
        return
    assert replay(d, model, "lackey", dask=True, workers=1).skipped_records == reported


# ------------------------------------------------------------------------------- 5. negative columns
@pytest.mark.parametrize("cols, what", [
    ((np.array([0x10000, -4096]), np.array([8, 8])), "gpa -4096"),
    ((np.array([0x10000, 0x10000]), np.array([8, -1])), "size -1"),
    ((np.array([0x10000, 0x10000]), np.array([8, 8]), np.array([1, -2])), "rip -2"),
])
def test_negative_columns_are_a_trace_format_error_naming_the_record(cols, what):
    """Defect 5: a negative gpa, size or rip in feed_columns / replay_arrays was a plain
    ValueError naming no record, though a bad record in the Python API is a
    TraceFormatError naming `record N` (and the call changes no counter)."""
    model = ProtectionModel({0x10: 0})
    rp = Replayer(model)
    rp.feed_columns(np.array([0x10000], np.uint64), np.array([8]))
    with pytest.raises(TraceFormatError, match=rf"^record 2: {what} is negative$"):
        rp.feed_columns(*cols)
    assert (rp.result.writes, rp.result.accesses, rp.result.violations) == (1, 1, 1)
    with pytest.raises(TraceFormatError, match=rf"^record 1: {what} is negative$"):
        replay_arrays(model, [cols])


# ------------------------------------------------------------------------------- 6. lines dropped silently
@pytest.mark.parametrize("line", ["-S 10008,8", "= S 10010,8", "-", "=", "==", "--", "==x== hi", "==1-- x",
                                  "== 1 == x", "=1= x", "==1==x", "---- x", "**1** client message"])
def test_lackey_lines_of_no_documented_form_are_malformed(tmp_path, line):
    """Defect 6: any lackey line starting with '=' or '-' was dropped without a word;
    only valgrind's `==PID==` / `--PID--` lines (and blank ones) are ignored."""
    p = tmp_path / "a.lackey"
    p.write_text(f" S 10000,8\n{line}\n S 10010,8\n")
    diag = Diagnostics()
    assert len(read_trace(p, "lackey", diagnostics=diag)) == 2
    assert diag.skipped == 1 and diag.examples[0].startswith(f"{p}:2: not a lackey line")
    with pytest.raises(MalformedRecord, match=r"a\.lackey:2: not a lackey line"):
        read_trace(p, "lackey", strict=True)


@pytest.mark.parametrize("line", [
    "==4242== Lackey, an example Valgrind tool", "==4242==", "==4242== ", "--4242-- Reading syms from /usr/bin/true",
    "--4242-- ", "==00:00:00:00.027 4242== embedded gdbserver: reading from /tmp/vgdb-pipe",
    "--00:00:00:00.014 4242--    object doesn't have a symbol table", "==123:00:00:01.500 7== Exit code:       0",
])
def test_valgrind_message_lines_are_ignored(tmp_path, line):
    """Defect 6: the forms valgrind writes (`==PID== `, `--PID-- ` with -v, and both with
    --time-stamp=yes) still read cleanly."""
    p = tmp_path / "v.lackey"
    p.write_text(f"{line}\nI  400000,3\n S 10000,8\n{line}\n")
    assert read_trace(p, "lackey", strict=True).tolist() == [(0x10000, 8, 0x400000)]


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_a_real_verbose_timestamped_lackey_trace_reads_cleanly(tmp_path):
    """Defect 6: a real trace, with valgrind's -v (`--PID--` lines) and --time-stamp=yes."""
    log = tmp_path / "true.lackey"
    subprocess.run(["valgrind", "-v", "--time-stamp=yes", "--tool=lackey", "--trace-mem=yes", f"--log-file={log}",
                    "true"], check=True, capture_output=True, timeout=120)
    text = log.read_text(errors="replace")
    assert "\n--" in text and "\n==" in text
    assert detect_format(log) == "lackey"
    assert len(read_trace(log, "lackey", strict=True)) > 1000


@pytest.mark.parametrize("header", ["addr_without_size", "gpa,size,rip,extra,more", "gpa", "address,length",
                                    "gpa,size,ip", "size,gpa", "gpa,,size"])
def test_csv_first_line_other_than_the_documented_header_is_malformed(tmp_path, header):
    """Defect 6: any first CSV line made of identifiers was taken as a header and
    dropped; only `gpa,size,rip` / `gpa,size` is."""
    p = tmp_path / "a.csv"
    p.write_text(f"{header}\n0x10000,8\n")
    diag = Diagnostics()
    assert len(read_trace(p, diagnostics=diag)) == 1
    assert diag.skipped == 1 and diag.examples[0].startswith(f"{p}:1: ")
    with pytest.raises(MalformedRecord, match=r"a\.csv:1: "):
        read_trace(p, strict=True)


@pytest.mark.parametrize("header", ["gpa,size,rip", "gpa,size", "GPA, Size, RIP", " gpa , size "])
def test_csv_documented_header_is_skipped(tmp_path, header):
    p = tmp_path / "h.csv"
    p.write_text(f"{header}\n0x10000,8\n")
    assert read_trace(p, strict=True).tolist() == [(0x10000, 8, 0xFFFF_FFFF_FFFF_FFFF)]
