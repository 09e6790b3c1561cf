"""The Unicorn engine: every guest write to a write-protected page goes through
``vm.write`` *before* the store retires.

Each test states the rule it checks.  Guests are either the bundled C programs
(built with the system gcc; skipped without a toolchain) or flat binaries built here
with iced-x86, so every instruction address is known exactly.

The rules (README, "Two engines, one write path"):

* allowed / EMULATE: the bytes land, the guest goes on;
* SKIP: nothing is written, the guest goes on;
* STOP: the run ends with RIP **at** the faulting instruction, memory untouched, the
  instruction not retired;
* an exception raised in a violation handler is re-raised from ``run()``;
* an unaligned or page-crossing store is one access: decided once, counted once,
  and a discarded one leaves every byte of both pages as it was.

Cases where the engine crashed the interpreter while these tests were written run
in a child process (see ``_run_isolated``), so a crash fails one test, not the run.

Every test runs twice: with the C trampoline handing protected stores to vm.write,
and with the ctypes callback used where it cannot be built (``trampoline`` fixture).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections import Counter

import iced_x86
import pytest
from click.testing import CliRunner
from iced_x86 import Code, MemoryOperand, Register
from iced_x86 import Instruction as Ins
from unicorn.x86_const import UC_X86_REG_RCX, UC_X86_REG_RDI, UC_X86_REG_RIP, UC_X86_REG_RSP

from sppkit.cli import main as cli_main
import sppkit.engines.unicorn as unicorn_engine
from sppkit.engines.unicorn import UnicornEngine, native_status
from sppkit.guests import GuestImage, Segment, build_guest, list_programs, load_elf
from sppkit.policy import Policy, load_policy
from sppkit.vmm import Decision
from engine_helpers import MIXED_POLICY, PAGE, RAM, SUB, needs_gcc

CODE = 0x400000  # flat guests' code
DATA = 0x600000  # flat guests' data: DATA_PAGES pages, pre-filled with a pattern
DATA_PAGES = 8
MARK = DATA + 0x7000  # an unprotected page for "the next instruction ran" markers



@pytest.fixture(autouse=True, params=["c-trampoline", "ctypes-trampoline"])
def trampoline(request, monkeypatch):
    """Run the test with either write-protect hook trampoline (both call vm.write)."""
    if request.param == "c-trampoline":
        ok, why = native_status()
        if not ok:
            pytest.skip(f"the C trampoline cannot be built here: {why}")
    else:
        # as on a machine without a C compiler (child processes too)
        monkeypatch.setenv("SPPKIT_NATIVE", "0")
        monkeypatch.setattr(unicorn_engine, "_lib_cache", [None])
    return request.param


# ---------------------------------------------------------------- a tiny assembler
_STORE = {1: Code.MOV_RM8_R8, 2: Code.MOV_RM16_R16, 4: Code.MOV_RM32_R32, 8: Code.MOV_RM64_R64}
_RAX = {1: Register.AL, 2: Register.AX, 4: Register.EAX, 8: Register.RAX}


def _abs(addr: int) -> MemoryOperand:
    # displ_size=8: a plain [disp32] in 64-bit mode (4 would add an addr32 prefix).
    return MemoryOperand(displ=addr, displ_size=8)


class Asm:
    """Instructions in order; every emitting method returns the instruction's index,
    and :meth:`address` gives its address once assembled."""

    def __init__(self, base: int = CODE) -> None:
        self.base = base
        self.ins: list[Ins] = []
        self._ips: list[int] | None = None

    def _add(self, ins: Ins) -> int:
        self.ins.append(ins)
        self._ips = None
        return len(self.ins) - 1

    def mov_imm(self, reg, value: int) -> int:
        return self._add(Ins.create_reg_u64(Code.MOV_R64_IMM64, reg, value & (2**64 - 1)))

    def store(self, size: int, addr: int) -> int:
        """``mov [addr], al/ax/eax/rax``."""
        return self._add(Ins.create_mem_reg(_STORE[size], _abs(addr), _RAX[size]))

    def store_mark(self, value: int = 1) -> int:
        """``mov byte [MARK], value``: the side effect of "the next instruction ran"."""
        return self._add(Ins.create_mem_u32(Code.MOV_RM8_IMM8, _abs(MARK), value))

    def push_rax(self) -> int:
        return self._add(Ins.create_reg(Code.PUSH_R64, Register.RAX))

    def rep_stosb(self) -> int:
        return self._add(Ins.create_rep_stosb(64))

    def movdqu_load(self, addr: int) -> int:
        return self._add(Ins.create_reg_mem(Code.MOVDQU_XMM_XMMM128, Register.XMM0, _abs(addr)))

    def movdqu_store(self, addr: int) -> int:
        return self._add(Ins.create_mem_reg(Code.MOVDQU_XMMM128_XMM, _abs(addr), Register.XMM0))

    def jmp_next(self) -> int:
        """``jmp $+2``: ends Unicorn's translation block."""
        return self._add(Ins.create_declare_byte_2(0xEB, 0x00))

    def cs_to_eax(self) -> int:
        return self._add(Ins.create_reg_reg(Code.MOV_R32M16_SREG, Register.EAX, Register.CS))

    def putc(self, ch: str) -> None:
        self.mov_imm(Register.RAX, ord(ch))
        self._add(Ins.create_u32_reg(Code.OUT_IMM8_AL, 0xE9, Register.AL))

    def exit_eax(self) -> int:
        return self._add(Ins.create_u32_reg(Code.OUT_IMM8_EAX, 0xF4, Register.EAX))

    def exit(self, code: int = 0) -> int:
        self.mov_imm(Register.RAX, code)
        return self.exit_eax()

    def assemble(self) -> bytes:
        enc = iced_x86.BlockEncoder(64)
        enc.add_many(self.ins)
        code = enc.encode(self.base)
        self._ips = [i.ip for i in iced_x86.Decoder(64, code, ip=self.base)]
        assert len(self._ips) == len(self.ins)
        return code

    def address(self, index: int) -> int:
        if self._ips is None:
            self.assemble()
        return self._ips[index]


