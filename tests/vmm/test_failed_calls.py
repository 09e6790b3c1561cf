"""A Vm call that fails names the bad value and changes nothing: no statistics, no
observer or handler call, no dirty bit, no access map, no memslot, no host frame."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from sppkit import Decision, GpaNotMapped, MemslotError, Vm

from vmm_helpers import FULL, PAGE, spp_vm, vm_snapshot

BASE = 0x100000


def _watched(vm: Vm) -> list:
    calls: list = []
    vm.on_write(lambda gpa, size, rip: calls.append(("write", gpa, size)))
    vm.on_violation(lambda ev: calls.append(("violation", ev.gfn)) or Decision.UNPROTECT)
    return calls


def test_write_crossing_into_unmapped_memory_changes_nothing():
    """The first page is protected and the handler would unprotect it; the second page
    is in no memslot: the write raises before the handler is asked."""
    vm = Vm()
    vm.add_memslot(0, BASE, 4 * PAGE, dirty_log=True)
    vm.enable_spp()
    vm.set_subpage_access((BASE >> 12) + 3, [0])
    vm.get_dirty_log(0)
    calls = _watched(vm)
    before, stats = vm_snapshot(vm), vm.stats()
    with pytest.raises(GpaNotMapped, match=f"{BASE + 4 * PAGE:#x}"):
        vm.write(BASE + 4 * PAGE - 2, b"abcd")
    assert calls == [] and vm.stats() == stats and vm_snapshot(vm) == before
    assert vm.get_subpage_access((BASE >> 12) + 3, 1) == [0]
    assert vm.get_dirty_log(0) == b"\0"


def test_write_to_unmapped_memory_is_not_counted_or_observed():
    vm = spp_vm()
    calls = _watched(vm)
    stats = vm.stats()
    with pytest.raises(GpaNotMapped):
        vm.write(0x900000, b"a")
    assert calls == [] and vm.stats() == stats


@pytest.mark.parametrize("data", ["abc", [1, 2, 300], 5, None], ids=["str", "list", "int", "None"])
def test_write_data_must_be_bytes_like(data):
    vm = spp_vm()
    calls = _watched(vm)
    stats = vm.stats()
    with pytest.raises(TypeError, match=r"data=.*must be bytes, bytearray or memoryview"):
        vm.write(0x10000000, data)
    assert calls == [] and vm.stats() == stats


def test_write_accepts_bytearray_and_memoryview_of_any_format():
    vm = spp_vm()
    assert vm.write(0x10000000, bytearray(b"ab")).committed
    assert vm.write(0x10000010, memoryview(np.array([0x0807060504030201], np.uint64))).committed
    assert vm.read(0x10000000, 2) == b"ab" and vm.read(0x10000010, 8) == bytes(range(1, 9))


@pytest.mark.parametrize("data", [5, "abc", None, [1, 2]], ids=["int", "str", "None", "list"])
def test_load_data_must_be_bytes_like(data):
    vm = spp_vm()
    vm.load(0x10000000, b"\xff" * 8)
    with pytest.raises(TypeError, match="data="):
        vm.load(0x10000000, data)
    assert vm.read(0x10000000, 8) == b"\xff" * 8


@pytest.mark.parametrize("call", [
    lambda vm: vm.read(True, 4), lambda vm: vm.read(0x10000000, True), lambda vm: vm.load(True, b"x"),
    lambda vm: vm.get_subpage_access(0x10000, True), lambda vm: vm.set_spp_vector(True, 0),
    lambda vm: vm.stats(top="x"), lambda vm: vm.stats(top=-1),
], ids=["read-gpa", "read-n", "load-gpa", "get-npages", "vector-gpa", "top-str", "top-negative"])
def test_bools_and_non_integers_are_refused(call):
    vm = spp_vm()
    with pytest.raises(ValueError, match="must be a non-negative integer"):
        call(vm)


@pytest.mark.parametrize("maps", [None, {0: 1}, {1, 2}, "ab", b"\0", 7],
                         ids=["None", "dict", "set", "str", "bytes", "int"])
def test_access_maps_must_be_a_sequence(maps):
    vm = spp_vm()
    before = vm_snapshot(vm)
    with pytest.raises(TypeError, match="access_maps=.*must be a sequence"):
        vm.set_subpage_access(0x10000, maps)
    assert vm_snapshot(vm) == before and vm.get_subpage_access(0x10000, 2) == [FULL, FULL]


@pytest.mark.parametrize("flags", [0.0, False, 1])
def test_flags_must_be_the_integer_zero(flags):
    with pytest.raises(ValueError, match="flags="):
        spp_vm().set_subpage_access(0x10000, [0], flags)


@pytest.mark.parametrize("slot", [1.0, True, [], "1", None])
def test_memslot_ids_are_checked_on_every_call(slot):
    vm = Vm()
    vm.add_memslot(0, BASE, 4 * PAGE)
    vm.add_memslot(1, 0x200000, PAGE, dirty_log=True)
    before = vm_snapshot(vm)
    for call in (vm.delete_memslot, vm.get_dirty_log, lambda s: vm.move_memslot(s, 0x300000)):
        with pytest.raises(MemslotError, match="must be an integer from 0 to 65535"):
            call(slot)
    assert vm_snapshot(vm) == before


@pytest.mark.parametrize("kw", [{"readonly": "no"}, {"dirty_log": 1}, {"backing": 5}])
def test_add_memslot_flags_and_backing_are_checked(kw):
    vm = Vm()
    before = vm_snapshot(vm)
    with pytest.raises(MemslotError, match=f"{next(iter(kw))}="):
        vm.add_memslot(0, BASE, PAGE, **kw)
    assert vm_snapshot(vm) == before and vm.memslots() == []


def test_add_memslot_that_runs_out_of_host_memory_is_undone():
    """A 32-bit host: the second 1-GiB slot's frames fit, its EPT tables do not."""
    vm = Vm(maxphyaddr=32)
    vm.add_memslot(0, 0, 1 << 30)
    before = vm_snapshot(vm)
    with pytest.raises(MemoryError):
        vm.add_memslot(1, 1 << 30, 1 << 30, dirty_log=True)
    assert [m.slot for m in vm.memslots()] == [0] and vm.ept.builder.leaf(1 << 30) is None
    assert vm_snapshot(vm)["slots"] == before["slots"]
    with pytest.raises(GpaNotMapped):
        vm.write((1 << 30) + 0x10, b"x")
    vm.write(0x10, b"x")  # the VM still works


