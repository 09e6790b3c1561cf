"""The use cases' Python API with bad arguments, in the wrong order, and with callbacks
that raise or answer nonsense: WatchManager, Device/DeviceBus, the checkpoint API
(tracked_regions, DirtyTracker, encode_checkpoint, RestoredState, apply_state,
restore_checkpoint, checkpoint_guest, Checkpointer) and the guard API
(read_guard_table, guard_numbers, GuardSession, guard_guest).

The rules checked, case by case:

* a bad argument is an exception naming the value and what would be valid, raised
  before anything changes (the Vm's maps, memory, violation handler, the manager's
  counters, files on disk);
* a callback that raises is re-raised, a callback that answers something that is no
  decision is a TypeError naming it, and either way no counter moved and the write
  never reached guest memory;
* the run functions check their arguments before a guest is built or an engine made
  (the cases use a guest that does not exist: the argument's error must come first).

Everything runs on a bare Vm or, for apply_state/Checkpointer, on a Unicorn engine
with a flat image (no gcc).  The CLI side is tests/usecases/test_usecase_cli_sweep.py.
"""

from __future__ import annotations

import re
import struct
from types import SimpleNamespace

import pytest

from sppkit.arch.sppt import FULL_ACCESS_MAP
from sppkit.guests import flat_image
from sppkit.guests.elf import Symbol
from sppkit.usecases import checkpoint as C
from sppkit.usecases import guard as G
from sppkit.usecases.device import Device, DeviceBus, DeviceError, Register, run_device
from sppkit.usecases.monitor import MonitorError, WatchError, WatchManager, run_monitor
from sppkit.vmm import Decision, Vm

P = 0x10000  # a page of the bare Vm (conftest: 4 MiB of RAM at 0, SPP on)
DEV = 0x20000
NO_GUEST = "no_such_guest"  # the run functions must name the bad argument before they look for it


def amap(vm, gpa=P):
    return vm.get_subpage_access(gpa >> 12, 1)[0]


def case(case_id, *values):
    return pytest.param(*values, id=case_id)


# ====================================================================== WatchManager
@pytest.mark.parametrize("kw, exc, match", [
    case("armed-not-bool", dict(armed="no"), WatchError, r"armed='no': must be True or False"),
    case("armed-int", dict(armed=0), WatchError, r"armed=0: must be True or False"),
    case("page_granular-not-bool", dict(page_granular="no"), WatchError, r"page_granular='no': must be True or False"),
])
def test_manager_flags_must_be_bools(vm, kw, exc, match):
    with pytest.raises(exc, match=match):
        WatchManager(vm, **kw)
    assert vm._handler is None  # no handler installed


def test_manager_needs_a_vm():
    with pytest.raises(TypeError, match="WatchManager needs a sppkit.Vm, got None"):
        WatchManager(None)


@pytest.mark.parametrize("call, match", [
    case("watch-name-int", lambda wm: wm.watch(P, 8, name=123), r"watch name 123: must be a non-empty string"),
    case("watch-name-empty", lambda wm: wm.watch(P, 8, name=""), r"watch name '': must be a non-empty string"),
    case("watch-name-zero", lambda wm: wm.watch(P, 8, name=0), r"watch name 0: must be a non-empty string"),
    case("refcount-str", lambda wm: wm.refcount("x"), r"refcount gpa='x': must be a non-negative integer"),
    case("refcount-negative", lambda wm: wm.refcount(-1), r"refcount gpa=-1: must be a non-negative integer"),
    case("refcount-bool", lambda wm: wm.refcount(True), r"refcount gpa=True: must be a non-negative integer"),
    case("access_map-negative", lambda wm: wm.access_map(-1), r"access_map gfn=-1: must be a non-negative"),
    case("access_map-str", lambda wm: wm.access_map("x"), r"access_map gfn='x': must be a non-negative"),
])
def test_manager_bad_arguments_change_nothing(vm, call, match):
    wm = WatchManager(vm)
    wm.watch(P + 0x200, 8, name="other")
    before = (wm.stats(), wm._next, amap(vm))
    with pytest.raises(WatchError, match=match):
        call(wm)
    assert (wm.stats(), wm._next, amap(vm)) == before


@pytest.mark.parametrize("answer", [case("none", None), case("word", "allow"), case("int", 1)])
@pytest.mark.parametrize("where", [
    case("foreign-page", 0x30000),  # a page the manager does not watch: the chain alone decides
    case("watched-bytes", P),
    case("beside-watched-bytes", P + 0x10),  # a sub-page the manager protects, no watched byte
])
def test_chain_must_return_a_decision(vm, answer, where):
    vm.set_subpage_access(0x30, [0])  # someone else's protection
    wm = WatchManager(vm, chain=lambda ev: answer)
    wm.watch(P, 8, lambda ev: "allow", name="w")
    before = (wm.stats(), vm.read(where, 1))
    with pytest.raises(TypeError, match=rf"chained violation handler .* returned {answer!r}; it must return a "
                                        r"sppkit.Decision"):
        vm.write(where, b"\x55")
    assert (wm.stats(), vm.read(where, 1)) == before


def _raise(ev):
    raise RuntimeError("callback failed")


