"""`sppkit replay`, `sppkit trace convert` and `sppkit run --record` from the command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sppkit.cli import main
from sppkit.engines.replay import TRACE_DTYPE, write_native

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

LACKEY = """\
==7== Lackey, an example Valgrind tool
I  00401000,4
 S 00601000,8
 S 00601080,8
I  00401004,4
 M 00601100,4
 S 00602ffc,8
I  00401008,4
 S 00700000,8
"""


def invoke(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r


def jrun(*args) -> dict:
    r = invoke(*args, "--json")
    assert r.exit_code == 0, (r.output, r.stderr)
    return json.loads(r.stdout)


@pytest.fixture
def trace(tmp_path):
    p = tmp_path / "t.lackey"
    p.write_text(LACKEY)
    return p


def test_json_report_fields(trace):
    d = jrun("replay", trace, "--format", "lackey", "--protect", "0x601000:0x80", "--protect", "0x603000:1")
    for key in ("writes", "accesses", "page_granular_exits", "violations", "spp_misses", "exits_avoided",
                "estimated_overhead", "skipped_records", "top_pages", "top_subpages", "top_ips"):
        assert key in d, key
    # 0x602ffc+8 crosses into page 0x603 (protected sub-page 0): two accesses
    assert (d["writes"], d["accesses"]) == (5, 6)
    assert d["page_granular_exits"] == 4  # three on page 0x601, one on 0x603
    assert d["violations"] == 2  # 0x601000 and the second half of the crossing write
    assert d["spp_misses"] == 1
    assert d["exits_avoided"] == 2
    assert d["skipped_records"] == 0
    assert d["top_ips"] == [{"rip": 0x401000, "violations": 1}, {"rip": 0x401004, "violations": 1}]
    assert d["top_subpages"][0] == {"gfn": 0x601, "subpage": 0, "gpa": 0x601000, "violations": 1, "writes": 1}
    est = d["estimated_overhead"]
    assert est["cycles_per_exit"] == {"kernel": 500.0, "user_space": 1500.0, "spp_miss": 500.0}
    assert est["page_granular"] == {"exits": 4, "kernel_cycles": 2000.0, "user_space_cycles": 6000.0}
    assert est["spp"]["kernel_cycles"] == 3 * 500.0 and est["spp"]["user_space_cycles"] == 2 * 1500.0 + 500.0


def test_cost_constants_are_options(trace):
    d = jrun("replay", trace, "--protect", "0x601000:0x80", "--exit-cycles", "400", "--user-exit-cycles", "1000",
             "--miss-cycles", "2000")
    est = d["estimated_overhead"]
    assert est["cycles_per_exit"] == {"kernel": 400.0, "user_space": 1000.0, "spp_miss": 2000.0}
    assert est["page_granular"]["kernel_cycles"] == 400.0 * d["page_granular_exits"]


def test_human_output_has_tables(trace):
    r = invoke("replay", trace, "--protect", "0x601000:0x80")
    assert r.exit_code == 0, r.output
    for text in ("page-granular exits", "SPP violations", "estimated exit overhead", "top violated sub-pages",
                 "top violating instructions", "0x401000"):
        assert text in r.stdout


def test_plot_is_written(trace, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "replay.png"
    d = jrun("replay", trace, "--protect", "0x601000:0x80", "--plot", out)
    assert d["plot"] == str(out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_malformed_record_is_one_line_never_a_traceback(trace):
    trace.write_text(LACKEY + "this is not lackey\n")
    r = invoke("replay", trace, "--protect", "0x601000:0x80", "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout)["skipped_records"] == 1
    assert f"{trace}:10: not a lackey line" in r.stderr
    r = invoke("replay", trace, "--protect", "0x601000:0x80", "--strict")
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [
        f"sppkit: error: malformed record: {trace}:10: not a lackey line (expected 'I  ', ' S ', ' M ', ' L ' or "
        "'==pid=='): 'this is not lackey'"
    ]
    assert "Traceback" not in r.output


def test_usage_errors(trace, tmp_path):
    r = invoke("replay", trace)
    assert r.exit_code == 2 and "nothing to protect" in r.output
    r = invoke("replay", trace, "--protect", "nonsense")
    assert r.exit_code == 2 and "expected START:LENGTH" in r.stderr
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"PK not a zip")
    r = invoke("replay", bad, "--protect", "0x0:1")
    assert r.exit_code == 2 and "sppkit: error:" in r.stderr and "Traceback" not in r.output


def test_policy_file(trace, tmp_path):
    pol = tmp_path / "p.toml"
    pol.write_text('[[protect]]\nname = "a"\nstart = 0x601000\nlength = 0x80\n')
    assert jrun("replay", trace, "--policy", pol)["violations"] == 1


def test_sweep_orders_regions(trace, tmp_path):
    pol = tmp_path / "p.toml"
    pol.write_text(
        '[[protect]]\nname = "first"\nstart = 0x601000\nlength = 8\n'  # 3 page writes, 1 violation
        '[[protect]]\nname = "all"\nstart = 0x601000\nlength = 0x1000\n'  # 3 page writes, 3 violations
        '[[protect]]\nname = "cold"\nstart = 0x605000\nlength = 8\n'  # never written
        '[[protect]]\nname = "cross"\nstart = 0x603000\nlength = 8\n'  # 1 access, 1 violation
    )
    d = jrun("replay", trace, "--policy", pol, "--sweep")
    rows = {r["name"]: r for r in d["sweep"]}
    assert [r["name"] for r in d["sweep"]] == ["first", "all", "cross", "cold"]
    assert (rows["first"]["page_granular_exits"], rows["first"]["violations"]) == (3, 1)
    assert (rows["all"]["page_granular_exits"], rows["all"]["violations"]) == (3, 3)
    assert rows["first"]["exits_avoided"] == 2 and rows["cold"]["page_granular_exits"] == 0
    d = jrun("replay", trace, "--policy", pol, "--sweep", "--sort", "spp")
    assert [r["name"] for r in d["sweep"]][:1] == ["all"]
    d = jrun("replay", trace, "--policy", pol, "--sweep", "--sort", "address")
    assert [r["start"] for r in d["sweep"]] == sorted(r["start"] for r in d["sweep"])
    r = invoke("replay", trace, "--policy", pol, "--sweep")
    assert r.exit_code == 0 and "first" in r.stdout and "exits avoided" in r.stdout


def _shards(tmp_path, n=40_000, parts=4):
    r = np.random.default_rng(5)
    arr = np.zeros(n, TRACE_DTYPE)
    arr["gpa"] = 0x600000 + r.integers(0, 64 * 4096, n, dtype=np.uint64)
    arr["size"] = r.choice([1, 2, 4, 8, 16, 64], n)
    arr["rip"] = 0x401000 + r.integers(0, 50, n, dtype=np.uint64)
    single = tmp_path / "all.npz"
    write_native(single, arr)
    d = tmp_path / "shards"
    d.mkdir()
    for i, part in enumerate(np.array_split(arr, parts)):
        write_native(d / f"part-{i:03d}.npz", part)
    return single, d


def _strip(d):
    return {k: v for k, v in d.items() if k not in ("trace", "shards", "elapsed_seconds", "writes_per_second")}


PROTECT = ("--protect", "0x601000:0x200", "--protect", "0x610f80:0x100", "--protect", "0x630000:0x3000")


def test_shard_directory_equals_single_file(tmp_path):
    single, d = _shards(tmp_path)
    a = jrun("replay", single, *PROTECT, "--top", "50")
    b = jrun("replay", d, *PROTECT, "--top", "50")
    assert b["shards"] == 4 and a["violations"] > 0
    assert _strip(a) == _strip(b)
    # a lackey trace cut into shards: IPs of stores at a shard's start come from the previous shard
    lk = tmp_path / "t.lackey"
    lk.write_text(LACKEY)
    sd = tmp_path / "lk"
    sd.mkdir()
    lines = LACKEY.splitlines(keepends=True)
    for i, (a_, b_) in enumerate(((0, 3), (3, 4), (4, 7), (7, 9))):
        (sd / f"{i:02d}.lackey").write_text("".join(lines[a_:b_]))
    x = jrun("replay", lk, "--protect", "0x601000:0x200", "--protect", "0x603000:1")
    y = jrun("replay", sd, "--format", "lackey", "--protect", "0x601000:0x200", "--protect", "0x603000:1")
    assert _strip(x) == _strip(y)


def test_dask_equals_single_process(tmp_path):
    pytest.importorskip("dask.distributed", reason="dask[distributed] is not installed (sppkit[distributed])")
    single, d = _shards(tmp_path)
    a = jrun("replay", d, *PROTECT, "--top", "50")
    b = jrun("replay", d, *PROTECT, "--top", "50", "--dask", "--workers", "2")
    assert _strip(a) == _strip(b)
    s1 = jrun("replay", d, *PROTECT, "--sweep")
    s2 = jrun("replay", d, *PROTECT, "--sweep", "--dask")
    assert _strip(s1) == _strip(s2)


def test_trace_convert(trace, tmp_path):
    out = tmp_path / "t.npz"
    r = invoke("trace", "convert", trace, out, "--format", "lackey")
    assert r.exit_code == 0 and "5 records" in r.stdout
    assert _strip(jrun("replay", out, "--protect", "0x601000:0x80")) | {"formats": None} == \
        _strip(jrun("replay", trace, "--protect", "0x601000:0x80")) | {"formats": None}
    r = invoke("trace", "convert", trace, tmp_path / "t.txt")
    assert r.exit_code == 2 and ".npz or .parquet" in r.stderr
    d = json.loads(invoke("trace", "convert", trace, tmp_path / "sh", "--shard-records", "2", "--json").stdout)
    assert d["records"] == 5 and len(d["files"]) == 3


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build the bundled guest")
def test_run_record_then_replay_gives_the_runs_violations(tmp_path):
    pytest.importorskip("unicorn")
    from sppkit.guests import build_guest

    elf = build_guest("mixed")
    rec = tmp_path / "mixed.npz"
    policy = EXAMPLES / "mixed.toml"
    r = invoke("run", "mixed", "--engine", "unicorn", "--policy", policy, "--record", rec, "--json")
    assert r.exit_code == 0, r.output
    run = json.loads(r.stdout)
    assert rec.exists()
    d = jrun("replay", rec, "--policy", policy, "--elf", elf)
    st = run["stats"]
    assert d["violations"] == st["violations"] > 0
    assert d["page_granular_exits"] == st["page_granular"]
    assert d["spp_misses"] == st["spp_misses"]
    # under Unicorn the recording holds every guest write, not just those the VMM saw
    assert d["writes"] > d["page_granular_exits"] and d["writes"] >= st["writes"]
    # symbolised with --elf: the bundled policy protects secret, config and canary
    assert {s["symbol"] for s in d["top_subpages"]} == {"secret", "config", "canary"}
    # --protect with a symbol name
    e = jrun("replay", rec, "--elf", elf, "--protect", "secret")
    assert 0 < e["violations"] < d["violations"]
