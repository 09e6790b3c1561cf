"""Memslots: add / delete / move, refusals naming the bad value, slot-id reuse, and what
deleting or moving a slot does to contents and access maps."""

from __future__ import annotations

import pytest

from sppkit import Decision, GpaNotMapped, MemslotError, Vm
from sppkit.arch import EPT_SPP, Level
from sppkit.vmm import GfnNotInMemslot

from vmm_helpers import FULL, M2, MODES, PAGE, ept_entries, leaf, spp_vm

BASE = 0x10000000


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "gpa, size, needle",
    [
        (BASE + 0x800, PAGE, "gpa=0x10000800"),  # unaligned start
        (BASE + 1, PAGE, "gpa=0x10000001"),
        (BASE, 0x1800, "size=0x1800"),  # size not a page multiple
        (BASE, 0, "size=0x0"),
        (BASE, -PAGE, "size="),
        (-PAGE, PAGE, "gpa="),
        ((1 << 48) - PAGE, 2 * PAGE, "48-bit"),
    ],
)
def test_add_memslot_refuses_bad_geometry(gpa, size, needle):
    vm = Vm()
    with pytest.raises(MemslotError) as ei:
        vm.add_memslot(0, gpa, size)
    assert needle in str(ei.value)
    assert vm.memslots() == []


@pytest.mark.parametrize("slot", [-1, 1 << 16, "1", 1.0, True])
def test_add_memslot_refuses_bad_slot_id(slot):
    vm = Vm()
    with pytest.raises(MemslotError, match="slot="):
        vm.add_memslot(slot, BASE, PAGE)
    assert vm.memslots() == []


@pytest.mark.parametrize(
    "gpa, size",
    [
        (BASE, 4 * PAGE),  # identical
        (BASE + PAGE, PAGE),  # inside
        (BASE - PAGE, 2 * PAGE),  # overlaps the first page
        (BASE + 3 * PAGE, 4 * PAGE),  # overlaps the last page
        (BASE - PAGE, 6 * PAGE),  # covers it
    ],
)
def test_overlapping_memslot_refused_and_named(gpa, size):
    vm = Vm()
    vm.add_memslot(0, BASE, 4 * PAGE)
    vm.load(BASE, b"keep")
    with pytest.raises(MemslotError) as ei:
        vm.add_memslot(1, gpa, size)
    msg = str(ei.value)
    assert "overlaps" in msg and "slot 0" in msg and f"{gpa:#x}" in msg
    assert [(m.slot, m.gpa, m.size) for m in vm.memslots()] == [(0, BASE, 4 * PAGE)]
    assert vm.read(BASE, 4) == b"keep"


def test_adjacent_memslots_are_fine_and_reads_span_them():
    vm = Vm()
    vm.add_memslot(0, BASE, PAGE)
    vm.add_memslot(1, BASE + PAGE, PAGE)
    vm.add_memslot(2, BASE - PAGE, PAGE)
    assert [m.slot for m in vm.memslots()] == [2, 0, 1]  # address order
    vm.load(BASE - 2, b"abcd")
    assert vm.read(BASE - 2, 4) == b"abcd"
    r = vm.write(BASE + PAGE - 2, b"wxyz")  # page-crossing write from slot 0 into slot 1
    assert r.committed and vm.read(BASE + PAGE - 2, 4) == b"wxyz"


def test_slot_id_in_use_refused():
    vm = Vm()
    vm.add_memslot(3, BASE, PAGE)
    with pytest.raises(MemslotError, match=r"slot 3 is in use"):
        vm.add_memslot(3, BASE + 16 * PAGE, PAGE)
    assert len(vm.memslots()) == 1


@pytest.mark.parametrize("op", ["delete", "move", "dirty"])
def test_unknown_slot_named(op):
    vm = Vm()
    vm.add_memslot(0, BASE, PAGE)
    with pytest.raises(MemslotError, match=r"slot 7 does not exist"):
        if op == "delete":
            vm.delete_memslot(7)
        elif op == "move":
            vm.move_memslot(7, 0)
        else:
            vm.get_dirty_log(7)