@pytest.mark.parametrize("second, chain, exc, match", [
    case("callback-raises", _raise, None, RuntimeError, "callback failed"),
    case("callback-answers-7", lambda ev: 7, None, TypeError, r"callback of 'b' returned 7"),
    case("chain-raises", lambda ev: "allow", _raise, RuntimeError, "callback failed"),
])
def test_a_violation_that_raises_changes_no_counter(vm, second, chain, exc, match):
    wm = WatchManager(vm, chain=chain)
    a = wm.watch(P, 8, lambda ev: "deny", name="a")  # decided first, then b fails
    b = wm.watch(P + 4, 8, second, name="b")
    before = (wm.stats(), a.hits, dict(a.decisions), b.hits, dict(b.decisions), vm.read(P, 16))
    with pytest.raises(exc, match=match):
        vm.write(P, b"12345678")
    assert (wm.stats(), a.hits, dict(a.decisions), b.hits, dict(b.decisions), vm.read(P, 16)) == before


def test_close_leaves_a_later_handler_in_place(vm):
    inner = WatchManager(vm)
    outer = WatchManager(vm, chain=inner._on_violation)  # installed after inner, chaining to it
    seen = []
    outer.watch(P, 8, lambda ev: seen.append(ev.gpa) or "deny", name="outer")
    inner.close()
    assert vm._handler == outer._on_violation
    assert not vm.write(P, b"\1").committed and seen == [P] and outer.notified == 1


@pytest.mark.parametrize("call", [
    case("watch", lambda wm: wm.watch(P, 8, name="late")),
    case("arm", lambda wm: wm.arm()),
])
def test_a_closed_manager_takes_no_watch(vm, call):
    wm = WatchManager(vm)
    wm.close()
    with pytest.raises(WatchError, match="this WatchManager is closed"):
        call(wm)
    assert amap(vm) == FULL_ACCESS_MAP and vm._handler is None
    wm.close()  # closing again does nothing


def _delete_slot(vm):
    vm.delete_memslot(1)


@pytest.mark.parametrize("op", ["watch", "unwatch", "arm", "disarm", "close"])
@pytest.mark.parametrize("break_it, match", [
    case("spp-disabled", lambda vm: vm.disable_spp(), "SPP is not enabled on this Vm any more"),
    case("memslot-deleted", _delete_slot, r"page 0x800000: .*its memslot was deleted or moved"),
])
def test_a_manager_whose_vm_changed_under_it_changes_nothing(vm, op, break_it, match):
    vm.add_memslot(1, 8 << 20, 1 << 20)
    wm = WatchManager(vm, armed=op != "arm")
    first = wm.watch(P, 8, name="first")  # close() would remove this one before reaching w
    w = wm.watch(8 << 20, 8, name="w")
    break_it(vm)
    calls = {"watch": lambda: wm.watch(8 << 20, 16, name="late"), "unwatch": lambda: wm.unwatch(w),
             "arm": wm.arm, "disarm": wm.disarm, "close": wm.close}
    before = (wm.stats(), w.active, first.active, wm.watches, wm.refcount(8 << 20), vm._handler)
    if op == "watch" and "memslot" in match:
        match = "lies outside guest RAM"  # (the range check names it first)
    with pytest.raises(WatchError, match=match):
        calls[op]()
    assert (wm.stats(), w.active, first.active, wm.watches, wm.refcount(8 << 20), vm._handler) == before


def test_watches_are_pushed_again_after_spp_is_enabled_again(vm):
    wm = WatchManager(vm)
    wm.watch(P, 8, name="a")
    vm.disable_spp()
    vm.enable_spp()  # every page writable again
    b = wm.watch(P + 8, 8, name="b")  # the same sub-page: the manager's map did not change, the Vm's did
    assert amap(vm) == FULL_ACCESS_MAP & ~1
    assert not vm.write(P + 8, b"\1").committed and b.hits == 1


def test_the_chain_cannot_unprotect_a_watched_page(vm):
    foreign = FULL_ACCESS_MAP & ~(1 << 5)
    vm.set_subpage_access(P >> 12, [foreign])
    wm = WatchManager(vm, chain=lambda ev: Decision.UNPROTECT)
    w = wm.watch(P, 8, name="w")
    wm.disarm()
    assert amap(vm) == foreign
    r = vm.write(P + 5 * 128, b"\1")  # the chain's sub-page: committed once, its protection kept
    assert r.committed and r.decision is Decision.EMULATE and amap(vm) == foreign
    wm.arm()
    wm.unwatch(w)
    assert amap(vm) == foreign


#: engine, timeout and cpl of run_monitor / run_device: checked before the guest is looked for
#: (cpl was int()-converted: 3.7 ran at CPL 3, "x" failed with int()'s words)
RUN_ARGS = [
    case("cpl-float", dict(cpl=3.7), r"cpl=3\.7: must be 0 or 3"),
    case("cpl-str", dict(cpl="x"), r"cpl='x': must be 0 or 3"),
    case("cpl-bool", dict(cpl=True), r"cpl=True: must be 0 or 3"),
    case("cpl-1", dict(cpl=1), r"cpl=1: must be 0 or 3"),
    case("engine-bogus", dict(engine="bogus"), r"engine 'bogus': must be kvm, unicorn or auto"),
    case("timeout-negative", dict(timeout=-1), r"timeout -1: must be a finite number of seconds"),
    case("timeout-inf", dict(timeout=float("inf")), r"timeout inf: must be a finite number"),
]