def initial_data() -> bytes:
    """The flat guests' data pages before the run: no byte is 0, none repeats nearby."""
    return bytes(((i * 7 + 3) % 251) + 1 for i in range(DATA_PAGES * PAGE))


def flat_guest(asm: Asm) -> GuestImage:
    code = asm.assemble()
    return GuestImage(
        segments=[Segment(CODE, code, len(code), "r-x"), Segment(DATA, initial_data(), DATA_PAGES * PAGE, "rw-")],
        entry=CODE,
    )


def engine(asm_or_image, ranges=(), decision="skip", **kw) -> UnicornEngine:
    image = asm_or_image if isinstance(asm_or_image, GuestImage) else flat_guest(asm_or_image)
    policy = Policy.from_ranges(ranges, decision) if ranges else None
    kw.setdefault("ram_size", RAM)
    kw.setdefault("timeout", 20.0)
    return UnicornEngine(image, policy=policy, **kw)


def before(gpa: int, n: int) -> bytes:
    """The bytes at ``gpa`` in a flat guest before the run."""
    off = gpa - DATA
    return initial_data()[off : off + n]


def writes_seen(eng: UnicornEngine) -> list[tuple[int, int]]:
    """Every write the engine hands to ``vm.write``, as (gpa, size)."""
    seen: list[tuple[int, int]] = []
    eng.vm.on_write(lambda gpa, size, rip: seen.append((gpa, size)))
    return seen


VALUE = 0x1122334455667788


