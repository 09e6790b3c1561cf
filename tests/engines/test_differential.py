"""Differential tests: the KVM and Unicorn engines agree.

Both engines hand every write to a write-protected page to ``vm.write``; for the same
guest under the same policy they must end with the same guest memory, console
output, exit code and violations.  Compared here:

* every bundled guest program (``sppkit.guests.list_programs()``) under the policies
  the tests use (none; ``examples/mixed.toml`` for mixed; the whole
  ``protected_page`` for selftest; a few ranges of ``target`` for readback; the
  kernel's critical structures for minikernel; and, for every program, sub-page 31
  of each data page with EMULATE), with skip / emulate / stop decisions;
* generated guests (hypothesis + iced-x86): random stores of 1-16 bytes, aligned and
  not, string stores, push/call, under random access maps — checked against a model
  computed here, and the engines against each other.

The KVM half runs only where ``kvm_status()`` says KVM is usable; elsewhere it is
skipped with the reason.  The Unicorn half (and the model) always runs.

Known, documented differences (README, "Two engines, one write path"), compared
explicitly in :class:`TestPageCrossingFragments` and :func:`test_readback_crossing_fragment`:

* a page-crossing store reaches KVM as two MMIO exits, one per page, each decided on
  its own (the instruction has already retired); Unicorn reports one access that
  ``vm.write`` decides for both pages before any byte lands.  So violation records
  are compared as per-page pieces, and where one page allows and the other denies
  (SKIP/STOP), KVM commits the allowed page's half and Unicorn commits nothing;
* when both pages deny under SKIP, ``vm.write`` stops at the first page (one record)
  under Unicorn, while KVM's second exit is a second record.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import iced_x86
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from iced_x86 import Code, MemoryOperand, Register
from iced_x86 import Instruction as Ins

from sppkit.engines.kvm.binding import kvm_status
from sppkit.engines.unicorn import UnicornEngine
from sppkit.guests import GuestImage, Segment, build_guest, list_programs, load_elf
from sppkit.policy import Policy, load_policy, parse_policy
from engine_helpers import MIXED_POLICY, PAGE, RAM, SUB, needs_gcc

TIMEOUT = 60.0

KVM_OK, KVM_WHY = kvm_status()


def skip_without_kvm() -> None:
    if not KVM_OK:
        pytest.skip(f"KVM half skipped: KVM is not usable here: {KVM_WHY}")


# ---------------------------------------------------------------- running an engine
@dataclass
class Outcome:
    engine: str
    stop_reason: str
    exit_code: int | None
    console: str
    violations: list  # ViolationRecord
    memory: dict[int, bytes]  # gpa -> bytes of each compared region
    rip_at: int | None


def run(engine: str, image: GuestImage, policy: Policy | None, regions: list[tuple[int, int]],
        setup: Callable | None = None) -> Outcome:
    """Run ``image`` under ``engine`` ("unicorn" or "kvm") and read ``regions`` after."""
    if engine == "kvm":
        skip_without_kvm()
        from sppkit.engines.kvm.engine import KvmEngine as cls
    else:
        cls = UnicornEngine
    eng = cls(image, policy=policy, ram_size=RAM, timeout=TIMEOUT)
    try:
        if setup is not None:
            setup(eng)
        r = eng.run()
        memory = {g: eng.vm.read(g, n) for g, n in regions}
    finally:
        eng.close()
    return Outcome(engine, r.stop_reason, r.exit_code, r.console, list(r.violations), memory, r.rip_at)


def pieces(violations) -> list[tuple[int, int, str]]:
    """Violation records as per-page ``(gpa, size, decision)`` pieces, in order: a
    page-crossing access counts as its two page fragments whichever engine saw it, and
    a 16-byte vector store that KVM delivers as two 8-byte exits (Unicorn decides it
    whole) counts as one piece: consecutive 8-byte records with one decision that
    continue each other on the same page, made by the same instruction, are merged (up
    to 16 bytes; KVM's RIP for the first half of such a store is not yet past it, so RIPs
    cannot tell them apart — the instruction's text can: an 8-byte `mov` followed by a
    `movdqu` just after it are not one store).  Both engines' lists go through the same
    normalisation."""
    out, last_key = [], None
    for v in violations:
        gpa, size = v.gpa, v.size
        key = (v.decision, v.instruction)
        if out and key == last_key and out[-1][0] + out[-1][1] == gpa and (out[-1][0] >> 12) == (gpa >> 12) \
                and out[-1][1] == 8 and v.size == 8:
            g, n, d = out.pop()
            gpa, size = g, n + size
        while size:
            n = min(size, PAGE - (gpa & (PAGE - 1)))
            out.append((gpa, n, v.decision))
            gpa, size = gpa + n, size - n
        last_key = key
    return out


def describe_diff(a: bytes, b: bytes, base: int, image: GuestImage | None = None) -> str:
    diffs = [i for i in range(min(len(a), len(b))) if a[i] != b[i]]
    if not diffs:
        return f"lengths {len(a)} vs {len(b)}"
    i = diffs[0]
    where = image.describe(base + i) if image is not None else f"{base + i:#x}"
    return (f"{len(diffs)} bytes differ, first at {base + i:#x} ({where}): "
            f"{a[i:i + 16].hex()} vs {b[i:i + 16].hex()}")


def assert_agree(u: Outcome, k: Outcome, image: GuestImage | None = None) -> None:
    assert k.stop_reason == u.stop_reason
    assert k.exit_code == u.exit_code
    assert k.console == u.console
    for gpa in u.memory:
        assert k.memory[gpa] == u.memory[gpa], (
            f"final memory differs (unicorn vs kvm): {describe_diff(u.memory[gpa], k.memory[gpa], gpa, image)}")
    assert pieces(k.violations) == pieces(u.violations)


# ======================================================================= bundled programs
def _data_regions(image: GuestImage) -> list[tuple[int, int]]:
    return [(s.gpa, s.memsz) for s in image.segments if "w" in s.flags]


def _with_decision(toml: str, decision: str) -> str:
    return re.sub(r'(?m)^decision = "\w+"', f'decision = "{decision}"', toml)


def _mixed(decision):
    def make(image):
        with open(MIXED_POLICY, encoding="utf-8") as f:
            text = f.read()
        if decision == "skip":  # the file as it is
            return load_policy(MIXED_POLICY, image)
        return parse_policy(_with_decision(text, decision), source=MIXED_POLICY, image=image)
    return make


def _selftest(decision):
    return lambda image: Policy.from_ranges([(image.symbol("protected_page").addr, PAGE)], decision)


READBACK_RANGES = ((0x100, 0x80), (0x1800, 0x100), (0x3F80, 0x80))


def _readback(decision):
    # Pages 0, 1 and 3 of `target` protected, page 2 not.  readback's page-crossing
    # stores (page p sub-page 31 -> page p+1 sub-page 0) then touch only writable
    # sub-pages: the engines must agree exactly (the fragment case is tested below).
    def make(image):
        t = image.symbol("target").addr
        return Policy.from_ranges([(t + o, n) for o, n in READBACK_RANGES], decision)
    return make


def _minikernel(decision):
    def make(image):
        text = f'decision = "{decision}"\n' + "".join(
            f'[[protect]]\nsymbol = "{s}"\n' for s in ("idt", "syscall_table", "task3_ids", "task3_caps"))
        return parse_policy(text, image=image)
    return make


def _subpage31_emulate(image):
    """Sub-page 31 of every data page, EMULATE: every guest runs as unprotected (all
    writes land) while every store to a data page goes through vm.write."""
    return Policy.from_ranges([(p + 31 * SUB, SUB) for g, n in _data_regions(image)
                               for p in range(g & ~(PAGE - 1), g + n, PAGE)], "emulate")


SPECIFIC = {
    "mixed": {f"mixed.toml-{d}": _mixed(d) for d in ("skip", "emulate", "stop")},
    "selftest": {f"protected_page-{d}": _selftest(d) for d in ("skip", "emulate", "stop")},
    "readback": {f"ranges-{d}": _readback(d) for d in ("skip", "emulate", "stop")},
    # skip is left out: minikernel's boot fills these structures, so with the
    # protection armed from the start the guest crashes (see test_guest_fault_*).
    "minikernel": {f"critical-{d}": _minikernel(d) for d in ("emulate", "stop")},
}


def _scenarios():
    for name in list_programs():
        yield pytest.param(name, "none", None, id=f"{name}-none")
        yield pytest.param(name, "subpage31-emulate", _subpage31_emulate, id=f"{name}-subpage31-emulate")
        for label, make in SPECIFIC.get(name, {}).items():
            yield pytest.param(name, label, make, id=f"{name}-{label}")


@lru_cache(maxsize=None)
def guest(name: str) -> GuestImage:
    return load_elf(build_guest(name))


@needs_gcc
@pytest.mark.parametrize(("program", "label", "make_policy"), list(_scenarios()))
def test_bundled_program(program, label, make_policy):
    image = guest(program)
    policy = make_policy(image) if make_policy else None
    regions = _data_regions(image)
    u = run("unicorn", image, policy, regions)
    assert u.stop_reason in ("exit", "stop-decision"), u.console[-500:]
    if label == "none":
        assert u.violations == []
    if label.endswith("stop"):
        assert u.stop_reason == "stop-decision" and u.violations[-1].decision == "stop"
    k = run("kvm", image, policy, regions)
    assert_agree(u, k, image)
    if label.endswith("stop"):
        # Both name the same faulting write; KVM has also recorded RIP-after.
        assert k.violations[-1].rip_after is not None


@needs_gcc
def test_kvm_rip_at_matches_unicorn_and_the_elf():
    """KVM recovers the writing instruction from RIP-after; Unicorn knows it.  In
    mixed, `xor rdx,rsi` (48 31 f2) precedes the secret store, and f2 + the store
    also decodes as the store: only decoding forward from the function is exact."""
    image = guest("mixed")
    policy = load_policy(MIXED_POLICY, image)
    u = run("unicorn", image, policy, [])
    k = run("kvm", image, policy, [])
    text = next(s for s in image.segments if "x" in s.flags)
    starts = {i.ip for i in iced_x86.Decoder(64, text.data, ip=text.gpa)}
    assert all(v.rip_at in starts for v in u.violations)
    assert [v.rip_at for v in k.violations] == [v.rip_at for v in u.violations]


def _flat_after_f2():
    """`xor rdx,rsi` (48 31 f2) then `mov [DATA+0x10],rdx`, in a flat image (no symbols)."""
    ins = [mov_imm(Register.RSI, 5), mov_imm(Register.RDX, 7),
           Ins.create_reg_reg(Code.XOR_RM64_R64, Register.RDX, Register.RSI),
           Ins.create_mem_reg(Code.MOV_RM64_R64, _abs(DATA + 0x10), Register.RDX), *exit_ins(0)]
    return flat(ins)


def test_kvm_rip_at_without_symbols():
    image, ips = _flat_after_f2()
    policy = Policy.from_ranges([(DATA, SUB)])
    u = run("unicorn", image, policy, [])
    assert [v.rip_at for v in u.violations] == [ips[3]]
    k = run("kvm", image, policy, [])
    assert [v.rip_at for v in k.violations] == [ips[3]]


@needs_gcc
@pytest.mark.parametrize("engine", ["unicorn", "kvm"])
def test_readback_emulate_commits_every_write(engine):
    """EMULATE commits every write, including readback's probes that start in a
    writable sub-page and run into a protected one."""
    image = guest("readback")
    r = run(engine, image, _readback("emulate")(image), [])
    assert r.exit_code == 0, r.console


# ======================================================================= flat guests
CODE = 0x400000
DATA = 0x600000
NPAGES = 6
SRC = DATA + 0x80000  # read-only source for movsb/movdqu: never written, never protected
MARK = DATA + 0x40000  # unprotected page for markers


def _pattern(n: int, salt: int) -> bytes:
    return bytes(((i * 7 + salt) % 251) + 1 for i in range(n))


INIT_DATA = _pattern(NPAGES * PAGE, 3)
INIT_SRC = _pattern(PAGE, 101)
_STORE = {1: Code.MOV_RM8_R8, 2: Code.MOV_RM16_R16, 4: Code.MOV_RM32_R32, 8: Code.MOV_RM64_R64}
_STORE_IMM = {1: Code.MOV_RM8_IMM8, 2: Code.MOV_RM16_IMM16, 4: Code.MOV_RM32_IMM32, 8: Code.MOV_RM64_IMM32}
_RAX = {1: Register.AL, 2: Register.AX, 4: Register.EAX, 8: Register.RAX}


def _abs(addr: int) -> MemoryOperand:
    return MemoryOperand(displ=addr, displ_size=8)  # plain [disp32]; 4 would add an addr32 prefix


def flat(ins: list[Ins]) -> tuple[GuestImage, list[int]]:
    """The guest image and the address of every instruction."""
    enc = iced_x86.BlockEncoder(64)
    enc.add_many(ins)
    code = enc.encode(CODE)
    ips = [i.ip for i in iced_x86.Decoder(64, code, ip=CODE)]
    assert len(ips) == len(ins)
    image = GuestImage(segments=[
        Segment(CODE, code, len(code), "r-x"),
        Segment(DATA, INIT_DATA, len(INIT_DATA), "rw-"),
        Segment(SRC, INIT_SRC, len(INIT_SRC), "r--"),
    ], entry=CODE)
    return image, ips


def mov_imm(reg, value: int) -> Ins:
    return Ins.create_reg_u64(Code.MOV_R64_IMM64, reg, value & (2**64 - 1))


def exit_ins(code: int) -> list[Ins]:
    return [mov_imm(Register.RAX, code), Ins.create_u32_reg(Code.OUT_IMM8_EAX, 0xF4, Register.EAX)]


def putc(ch: str) -> list[Ins]:
    return [mov_imm(Register.RAX, ord(ch)), Ins.create_u32_reg(Code.OUT_IMM8_AL, 0xE9, Register.AL)]


VALUE = 0x1122334455667788
PAGE_A, PAGE_B = DATA + PAGE, DATA + 2 * PAGE


def crossing_ranges(kind_a: str, kind_b: str) -> list[tuple[int, int]]:
    """Page A's last sub-page / page B's first one, denied or writable (the page still
    protected through another sub-page)."""
    out = []
    for base, kind, edge in ((PAGE_A, kind_a, PAGE - SUB), (PAGE_B, kind_b, 0)):
        out.append((base + edge, SUB) if kind == "deny" else (base + 0x400, SUB))
    return out


class TestPageCrossingFragments:
    """A store across the A/B page boundary, both pages protected.

    Unicorn: one access; vm.write decides page A then page B before any byte lands —
    SKIP/STOP on either page discards the whole store, SKIP/STOP stops at the first
    denied page (one record).  KVM: the store has retired into two MMIO exits, one
    per page, each handed to vm.write on its own — a page's half lands or not by that
    page's own decision, and a STOP on page A ends the run before page B's exit.
    The two agree whenever no page allows while the other denies; where one does,
    the difference is exactly the allowed page's half (KVM has it, Unicorn not)."""

    @pytest.mark.parametrize("size", [2, 4, 8])
    @pytest.mark.parametrize(("kind_a", "kind_b"), [
        ("allow", "allow"), ("allow", "deny"), ("deny", "allow"), ("deny", "deny")])
    @pytest.mark.parametrize("decision", ["skip", "emulate", "stop"])
    def test_fragments(self, kind_a, kind_b, size, decision):
        addr = PAGE_B - size // 2
        half = size // 2
        ins = [mov_imm(Register.RAX, VALUE), Ins.create_mem_reg(_STORE[size], _abs(addr), _RAX[size]),
               Ins.create_mem_u32(Code.MOV_RM8_IMM8, _abs(MARK), 1), *exit_ins(0)]
        image, _ = flat(ins)
        policy = Policy.from_ranges(crossing_ranges(kind_a, kind_b), decision)
        regions = [(addr, size), (MARK, 1)]
        old = INIT_DATA[addr - DATA: addr - DATA + size]
        new = VALUE.to_bytes(8, "little")[:size]
        denied = [k == "deny" for k in (kind_a, kind_b)]
        frags = [(addr, half), (PAGE_B, half)]

        # Unicorn: all or nothing.
        whole = not any(denied) or decision == "emulate"
        unicorn_mem = new if whole else old
        unicorn_recs = [(g, n, decision) for (g, n), d in zip(frags, denied) if d]
        if decision != "emulate":
            unicorn_recs = unicorn_recs[:1]
        # KVM: page by page, in address order; a STOP ends the run at its page.
        kvm_mem, kvm_recs = bytearray(old), []
        for j, ((g, n), d) in enumerate(zip(frags, denied)):
            if d:
                kvm_recs.append((g, n, decision))
                if decision == "stop":
                    break
            if not d or decision == "emulate":
                kvm_mem[j * half:(j + 1) * half] = new[j * half:(j + 1) * half]
        stopped = decision == "stop" and any(denied)

        u = run("unicorn", image, policy, regions)
        assert u.memory[addr] == unicorn_mem
        assert pieces(u.violations) == unicorn_recs
        assert u.stop_reason == ("stop-decision" if stopped else "exit")
        assert u.memory[MARK] == (b"\x00" if stopped else b"\x01")

        k = run("kvm", image, policy, regions)
        assert k.memory[addr] == bytes(kvm_mem)
        assert pieces(k.violations) == kvm_recs
        assert k.stop_reason == u.stop_reason and k.memory[MARK] == u.memory[MARK]
        fragment_case = decision == "skip" and denied in ([False, True], [True, False]) or (
            decision == "stop" and denied == [False, True])
        if fragment_case:
            # The documented fragment semantics: KVM has committed the allowed page's
            # half (its own exit, decided alone) before or after the denied page's
            # exit; Unicorn, deciding the one access, has committed nothing.  (A STOP
            # on page A ends KVM's run before page B's exit: nothing differs then.)
            allowed = 0 if denied[1] else 1
            lo, hi = allowed * half, (allowed + 1) * half
            assert k.memory[addr][lo:hi] == new[lo:hi] and u.memory[addr][lo:hi] == old[lo:hi]
            assert k.memory[addr][:lo] + k.memory[addr][hi:] == u.memory[addr][:lo] + u.memory[addr][hi:]
        else:
            assert k.memory[addr] == u.memory[addr]
        if decision == "skip" and all(denied):
            # Both pages deny under SKIP: KVM's second exit is a second record.
            assert pieces(k.violations) == pieces(u.violations) + [(PAGE_B, half, "skip")]
        else:
            assert pieces(k.violations) == pieces(u.violations)