@pytest.fixture
def no_engine(monkeypatch):
    """The run functions' argument errors come before any engine is chosen."""
    import sppkit.engines as engines

    monkeypatch.setattr(engines, "choose_engine", lambda name: pytest.fail("an engine was chosen"))


#: the flags and sizes run_monitor and run_device check alike (check_run_args)
RUN_FLAGS = [
        case("page_granular-not-bool", dict(page_granular="no"), r"page_granular='no': must be True or False"),
        case("memory-text", dict(memory="64M"), r"memory: RAM size '64M': must be an integer"),
        case("memory-zero", dict(memory=0), r"memory: RAM size 0x0: must be a multiple of 2 MiB"),
]


@pytest.mark.usefixtures("no_engine")
class TestRunMonitorArgumentsFirst:
    @pytest.mark.parametrize("kw, match", RUN_FLAGS + [
        case("memory-unaligned", dict(memory=(3 << 20) + 1), r"RAM size 0x300001: must be a multiple of 2 MiB"),
        case("decision-bool", dict(decision=True), r"decision True: must be skip, emulate or stop$"),
        case("decision-word", dict(decision="allow"), r"decision 'allow': must be skip, emulate or stop$"),
    ])
    def test_bad_argument(self, kw, match):
        with pytest.raises(MonitorError, match=match):
            run_monitor(NO_GUEST, engine="unicorn", **kw)

    @pytest.mark.parametrize("kw, match", RUN_ARGS)
    def test_bad_run_argument(self, kw, match):
        with pytest.raises(ValueError, match=match):
            run_monitor(NO_GUEST, **dict(dict(engine="unicorn"), **kw))


# ====================================================================== Device, DeviceBus
def _two_regs(name="d"):
    return Device(name, [Register("a", 0, 4), Register("b", 8, 2)])


class _Named5(Device):
    name = 5  # type: ignore[assignment]
    registers = (Register("a", 0, 4),)


@pytest.mark.parametrize("call, match", [
    case("attach-None", lambda bus, d: bus.attach(None, DEV), r"attach: None is not a Device"),
    case("attach-str", lambda bus, d: bus.attach("dev", DEV), r"attach: 'dev' is not a Device"),
    case("detach-None", lambda bus, d: bus.detach(None), r"None is not a Device"),
    case("name-int", lambda bus, d: Device(5, [Register("a", 0)]), r"device name 5: must be a non-empty string"),
    case("name-empty", lambda bus, d: Device("", [Register("a", 0)]), r"device name '': must be a non-empty"),
    case("class-name-int", lambda bus, d: _Named5(), r"device name 5: must be a non-empty string"),
    case("set_register-float", lambda bus, d: d.set_register("a", 1.5),
         r"register 'a' value 1.5: must be an integer from -2147483648 to 0xffffffff \(4 byte\(s\)\)"),
    case("set_register-too-wide", lambda bus, d: d.set_register("b", 0x10000),
         r"register 'b' value 0x10000: must be an integer from -32768 to 0xffff \(2 byte\(s\)\)"),
    case("set_register-2**64", lambda bus, d: d.set_register("a", 2**64), r"value 0x10000000000000000"),
    case("set_register-bool", lambda bus, d: d.set_register("a", True), r"register 'a' value True"),
    case("set_register-None", lambda bus, d: d.set_register("a", None), r"register 'a' value None"),
    case("read-before-page", lambda bus, d: d.read(-8, 16), r"read \[-0x8, 0x8\) lies outside its page"),
    case("read-past-page", lambda bus, d: d.read(4090, 16), r"read \[0xffa, 0x100a\) lies outside its page"),
    case("read-negative-length", lambda bus, d: d.read(0, -1), r"device 'd': read length -1: must be 0 or more"),
    case("read-float-offset", lambda bus, d: d.read(1.0, 4), r"device 'd': read offset 1\.0: must be an integer"),
    case("load-past-page", lambda bus, d: d.load(4090, b"A" * 16), r"load \[0xffa, 0x100a\) lies outside"),
    case("load-before-page", lambda bus, d: d.load(-16, b"B" * 16), r"load \[-0x10, 0x0\) lies outside"),
    case("load-str", lambda bus, d: d.load(0, "text"), r"load data 'text': must be bytes-like"),
    case("register_at-str", lambda bus, d: d.register_at("x"), r"register_at offset 'x': must be an integer"),
    case("bus-manager-and-page_granular", lambda bus, d: DeviceBus(bus.vm, manager=bus.wm, page_granular=True),
         r"give chain and page_granular to the WatchManager passed as manager="),
    case("bus-manager-and-chain", lambda bus, d: DeviceBus(bus.vm, manager=bus.wm, chain=lambda ev: Decision.SKIP),
         r"give chain and page_granular to the WatchManager"),
    case("bus-manager-of-another-vm", lambda bus, d: DeviceBus(_new_vm(), manager=bus.wm),
         r"that WatchManager watches another Vm"),
    case("bus-manager-str", lambda bus, d: DeviceBus(bus.vm, manager="x"), r"manager='x': must be a WatchManager"),
    case("bus-page_granular-str", lambda bus, d: DeviceBus(bus.vm, page_granular="no"),
         r"page_granular='no': must be True or False"),
    case("exits_by_subpage-other-bus", lambda bus, d: DeviceBus(_new_vm()).exits_by_subpage(d),
         r"device 'd' is not attached to this bus"),
    case("page_writes-other-bus", lambda bus, d: DeviceBus(_new_vm()).page_writes(d),
         r"device 'd' is not attached to this bus"),
])
def test_device_bad_arguments_change_nothing(vm, call, match):
    bus = DeviceBus(vm)
    vm.load(DEV - 0x1000, b"\x11" * 0x3000)  # the device's page and both neighbours
    d = bus.attach(_two_regs(), DEV)
    d.set_register("a", 0x12345678)

    def state():
        return (vm.read(DEV - 0x1000, 0x3000), amap(vm, DEV), bus.wm.stats(), dict(bus.devices), vm._handler)

    before = state()
    with pytest.raises(DeviceError, match=match):
        call(bus, d)
    assert state() == before