def value_bytes(size: int) -> bytes:
    return VALUE.to_bytes(8, "little")[:size] if size <= 8 else VALUE.to_bytes(8, "little") * (size // 8)


# ---------------------------------------------------------------- crash isolation
_ISOLATED = textwrap.dedent(
    """
    import json, sys
    from sppkit.engines.unicorn import UnicornEngine
    from sppkit.guests import GuestImage, Segment
    from sppkit.policy import Policy
    spec = json.load(sys.stdin)
    image = GuestImage(segments=[Segment(g, bytes.fromhex(d), len(d) // 2, f) for g, d, f in spec["segments"]],
                       entry=spec["entry"])
    eng = UnicornEngine(image, policy=Policy.from_ranges([tuple(r) for r in spec["ranges"]], spec["decision"]),
                        ram_size=spec["ram"], timeout=20.0)
    writes = []
    eng.vm.on_write(lambda gpa, size, rip: writes.append((gpa, size)))
    r = eng.run()
    print(json.dumps({
        "stop_reason": r.stop_reason, "exit_code": r.exit_code, "rip_at": r.rip_at, "writes": writes,
        "violations": [(v.gpa, v.size, v.decision) for v in r.violations],
        "mem": {str(g): eng.vm.read(g, n).hex() for g, n in spec["read"]},
    }))
    """
)


def _run_isolated(asm: Asm, ranges, decision: str, read: list[tuple[int, int]]) -> dict:
    """Run a flat guest under the Unicorn engine in a child process; fail (not crash)
    if the engine takes the interpreter down."""
    image = flat_guest(asm)
    spec = {
        "segments": [(s.gpa, s.data.hex(), s.flags) for s in image.segments], "entry": image.entry,
        "ranges": [list(r) for r in ranges], "decision": decision, "ram": RAM, "read": read,
    }
    p = subprocess.run([sys.executable, "-c", _ISOLATED], input=json.dumps(spec), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, (
        f"the Unicorn engine crashed the interpreter (exit status {p.returncode}):\n{p.stderr[-2000:]}"
    )
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["mem"] = {int(k): bytes.fromhex(v) for k, v in out["mem"].items()}
    out["writes"] = [tuple(w) for w in out["writes"]]
    out["violations"] = [tuple(v) for v in out["violations"]]
    return out


# ======================================================================= decisions
class TestAllowedWriteLands:
    """A write to a writable sub-page of a protected page goes through vm.write (the
    page is read-only in Unicorn), lands, and the guest goes on."""

    def test_bytes_land_and_execution_continues(self):
        a = Asm()
        a.mov_imm(Register.RAX, VALUE)
        a.store(8, DATA + 5 * SUB)  # sub-page 5: writable; sub-page 0 is protected
        a.store_mark()
        a.exit(7)
        eng = engine(a, [(DATA, SUB)])
        seen = writes_seen(eng)
        r = eng.run()
        assert r.stop_reason == "exit" and r.exit_code == 7
        assert eng.vm.read(DATA + 5 * SUB, 8) == value_bytes(8)
        assert eng.vm.read(MARK, 1) == b"\x01"
        assert seen == [(DATA + 5 * SUB, 8)], "the write to the protected page must reach vm.write"
        assert r.violations == []

    def test_emulate_commits_a_denied_write(self):
        a = Asm()
        a.mov_imm(Register.RAX, VALUE)
        i = a.store(4, DATA + 0x10)
        a.store_mark()
        a.exit(0)
        eng = engine(a, [(DATA, SUB)], "emulate")
        r = eng.run()
        assert r.stop_reason == "exit" and r.exit_code == 0
        assert eng.vm.read(DATA + 0x10, 4) == value_bytes(4)
        assert eng.vm.read(MARK, 1) == b"\x01"
        [v] = r.violations
        assert (v.gpa, v.size, v.decision, v.rip_at) == (DATA + 0x10, 4, "emulate", a.address(i))


class TestSkipDiscards:
    """SKIP: nothing of the write lands; the guest goes on with the next instruction."""

    def test_write_discarded_execution_continues(self):
        a = Asm()
        a.mov_imm(Register.RAX, VALUE)
        i = a.store(8, DATA + 0x40)
        a.store_mark()
        a.exit(3)
        eng = engine(a, [(DATA, SUB)], "skip")
        r = eng.run()
        assert r.stop_reason == "exit" and r.exit_code == 3
        assert eng.vm.read(DATA + 0x40, 8) == before(DATA + 0x40, 8)
        assert eng.vm.read(MARK, 1) == b"\x01"
        [v] = r.violations
        assert (v.gpa, v.size, v.decision) == (DATA + 0x40, 8, "skip")
        assert v.rip_at == a.address(i)
        assert v.instruction.startswith("mov")
        assert bytes.fromhex(v.data) == value_bytes(8) and bytes.fromhex(v.old) == before(DATA + 0x40, 8)

    def test_rep_stosb_is_decided_per_byte(self):
        """A string store is one write per iteration: the bytes in the writable sub-page
        land, those in the protected one do not."""
        a = Asm()
        a.mov_imm(Register.RDI, DATA + SUB - 16)
        a.mov_imm(Register.RCX, 32)
        a.mov_imm(Register.RAX, 0x41)
        a.rep_stosb()
        a.exit(0)
        eng = engine(a, [(DATA + SUB, SUB)], "skip")  # sub-page 1 protected
        r = eng.run()
        assert r.stop_reason == "exit"
        assert eng.vm.read(DATA + SUB - 16, 16) == b"A" * 16
        assert eng.vm.read(DATA + SUB, 16) == before(DATA + SUB, 16)
        assert [(v.gpa, v.size) for v in r.violations] == [(DATA + SUB + k, 1) for k in range(16)]


class TestStop:
    """STOP is the SPP-induced EPT violation itself: the run ends with RIP at the
    writing instruction, which has not retired; memory is untouched."""

    def test_flat_guest(self):
        a = Asm()
        a.mov_imm(Register.RAX, VALUE)
        a.store(8, DATA + 5 * SUB)  # allowed, lands
        i = a.store(8, DATA + 0x20)  # denied: STOP
        a.store_mark()
        a.exit(0)
        eng = engine(a, [(DATA, SUB)], "stop")
        r = eng.run()
        assert r.stop_reason == "stop-decision"
        assert r.rip_at == a.address(i)
        assert r.exit_code is None
        assert eng.uc.reg_read(UC_X86_REG_RIP) == a.address(i), "the faulting instruction must not retire"
        assert eng.vm.read(DATA + 0x20, 8) == before(DATA + 0x20, 8)
        assert eng.vm.read(DATA + 5 * SUB, 8) == value_bytes(8)
        assert eng.vm.read(MARK, 1) == before(MARK, 1), "the instruction after the STOP ran"
        [v] = r.violations
        assert (v.gpa, v.size, v.decision, v.rip_at) == (DATA + 0x20, 8, "stop", a.address(i))

    def test_push_does_not_retire(self):
        """A STOPped push leaves RSP as it was."""
        a = Asm()
        a.mov_imm(Register.RSP, DATA + 2 * SUB)
        a.mov_imm(Register.RAX, VALUE)
        i = a.push_rax()  # writes sub-page 1
        a.exit(0)
        eng = engine(a, [(DATA + SUB, SUB)], "stop")
        r = eng.run()
        assert r.stop_reason == "stop-decision" and r.rip_at == a.address(i)
        assert eng.uc.reg_read(UC_X86_REG_RSP) == DATA + 2 * SUB
        assert eng.vm.read(DATA + 2 * SUB - 8, 8) == before(DATA + 2 * SUB - 8, 8)

    def test_rep_stosb_stops_at_the_denied_iteration(self):
        """The iterations before the denied byte retired (their bytes landed, RCX/RDI
        moved); the denied iteration did not: RIP is at the rep instruction."""
        a = Asm()
        a.mov_imm(Register.RDI, DATA + SUB - 16)
        a.mov_imm(Register.RCX, 32)
        a.mov_imm(Register.RAX, 0x41)
        i = a.rep_stosb()
        a.exit(0)
        eng = engine(a, [(DATA + SUB, SUB)], "stop")
        r = eng.run()
        assert r.stop_reason == "stop-decision" and r.rip_at == a.address(i)
        assert eng.vm.read(DATA + SUB - 16, 16) == b"A" * 16
        assert eng.vm.read(DATA + SUB, 16) == before(DATA + SUB, 16)
        assert eng.uc.reg_read(UC_X86_REG_RDI) == DATA + SUB
        assert eng.uc.reg_read(UC_X86_REG_RCX) == 16

    def test_sse_store_straddling_an_allowed_and_a_denied_subpage(self):
        a = Asm()
        a.movdqu_load(CODE)
        i = a.movdqu_store(DATA + SUB - 8)  # 8 bytes in sub-page 0 (writable), 8 in sub-page 1 (protected)
        a.exit(0)
        eng = engine(a, [(DATA + SUB, SUB)], "stop")
        r = eng.run()
        assert r.stop_reason == "stop-decision" and r.rip_at == a.address(i)
        assert eng.vm.read(DATA + SUB - 8, 16) == before(DATA + SUB - 8, 16)

    @needs_gcc
    def test_elf_guest_rip_at_is_the_store_in_main(self):
        """selftest with protected_page STOPped: rip_at is an instruction boundary of the
        ELF's code, inside main, and that instruction is the 4-byte store."""
        image = load_elf(build_guest("selftest"))
        page = image.symbol("protected_page").addr
        eng = UnicornEngine(image, policy=Policy.from_ranges([(page, PAGE)], "stop"), ram_size=RAM)
        r = eng.run()
        assert r.stop_reason == "stop-decision"
        main = image.symbol("main")
        assert main.addr <= r.rip_at < main.addr + main.size
        text = image.segment_at(main.addr)
        starts = {i.ip: i for i in iced_x86.Decoder(64, text.data, ip=text.gpa)}
        assert r.rip_at in starts, "rip_at is not an instruction boundary of the ELF's code"
        writes = [m for m in iced_x86.InstructionInfoFactory().info(starts[r.rip_at]).used_memory()
                  if m.access == iced_x86.OpAccess.WRITE]
        assert [iced_x86.MemorySizeInfo(m.memory_size).size for m in writes] == [4]
        assert eng.uc.reg_read(UC_X86_REG_RIP) == r.rip_at
        assert eng.vm.read(page, PAGE) == bytes(PAGE)
        assert "writes stuck" not in r.console
        [v] = r.violations
        assert (v.gpa, v.size, v.rip_at, v.symbol) == (page, 4, r.rip_at, "protected_page")


class TestHandlerExceptions:
    """An exception raised inside a callback of the write path is re-raised from
    run(): never swallowed at the C boundary, never turned into a decision."""

    class Boom(Exception):
        pass

    def _guest(self):
        a = Asm()
        a.mov_imm(Register.RAX, VALUE)
        a.store(8, DATA)
        a.store_mark()
        a.exit(0)
        return a

    def test_violation_handler(self):
        eng = engine(self._guest(), [(DATA, SUB)])

        def handler(ev):
            raise self.Boom(f"handler saw gpa={ev.gpa:#x}")

        eng.vm.on_violation(handler)
        with pytest.raises(self.Boom, match=f"gpa={DATA:#x}"):
            eng.run()
        assert eng.vm.read(MARK, 1) == before(MARK, 1)
        assert eng.vm.read(DATA, 8) == before(DATA, 8)

    def test_handler_returning_a_non_decision(self):
        eng = engine(self._guest(), [(DATA, SUB)])
        eng.vm.on_violation(lambda ev: "skip")
        with pytest.raises(TypeError, match="Decision"):
            eng.run()

    def test_write_observer(self):
        eng = engine(self._guest(), [(DATA, SUB)])

        def observer(gpa, size, rip):
            raise self.Boom("observer")

        eng.vm.on_write(observer)
        with pytest.raises(self.Boom):
            eng.run()

    def test_handler_decision_is_used(self):
        """The control case: a handler returning a Decision decides."""
        eng = engine(self._guest(), [(DATA, SUB)], "skip")
        eng.vm.on_violation(lambda ev: Decision.EMULATE)
        r = eng.run()
        assert r.stop_reason == "exit"
        assert eng.vm.read(DATA, 8) == value_bytes(8)


# ======================================================================= one access, counted once
UNALIGNED = [  # (size, offset in a protected page): unaligned, many crossing a sub-page boundary
    (2, 0x7F), (4, 0x7E), (4, 0x7D), (8, 0x7C), (8, 0x79), (8, 0x101), (4, 0x3), (2, 0x1), (8, 0xF7F),
]


class TestUnalignedCountedOnce:
    """Unicorn re-reports an unaligned store byte by byte after the whole access; the
    engine must hand the store to vm.write exactly once, as one access."""

    @pytest.mark.parametrize("decision", ["skip", "emulate"])
    @pytest.mark.parametrize(("size", "off"), UNALIGNED)
    def test_denied(self, size, off, decision):
        a = Asm()
        a.mov_imm(Register.RAX, VALUE)
        i = a.store(size, DATA + off)
        a.exit(0)
        # every sub-page the store touches is protected
        lo, hi = (off // SUB) * SUB, -(-(off + size) // SUB) * SUB
        eng = engine(a, [(DATA + lo, hi - lo)], decision)
        seen = writes_seen(eng)
        r = eng.run()
        assert seen == [(DATA + off, size)]
        assert [(v.gpa, v.size, v.rip_at) for v in r.violations] == [(DATA + off, size, a.address(i))]
        assert r.stats["writes"] == 1 and r.stats["violations"] == 1
        assert r.exits.get("WriteProt") == 1
        want = value_bytes(size) if decision == "emulate" else before(DATA + off, size)
        assert eng.vm.read(DATA + off - 1, size + 2) == before(DATA + off - 1, 1) + want + before(DATA + off + size, 1)

    @pytest.mark.parametrize(("size", "off"), UNALIGNED)
    def test_allowed(self, size, off):
        """Same store, into writable sub-pages of a protected page."""
        a = Asm()
        a.mov_imm(Register.RAX, VALUE)
        a.store(size, DATA + off)
        a.exit(0)
        eng = engine(a, [(DATA + 0x800, SUB)])
        seen = writes_seen(eng)
        r = eng.run()
        assert seen == [(DATA + off, size)]
        assert r.violations == []
        assert eng.vm.read(DATA + off, size) == value_bytes(size)

    def test_mixed_subpages_denied_as_a_whole(self):
        """An 8-byte store touching a writable and a protected sub-page is denied as a
        whole (every touched sub-page must be writable): none of its bytes land."""
        a = Asm()
        a.mov_imm(Register.RAX, VALUE)
        a.store(8, DATA + SUB - 4)
        a.exit(0)
        eng = engine(a, [(DATA + SUB, SUB)])  # sub-page 0 writable, 1 protected
        seen = writes_seen(eng)
        r = eng.run()
        assert seen == [(DATA + SUB - 4, 8)]
        [v] = r.violations
        assert (v.subpages, v.denied) == ((0, 1), (1,))
        assert eng.vm.read(DATA + SUB - 4, 8) == before(DATA + SUB - 4, 8)


# A page-crossing store from page A = DATA+0x1000 into page B = DATA+0x2000.  Each page
# is "unprot" (no protected sub-page: writable in Unicorn), "allow" (a protected page,
# but the touched sub-page is writable) or "deny" (the touched sub-page is protected).
PAGE_A, PAGE_B = DATA + PAGE, DATA + 2 * PAGE


def crossing_ranges(kind_a: str, kind_b: str) -> list[tuple[int, int]]:
    ranges = []
    for base, kind, edge in ((PAGE_A, kind_a, PAGE - SUB), (PAGE_B, kind_b, 0)):
        if kind == "allow":
            ranges.append((base + 0x400, SUB))  # protected, away from the store
        elif kind == "deny":
            ranges.append((base + edge, SUB))  # the sub-page the store touches
    return ranges


def crossing_guest(size: int, *, then_jump: bool = True) -> tuple[Asm, int, int]:
    """``size`` bytes across the A/B boundary, half on each page; then (in a new
    translation block) a marker store; exit."""
    a = Asm()
    a.mov_imm(Register.RAX, VALUE)
    addr = PAGE_B - size // 2
    i = a.store(size, addr)
    if then_jump:
        a.jmp_next()
    a.store_mark()
    a.mov_imm(Register.RBX, 0)
    a.exit(0)
    return a, i, addr


_UNICORN_CROSSING_BUG = (
    "BUG: unicorn.py _hook_write_prot: a page-crossing store whose first page is writable in Unicorn "
    "(no protected sub-page) is never reported as one access: Unicorn stores the first page's bytes itself, "
    "then reports the second page's bytes one by one (size 1 each, no covering whole access, so the "
    "dedupe does not apply): vm.write is called once per byte of page B and, when that is denied, the "
    "page-A half has already landed"
)
_UNICORN_RESTORE_BUG = (
    "BUG: unicorn.py _protect_other_half/_arm_code_hook/_hook_next: after a denied (SKIP) store crossing "
    "into a page that is writable in Unicorn, Unicorn itself stores the writable page's half; the engine "
    "restores it from a UC_HOOK_CODE armed mid-block (plus ctl_flush_tb), which either never runs before "
    "the guest exits (the half stays written) or runs and deletes itself with uc.hook_del while Unicorn "
    "keeps calling it for the rest of the translation block: the Python binding has freed the ctypes "
    "callback, and the interpreter dies (SIGSEGV/SIGILL); without the flush the second call raises "
    "TypeError from hook_del(None)"
)


class TestPageCrossing:
    """A page-crossing store is one access (README: "one access, decided for both pages
    before any byte lands"): vm.write sees it once; a discarded one leaves both pages
    unchanged; an allowed one lands whole."""

    @pytest.mark.parametrize("size", [2, 4, 8])
    @pytest.mark.parametrize(("kind_a", "kind_b"), [
        ("deny", "deny"), ("allow", "deny"), ("deny", "allow"), ("allow", "allow"),
    ])
    @pytest.mark.parametrize("decision", ["skip", "emulate"])
    def test_both_pages_protected(self, kind_a, kind_b, size, decision):
        a, i, addr = crossing_guest(size)
        eng = engine(a, crossing_ranges(kind_a, kind_b), decision)
        seen = writes_seen(eng)
        r = eng.run()
        assert r.stop_reason == "exit"
        assert seen == [(addr, size)], "one access, handed to vm.write once"
        denied = "deny" in (kind_a, kind_b)
        lands = not denied or decision == "emulate"
        assert eng.vm.read(addr - 2, size + 4) == (
            before(addr - 2, 2) + (value_bytes(size) if lands else before(addr, size)) + before(addr + size, 2))
        # vm.write's records are per page: SKIP stops at the first denied page, EMULATE decides both.
        pieces = [(addr, size // 2, kind_a), (PAGE_B, size // 2, kind_b)]
        want = [(g, n) for g, n, k in pieces if k == "deny"]
        if decision == "skip":
            want = want[:1]
        assert [(v.gpa, v.size) for v in r.violations] == want
        assert all(v.rip_at == a.address(i) for v in r.violations)
        assert eng.vm.read(MARK, 1) == b"\x01"

    @pytest.mark.parametrize("size", [2, 4, 8])
    @pytest.mark.parametrize(("kind_a", "kind_b"), [
        ("deny", "unprot"), ("allow", "unprot"), ("unprot", "deny"), ("unprot", "allow"),
    ])
    @pytest.mark.parametrize("decision", ["skip", "emulate"])
    def test_one_page_unprotected(self, kind_a, kind_b, size, decision):
        a, i, addr = crossing_guest(size)
        out = _run_isolated(a, crossing_ranges(kind_a, kind_b), decision, [(addr - 2, size + 4), (MARK, 1)])
        assert out["stop_reason"] == "exit"
        assert out["writes"] == [(addr, size)], "one access, handed to vm.write once"
        lands = "deny" not in (kind_a, kind_b) or decision == "emulate"
        assert out["mem"][addr - 2] == (
            before(addr - 2, 2) + (value_bytes(size) if lands else before(addr, size)) + before(addr + size, 2))
        half = size // 2
        want = [(addr, half, decision)] if kind_a == "deny" else [(PAGE_B, half, decision)] if kind_b == "deny" else []
        assert out["violations"] == want
        assert out["mem"][MARK] == b"\x01"


# ======================================================================= console, exit, CPL
class TestConsoleAndExit:
    """Port 0xE9 is the console (one byte per out), port 0xF4 ends the run with the
    value written as the exit code."""

    def test_flat_guest(self):
        a = Asm()
        for ch in "hi sppkit\n":
            a.putc(ch)
        a.exit(0xC0DE)
        r = engine(a).run()
        assert r.console == "hi sppkit\n"
        assert r.stop_reason == "exit" and r.exit_code == 0xC0DE
        assert r.exits.get("Io") == 11

    def test_exit_code_is_32_bits(self):
        a = Asm()
        a.exit(0xDEADBEEF)
        r = engine(a).run()
        assert r.exit_code == 0xDEADBEEF

    @needs_gcc
    @pytest.mark.parametrize("name", list_programs())
    def test_bundled_programs_exit_through_the_port(self, name):
        """Every bundled program ends by its exit port, with console output and, without
        a policy, no violation (selftest, mixed, readback return 0 then)."""
        r = UnicornEngine(load_elf(build_guest(name)), ram_size=RAM).run()
        assert r.stop_reason == "exit" and isinstance(r.exit_code, int), r.console[-300:]
        assert r.violations == [] and r.console
        if name in ("selftest", "mixed", "readback"):
            assert r.exit_code == 0 and r.console.startswith(f"{name}: ")

    @needs_gcc
    def test_readback_exit_code_counts_discarded_writes(self):
        """readback returns the number of its writes that did not stick; with sub-pages
        16-17 of its first page protected (SKIP) that is every probe touching them."""
        image = load_elf(build_guest("readback"))
        target = image.symbol("target").addr
        r = UnicornEngine(image, policy=Policy.from_ranges([(target + 0x800, 0x100)]), ram_size=RAM).run()
        want = sum(1 for off, size in _readback_stores() if _touches(off, size, 0x800, 0x900))
        assert want == 17
        assert r.stop_reason == "exit" and r.exit_code == want
        assert len(r.violations) == want
        assert f"{1024 - want} stuck, {want} did not stick" in r.console

    @needs_gcc
    def test_mixed_with_example_policy(self):
        """examples/mixed.toml protects secret, config and canary: every one of the
        guest's protected writes is a violation, SKIPped, and the values stay."""
        image = load_elf(build_guest("mixed"))
        eng = UnicornEngine(image, policy=load_policy(MIXED_POLICY, image), ram_size=RAM)
        secret = image.symbol("secret")
        initial = eng.vm.read(secret.addr, secret.size)
        r = eng.run()
        assert r.stop_reason == "exit" and r.exit_code == 0
        assert "protected writes = 44" in r.console
        assert len(r.violations) == 44
        assert Counter(v.symbol.split("+")[0] for v in r.violations) == {"secret": 32, "config": 8, "canary": 4}
        assert {v.decision for v in r.violations} == {"skip"}
        assert eng.vm.read(secret.addr, secret.size) == initial


def _readback_stores() -> list[tuple[int, int]]:
    """(offset in target, size) of every store readback.c makes, in order."""
    probes = [(0, 1), (2, 2), (4, 4), (8, 8), (17, 2), (21, 4), (35, 8), (124, 8)]
    out = []
    for sp in range(4 * 32):
        for off, size in probes:
            o = sp * SUB + off
            if o + size > 4 * PAGE:
                o, size = 4 * PAGE - 8, 4
            out.append((o, size))
    return out


def _touches(off: int, size: int, lo: int, hi: int) -> bool:
    return off < hi and lo < off + size


class TestCpl:
    """Guests run at CPL 0 or 3 (IOPL 3, so `out` works at both); the write path is
    the same at both."""

    @pytest.mark.parametrize("cpl", [0, 3])
    def test_cpl_and_decisions(self, cpl):
        a = Asm()
        a.mov_imm(Register.RAX, VALUE)
        a.store(8, DATA)  # denied, SKIP
        a.store(8, DATA + SUB)  # allowed
        a.putc("k")
        a.cs_to_eax()
        a.exit_eax()
        eng = engine(a, [(DATA, SUB)], cpl=cpl)
        r = eng.run()
        assert r.stop_reason == "exit"
        assert r.exit_code & 3 == cpl, f"CS={r.exit_code:#x}"
        assert r.console == "k"
        assert eng.vm.read(DATA, 8) == before(DATA, 8)
        assert eng.vm.read(DATA + SUB, 8) == value_bytes(8)
        assert [(v.gpa, v.size) for v in r.violations] == [(DATA, 8)]

    @needs_gcc
    @pytest.mark.parametrize("cpl", [0, 3])
    def test_selftest(self, cpl):
        image = load_elf(build_guest("selftest"))
        page = image.symbol("protected_page").addr
        r = UnicornEngine(image, policy=Policy.from_ranges([(page, PAGE)]), ram_size=RAM, cpl=cpl).run()
        assert r.exit_code == 0 and "0/32 writes stuck, 32 blocked" in r.console
        assert [(v.gpa, v.size) for v in r.violations] == [(page + k * SUB, 4) for k in range(32)]

    def test_bad_cpl(self):
        with pytest.raises(ValueError, match="cpl"):
            engine(Asm(), cpl=1)


# ======================================================================= access maps changed later
class TestAccessMapsChangedAfterConstruction:
    """Access maps set through the Vm API after the engine was built are projected
    onto Unicorn's page protections before the guest runs, and while it runs."""

    def test_set_subpage_access_before_run_is_enforced(self):
        a = Asm()
        a.mov_imm(Register.RAX, VALUE)
        a.store(8, DATA + 0x10)
        a.exit(0)
        eng = engine(a)
        eng.vm.set_subpage_access(DATA >> 12, [0xFFFFFFFE])  # sub-page 0 of the first data page
        r = eng.run()
        assert [(v.gpa, v.size) for v in r.violations] == [(DATA + 0x10, 8)]
        assert eng.vm.read(DATA + 0x10, 8) == before(DATA + 0x10, 8)

    def test_change_in_a_handler_is_enforced(self):
        """The control case: maps changed while running (from a violation handler) are
        projected at once."""
        a = Asm()
        a.mov_imm(Register.RAX, VALUE)
        a.store(8, DATA)  # violation: the handler protects sub-page 0 of the next page too
        a.store(8, DATA + PAGE + 8)
        a.exit(0)
        eng = engine(a, [(DATA, SUB)])

        def handler(ev):
            eng.vm.set_subpage_access((DATA + PAGE) >> 12, [0xFFFFFFFE])
            return Decision.SKIP

        eng.vm.on_violation(handler)
        r = eng.run()
        assert r.exit_code == 0
        assert eng.vm.read(DATA + PAGE + 8, 8) == before(DATA + PAGE + 8, 8)


class TestDecisionLookup:
    """The decision is the policy's for the protected sub-page the write hit, which
    need not hold the write's first byte."""

    @pytest.mark.parametrize("decision", ["emulate", "stop"])
    def test_store_running_into_a_protected_subpage_gets_the_policy_decision(self, decision):
        a = Asm()
        a.mov_imm(Register.RAX, VALUE)
        a.store(8, DATA + SUB - 4)  # sub-page 0 (writable) into sub-page 1 (protected)
        a.exit(0)
        eng = engine(a, [(DATA + SUB, SUB)], decision)
        r = eng.run()
        assert [v.decision for v in r.violations] == [decision]
        lands = decision == "emulate"
        assert eng.vm.read(DATA + SUB - 4, 8) == (value_bytes(8) if lands else before(DATA + SUB - 4, 8))
        assert r.stop_reason == ("exit" if lands else "stop-decision")


# ======================================================================= CLI
@pytest.fixture
def runner():
    return CliRunner()


def test_doctor_names_every_component(runner):
    r = runner.invoke(cli_main, ["doctor"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for word in ("KVM", "Unicorn", "C hook trampoline", "gcc", "valgrind"):
        assert word in r.stdout, f"`sppkit doctor` does not mention {word}:\n{r.stdout}"
    ok, why = native_status()
    line = next(ln for ln in r.stdout.splitlines() if "C hook trampoline" in ln)
    assert ("ok" if ok else "unavailable") in line, line


@needs_gcc
class TestRunJson:
    """`sppkit run --engine unicorn --json`: one JSON object, the RunResult shape."""

    KEYS = {"engine", "exit_code", "console", "stop_reason", "rip_at", "rip_after", "stats", "exits", "violations",
            "violations_total"}
    RECORD_KEYS = {"gpa", "size", "subpages", "denied", "decision", "data", "rip_at", "rip_after", "instruction",
                   "symbol", "old"}

    def test_exit(self, runner):
        r = runner.invoke(cli_main, ["run", "--engine", "unicorn", "--json", "--memory", "16M", "selftest"])
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)
        assert self.KEYS <= set(doc)
        assert (doc["engine"], doc["stop_reason"], doc["exit_code"]) == ("unicorn", "exit", 0)
        assert "32/32 writes stuck" in doc["console"]
        assert doc["violations"] == [] and doc["violations_total"] == 0

    def test_stop(self, runner):
        image = load_elf(build_guest("selftest"))
        page = image.symbol("protected_page").addr
        r = runner.invoke(cli_main, ["run", "--engine", "unicorn", "--json", "--memory", "16M",
                                     "--protect", f"{page:#x}:4096", "--decision", "stop", "selftest"])
        assert r.exit_code == 1, r.output  # the run did not end by the guest's exit
        doc = json.loads(r.stdout)
        assert self.KEYS <= set(doc)
        assert doc["stop_reason"] == "stop-decision"
        assert isinstance(doc["rip_at"], int) and doc["rip_after"] is None
        [v] = doc["violations"]
        assert self.RECORD_KEYS <= set(v)
        assert (v["gpa"], v["size"], v["decision"], v["rip_at"]) == (page, 4, "stop", doc["rip_at"])
        assert v["rip_after"] is None


class TestPauseFromAPortHandler:
    """A port handler that returns "pause" stops the run right after its ``out``, as
    KVM does: the instructions after it have not run (Unicorn's emu_stop() ends only
    the translated block, so the engine holds back every store still on the way), and
    a resumed run executes each of them once."""

    PORT = 0xF6

    def _guest(self, target: int) -> tuple[Asm, int]:
        a = Asm()
        a.mov_imm(Register.RAX, 0x41)
        out = a._add(Ins.create_u32_reg(Code.OUT_IMM8_AL, self.PORT, Register.AL))
        a.store(1, target)
        a.store_mark()
        a.exit(0)
        return a, out

    @pytest.mark.parametrize("protect", [False, True], ids=["writable-page", "page-protected-by-the-handler"])
    def test_nothing_after_the_out_runs_before_the_pause(self, protect):
        target = DATA + 0x40
        a, out = self._guest(target)
        eng = engine(a)

        def handler(e, value):
            if protect:
                e.apply_policy(Policy.from_ranges([(target, 1)], "skip"))
            return "pause"

        eng.add_port_handler(self.PORT, handler)
        r = eng.run()
        assert r.stop_reason == "paused" and r.rip_at == a.address(out + 1), "stops right after the out"
        assert eng.vm.read(target, 1) == before(target, 1) and eng.vm.read(MARK, 1) == before(MARK, 1)
        assert r.violations == [] and eng.vm.stats()["writes"] == 0
        r = eng.run()
        assert r.stop_reason == "exit" and eng.vm.read(MARK, 1) == b"\x01"
        if protect:  # decided once, on the resumed run: skipped
            assert [v.gpa for v in r.violations] == [target] and eng.vm.read(target, 1) == before(target, 1)
        else:
            assert r.violations == [] and eng.vm.read(target, 1) == b"\x41"

    def test_a_denied_store_after_the_pause_never_lands(self):
        """A STOP policy installed by the handler: the store after the out is stopped
        on the resumed run, before it retires; its byte never reaches memory."""
        target = DATA + 0x80
        a, out = self._guest(target)
        eng = engine(a)
        eng.vm.write(target, b"\x11")  # the page was written before (a warm mapping)

        def handler(e, value):
            e.policy = Policy.from_ranges([(target, 1)], "stop")
            e.apply_policy(e.policy)
            return "pause"

        eng.add_port_handler(self.PORT, handler)
        assert eng.run().stop_reason == "paused"
        r = eng.run()
        assert r.stop_reason == "stop-decision" and r.rip_at == a.address(out + 1)
        assert eng.vm.read(target, 1) == b"\x11" and len(r.violations) == 1
