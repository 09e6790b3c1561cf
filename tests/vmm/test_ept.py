"""The EPT the VMM builds: largest leaf that fits, protected gfns on 4-KiB leaves with
W = 0 and bit 61, huge leaves split on demand and merged back, disable_spp undoing it all,
INVEPT after every change."""

from __future__ import annotations

import pytest

from sppkit import GpaNotMapped, Vm
from sppkit.arch import EPT_LARGE, EPT_SPP, Level

from vmm_helpers import FULL, G1, M2, MODES, PAGE, leaf, spp_vm

W = 1 << 1


def frame_of(raw: int, level: Level) -> int:
    return raw & ((1 << 46) - 1) & ~(level.page_size - 1)


def assert_maps(vm: Vm, gpa: int, level: Level, *, writable: bool = True, spp: bool = False):
    lv, raw = leaf(vm, gpa)
    assert lv == level, f"gpa {gpa:#x}: {lv.name} leaf, expected {level.name}"
    assert bool(raw & W) == writable, f"gpa {gpa:#x}: W={bool(raw & W)}"
    assert bool(raw & EPT_SPP) == spp, f"gpa {gpa:#x}: bit 61={bool(raw & EPT_SPP)}"
    # the leaf maps the host frame backing gpa
    assert frame_of(raw, lv) + (gpa & (lv.page_size - 1)) == vm.hpa_of(gpa)