def _new_vm():
    v = Vm()
    v.add_memslot(0, 0, 4 << 20)
    v.enable_spp()
    return v


@pytest.mark.parametrize("answer", [case("zero", 0), case("empty-str", ""), case("empty-list", [])])
def test_device_write_answer_must_be_a_decision(vm, answer):
    class Answers(Device):
        registers = (Register("a", 0, 4),)

        def write(self, offset, size, value):
            return answer

    bus = DeviceBus(vm)
    bus.attach(Answers("d"), DEV)
    before = (vm.read(DEV, 4), dict(bus.decisions))
    with pytest.raises(TypeError, match=rf"d\.write returned {re.escape(repr(answer))}: expected allow/deny/stop"):
        vm.write(DEV, b"\1\2\3\4")
    assert (vm.read(DEV, 4), dict(bus.decisions)) == before


def test_device_write_answer_none_discards(vm):
    class Silent(Device):
        registers = (Register("a", 0, 4),)

        def write(self, offset, size, value):
            return None

    bus = DeviceBus(vm)
    bus.attach(Silent("d"), DEV)
    assert not vm.write(DEV, b"\1\2\3\4").committed and bus.decisions == {"skip": 1}


def test_a_register_handler_that_raises_is_reraised_and_not_counted(vm):
    class Fails(Device):
        registers = (Register("a", 0, 4),)

        def on_a(self, value):
            raise RuntimeError("device model failed")

    bus = DeviceBus(vm)
    dev = bus.attach(Fails("f"), DEV)
    with pytest.raises(RuntimeError, match="device model failed"):
        vm.write(DEV, b"\1\2\3\4")
    assert vm.read(DEV, 4) == bytes(4) and not dev.writes and not bus.decisions
    assert bus.wm.violations == 0 and bus.wm.notified == 0


@pytest.mark.usefixtures("no_engine")
class TestRunDeviceArgumentsFirst:
    @pytest.mark.parametrize("kw, match", RUN_FLAGS + [
        case("page-float", dict(page=1.5), r"--page 1\.5: must be a symbol of the guest .* or an integer"),
        case("page-None", dict(page=None), r"--page None: must be a symbol of the guest"),
    ])
    def test_bad_argument(self, kw, match):
        with pytest.raises(DeviceError, match=match):
            run_device(NO_GUEST, engine="unicorn", **kw)

    @pytest.mark.parametrize("kw, match", RUN_ARGS)
    def test_bad_run_argument(self, kw, match):
        with pytest.raises(ValueError, match=match):
            run_device(NO_GUEST, **dict(dict(engine="unicorn"), **kw))


# ====================================================================== checkpoint: regions and tracking
IMG = flat_image(b"\xf4" * 16, 0x1000)  # one writable page at 0x1000
RAM = 4 << 20


@pytest.mark.parametrize("args, kw, match", [
    case("ram-text", ("64M",), {}, r"RAM size '64M': must be an integer number of bytes"),
    case("ram-bool", (True,), {}, r"RAM size True: must be an integer"),
    case("ram-zero", (0,), {}, r"RAM size 0x0: must be a multiple of 2 MiB"),
    case("ram-unaligned", ((3 << 20) + 1,), {}, r"RAM size 0x300001: must be a multiple of 2 MiB"),
    case("ram-2**70", (2**70,), {}, r"must be a multiple of 2 MiB from 2 MiB to 512 GiB"),
    case("extra-triple", (RAM, [(0x1000, 0x10, 3)]), {}, r"--track \(4096, 16, 3\): must be a \(start, length\) pair"),
    case("extra-int", (RAM, [5]), {}, r"--track 5: must be a \(start, length\) pair"),
    case("extra-text", (RAM, "0x1000:16"), {}, r"--track '0x1000:16': give \(start, length\) pairs"),
    case("extra-None", (RAM, None), {}, r"--track None: must be a list of \(start, length\) pairs"),
    case("extra-past-2**64", (RAM, [(2**64 - 1, 2)]), {}, r"--track 0xffffffffffffffff:0x2 ends beyond guest RAM"),
    case("table_range-short", (RAM, [(0x1000, 16)]), dict(table_range=(5,)),
         r"table_range \(5,\): must be a \(start, end\) pair"),
])
def test_tracked_regions_bad_arguments(args, kw, match):
    with pytest.raises(ValueError, match=match):
        C.tracked_regions(IMG, *args, **kw)


