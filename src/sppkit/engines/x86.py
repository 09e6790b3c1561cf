"""What every x86-64 engine shares: the guest's long-mode set-up and instruction decoding.

* Identity-mapped page tables (2-MiB pages) built in guest RAM outside the guest's
  segments; CPL 0 or 3 segment state; RSP at the top of RAM.
* iced-x86 decoding: the text and length of an instruction, and — for engines that
  only learn about a write after the instruction retired (KVM) — the instruction that
  wrote a given address, recovered from RIP-after.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Iterable

import iced_x86

PAGE = 4096
PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D, PTE_PS = 1, 2, 4, 0x20, 0x40, 0x80

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 18, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
RFLAGS_FIXED, RFLAGS_IOPL3 = 0x2, 0x3000

CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
CR4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
EFER = EFER_LME | EFER_LMA

PORT_CONSOLE = 0xE9  #: Bochs/QEMU debug console: one byte per OUT
PORT_EXIT = 0xF4  #: QEMU isa-debug-exit: the value written is the exit code


@dataclass(frozen=True)
class Segment:
    selector: int
    type: int
    dpl: int
    long: bool

    @property
    def fields(self) -> dict:
        return dict(base=0, limit=0xFFFFFFFF, selector=self.selector, type=self.type, present=1, dpl=self.dpl,
                    db=0 if self.long else 1, s=1, l=1 if self.long else 0, g=1)


def segments_for(cpl: int) -> tuple[Segment, Segment]:
    """(code, data) segments for a flat 64-bit guest at ``cpl`` (0 or 3)."""
    if not isinstance(cpl, int) or isinstance(cpl, bool) or cpl not in (0, 3):
        raise ValueError(f"cpl={cpl!r:.40}: must be 0 or 3 (an int)")
    if cpl == 0:
        return Segment(0x08, 11, 0, True), Segment(0x10, 3, 0, False)
    return Segment(0x1B, 11, 3, True), Segment(0x23, 3, 3, False)


@dataclass(frozen=True)
class LongModeLayout:
    """Where the engine put the guest's paging structures, and the initial registers."""

    pml4: int
    tables: bytes  # PML4, PDPT, PDs — to be loaded at ``pml4``
    entry: int
    rsp: int
    cpl: int

    @property
    def table_range(self) -> tuple[int, int]:
        return self.pml4, self.pml4 + len(self.tables)

    @property
    def rflags(self) -> int:
        return RFLAGS_FIXED | (RFLAGS_IOPL3 if self.cpl == 3 else 0)


