"""Bad input to the arch API: a clear ValueError/TypeError naming the bad value, and a
refused call changes nothing (no table entry written, no table allocated or freed).

Each case here was found by fuzzing: before the fix it raised an unclear error
(AttributeError, OverflowError, "unsupported operand", "negative shift count"), hung,
or silently acted on another address.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from sppkit.arch import (
    EPT_SPP,
    EPT_W,
    PAGE_1G,
    PAGE_2M,
    SECONDARY_ENABLE_EPT,
    SECONDARY_SPP,
    Access,
    EptBuilder,
    EptViolation,
    HostMemory,
    Level,
    MT_WB,
    Processor,
    SpptBuilder,
    decode_ept_entry,
    decode_eptp,
    decode_sppt_entry,
    make_ept_entry,
    make_eptp,
    map_from_vector,
    vector_from_map,
)

FULL = vector_from_map(0xFFFF_FFFF)

from arch_helpers import deadline, named


def snapshot(mem: HostMemory, *builders) -> tuple:
    """Every frame's bytes and every builder's table set."""
    return {pfn: bytes(f) for pfn, f in dict(mem._frames).items()}, [set(b.tables) for b in builders]


class Rig:
    """4-KiB leaves at gpa 0..0x4000 (bit 61 on 0x1000), a 2-MiB leaf at 2 MiB, SPP
    vectors for gpa 0 and 0x1000, and a processor with EPT + SPP (cache on)."""

    def __init__(self) -> None:
        self.mem = mem = HostMemory()
        self.ept = EptBuilder(mem)
        self.sppt = SpptBuilder(mem)
        ram = mem.alloc_range(2 * PAGE_2M, align=PAGE_2M)
        self.ept.map(0, ram, 0x4000)
        self.ept.map(PAGE_2M, ram + PAGE_2M, PAGE_2M, page_size=PAGE_2M)
        self.ept.set_spp(0x1000)
        self.sppt.set_vector(0, FULL)
        self.sppt.set_vector(0x1000, vector_from_map(0b1))
        self.cpu = Processor(
            mem, self.ept.eptp(), secondary_controls=SECONDARY_ENABLE_EPT | SECONDARY_SPP, spptp=self.sppt.spptp,
            cache=True,
        )

    def snap(self) -> tuple:
        return snapshot(self.mem, self.ept, self.sppt)


@pytest.fixture
def rig() -> Rig:
    return Rig()


# ===================================================================== 1. constructors
@pytest.mark.parametrize("cls", [EptBuilder, SpptBuilder])
@pytest.mark.parametrize("memory", [None, bytearray(4096), 46])
def test_builder_needs_host_memory(cls, memory):
    with pytest.raises(TypeError, match=f"memory must be a HostMemory, not {type(memory).__name__}"):
        cls(memory)


# ===================================================================== 2. gpa range
#: Not an int in [0, 2**48): aliases of gpa 0 / 0x1000 / 2 MiB (bits 48 and up), wrong types.
BAD_GPAS = [1 << 48, (3 << 48) | 0x1000, (1 << 48) | PAGE_2M, 1 << 64, 1.5, True, np.int64(0x1000), "0x1000"]
#: Negative GPAs: the builders' walks refused them before the fix, these did not.
NEGATIVE_GPAS = [-1, -0x1000, -(1 << 48)]

EPT_CALLS = {
    "walk": lambda r, g: r.ept.walk(g),
    "leaf": lambda r, g: r.ept.leaf(g),
    "update_leaf": lambda r, g: r.ept.update_leaf(g, clear_bits=EPT_W),
    "set_writable": lambda r, g: r.ept.set_writable(g, False),
    "set_spp": lambda r, g: r.ept.set_spp(g, False),
    "split": lambda r, g: r.ept.split(g),
    "merge": lambda r, g: r.ept.merge(g, Level.PDE),
    "unmap": lambda r, g: r.ept.unmap(g, 0x1000),
    "map": lambda r, g: r.ept.map(g, 0x4000_0000, 0x1000),
}
SPPT_CALLS = {
    "sppt.walk": lambda r, g: r.sppt.walk(g),
    "get_vector": lambda r, g: r.sppt.get_vector(g),
    "set_vector": lambda r, g: r.sppt.set_vector(g, 0),
    "set_l2_present(False)": lambda r, g: r.sppt.set_l2_present(g, False),
    "set_l2_present(True)": lambda r, g: r.sppt.set_l2_present(g, True),
    "l1_table": lambda r, g: r.sppt.l1_table(g),
    "l1_table(allocate=False)": lambda r, g: r.sppt.l1_table(g, allocate=False),
    "spp_vector": lambda r, g: r.cpu.spp_vector(g),
}
CALLS = {**EPT_CALLS, **SPPT_CALLS}


@pytest.mark.parametrize(
    "call, gpa",
    [
        pytest.param(call, gpa, id=f"{call}-{gpa!r}")
        for call in CALLS
        for gpa in BAD_GPAS
        # (set_spp refused the 2-MiB leaf it aliased onto: "mapped by a PDE leaf")
        if not (call == "set_spp" and gpa == (1 << 48) | PAGE_2M)
    ],
)
def test_gpa_outside_48_bits_refused(rig, call, gpa):
    before = rig.snap()
    with pytest.raises(ValueError, match=named("gpa", gpa)):
        CALLS[call](rig, gpa)
    assert rig.snap() == before


@pytest.mark.parametrize("gpa", NEGATIVE_GPAS, ids=repr)
@pytest.mark.parametrize("call", ["l1_table", "l1_table(allocate=False)", "spp_vector"])
def test_negative_gpa_refused_by_l1_table_and_spp_vector(rig, call, gpa):
    before = rig.snap()
    with pytest.raises(ValueError, match=named("gpa", gpa)):
        SPPT_CALLS[call](rig, gpa)
    assert rig.snap() == before


def test_aliases_leave_gpa_0_alone(rig):
    """The fuzzer's reproducer: bits 48 and up must not reach gpa 0's entries."""
    leaf0, vec0 = rig.ept.leaf(0), rig.sppt.get_vector(0)
    for call in (
        lambda: rig.ept.set_writable(1 << 48, False),
        lambda: rig.ept.unmap(1 << 48, 0x1000),
        lambda: rig.sppt.set_vector(3 << 48, 0),
    ):
        with pytest.raises(ValueError, match="gpa="):
            call()
    assert rig.ept.leaf(0) == leaf0 and leaf0[2] & EPT_W
    assert rig.sppt.get_vector(0) == vec0 == FULL
    with pytest.raises(ValueError, match="gpa=0x1000000000000"):
        rig.cpu.spp_vector(1 << 48)
    # the last GPA and the largest GLA are still good input
    assert rig.cpu.spp_vector(0x1FFF, gla=(1 << 64) - 1) == vector_from_map(0b1)
    assert rig.ept.leaf((1 << 48) - 1) is None


@pytest.mark.parametrize("gla", [object(), "x", -1, 1.5, True, np.int64(0), 1 << 64, 1 << 100], ids=repr)
def test_spp_vector_checks_gla_as_translate_does(rig, gla):
    with pytest.raises(ValueError, match=re.escape(f"gla={gla!r}")):
        rig.cpu.spp_vector(0x1000, gla=gla)
    with pytest.raises(ValueError, match=re.escape(f"gla={gla!r}")):
        rig.cpu.translate(0x1000, 1, Access.WRITE, gla=gla)


# ===================================================================== 3. map is all-or-nothing
def test_map_across_a_large_leaf_changes_nothing():
    mem = HostMemory()
    ept = EptBuilder(mem)
    ept.map(0x200000, 0x4000_0000, PAGE_2M, page_size=PAGE_2M)
    before = snapshot(mem, ept)
    with pytest.raises(ValueError, match=r"gpa=0x200000 is inside a 2 MiB leaf at PDE .*split it first"):
        ept.map(0x1FF000, 0x1000, 0x2000)
    assert ept.leaf(0x1FF000) is None
    assert snapshot(mem, ept) == before


def test_map_across_a_1g_leaf_changes_nothing():
    mem = HostMemory()
    ept = EptBuilder(mem)
    ept.map(PAGE_1G, 0, PAGE_1G, page_size=PAGE_1G)
    before = snapshot(mem, ept)
    with pytest.raises(ValueError, match=f"gpa={PAGE_1G:#x} is inside a 1024 MiB leaf at PDPTE"):
        ept.map(PAGE_1G - PAGE_2M, 0x4000_0000, 2 * PAGE_2M, page_size=PAGE_2M)
    assert snapshot(mem, ept) == before


@pytest.mark.parametrize("name, value", [
    *(("memory_type", v) for v in (np.int64(6), np.uint8(0), 6.0, True, False, "6")),
    *(("page_size", v) for v in (4096.0, np.int64(4096), True, "4K")),
], ids=repr)
def test_map_arguments_checked_before_anything_is_written(name, value):
    mem = HostMemory()
    ept = EptBuilder(mem)
    before = snapshot(mem, ept)
    with pytest.raises(ValueError, match=re.escape(f"{name}={value!r}")):
        ept.map(0x1000, 0x1000, 0x1000, **{name: value})
    assert snapshot(mem, ept) == before


# ===================================================================== 4. unmap
def test_unmap_that_would_cut_a_leaf_changes_nothing():
    mem = HostMemory()
    ept = EptBuilder(mem)
    ept.map(0x1FF000, 0x1000, 0x1000)
    ept.map(0x200000, 0x4000_0000, PAGE_2M, page_size=PAGE_2M)
    before = snapshot(mem, ept)
    with pytest.raises(ValueError, match="would cut the PDE leaf at 0x200000"):
        ept.unmap(0x1FF000, 0x2000)
    assert ept.leaf(0x1FF000) is not None
    assert snapshot(mem, ept) == before


def test_unmap_whole_space_skips_absent_regions():
    mem = HostMemory()
    ept = EptBuilder(mem)
    with deadline(5):
        ept.unmap(0, 1 << 48)  # empty EPT: was a walk of every 4-KiB page (~13 hours)
    top = (1 << 48) - 0x1000
    ept.map(0x1000, 0x1000, 0x1000)
    ept.map(PAGE_1G, 0, PAGE_1G, page_size=PAGE_1G)
    ept.map(1 << 40, 0x4000_0000, PAGE_2M, page_size=PAGE_2M)
    ept.map(top, 0x2000, 0x1000)
    t0 = time.perf_counter()
    with deadline(5):
        ept.unmap(0, 1 << 48)
    assert time.perf_counter() - t0 < 5
    assert list(ept.leaves(0, 1 << 48)) == []
    assert all(ept.leaf(g) is None for g in (0x1000, PAGE_1G, 1 << 40, top))


@pytest.mark.parametrize("gpa, size", [(0x1000, 1 << 48), ((1 << 48) - 0x1000, 0x2000), (0, (1 << 48) + 1)])
def test_unmap_beyond_48_bits_refused(rig, gpa, size):
    before = rig.snap()
    with deadline(5), pytest.raises(ValueError, match=re.escape(f"{gpa:#x}+{size:#x} exceeds the 48-bit")):
        rig.ept.unmap(gpa, size)
    assert rig.snap() == before


# ===================================================================== 8. memory types
@pytest.mark.parametrize("memory_type", [8, 14, 1, 4, 5, 7, -1, True, 6.0, np.int64(6), None], ids=repr)
def test_make_eptp_memory_type(memory_type):
    with pytest.raises(ValueError, match=re.escape(f"memory_type={memory_type!r}")):
        make_eptp(0x100000, memory_type=memory_type)


@pytest.mark.parametrize("memory_type", [8, 1, 14, True])
def test_builder_eptp_memory_type(memory_type):
    with pytest.raises(ValueError, match=re.escape(f"memory_type={memory_type!r}")):
        EptBuilder(HostMemory()).eptp(memory_type=memory_type)


@pytest.mark.parametrize("pml4", [-4096, -(1 << 20), 1 << 52, 1 << 64, 4096.0, True, np.int64(4096)], ids=repr)
def test_make_eptp_pml4(pml4):
    with pytest.raises(ValueError, match=named("pml4", pml4)):
        make_eptp(pml4)


def test_make_eptp_uc_and_wb_only():
    assert make_eptp(0x100000, memory_type=0) == 0x100000 | (3 << 3)
    assert make_eptp(0x100000) == 0x100000 | 6 | (3 << 3)
    for bad in range(8):
        if bad not in (0, 6):
            with pytest.raises(ValueError, match=f"memory_type={bad}: an EPTP memory type must be UC"):
                make_eptp(0x100000, memory_type=bad)


@pytest.mark.parametrize("memory_type", [8, 2, 3, 7, 15, -1, True, 6.0, np.int64(6)], ids=repr)
def test_make_ept_entry_memory_type(memory_type):
    with pytest.raises(ValueError, match=re.escape(f"memory_type={memory_type!r}")):
        make_ept_entry(0x1000, leaf=True, memory_type=memory_type)


@pytest.mark.parametrize("address", [0x1001, 0x1FFF, -0x1000, 1 << 52, 1.5, True, np.int64(0x1000)], ids=repr)
def test_make_ept_entry_address(address):
    with pytest.raises(ValueError, match=named("address", address)):
        make_ept_entry(address, leaf=True)


@pytest.mark.parametrize("level", [0, 5, True, 2.0, "PTE"], ids=repr)
def test_make_ept_entry_level(level):
    with pytest.raises(ValueError, match=re.escape(f"level={level!r}")):
        make_ept_entry(0x1000, leaf=True, level=level)


@pytest.mark.parametrize("kwargs, message", [
    (dict(level=Level.PTE), "leaf=False at level PTE: a PTE always maps a page"),
    (dict(level=Level.PTE, spp=True, dirty=True), "leaf=False at level PTE"),
    (dict(leaf=True, level=Level.PML4E), "a PML4E cannot map a page"),
    (dict(spp=True), "spp given for a table pointer"),
    (dict(leaf=True, level=Level.PDE, spp=True), "bit 61 applies to 4-KiB leaves (PTEs) only"),
    (dict(level=Level.PDE, dirty=True, memory_type=0), "memory_type, dirty given for a table pointer"),
], ids=repr)
def test_make_ept_entry_refuses_what_it_would_drop(kwargs, message):
    """make_ept_entry never builds an entry other than the one asked for: leaf-only
    fields for a table pointer, a non-leaf PTE or a PML4E leaf are refused by name."""
    with pytest.raises(ValueError, match=re.escape(message)):
        make_ept_entry(0x7000, **kwargs)


def test_make_ept_entry_leaf_defaults():
    """leaf=True defaults to a 4-KiB PTE of type WB; bit 61 and D land where asked."""
    raw = make_ept_entry(0x7000, leaf=True, spp=True, dirty=True)
    d = decode_ept_entry(raw, Level.PTE, 46)
    assert (d.memory_type, d.spp, d.dirty, d.misconfig) == (MT_WB, True, True, None)
    assert make_ept_entry(0x7000, level=Level.PML4E) == make_ept_entry(0x7000) == 0x7007


# ===================================================================== 9. INVEPT
@pytest.mark.parametrize("bad", [-1, 1 << 64, 1 << 70, 1.0, True, "0x1000"], ids=repr)
def test_invept_single_context_checks_eptp(rig, bad):
    cpu = rig.cpu
    cpu.translate(0, 1, Access.READ)
    n, inv = len(cpu.cache), cpu.cache.invalidations
    with pytest.raises(ValueError, match=re.escape(f"eptp={bad!r}")):
        cpu.invept("single-context", bad)
    assert (len(cpu.cache), cpu.cache.invalidations) == (n, inv)


def test_invept_numpy_eptp_named(rig):
    v = np.int64(rig.cpu.eptp)
    with pytest.raises(ValueError, match=re.escape(f"eptp={v!r}: must be an unsigned 64-bit integer")):
        rig.cpu.invept("single-context", v)
    rig.cpu.translate(0, 1, Access.READ)
    rig.cpu.invept("single-context", int(v))  # the same value as an int: good
    assert len(rig.cpu.cache) == 0


# ===================================================================== 10. pure decoders
@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda: decode_eptp(-390, np.uint64(46)), "raw=-390"),
        (lambda: decode_eptp(np.int64(0x10001E), 99), f"raw={np.int64(0x10001E)!r}"),
        (lambda: decode_eptp(0x10001E, 99), "maxphyaddr=99"),
        (lambda: decode_eptp(0x10001E, np.uint64(46)), f"maxphyaddr={np.uint64(46)!r}"),
        (lambda: decode_eptp(1 << 64), f"raw={1 << 64!r}"),
        (lambda: decode_eptp(True), "raw=True"),
        (lambda: decode_ept_entry(0x1007, 1, maxphyaddr=99), "maxphyaddr=99"),
        (lambda: decode_ept_entry(7 | 1 << 50, 1, maxphyaddr=0), "maxphyaddr=0"),
        (lambda: decode_ept_entry(0x1007, 1, maxphyaddr=-1), "maxphyaddr=-1"),
        (lambda: decode_ept_entry(0x1007, 1, maxphyaddr=31), "maxphyaddr=31"),
        (lambda: decode_ept_entry(0x1007, 1, maxphyaddr=53), "maxphyaddr=53"),
        (lambda: decode_ept_entry(0x1007, 1, maxphyaddr=46.0), "maxphyaddr=46.0"),
        (lambda: decode_ept_entry(-1, 1), "raw=-1"),
        (lambda: decode_ept_entry(1 << 64, 1), f"raw={1 << 64!r}"),
        (lambda: decode_ept_entry(1.5, 1), "raw=1.5"),
        (lambda: decode_ept_entry(0x1007, True), "level=True"),
        (lambda: decode_sppt_entry(-1, 1), "raw=-1"),
        (lambda: decode_sppt_entry(1 << 64, 2), f"raw={1 << 64!r}"),
        (lambda: decode_sppt_entry(0x7001, 2, maxphyaddr=99), "maxphyaddr=99"),
        (lambda: decode_sppt_entry(0x7001, 2, maxphyaddr=-1), "maxphyaddr=-1"),
        (lambda: decode_sppt_entry(0, True), "SPPT level True"),
    ],
)
def test_decoders_check_raw_and_maxphyaddr(call, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        call()


def test_decoders_good_input():
    assert decode_eptp(0x10001E, 52).pml4 == 0x100000
    assert decode_ept_entry(0x1007, 1, maxphyaddr=32).address == 0x1000
    assert decode_sppt_entry((1 << 64) - 1, 1).reserved
    with pytest.raises(ValueError, match="maxphyaddr=53"):
        decode_eptp(0x10001E, 53)


# ===================================================================== 11. bools are not numbers
def test_map_memory_type_true_is_not_wc():
    mem = HostMemory()
    ept = EptBuilder(mem)
    with pytest.raises(ValueError, match="memory_type=True"):
        ept.map(0x2000, 0x1000, 0x1000, memory_type=True)
    assert ept.leaf(0x2000) is None


@pytest.mark.parametrize("vector", [True, False], ids=repr)
def test_set_vector_refuses_non_int(rig, vector):
    before = rig.snap()
    with pytest.raises(ValueError, match=re.escape(f"vector={vector!r}")):
        rig.sppt.set_vector(0x5000, vector)
    assert rig.snap() == before


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(set_bits=True), "set_bits"),
        (dict(clear_bits=True), "clear_bits"),
        (dict(clear_bits=-1), "clear_bits"),
        (dict(set_bits=1 << 64), "set_bits"),
        (dict(set_bits=1.0), "set_bits"),
        (dict(set_bits=np.uint64(EPT_SPP)), "set_bits"),
    ],
)
def test_update_leaf_bits_checked(rig, kw, name):
    before = rig.snap()
    with pytest.raises(ValueError, match=re.escape(f"{name}={kw[name]!r}")):
        rig.ept.update_leaf(0x2000, **kw)
    assert rig.snap() == before


@pytest.mark.parametrize("access_map", [True, False, 1.5, np.uint32(1), "1"], ids=repr)
def test_vector_from_map_refuses_non_int(access_map):
    with pytest.raises(ValueError, match=re.escape(f"access map {access_map!r}")):
        vector_from_map(access_map)


@pytest.mark.parametrize("vector", [True, -1, 1 << 64, 1.0], ids=repr)
def test_map_from_vector_refuses_non_u64(vector):
    with pytest.raises(ValueError, match=re.escape(f"vector={vector!r}")):
        map_from_vector(vector)


@pytest.mark.parametrize("level", [True, 2.0, Level.PTE, 5])
def test_merge_level(rig, level):
    before = rig.snap()
    with pytest.raises(ValueError, match=re.escape(f"level={level!r}")):
        rig.ept.merge(0, level)
    assert rig.snap() == before


# ===================================================================== 12. translate
@pytest.mark.parametrize("gla", [1 << 64, 1 << 100])
def test_translate_gla_beyond_64_bits(rig, gla):
    with pytest.raises(ValueError, match=re.escape(f"gla={gla!r}")):
        rig.cpu.translate(0, 8, Access.WRITE, gla=gla)


def test_translate_gla_64_bits_accepted(rig):
    rig.ept.set_writable(0x2000, False)
    with pytest.raises(EptViolation) as ei:
        rig.cpu.translate(0x2000, 8, Access.WRITE, gla=(1 << 64) - 8)
    assert ei.value.gla == (1 << 64) - 8
    with pytest.raises(ValueError, match=re.escape(f"gla={1 << 64!r}")):
        rig.cpu.translate(0x2000, 8, Access.WRITE, gla=1 << 64)


def test_ept_off_error_names_the_gpa_passed():
    cpu = Processor(HostMemory(), 0, secondary_controls=0)
    gpa = (1 << 46) - 4
    with pytest.raises(ValueError, match=re.escape(f"gpa={gpa:#x} size=8: beyond host MAXPHYADDR")):
        cpu.translate(gpa, 8, Access.READ)
    with pytest.raises(ValueError, match=re.escape(f"gpa={1 << 46:#x} size=4: beyond host MAXPHYADDR")):
        cpu.translate(1 << 46, 4, Access.READ)
    assert cpu.translate(gpa - 4, 8, Access.READ) == ((gpa - 4, 8),)
