"""Bad input to the engines' public Python API, on both engines.

Every bad case must end in a clear exception naming the problem before anything
changes, or in correct behaviour — never a crash of the interpreter, a hang, a
swallowed exception or a misleading message.  Covered: constructor arguments,
``add_port_handler`` (ports, handlers, what handlers return or raise),
``record_writes`` observers, violation handlers, ``request_pause`` at odd times, the
run/close life cycle (``run()`` after the exit, after ``close()``, from a callback),
``regs``/``set_regs``, ``instruction_at``, ``parse_size``, ``choose_engine`` and the
result's JSON.

Hand-made flat guests (iced-x86, the helpers of test_differential): no C toolchain
needed.  The KVM half of each test is skipped, with the reason, where KVM is not usable
here; the case that used to crash the interpreter runs in a subprocess."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import iced_x86
import pytest
from iced_x86 import Code, Register
from iced_x86 import Instruction as Ins

from sppkit.engines import EngineError, RunResult, choose_engine, parse_size
from sppkit.engines.unicorn import UnicornEngine
from sppkit.guests import GuestImage, Segment
from sppkit.policy import Policy
from sppkit.vmm import Decision
from engine_helpers import RAM, SUB
from test_differential import CODE, DATA, INIT_DATA, _abs, exit_ins, flat, mov_imm, putc, skip_without_kvm

ENGINES = ["unicorn", "kvm"]
#: "unicorn-py": the Unicorn engine with the ctypes trampoline (native_hook=False),
#: for what goes through the protected-store path
STORE_PATH_ENGINES = ["unicorn", "unicorn-py", "kvm"]
A, B = DATA + 0x200, DATA + 0x210  # two bytes of sub-page 4 of the first data page
INIT_A, INIT_B = 0x4A, 0xBA  # test_differential's initial data there


# ------------------------------------------------------------------- guests and engines
def store(addr: int, value: int) -> list[Ins]:
    """``mov rax, value; mov [addr], al``."""
    return [mov_imm(Register.RAX, value), Ins.create_mem_reg(Code.MOV_RM8_R8, _abs(addr), Register.AL)]


def out80(value: int) -> list[Ins]:
    return [mov_imm(Register.RAX, value), Ins.create_u32_reg(Code.OUT_IMM8_AL, 0x80, Register.AL)]


def guest(*parts: list[Ins]) -> tuple[GuestImage, list[int]]:
    return flat([i for p in parts for i in p])


def with_jmp(before: list[list[Ins]], after: list[list[Ins]]) -> GuestImage:
    """``before``, a `jmp` to the next instruction (ends the translated block), ``after``."""
    b, a = [i for p in before for i in p], [i for p in after for i in p]
    _, ips = flat(b + [Ins.create_branch(Code.JMP_REL32_64, CODE)] + a)
    return flat(b + [Ins.create_branch(Code.JMP_REL32_64, ips[len(b) + 1])] + a)[0]


#: store A (0x22), print "A", out 0x80 (1), store B (0x33), print "B", exit 3
STD_PARTS = (store(A, 0x22), putc("A"), out80(1), store(B, 0x33), putc("B"), exit_ins(3))


def std_guest() -> GuestImage:
    return guest(*STD_PARTS)[0]


def protect_a(decision: str = "emulate") -> Policy:
    return Policy.from_ranges([(A, SUB)], decision)


def spin_guest() -> GuestImage:
    """Print "A", then `jmp $` forever."""
    b = putc("A")
    _, ips = flat(b + [Ins.create_branch(Code.JMP_REL32_64, CODE)])
    return flat(b + [Ins.create_branch(Code.JMP_REL32_64, ips[len(b)])])[0]


def engine_class(engine: str):
    if engine == "kvm":
        skip_without_kvm()
        from sppkit.engines.kvm.engine import KvmEngine

        return KvmEngine, {}
    return UnicornEngine, ({"native_hook": False} if engine == "unicorn-py" else {})


@pytest.fixture
def make():
    """``make(engine, image=None, **kw)``: an engine on ``image`` (the standard guest),
    closed after the test."""
    made = []

    def factory(engine: str, image: GuestImage | None = None, **kw):
        cls, extra = engine_class(engine)
        kw = {"ram_size": RAM, "timeout": 20.0, **extra, **kw}
        eng = cls(std_guest() if image is None else image, **kw)
        made.append(eng)
        return eng

    yield factory
    for eng in made:
        eng.close()


def byte(eng, gpa: int) -> int:
    return eng.vm.read(gpa, 1)[0]


def made_records_are_in_memory(eng) -> bool:
    """Every record of a write the engine says it made (EMULATE/UNPROTECT) has its
    bytes in guest memory: no record of a write that was not made."""
    return all(eng.vm.read(v.gpa, v.size) == bytes.fromhex(v.data)
               for v in eng.records if v.decision in ("emulate", "unprotect"))


class Boom(Exception):
    pass


# ======================================================================= constructor
def _image(**change) -> GuestImage:
    code = std_guest().segments[0]
    kw = {"segments": [code], "entry": CODE, **change}
    return GuestImage(**kw)


CTOR_CASES = [
    # (id, image, kwargs, exception, message)
    ("image-None", None, {}, TypeError, r"image None: must be a sppkit\.guests\.GuestImage"),
    ("image-path-str", "guest.elf", {}, TypeError, r"image 'guest\.elf': must be a sppkit\.guests\.GuestImage"),
    ("image-bytes", b"\x90", {}, TypeError, r"must be a sppkit\.guests\.GuestImage"),
    ("image-no-segments", _image(segments=[]), {}, ValueError, r"the image has no segments"),
    ("image-segment-None", _image(segments=[None]), {}, TypeError, r"segment None: must be a sppkit\.guests\.Segment"),
    ("image-memsz-below-data", _image(segments=[Segment(CODE, b"\x90\x90", 1, "r-x")]), {}, ValueError,
     r"memsz \(1\) an integer at least its length"),
    ("entry-negative", _image(entry=-1), {}, ValueError, r"entry point -1: must be an address from 0 to 2\*\*64-1"),
    ("entry-2**64", _image(entry=1 << 64), {}, ValueError, r"entry point 18446744073709551616: must be an address"),
    ("entry-str", _image(entry="0x400000"), {}, ValueError, r"entry point '0x400000': must be an address"),
    ("policy-str", "std", {"policy": "mixed.toml"}, TypeError, r"policy 'mixed\.toml': must be a sppkit\.policy\.Policy"),
    ("policy-dict", "std", {"policy": {"decision": "skip"}}, TypeError, r"must be a sppkit\.policy\.Policy or None"),
    ("cpl-1", "std", {"cpl": 1}, ValueError, r"cpl=1: must be 0 or 3"),
    ("cpl-False", "std", {"cpl": False}, ValueError, r"cpl=False: must be 0 or 3"),
    ("cpl-3.0", "std", {"cpl": 3.0}, ValueError, r"cpl=3\.0: must be 0 or 3"),
    ("cpl-str", "std", {"cpl": "3"}, ValueError, r"cpl='3': must be 0 or 3"),
    ("spp_mode-bad", "std", {"spp_mode": "eager!"}, ValueError, r"spp_mode='eager!': must be 'lazy' or 'eager'"),
    ("spp_mode-None", "std", {"spp_mode": None}, ValueError, r"spp_mode=None: must be 'lazy' or 'eager'"),
    ("ram_size-str", "std", {"ram_size": "64M"}, ValueError, r"RAM size '64M': must be an integer number of bytes"),
    ("ram_size-odd", "std", {"ram_size": RAM + 4096}, ValueError, r"must be a multiple of 2 MiB"),
    ("ram_size-True", "std", {"ram_size": True}, ValueError, r"RAM size True"),
    ("timeout-nan", "std", {"timeout": math.nan}, ValueError, r"timeout nan: must be a finite number"),
    ("timeout-negative", "std", {"timeout": -1}, ValueError, r"timeout -1: must be a finite number"),
    ("timeout-str", "std", {"timeout": "5"}, ValueError, r"timeout '5'"),
]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("image", "kw", "exc", "match"), [pytest.param(*c[1:], id=c[0]) for c in CTOR_CASES])
def test_constructor_refuses_bad_arguments(engine, image, kw, exc, match):
    """Before: a wrong-typed image or policy was an AttributeError ('NoneType' object has
    no attribute 'segments'); cpl=False/3.0 and entry points of -1 or 2**64 (silently
    wrapped) were accepted, an entry point "0x400000" failed inside Unicorn at run() with
    ctypes' "argument 2: TypeError: wrong type"; an image without segments timed out
    under Unicorn but triple-faulted under KVM."""
    cls, extra = engine_class(engine)
    image = std_guest() if image == "std" else image
    with pytest.raises(exc, match=match):
        cls(image, **{"ram_size": RAM, "timeout": 5.0, **extra, **kw})


@pytest.mark.parametrize(("kw", "exc", "match"), [
    pytest.param({"native_hook": "yes"}, TypeError, r"native_hook='yes': must be None .*True .*or False", id="native_hook-str"),
    pytest.param({"native_hook": 0}, TypeError, r"native_hook=0: must be None", id="native_hook-0"),
    pytest.param({"max_instructions": -1}, ValueError, r"max_instructions=-1: must be an integer from 0", id="max_instructions-negative"),
    pytest.param({"max_instructions": "5"}, ValueError, r"max_instructions='5'", id="max_instructions-str"),
    pytest.param({"max_instructions": 5.0}, ValueError, r"max_instructions=5\.0", id="max_instructions-float"),
    pytest.param({"max_instructions": 1 << 64}, ValueError, r"max_instructions=18446744073709551616", id="max_instructions-2**64"),
    pytest.param({"max_instructions": True}, ValueError, r"max_instructions=True", id="max_instructions-True"),
])
def test_unicorn_arguments(kw, exc, match):
    """Before: native_hook="yes" / 0 were taken as True / None, max_instructions=-1 and
    2**64 were passed on to Unicorn as "no limit" (size_t wrap), "5" failed at run()
    with ctypes' "argument 5: TypeError: wrong type"."""
    with pytest.raises(exc, match=match):
        UnicornEngine(std_guest(), ram_size=RAM, **kw)


