"""The vectorised replay equals feeding every page-split access through ``vm.write``.

Reference (tests/replay/replay_helpers.py): a Vm whose memslots cover every touched
page, SPP enabled (lazy SPPT unless said otherwise), the access maps set, every
violation SKIPped, and each access — a write split at 4-KiB boundaries, one piece per
page, as the hardware and KVM do — fed as its own ``vm.write`` call.  Counters that
must match: accesses, page-granular exits, violations, SPP misses, per-page and
per-sub-page counts, and violations per IP.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sppkit.engines.replay import NO_RIP, ProtectionModel, Replayer, replay_arrays
from sppkit.engines.replay.replay import PageIndex, ShardResult

from replay_helpers import FULL, assert_matches_vm, records, reference_vm

# Windows of a few pages where traces and protections live: near 0 (the lookback
# clamps at page 0), across a 2-MiB boundary (two lazy-SPPT regions), across a 1-GiB
# boundary, and high in the 48-bit space; several at once give several clusters.
BASES = [0x0, 0x200000 - 3 * 4096, 0x40000000 - 2 * 4096, 0x7FFF_FFF0_0000]
SPAN_PAGES = 8

sizes = st.one_of(
    st.sampled_from([1, 2, 4, 8, 16]),
    st.integers(1, 300),
    st.integers(4000, 9000),  # multi-page records (split into 2 or 3 accesses)
)


@st.composite
def scenario(draw):
    bases = draw(st.lists(st.sampled_from(BASES), min_size=1, max_size=3, unique=True))
    rows = []
    for _ in range(draw(st.integers(0, 40))):
        b = draw(st.sampled_from(bases))
        off = draw(st.one_of(st.integers(0, SPAN_PAGES * 4096 - 1),
                             st.integers(0, SPAN_PAGES - 1).map(lambda p: p * 4096 + 4096 - 8)))  # near page ends
        rows.append((b + off, draw(sizes), draw(st.integers(0, 4))))
    maps = {}
    for _ in range(draw(st.integers(0, 6))):
        b = draw(st.sampled_from(bases))
        gfn = (b >> 12) + draw(st.integers(0, SPAN_PAGES - 1))
        maps[gfn] = draw(st.one_of(st.integers(0, FULL), st.sampled_from([0, FULL, 0xFFFFFFFE, 0x7FFFFFFF])))
    return rows, maps


def _replay(rows, maps, check, mode="lazy", chunks=1):
    arr = records(rows)
    model = ProtectionModel(maps, spp_write_check=check, spp_mode=mode)
    parts = np.array_split(arr, chunks) if len(arr) else [arr]
    return replay_arrays(model, parts)


@pytest.mark.parametrize("check", ["all-touched", "first-byte"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=scenario(), chunks=st.integers(1, 4))
def test_replay_equals_vm_write_one_by_one(check, sc, chunks):
    rows, maps = sc
    vm, ips = reference_vm(rows, maps, spp_write_check=check)
    res = _replay(rows, maps, check, chunks=chunks)
    assert res.writes == len(rows)
    assert_matches_vm(res, vm, ips)


@pytest.mark.parametrize("strategy", ["direct", "ranges", "bytemap"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=scenario())
def test_every_lookup_strategy_matches(strategy, sc):
    """The page index's three strategies (direct tables; range test + exact lookup;
    hashed region byte map + exact lookup) give the same, reference-exact counters."""
    rows, maps = sc
    saved = PageIndex.MAX_DIRECT, PageIndex.MAX_RANGE_TESTS
    try:
        if strategy != "direct":
            PageIndex.MAX_DIRECT = -1
        if strategy == "bytemap":
            PageIndex.MAX_RANGE_TESTS = -1
        res = _replay(rows, maps, "all-touched")
        idx = res.model.index
        if idx.n:
            assert (idx.direct is not None) == (strategy == "direct")
            assert (idx.bytemap is not None) == (strategy == "bytemap")
    finally:
        PageIndex.MAX_DIRECT, PageIndex.MAX_RANGE_TESTS = saved
    vm, ips = reference_vm(rows, maps)
    assert_matches_vm(res, vm, ips)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=scenario())
def test_eager_sppt_takes_no_misses(sc):
    rows, maps = sc
    vm, ips = reference_vm(rows, maps, spp_mode="eager")
    res = _replay(rows, maps, "all-touched", mode="eager")
    assert res.spp_misses == 0 == vm._stats.spp_misses
    assert_matches_vm(res, vm, ips)


@settings(max_examples=60, deadline=None)
@given(sc=scenario(), cuts=st.lists(st.integers(0, 40), max_size=4))
def test_shard_merge_equals_one_pass(sc, cuts):
    """Counters of consecutive pieces, merged in order, equal one pass (the merge of
    ``sppkit replay DIR`` and of --dask)."""
    rows, maps = sc
    arr = records(rows)
    model = ProtectionModel(maps)
    bounds = sorted({min(c, len(arr)) for c in cuts} | {0, len(arr)})
    acc = ShardResult.empty(model.npages)
    acc.last_ip = int(NO_RIP)  # the start of a trace
    for a, b in zip(bounds, bounds[1:]):
        rp = Replayer(model)
        rp.feed(arr[a:b])
        acc.merge(rp.result)
    one = replay_arrays(model, [arr])
    assert (acc.writes, acc.accesses, acc.page_granular, acc.violations) == \
        (one.writes, one.accesses, one.page_granular_exits, one.violations)
    assert np.array_equal(acc.pg_per_page, one.c.pg_per_page)
    assert np.array_equal(acc.viol_per_sub.to_array(), one.c.viol_per_sub.to_array())
    assert np.array_equal(acc.writes_per_sub.to_array(), one.c.writes_per_sub.to_array())
    assert acc.ip_counts == one.c.ip_counts


def test_page_crossing_write_is_one_access_per_page():
    """A 16-byte write at the last 8 bytes of a page: two accesses; only the second
    page's protected sub-page 0 is violated."""
    g = 0x10000
    rows = [(g + 4096 - 8, 16, 0x401000)]
    maps = {(g >> 12) + 1: 0xFFFFFFFE}
    vm, ips = reference_vm(rows, maps)
    res = _replay(rows, maps, "all-touched")
    assert (res.writes, res.accesses, res.page_granular_exits, res.violations, res.spp_misses) == (1, 2, 1, 1, 1)
    assert_matches_vm(res, vm, ips)