def test_move_refusals_leave_the_slot_in_place():
    vm = Vm()
    vm.add_memslot(0, BASE, 2 * PAGE)
    vm.add_memslot(1, BASE + 8 * PAGE, 2 * PAGE)
    vm.load(BASE, b"zero")
    with pytest.raises(MemslotError, match="overlaps slot 1"):
        vm.move_memslot(0, BASE + 7 * PAGE)
    with pytest.raises(MemslotError, match="gpa=0x10000100"):
        vm.move_memslot(0, BASE + 0x100)
    assert [(m.slot, m.gpa) for m in vm.memslots()] == [(0, BASE), (1, BASE + 8 * PAGE)]
    assert vm.read(BASE, 4) == b"zero"
    assert leaf(vm, BASE) is not None and leaf(vm, BASE + 7 * PAGE) is None


# ---------------------------------------------------------------- delete / re-add
def test_delete_unmaps_and_slot_id_can_be_reused():
    vm = Vm()
    vm.add_memslot(5, BASE, 4 * PAGE)
    vm.load(BASE, b"old contents")
    vm.delete_memslot(5)
    assert vm.memslots() == []
    assert leaf(vm, BASE) is None
    with pytest.raises(GpaNotMapped, match="0x10000000"):
        vm.read(BASE, 1)
    with pytest.raises(GpaNotMapped):
        vm.write(BASE, b"x")
    # same id, same place: fresh (zeroed) memory
    vm.add_memslot(5, BASE, 4 * PAGE)
    assert vm.read(BASE, 12) == bytes(12)
    # same id elsewhere
    vm.delete_memslot(5)
    m = vm.add_memslot(5, BASE + M2, PAGE)
    assert m.slot == 5 and m.gpa == BASE + M2
    assert vm.write(BASE + M2, b"new").committed


@pytest.mark.parametrize("mode", MODES)
def test_delete_drops_its_maps_and_nothing_else(mode):
    a, b = BASE, BASE + 16 * PAGE  # same 2-MiB region
    vm = spp_vm(mode, slots=((0, a, 4 * PAGE), (1, b, 4 * PAGE)))
    vm.set_subpage_access(a >> 12, [0, 0x0000FFFF])
    vm.set_subpage_access(b >> 12, [0xFFFF0000, FULL, 0])
    assert not vm.write(a, b"x").committed  # SPPT populated (lazy: after a miss)
    vm.load(b, b"slot one")
    others = [b + i * PAGE for i in range(4)]
    ept_before = ept_entries(vm, others)
    sppt_before = {g: vm.sppt.builder.walk(g) for g in others}
    vm.delete_memslot(0)
    assert ept_entries(vm, others) == ept_before  # the other slot's EPT leaves: byte-identical
    assert {g: vm.sppt.builder.walk(g) for g in others} == sppt_before
    assert vm.read(b, 8) == b"slot one"
    # SPP is still on (the KVM series turned it off for the whole VM when a slot was freed)
    assert vm.spp_enabled
    assert vm.get_subpage_access(b >> 12, 4) == [0xFFFF0000, FULL, 0, FULL]
    with pytest.raises(GfnNotInMemslot, match=f"gfn={a >> 12:#x}"):
        vm.get_subpage_access(a >> 12, 1)
    # slot 1 is still protected exactly as before
    assert not vm.write(b, b"x").committed
    assert vm.write(b + 16 * 128, b"x").committed
    assert not vm.write(b + 2 * PAGE + 5, b"x").committed
    lv, raw = leaf(vm, b + 2 * PAGE)
    assert lv == Level.PTE and raw & EPT_SPP and not raw & 2
    # re-adding slot 0: its old maps are gone, everything writable
    vm.add_memslot(0, a, 4 * PAGE)
    assert vm.get_subpage_access(a >> 12, 2) == [FULL, FULL]
    assert vm.write(a, b"y").committed and vm.write(a + PAGE + 0x800, b"y").committed
    lv, raw = leaf(vm, a)
    assert raw & 2 and not raw & EPT_SPP


