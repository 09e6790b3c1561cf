"""``Vm.write_permit`` / ``permit_epoch`` / ``count_permitted_writes`` and the
processor's ``cached_write_permit``: the contract an engine relies on to make some
writes without calling ``vm.write`` (the Unicorn engine's permit mirror).

The property: whenever ``write_permit(gfn)`` says a write is permitted, ``vm.write``
of it returns ALLOWED, puts its bytes at ``frame_hpa | off`` and changes the
statistics exactly as ``count_permitted_writes`` would — nothing else (no walk, no
cache entry, no handler, no dirty bit)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sppkit import Decision, Vm
from sppkit.vmm.vm import ALLOWED

from vmm_helpers import FULL, PAGE, spp_vm

BASE = 0x10000000
GFN = BASE >> 12
NPAGES = 4


def permitted(vm: Vm, gpa: int, size: int) -> tuple[int, int, bool] | None:
    p = vm.write_permit(gpa >> 12)
    if p is None:
        return None
    off = gpa & 0xFFF
    mask = vm.processor.spp_write_masks[(off >> 7) << 5 | (off + size - 1) >> 7]
    return p if p[1] & mask == mask else None


def cache_state(vm: Vm):
    c = vm.processor.cache
    return {k: dict(v) for k, v in c.tags.items()}, c.hits, c.misses, c.invalidations


@settings(max_examples=60, deadline=None)
@given(maps=st.lists(st.integers(0, FULL), min_size=NPAGES, max_size=NPAGES),
       writes=st.lists(st.tuples(st.sampled_from([0x800, 0x804, 0x1800, 0x2040, 0x3F80, 0xFFC])  # (again and again)
                                 | st.integers(0, NPAGES * PAGE - 1), st.integers(1, 16), st.integers(0, 255)),
                       min_size=1, max_size=60),
       first_byte=st.booleans(), unprotect=st.booleans())
def test_a_permitted_write_is_exactly_what_write_does(maps, writes, first_byte, unprotect):
    vm = spp_vm(spp_write_check="first-byte" if first_byte else "all-touched")
    vm.set_subpage_access(GFN, maps)
    vm.on_violation(lambda ev: Decision.UNPROTECT if unprotect else Decision.SKIP)
    for off, size, byte in writes:
        gpa = BASE + min(off, NPAGES * PAGE - size)
        if (gpa & 0xFFF) + size > PAGE:
            vm.write(gpa, bytes([byte]) * size)  # (a page-crossing write: never permitted alone)
            continue
        p = permitted(vm, gpa, size)
        if p is None:
            vm.write(gpa, bytes([byte]) * size)
            continue
        stats, cache, epoch = vm.stats(top=100), cache_state(vm), vm.permit_epoch
        assert vm.write(gpa, bytes([byte]) * size) is ALLOWED
        assert vm.memory.read((p[0] | (gpa & 0xFFF)), size) == bytes([byte]) * size
        assert cache_state(vm) == cache and vm.permit_epoch == epoch  # no walk, no new entry
        want = dict(stats)
        want["writes"] += 1
        if p[2]:
            want["page_granular"] += 1
            want["exits_avoided"] += 1
        got = vm.stats(top=100)
        assert {k: v for k, v in got.items() if k != "top_page_granular"} == \
            {k: v for k, v in want.items() if k != "top_page_granular"}
        counts = {e["gfn"]: e["writes"] for e in got["top_page_granular"]}
        before = {e["gfn"]: e["writes"] for e in stats["top_page_granular"]}
        if p[2]:
            before[gpa >> 12] = before.get(gpa >> 12, 0) + 1
        assert counts == before


def test_count_permitted_writes_counts_as_write_does():
    vm = spp_vm()
    vm.set_subpage_access(GFN, [FULL & ~1])  # sub-page 0 protected: the page is granular
    vm.write(BASE + 0x800, b"x")
    vm.write(BASE + 0x800, b"x")  # (cached mapping, then its vector)
    assert vm.write_permit(GFN) is not None and vm.write_permit(GFN)[2] is True
    before = vm.stats()
    vm.count_permitted_writes(5, [(GFN, 3)])
    after = vm.stats()
    assert after["writes"] == before["writes"] + 5
    assert after["page_granular"] == before["page_granular"] + 3
    assert after["top_page_granular"] == [{"gfn": GFN, "writes": before["top_page_granular"][0]["writes"] + 3}]


@pytest.mark.parametrize(("writes", "granular", "what"), [
    (-1, (), "writes=-1"), (True, (), "writes=True"), (1.0, (), "writes=1.0"),
    (2, [(GFN, 3)], "at most writes=2"), (2, [(GFN, 0)], "positive"), (2, [(GFN, True)], "positive"),
])
def test_count_permitted_writes_refuses_bad_counts_and_changes_nothing(writes, granular, what):
    vm = spp_vm()
    before = vm.stats()
    with pytest.raises(ValueError, match=what.replace("(", r"\(").replace(")", r"\)")):
        vm.count_permitted_writes(writes, granular)
    assert vm.stats() == before


def test_write_permit_is_none_without_a_cached_permission():
    vm = spp_vm()
    vm.set_subpage_access(GFN, [FULL & ~1])
    assert vm.write_permit(GFN) is None  # nothing cached yet
    assert vm.write_permit(GFN + 100) is None  # no memslot
    assert Vm(cache=False).write_permit(GFN) is None
    vm.write(BASE + 0x10, b"x")  # denied (SKIP): a failed walk caches nothing
    assert vm.write_permit(GFN) is None


def test_write_permit_of_a_writable_page_permits_every_sub_page():
    vm = spp_vm()
    vm.write(BASE + 0x10, b"x")  # (no sub-page protected: an ordinary writable mapping)
    p = vm.write_permit(GFN)
    assert p is not None and p[1] == (1 << 64) - 1 and p[2] is False
    assert p[0] == vm.hpa_of(BASE)


def test_write_permit_is_none_with_a_write_observer():
    vm = spp_vm()
    vm.write(BASE, b"x")
    e = vm.permit_epoch
    vm.on_write(lambda g, n, rip: None)
    assert vm.write_permit(GFN) is None and vm.permit_epoch != e  # (the observer must see every write)


def test_write_permit_needs_the_dirty_flag_with_ept_ad():
    """With EPT A/D, translate_one's first step permits a write only on a mapping whose
    dirty flag is cached set: a mapping cached by a read is not a permit."""
    vm = spp_vm(ept_ad=True)
    vm.read(BASE, 8)
    assert vm.write_permit(GFN) is None
    vm.write(BASE, b"x")
    assert vm.write_permit(GFN) is not None


@pytest.mark.parametrize("change", ["set_subpage_access", "add_memslot", "disable_spp", "invept", "load_controls",
                                    "reset_stats", "prune"])
def test_permit_epoch_moves_whenever_a_permit_may_change(change):
    vm = spp_vm()
    vm.set_subpage_access(GFN, [FULL & ~1])
    vm.write(BASE + 0x800, b"x")
    e = vm.permit_epoch
    if change == "set_subpage_access":
        vm.set_subpage_access(GFN, [FULL & ~3])
    elif change == "add_memslot":
        vm.add_memslot(9, 0x40000000, PAGE)
    elif change == "disable_spp":
        vm.disable_spp()
    elif change == "invept":
        vm.processor.invept("all-context")
    elif change == "reset_stats":
        vm.reset_stats()
    elif change == "prune":
        vm._stats.page_granular_by_page.prune()
    else:
        vm.processor.load_controls(secondary_controls=vm.processor.secondary_controls)
    assert vm.permit_epoch != e


def test_cached_write_permit_follows_the_cache():
    vm = spp_vm()
    vm.set_subpage_access(GFN, [0xFFFF0000])  # sub-pages 0-15 protected
    cpu = vm.processor
    assert cpu.cached_write_permit(GFN) is None
    vm.write(BASE + 0x800, b"x")
    vm.write(BASE + 0x800, b"x")
    frame, vector = cpu.cached_write_permit(GFN)
    assert frame == vm.hpa_of(BASE)
    assert [(vector >> (2 * s)) & 1 for s in range(32)] == [0] * 16 + [1] * 16
    vm.processor.invept("all-context")
    assert cpu.cached_write_permit(GFN) is None


def test_write_permit_waits_for_a_page_to_be_counted():
    """A write to a page holding a protected sub-page adds the page to the page-granular
    counts when it is not there yet, which may prune them: not a permitted write (only
    counting, nothing else) until write() has counted the page again."""
    vm = spp_vm()
    vm.set_subpage_access(GFN, [FULL & ~1])
    vm.write(BASE + 0x800, b"x")
    vm.write(BASE + 0x800, b"x")
    assert vm.write_permit(GFN) is not None
    vm.reset_stats()
    assert vm.write_permit(GFN) is None
    vm.write(BASE + 0x800, b"x")
    assert vm.write_permit(GFN) is not None


# ------------------------------------------------------------------ the write cache in C
def _cached_write(vm: Vm):
    import ctypes

    entry = vm.native_write_cache()
    if entry is None:
        from sppkit.vmm.write_cache import status

        pytest.skip(f"the C write cache cannot be built here: {status()[1]}")
    fn = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_int64)(entry[0])
    return lambda gpa, data: fn(entry[1], gpa, len(data), int.from_bytes(data, "little"))


def test_the_write_cache_makes_only_what_write_would_allow_at_its_first_step():
    vm = spp_vm()
    vm.set_subpage_access(GFN, [FULL & ~1])  # sub-page 0 protected
    cached = _cached_write(vm)
    assert not cached(BASE + 0x800, b"a")  # nothing copied yet: to vm.write
    for _ in range(2):
        vm.write(BASE + 0x800, b"a")
        vm.note_write_cache(BASE + 0x800, 1, True)
    before = vm.stats()
    assert cached(BASE + 0x900, b"\x11\x22")  # a writable sub-page: made, counted
    assert vm.read(BASE + 0x900, 2) == b"\x11\x22"
    assert not cached(BASE + 0x10, b"z")  # the protected sub-page: refused, nothing made
    assert not cached(BASE + 0x7C, b"12345678")  # touches sub-page 0
    assert not cached(BASE + 0xFFC, b"12345678")  # crosses the page
    assert vm.read(BASE + 0x10, 1) == b"\x00"
    after = vm.stats()  # (folded before they are read)
    assert (after["writes"], after["page_granular"]) == (before["writes"] + 1, before["page_granular"] + 1)


def test_the_write_cache_is_emptied_when_the_permits_change():
    vm = spp_vm()
    vm.set_subpage_access(GFN, [FULL & ~1])
    cached = _cached_write(vm)
    for _ in range(2):
        vm.write(BASE + 0x800, b"a")
        vm.note_write_cache(BASE + 0x800, 1, True)
    assert cached(BASE + 0x800, b"b")
    vm.set_subpage_access(GFN, [FULL & ~1 & ~(1 << 16)])  # sub-page 16 protected now (INVEPT)
    vm.sync_write_cache()
    assert not cached(BASE + 0x800, b"c") and vm.read(BASE + 0x800, 1) == b"b"
