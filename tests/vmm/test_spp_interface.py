"""The SPP interface: enable/disable, set/get of 32-bit access maps, raw SPP vectors, the
errors (each naming the offending gfn or map), and all-or-nothing batches."""

from __future__ import annotations

import numpy as np
import pytest

from sppkit import Vm
from sppkit.arch import map_from_vector, vector_from_map
from sppkit.vmm import (
    GfnNotInMemslot,
    GfnReadOnly,
    SppBatchTooLarge,
    SppError,
    SppNotEnabled,
)

from vmm_helpers import FULL, M2, MODES, PAGE, ept_entries, leaf, spp_vm, vm_snapshot

BASE = 0x10000000
GFN = BASE >> 12


# ---------------------------------------------------------------- enable / disable
def test_enable_returns_the_batch_limit_and_twice_is_a_noop():
    vm = Vm()
    vm.add_memslot(0, BASE, 4 * PAGE)
    assert not vm.spp_enabled
    assert vm.enable_spp() == 512  # lazy by default
    assert vm.sppt.mode == "lazy"
    vm.set_subpage_access(GFN, [0x1234])
    sppt = vm.sppt
    assert vm.enable_spp("lazy") == 512
    assert vm.sppt is sppt
    assert vm.get_subpage_access(GFN, 1) == [0x1234], "enabling again reset the maps"
    with pytest.raises(SppError, match="lazy"):
        vm.enable_spp("eager")
    assert vm.sppt is sppt and vm.get_subpage_access(GFN, 1) == [0x1234]


def test_enable_with_unknown_mode_changes_nothing():
    vm = Vm()
    vm.add_memslot(0, BASE, PAGE)
    frames = dict(vm.memory._frames)
    with pytest.raises(ValueError, match="mode='fast'"):
        vm.enable_spp("fast")
    assert not vm.spp_enabled and vm.memslots()[0].maps is None
    assert vm.memory._frames.keys() == frames.keys()


def test_disable_when_not_enabled():
    vm = Vm()
    with pytest.raises(SppNotEnabled):
        vm.disable_spp()


@pytest.mark.parametrize(
    "call",
    [
        lambda vm: vm.set_subpage_access(GFN, [0]),
        lambda vm: vm.get_subpage_access(GFN, 1),
        lambda vm: vm.set_spp_vector(BASE, 0),
        lambda vm: vm.get_spp_vector(BASE),
    ],
)
def test_calls_need_spp_enabled(call):
    vm = Vm()
    vm.add_memslot(0, BASE, PAGE)
    with pytest.raises(SppNotEnabled, match="enable_spp"):
        call(vm)


# ---------------------------------------------------------------- set / get
@pytest.mark.parametrize("mode", MODES)
def test_default_maps_are_full_and_get_returns_what_was_set(mode):
    vm = spp_vm(mode)
    assert vm.get_subpage_access(GFN, 16) == [FULL] * 16
    maps = [0, 1, 0x80000000, 0x55555555, 0xAAAAAAAA, 0xFFFF0000, FULL, 0x12345678]
    assert vm.set_subpage_access(GFN + 3, maps) == 0
    assert vm.get_subpage_access(GFN + 3, len(maps)) == maps
    assert vm.get_subpage_access(GFN, 3) == [FULL] * 3
    assert vm.get_subpage_access(GFN + 11, 5) == [FULL] * 5
    assert vm.get_subpage_access(GFN, 0) == []
    # numpy values are fine too
    vm.set_subpage_access(GFN, np.array([7, 8], dtype=np.uint32))
    assert vm.get_subpage_access(GFN, 2) == [7, 8]
    assert all(type(x) is int for x in vm.get_subpage_access(GFN, 2))


def test_memslots_added_after_enable_are_protectable():
    vm = Vm()
    vm.enable_spp("lazy")
    vm.add_memslot(4, BASE, 2 * PAGE)
    vm.set_subpage_access(GFN + 1, [0])
    assert vm.get_subpage_access(GFN, 2) == [FULL, 0]
    assert not vm.write(BASE + PAGE + 1, b"x").committed
    assert vm.write(BASE + 1, b"x").committed


