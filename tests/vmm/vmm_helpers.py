"""Shared helpers for the sppkit.vmm tests (imported by name: pytest puts tests/vmm on sys.path)."""

from __future__ import annotations

from sppkit import Vm

PAGE = 4096
FULL = 0xFFFFFFFF
M2 = 1 << 21
G1 = 1 << 30
MODES = ("lazy", "eager")


def spp_vm(mode: str = "lazy", *, slots=((1, 0x10000000, 16 * PAGE),), **kw) -> Vm:
    """A VM with ``slots`` ((slot, gpa, size), ...) and SPP enabled in ``mode``."""
    vm = Vm(**kw)
    for slot, gpa, size in slots:
        vm.add_memslot(slot, gpa, size)
    assert vm.enable_spp(mode) == 512
    return vm


def leaf(vm: Vm, gpa: int):
    """(level, raw) of the EPT leaf mapping ``gpa`` (None if unmapped)."""
    lf = vm.ept.builder.leaf(gpa)
    return None if lf is None else (lf[0], lf[2])


def ept_entries(vm: Vm, gpas) -> dict:
    """Raw EPT walk (every level) of each gpa: for byte-identical comparisons."""
    return {g: tuple((lv, h, raw) for lv, h, raw in vm.ept.builder.walk(g)) for g in gpas}


def vm_snapshot(vm: Vm) -> dict:
    """Everything a failed call must leave untouched: every host frame (guest memory, EPT
    and SPPT tables), the table sets, the access maps, the dirty bits and the EPT stats."""
    return {
        "frames": {pfn: bytes(f) for pfn, f in vm.memory._frames.items()},
        "ept_tables": frozenset(vm.ept.builder.tables),
        "sppt_tables": frozenset(vm.sppt.builder.tables) if vm.sppt else None,
        "maps": {m.slot: None if m.maps is None else dict(m.maps) for m in vm.memslots()},
        "dirty": {m.slot: None if m.dirty is None else m.dirty.tobytes() for m in vm.memslots()},
        "slots": [(m.slot, m.gpa, m.size, m.hpa) for m in vm.memslots()],
        "splits_merges": (vm.ept.splits, vm.ept.merges),
    }
