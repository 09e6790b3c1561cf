"""Vm.fast_write_entry / count_fast_writes / translation_epoch: what an engine's own
write cache (the Unicorn engine's native hook) may decide, and when it must forget."""

from __future__ import annotations

import pytest

from sppkit import Vm
from vmm_helpers import FULL, MODES, PAGE, spp_vm

BASE = 0x10000000
GFN = BASE >> 12


@pytest.mark.parametrize("mode", MODES)
def test_entry_is_the_sppt_vector_as_a_map(mode):
    vm = spp_vm(mode)
    vm.set_subpage_access(GFN, [0x0000FFFF, FULL])
    if mode == "lazy":
        assert vm.fast_write_entry(BASE) is None  # the SPPT path is not built yet: write() takes the miss
        assert vm.write(BASE, b"x").committed
    assert vm.fast_write_entry(BASE + 0x123) == (0x0000FFFF, True)
    assert vm.fast_write_entry(BASE + PAGE) == (FULL, False)  # unprotected page


def test_entry_agrees_with_write_for_every_subpage():
    vm = spp_vm("eager")
    amap = 0xA5A5_0F0F
    vm.set_subpage_access(GFN, [amap])
    allowed, protected = vm.fast_write_entry(BASE)
    assert protected
    for i in range(32):
        assert vm.write(BASE + 128 * i, b"z").committed == bool((allowed >> i) & 1)


@pytest.mark.parametrize("why, make", [
    ("no translation cache", lambda: spp_vm("eager", cache=False)),
    ("EPT A/D flags", lambda: spp_vm("eager", ept_ad=True)),
    ("first-byte SPP check", lambda: spp_vm("eager", spp_write_check="first-byte")),
])
def test_no_entry_when_every_write_needs_the_model(why, make):
    vm = make()
    vm.set_subpage_access(GFN, [0xFFFF])
    assert vm.fast_write_entry(BASE) is None, why


def test_no_entry_for_logged_readonly_observed_or_unmapped_pages():
    vm = Vm()
    vm.add_memslot(1, BASE, 4 * PAGE, dirty_log=True)
    vm.add_memslot(2, BASE + 0x100000, PAGE, readonly=True)
    vm.add_memslot(3, BASE + 0x200000, PAGE)
    vm.enable_spp("eager")
    assert vm.fast_write_entry(BASE) is None  # dirty logging: the first write must be seen
    assert vm.fast_write_entry(BASE + 0x100000) is None  # read-only slot
    assert vm.fast_write_entry(0x1000) is None  # outside every slot
    assert vm.fast_write_entry(BASE + 0x200000) == (FULL, False)
    vm.on_write(lambda gpa, n, rip: None)
    assert vm.fast_write_entry(BASE + 0x200000) is None  # an observer must see every write


def test_epoch_moves_with_every_invalidation():
    vm = spp_vm("eager")
    seen = {vm.translation_epoch}

    def moved() -> bool:
        e = vm.translation_epoch
        new = e not in seen
        seen.add(e)
        return new

    vm.set_subpage_access(GFN, [0xFFFF])
    assert moved()  # EPT split + SPPT write + INVEPT
    vm.set_subpage_access(GFN, [0xFF])
    assert moved()  # SPPT change alone: INVEPT
    vm.processor.invept("all-context")
    assert moved()  # anyone's INVEPT
    vm.on_write(lambda *a: None)
    assert moved()
    vm.on_write(None)
    assert moved()
    assert vm.write(BASE, b"a").committed and vm.write(BASE + 0x800, b"b").committed is False
    assert not moved()  # writes (allowed or denied SKIP) change no translation


def test_count_fast_writes_is_what_write_counts():
    a, b = spp_vm("eager"), spp_vm("eager")
    for vm in (a, b):
        vm.set_subpage_access(GFN, [0xFFFF])
    for _ in range(5):
        a.write(BASE, b"q")
        a.write(BASE + PAGE, b"q")
    b.count_fast_writes(GFN, 5, True)
    b.count_fast_writes(GFN + 1, 5, False)
    assert a.stats() == b.stats()