def test_add_memslot_backing_is_used():
    vm = Vm()
    buf = mmap.mmap(-1, PAGE)
    vm.add_memslot(0, BASE, PAGE, backing=buf)
    vm.write(BASE + 8, b"hi")
    assert buf[8:10] == b"hi"


@pytest.mark.parametrize("kw", [{"cache": "no"}, {"ept_ad": 1}, {"cache_spp": "yes"}])
def test_vm_flags_are_checked(kw):
    with pytest.raises(ValueError, match=f"{next(iter(kw))}="):
        Vm(**kw)


def test_read_over_several_memslots_is_limited_like_one_host_read(monkeypatch):
    """Vm.read assembles a range over several memslots itself: the host's read limit
    applies to the whole range, not only to each slot's piece (3 slots of 512 MiB
    used to return 1.5 GiB past MAX_READ)."""
    import sppkit.arch.memory as memory

    vm = Vm()
    for i in range(3):
        vm.add_memslot(i, gpa=i * 2 * PAGE, size=2 * PAGE)
    monkeypatch.setattr(memory, "MAX_READ", 3 * PAGE)
    vm.load(PAGE, b"\x5a" * PAGE)
    assert vm.read(PAGE, 3 * PAGE) == b"\x5a" * PAGE + bytes(2 * PAGE)  # across two slots, at the limit
    with pytest.raises(ValueError, match=r"more than MAX_READ"):
        vm.read(0, 3 * PAGE + 1)


def test_violation_handler_is_what_on_violation_registered():
    vm = Vm()
    assert vm.violation_handler is None

    def handler(ev):
        return Decision.SKIP

    vm.on_violation(handler)
    assert vm.violation_handler is handler
    with pytest.raises(TypeError, match="needs a callable"):
        vm.on_violation("skip")
    assert vm.violation_handler is handler, "a refused handler changes nothing"
    vm.on_violation(None)
    assert vm.violation_handler is None


def test_a_raising_handler_propagates_nothing_lands_and_the_violation_stays_counted():
    """The documented rule for a handler that raises: the exception reaches the caller,
    no byte of the write lands, and the write and its violation stay counted."""
    vm = Vm()
    vm.add_memslot(0, 0, 2 << 20)
    vm.enable_spp()
    vm.set_subpage_access(0x10, [0])

    def boom(ev):
        raise RuntimeError("handler failed")

    vm.on_violation(boom)
    with pytest.raises(RuntimeError, match="handler failed"):
        vm.write(0x10000, b"xyz")
    assert vm.read(0x10000, 3) == bytes(3)
    st = vm.stats()
    assert (st["writes"], st["violations"]) == (1, 1)


def _exhaust(vm: Vm) -> None:
    """Reserve every free host-physical frame: the next table a change needs fails."""
    size = 1 << (vm.memory.maxphyaddr - 1)
    while size >= PAGE:
        try:
            vm.memory.alloc_range(size)
        except MemoryError:
            size >>= 1