def _readback_pattern(k: int, size: int) -> int:
    """readback.c's pattern()."""
    v = (0x0101010101010101 * ((k % 0xFD) + 1)) & (2**64 - 1)
    v ^= (k * 0x9E3779B97F4A7C15) & (2**64 - 1)
    v |= 0x0101010101010101
    return v & ((1 << (8 * size)) - 1)


@needs_gcc
def test_readback_crossing_fragment():
    """readback with `target` page 0 protected through sub-page 0 (EMULATE: its writes
    land) and page 1 sub-page 0 denied (SKIP): the probe at target+0xffc, 8 bytes, is
    a page-crossing store whose page-0 half is allowed and page-1 half denied.

    KVM (documented): the page-0 half lands, the page-1 half is dropped.  Unicorn:
    nothing lands.  Everything else agrees: the same 9 writes do not stick, the same
    violations, the same console but for the `read` value of that one probe."""
    image = guest("readback")
    t = image.symbol("target").addr
    policy = parse_policy(
        f'[[protect]]\nstart = {t:#x}\nlength = 128\ndecision = "emulate"\n'
        f'[[protect]]\nstart = {t + PAGE:#x}\nlength = 128\ndecision = "skip"\n', image=image)
    regions = _data_regions(image)
    u = run("unicorn", image, policy, regions)
    assert (u.stop_reason, u.exit_code) == ("exit", 9)
    k = run("kvm", image, policy, regions)
    assert (k.stop_reason, k.exit_code) == ("exit", 9)
    assert pieces(k.violations) == pieces(u.violations)
    assert (t + PAGE, 4, "skip") in pieces(u.violations)

    want = _readback_pattern(31 * 8 + 7, 8)  # sub-page 31 of page 0, probe 7
    cross = t + PAGE - 4
    [(seg_gpa, _)] = [r for r in regions if r[0] <= t < r[0] + r[1]]
    um, km = u.memory[seg_gpa], k.memory[seg_gpa]
    differ = [seg_gpa + i for i in range(len(um)) if um[i] != km[i]]
    assert differ == list(range(cross, cross + 4))
    assert um[cross - seg_gpa:cross - seg_gpa + 4] == bytes(4)
    assert km[cross - seg_gpa:cross - seg_gpa + 4] == want.to_bytes(8, "little")[:4]

    line = f"readback: did not stick: target+0xffc (8 bytes) wrote {want:#x} read "
    assert line + "0x0\n" in u.console
    assert line + f"{want & 0xFFFFFFFF:#x}\n" in k.console
    assert k.console.replace(line + f"{want & 0xFFFFFFFF:#x}\n", line + "0x0\n") == u.console


