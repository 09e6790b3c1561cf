"""Bad arguments to the replay's Python API (protection model, replay entry points,
sweep, cost model, report) give a clear ValueError/TypeError naming the problem —
never an escaping IndexError/OverflowError, never a silently wrong result — and a
pure-Python reference model agrees with the replay on traces the other differential
tests do not draw (sizes up to 65535, ranges not aligned to sub-pages, no rip column,
addresses at the top of the 64-bit space)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sppkit.engines.replay import NO_RIP, ProtectionModel, Replayer, replay_arrays
from sppkit.engines.replay.formats import RIP_CARRY, TraceFormatError
from sppkit.engines.replay.replay import CostModel, maps_from_ranges
from sppkit.engines.replay.sweep import SweepModel

FULL = 0xFFFFFFFF
U64 = np.uint64
TOP = 1 << 64


def cols(gpa, size, rip=None):
    return (np.array(gpa, U64), np.array(size, np.uint16), None if rip is None else np.array(rip, U64))


# ---------------------------------------------------------------- protection model
@pytest.mark.parametrize("maps, exc, match", [
    ({-1: 0}, ValueError, "outside the 64-bit address space"),
    ({1 << 52: 0}, ValueError, "outside the 64-bit address space"),
    ({1 << 64: 0}, ValueError, "outside the 64-bit address space"),
    ({1.5: 0}, TypeError, "gfn must be an integer"),
    ({True: 0}, TypeError, "gfn must be an integer"),
    ({1: 1.5}, TypeError, "must be an integer"),
    ({1: 1 << 64}, ValueError, "not a 32-bit value"),
    ((np.array([-1]), np.array([0])), ValueError, "negative"),
    ((np.array([1.7]), np.array([0])), TypeError, "integers"),
    ((np.array([1, 2]), np.array([0])), ValueError, "2 gfns but 1 maps"),
    ((np.array([[1, 2]]), np.array([[0, 0]])), ValueError, "1-D"),
    ((np.array([1 << 52], U64), np.array([0])), ValueError, "outside the 64-bit address space"),
    ((np.array([1]), np.array([TOP - 1], U64)), ValueError, "18446744073709551615 .* not a 32-bit value"),
    (None, TypeError, "expected"),
    ([(1, 0)], TypeError, "expected"),
])
def test_protection_model_rejects_bad_access_maps(maps, exc, match):
    with pytest.raises(exc, match=match):
        ProtectionModel(maps)


def test_protection_model_top_page_and_numpy_keys_are_fine():
    m = ProtectionModel({np.uint64((1 << 52) - 1): np.int64(0)})
    assert m.gfns.tolist() == [(1 << 52) - 1]
    assert ProtectionModel(([], [])).npages == 0


@pytest.mark.parametrize("ranges, exc, match", [
    ([(TOP - 1, 2)], ValueError, "runs past the 64-bit address space"),
    ([(TOP, 1)], ValueError, "runs past the 64-bit address space"),
    ([(-4096, 1)], ValueError, "negative"),
    ([(4096, 0)], ValueError, "must be positive"),
    ([(4096.5, 10)], TypeError, "must be an integer"),
    ([(True, 10)], TypeError, "must be an integer"),
    ([(1, 2, 3)], TypeError, "not a \\(start, length\\) pair"),
])
def test_maps_from_ranges_rejects_bad_ranges(ranges, exc, match):
    with pytest.raises(exc, match=match):
        maps_from_ranges(ranges)


def test_maps_from_ranges_takes_numpy_integers_up_to_the_top():
    g, m = maps_from_ranges([(np.uint64(TOP - 128), np.uint64(128))])
    assert (g.tolist(), m.tolist()) == ([(1 << 52) - 1], [0x7FFFFFFF])


# ---------------------------------------------------------------- replay columns
MODEL = ProtectionModel({1: 0xFFFFFFFE, (1 << 52) - 1: 0})


@pytest.mark.parametrize("gpa, size, rip, exc, match", [
    (np.array([-4096]), np.array([8]), None, TraceFormatError, "record 0: gpa -4096 is negative"),
    (np.array([4096.9]), np.array([8]), None, TypeError, "gpa column must hold integers"),
    (np.array([4096], U64), np.array([8.7]), None, TypeError, "size column must hold integers"),
    (np.array([4096], U64), np.array([True]), None, TypeError, "size column must hold integers"),
    (np.array([4096], U64), np.array([-1]), None, TraceFormatError, "record 0: size -1 is negative"),
    (np.array([4096, 4096], U64), np.array([8], np.uint16), None, ValueError, "different lengths"),
    (np.array([4096, 4096], U64), np.array([8, 8], np.uint16), np.array([1], U64), ValueError, "different lengths"),
    (np.array([4096], U64), np.array([8], np.uint16), np.array([-1]), TraceFormatError, "record 0: rip -1 is negative"),
    (np.array([4096], U64), np.array([8], np.uint16), np.array([1.5]), TypeError, "rip column must hold integers"),
    (np.array([[4096]], U64), np.array([[8]], np.uint16), None, ValueError, "1-D"),
    (np.array([TOP - 4], U64), np.array([8], np.uint16), None, ValueError, "runs past the 64-bit address space"),
    (np.array([TOP - 3 * 4096], U64), np.array([65535], np.uint16), None, ValueError, "runs past the 64-bit"),
    (np.array([4096], U64), np.array([8], np.uint16), np.array([int(RIP_CARRY)], U64), ValueError, "reserved"),
])
def test_replay_rejects_bad_columns(gpa, size, rip, exc, match):
    with pytest.raises(exc, match=match):
        replay_arrays(MODEL, [(gpa, size, rip)])


def test_write_ending_at_the_top_of_the_address_space_is_fine():
    r = replay_arrays(MODEL, [cols([TOP - 8], [8])])
    assert (r.accesses, r.page_granular_exits, r.violations) == (1, 1, 1)


@pytest.mark.parametrize("chunk", [
    np.array([1, 2, 3]), [1, 2, 3], np.array([(4096,)], dtype=[("gpa", U64)]),
])
def test_replay_rejects_chunks_that_are_not_traces(chunk):
    with pytest.raises(TypeError, match="structured array with gpa and size"):
        replay_arrays(MODEL, [chunk])


@pytest.mark.parametrize("field, dtype, value, exc, match", [
    ("gpa", np.int64, -1, TraceFormatError, "record 0: gpa -1 is negative"),
    ("rip", np.int64, -5, TraceFormatError, "record 0: rip -5 is negative"),
    ("rip", np.float64, 2.5, TypeError, "rip column"),
])
def test_structured_chunk_fields_are_checked_before_conversion(field, dtype, value, exc, match):
    dt = [("gpa", U64), ("size", np.uint16), ("rip", U64)]
    dt = [(n, dtype if n == field else t) for n, t in dt]
    rec = {"gpa": 4096, "size": 8, "rip": 3}
    rec[field] = value
    chunk = np.array([(rec["gpa"], rec["size"], rec["rip"])], dtype=dt)
    with pytest.raises(exc, match=match):
        replay_arrays(MODEL, [chunk])


def test_replayer_needs_a_model():
    with pytest.raises(TypeError, match="ProtectionModel"):
        Replayer(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------- sweep
@pytest.mark.parametrize("cands, exc, match", [
    ([("a", TOP - 8, 128)], ValueError, "runs past the 64-bit address space"),
    ([("a", TOP, 1)], ValueError, "runs past the 64-bit address space"),
    ([("a", 4096.5, 10)], TypeError, "start must be an integer"),
    ([("a", 4096, 10.5)], TypeError, "length must be an integer"),
    ([("a", "4096", 10)], TypeError, "start must be an integer"),
    ([("a", True, 10)], TypeError, "start must be an integer"),
    ([(4096, 10)], TypeError, "not a \\(name, start, length\\) triple"),
])
def test_sweep_rejects_bad_candidates(cands, exc, match):
    with pytest.raises(exc, match=match):
        SweepModel(cands)


@pytest.mark.parametrize("gpa, size, exc, match", [
    ([4096], [0], ValueError, "1..65535"),
    ([4096], [65536], ValueError, "1..65535"),  # used to wrap to a 0-byte record silently
    ([4096], [-1], ValueError, "negative"),
    ([4096], [8.5], TypeError, "integers"),
    ([4096, 4096], [8], ValueError, "different lengths"),
    ([TOP - 4], [8], ValueError, "runs past the 64-bit address space"),
])
def test_sweep_rejects_bad_columns(gpa, size, exc, match):
    sm = SweepModel([("a", 4096, 10)])
    c = sm.new_counters()
    with pytest.raises(exc, match=match):
        sm.feed_columns(c, np.array(gpa, U64 if min(gpa) >= 0 else np.int64), np.array(size))


# ---------------------------------------------------------------- cost model, report
@pytest.mark.parametrize("kw, exc", [
    ({"exit_cycles": -1}, ValueError), ({"exit_cycles": float("nan")}, ValueError),
    ({"user_exit_cycles": float("inf")}, ValueError), ({"miss_cycles": -0.5}, ValueError),
    ({"exit_cycles": "500"}, TypeError), ({"exit_cycles": None}, TypeError), ({"exit_cycles": True}, TypeError),
])
def test_cost_model_rejects_bad_cycles(kw, exc):
    with pytest.raises(exc, match="CostModel"):
        CostModel(**kw)


def test_report_row_counts_are_checked():
    r = replay_arrays(MODEL, [cols([4096, 4096 + 256], [8, 8], [3, 4])])
    for bad, exc in ((-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="top"):
            r.to_dict(top=bad)
        with pytest.raises(exc, match="top"):
            r.top_pages(bad)
    assert len(r.to_dict(top=None)["top_ips"]) == 1
    pytest.importorskip("matplotlib")
    from sppkit.engines.replay.report import plot_replay

    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="max_pages"):
            plot_replay(r, "unused.png", max_pages=bad)


# ---------------------------------------------------------------- differential vs a pure-Python model
def ref_maps(ranges):
    m = {}
    for s, n in ranges:
        for sub in range(s & ~0x7F, (s + n + 0x7F) & ~0x7F, 128):
            m[sub >> 12] = m.get(sub >> 12, FULL) & ~(1 << ((sub & 0xFFF) >> 7))
    return {g: v for g, v in m.items() if v != FULL}


def ref_replay(rows, maps, check):
    acc = pg = vi = 0
    per_sub: dict = {}
    ips: dict = {}
    regions = set()
    for g, s, r in rows:
        end = g + s
        while g < end:
            k = min(end, (g | 0xFFF) + 1) - g
            acc += 1
            p = g >> 12
            if p in maps:
                pg += 1
                regions.add(p >> 9)
                s0, s1 = (g & 0xFFF) >> 7, ((g & 0xFFF) + k - 1) >> 7
                prot = [x for x in range(s0, s1 + 1) if not (maps[p] >> x) & 1]
                if (s0 in prot) if check == "first-byte" else prot:
                    vi += 1
                    ips[r] = ips.get(r, 0) + 1
                    for x in prot:
                        per_sub[(p, x)] = per_sub.get((p, x), 0) + 1
            g += k
    return acc, pg, vi, len(regions), per_sub, ips


BASES = [0, 0x11005, 0x200000 - 5 * 4096 + 77, 2**63 - 0x3000, TOP - 0x20000]


@st.composite
def case(draw):
    bases = draw(st.lists(st.sampled_from(BASES), min_size=1, max_size=3, unique=True))
    ranges = [(b + draw(st.integers(0, 20 * 4096)), draw(st.integers(1, 20000)))
              for b in draw(st.lists(st.sampled_from(bases), max_size=5))]
    rows = []
    for b in draw(st.lists(st.sampled_from(bases), max_size=30)):
        off = draw(st.one_of(st.integers(0, 24 * 4096), st.integers(1, 24).map(lambda p: p * 4096 - 3)))
        size = draw(st.one_of(st.integers(1, 65535), st.sampled_from([1, 127, 128, 129, 4095, 4096, 4097, 65535])))
        rows.append((b + off, size, draw(st.one_of(st.none(), st.integers(0, 3)))))
    rows = [r for r in rows if r[0] + r[1] <= TOP]
    ranges = [r for r in ranges if r[0] + r[1] <= TOP]
    return ranges, rows, draw(st.sampled_from(["all-touched", "first-byte"])), draw(st.booleans())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=case())
def test_replay_and_sweep_equal_a_pure_python_model(c):
    ranges, rows, check, with_rip = c
    maps = ref_maps(ranges)
    g, m = maps_from_ranges(ranges)
    assert dict(zip(g.tolist(), m.tolist())) == maps
    gpa = np.array([r[0] for r in rows], U64)
    size = np.array([r[1] for r in rows], np.uint16)
    if with_rip:
        rip = np.array([int(NO_RIP) if r[2] is None else r[2] for r in rows], U64)
    else:
        rip, rows = None, [(a, b, None) for a, b, _ in rows]
    res = replay_arrays(ProtectionModel((g, m), spp_write_check=check), [(gpa, size, rip)])
    acc, pg, vi, miss, per_sub, ips = ref_replay(rows, maps, check)
    assert (res.writes, res.accesses, res.page_granular_exits, res.violations, res.spp_misses, res.exits_avoided) \
        == (len(rows), acc, pg, vi, miss, pg - vi)
    assert res.subpage_violations() == per_sub
    assert res.ip_violations() == ips
    if ranges:
        sm = SweepModel([(f"r{i}", a, n) for i, (a, n) in enumerate(ranges)], spp_write_check=check)
        cc = sm.new_counters()
        sm.feed_columns(cc, gpa, size)
        for (a, n), row in zip(ranges, sm.rows(cc)):
            _, rpg, rvi, rmiss, _, _ = ref_replay(rows, ref_maps([(a, n)]), check)
            assert (row.page_granular_exits, row.violations, row.spp_misses) == (rpg, rvi, rmiss)


# ---------------------------------------------------------------- bad records: named, and a failed call changes nothing
def _counters(res) -> tuple:
    """Everything a Replayer's result holds, comparable."""
    return (res.writes, res.accesses, res.page_granular, res.violations, res.pg_per_page.tolist(),
            res.viol_per_page.tolist(), res.viol_per_sub.to_array().tolist(), res.writes_per_sub.to_array().tolist(),
            dict(res.ip_counts))