def _maps(vm):
    """Every page's map (4 MiB: two calls of at most 512 pages)."""
    return vm.get_subpage_access(0, 0x200) + vm.get_subpage_access(0x200, 0x200)


@pytest.mark.parametrize("regions, kw, exc, match", [
    case("region-past-RAM", [C.Region("a", 0x1000, 0x1000), C.Region("b", RAM - 0x1000, 0x2000)], {},
         ValueError, r"region 'b' \[0x3ff000, 0x401000\) lies outside guest RAM: no memslot covers gpa 0x400000"),
    case("region-unaligned", [C.Region("u", 0x1010, 0x100)], {}, ValueError,
         r"region 'u' gpa=4112 size=256: must be whole 4-KiB pages"),
    case("region-not-a-Region", [(0x1000, 0x1000)], {}, ValueError, r"must be a Region\(name, gpa, size\)"),
    case("regions-None", None, {}, ValueError, r"regions None: must be a list of Region"),
    case("on_dirty-not-callable", [C.Region("a", 0x1000, 0x1000)], dict(on_dirty="x"), TypeError,
         r"on_dirty='x': must be a callable"),
])
def test_dirty_tracker_bad_arguments(vm, regions, kw, exc, match):
    before = _maps(vm)
    with pytest.raises(exc, match=match):
        C.DirtyTracker(vm, regions, **kw).arm()
    assert _maps(vm) == before  # nothing half-armed


def test_dirty_tracker_refuses_a_read_only_region(vm):
    vm.add_memslot(1, 8 << 20, 1 << 20, readonly=True)
    with pytest.raises(ValueError, match=r"region 'rom' \[0x800000, .*\) is in read-only memslot 1 at gpa 0x800000"):
        C.DirtyTracker(vm, [C.Region("rom", 8 << 20, 0x1000)])


@pytest.mark.parametrize("gfns, match", [
    case("untracked-page", [0x50], r"gfn 80: not a page this tracker tracks \(\[0x1, 0x2\)\)"),
    case("tracked-and-untracked", [1, 0x50], r"gfn 80: not a page this tracker tracks"),
    case("str", ["x"], r"gfn 'x': not a page this tracker tracks"),
    case("not-iterable", 5, r"gfns 5: must be page frame numbers of tracked pages"),
])
def test_dirty_tracker_arms_tracked_pages_only(vm, gfns, match):
    tr = C.DirtyTracker(vm, [C.Region("a", 0x1000, 0x1000)])
    before = _maps(vm)
    with pytest.raises(ValueError, match=match):
        tr.arm(gfns)
    assert _maps(vm) == before


def test_dirty_tracker_leaves_other_protection_alone(vm):
    tr = C.DirtyTracker(vm, [C.Region("a", 0x1000, 0x1000)])
    tr.arm()
    vm.on_violation(tr.handle)
    vm.set_subpage_access(0x80, [FULL_ACCESS_MAP & ~1])  # someone else's protected sub-page
    r = vm.write(0x80000, b"\1")
    assert not r.committed and r.decision is Decision.SKIP and vm.read(0x80000, 1) == b"\0"
    assert amap(vm, 0x80000) == FULL_ACCESS_MAP & ~1 and tr.dirty == {} and tr.violations == 0
    assert vm.write(0x1000, b"\1").committed and tr.dirty == {1: 1}  # a tracked page: recorded, unprotected


def test_dirty_tracker_callback_that_raises_changes_nothing(vm):
    def on_dirty(n):
        raise RuntimeError("on_dirty failed")

    tr = C.DirtyTracker(vm, [C.Region("a", 0x1000, 0x1000)], on_dirty=on_dirty)
    tr.arm()
    vm.on_violation(tr.handle)
    with pytest.raises(RuntimeError, match="on_dirty failed"):
        vm.write(0x1000, b"\1")
    assert tr.dirty == {} and tr.violations == tr.total_violations == 0
    assert vm.read(0x1000, 1) == b"\0" and amap(vm, 0x1000) == 0


# ====================================================================== checkpoint: the file format
SID = b"\x11" * 16
GOOD = dict(index=0, kind=C.KIND_BASE, set_id=SID, memory=[(0x1000, b"\0" * 128)], regs={"rip": 0x1000})