@pytest.mark.parametrize("path", [None, 3, ["/dev/kvm"]], ids=["None", "int", "list"])
def test_kvm_path_must_be_a_path(path):
    """Before: KvmEngine(path=None) failed deep in kvm_status with "open: path should be
    string, bytes or os.PathLike, not NoneType" (not naming the argument)."""
    skip_without_kvm()
    from sppkit.engines.kvm.engine import KvmEngine

    with pytest.raises(TypeError, match=r"path .*: must be the path of the KVM device"):
        KvmEngine(std_guest(), ram_size=RAM, path=path)


@pytest.mark.parametrize(("name", "match"), [
    pytest.param(None, r"engine None: must be kvm, unicorn or auto", id="None"),
    pytest.param("KVM", r"engine 'KVM': must be kvm, unicorn or auto", id="upper-case"),
    pytest.param("", r"engine '': must be", id="empty"),
    pytest.param(1, r"engine 1: must be", id="int"),
])
def test_choose_engine_names(name, match):
    with pytest.raises(ValueError, match=match):
        choose_engine(name)


# ======================================================================= port handlers
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("port", "handler", "exc", "match"), [
    pytest.param("0x80", "ok", TypeError, r"port '0x80': must be an integer I/O port", id="port-str"),
    pytest.param(None, "ok", TypeError, r"port None: must be an integer I/O port", id="port-None"),
    pytest.param(True, "ok", TypeError, r"port True: must be an integer I/O port", id="port-True"),
    pytest.param(128.0, "ok", TypeError, r"port 128\.0: must be an integer I/O port", id="port-float"),
    pytest.param(-1, "ok", ValueError, r"port -0x1: must be 0\.\.0xFFFF", id="port-negative"),
    pytest.param(0x10000, "ok", ValueError, r"port 0x10000: must be 0\.\.0xFFFF", id="port-0x10000"),
    pytest.param(0xE9, "ok", ValueError, r"not 0xE9/0xF4", id="port-console"),
    pytest.param(0xF4, "ok", ValueError, r"not 0xE9/0xF4", id="port-exit"),
    pytest.param(0x80, "pause", TypeError, r"port 0x80 handler 'pause': must be a callable", id="handler-str"),
    pytest.param(0x80, 42, TypeError, r"port 0x80 handler 42: must be a callable", id="handler-int"),
])
def test_port_handler_registration_refuses(make, engine, port, handler, exc, match):
    """Before: a port of "0x80" or None raised "'<=' not supported between instances of
    'int' and 'str'", True and 128.0 were registered, and a handler that is not
    callable was accepted and failed mid-run ("'str' object is not callable")."""
    eng = make(engine)
    with pytest.raises(exc, match=match):
        eng.add_port_handler(port, (lambda e, v: None) if handler == "ok" else handler)
    r = eng.run()  # nothing was registered
    assert (r.stop_reason, r.exit_code, r.console) == ("exit", 3, "AB")


@pytest.mark.parametrize("engine", ENGINES)
def test_port_handler_none_removes_it(make, engine):
    eng = make(engine)
    eng.add_port_handler(0x80, lambda e, v: "pause")
    eng.add_port_handler(0x80, None)
    r = eng.run()
    assert (r.stop_reason, r.exit_code) == ("exit", 3)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("ret", "outcome"), [
    pytest.param("pause", "paused", id="pause"),
    pytest.param(None, "exit", id="None"),
    pytest.param(0, "exit", id="0"),  # e.g. `return vm.set_subpage_access(...)`
    pytest.param(False, "exit", id="False"),
    pytest.param("PAUSE", "error", id="str-PAUSE"),
    pytest.param("stop", "error", id="str-stop"),
    pytest.param("", "error", id="str-empty"),
])
def test_port_handler_return_values(make, engine, ret, outcome):
    """Before: a handler returning "PAUSE" or "stop" (meaning to pause) was silently
    ignored and the run went on."""
    eng = make(engine)
    eng.add_port_handler(0x80, lambda e, v: ret)
    if outcome == "error":
        with pytest.raises(ValueError, match=rf"the handler of port 0x80 returned {ret!r}: it must return 'pause'"):
            eng.run()
        return
    r = eng.run()
    assert r.stop_reason == outcome
    if outcome == "paused":
        assert r.console == "A" and byte(eng, B) == INIT_B  # nothing after the out ran
        r = eng.run()
    assert (r.stop_reason, r.exit_code, r.console) == ("exit", 3, "AB")


# ======================================================================= callbacks that raise
def _raise_in(callback: str, eng, calls: list) -> None:
    """Install ``callback`` so that it raises Boom once (its first call), then behaves."""
    def once(what):
        calls.append(what)
        if len(calls) == 1:
            raise Boom(f"{callback} raised")

    if callback == "port-handler":
        eng.add_port_handler(0x80, lambda e, v: once(v))
    elif callback == "violation-handler":
        def handler(ev):
            d = eng.handle_violation(ev)  # queued for a record, then the raise
            once(ev.gpa)
            return d
        eng.vm.on_violation(handler)
    else:
        eng.record_writes(lambda gpa, size, rip: once(gpa))


@pytest.mark.parametrize("engine", STORE_PATH_ENGINES)
@pytest.mark.parametrize("callback", ["port-handler", "violation-handler", "write-observer"])
def test_callback_exception_is_reraised_and_a_later_run_goes_on(make, engine, callback):
    """The exception is re-raised from run(), the write being decided is not made, and
    a later run() finishes the guest.  Before: Unicorn kept the exception and re-raised
    it from every later run() (the guest could never finish); under KVM the violation
    queued by a handler that then raised was recorded, as EMULATE, at the next write,
    although its bytes never landed; under Unicorn a store still in the block after a
    raising port handler was made."""
    eng = make(engine, policy=protect_a("emulate"))
    calls: list = []
    _raise_in(callback, eng, calls)
    with pytest.raises(Boom, match=f"{callback} raised"):
        eng.run()
    assert byte(eng, B) == INIT_B  # nothing ran on to the second store
    if callback != "port-handler":
        assert byte(eng, A) == INIT_A  # the write being decided was not made
    r = eng.run()
    assert (r.stop_reason, r.exit_code, r.console) == ("exit", 3, "AB")
    assert byte(eng, B) == 0x33
    assert made_records_are_in_memory(eng), [(hex(v.gpa), v.decision, v.data) for v in eng.records]


@pytest.mark.parametrize("engine", STORE_PATH_ENGINES)
@pytest.mark.parametrize("ret", [pytest.param("emulate", id="str"), pytest.param(None, id="None"),
                                 pytest.param(1, id="int")])