def _big(n, bad_at, field, value):
    gpa = np.full(n, 4096, U64)  # every record violates MODEL (page 1, sub-page 0 protected)
    size = np.full(n, 8, np.uint16)
    rip = np.full(n, 7, U64)
    {"gpa": gpa, "size": size, "rip": rip}[field][bad_at] = value
    return gpa, size, rip


@pytest.mark.parametrize("field, value, why", [
    ("gpa", TOP - 4, "a write of 8 bytes at gpa 0xfffffffffffffffc runs past the 64-bit address space"),
    ("rip", int(RIP_CARRY), "rip 0xfffffffffffffffe is reserved"),
    ("size", 0, "size 0 out of range"),
])
def test_a_refused_feed_changes_no_counter_and_names_the_record(field, value, why):
    """A bad record in the second slice of a call: the first slice used to be counted
    already (and ``writes`` of the failing one too) when the error came."""
    from sppkit.engines.replay.formats import TraceFormatError

    rp = Replayer(MODEL)
    rp.feed_columns(*cols([4096, 8192], [8, 8], [3, 4]))  # 2 records before: numbering goes on from them
    before = _counters(rp.result)
    n = Replayer.SLICE + 100
    with pytest.raises(TraceFormatError, match=f"record {2 + n - 50}: {why}"):
        rp.feed_columns(*_big(n, n - 50, field, value))
    assert _counters(rp.result) == before
    rp.feed_columns(*_big(10, 0, "rip", 9))  # the Replayer still works, and counts as before
    ref = Replayer(MODEL)
    ref.feed_columns(*cols([4096, 8192], [8, 8], [3, 4]))
    ref.feed_columns(*_big(10, 0, "rip", 9))
    assert _counters(rp.result) == _counters(ref.result)