def test_guest_fault_is_reported_alike():
    ins = [*putc("A"), Ins.create(Code.UD2), *exit_ins(0)]
    image, ips = flat(ins)
    u = run("unicorn", image, None, [])
    k = run("kvm", image, None, [])
    assert u.rip_at == ips[2]
    assert (k.stop_reason, k.console, k.exit_code) == (u.stop_reason, u.console, u.exit_code)


def test_kvm_access_maps_set_before_run_are_enforced():
    """Access maps set through the Vm API between construction and run() are
    projected onto KVM's memslots before the guest runs."""
    ins = [mov_imm(Register.RAX, VALUE), Ins.create_mem_reg(Code.MOV_RM64_R64, _abs(DATA + 0x10), Register.RAX),
           *exit_ins(0)]
    image, _ = flat(ins)
    k = run("kvm", image, None, [(DATA + 0x10, 8)],
            setup=lambda eng: eng.vm.set_subpage_access(DATA >> 12, [0xFFFFFFFE]))
    assert pieces(k.violations) == [(DATA + 0x10, 8, "skip")]
    assert k.memory[DATA + 0x10] == INIT_DATA[0x10:0x18]


# ======================================================================= generated guests
FULL = 0xFFFFFFFF


@dataclass(frozen=True)
class Store:
    """One elementary store as the model sees it: ``data`` at ``addr``."""

    addr: int
    data: bytes