def test_violation_handler_returning_no_decision(make, engine, ret):
    eng = make(engine, policy=protect_a())
    eng.vm.on_violation(lambda ev: ret)
    with pytest.raises(TypeError, match=rf"the violation handler returned {ret!r}; it must return a sppkit\.Decision"):
        eng.run()
    assert byte(eng, A) == INIT_A and eng.records == []


@pytest.mark.parametrize("engine", STORE_PATH_ENGINES)
def test_stop_from_a_handler_that_records_nothing_stops(make, engine):
    """A violation handler of its own returning STOP (without handle_violation).
    Before: KVM ignored the STOP and ran the guest to its exit."""
    eng = make(engine, policy=protect_a())
    eng.vm.on_violation(lambda ev: Decision.STOP)
    r = eng.run()
    assert r.stop_reason == "stop-decision" and r.console == ""
    assert byte(eng, A) == INIT_A and byte(eng, B) == INIT_B
    assert r.rip_at == guest(*STD_PARTS)[1][1]  # the store


# ======================================================================= record_writes
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("callback", ["x", 42, b"cb"], ids=["str", "int", "bytes"])
def test_record_writes_refuses_a_non_callable(make, engine, callback):
    """Before: Unicorn accepted it and failed at run() ("'str' object is not callable")."""
    eng = make(engine)
    with pytest.raises(TypeError, match=r"record_writes callback .*: must be a callable \(gpa, size, rip\)"):
        eng.record_writes(callback)
    assert eng.run().exit_code == 3


@pytest.mark.parametrize("engine", ENGINES)
def test_record_writes_none_and_replacement(make, engine):
    """None stops recording; a second callback replaces the first.  Before: Unicorn
    registered None as a hook (TypeError at run()) and called every callback ever
    registered."""
    eng = make(engine, policy=protect_a())
    first, second = [], []
    eng.record_writes(None)
    eng.record_writes(lambda *a: first.append(a))
    eng.record_writes(lambda *a: second.append(a))
    assert eng.run().exit_code == 3
    assert first == [] and [g for g, _, _ in second][:2] == [A, B]


@pytest.mark.parametrize("engine", STORE_PATH_ENGINES)
@pytest.mark.parametrize("decision", ["emulate", "skip", "stop"])
def test_observer_raising_leaves_the_write_undecided(make, engine, decision):
    """An observer that raises on a store to a protected page: the store is neither
    decided nor made.  Before: Unicorn went on to hand it to vm.write — the violation
    handler was called and EMULATE committed it — although run() raised."""
    eng = make(engine, policy=protect_a(decision))
    decided = []
    engine_handler = eng.handle_violation
    eng.vm.on_violation(lambda ev: (decided.append(ev.gpa), engine_handler(ev))[1])

    def observer(gpa, size, rip):
        raise Boom(f"observer at {gpa:#x}")

    eng.record_writes(observer)
    with pytest.raises(Boom, match=f"observer at {A:#x}"):
        eng.run()
    assert byte(eng, A) == INIT_A and decided == [] and eng.records == []
    assert eng.vm.stats()["violations"] == 0


# ======================================================================= request_pause
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("when", ["before-run", "after-exit", "after-close"])
def test_request_pause_outside_a_run(make, engine, when):
    """Before: KVM kept the request and paused the next run at its first exit, Unicorn
    dropped it silently."""
    eng = make(engine)
    if when == "after-exit":
        assert eng.run().exit_code == 3
    if when == "after-close":
        eng.close()
    with pytest.raises(EngineError, match=r"this \w+ engine is closed" if when == "after-close"
                       else r"request_pause\(\): no run is in progress"):
        eng.request_pause()
    if when == "before-run":
        r = eng.run()
        assert (r.stop_reason, r.exit_code, r.console) == ("exit", 3, "AB")


def _pause_guest(layout: str):
    if layout == "one-block":
        image, ips = guest(store(A, 0x22), putc("A"), store(B, 0x33), putc("B"), exit_ins(3))
        return image, [ips[2], ips[6]], ["", "A"]
    if layout == "jmp":  # the block ends between the two stores
        image = with_jmp([store(A, 0x22), putc("A")], [store(B, 0x33), putc("B"), exit_ins(3)])
        _, ips = guest(store(A, 0x22), putc("A"), [Ins.create_branch(Code.JMP_REL32_64, CODE)], store(B, 0x33),
                       putc("B"))
        return image, [ips[2], ips[7]], ["", "A"]
    # push to a protected stack sub-page
    image, ips = guest([mov_imm(Register.RAX, 0x77), Ins.create_reg(Code.PUSH_R64, Register.RAX)], putc("A"),
                       exit_ins(3))
    return image, [ips[2]], [""]


@pytest.mark.parametrize("engine", STORE_PATH_ENGINES)
@pytest.mark.parametrize("layout", ["one-block", "jmp", "push"])
@pytest.mark.parametrize("who", ["violation-handler", "write-observer"])
def test_pause_from_a_write_callback_lands_after_the_store(make, engine, layout, who):
    """The violation handler (or a write observer) calls request_pause() at each store
    to a protected page: the run pauses right after the storing instruction, on both
    engines, each store decided once.  Before: Unicorn's pause waited for the next
    execution of the next instruction, which in straight-line code never came: the
    guest ran to its exit and no pause happened."""
    image, pause_ips, consoles = _pause_guest(layout)
    policy = Policy.from_ranges([(RAM - SUB, SUB)] if layout == "push" else [(A, SUB)], "emulate")
    eng = make(engine, image, policy=policy)
    if who == "write-observer":
        eng.record_writes(lambda gpa, size, rip: eng.request_pause())
    else:
        engine_handler = eng.handle_violation

        def handler(ev):
            eng.request_pause()
            return engine_handler(ev)

        eng.vm.on_violation(handler)
    seen = []
    for _ in range(len(pause_ips)):
        r = eng.run()
        seen.append((r.stop_reason, r.console, r.rip_at if r.rip_at is not None else r.rip_after))
    assert seen == [("paused", c, ip) for c, ip in zip(consoles, pause_ips)]
    r = eng.run()
    assert (r.stop_reason, r.exit_code) == ("exit", 3)
    assert eng.vm.stats()["writes"] == len(pause_ips)  # each store handed to vm.write once
    assert made_records_are_in_memory(eng) and len(eng.records) == len(pause_ips)


@pytest.mark.parametrize("engine", STORE_PATH_ENGINES)
@pytest.mark.parametrize("who", ["violation-handler", "write-observer"])
def test_pause_at_a_read_modify_write_store_keeps_its_flags(make, engine, who):
    """`add byte [A], 0xB6` on A = 0x4A (the sum wraps to 0: ZF = 1), a pause asked for
    at its store, then `setz al` as the exit code.  The store is made once and the
    instruction's flags are those of the sum of the old value.  Before: Unicorn ran the
    instruction again to pause right after it, and the second run read the byte the
    first had already made (0 + 0xB6: ZF = 0)."""
    image, ips = guest([Ins.create_mem_i32(Code.ADD_RM8_IMM8, _abs(A), 0xB6),
                        Ins.create_reg(Code.SETE_RM8, Register.AL),
                        Ins.create_reg_reg(Code.MOVZX_R32_RM8, Register.EAX, Register.AL),
                        Ins.create_u32_reg(Code.OUT_IMM8_EAX, 0xF4, Register.EAX)])
    assert INIT_A + 0xB6 == 0x100
    eng = make(engine, image, policy=protect_a())
    if who == "write-observer":
        eng.record_writes(lambda gpa, size, rip: eng.request_pause())
    else:
        pause_at_every_violation(eng)
    r = run_past_pauses(eng)
    assert (r.stop_reason, r.exit_code) == ("exit", 1), "ZF of 0x4A + 0xB6"
    assert byte(eng, A) == 0 and eng.vm.stats()["writes"] == 1


@pytest.mark.parametrize("engine", STORE_PATH_ENGINES)
def test_pause_in_a_rep_store_lands_at_an_instruction_boundary(make, engine):
    """A pause asked for at the first iteration of `rep stosb` (3 bytes): KVM pauses
    after each iteration, Unicorn after the instruction; every byte is decided once."""
    image, ips = guest([mov_imm(Register.RDI, A), mov_imm(Register.RCX, 3), mov_imm(Register.RAX, 0x55),
                        Ins.create_rep_stosb(64)], putc("A"), exit_ins(3))
    eng = make(engine, image, policy=protect_a())
    pause_at_every_violation(eng)
    for _ in range(4):
        r = eng.run()
        if r.stop_reason != "paused":
            break
        rip, rcx = (r.rip_at if r.rip_at is not None else r.rip_after), eng.regs()["rcx"]
        assert (rip, rcx) in {(ips[3], 2), (ips[3], 1), (ips[3], 0), (ips[4], 0)}
    assert (r.stop_reason, r.exit_code) == ("exit", 3)
    assert eng.vm.read(A, 3) == b"\x55" * 3 and eng.vm.stats()["writes"] == 3