@pytest.mark.parametrize("change, match", [
    case("index-negative", dict(index=-1), r"checkpoint index -1: must be an integer from 0 to 4294967294"),
    case("index-2**32", dict(index=2**32, kind=1), r"checkpoint index 4294967296: must be an integer from 0"),
    case("index-bool", dict(index=True, kind=1), r"checkpoint index True: must be an integer"),
    case("kind-7", dict(kind=7), r"checkpoint kind 7: must be 0 \(base\) or 1 \(incremental\)"),
    case("base-index-3", dict(index=3), r"checkpoint index 3: the base checkpoint \(kind 0\) is index 0"),
    case("incremental-index-0", dict(kind=1), r"checkpoint index 0: the base checkpoint \(kind 0\) is index 0, an "
                                              r"incremental one \(kind 1\) index 1 or more"),
    case("set_id-short", dict(set_id=b"abc"), r"checkpoint set_id b'abc': must be 16 bytes, not 3"),
    case("set_id-str", dict(set_id="x" * 16), r"checkpoint set_id 'xxxxxxxxxxxxxxxx': must be bytes"),
    case("memory-unaligned-gpa", dict(memory=[(0x1001, b"\0" * 128)]),
         r"checkpoint memory\[0\] gpa 4097: must be a non-negative multiple of 128"),
    case("memory-100-bytes", dict(memory=[(0x1000, b"\0" * 100)]),
         r"checkpoint memory\[0\] data of 100 bytes at 4096: must be whole 128-byte sub-pages"),
    case("memory-empty-data", dict(memory=[(0x1000, b"")]), r"memory\[0\] data of 0 bytes at 4096: must be whole"),
    case("memory-gpa-2**64", dict(memory=[(2**64, b"\0" * 128)]), r"ending at or below 2\*\*64"),
    case("memory-data-str", dict(memory=[(0x1000, "x" * 128)]), r"checkpoint memory\[0\] data 'x+\.\.\.: must be "
                                                                 r"bytes"),
    case("memory-record-not-a-pair", dict(memory=[0x1000]), r"checkpoint memory\[0\] 4096: must be a \(gpa, bytes\)"),
    case("memory-str", dict(memory="abc"), r"checkpoint memory 'abc': must be a list of \(gpa, bytes\) records"),
    case("regs-None", dict(regs=None), r"checkpoint regs None: must be a dict"),
    case("reg-float", dict(regs={"rip": 1.5}), r"checkpoint register rip 1\.5: must be an integer from 0 to 2\*\*64"),
    case("reg-2**64", dict(regs={"rip": 2**64}), r"checkpoint register rip 18446744073709551616: must be an integer"),
    case("reg-negative", dict(regs={"rip": -1}), r"checkpoint register rip -1: must be an integer from 0"),
    case("reg-name-long", dict(regs={"rip": 1, "verylongname": 2}),
         r"checkpoint register name 'verylongname': must be 1 to 8 ASCII characters"),
    case("console-str", dict(console="hi"), r"checkpoint console 'hi': must be bytes"),
    case("meta-list", dict(meta=[1]), r"checkpoint meta \[1\]: must be a dict \(a JSON object\) or None"),
    case("meta-not-json", dict(meta={"a": {1}}), r"checkpoint meta .*: must be JSON-serialisable"),
    case("version-negative", dict(version=-1), r"checkpoint version -1: must be an integer from 0 to 65535"),
])
def test_encode_checkpoint_refuses_what_it_cannot_write(tmp_path, change, match):
    fields = dict(GOOD, **change)
    with pytest.raises(C.CheckpointError, match=match):
        C.encode_checkpoint(**fields)
    with pytest.raises(C.CheckpointError, match=match):
        C.write_checkpoint_file(tmp_path / "c.spck", **fields)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change, read_error", [
    case("unknown-register", dict(regs={"rip": 1, "foo": 2}), "unknown register"),
    case("no-rip", dict(regs={"rax": 1}), "lacks rip"),
    case("version-2", dict(version=2), "format version 2"),
])
def test_encode_checkpoint_still_writes_what_the_reader_refuses(change, read_error):
    # tests craft such files to check the reader (test_checkpoint.py): the encoder keeps writing them
    data = C.encode_checkpoint(**dict(GOOD, **change))
    with pytest.raises(C.CheckpointFileError, match=read_error):
        C.read_checkpoint_file("x.spck", data)


# ====================================================================== checkpoint: restoring
def _state(regions, **kw):
    memory = {r.gpa: bytearray(b"\x5a" * r.size) for r in regions}
    fields = dict(index=0, regions=regions, memory=memory, regs={"rip": 0x1000}, console=b"",
                  recorded_sha256=None)
    fields.update(kw)
    return C.RestoredState(**fields)


@pytest.mark.parametrize("gpa, n", [case("negative-n", 0x1010, -5), case("str-gpa", "x", 4),
                                    case("bool-gpa", True, 1), case("float-n", 0x1000, 1.0)])
def test_restored_state_read_bad_arguments(gpa, n):
    st = _state([C.Region("a", 0x1000, 0x1000)])
    with pytest.raises(ValueError, match=r"must be a non-negative integer"):
        st.read(gpa, n)


@pytest.fixture
def engine():
    from sppkit.engines.unicorn import UnicornEngine

    eng = UnicornEngine(IMG, ram_size=2 << 20)
    yield eng
    eng.close()


A = C.Region("a", 0x10000, 0x1000)