class Program:
    """A generated guest: instructions plus, per store, a function of the instruction
    addresses giving the elementary stores it makes (a call's pushed value is the
    address of the instruction after it)."""

    def __init__(self) -> None:
        self.ins: list[Ins] = []
        self.stores: list[Callable[[list[int]], list[Store]]] = []
        self.console = ""
        self.text: list[str] = []

    def emit(self, *ins: Ins) -> int:
        self.ins.extend(ins)
        return len(self.ins) - 1


def _page_of(addr: int) -> int:
    return (addr - DATA) >> 12


def _allowed(addr: int, size: int, maps: dict[int, int]) -> bool:
    """Every touched sub-page of every touched page writable."""
    for b in range(addr, addr + size):
        m = maps.get(_page_of(b), FULL)
        if not (m >> ((b & (PAGE - 1)) >> 7)) & 1:
            return False
    return True


def _legal(addr: int, size: int, maps: dict[int, int]) -> int:
    """Move a store so that both engines must agree on it: a page-crossing store only
    between two unprotected pages (crossing stores on protected pages have the
    documented per-page semantics under KVM, tested in TestPageCrossingFragments);
    any other is ended at the page boundary."""
    end = addr + size
    if (addr >> 12) != ((end - 1) >> 12) and (_page_of(addr) in maps or _page_of(end - 1) in maps):
        addr = ((end - 1) & ~(PAGE - 1)) - size
    return addr


