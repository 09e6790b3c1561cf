"""Dirty logging: the bitmap, cleared by get_dirty_log and re-armed; and its coexistence
with SPP (the KVM series' "SPP saved" bit: a logged write still gets the right sub-page
decision, and the page is marked dirty even when SPP then denies the write)."""

from __future__ import annotations

import pytest

from sppkit import Decision, MemslotError, Vm
from sppkit.arch import EPT_SPP, Level
from sppkit.vmm.ept_manager import EPT_SPP_SAVED

from vmm_helpers import FULL, M2, MODES, PAGE, leaf

BASE = 0x20000000
GFN = BASE >> 12


def bitmap(npages: int, dirty) -> bytes:
    out = bytearray((npages + 7) // 8)
    for i in dirty:
        out[i // 8] |= 1 << (i % 8)
    return bytes(out)


def test_bitmap_bits_cleared_by_the_call_and_rearmed():
    vm = Vm()
    vm.add_memslot(0, BASE, 20 * PAGE, dirty_log=True)
    assert vm.get_dirty_log(0) == bytes(3)
    for i in (0, 3, 9, 19):
        assert vm.write(BASE + i * PAGE + 100, b"d").committed
    assert vm.write(BASE + 3 * PAGE, b"again").committed  # same page twice: one bit
    assert vm.get_dirty_log(0) == bitmap(20, [0, 3, 9, 19]) == bytes([0b1001, 0b10, 0b1000])
    assert vm.get_dirty_log(0) == bytes(3), "the call must clear the bitmap"
    # re-armed: the reported pages are write-protected again, and a new write is logged
    lv, raw = leaf(vm, BASE + 3 * PAGE)
    assert lv == Level.PTE and not raw & 2
    assert vm.write(BASE + 3 * PAGE + 1, b"x").committed
    assert vm.get_dirty_log(0) == bitmap(20, [3])
    assert vm.read(BASE + 3 * PAGE, 5) == b"axain"
    st = vm.stats()
    assert st["dirty_log_faults"] == 5


def test_unwritten_pages_stay_clean_and_load_is_not_logged():
    vm = Vm()
    vm.add_memslot(0, BASE, 16 * PAGE, dirty_log=True)
    vm.load(BASE + 5 * PAGE, b"image")  # the VMM's own write: not a guest write
    vm.read(BASE, 16 * PAGE)
    assert vm.get_dirty_log(0) == bytes(2)
    assert vm.write(BASE + 2 * PAGE - 1, b"xy").committed  # page-crossing: both pages dirty
    assert vm.get_dirty_log(0) == bitmap(16, [1, 2])


def test_dirty_log_slot_uses_4k_leaves_and_no_log_slot_refuses():
    vm = Vm()
    vm.add_memslot(0, M2, M2, dirty_log=True)
    vm.add_memslot(1, 2 * M2, M2)
    assert leaf(vm, M2)[0] == Level.PTE and not leaf(vm, M2)[1] & 2
    assert leaf(vm, 2 * M2)[0] == Level.PDE
    with pytest.raises(MemslotError, match="slot 1") as ei:
        vm.get_dirty_log(1)
    assert "dirty_log" in str(ei.value)


def test_dirty_bits_move_with_the_slot():
    vm = Vm()
    vm.add_memslot(0, BASE, 4 * PAGE, dirty_log=True)
    vm.write(BASE + 2 * PAGE, b"x")
    vm.move_memslot(0, BASE + 64 * PAGE)
    assert vm.write(BASE + 64 * PAGE + 2 * PAGE + 1, b"y").committed  # already dirty: W = 1
    assert vm.stats()["dirty_log_faults"] == 1
    assert vm.get_dirty_log(0) == bitmap(4, [2])


# ---------------------------------------------------------------- with SPP
@pytest.mark.parametrize("mode", MODES)
def test_logged_write_gets_the_right_subpage_decision(mode):
    vm = Vm()
    vm.add_memslot(0, BASE, 8 * PAGE, dirty_log=True)
    vm.enable_spp(mode)
    vm.set_subpage_access(GFN + 1, [0x0000FFFF])  # sub-pages 0..15 writable
    # clean + protected: W = 0, bit 61 parked in the saved bit
    lv, raw = leaf(vm, BASE + PAGE)
    assert lv == Level.PTE and not raw & 2 and not raw & EPT_SPP and raw & EPT_SPP_SAVED

    r = vm.write(BASE + PAGE + 0x10, b"ok")  # allowed sub-page
    assert r.committed and vm.read(BASE + PAGE + 0x10, 2) == b"ok"
    assert vm.get_dirty_log(0) == bitmap(8, [1])
    # the log call re-armed it; a write to a protected sub-page is a violation...
    before = vm.read(BASE + PAGE, PAGE)
    r = vm.write(BASE + PAGE + 0x800, b"no")
    assert not r.committed and r.event.denied == (16,)
    assert vm.read(BASE + PAGE, PAGE) == before
    # ...and the page is marked dirty all the same (as in KVM: the write-protection fault
    # restores bit 61 and logs the page before the retried write meets SPP)
    assert vm.get_dirty_log(0) == bitmap(8, [1])
    # bit 61 restored after the fault, W still 0
    r = vm.write(BASE + PAGE + 0x20, b"ok")
    lv, raw = leaf(vm, BASE + PAGE)
    assert raw & EPT_SPP and not raw & 2 and not raw & EPT_SPP_SAVED
    assert vm.write(BASE + PAGE + 0x801, b"no").committed is False
    # unprotected pages of the slot: ordinary dirty logging
    assert vm.write(BASE + 5 * PAGE, b"z").committed
    assert vm.get_dirty_log(0) == bitmap(8, [1, 5])
    assert vm.get_subpage_access(GFN + 1, 1) == [0x0000FFFF]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("decision", [Decision.SKIP, Decision.EMULATE, Decision.UNPROTECT, Decision.STOP])
def test_denied_write_on_a_clean_page_marks_it_dirty(mode, decision):
    vm = Vm()
    vm.add_memslot(0, BASE, 4 * PAGE, dirty_log=True)
    vm.enable_spp(mode)
    vm.set_subpage_access(GFN + 2, [0])
    vm.on_violation(lambda ev: decision)
    r = vm.write(BASE + 2 * PAGE + 0x100, b"w")
    assert len(r.events) == 1
    lands = decision in (Decision.EMULATE, Decision.UNPROTECT)
    assert r.committed == lands
    assert vm.read(BASE + 2 * PAGE + 0x100, 1) == (b"w" if lands else b"\x00")
    assert vm.get_dirty_log(0) == bitmap(4, [2])
    assert vm.get_subpage_access(GFN + 2, 1) == [1 << 2 if decision is Decision.UNPROTECT else 0]


def test_protect_after_dirtying_and_disable_spp_keeps_logging():
    vm = Vm()
    vm.add_memslot(0, BASE, 4 * PAGE, dirty_log=True)
    vm.write(BASE, b"a")  # page 0 dirty, W = 1
    vm.enable_spp("eager")
    vm.set_subpage_access(GFN, [0b10])
    lv, raw = leaf(vm, BASE)
    assert raw & EPT_SPP and not raw & 2  # dirty page: bit 61 live
    assert not vm.write(BASE, b"b").committed
    assert vm.write(BASE + 0x80, b"c").committed
    vm.disable_spp()
    lv, raw = leaf(vm, BASE)
    assert raw & 2 and not raw & EPT_SPP and not raw & EPT_SPP_SAVED  # dirty, unprotected
    assert vm.get_dirty_log(0) == bitmap(4, [0])
    lv, raw = leaf(vm, BASE)
    assert not raw & 2 and not raw & EPT_SPP_SAVED  # re-armed, nothing parked
    assert vm.write(BASE, b"d").committed
    assert vm.get_dirty_log(0) == bitmap(4, [0])
    with pytest.raises(Exception, match="not enabled"):
        vm.get_subpage_access(GFN, 1)


def test_dirty_log_and_protection_in_a_2m_slot_never_merge():
    vm = Vm()
    vm.add_memslot(0, M2, M2, dirty_log=True)
    vm.enable_spp("lazy")
    vm.set_subpage_access((M2 >> 12) + 1, [0])
    vm.set_subpage_access((M2 >> 12) + 1, [FULL])
    assert leaf(vm, M2)[0] == Level.PTE  # dirty logging needs 4-KiB leaves
    assert vm.ept.merges == 0