@pytest.mark.parametrize("engine", ["unicorn", "unicorn-py"])
def test_pause_in_a_store_made_in_pieces(make, engine):
    """fxsave64 (512 bytes, decided piece by piece) into protected sub-pages, then one
    more protected store, a pause asked for at every violation (KVM cannot emulate
    fxsave on a protected page: Unicorn only).  The run pauses at an instruction
    boundary and every piece is decided once.  Before: the pause was lost (the guest
    ran to its exit)."""
    from iced_x86 import MemoryOperand

    image, ips = guest([mov_imm(Register.RBX, DATA + 0x1000),
                        Ins.create_mem(Code.FXSAVE64_M512BYTE, MemoryOperand(Register.RBX))],
                       store(B, 0x33), putc("B"), exit_ins(3))
    eng = make(engine, image, cpl=0, policy=Policy.from_ranges([(DATA + 0x1000, 0x200), (A, SUB)], "emulate"))
    pause_at_every_violation(eng)
    r = eng.run()
    assert r.stop_reason == "paused" and r.rip_at in ips[2:] and r.console == ""
    for _ in range(3):  # (the store to B asks for a pause of its own if it comes after that one)
        r = eng.run()
        if r.stop_reason != "paused":
            break
    assert (r.stop_reason, r.exit_code, r.console, byte(eng, B)) == ("exit", 3, "B", 0x33)
    assert eng.vm.stats()["writes"] == len(eng.records)  # one vm.write (and one record) per piece
    assert made_records_are_in_memory(eng)


# ======================================================================= life cycle
@pytest.mark.parametrize("engine", ENGINES)
def test_run_after_the_guest_exited(make, engine):
    """Before: Unicorn ran the bytes after the exit instruction and reported "exit"
    again; KVM ran them into a triple fault ("shutdown", exit code 3)."""
    eng = make(engine)
    assert eng.run().exit_code == 3
    for _ in range(2):
        with pytest.raises(EngineError, match=r"run\(\): the guest has already exited \(exit code 3\)"):
            eng.run()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("call", ["run", "regs", "set_regs", "record_writes", "add_port_handler"])
def test_calls_after_close(make, engine, call):
    """close() twice is fine; the Vm stays readable; everything that needs the emulator
    or the vCPU is an EngineError.  Before: Unicorn's close() did nothing (run() still
    ran the guest); KVM raised "ValueError: VcpuFd is closed"."""
    eng = make(engine)
    eng.close()
    eng.close()
    assert eng.vm.read(CODE, 1) == std_guest().segments[0].data[:1]
    args = {"run": (), "regs": (), "set_regs": ({"rax": 1},), "record_writes": (print,),
            "add_port_handler": (0x80, print)}[call]
    with pytest.raises(EngineError, match=rf"{call}\(\): this \w+ engine is closed"):
        getattr(eng, call)(*args)


NESTED_RUN = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_engine_api_bad_input import engine_class, std_guest
    from engine_helpers import RAM
    cls, extra = engine_class({engine!r})
    eng = cls(std_guest(), ram_size=RAM, timeout=10.0, **extra)
    eng.add_port_handler(0x80, lambda e, v: e.run())
    try:
        eng.run()
        print("outer run returned")
    except Exception as ex:
        print(type(ex).__name__ + ": " + str(ex))
    print("again:", eng.run().stop_reason)
""")


@pytest.mark.parametrize("engine", ENGINES)
def test_run_from_a_callback_is_refused(engine):
    """run() from the engine's own port handler.  Before: Unicorn recursed into
    emu_start until the interpreter crashed (SIGSEGV); KVM's inner run finished the
    guest and the outer one ran on past the exit into a triple fault.  In a subprocess:
    a crash must not take the test run with it."""
    if engine == "kvm":
        skip_without_kvm()
    import os

    tests = os.path.dirname(__file__)
    out = subprocess.run([sys.executable, "-c", NESTED_RUN.format(tests=tests, engine=engine)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"the interpreter died ({out.returncode}): {out.stderr[-2000:]}"
    assert "EngineError: run(): this engine is already running" in out.stdout, out.stdout + out.stderr
    assert "again: exit" in out.stdout


@pytest.mark.parametrize("engine", ENGINES)
def test_run_after_a_stop_decision(make, engine):
    """As documented: under Unicorn the stopped store runs again and is decided again
    (STOP again, nothing written), and goes through once the VMM unprotects it; under
    KVM the write was lost with its retired instruction and the guest goes on after it."""
    eng = make(engine, policy=protect_a("stop"))
    r = eng.run()
    assert r.stop_reason == "stop-decision" and byte(eng, A) == INIT_A
    if engine == "unicorn":
        at = r.rip_at
        r = eng.run()
        assert (r.stop_reason, r.rip_at, r.console, byte(eng, A)) == ("stop-decision", at, "", INIT_A)
        eng.vm.set_subpage_access(A >> 12, [0xFFFFFFFF])  # the VMM lifts the protection
        r = eng.run()
        assert (r.stop_reason, r.exit_code, r.console, byte(eng, A), byte(eng, B)) == ("exit", 3, "AB", 0x22, 0x33)
    else:
        eng.vm.set_subpage_access(A >> 12, [0xFFFFFFFF])
        r = eng.run()
        assert (r.stop_reason, r.exit_code, r.console, byte(eng, A), byte(eng, B)) == ("exit", 3, "AB", INIT_A, 0x33)


CTRL_C_RUN = textwrap.dedent("""
    import os, resource, signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (a child of a background job may ignore it)
    if {many_fds}:  # fds numbered above 1024, which select() cannot watch
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
        held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    sys.path.insert(0, {tests!r})
    from test_engine_api_bad_input import engine_class, spin_guest
    from engine_helpers import RAM
    cls, extra = engine_class({engine!r})
    eng = cls(spin_guest(), ram_size=RAM, timeout=60.0, **extra)
    print("ready", flush=True)
    try:
        r = eng.run()
        print("run returned:", r.stop_reason)
    except KeyboardInterrupt:
        print("KeyboardInterrupt")
    eng.timeout = 0.5
    try:
        print("again:", eng.run().stop_reason)
    except Exception as ex:
        print("again:", type(ex).__name__ + ": " + str(ex))
""")


WAKEUP_FD_RUN = textwrap.dedent("""
    import signal, socket, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)
    seen = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    r, w = socket.socketpair()
    w.setblocking(False)
    signal.set_wakeup_fd(w.fileno())
    sys.path.insert(0, {tests!r})
    from test_engine_api_bad_input import engine_class, spin_guest
    from engine_helpers import RAM
    cls, extra = engine_class("unicorn")
    eng = cls(spin_guest(), ram_size=RAM, timeout=1.0, **extra)
    print("ready", flush=True)
    res = eng.run()
    print("run:", res.stop_reason)
    print("wakeup fd kept:", signal.set_wakeup_fd(-1) == w.fileno())
    r.setblocking(False)
    print("forwarded:", sorted(set(r.recv(64))))
    print("handler ran:", seen == [signal.SIGUSR1])