def test_first_byte_check_follows_bochs():
    """A write starting in writable sub-page 0 and running into protected sub-page 1:
    a violation when every touched sub-page is checked, none with first-byte."""
    rows = [(0x5000 + 120, 16, 7)]
    maps = {0x5: 0xFFFFFFFD}
    assert _replay(rows, maps, "all-touched").violations == 1
    assert _replay(rows, maps, "first-byte").violations == 0
    rows = [(0x5000 + 250, 16, 7)]  # starts in protected sub-page 1
    assert _replay(rows, maps, "first-byte").violations == 1


def test_one_miss_per_2m_region_with_protected_writes():
    pages = {0x200: 0xFFFFFFFE, 0x201: 0xFFFFFFFE, 0x400: 0xFFFFFFFE, 0x600: 0xFFFFFFFE}
    rows = [(0x200000, 8, 1), (0x201000, 8, 1), (0x400010, 8, 1), (0x3FF000, 8, 1)]  # 0x600 never written
    vm, ips = reference_vm(rows, pages)
    res = _replay(rows, pages, "all-touched")
    assert res.spp_misses == 2 == vm._stats.spp_misses


@settings(max_examples=100, deadline=None)
@given(ranges=st.lists(st.tuples(st.integers(0, 1 << 24), st.integers(1, 20000)), max_size=6))
def test_policy_maps_computed_with_numpy_equal_policy_access_maps(ranges):
    from sppkit.engines.replay.replay import maps_from_ranges
    from sppkit.policy import Policy

    want = Policy.from_ranges(ranges).access_maps() if ranges else {}
    g, m = maps_from_ranges(ranges)
    assert dict(zip(g.tolist(), m.tolist())) == want


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=scenario())
def test_sparse_subpage_counters_match(sc):
    """Large policies keep per-sub-page counts in a dict: same results."""
    from sppkit.engines.replay.replay import SubCounts

    rows, maps = sc
    saved = SubCounts.DENSE_LIMIT
    SubCounts.DENSE_LIMIT = -1
    try:
        res = _replay(rows, maps, "all-touched", chunks=2)
        assert res.c.viol_per_sub.dense is None
    finally:
        SubCounts.DENSE_LIMIT = saved
    vm, ips = reference_vm(rows, maps)
    assert_matches_vm(res, vm, ips)
    assert res.top_subpages(5) == _replay(rows, maps, "all-touched").top_subpages(5)


def test_too_many_protected_pages_is_a_clear_error():
    from sppkit.engines.replay.replay import MAX_PROTECTED_PAGES
    from sppkit.policy import Policy

    with pytest.raises(ValueError, match="at most"):
        ProtectionModel.from_policy(Policy.from_ranges([(0, (MAX_PROTECTED_PAGES + 1) << 12)]))