DATA_END = DATA + NPAGES * PAGE


@st.composite
def generated(draw):
    decision = draw(st.sampled_from(["skip", "emulate"]))
    maps = {}
    for p in range(NPAGES):
        kind = draw(st.sampled_from(["free", "free", "map", "few"]))
        if kind == "map":
            maps[p] = draw(st.integers(0, FULL - 1))
        elif kind == "few":  # one or two protected sub-pages
            bits = draw(st.lists(st.integers(0, 31), min_size=1, max_size=2))
            maps[p] = FULL & ~sum({1 << b for b in bits})
    prog = Program()
    n_ops = draw(st.integers(1, 10))
    for i in range(n_ops):
        kind = draw(st.sampled_from(["mov", "mov", "mov", "mov_imm", "mov_reg", "mov16", "movdqu",
                                     "stosb", "stosq", "movsb", "push", "call"]))
        _emit_op(draw, prog, kind, maps, decision)
        ch = chr(ord("a") + i % 26)
        prog.emit(*putc(ch))
        prog.console += ch
    prog.emit(*exit_ins(0x5A))
    return decision, maps, prog


def _addr(draw, size: int, maps: dict[int, int], align: int = 1) -> int:
    """An address for a ``size``-byte store; biased towards sub-page and page edges,
    and towards the edges of protected sub-pages (a store half in a writable and
    half in a protected sub-page)."""
    denied = [(p, b) for p, m in sorted(maps.items()) for b in range(32) if not (m >> b) & 1]
    where = draw(st.sampled_from(["any", "subpage-edge", "page-edge"] + ["protected-edge"] * 2 * bool(denied)))
    if where == "protected-edge":
        page, b = draw(st.sampled_from(denied))
        off = b * SUB + draw(st.sampled_from([0, SUB])) + draw(st.integers(-size + 1, size - 1))
    else:
        page = draw(st.integers(0, NPAGES - 1))
    if where == "any":
        off = draw(st.integers(0, PAGE - 1))
    elif where == "subpage-edge":
        off = draw(st.integers(0, 31)) * SUB + draw(st.integers(-size + 1, size - 1))
    elif where == "page-edge":
        off = PAGE + draw(st.integers(-size + 1, 0)) if page < NPAGES - 1 else PAGE - size
    addr = DATA + page * PAGE + off
    addr -= addr % align
    return min(max(addr, DATA), DATA_END - size)