""")


def test_unicorn_run_passes_signals_on_to_the_callers_wakeup_fd():
    """The Ctrl-C watcher borrows Python's signal wakeup fd while Unicorn runs: the
    caller's own wakeup fd (asyncio's, say) still gets every signal number, and is put
    back after the run.  In a subprocess."""
    import os
    import signal
    import time

    tests = os.path.dirname(__file__)
    p = subprocess.Popen([sys.executable, "-c", WAKEUP_FD_RUN.format(tests=tests)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        p.send_signal(signal.SIGUSR1)
        out, err = p.communicate(timeout=50)
    finally:
        p.kill()
    assert "run: timeout" in out, out + err
    assert "wakeup fd kept: True" in out, out + err
    assert f"forwarded: [{int(signal.SIGUSR1)}]" in out, out + err
    assert "handler ran: True" in out, out + err


@pytest.mark.parametrize("engine, many_fds", [("unicorn", False), ("kvm", False), ("unicorn", True)],
                         ids=["unicorn", "kvm", "unicorn-fds-above-1024"])
def test_ctrl_c_stops_a_guest_that_never_exits(engine, many_fds):
    """fix: under Unicorn, Ctrl-C did nothing until the timeout (60 s by default):
    Python runs its SIGINT handler only between bytecodes, never inside emu_start, and a
    looping guest makes no callback.  Now KeyboardInterrupt comes at once; that guest
    cannot be continued (the stop lands mid-block).  KVM: KVM_RUN returns EINTR, and
    the guest continues exactly.  In a subprocess (the test run must not get the
    SIGINT)."""
    if engine == "kvm":
        skip_without_kvm()
    import os
    import signal

    tests = os.path.dirname(__file__)
    if many_fds:
        import resource

        if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 1200:
            pytest.skip("this host's hard limit on open files is below 1200")
    p = subprocess.Popen([sys.executable, "-c", CTRL_C_RUN.format(tests=tests, engine=engine, many_fds=many_fds)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        import time

        time.sleep(0.5)  # (into the run)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=50)  # (well before the guest's 60-s timeout)
    finally:
        p.kill()
    assert "KeyboardInterrupt" in out.splitlines(), out + err
    if engine == "unicorn":
        assert "again: EngineError: run(): the last run was interrupted (KeyboardInterrupt)" in out, out + err
    else:
        assert "again: timeout" in out, out + err


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("where", ["port-handler", "violation-handler"])
def test_close_from_a_callback_is_refused(make, engine, where):
    """Before: Unicorn's close() was a no-op; under KVM the run died with
    "ValueError: VcpuFd is closed" / "mmap closed or invalid"."""
    eng = make(engine, policy=protect_a())
    if where == "port-handler":
        eng.add_port_handler(0x80, lambda e, v: e.close())
    else:
        engine_handler = eng.handle_violation
        eng.vm.on_violation(lambda ev: (eng.close(), engine_handler(ev))[1])
    with pytest.raises(EngineError, match=r"close\(\): the engine is running"):
        eng.run()
    eng.close()
    with pytest.raises(EngineError, match="is closed"):
        eng.run()


def _in_another_thread(fn) -> list:
    """Run ``fn`` in another thread and wait for it: what it returned or raised."""
    import threading

    out: list = []

    def target():
        try:
            out.append(fn())
        except BaseException as e:  # handed back to the test
            out.append(e)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_close_from_another_thread_during_a_run(make, engine):
    """Before: Unicorn's close() did nothing; under KVM the run died with "ValueError:
    mmap closed or invalid".  (Unicorn releasing its handle under a running emulator
    would crash the interpreter.)"""
    eng = make(engine)
    seen: list = []
    eng.add_port_handler(0x80, lambda e, v: seen.extend(_in_another_thread(e.close)))
    r = eng.run()
    assert (r.stop_reason, r.exit_code, r.console) == ("exit", 3, "AB")
    assert len(seen) == 1 and isinstance(seen[0], EngineError) and "close(): the engine is running" in str(seen[0])


@pytest.mark.parametrize("engine", ENGINES)
def test_pause_requested_from_another_thread_during_a_run(make, engine):
    """Taken, and honoured at the engine's next callback (here: the port handler's
    return)."""
    eng = make(engine)
    eng.add_port_handler(0x80, lambda e, v: _in_another_thread(e.request_pause) and None)
    r = eng.run()
    assert (r.stop_reason, r.console, byte(eng, B)) == ("paused", "A", INIT_B)
    assert eng.run().exit_code == 3


def _pause_from_another_thread(eng, after: float = 0.3):
    """Start a thread that, ``after`` seconds into a run of ``eng``, calls request_pause()
    (retrying while no run is in progress yet); returns it (join it)."""
    import threading
    import time

    def target():
        time.sleep(after)
        for _ in range(500):
            try:
                eng.request_pause()
                return
            except EngineError:  # the run has not started yet
                time.sleep(0.01)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


def run_paused_from_another_thread(eng, after: float = 0.3):
    """``eng.run()`` with request_pause() called from another thread ``after`` seconds in."""
    t = _pause_from_another_thread(eng, after=after)
    try:
        return eng.run()
    finally:
        t.join()


def run_to_the_end(eng, before: int, n: int) -> RunResult:
    """Continue ``eng`` to its exit; its counter must have gone up by exactly ``n``."""
    r = eng.run()
    assert (r.stop_reason, r.exit_code) == ("exit", 0), r
    assert counter(eng) - before == n
    return r


def pause_at_every_violation(eng) -> None:
    """The engine's own violation handling, with a pause asked for at each violation."""
    engine_handler = eng.handle_violation
    eng.vm.on_violation(lambda ev: (eng.request_pause(), engine_handler(ev))[1])


def run_past_pauses(eng, runs: int = 3) -> RunResult:
    """run() until it ends other than paused (at most ``runs`` runs): the last result."""
    for _ in range(runs):
        r = eng.run()
        if r.stop_reason != "paused":
            break
    return r


COUNT_AT = DATA + 0x300  # the counting guest's counter (a qword of guest data)


def looping_guest(n: int, setup: list[Ins], body: list[Ins]) -> GuestImage:
    """``setup``, then ``body`` ``n`` times (RCX counts down), then exit 0."""
    head = [mov_imm(Register.RCX, n)] + setup
    body = body + [Ins.create_reg_i32(Code.SUB_RM64_IMM8, Register.RCX, 1)]
    _, ips = flat(head + body + [Ins.create_branch(Code.JNE_REL32_64, CODE)] + exit_ins(0))
    return flat(head + body + [Ins.create_branch(Code.JNE_REL32_64, ips[len(head)])] + exit_ins(0))[0]


COUNT = Ins.create_mem_i32(Code.ADD_RM64_IMM8, _abs(COUNT_AT), 1)  # `add qword [COUNT_AT], 1`


def counting_guest(n: int) -> GuestImage:
    """``n`` times `add qword [COUNT_AT], 1` (a loop without an exit), then exit 0."""
    return looping_guest(n, [], [COUNT])


def counter(eng) -> int:
    return int.from_bytes(eng.vm.read(COUNT_AT, 8), "little")


def test_kvm_pause_from_another_thread_interrupts_a_guest_that_never_exits(make):
    """fix: a pause asked for from another thread waited for the engine's next exit, so
    a guest in a loop without exits ran on until the timeout.  KVM now kicks the vCPU
    thread out of KVM_RUN.  (Unicorn, which cannot be stopped exactly from another
    thread, pauses at its next callback: see the test_unicorn_pause_from_another_thread_*
    tests.)"""
    eng = make("kvm", spin_guest(), timeout=30.0)
    for _ in range(2):
        r = run_paused_from_another_thread(eng)
        assert r.stop_reason == "paused", r
        assert r.console == "A"


def test_kvm_pause_from_another_thread_then_resume_counts_exactly(make):
    """Paused from another thread in the middle of a loop of read-modify-write stores,
    then resumed: every iteration runs exactly once."""
    n = 300_000_000
    eng = make("kvm", counting_guest(n), timeout=60.0)
    before = counter(eng)
    r = run_paused_from_another_thread(eng, after=0.05)
    assert r.stop_reason == "paused", r  # (the loop takes a few tenths of a second here)
    assert 0 < counter(eng) - before < n
    run_to_the_end(eng, before, n)


@pytest.mark.parametrize("engine", ENGINES)
def test_after_a_timeout_the_guest_continues_exactly_or_not_at_all(make, engine):
    """fix: under Unicorn, run() after a timeout ran part of a translated block twice
    (a counting loop counted one too many): Unicorn stopped from its timer thread leaves
    RIP at the start of the block it was running.  That guest cannot be continued now,
    and says so.  KVM stops at an instruction boundary and continues exactly."""
    n = 300_000_000 if engine == "kvm" else 30_000_000
    eng = make(engine, counting_guest(n), timeout=0.05)
    before = counter(eng)
    r = eng.run()
    assert r.stop_reason == "timeout", r
    if engine == "unicorn":
        assert "cannot be continued" in r.detail
        with pytest.raises(EngineError, match=r"run\(\): the last run timed out, .* cannot be continued exactly"):
            eng.run()
        return
    eng.timeout = 60.0
    r = eng.run()
    assert (r.stop_reason, r.exit_code) == ("exit", 0)
    assert counter(eng) - before == n