def identity_tables(base: int, ram_size: int, *, user: bool) -> bytes:
    """PML4 + PDPT + PDs at ``base`` identity-mapping ``[0, ram_size)`` with 2-MiB pages.

    Every entry is built with its accessed flag set (and the 2-MiB leaves dirty), so
    the processor never writes these tables: a page-walk A/D update is no guest store,
    reaches no write hook and, on a page holding a protected sub-page, would be
    written by Unicorn's page walker behind ``vm.write`` and dropped by KVM."""
    n_pd = max(1, -(-ram_size // (1 << 30)))
    if n_pd > 512:
        raise ValueError(f"ram_size={ram_size:#x}: at most 512 GiB")
    flags = PTE_P | PTE_RW | PTE_A | (PTE_US if user else 0)
    buf = bytearray(PAGE * (2 + n_pd))
    struct.pack_into("<Q", buf, 0, (base + PAGE) | flags)
    for i in range(n_pd):
        struct.pack_into("<Q", buf, PAGE + 8 * i, (base + PAGE * (2 + i)) | flags)
    for j in range(-(-ram_size // (1 << 21))):
        struct.pack_into("<Q", buf, 2 * PAGE + 8 * j, (j << 21) | flags | PTE_D | PTE_PS)
    return bytes(buf)


def plan_long_mode(
    ram_size: int, entry: int, occupied: Iterable[tuple[int, int]], *, cpl: int = 3
) -> LongModeLayout:
    """Choose a page-table location in RAM that overlaps none of ``occupied``
    (``(start, end)`` ranges: the guest's segments) nor the top 64 KiB (the stack)."""
    segments_for(cpl)  # validates cpl
    if ram_size < 1 << 21 or ram_size % (1 << 21):
        raise ValueError(f"RAM size {ram_size:#x}: must be a positive multiple of 2 MiB")
    size = len(identity_tables(0, ram_size, user=False))
    busy = sorted(occupied) + [(ram_size - 0x10000, ram_size)]
    gpa = PAGE
    for lo, hi in busy:
        if gpa + size <= lo:
            break
        if hi > gpa:
            gpa = (hi + PAGE - 1) & ~(PAGE - 1)
    if gpa + size > ram_size - 0x10000:
        raise ValueError("no room in guest RAM for the page tables: increase the RAM size")
    return LongModeLayout(gpa, identity_tables(gpa, ram_size, user=cpl == 3), entry, ram_size, cpl)


# ----------------------------------------------------------------- decoding
_FORMATTER = iced_x86.Formatter(iced_x86.FormatterSyntax.INTEL)
_INFO = iced_x86.InstructionInfoFactory()
_READ_ACCESS = {iced_x86.OpAccess.READ, iced_x86.OpAccess.READ_WRITE, iced_x86.OpAccess.COND_READ,
                iced_x86.OpAccess.READ_COND_WRITE}
_WRITE_ACCESS = {iced_x86.OpAccess.WRITE, iced_x86.OpAccess.READ_WRITE, iced_x86.OpAccess.COND_WRITE,
                 iced_x86.OpAccess.READ_COND_WRITE}

_REG64 = {
    iced_x86.Register.RAX: "rax", iced_x86.Register.RBX: "rbx", iced_x86.Register.RCX: "rcx",
    iced_x86.Register.RDX: "rdx", iced_x86.Register.RSI: "rsi", iced_x86.Register.RDI: "rdi",
    iced_x86.Register.RSP: "rsp", iced_x86.Register.RBP: "rbp", iced_x86.Register.R8: "r8",
    iced_x86.Register.R9: "r9", iced_x86.Register.R10: "r10", iced_x86.Register.R11: "r11",
    iced_x86.Register.R12: "r12", iced_x86.Register.R13: "r13", iced_x86.Register.R14: "r14",
    iced_x86.Register.R15: "r15", iced_x86.Register.RIP: "rip",
}


@dataclass(frozen=True)
class Decoded:
    rip: int
    length: int
    text: str
    writes_memory: bool
    address: int | None  # the written address computed with the given registers, if any
    size: int  # bytes of the written memory operand (0 if none)
    reads_memory: bool = False  # any memory operand read (a read-modify-write store included)

    @property
    def mnemonic(self) -> str:
        words = self.text.split()
        return words[1] if words and words[0].startswith("rep") and len(words) > 1 else (words[0] if words else "")

    def __str__(self) -> str:
        return self.text


def decode(code: bytes, rip: int, regs: dict[str, int] | None = None) -> Decoded | None:
    """Decode the instruction at the start of ``code`` (located at ``rip``)."""
    dec = iced_x86.Decoder(64, code, ip=rip)
    if not dec.can_decode:
        return None
    ins = dec.decode()
    if ins.code == iced_x86.Code.INVALID:
        return None
    writes = reads = False
    addr = None
    size = 0
    for mem in _INFO.info(ins).used_memory():
        reads = reads or mem.access in _READ_ACCESS
        if mem.access in _WRITE_ACCESS:
            writes = True
            if not size:
                size = iced_x86.MemorySizeInfo(mem.memory_size).size
                if regs is not None:
                    addr = _address(mem, regs, ins)
    return Decoded(rip, ins.len, _FORMATTER.format(ins), writes, addr, size, reads)


def _reg_value(reg, regs: dict[str, int], ins) -> int:
    if reg == iced_x86.Register.NONE:
        return 0
    if reg == iced_x86.Register.RIP:
        return ins.next_ip
    if reg in _REG64:
        return regs.get(_REG64[reg], 0)
    info = iced_x86.RegisterInfo(reg)
    if info.full_register in _REG64:
        return regs.get(_REG64[info.full_register], 0) & ((1 << (8 * info.size)) - 1)
    return 0  # segment bases are 0 in a flat guest


def _address(mem, regs: dict[str, int], ins) -> int | None:
    """base + index * scale + displacement of a used-memory operand, with ``regs``."""
    try:
        return (
            _reg_value(mem.base, regs, ins) + _reg_value(mem.index, regs, ins) * mem.scale + mem.displacement
        ) & 0xFFFF_FFFF_FFFF_FFFF
    except Exception:  # a register class iced cannot map (vector index): unknown
        return None


_IMPLICIT = {"push", "call", "stosb", "stosw", "stosd", "stosq", "movsb", "movsw", "movsd", "movsq", "enter"}


def find_writer(
    read: Callable[[int, int], bytes], rip_after: int, gpa: int, size: int, regs: dict[str, int]
) -> Decoded | None:
    """The instruction that wrote ``size`` bytes at ``gpa`` and retired with RIP = ``rip_after``.

    x86 cannot be decoded backwards, so every start 1..15 bytes before ``rip_after``
    whose decoded length lands exactly on ``rip_after`` and which writes memory is a
    candidate.  Preferred, in order: a memory operand that, computed with ``regs``,
    covers ``gpa`` with an operand size of at least ``size``; an instruction writing
    through RSP/RDI implicitly (push, call, string stores — their registers have
    already moved); a ``rep`` string store still in progress (RIP-after = its own
    RIP) writing near ``gpa``; else the longest candidate.  None if nothing decodes.
    """
    lo = max(0, rip_after - 15)
    try:
        window = read(lo, rip_after - lo + 15)
    except Exception:
        return None
    before, current = [], None
    for start in range(lo, rip_after + 1):
        d = decode(window[start - lo :], start, regs)
        if d is None or not d.writes_memory:
            continue
        if start + d.length == rip_after:
            before.append(d)
        elif start == rip_after and d.text.startswith("rep"):
            current = d
    matches = [d for d in before
               if d.address is not None and d.address <= gpa < d.address + max(d.size, 1) and d.size >= size]
    # The shortest encoding wins: a byte of the previous instruction may decode as a
    # prefix the store ignores (f2/f3/segment on a plain mov), giving a longer candidate
    # with the same effect; a prefix that matters (REX.W, 66) changes the operand size,
    # and the size check keeps the candidate whose width matches the write.
    exact = [d for d in matches if d.size == size]
    # KVM hands a store over in pieces: a 16/32-byte vector store in pieces of at
    # most 8 bytes, a page-crossing store one piece per page.  A piece is then
    # smaller than its instruction's operand, and the instruction's first byte — a
    # mandatory prefix or REX.W — read as the previous instruction's last, leaves a
    # shorter candidate of exactly the piece's size (`f3 0f 7f` movdqu vs `0f 7f`
    # movq mm; `48 89` vs `89`).  A candidate that can have been split into this
    # piece wins over those that start inside it.
    split = [d for d in matches if d.address is not None and d.size > size and gpa + size <= d.address + d.size
             and (d.size > 8 or _crosses_page_at(d.address, d.size, gpa, size))]
    if split and exact:
        exact = [e for e in exact if not any(d.rip < e.rip < d.rip + d.length for d in split)] or split[:1]
    if exact or matches:
        return (exact or matches)[-1]
    for d in before:
        if d.mnemonic in _IMPLICIT and (d.address is None or abs(d.address - gpa) <= 64):
            return d
    if current is not None and current.address is not None and abs(current.address - gpa) <= 64:
        return current
    return before[0] if before else None


def _crosses_page_at(address: int, size: int, gpa: int, n: int) -> bool:
    """Whether ``[gpa, gpa+n)`` is the part on one page of the page-crossing
    ``[address, address+size)``."""
    end = address + size
    boundary = (address | (PAGE - 1)) + 1
    if boundary >= end:
        return False
    return (gpa, gpa + n) in ((address, boundary), (boundary, end))


def decode_forward(read: Callable[[int, int], bytes], start: int, rip_after: int) -> Decoded | None:
    """The instruction that ends exactly at ``rip_after``, decoded *forward* from ``start``
    (the start of the function containing it) — exact for compiler output, unlike the
    backward search of :func:`find_writer`.  None if no instruction ends there."""
    if not 0 <= rip_after - start <= 1 << 16:
        return None
    try:
        code = read(start, rip_after - start + 15)
    except Exception:
        return None
    ip, last = start, None
    while ip < rip_after:
        d = decode(code[ip - start :], ip, None)
        if d is None:
            return None
        last, ip = d, ip + d.length
    return last if ip == rip_after else None