# ---------------------------------------------------------------- largest leaf
def test_1g_slot_at_1g_is_one_pdpte_leaf():
    vm = Vm()
    vm.add_memslot(0, G1, G1)
    walk = vm.ept.builder.walk(G1 + 12345 * PAGE)
    assert [lv for lv, _, _ in walk] == [Level.PML4E, Level.PDPTE]
    assert walk[-1][2] & EPT_LARGE
    for g in (G1, G1 + G1 // 2, 2 * G1 - PAGE):
        assert_maps(vm, g, Level.PDPTE)
    assert leaf(vm, G1 - PAGE) is None and leaf(vm, 2 * G1) is None


def test_2m_slot_is_one_pde_leaf():
    vm = Vm()
    vm.add_memslot(0, 3 * M2, M2)
    walk = vm.ept.builder.walk(3 * M2 + 7 * PAGE)
    assert [lv for lv, _, _ in walk] == [Level.PML4E, Level.PDPTE, Level.PDE]
    assert_maps(vm, 3 * M2, Level.PDE)
    assert_maps(vm, 4 * M2 - 1, Level.PDE)


def test_mixed_slot_uses_the_largest_leaf_for_each_piece():
    # [1 GiB - 2 MiB - 8 KiB, 2 GiB + 2 MiB + 4 KiB): 4 KiB, 2 MiB, 1 GiB, 2 MiB, 4 KiB leaves
    start = G1 - M2 - 2 * PAGE
    end = 2 * G1 + M2 + PAGE
    vm = Vm()
    vm.add_memslot(0, start, end - start)
    assert_maps(vm, start, Level.PTE)
    assert_maps(vm, start + PAGE, Level.PTE)
    assert_maps(vm, G1 - M2, Level.PDE)
    assert_maps(vm, G1, Level.PDPTE)
    assert_maps(vm, 2 * G1 - 1, Level.PDPTE)
    assert_maps(vm, 2 * G1, Level.PDE)
    assert_maps(vm, 2 * G1 + M2, Level.PTE)
    assert leaf(vm, end) is None
    vm.load(G1 - 3, b"abcdef")  # host memory is contiguous across the leaves
    assert vm.read(G1 - 3, 6) == b"abcdef"


def test_small_unaligned_slot_uses_4k_leaves():
    vm = Vm()
    vm.add_memslot(0, 0x10000000, 16 * PAGE)
    for i in range(16):
        assert_maps(vm, 0x10000000 + i * PAGE, Level.PTE)


def test_readonly_slot_leaves_are_not_writable():
    vm = Vm()
    vm.add_memslot(0, M2, M2, readonly=True)
    assert_maps(vm, M2, Level.PDE, writable=False)


# ---------------------------------------------------------------- split and merge
@pytest.mark.parametrize("mode", MODES)
def test_protect_in_2m_leaf_splits_and_unprotect_merges(mode):
    vm = spp_vm(mode, slots=((0, M2, M2),))
    gfn = (M2 >> 12) + 77
    vm.set_subpage_access(gfn, [0x0000FFFF])
    assert vm.ept.splits == 1
    assert_maps(vm, gfn << 12, Level.PTE, writable=False, spp=True)
    # the rest of the region: 4-KiB leaves, writable, no bit 61
    for g in (M2, (gfn - 1) << 12, (gfn + 1) << 12, 2 * M2 - PAGE):
        assert_maps(vm, g, Level.PTE)
    assert vm.write((gfn + 1) << 12, b"neighbour").committed
    assert vm.write(gfn << 12, b"allowed").committed
    assert not vm.write((gfn << 12) + 0x800, b"denied").committed

    vm.set_subpage_access(gfn, [FULL])
    assert vm.ept.merges == 1
    assert_maps(vm, M2, Level.PDE)
    assert_maps(vm, gfn << 12, Level.PDE)
    # contents survive split and merge
    assert vm.read((gfn + 1) << 12, 9) == b"neighbour"
    assert vm.read(gfn << 12, 7) == b"allowed"
    assert vm.write((gfn << 12) + 0x800, b"now fine").committed


@pytest.mark.parametrize("mode", MODES)
def test_merge_waits_for_the_last_protected_gfn_of_the_region(mode):
    vm = spp_vm(mode, slots=((0, M2, M2),))
    a, b = (M2 >> 12) + 1, (M2 >> 12) + 500
    vm.set_subpage_access(a, [0])
    vm.set_subpage_access(b, [0])
    assert vm.ept.splits == 1
    vm.set_subpage_access(a, [FULL])
    assert leaf(vm, M2)[0] == Level.PTE, "merged while gfn b is still protected"
    assert_maps(vm, a << 12, Level.PTE)
    assert_maps(vm, b << 12, Level.PTE, writable=False, spp=True)
    vm.set_subpage_access(b, [FULL])
    assert_maps(vm, M2, Level.PDE)


@pytest.mark.parametrize("mode", MODES)
def test_protect_in_1g_leaf_splits_twice_and_merges_back(mode):
    vm = spp_vm(mode, slots=((0, G1, G1),))
    gfn = (G1 + 5 * M2 + 3 * PAGE) >> 12
    other = G1 + 100 * M2
    vm.set_subpage_access(gfn, [0xFFFF0000])
    assert vm.ept.splits == 2  # 1 GiB → 2 MiB → 4 KiB
    assert_maps(vm, gfn << 12, Level.PTE, writable=False, spp=True)
    assert_maps(vm, G1 + 5 * M2, Level.PTE)
    assert_maps(vm, other, Level.PDE)  # the other 2-MiB pieces stay 2-MiB leaves
    assert not vm.write(gfn << 12, b"x").committed
    assert vm.write((gfn << 12) + 0xF80, b"x").committed

    # protect a second gfn in another 2-MiB region of the same 1 GiB
    vm.set_subpage_access(other >> 12, [0])
    assert_maps(vm, other, Level.PTE, writable=False, spp=True)
    vm.set_subpage_access(gfn, [FULL])
    assert_maps(vm, gfn << 12, Level.PDE)  # its 2-MiB region merged...
    assert_maps(vm, G1, Level.PDE)  # ...but not the 1 GiB: `other` is protected
    vm.set_subpage_access(other >> 12, [FULL])
    assert_maps(vm, G1, Level.PDPTE)
    assert_maps(vm, gfn << 12, Level.PDPTE)
    assert vm.read((gfn << 12) + 0xF80, 1) == b"x"


def test_region_shared_by_two_slots_is_not_merged_into_one_leaf():
    vm = spp_vm("eager", slots=((0, M2, M2 // 2), (1, M2 + M2 // 2, M2 // 2)))
    gfn = (M2 >> 12) + 3
    vm.set_subpage_access(gfn, [0])
    vm.set_subpage_access(gfn, [FULL])
    assert_maps(vm, M2, Level.PTE)
    assert_maps(vm, M2 + M2 // 2, Level.PTE)
    assert vm.ept.merges == 0


def test_protected_page_needs_a_4k_leaf_even_when_protected_at_add_time():
    # slot added after enable_spp, then protected: same split
    vm = Vm()
    vm.enable_spp("eager")
    vm.add_memslot(9, 4 * M2, M2)
    assert_maps(vm, 4 * M2, Level.PDE)
    vm.set_subpage_access((4 * M2 >> 12) + 2, [0x1])
    assert_maps(vm, 4 * M2 + 2 * PAGE, Level.PTE, writable=False, spp=True)
    assert vm.write(4 * M2 + 2 * PAGE, b"ok").committed
    assert not vm.write(4 * M2 + 2 * PAGE + 128, b"no").committed


# ---------------------------------------------------------------- disable_spp
@pytest.mark.parametrize("mode", MODES)
def test_disable_spp_restores_w_clears_bit61_and_merges(mode):
    vm = spp_vm(mode, slots=((0, G1, G1), (1, 0x10000000, 4 * PAGE)))
    g1 = (G1 + 9 * PAGE) >> 12
    g2 = 0x10000000 >> 12
    vm.set_subpage_access(g1, [0])
    vm.set_subpage_access(g2, [0, 0x1, FULL, 0xFFFFFFFE])
    assert not vm.write(G1 + 9 * PAGE, b"x").committed
    sppt_frames = set(vm.sppt.builder.tables)
    invepts = vm.invepts
    vm.disable_spp()
    assert not vm.spp_enabled and vm.sppt is None
    assert vm.invepts > invepts
    assert_maps(vm, G1, Level.PDPTE)
    assert_maps(vm, G1 + 9 * PAGE, Level.PDPTE)
    for i in range(4):
        assert_maps(vm, 0x10000000 + i * PAGE, Level.PTE)
    # the SPPT frames are freed
    live = {pfn << 12 for pfn in vm.memory._frames}
    assert sppt_frames and not sppt_frames & live
    # every write goes through now, without asking anyone
    asked = []
    vm.on_violation(lambda ev: asked.append(ev))
    assert vm.write(G1 + 9 * PAGE, b"x").committed
    assert vm.write(0x10000000 + 3 * PAGE, b"y").committed
    assert asked == []
    with pytest.raises(Exception, match="not enabled"):
        vm.get_subpage_access(g2, 1)
    # enabling again starts from unprotected pages
    assert vm.enable_spp(mode) == 512
    assert vm.get_subpage_access(g2, 4) == [FULL] * 4
    assert vm.write(0x10000000, b"z").committed


# ---------------------------------------------------------------- INVEPT
@pytest.mark.parametrize("mode", MODES)
def test_invept_after_changes_so_a_cached_writable_mapping_is_not_used(mode):
    vm = spp_vm(mode, cache=True)
    gpa = 0x10000000
    assert vm.write(gpa, b"a").committed  # caches a writable mapping of the page
    misses = vm.processor.cache.misses
    assert vm.write(gpa, b"b").committed
    assert vm.processor.cache.misses == misses, "the second write walked instead of hitting the cache"
    n = vm.invepts
    vm.set_subpage_access(gpa >> 12, [0])
    assert vm.invepts == n + 1
    assert not vm.write(gpa, b"c").committed, "a stale writable translation was used"
    assert vm.read(gpa, 1) == b"b"
    n = vm.invepts
    vm.set_subpage_access(gpa >> 12, [0])  # no change: no INVEPT needed
    assert vm.invepts == n
    vm.set_subpage_access(gpa >> 12, [FULL])
    assert vm.invepts == n + 1
    assert vm.write(gpa, b"d").committed


def test_memslot_changes_invept():
    vm = Vm(cache=True)
    vm.add_memslot(0, 0, PAGE)
    assert vm.write(0, b"a").committed
    n = vm.invepts
    vm.move_memslot(0, PAGE)
    assert vm.invepts == n + 1
    with pytest.raises(GpaNotMapped):
        vm.write(0, b"b")
    assert vm.write(PAGE, b"c").committed and vm.read(PAGE, 1) == b"c"
    vm.delete_memslot(0)
    assert vm.invepts == n + 2


@pytest.mark.parametrize("mode", MODES)
def test_one_batch_unprotecting_two_regions_merges_up_to_1g(mode):
    vm = spp_vm(mode, slots=((0, G1, G1),))
    a = (G1 + 3 * M2) >> 12
    b = (G1 + 300 * M2 - PAGE) >> 12
    vm.set_subpage_access(a, [0])
    vm.set_subpage_access(b, [0])
    assert_maps(vm, a << 12, Level.PTE, writable=False, spp=True)
    assert_maps(vm, b << 12, Level.PTE, writable=False, spp=True)
    # one batch covering both would exceed 512 pages; two pages each side of the regions
    vm.set_subpage_access(b - 1, [FULL, FULL])
    assert_maps(vm, G1, Level.PDE)
    vm.set_subpage_access(a, [FULL])
    assert_maps(vm, G1, Level.PDPTE)
    assert vm.ept.merges == 3


@pytest.mark.parametrize("mode", MODES)
def test_one_batch_unprotecting_pages_of_two_adjacent_regions(mode):
    vm = spp_vm(mode, slots=((0, 0, G1),))
    first = (M2 >> 12) - 2  # last two pages of region 0, first two of region 1
    vm.set_subpage_access(first, [0, 1, 2, 3])
    assert_maps(vm, 0, Level.PTE)
    assert_maps(vm, M2 + 2 * PAGE, Level.PTE)
    assert_maps(vm, M2, Level.PTE, writable=False, spp=True)
    vm.set_subpage_access(first, [FULL] * 4)
    assert_maps(vm, 0, Level.PDPTE)
    assert_maps(vm, M2 + PAGE, Level.PDPTE)