def test_kvm_timeout_and_pause_work_when_run_is_off_the_main_thread(make):
    """fix: the KVM timeout was a SIGALRM handler, which Python sets only on the main
    thread: run() on any other thread had no timeout at all (a guest that never exits
    hung it), and a pause from another thread waited for the next exit.  Both now kick
    the vCPU thread with a signal it blocks and KVM_RUN lets through: no handler needed."""
    eng = make("kvm", spin_guest(), timeout=0.3)
    got = _in_another_thread(eng.run)
    assert isinstance(got[0], RunResult) and got[0].stop_reason == "timeout", got
    eng2 = make("kvm", spin_guest(), timeout=30.0)
    got = _in_another_thread(lambda: (_pause_from_another_thread(eng2), eng2.run())[1])
    assert isinstance(got[0], RunResult) and got[0].stop_reason == "paused", got


def test_kvm_run_leaves_the_callers_alarm_alone(make):
    """fix: the KVM timeout replaced the caller's SIGALRM handler during the run and
    cancelled the caller's interval timer (setitimer) at its end."""
    import signal

    eng = make("kvm", timeout=5.0)
    fired = []
    mine = lambda signum, frame: fired.append(signum)  # noqa: E731
    old = signal.signal(signal.SIGALRM, mine)
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        r = eng.run()
        assert r.stop_reason == "exit"
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 20.0  # still armed, as the caller left it
        assert signal.getsignal(signal.SIGALRM) is mine and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def chatty_counting_guest(n: int) -> GuestImage:
    """``n`` times: `add qword [COUNT_AT], 1`, then a "." to the console; then exit 0."""
    return looping_guest(n, [mov_imm(Register.RAX, ord("."))],
                         [COUNT, Ins.create_u32_reg(Code.OUT_IMM8_AL, 0xE9, Register.AL)])


@pytest.mark.parametrize("guest", ["protected-stores", "port-io"])
def test_unicorn_timeout_is_exact_when_the_guest_makes_callbacks(make, guest):
    """The timeout waits a moment for the guest's next store to a protected page (held
    back) or port I/O, where Unicorn stops exactly: then the run can be continued, and
    every iteration runs once.  (Only a guest making neither is stopped mid-block.)"""
    if guest == "protected-stores":  # the counter shares its page with a protected sub-page
        # (the C trampoline's permit mirror makes these stores in about 40 ns: 40 M of
        # them outlast the timeout; the timer turns the mirror off, so the store after
        # it still reaches the engine, which holds it back)
        from sppkit.engines.unicorn import native_status

        n = 40_000_000 if native_status()[0] else 400_000
        image, policy = counting_guest(n), protect_a("emulate")
    else:
        n, image, policy = 300_000, chatty_counting_guest(300_000), None
    eng = make("unicorn", image, policy=policy, timeout=0.2)
    before = counter(eng)
    r = eng.run()
    assert r.stop_reason == "timeout" and "cannot be continued" not in r.detail, r
    assert 0 < counter(eng) - before < n
    eng.timeout = 60.0
    r = eng.run()
    assert (r.stop_reason, r.exit_code) == ("exit", 0), r
    assert counter(eng) - before == n
    if guest == "port-io":
        assert r.console == "." * n


def test_unicorn_pause_from_another_thread_lands_at_the_next_console_output(make):
    """fix: a pause asked for from another thread was honoured only at stores to
    protected pages and at ports with a handler, not at console output.  Now at any
    port I/O: the run pauses right after the `out`, exactly (the counter and the
    console agree), and goes on from there."""
    n = 300_000
    eng = make("unicorn", chatty_counting_guest(n), timeout=60.0)
    before = counter(eng)
    r = run_paused_from_another_thread(eng, after=0.05)
    assert r.stop_reason == "paused", r
    done = counter(eng) - before
    assert 0 < done < n and r.console == "." * done  # stopped right after an iteration's `out`
    assert run_to_the_end(eng, before, n).console == "." * n


def test_unicorn_pause_and_a_hard_timeout_stop_is_a_timeout_that_cannot_be_continued(make):
    """Review fix: a pause from another thread that had not landed (no callback) when the
    timeout stopped the run mid-block was reported as "paused", and continuing ran
    instructions twice.  It is the timeout's stop: reported so, and refused."""
    eng = make("unicorn", counting_guest(200_000_000), timeout=0.3)
    r = run_paused_from_another_thread(eng, after=0.05)
    assert r.stop_reason == "timeout" and "cannot be continued" in r.detail, r
    with pytest.raises(EngineError, match="cannot be continued exactly"):
        eng.run()


def polling_guest(n: int) -> GuestImage:
    """``n`` times: `in al, 0x80`, then `add qword [COUNT_AT], 1`; then exit 0."""
    return looping_guest(n, [], [Ins.create_reg_u32(Code.IN_AL_IMM8, Register.AL, 0x80), COUNT])


def test_unicorn_pause_from_another_thread_lands_at_port_input(make):
    """Review fix: port input (`in`) did not honour a pause asked for from another
    thread, so a guest polling a port paused only at the timeout.  Now it stops right
    after the `in`, exactly, and goes on from there."""
    n = 2_000_000
    eng = make("unicorn", polling_guest(n), timeout=60.0)
    before = counter(eng)
    r = run_paused_from_another_thread(eng, after=0.05)
    assert r.stop_reason == "paused", r
    assert 0 <= counter(eng) - before < n
    run_to_the_end(eng, before, n)


def test_unicorn_a_late_timer_does_not_stop_a_later_run(make):
    """Review fix: a timeout timer of an earlier run (one that fired as it ended) could
    stop the next run mid-block.  Timers act on their own run only."""
    eng = make("unicorn", counting_guest(300_000), timeout=60.0, policy=protect_a("emulate"))
    before = counter(eng)
    old_run = eng._run_id
    eng._time_out(old_run)  # a timer of a run that is not running: nothing happens
    assert not eng._timed_out and eng._hard_timer is None
    r = eng.run()
    assert (r.stop_reason, r.exit_code) == ("exit", 0) and counter(eng) - before == 300_000
    assert eng._run_id == old_run + 1
    eng._time_out(old_run + 1)  # that run's own timer, late: nothing either
    assert not eng._timed_out and not eng._hard_stopped


def test_unicorn_pause_from_another_thread_lands_at_the_next_callback(make):
    """Unicorn cannot be stopped exactly from another thread (see above): the pause lands
    at the engine's next callback, here the exit port's, so the run ends by its exit."""
    eng = make("unicorn", counting_guest(3_000_000), timeout=60.0)
    before = counter(eng)
    r = run_paused_from_another_thread(eng, after=0.02)
    assert (r.stop_reason, r.exit_code) == ("exit", 0)
    assert counter(eng) - before == 3_000_000


def test_kvm_run_survives_stray_signals_and_restores_handlers(make):
    """Kick signals that come with no pause or timeout (a late kick, anyone's) make
    KVM_RUN return early: the run goes on, without spinning on them.  The run installs
    no signal handler: the caller's SIGURG handler is untouched and works after it."""
    import os
    import signal
    import threading
    import time

    eng = make("kvm", counting_guest(60_000_000), timeout=60.0)  # (skips where KVM is not usable)
    before = counter(eng)
    seen = []
    mine = lambda signum, frame: seen.append(signum)  # noqa: E731
    old = signal.signal(signal.SIGURG, mine)
    try:
        main = threading.get_ident()
        stop = threading.Event()

        def pester():
            while not stop.wait(0.02):
                signal.pthread_kill(main, signal.SIGURG)

        t = threading.Thread(target=pester, daemon=True)
        t.start()
        try:
            r = eng.run()
        finally:
            stop.set()
            t.join()
        assert (r.stop_reason, r.exit_code) == ("exit", 0), r
        assert counter(eng) - before == 60_000_000
        assert signal.getsignal(signal.SIGURG) is mine
        os.kill(os.getpid(), signal.SIGURG)
        time.sleep(0.01)
        assert signal.SIGURG in seen  # the caller's handler works again
    finally:
        signal.signal(signal.SIGURG, old)