def test_batch_across_adjacent_slots():
    vm = spp_vm("eager", slots=((0, BASE, 2 * PAGE), (1, BASE + 2 * PAGE, 2 * PAGE)))
    vm.set_subpage_access(GFN + 1, [1, 2])
    assert vm.get_subpage_access(GFN, 4) == [FULL, 1, 2, FULL]


def test_batch_of_exactly_512_pages():
    vm = spp_vm("eager", slots=((0, M2, M2),))
    maps = [(i * 2654435761) & FULL for i in range(512)]
    vm.set_subpage_access(M2 >> 12, maps)
    assert vm.get_subpage_access(M2 >> 12, 512) == maps


# ---------------------------------------------------------------- raw SPP vectors
@pytest.mark.parametrize("mode", MODES)
def test_spp_vectors(mode):
    vm = spp_vm(mode)
    assert vm.get_spp_vector(BASE) == 0x5555_5555_5555_5555
    vm.set_spp_vector(BASE + PAGE + 0x123, 0x0000_0000_0000_0005)  # sub-pages 0, 1
    assert vm.get_subpage_access(GFN + 1, 1) == [0b11]
    assert vm.get_spp_vector(BASE + PAGE) == 5
    vm.set_subpage_access(GFN + 2, [0x80000001])
    assert vm.get_spp_vector(BASE + 2 * PAGE + 0xFFF) == vector_from_map(0x80000001) == (1 << 62) | 1
    assert map_from_vector(vm.get_spp_vector(BASE + 2 * PAGE)) == 0x80000001
    assert vm.write(BASE + PAGE + 0xFE, b"ok").committed
    assert not vm.write(BASE + PAGE + 0x100, b"no").committed


@pytest.mark.parametrize("vector", [0x2, 1 << 63, 0xFFFF_FFFF_FFFF_FFFF, 0x5555_5555_5555_5557])
def test_spp_vector_odd_bits_refused(vector):
    vm = spp_vm("lazy")
    vm.set_spp_vector(BASE, 0x1)
    with pytest.raises(ValueError, match="odd bits") as ei:
        vm.set_spp_vector(BASE, vector)
    assert f"{vector:#018x}" in str(ei.value)
    assert vm.get_subpage_access(GFN, 1) == [1]


@pytest.mark.parametrize("vector", [-1, 1 << 64, True])
def test_spp_vector_out_of_range_refused(vector):
    vm = spp_vm("lazy")
    with pytest.raises(ValueError):
        vm.set_spp_vector(BASE, vector)
    assert vm.get_subpage_access(GFN, 1) == [FULL]


# ---------------------------------------------------------------- errors name the culprit
def test_flags_must_be_zero():
    vm = spp_vm("lazy")
    with pytest.raises(ValueError, match="flags=1"):
        vm.set_subpage_access(GFN, [0], flags=1)
    assert vm.get_subpage_access(GFN, 1) == [FULL]


def test_more_than_512_pages_refused():
    vm = spp_vm("lazy", slots=((0, M2, 2 * M2),))
    with pytest.raises(SppBatchTooLarge, match="513 pages") as ei:
        vm.set_subpage_access(M2 >> 12, [0] * 513)
    assert isinstance(ei.value, SppError) and ei.value.npages == 513
    with pytest.raises(SppBatchTooLarge, match="513"):
        vm.get_subpage_access(M2 >> 12, 513)
    assert vm.get_subpage_access(M2 >> 12, 512) == [FULL] * 512


def test_gfn_outside_memslots_named():
    vm = spp_vm("lazy")
    bad = GFN + 16
    with pytest.raises(GfnNotInMemslot) as ei:
        vm.set_subpage_access(GFN + 14, [0, 0, 0])
    assert isinstance(ei.value, SppError)
    assert ei.value.gfn == bad and f"gfn={bad:#x}" in str(ei.value)
    with pytest.raises(GfnNotInMemslot, match=f"gfn={GFN - 1:#x}"):
        vm.get_subpage_access(GFN - 1, 2)


@pytest.mark.parametrize("amap", [1 << 32, -1, 2**40, 1.5, "0", None, True])
def test_map_outside_32_bits_named(amap):
    vm = spp_vm("lazy")
    with pytest.raises(ValueError) as ei:
        vm.set_subpage_access(GFN, [0, amap])
    msg = str(ei.value)
    assert repr(amap) in msg and f"gfn={GFN + 1:#x}" in msg