@pytest.mark.parametrize("make, exc, match", [
    case("region-beyond-RAM", lambda: _state([A, C.Region("b", 2 << 20, 0x1000)]), ValueError,
         r"region b ends at 0x201000, beyond this engine's RAM \(0x200000\)"),
    case("unknown-register", lambda: _state([A], regs={"rip": 0x1000, "foo": 1}), ValueError,
         r"register 'foo': must be one of rax, .*rflags"),
    case("register-2**64", lambda: _state([A], regs={"rip": 2**64}), ValueError,
         r"register rip 18446744073709551616: must be an integer from 0 to 2\*\*64 - 1"),
    case("memory-too-long", lambda: _state([A], memory={A.gpa: bytearray(0x1001)}), ValueError,
         r"region a \[0x10000, 0x11000\): the state holds 0x1001 bytes for it, not 0x1000"),
    case("memory-missing", lambda: _state([A], memory={}), ValueError,
         r"region a \[0x10000, 0x11000\): the state holds no bytes for it"),
    case("not-a-state", lambda: None, TypeError, r"apply_state: None is not a RestoredState"),
])
def test_apply_state_checks_everything_before_loading(engine, make, exc, match):
    engine.vm.load(A.gpa, b"\xee" * A.size)
    before = (engine.vm.read(A.gpa, A.size), engine.regs(), bytes(engine.console))
    with pytest.raises(exc, match=match):
        C.apply_state(engine, make())
    assert (engine.vm.read(A.gpa, A.size), engine.regs(), bytes(engine.console)) == before


def test_apply_state_loads_a_good_state(engine):
    C.apply_state(engine, _state([A], regs={"rip": 0x1000, "rax": 7}, console=b"so far\n"))
    assert engine.vm.read(A.gpa, 4) == b"\x5a" * 4 and engine.regs()["rax"] == 7 and engine.console == b"so far\n"


@pytest.mark.parametrize("kw, match", [
    case("resume-str", dict(resume="no"), r"resume='no': must be True or False"),
    case("engine-bogus", dict(engine="bogus"), r"engine 'bogus': must be kvm, unicorn or auto"),
    case("timeout-negative", dict(timeout=-1), r"timeout -1: must be a finite number of seconds"),
    case("timeout-nan", dict(timeout=float("nan")), r"timeout nan: must be a finite number"),
])
def test_restore_checkpoint_checks_its_arguments_first(tmp_path, kw, match):
    # the directory does not exist: the argument's error comes first
    with pytest.raises(ValueError, match=match):
        C.restore_checkpoint(tmp_path / "none", **kw)


# ====================================================================== checkpoint: taking checkpoints
@pytest.mark.parametrize("kw, exc, match", [
    case("at_port_signal-str", dict(at_port_signal="no"), ValueError, r"at_port_signal='no': must be True or False"),
    case("on_checkpoint-str", dict(on_checkpoint="x"), TypeError, r"on_checkpoint='x': must be a callable"),
    case("ram_size-text", dict(ram_size="64M"), ValueError, r"RAM size '64M': must be an integer"),
    case("ram_size-3M", dict(ram_size=3 << 20), ValueError, r"RAM size 0x300000: must be a multiple of 2 MiB"),
    case("cpl-1", dict(cpl=1), ValueError, r"cpl=1: must be 0 or 3"),
    case("cpl-str", dict(cpl="3"), ValueError, r"cpl='3': must be 0 or 3"),
    case("timeout-negative", dict(timeout=-1), ValueError, r"timeout -1: must be a finite number"),
    case("engine-bogus", dict(engine="bogus"), ValueError, r"engine 'bogus': must be kvm, unicorn or auto"),
    case("track-int", dict(track=[5]), ValueError, r"--track 5: must be a \(start, length\) pair"),
    case("track-past-RAM", dict(track=[(64 << 20, 4096)]), ValueError, r"--track 0x4000000:0x1000 ends beyond"),
])
def test_checkpoint_guest_checks_its_arguments_first(tmp_path, kw, exc, match):
    args = dict(at_port_signal=True, engine="unicorn")
    args.update(kw)
    with pytest.raises(exc, match=match):
        C.checkpoint_guest(NO_GUEST, tmp_path / "set", **args)
    assert list(tmp_path.iterdir()) == []


def test_checkpointer_refuses_a_callback_that_is_not_callable(engine, tmp_path):
    with pytest.raises(TypeError, match=r"on_checkpoint='x': must be a callable"):
        C.Checkpointer(engine, tmp_path / "set", guest_name="flat", elf_bytes=b"", port=C.CHECKPOINT_PORT,
                       on_checkpoint="x")
    assert list(tmp_path.iterdir()) == []


# ====================================================================== guard
def _table(entries, *, cap=8, arena=0x10000, asize=0x10000, used=0x1000):
    hdr = struct.pack("<QIIIIQQQ", G.TABLE_MAGIC, 1, cap, len(entries), 128, arena, asize, used)
    return hdr + b"".join(struct.pack("<QQQII", *e) for e in entries)


class _Image:
    where = "fake.elf"
    symbols = {"guard_table": Symbol("guard_table", 0x1000, 48 + 8 * 32, "object", "global")}