# ======================================================================= registers
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("regs", "exc", "match"), [
    pytest.param(None, TypeError, r"registers None: must be a dict", id="None"),
    pytest.param([("rax", 1)], TypeError, r"must be a dict of register name -> value", id="list"),
    pytest.param({"RAX": 1}, ValueError, r"register 'RAX': must be one of rax, rbx", id="upper-case"),
    pytest.param({"eax": 1}, ValueError, r"register 'eax': must be one of", id="eax"),
    pytest.param({1: 2}, ValueError, r"register 1: must be one of", id="int-name"),
    pytest.param({"rax": "1"}, ValueError, r"register rax='1': must be an integer from 0 to 2\*\*64-1", id="str"),
    pytest.param({"rax": None}, ValueError, r"register rax=None", id="value-None"),
    pytest.param({"rax": 1.5}, ValueError, r"register rax=1\.5", id="float"),
    pytest.param({"rax": True}, ValueError, r"register rax=True", id="bool"),
    pytest.param({"rax": -1}, ValueError, r"register rax=-1", id="negative"),
    pytest.param({"rax": 1 << 64}, ValueError, r"register rax=18446744073709551616", id="2**64"),
    pytest.param({"rbx": 7, "rcx": "x"}, ValueError, r"register rcx='x'", id="good-then-bad"),
    pytest.param({"rbx": 7, "bad": 2}, ValueError, r"register 'bad'", id="good-then-bad-name"),
    pytest.param({"rflags": (1 << 64) - 1}, ValueError, r"rflags=0xffffffffffffffff: bits .* are reserved", id="rflags-all"),
    pytest.param({"rflags": 0x2 | 1 << 17}, ValueError, r"rflags=0x20002: bits 0x20000 are reserved", id="rflags-VM"),
    pytest.param({"rflags": 0x2 | 1 << 32}, ValueError, r"bits 0x100000000 are reserved", id="rflags-bit32"),
])
def test_set_regs_refuses_and_changes_nothing(make, engine, regs, exc, match):
    """Before: Unicorn loaded rbx before failing on rcx (a failed call changed state);
    -1, 2**64 and True were wrapped/truncated; the engines disagreed on reserved RFLAGS
    bits (Unicorn dropped bits 32-63, KVM bit 17); a list raised AttributeError."""
    eng = make(engine)
    before = eng.regs()
    with pytest.raises(exc, match=match):
        eng.set_regs(regs)
    assert eng.regs() == before


@pytest.mark.parametrize("engine", ENGINES)
def test_set_regs_good_values(make, engine):
    eng = make(engine)
    eng.set_regs({"rax": (1 << 64) - 1, "r15": 0, "rflags": 0})
    got = eng.regs()
    assert (got["rax"], got["r15"], got["rflags"]) == ((1 << 64) - 1, 0, 0x2)  # bit 1 always reads 1


# ======================================================================= instruction_at
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("rip", [-1, RAM, 1 << 64, "0x400000", None, True, float(CODE)],
                         ids=["negative", "ram-size", "2**64", "str", "None", "bool", "float"])
def test_instruction_at_refuses_addresses_outside_ram(make, engine, rip):
    """Before: messages named "gpa=" (not the argument) or "read at gpa=0x1000000: no
    memslot covers ..." for an address past RAM."""
    eng = make(engine)
    with pytest.raises(ValueError, match=r"rip=.*: must be a guest-physical address in guest RAM \(0 to 0xffffff\)"):
        eng.instruction_at(rip)


def _ud2_at_the_end() -> GuestImage:
    ud2 = bytes.fromhex("0f0b")
    return GuestImage(segments=[Segment(RAM - 2, ud2, 2, "r-x")], entry=RAM - 2)


@pytest.mark.parametrize("engine", ENGINES)
def test_instruction_and_fault_in_the_last_bytes_of_ram(make, engine):
    """A guest faulting at the last instruction of RAM is a shutdown naming it.
    Before: run() raised GpaNotMapped (decoding read 15 bytes past the end of RAM), and
    so did instruction_at() for any of the last 14 addresses."""
    eng = make(engine, _ud2_at_the_end(), cpl=0)
    assert eng.instruction_at(RAM - 2).text == "ud2"
    assert eng.instruction_at(RAM - 1) is None  # one byte: does not decode
    r = eng.run()
    assert r.stop_reason == "shutdown" and r.rip_at == RAM - 2 and "(`ud2`)" in r.detail


# ======================================================================= sizes and results
@pytest.mark.parametrize(("value", "match"), [
    pytest.param(True, r"memory size True", id="True"),
    pytest.param(0, r"memory size 0: must be positive", id="zero"),
    pytest.param(-5, r"memory size -5: must be positive", id="negative"),
    pytest.param("0", r"memory size '0': must be positive", id="str-zero"),
    pytest.param(None, r"memory size None: expected a number", id="None"),
    pytest.param(1.5, r"memory size 1\.5: expected a number", id="float"),
])
def test_parse_size_refuses(value, match):
    """Before: parse_size(True) returned True, parse_size(0) 0 and parse_size(-5) -5 (the
    same values as strings were refused)."""
    with pytest.raises(ValueError, match=match):
        parse_size(value)


def _result() -> RunResult:
    eng = UnicornEngine(std_guest(), ram_size=RAM, policy=protect_a())
    try:
        return eng.run()
    finally:
        eng.close()


@pytest.mark.parametrize("max_violations", [-1, True, "3", 2.5, None], ids=["negative", "bool", "str", "float", "None"])
def test_run_result_to_dict_max_violations(max_violations):
    """Before: to_dict(-1) silently dropped the last record (a slice), "3" raised
    "slice indices must be integers"."""
    with pytest.raises(ValueError, match=r"max_violations=.*: must be a non-negative integer"):
        _result().to_dict(max_violations)


def _result_for(make, engine, stop: str) -> RunResult:
    if stop == "exit":
        return make(engine, policy=protect_a()).run()
    if stop == "stop-decision":
        return make(engine, policy=protect_a("stop")).run()
    if stop == "paused":
        eng = make(engine, policy=protect_a())
        eng.add_port_handler(0x80, lambda e, v: "pause")
        return eng.run()
    if stop == "shutdown":
        return make(engine, _ud2_at_the_end(), cpl=0).run()
    return make(engine, spin_guest(), timeout=0.2).run()  # timeout


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("stop", ["exit", "stop-decision", "paused", "shutdown", "timeout"])
def test_result_json_is_strict(make, engine, stop):
    """Every result serialises as strict JSON (no NaN/Infinity) and reads back the same."""
    r = _result_for(make, engine, stop)
    assert r.stop_reason == stop
    text = json.dumps(r.to_dict(), allow_nan=False)
    assert json.loads(text) == json.loads(json.dumps(r.to_dict()))
    for v in r.violations:
        json.dumps(v.to_dict(), allow_nan=False)



# ======================================================================= guest RAM
def test_guest_ram_is_taken_lazily_and_allocation_failures_are_named(monkeypatch):
    """allocate_ram maps guest RAM with MAP_NORESERVE (only touched pages use host
    memory); where the platform has no mmap flags (Windows) it maps without them; a
    refusal is an EngineError naming the size."""
    import mmap

    from sppkit.engines import base

    seen = []
    real = mmap.mmap

    def spy(*args, **kw):
        seen.append(kw.get("flags"))
        return real(*args, **kw)

    monkeypatch.setattr(mmap, "mmap", spy)
    base.allocate_ram(2 << 20).close()
    assert seen[-1] == mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | base.MAP_NORESERVE
    base.allocate_ram(2 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS).close()
    assert seen[-1] == mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | base.MAP_NORESERVE
    monkeypatch.delattr(mmap, "MAP_ANONYMOUS")  # as on Windows
    base.allocate_ram(2 << 20).close()
    assert seen[-1] is None
    monkeypatch.undo()
    with pytest.raises(EngineError, match=r"cannot allocate 1,099,511,627,776 MiB of guest RAM"):
        base.allocate_ram(1 << 60)


def test_a_ctrl_c_swallowed_by_a_binding_callback_still_interrupts_the_run():
    """Ctrl-C: the watcher stops the guest and Python raises KeyboardInterrupt at its
    next bytecode — which may be inside a callback of Unicorn's binding (the port or
    recording hooks), where ctypes swallows it ("Exception ignored").  The run then
    ended as a normal stop (a recording run exited 1 and committed its output); now
    run() raises KeyboardInterrupt all the same.  The swallowed interrupt is simulated:
    the recording callback calls the watcher's stop and raises nothing."""
    store = Ins.create_mem_reg(Code.MOV_RM64_R64, _abs(DATA), Register.RAX)
    _, ips = flat([store, Ins.create_branch(Code.JMP_REL32_64, CODE)])
    eng = UnicornEngine(flat([store, Ins.create_branch(Code.JMP_REL32_64, ips[0])])[0], ram_size=RAM, timeout=30)
    try:
        eng.record_writes(lambda gpa, size, rip: eng._on_ctrl_c(eng._run_id))
        with pytest.raises(KeyboardInterrupt):
            eng.run()
        with pytest.raises(EngineError, match="interrupted"):
            eng.run()
    finally:
        eng.close()