def test_access_maps_must_be_a_sequence():
    vm = spp_vm("lazy")
    with pytest.raises(TypeError):
        vm.set_subpage_access(GFN, 0)


@pytest.mark.parametrize("gfn_base", [-1, 1.0, "1", None])
def test_bad_gfn_base(gfn_base):
    vm = spp_vm("lazy")
    with pytest.raises(ValueError, match="gfn_base"):
        vm.set_subpage_access(gfn_base, [0])


def test_readonly_gfn_cannot_be_protected():
    vm = Vm()
    vm.add_memslot(0, BASE, 2 * PAGE)
    vm.add_memslot(1, BASE + 2 * PAGE, 2 * PAGE, readonly=True)
    vm.enable_spp("eager")
    with pytest.raises(GfnReadOnly) as ei:
        vm.set_subpage_access(GFN + 1, [0, 0])
    assert isinstance(ei.value, SppError)
    assert ei.value.gfn == GFN + 2 and f"gfn={GFN + 2:#x}" in str(ei.value) and "slot 1" in str(ei.value)
    assert vm.get_subpage_access(GFN, 4) == [FULL] * 4
    vm.set_subpage_access(GFN + 2, [FULL])  # "unprotected" is fine
    assert vm.get_subpage_access(GFN + 2, 1) == [FULL]


# ---------------------------------------------------------------- atomicity
def _atomic_vm(mode):
    vm = spp_vm(mode, slots=((0, BASE, 16 * PAGE), (1, M2, M2), (2, BASE + 16 * PAGE, PAGE)))
    vm.add_memslot(3, BASE + 17 * PAGE, PAGE, readonly=True)
    vm.load(BASE, bytes(range(256)) * 16)
    vm.set_subpage_access(GFN + 2, [0x0F0F0F0F, 0])
    vm.set_subpage_access((M2 >> 12) + 9, [0xFFFF])
    vm.write(BASE + 2 * PAGE, b"x")  # lazy: populate the SPPT
    vm.write(M2 + 9 * PAGE, b"x")
    return vm


GPAS = [BASE + i * PAGE for i in range(18)] + [M2 + i * PAGE for i in range(0, 512, 3)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "gfn_base, maps, error",
    [
        # the last gfn is outside every memslot (BASE + 18 pages)
        (GFN + 1, [0] * 16 + [FULL, 0], GfnNotInMemslot),
        # the last gfn is read-only
        (GFN + 10, [0] * 7 + [0x1], GfnReadOnly),
        # the last map is 2**32
        (GFN, [0x1] * 15 + [1 << 32], ValueError),
        # a 2-MiB leaf would have been split by the first page
        ((M2 >> 12) + 100, [0, 0, -1], ValueError),
        ((M2 >> 12) + 510, [0, 0, 0], GfnNotInMemslot),
    ],
)
def test_failed_batch_changes_nothing(mode, gfn_base, maps, error):
    vm = _atomic_vm(mode)
    before = vm_snapshot(vm)
    ept_before = ept_entries(vm, GPAS)
    sppt_before = {g: vm.sppt.builder.walk(g) for g in GPAS}
    maps_before = vm.get_subpage_access(GFN, 16) + vm.get_subpage_access(M2 >> 12, 512)
    invepts = vm.invepts
    with pytest.raises(error):
        vm.set_subpage_access(gfn_base, maps)
    assert vm.get_subpage_access(GFN, 16) + vm.get_subpage_access(M2 >> 12, 512) == maps_before
    assert ept_entries(vm, GPAS) == ept_before
    assert {g: vm.sppt.builder.walk(g) for g in GPAS} == sppt_before
    assert vm_snapshot(vm) == before  # every frame: guest memory, EPT and SPPT tables
    assert vm.invepts == invepts
    # and the VM still behaves as before
    lv, raw = leaf(vm, M2 + 100 * PAGE)
    assert raw & 2 and not raw & (1 << 61)
    assert not vm.write(BASE + 3 * PAGE, b"y").committed
    assert vm.write(BASE + PAGE, b"y").committed