@pytest.mark.parametrize("mode", ["lazy", "eager"])
@pytest.mark.parametrize("slot_size", [4 << 20, 1 << 30], ids=["2MiB-leaves", "1GiB-leaf"])
def test_protection_that_runs_out_of_host_frames_changes_nothing(mode, slot_size):
    """Protecting a page needs frames (a huge EPT leaf split to 4 KiB; an eager SPPT
    path).  When host-physical space is exhausted the call raises MemoryError and
    changes nothing: the map, the EPT leaf, the tables and the frames are as before,
    and a write to the page is still allowed (the map was once stored first, so the
    page was 'protected' with a writable huge leaf: writes committed unseen)."""
    vm = Vm(maxphyaddr=32)
    vm.enable_spp(mode)
    vm.add_memslot(0, 0, slot_size)
    vm.set_subpage_access(0x300, [0])  # one protected page: its region split, its SPPT path made
    vm.write(0x300000, b"x")  # (lazy: the SPP miss makes the path)
    _exhaust(vm)
    before, stats = vm_snapshot(vm), vm.stats()
    with pytest.raises(MemoryError, match="host-physical address space exhausted"):
        vm.set_subpage_access(0x10, [0, 0x5555])  # a region not split yet: needs frames
    assert vm_snapshot(vm) == before and vm.stats() == stats
    assert vm.get_subpage_access(0x10, 2) == [FULL, FULL]
    assert vm.write(0x10000, b"x").committed and vm.stats()["violations"] == stats["violations"]
    # a page whose tables exist can still be protected, with no frame to spare
    vm.set_subpage_access(0x301, [0])
    assert not vm.write(0x301000, b"x").committed


def test_move_that_runs_out_of_host_frames_changes_nothing():
    """A memslot moved where its huge leaves no longer fit needs more EPT tables than
    it had: out of frames, it is put back where it was, protections and all."""
    vm = Vm(maxphyaddr=32)
    vm.enable_spp("eager")
    vm.add_memslot(0, 0, 8 << 20)
    vm.set_subpage_access(0x10, [0x0000FFFF])
    _exhaust(vm)
    before = vm_snapshot(vm)
    with pytest.raises(MemoryError, match=r"moving slot 0 .* to 0x1000 may need 12 frames for its tables, 0 are free"):
        vm.move_memslot(0, 0x1000)  # 4-KiB aligned only: every page a 4-KiB leaf
    assert vm_snapshot(vm) == before
    assert vm.write(0x10000, b"y").committed and not vm.write(0x10800, b"x").committed
    assert vm.read(0x10000, 1) == b"y"


def test_small_memslots_do_not_each_take_a_gib_of_host_space():
    """Each memslot used to reserve a 1-GiB-aligned window of host-physical space:
    with maxphyaddr=32 the fourth 4-KiB slot failed with 12 KiB of guest RAM."""
    vm = Vm(maxphyaddr=32)
    for k in range(64):
        vm.add_memslot(k, k << 20, PAGE)
    vm.add_memslot(64, 1 << 30, 1 << 30)  # and a huge one still gets its 1-GiB leaf
    assert vm.ept.builder.leaf(1 << 30)[0].name == "PDPTE"


@pytest.mark.parametrize("mode", ["lazy", "eager"])
@pytest.mark.parametrize("case", ["1GiB-leaves", "dirty-log", "unaligned"])
def test_move_counts_at_least_the_tables_it_makes(mode, case):
    """move_memslot reserves the frames its tables may take before anything changes;
    the count fell short for a protected page under a 1-GiB leaf (two splits) and for a
    dirty-logged slot (4-KiB leaves only), so such a move could run out half-way."""
    vm = Vm()
    vm.enable_spp(mode)
    if case == "1GiB-leaves":
        vm.add_memslot(0, 1 << 30, 2 << 30)
        vm.set_subpage_access((1 << 30 >> 12) + 0x10, [0])
        vm.set_subpage_access((2 << 30 >> 12) + 0x10, [0])
        new = 4 << 30
    elif case == "dirty-log":
        vm.add_memslot(0, 0, 4 << 20, dirty_log=True)
        vm.set_subpage_access(0x10, [0])
        new = 1 << 30
    else:
        vm.add_memslot(0, 0, 8 << 20)
        vm.set_subpage_access(0x10, [0x0000FFFF])
        new = 0x1000
    m = vm.memslots()[0]
    need = vm._tables_for(m, new)

    def tables():
        return len(vm.ept.builder.tables) + len(vm.sppt.builder.tables)

    before = tables()
    vm.move_memslot(0, new)
    assert tables() - before <= need, (tables() - before, need)
