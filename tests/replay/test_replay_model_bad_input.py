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
from sppkit.engines.replay.formats import RIP_CARRY
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
    (np.array([-4096]), np.array([8]), None, ValueError, "gpa column holds a negative"),
    (np.array([4096.9]), np.array([8]), None, TypeError, "gpa column must hold integers"),
    (np.array([4096], U64), np.array([8.7]), None, TypeError, "size column must hold integers"),
    (np.array([4096], U64), np.array([True]), None, TypeError, "size column must hold integers"),
    (np.array([4096], U64), np.array([-1]), None, ValueError, "size column holds a negative"),
    (np.array([4096, 4096], U64), np.array([8], np.uint16), None, ValueError, "different lengths"),
    (np.array([4096, 4096], U64), np.array([8, 8], np.uint16), np.array([1], U64), ValueError, "different lengths"),
    (np.array([4096], U64), np.array([8], np.uint16), np.array([-1]), ValueError, "rip column holds a negative"),
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


@pytest.mark.parametrize("field, dtype, value, exc", [
    ("gpa", np.int64, -1, ValueError), ("rip", np.int64, -5, ValueError), ("rip", np.float64, 2.5, TypeError),
])
def test_structured_chunk_fields_are_checked_before_conversion(field, dtype, value, exc):
    dt = [("gpa", U64), ("size", np.uint16), ("rip", U64)]
    dt = [(n, dtype if n == field else t) for n, t in dt]
    rec = {"gpa": 4096, "size": 8, "rip": 3}
    rec[field] = value
    chunk = np.array([(rec["gpa"], rec["size"], rec["rip"])], dtype=dt)
    with pytest.raises(exc, match=f"{field} column"):
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