@pytest.mark.parametrize("engine", STORE_PATH_ENGINES)
def test_pause_at_a_read_modify_write_store_in_a_loop_lands(make, engine):
    """fix: a pause asked for at `add qword [m], 1` in a loop never landed under Unicorn
    (each later store re-armed a code hook whose set-up made Unicorn run the `add`
    again: a hang, with memory growing).  The run now pauses at the next store (held
    back) or port I/O; continued, every iteration is counted once."""
    n = 1000
    eng = make(engine, counting_guest(n), policy=Policy.from_ranges([(COUNT_AT, 8)], "emulate"))
    before = counter(eng)
    engine_handler = eng.handle_violation
    seen = []

    def handler(ev):
        seen.append(ev)
        if len(seen) == 10:
            eng.request_pause()
        return engine_handler(ev)

    eng.vm.on_violation(handler)
    r = eng.run()
    assert r.stop_reason == "paused", r
    assert 10 <= counter(eng) - before < n
    run_to_the_end(eng, before, n)
    assert len(seen) == n and eng.vm.stats()["writes"] == n


@pytest.mark.parametrize("engine", STORE_PATH_ENGINES)
def test_pause_at_a_read_modify_write_store_before_a_loop_without_stores_lands(make, engine):
    """`add qword [m], 1; jmp $`, a pause asked for at the add's store: no store or
    port I/O follows, so the run pauses when a newly translated block begins with the
    next instruction (the `jmp $`), the add made once — not at the timeout, mid-block,
    with a guest that cannot be continued.  (Unicorn may run a few instructions past
    the add first, those of its block: here only the jump to itself.)"""
    rmw = COUNT
    _, ips = flat([rmw, Ins.create_branch(Code.JMP_REL32_64, CODE)])
    image, ips = flat([rmw, Ins.create_branch(Code.JMP_REL32_64, ips[1])])
    eng = make(engine, image, policy=Policy.from_ranges([(COUNT_AT, 8)], "emulate"), timeout=5.0)
    before = counter(eng)
    pause_at_every_violation(eng)
    r = eng.run()
    assert (r.stop_reason, r.rip_at if r.rip_at is not None else r.rip_after) == ("paused", ips[1]), r
    assert counter(eng) - before == 1


@pytest.mark.parametrize("engine", STORE_PATH_ENGINES)
@pytest.mark.parametrize("cpl", [0, 3])
def test_a_hlt_after_a_pause_at_a_read_modify_write_store_is_not_lost(make, engine, cpl):
    """`add qword [m], 1; hlt; exit 7`, a pause asked for at the add's store.  KVM
    pauses after the add, then halts (CPL 0) or shuts down (CPL 3: #GP).  Unicorn
    (which cannot stop there) ends at the hlt the same way.  Before: Unicorn reported
    the end of the run at the hlt as the pause, and the next run() went past the hlt to
    the exit."""
    image, ips = flat([COUNT, Ins.create(Code.HLT), *exit_ins(7)])
    eng = make(engine, image, cpl=cpl, policy=Policy.from_ranges([(COUNT_AT, 8)], "emulate"))
    pause_at_every_violation(eng)
    r = run_past_pauses(eng)
    assert r.stop_reason == ("halt" if cpl == 0 else "shutdown"), r
    assert eng.vm.stats()["writes"] == 1


@pytest.mark.parametrize("engine", ["unicorn", "unicorn-py"])
def test_a_pause_asked_for_by_a_write_observer_lands_and_records_each_store_once(make, engine):
    """A recording callback asks for a pause at the 10th `add qword [m], 1` of a loop
    (m on a page holding a protected sub-page, EMULATE).  The run pauses (before: the
    pause was lost, the guest ran to its exit), and the trace holds each store once
    (before, a store held back at the pause was recorded again when it ran)."""
    n = 1000
    eng = make(engine, counting_guest(n), policy=Policy.from_ranges([(COUNT_AT, 8)], "emulate"))
    before = counter(eng)
    seen = []

    def rec(gpa, size, rip):
        seen.append(gpa)
        if len(seen) == 10:
            eng.request_pause()

    eng.record_writes(rec)
    r = eng.run()
    assert r.stop_reason == "paused", r
    assert len(seen) == counter(eng) - before
    run_to_the_end(eng, before, n)
    assert len(seen) == n



@pytest.mark.parametrize("engine", STORE_PATH_ENGINES)
def test_pause_at_a_read_modify_write_store_lands_at_port_input(make, engine):
    """`add qword [m], 1; nop; L: in al, 0x80; jmp L`, a pause asked for at the add's
    store: no later store, and no block begins with the `nop`; the run pauses at the
    `in` (port I/O stops a run with a pause pending, also while stores are held)."""
    head = [COUNT, Ins.create(Code.NOPD)]
    inn = Ins.create_reg_u32(Code.IN_AL_IMM8, Register.AL, 0x80)
    _, ips = flat(head + [inn, Ins.create_branch(Code.JMP_REL32_64, CODE)])
    image, ips = flat(head + [inn, Ins.create_branch(Code.JMP_REL32_64, ips[2])])
    eng = make(engine, image, policy=Policy.from_ranges([(COUNT_AT, 8)], "emulate"), timeout=5.0)
    before = counter(eng)
    pause_at_every_violation(eng)
    r = eng.run()
    assert r.stop_reason == "paused" and "cannot be continued" not in r.detail, r
    assert counter(eng) - before == 1


@pytest.mark.parametrize("engine", STORE_PATH_ENGINES)
def test_pause_at_a_store_into_running_code_lands_after_it(make, engine):
    """A store into a protected sub-page of the code page, near the running code (run
    alone on fresh translations), with a pause asked for by the violation handler: the
    run pauses right after it and goes on.  Before: Unicorn reported a guest fault
    (triple fault) at the next instruction."""
    target = CODE + 0xF80
    ins = [Ins.create_mem_u32(Code.MOV_RM8_IMM8, _abs(target), 0x90), *putc("A"), *exit_ins(3)]
    enc = iced_x86.BlockEncoder(64)
    enc.add_many(ins)
    code = enc.encode(CODE)
    ips = [i.ip for i in iced_x86.Decoder(64, code, ip=CODE)]
    image = GuestImage(segments=[Segment(CODE, code, len(code), "rwx"),
                                 Segment(DATA, INIT_DATA, len(INIT_DATA), "rw-")], entry=CODE)
    eng = make(engine, image, cpl=0, policy=Policy.from_ranges([(target, SUB)], "emulate"))
    pause_at_every_violation(eng)
    r = eng.run()
    assert (r.stop_reason, r.rip_at if r.rip_at is not None else r.rip_after) == ("paused", ips[1]), r
    r = eng.run()
    assert (r.stop_reason, r.exit_code, r.console) == ("exit", 3, "A")
    assert eng.vm.read(target, 1) == b"\x90"


@pytest.mark.parametrize("engine", ["unicorn", "unicorn-py"])
def test_a_store_into_running_code_is_recorded_once(make, engine):
    """A store into the code page near the running code is held back and run alone on
    fresh translations: the recording holds it once (before: twice)."""
    target = CODE + 0xF00  # a writable sub-page of the code page; CODE+0xF80 protected
    ins = [Ins.create_mem_u32(Code.MOV_RM8_IMM8, _abs(target), 0x90), *putc("A"), *exit_ins(3)]
    enc = iced_x86.BlockEncoder(64)
    enc.add_many(ins)
    code = enc.encode(CODE)
    image = GuestImage(segments=[Segment(CODE, code, len(code), "rwx"),
                                 Segment(DATA, INIT_DATA, len(INIT_DATA), "rw-")], entry=CODE)
    eng = make(engine, image, cpl=0, policy=Policy.from_ranges([(CODE + 0xF80, SUB)], "skip"))
    seen = []
    eng.record_writes(lambda gpa, size, rip: seen.append((gpa, size, rip)))
    r = eng.run()
    assert (r.stop_reason, r.exit_code) == ("exit", 3)
    assert seen == [(target, 1, CODE)] and eng.vm.stats()["writes"] == 1