def _reader(data):
    return lambda gpa, n: (data[gpa - 0x1000:] + bytes(n))[:n]


GOOD_TABLE = _table([(0x10080 - 8, 8, 0x10080, 256, 1)])


@pytest.mark.parametrize("read, ram, exc, match", [
    # entry 1's guard (0x10080) lies inside entry 0's buffer area [0x10000, 0x10100)
    case("overlapping-slots", _reader(_table([(0x10100 - 200, 200, 0x10100, 384, 1),
                                              (0x10080 - 8, 8, 0x10080, 256, 1)])), 64 << 20,
         G.GuardTableError, r"entry 1: slot \[0x10000, 0x10100\) overlaps entry 0's slot \[0x10000, 0x10180\)"),
    case("ram-text", _reader(GOOD_TABLE), "64M", G.GuardError, r"--memory: RAM size '64M': must be an integer"),
    case("ram-unaligned", _reader(GOOD_TABLE), 3 << 20, G.GuardError, r"RAM size 0x300000: must be a multiple"),
    case("read-short", lambda gpa, n: b"\0" * 4, 64 << 20, TypeError, r"read\(0x1000, 48\) returned .*: it must "
                                                                      r"return 48 bytes"),
    case("read-str", lambda gpa, n: "x" * n, 64 << 20, TypeError, r"read\(0x1000, 48\) returned 'x+"),
    case("read-not-callable", None, 64 << 20, TypeError, r"read=None: must be a callable"),
])
def test_read_guard_table_bad_input(read, ram, exc, match):
    with pytest.raises(exc, match=match):
        G.read_guard_table(read, _Image(), ram)


def test_read_guard_table_adjacent_slots_are_fine():
    t = G.read_guard_table(_reader(_table([(0x10080 - 8, 8, 0x10080, 256, 1), (0x10180 - 8, 8, 0x10180, 256, 1)])),
                           _Image(), 64 << 20)
    assert t.guards == [0x10080, 0x10180]


@pytest.mark.parametrize("sizes, kw, match", [
    case("negative-size", [-128], {}, r"sizes\[0\] -128: a buffer size must be a positive integer"),
    case("zero-size", [64, 0], {}, r"sizes\[1\] 0: a buffer size must be a positive integer"),
    case("float-size", [1.5], {}, r"sizes\[0\] 1\.5"),
    case("bool-size", [True], {}, r"sizes\[0\] True"),
    case("None", None, {}, r"sizes None: must be a list of buffer sizes"),
    case("str", "abc", {}, r"sizes 'abc': must be a list of buffer sizes"),
    case("arena_used-negative", [8], dict(arena_used=-1), r"arena_used -1: must be a non-negative integer"),
    case("arena_used-str", [8], dict(arena_used="x"), r"arena_used 'x': must be a non-negative integer"),
])
def test_guard_numbers_bad_input(sizes, kw, match):
    with pytest.raises(G.GuardError, match=match):
        G.guard_numbers(sizes, **kw)


def test_guard_numbers_takes_any_iterable():
    assert G.guard_numbers(s for s in (8, 200)) == G.guard_numbers([8, 200])


@pytest.mark.parametrize("kw, exc, match", [
    case("port-bool", dict(port=True), G.GuardError, r"port True: must be an integer from 0x0 to 0xffff"),
    case("port-str", dict(port="0xf6"), G.GuardError, r"port '0xf6': must be an integer"),
    case("port-console", dict(port=0xE9), G.GuardError, r"port 0xe9: .*not 0xe9/0xf4"),
    case("port-negative", dict(port=-1), G.GuardError, r"port -0x1: must be an integer from 0x0 to 0xffff"),
    case("port-17-bits", dict(port=0x10000), G.GuardError, r"port 0x10000: must be"),
    case("decision-bogus", dict(decision="bogus"), G.GuardError, r"--decision 'bogus': a guard takes stop or skip$"),
    case("decision-unprotect", dict(decision=Decision.UNPROTECT), G.GuardError,
         r"--decision 'unprotect': a guard takes stop or skip$"),
    case("ram-text", dict(ram_size="64M"), G.GuardError, r"--memory: RAM size '64M'"),
    case("cpl-1", dict(cpl=1), ValueError, r"cpl=1: must be 0 or 3"),
    case("timeout-negative", dict(timeout=-1), ValueError, r"timeout -1: must be a finite number"),
    case("engine-bogus", dict(engine="bogus"), ValueError, r"engine 'bogus': must be kvm, unicorn or auto"),
])
def test_guard_guest_checks_its_arguments_first(kw, exc, match):
    args = dict(engine="unicorn")
    args.update(kw)
    with pytest.raises(exc, match=match):
        G.guard_guest(NO_GUEST, **args)


@pytest.mark.parametrize("kw, match", [
    case("port-bool", dict(port=True), r"port True: must be an integer"),
    case("decision-bogus", dict(decision="bogus"), r"--decision 'bogus': a guard takes stop or skip"),
])
def test_guard_session_checks_its_arguments_first(kw, match):
    dummy = SimpleNamespace()  # no engine is touched before the arguments are checked
    with pytest.raises(G.GuardError, match=match):
        G.GuardSession(dummy, **kw)