# ---------------------------------------------------------------- move
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("delta", [64 * PAGE, PAGE, -2 * PAGE, 3 * M2])
def test_move_keeps_contents_and_maps(mode, delta):
    old = BASE + 8 * PAGE
    new = old + delta
    vm = spp_vm(mode, slots=((2, old, 4 * PAGE), (3, BASE + 1024 * PAGE, PAGE)))
    data = bytes(range(256)) * 64
    vm.load(old, data)  # all four pages
    vm.set_subpage_access((old >> 12) + 1, [0x0000FFFF, 0])
    vm.set_subpage_access(BASE + 1024 * PAGE >> 12, [0])
    assert not vm.write(old + PAGE + 0x800, b"z").committed  # lazy: SPPT built at the old place

    vm.move_memslot(2, new)
    assert vm.read(new, len(data)) == data
    assert vm.get_subpage_access(new >> 12, 4) == [FULL, 0x0000FFFF, 0, FULL]
    assert vm.get_subpage_access(BASE + 1024 * PAGE >> 12, 1) == [0]  # the other slot untouched
    # the protection is enforced at the new place
    assert vm.write(new + PAGE, b"ok").committed
    r = vm.write(new + PAGE + 0x800, b"no")
    assert not r.committed and r.event.gfn == (new >> 12) + 1 and r.event.denied == (16,)
    assert not vm.write(new + 2 * PAGE, b"no").committed
    assert vm.write(new + 3 * PAGE, b"ok").committed
    lv, raw = leaf(vm, new + 2 * PAGE)
    assert lv == Level.PTE and raw & EPT_SPP and not raw & 2
    # the old place is unmapped where the slot no longer is
    for g in range(old, old + 4 * PAGE, PAGE):
        if not new <= g < new + 4 * PAGE:
            assert leaf(vm, g) is None
            with pytest.raises(GpaNotMapped):
                vm.write(g, b"x")


def test_move_2m_slot_to_a_misaligned_place_and_back():
    vm = Vm()
    vm.add_memslot(0, M2, M2)
    assert leaf(vm, M2)[0] == Level.PDE
    vm.load(M2 + 123, b"payload")
    vm.move_memslot(0, 4 * M2 + PAGE)  # no longer 2-MiB aligned: 4-KiB leaves
    assert leaf(vm, 4 * M2 + PAGE)[0] == Level.PTE
    assert vm.read(4 * M2 + PAGE + 123, 7) == b"payload"
    vm.move_memslot(0, 8 * M2)
    assert leaf(vm, 8 * M2)[0] == Level.PDE
    assert vm.read(8 * M2 + 123, 7) == b"payload"
    assert vm.write(8 * M2 + M2 - 1, b"e").committed


def test_move_with_a_handler_decision_after_move():
    vm = spp_vm("lazy", slots=((0, BASE, 2 * PAGE),))
    vm.set_subpage_access(BASE >> 12, [0])
    vm.move_memslot(0, BASE + 100 * PAGE)
    vm.on_violation(lambda ev: Decision.UNPROTECT)
    r = vm.write(BASE + 100 * PAGE + 130, b"ab")
    assert r.committed and r.decision is Decision.UNPROTECT
    assert vm.get_subpage_access((BASE >> 12) + 100, 1) == [1 << 1]


# ---------------------------------------------------------------- many memslots
@pytest.mark.parametrize("mode", MODES)
def test_many_memslots(mode):
    vm = Vm()
    gpas = {}
    for s in range(64):
        gpa = 0x100000000 + s * 3 * M2 + (s % 7) * PAGE  # scattered, some 2-MiB aligned
        vm.add_memslot(s, gpa, (1 + s % 4) * PAGE)
        gpas[s] = gpa
    vm.enable_spp(mode)
    protected = {s: (0xFFFFFFFF ^ (1 << (s % 32))) for s in range(0, 64, 5)}
    for s, amap in protected.items():
        vm.set_subpage_access(gpas[s] >> 12, [amap])
    vm.delete_memslot(10)
    del protected[10]
    vm.move_memslot(20, 0x200000000)
    gpas[20] = 0x200000000
    for s in range(64):
        if s == 10:
            continue
        gpa = gpas[s]
        assert vm.get_subpage_access(gpa >> 12, 1) == [protected.get(s, FULL)]
        bad = (s % 32) * 128
        r = vm.write(gpa + bad, bytes([s]))
        assert r.committed == (s not in protected), s
        assert vm.read(gpa + bad, 1) == (bytes(1) if s in protected else bytes([s]))
        assert vm.write(gpa + (bad + 128) % PAGE, b"\xee").committed
    st = vm.stats()
    assert st["violations"] == len(protected)
    assert st["page_granular"] == 2 * len(protected)