def _emit_op(draw, prog: Program, kind: str, maps, decision) -> None:
    if kind in ("mov", "mov_imm", "mov_reg"):
        size = draw(st.sampled_from([1, 2, 4, 8]))
        addr = _legal(_addr(draw, size, maps), size, maps)
        value = draw(st.integers(0, 2**64 - 1))
        if kind == "mov_imm":
            imm = draw(st.integers(-(2**31), 2**31 - 1)) if size == 8 else value & ((1 << (8 * size)) - 1)
            if size == 8:
                prog.emit(Ins.create_mem_i32(_STORE_IMM[8], _abs(addr), imm))
            else:
                prog.emit(Ins.create_mem_u32(_STORE_IMM[size], _abs(addr), imm))
            data = (imm & (2**64 - 1)).to_bytes(8, "little")[:size]
        else:
            prog.emit(mov_imm(Register.RAX, value))
            if kind == "mov_reg":  # [rbx + disp]
                disp = draw(st.sampled_from([0, 8, -8, 127, -128, 0x1234, -0x800]))
                prog.emit(mov_imm(Register.RBX, addr - disp))
                mem = MemoryOperand(Register.RBX, displ=disp, displ_size=1 if -128 <= disp <= 127 else 8)
            else:
                mem = _abs(addr)
            prog.emit(Ins.create_mem_reg(_STORE[size], mem, _RAX[size]))
            data = value.to_bytes(8, "little")[:size]
        prog.stores.append(lambda ips, a=addr, d=data: [Store(a, d)])
    elif kind == "mov16":  # a 16-byte store as two 8-byte stores
        addr = _addr(draw, 16, maps)
        value = draw(st.integers(0, 2**128 - 1)).to_bytes(16, "little")
        for half in (0, 8):
            a = _legal(addr + half, 8, maps)
            prog.emit(mov_imm(Register.RAX, int.from_bytes(value[half:half + 8], "little")),
                      Ins.create_mem_reg(Code.MOV_RM64_R64, _abs(a), Register.RAX))
            prog.stores.append(lambda ips, a=a, d=value[half:half + 8]: [Store(a, d)])
    elif kind == "movdqu":
        # 16-byte aligned: never across a sub-page.  Both engines see it as two 8-byte
        # writes (QEMU and KVM's emulator alike), decided alike.
        addr = _addr(draw, 16, maps, align=16)
        src = draw(st.integers(0, PAGE - 16))
        prog.emit(Ins.create_reg_mem(Code.MOVDQU_XMM_XMMM128, Register.XMM0, _abs(SRC + src)),
                  Ins.create_mem_reg(Code.MOVDQU_XMMM128_XMM, _abs(addr), Register.XMM0))
        prog.stores.append(lambda ips, a=addr, d=INIT_SRC[src:src + 16]: [Store(a, d)])
    elif kind in ("stosb", "stosq"):
        width = 1 if kind == "stosb" else 8
        count = draw(st.integers(1, 300 // width))
        addr = _addr(draw, width, maps, align=width)
        addr = min(addr, DATA_END - count * width)
        value = draw(st.integers(0, 2**64 - 1))
        prog.emit(mov_imm(Register.RDI, addr), mov_imm(Register.RCX, count), mov_imm(Register.RAX, value),
                  Ins.create_rep_stosb(64) if width == 1 else Ins.create_rep_stosq(64))
        d = value.to_bytes(8, "little")[:width]
        prog.stores.append(lambda ips, a=addr, c=count, w=width, d=d: [Store(a + j * w, d) for j in range(c)])
    elif kind == "movsb":
        count = draw(st.integers(1, 300))
        addr = min(_addr(draw, 1, maps), DATA_END - count)
        src = draw(st.integers(0, PAGE - count))
        prog.emit(mov_imm(Register.RSI, SRC + src), mov_imm(Register.RDI, addr), mov_imm(Register.RCX, count),
                  Ins.create_rep_movsb(64))
        prog.stores.append(lambda ips, a=addr, s=src, c=count: [Store(a + j, INIT_SRC[s + j:s + j + 1])
                                                                for j in range(c)])
    else:  # push / call into a (maybe protected) stack: RSP 8-aligned in the data pages
        rsp = _addr(draw, 8, maps, align=8) + 8
        prog.emit(mov_imm(Register.RSP, rsp))
        if kind == "push":
            value = draw(st.integers(0, 2**64 - 1))
            prog.emit(mov_imm(Register.RAX, value), Ins.create_reg(Code.PUSH_R64, Register.RAX))
            prog.stores.append(lambda ips, a=rsp - 8, v=value: [Store(a, v.to_bytes(8, "little"))])
        else:
            i = prog.emit(Ins.create_declare_byte_5(0xE8, 0, 0, 0, 0))  # call $+5: pushes its own end
            prog.stores.append(lambda ips, a=rsp - 8, i=i: [Store(a, (ips[i] + 5).to_bytes(8, "little"))])


def model(decision: str, maps: dict[int, int], stores: list[Store]) -> tuple[bytes, Counter]:
    """The final data pages and the violated bytes: a store commits iff every touched
    sub-page of every touched page is writable, or the decision is EMULATE; a denied
    store is one violation covering all its bytes."""
    mem = bytearray(INIT_DATA)
    violated: Counter = Counter()
    for s in stores:
        ok = _allowed(s.addr, len(s.data), maps)
        if not ok:
            for b in range(s.addr, s.addr + len(s.data)):
                violated[(b, decision)] += 1
        if ok or decision == "emulate":
            mem[s.addr - DATA:s.addr - DATA + len(s.data)] = s.data
    return bytes(mem), violated


def violated_bytes(violations) -> Counter:
    c: Counter = Counter()
    for v in violations:
        for b in range(v.gpa, v.gpa + v.size):
            c[(b, v.decision)] += 1
    return c


def _policy(maps: dict[int, int], decision: str) -> Policy | None:
    ranges = [(DATA + p * PAGE + s * SUB, SUB) for p, m in sorted(maps.items()) for s in range(32) if not (m >> s) & 1]
    return Policy.from_ranges(ranges, decision) if ranges else None


@pytest.mark.parametrize("engine", ["unicorn", "kvm"])
@settings(max_examples=int(os.environ.get("SPPKIT_DIFF_EXAMPLES", "30")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=generated())
def test_generated_guest(engine, case):
    """Random stores under random access maps: the engine's final memory, violations,
    console and exit code are the model's; KVM's are also Unicorn's."""
    if engine == "kvm":
        skip_without_kvm()
    decision, maps, prog = case
    image, ips = flat(prog.ins)
    stores = [s for f in prog.stores for s in f(ips)]
    want_mem, want_violated = model(decision, maps, stores)
    policy = _policy(maps, decision)
    regions = [(DATA, NPAGES * PAGE)]

    u = run("unicorn", image, policy, regions)
    assert (u.stop_reason, u.exit_code, u.console) == ("exit", 0x5A, prog.console)
    assert u.memory[DATA] == want_mem, describe_diff(u.memory[DATA], want_mem, DATA)
    assert violated_bytes(u.violations) == want_violated
    if engine == "kvm":
        k = run("kvm", image, policy, regions)
        assert (k.stop_reason, k.exit_code, k.console) == ("exit", 0x5A, prog.console)
        assert k.memory[DATA] == want_mem, describe_diff(k.memory[DATA], want_mem, DATA)
        assert violated_bytes(k.violations) == want_violated
        assert pieces(k.violations) == pieces(u.violations)