def test_replay_arrays_names_the_record_across_chunks():
    from sppkit.engines.replay.formats import TraceFormatError

    with pytest.raises(TraceFormatError, match="record 4: a write of 8 bytes at gpa 0xfffffffffffffffc"):
        replay_arrays(MODEL, [cols([4096, 4096, 4096], [8, 8, 8]), cols([4096, TOP - 4], [8, 8])])
    rec = np.zeros(3, [("gpa", U64), ("size", np.uint16)])
    rec["gpa"], rec["size"] = [4096, TOP - 1, 4096], 2
    with pytest.raises(TraceFormatError, match="record 1: a write of 2 bytes at gpa 0xffffffffffffffff"):
        replay_arrays(MODEL, [rec])


def test_a_refused_sweep_feed_changes_no_counter():
    from sppkit.engines.replay.formats import TraceFormatError

    sm = SweepModel([("a", 4096, 10)])
    c = sm.new_counters()
    sm.feed_columns(c, np.array([4096], U64), np.array([8], np.uint16))
    hist = c.hist.copy()
    with pytest.raises(TraceFormatError, match="record 3: a write of 8 bytes"):
        sm.feed_columns(c, np.array([4096, 4096, TOP - 4], U64), np.array([8, 8, 8], np.uint16))
    assert (c.writes, c.accesses) == (1, 1) and np.array_equal(c.hist, hist)


