"""The KVM SPP series' selftest (tools/testing/selftests/kvm/x86_64/spp_test.c, v8–v12),
redone against sppkit.Vm — in both SPPT modes, and with the assertions the original
left out (its second phase only printed).

Scenario: memslot 1 of 16 pages at GPA 0x10000000; one page fully protected (map 0);
the guest writes 4 bytes at the start of each of the 32 sub-pages → 32 SPP violations,
each skipped (the original added insn_len to RIP: the "discard" usage) and memory
unchanged; then map 0xFFFFFFFF → 32 writes, no violation, memory changed.
"""

from __future__ import annotations

import pytest

from sppkit import Decision, Vm

from vmm_helpers import FULL, MODES, PAGE

SLOT_GPA = 0x10000000
GFN = SLOT_GPA >> 12
GVA = 0x70000000  # where the selftest mapped the page in the guest


@pytest.mark.parametrize("mode", MODES)
def test_kvm_spp_selftest(mode):
    vm = Vm()
    vm.add_memslot(1, SLOT_GPA, 16 * PAGE)
    assert vm.enable_spp(mode) == 512  # KVM_CHECK_EXTENSION(KVM_CAP_X86_SPP) → 512

    original = bytes((i * 7 + 3) & 0xFF for i in range(PAGE))
    vm.load(SLOT_GPA, original)

    assert vm.set_subpage_access(GFN, [0]) == 0
    assert vm.get_subpage_access(GFN, 1) == [0]

    seen = []

    def handler(ev):
        seen.append(ev)
        return Decision.SKIP  # "rip += insn_len": discard the write

    vm.on_violation(handler)

    # -- phase 1: all 32 sub-pages protected → exactly 32 violations, nothing lands
    for i in range(32):
        gpa = SLOT_GPA + i * 128
        r = vm.write(gpa, b"\xaa\xbb\xcc\xdd", rip=0x401000 + 8 * i, gla=GVA + i * 128)
        assert not r.committed
        assert r.decision is Decision.SKIP
        assert len(r.events) == 1
        ev = r.event
        assert ev.gpa == gpa and ev.gfn == GFN
        assert ev.subpages == (i,) and ev.denied == (i,)
        assert ev.size == 4 and ev.data == b"\xaa\xbb\xcc\xdd"
        assert ev.gla == GVA + i * 128 and ev.rip == 0x401000 + 8 * i
        assert vm.read(gpa, 4) == original[i * 128 : i * 128 + 4]
    assert len(seen) == 32
    assert [ev.subpages[0] for ev in seen] == list(range(32))
    assert vm.read(SLOT_GPA, PAGE) == original, "a denied write changed memory"
    st = vm.stats()
    assert st["violations"] == 32
    assert st["decisions"]["skip"] == 32
    assert st["spp_misses"] == (1 if mode == "lazy" else 0)  # lazy: one miss builds the region

    # -- phase 2: unprotect → 32 writes, 0 violations, memory changed (the original only printed)
    assert vm.set_subpage_access(GFN, [FULL]) == 0
    assert vm.get_subpage_access(GFN, 1) == [FULL]
    for i in range(32):
        gpa = SLOT_GPA + i * 128
        r = vm.write(gpa, bytes([i, 0x11, 0x22, 0x33]), rip=0x402000 + 8 * i, gla=GVA + i * 128)
        assert r.committed and r.events == () and r.decision is None
        assert vm.read(gpa, 4) == bytes([i, 0x11, 0x22, 0x33])
    assert len(seen) == 32, "the handler was called after the page was unprotected"
    assert vm.stats()["violations"] == 32
    expected = bytearray(original)
    for i in range(32):
        expected[i * 128 : i * 128 + 4] = bytes([i, 0x11, 0x22, 0x33])
    assert vm.read(SLOT_GPA, PAGE) == bytes(expected)
    # the other 15 pages of the slot were never touched
    assert vm.read(SLOT_GPA + PAGE, 15 * PAGE) == bytes(15 * PAGE)