# ---------------------------------------------------------------- cost bounds: finite reports
def _floats(x):
    if isinstance(x, float):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _floats(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _floats(v)


@pytest.mark.parametrize("kw", [{"exit_cycles": 1e308}, {"user_exit_cycles": 1e12 * (1 + 1e-15)},
                                {"miss_cycles": 1e13}, {"exit_cycles": 10 ** 400}, {"exit_cycles": 1 << 64}])
def test_cost_model_cycles_are_bounded(kw):
    """CostModel(exit_cycles=1e308) was accepted: the report held inf and json.dumps
    wrote Infinity (not JSON)."""
    with pytest.raises(ValueError, match=r"CostModel \w+=.*: must be a finite number of cycles, 0 to 1e\+12"):
        CostModel(**kw)


def test_cost_model_bound_is_the_clis():
    from sppkit.engines.replay.cli import _MAX_CYCLES
    from sppkit.engines.replay.replay import MAX_CYCLES

    assert MAX_CYCLES == _MAX_CYCLES == 1e12
    CostModel(exit_cycles=1e12, user_exit_cycles=10 ** 12, miss_cycles=np.float32(0))


CYCLES = st.one_of(st.sampled_from([0, 0.0, 5e-324, 1e-300, 1.0, 500, 1e12, 10 ** 12]),
                   st.floats(0, 1e12, allow_nan=False), st.integers(0, 10 ** 12))
COUNT = st.one_of(st.sampled_from([0, 1, 2, 1 << 64]), st.integers(0, 1 << 64))


@settings(max_examples=300, deadline=None)
@given(ck=CYCLES, cu=CYCLES, cm=st.one_of(st.none(), CYCLES), pg=COUNT, v=COUNT, m=COUNT)
def test_every_estimate_is_finite_json(ck, cu, cm, pg, v, m):
    import json
    import math

    est = CostModel(exit_cycles=ck, user_exit_cycles=cu, miss_cycles=cm).estimate(pg, v, m)
    assert all(math.isfinite(f) for f in _floats(est)), est
    json.dumps(est, allow_nan=False)


def test_speedup_over_a_tiny_spp_cost_is_none_not_inf():
    est = CostModel(exit_cycles=1e12, miss_cycles=5e-324).estimate(1 << 64, 0, 1)
    assert est["speedup"]["kernel"] is None  # 1.8e31 / 5e-324 is not a float
    assert est["spp"]["kernel_cycles"] == 5e-324
    assert CostModel().estimate(10, 0, 0)["speedup"]["kernel"] is None  # SPP costs nothing: as before


@pytest.mark.parametrize("args, exc", [((-1, 0, 0), ValueError), ((0, 1 << 65, 0), ValueError),
                                       ((0, 0, 1.5), TypeError), ((True, 0, 0), TypeError)])
def test_estimate_checks_its_counts(args, exc):
    with pytest.raises(exc, match="estimate"):
        CostModel().estimate(*args)


def test_replay_report_is_finite_json_at_the_bounds(tmp_path):
    import json
    import math

    from sppkit.engines.replay import replay

    p = tmp_path / "t.csv"
    p.write_text("4096,8,1\n4100,8,2\n8192,8,3\n")
    for cost in (CostModel(exit_cycles=1e12, user_exit_cycles=1e12, miss_cycles=1e12),
                 CostModel(exit_cycles=1e12, user_exit_cycles=0, miss_cycles=5e-324)):
        d = replay(p, MODEL, cost=cost).to_dict(None)
        assert all(math.isfinite(f) for f in _floats(d)), d
        json.dumps(d, allow_nan=False)


# ---------------------------------------------------------------- entry points check their arguments up front
@pytest.fixture
def small_trace(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("4096,8,1\n")
    return p


BAD_RUN_ARGS = [
    ({"chunk_records": 0}, ValueError, r"chunk_records=0: must be a positive integer"),
    ({"chunk_records": 1 << 64}, ValueError, r"chunk_records=18446744073709551616: .*at most 2\*\*30"),
    ({"chunk_records": 2.0}, ValueError, r"chunk_records=2\.0"),
    ({"size": 0}, ValueError, r"size=0"),
    ({"fmt": "bogus"}, ValueError, r"trace format 'bogus'"),
    ({"cost": {"exit_cycles": 5}}, TypeError, r"cost must be a CostModel"),
    ({"workers": 2}, ValueError, r"workers needs dask=True"),
    ({"workers": 0, "dask": True}, ValueError, r"workers=0: must be a positive integer"),
    ({"scheduler": "tcp://x:1"}, ValueError, r"scheduler needs dask=True"),
    ({"scheduler": " ", "dask": True}, ValueError, r"scheduler=' '"),
    ({"scheduler": "tcp://x:1", "workers": 2, "dask": True}, ValueError, r"cluster behind scheduler"),
]


@pytest.mark.parametrize("kw, exc, match", BAD_RUN_ARGS + [
    ({"on_warning": "print"}, TypeError, r"on_warning must be a callable"),
])
def test_replay_checks_its_arguments_before_reading(small_trace, monkeypatch, kw, exc, match):
    """A bad cost was found only by to_dict after the whole replay; a bad chunk_records,
    size or fmt with dask=True only in the workers, after the cluster started."""
    import importlib

    replay_mod = importlib.import_module("sppkit.engines.replay.replay")
    replay = replay_mod.replay

    def no(*a, **k):
        raise AssertionError("the trace was read")

    monkeypatch.setattr(replay_mod, "replay_shard", no)
    monkeypatch.setattr(replay_mod, "dask_client", no)
    kw = dict(kw)
    with pytest.raises(exc, match=match):
        replay(small_trace, MODEL, kw.pop("fmt", "auto"), **kw)


def test_replay_needs_a_protection_model(small_trace):
    from sppkit.engines.replay import replay

    with pytest.raises(TypeError, match="replay needs a ProtectionModel, got SweepModel"):
        replay(small_trace, SweepModel([("a", 4096, 8)]))


@pytest.mark.parametrize("kw, exc, match", BAD_RUN_ARGS + [
    ({"sort": ["name"]}, ValueError, r"sort \['name'\]"),
])
def test_sweep_checks_its_arguments_before_reading(small_trace, monkeypatch, kw, exc, match):
    import importlib

    replay_mod = importlib.import_module("sppkit.engines.replay.replay")
    sweep_mod = importlib.import_module("sppkit.engines.replay.sweep")

    def no(*a, **k):
        raise AssertionError("the trace was read")

    monkeypatch.setattr(sweep_mod, "sweep_shard", no)
    monkeypatch.setattr(replay_mod, "dask_client", no)
    kw = dict(kw)
    with pytest.raises(exc, match=match):
        sweep_mod.sweep(small_trace, SweepModel([("a", 4096, 8)]), kw.pop("fmt", "auto"), **kw)
    with pytest.raises(TypeError, match="sweep needs a SweepModel, got ProtectionModel"):
        sweep_mod.sweep(small_trace, MODEL)


def test_sweep_report_row_counts_are_checked(small_trace):
    """SweepResult.to_dict(top=-1) silently dropped the last row."""
    from sppkit.engines.replay.sweep import sweep

    res = sweep(small_trace, SweepModel([("a", 4096, 8), ("b", 8192, 8)]))
    for bad, exc in ((-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(exc, match="top"):
            res.to_dict(bad)
    assert len(res.to_dict(1)["sweep"]) == 1 and len(res.to_dict(None)["sweep"]) == 2


@pytest.mark.parametrize("elapsed, exc", [(float("inf"), ValueError), (float("nan"), ValueError),
                                          (-1.0, ValueError), ("1s", TypeError)])
def test_result_elapsed_is_checked(elapsed, exc):
    from sppkit.engines.replay import ReplayResult

    r = replay_arrays(MODEL, [cols([4096], [8])])
    with pytest.raises(exc, match="elapsed"):
        ReplayResult(r.c, MODEL, elapsed=elapsed)
    with pytest.raises(TypeError, match="cost must be a CostModel"):
        ReplayResult(r.c, MODEL, cost="cheap")
    d = ReplayResult(r.c, MODEL, elapsed=5e-324).to_dict()
    assert d["writes_per_second"] is None  # 1 / 5e-324 is not a float


# ---------------------------------------------------------------- the plot's path
def test_plot_path_is_checked_before_drawing(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from sppkit.engines.replay.report import plot_replay

    r = replay_arrays(MODEL, [cols([4096], [8])])
    drawn = []
    real = plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: drawn.append(1) or real(*a, **k))
    (tmp_path / "d.png").mkdir()
    for path, exc, match in ((tmp_path / "nodir" / "p.png", FileNotFoundError, r"p\.png: directory .*nodir does not"),
                             (tmp_path / "d.png", IsADirectoryError, r"d\.png is a directory"),
                             (tmp_path / "p.xyz", ValueError, r"p\.xyz: matplotlib cannot write \.xyz files"),
                             ("", ValueError, "an empty path")):
        with pytest.raises(exc, match=match):
            plot_replay(r, path)
    with pytest.raises(TypeError, match="needs a ReplayResult"):
        plot_replay(r.c, tmp_path / "p.png")
    assert not drawn
    assert sorted(f.name for f in tmp_path.iterdir()) == ["d.png"]


def test_plot_writes_exactly_the_path_it_returns(tmp_path):
    """plot_replay(r, "out") returned "out" but matplotlib wrote "out.png"."""
    pytest.importorskip("matplotlib")
    from sppkit.engines.replay.report import plot_replay

    r = replay_arrays(MODEL, [cols([4096], [8])])
    out = plot_replay(r, tmp_path / "out")
    assert out == tmp_path / "out" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_replay(r, tmp_path / "o.svg").read_bytes().lstrip().startswith(b"<?xml")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["o.svg", "out"]


def test_a_failed_plot_keeps_the_old_file(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from sppkit.engines.replay.report import plot_replay

    p = tmp_path / "p.png"
    p.write_bytes(b"old plot")

    def savefig(self, fname, **kw):
        with open(fname, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", savefig)
    with pytest.raises(OSError, match=r"p\.png: cannot write: No space left on device"):
        plot_replay(replay_arrays(MODEL, [cols([4096], [8])]), p)
    assert p.read_bytes() == b"old plot"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["p.png"]


@pytest.mark.parametrize("limit, exc", [(-1, ValueError), ((1 << 22) + 1, ValueError), (1.5, TypeError)])
def test_maps_from_ranges_limit_is_checked(limit, exc):
    with pytest.raises(exc, match="limit"):
        maps_from_ranges([(4096, 8)], limit=limit)
    assert len(maps_from_ranges([(4096, 8)], limit=1)[0]) == 1
