"""Guest images: static x86-64 ELF executables (or flat binaries) ready to load.

A :class:`GuestImage` is what an engine needs to start a guest: the bytes to place
at each guest-physical address (paging is identity-mapped, so a segment's virtual
address *is* its gpa), the entry point, and the symbol table, so that policies can
name guest objects and reports can say ``secret+0x8`` instead of ``0x404108``.

Only static, non-PIE ELF64 x86-64 executables (``ET_EXEC``) are accepted: there is
no loader in the guest to apply relocations, so a PIE or shared object would run at
the wrong addresses.  :func:`load_elf` refuses anything else with a
:class:`GuestImageError` naming the file and the problem.
"""

from __future__ import annotations

import bisect
import difflib
import io
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from elftools.common.exceptions import ELFError
from elftools.elf.constants import P_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from .._files import FileProblem, read_regular_file

#: The largest file :func:`load_elf` reads (bytes): 4 GiB.  A guest's loaded segments
#: must fit guest RAM, and a file larger than this is not a guest program; the check
#: keeps a wrong path (a disk image, say) from being read whole into memory.
MAX_ELF_SIZE = 4 << 30

__all__ = [
    "GuestImage", "GuestImageError", "Segment", "Symbol", "SymbolNotFound", "flat_image", "load_elf",
]

_ELF_MAGIC = b"\x7fELF"

# st_info.type / st_info.bind as pyelftools spells them -> our short names.
_KINDS = {
    "STT_NOTYPE": "notype", "STT_OBJECT": "object", "STT_FUNC": "func", "STT_SECTION": "section",
    "STT_FILE": "file", "STT_COMMON": "common", "STT_TLS": "tls", "STT_GNU_IFUNC": "ifunc",
}
_BINDINGS = {"STB_LOCAL": "local", "STB_GLOBAL": "global", "STB_WEAK": "weak", "STB_GNU_UNIQUE": "unique"}
# Symbol kinds that carry no guest address worth naming.
_SKIPPED_KINDS = {"section", "file"}

# Section-header constants (ELF gABI), read directly from the file: the section table
# is checked before pyelftools is asked for any section, so that a bad offset or index
# becomes a clear refusal rather than an OverflowError or silently empty names.
_SHT_NULL, _SHT_SYMTAB, _SHT_STRTAB, _SHT_NOBITS = 0, 2, 3, 8
_SHN_UNDEF, _SHN_XINDEX = 0, 0xFFFF
_ELF64_SHDR = struct.Struct("<IIQQQQIIQQ")  # sh_name .. sh_entsize: 64 bytes
_ELF64_SYM_SIZE = 24  # sizeof(Elf64_Sym)
_ADDR_LIMIT = 1 << 64


class GuestImageError(ValueError):
    """A file that cannot be loaded as a guest image; the message names the file and why."""


class SymbolNotFound(KeyError):
    """:meth:`GuestImage.symbol` of a name the image does not define."""

    def __init__(self, name: str, matches: list[str], where: str, *, stripped: bool = False) -> None:
        self.name = name
        self.matches = matches
        #: what follows "no symbol NAME" in a message: close matches, or that the image
        #: has no symbols at all
        self.hint = (f"; close matches: {', '.join(matches)}" if matches else
                     "; it has no symbol table (stripped?)" if stripped else "")
        self.message = f"{where}: no symbol {name!r}{self.hint}"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


@dataclass(frozen=True, slots=True)
class Segment:
    """A loadable segment: ``data`` goes at ``gpa``; ``memsz - len(data)`` zero bytes follow.

    ``flags`` is ``"rwx"``-style, ``-`` for a missing permission (e.g. ``"r-x"``).
    """

    gpa: int
    data: bytes
    memsz: int
    flags: str = "rwx"

    @property
    def filesz(self) -> int:
        return len(self.data)

    @property
    def end(self) -> int:
        """First gpa past the segment (``gpa + memsz``)."""
        return self.gpa + self.memsz

    @property
    def readable(self) -> bool:
        return "r" in self.flags

    @property
    def writable(self) -> bool:
        return "w" in self.flags

    @property
    def executable(self) -> bool:
        return "x" in self.flags

    def contains(self, addr: int) -> bool:
        return self.gpa <= addr < self.end

    def image(self) -> bytes:
        """The full ``memsz`` bytes: ``data`` then the zero fill."""
        return self.data + bytes(self.memsz - len(self.data))

    def __repr__(self) -> str:
        return f"Segment(gpa={self.gpa:#x}, filesz={self.filesz:#x}, memsz={self.memsz:#x}, flags={self.flags!r})"


@dataclass(frozen=True, slots=True)
class Symbol:
    """One ``.symtab`` entry: ``kind`` is object/func/notype/common/tls/ifunc,
    ``binding`` local/global/weak/unique."""

    name: str
    addr: int
    size: int
    kind: str
    binding: str

    @property
    def end(self) -> int:
        return self.addr + self.size

    def contains(self, addr: int) -> bool:
        return self.addr <= addr < self.addr + self.size

    def __repr__(self) -> str:
        return f"Symbol({self.name!r}, addr={self.addr:#x}, size={self.size:#x}, {self.kind}, {self.binding})"


@dataclass(slots=True)
class GuestImage:
    """Segments to load, the entry point, and the symbol table.

    ``symbols`` maps each name to its :class:`Symbol`; when several symbols share a
    name (``static`` variables of different files), the global one wins, else the
    first.  ``all_symbols`` keeps every one, in address order.
    """

    segments: list[Segment]
    entry: int
    symbols: dict[str, Symbol] = field(default_factory=dict)
    path: Path | None = None
    all_symbols: list[Symbol] = field(default_factory=list)
    _starts: list[int] = field(default_factory=list, repr=False, compare=False, init=False)

    def __post_init__(self) -> None:
        if not self.all_symbols:
            self.all_symbols = list(self.symbols.values())
        self.all_symbols.sort(key=lambda s: (s.addr, -s.size, s.name))
        self._starts = [s.addr for s in self.all_symbols]

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else "<flat image>"

    @property
    def low(self) -> int:
        """Lowest gpa of any segment."""
        return min(s.gpa for s in self.segments)

    @property
    def high(self) -> int:
        """First gpa past every segment."""
        return max(s.end for s in self.segments)

    def segment_at(self, addr: int) -> Segment | None:
        for seg in self.segments:
            if seg.contains(addr):
                return seg
        return None

    def symbol(self, name: str) -> Symbol:
        """The symbol called ``name``; :class:`SymbolNotFound` (a ``KeyError``) with
        close matches otherwise."""
        try:
            return self.symbols[name]
        except KeyError:
            matches = difflib.get_close_matches(name, list(self.symbols), n=5, cutoff=0.6)
            raise SymbolNotFound(name, matches, self.where, stripped=not self.symbols) from None

    def symbol_at(self, addr: int) -> tuple[Symbol, int] | None:
        """``(symbol, offset)`` naming ``addr`` for "symbol+offset" reports.

        Preference: an object symbol containing ``addr`` (the smallest, so a field
        alias beats the structure holding it), then any sized symbol containing it,
        then the nearest zero-size label at or below ``addr`` in the same segment
        (e.g. ``__bss_start``).  ``None`` if nothing fits.
        """
        i = bisect.bisect_right(self._starts, addr)
        containing = [s for s in self.all_symbols[:i] if s.size and s.contains(addr)]
        if containing:
            best = min(containing, key=lambda s: (s.kind != "object", s.size, s.binding != "global", s.name))
            return best, addr - best.addr
        seg = self.segment_at(addr)
        for s in reversed(self.all_symbols[:i]):
            if seg is None or not seg.contains(s.addr):
                break
            if s.size == 0:
                return s, addr - s.addr
        return None

    def describe(self, addr: int) -> str:
        """``"secret+0x8"``, or ``"0x404108"`` when no symbol covers ``addr``."""
        hit = self.symbol_at(addr)
        if hit is None:
            return f"{addr:#x}"
        sym, off = hit
        return f"{sym.name}+{off:#x}" if off else sym.name


def _flags(p_flags: int) -> str:
    return "".join(
        ch if p_flags & bit else "-"
        for ch, bit in (("r", P_FLAGS.PF_R), ("w", P_FLAGS.PF_W), ("x", P_FLAGS.PF_X))
    )


class _Shdr(NamedTuple):
    num: int
    sh_name: int
    sh_type: int
    sh_offset: int
    sh_size: int
    sh_link: int
    sh_entsize: int
    name: str = ""

    @property
    def label(self) -> str:
        return f"section {self.name} (#{self.num})" if self.name else f"section #{self.num}"


def _section_headers(raw: bytes, header: Any, fail: Callable[[str], GuestImageError]) -> list[_Shdr]:
    """The section headers, named, each checked to lie within the file.

    No section header table (``e_shoff == 0``) is legal for an executable: the image
    then has no symbols.  ``e_shstrndx == SHN_UNDEF`` (no section names) is legal too;
    sections are then named by number.
    """
    shoff, shentsize = header["e_shoff"], header["e_shentsize"]
    if shoff == 0:
        return []
    count = header["e_shnum"]
    if count == 0:  # >= SHN_LORESERVE sections: the count is section 0's sh_size
        if shoff + _ELF64_SHDR.size > len(raw):
            raise fail(f"truncated: section header #0 ends at byte {shoff + _ELF64_SHDR.size}, file has {len(raw)}")
        count = _ELF64_SHDR.unpack_from(raw, shoff)[5]
        if count == 0:
            return []
    if shentsize != _ELF64_SHDR.size:
        raise fail(f"e_shentsize is {shentsize}, not {_ELF64_SHDR.size} (the size of an Elf64_Shdr)")
    sh_end = shoff + count * shentsize
    if sh_end > len(raw):
        raise fail(f"truncated: section headers end at byte {sh_end}, file has {len(raw)}")
    shdrs = []
    for i in range(count):
        name, typ, _flags, _addr, off, size, link, _info, _align, entsize = _ELF64_SHDR.unpack_from(
            raw, shoff + i * shentsize)
        shdrs.append(_Shdr(i, name, typ, off, size, link, entsize))

    def beyond_eof(sh: _Shdr, what: str) -> GuestImageError:
        return fail(
            f"{what}: offset {sh.sh_offset:#x} + size {sh.sh_size:#x} lies beyond the end of the file "
            f"({len(raw):#x} bytes); truncated or malformed"
        )

    shstrndx = header["e_shstrndx"]
    if shstrndx == _SHN_XINDEX:
        idx, how = shdrs[0].sh_link, f"e_shstrndx SHN_XINDEX (0xffff) with section #0's sh_link {shdrs[0].sh_link}"
        if idx == _SHN_UNDEF:
            raise fail(f"{how}: no section-name string table")
    else:
        idx, how = shstrndx, f"e_shstrndx {shstrndx}"
    if idx != _SHN_UNDEF:
        if idx >= count:
            raise fail(f"{how}: no such section (the file has {count}), so sections have no names")
        strtab = shdrs[idx]
        if strtab.sh_type != _SHT_STRTAB:
            raise fail(f"{how}: section #{idx} is not a string table (sh_type {strtab.sh_type}), "
                       "so sections have no names")
        if strtab.sh_offset + strtab.sh_size > len(raw):
            raise beyond_eof(strtab, f"section-name string table (section #{idx}, {how})")
        base, size = strtab.sh_offset, strtab.sh_size
        for i, sh in enumerate(shdrs):
            if sh.sh_name >= size:
                raise fail(f"section #{i}: name offset {sh.sh_name:#x} is past the end of the "
                           f"section-name string table (section #{idx}, {size:#x} bytes)")
            nul = raw.find(b"\0", base + sh.sh_name, base + size)
            if nul < 0:
                raise fail(f"section #{i}: name at offset {sh.sh_name:#x} is not NUL-terminated within the "
                           f"section-name string table (section #{idx})")
            shdrs[i] = sh._replace(name=raw[base + sh.sh_name:nul].decode("utf-8", errors="replace"))
    for sh in shdrs:
        if sh.sh_type not in (_SHT_NULL, _SHT_NOBITS) and sh.sh_offset + sh.sh_size > len(raw):
            raise beyond_eof(sh, sh.label)
    return shdrs


def _symbol_table(shdrs: list[_Shdr], fail: Callable[[str], GuestImageError]) -> tuple[_Shdr, _Shdr] | None:
    """The ``SHT_SYMTAB`` section and its string table, checked; ``None`` if there is none."""
    misnamed = [sh for sh in shdrs if sh.name == ".symtab" and sh.sh_type != _SHT_SYMTAB]
    if misnamed:
        sh = misnamed[0]
        raise fail(f"{sh.label} has sh_type {sh.sh_type}, not SHT_SYMTAB ({_SHT_SYMTAB}): its symbols cannot be read")
    symtabs = [sh for sh in shdrs if sh.sh_type == _SHT_SYMTAB]
    if not symtabs:
        return None
    if len(symtabs) > 1:
        raise fail(f"{len(symtabs)} SHT_SYMTAB sections ({', '.join(sh.label for sh in symtabs)}); "
                   "an ELF file has at most one")
    sym = symtabs[0]
    if sym.sh_entsize != _ELF64_SYM_SIZE:
        raise fail(f"{sym.label}: sh_entsize is {sym.sh_entsize}, not {_ELF64_SYM_SIZE} (the size of an Elf64_Sym)")
    if sym.sh_size % _ELF64_SYM_SIZE:
        raise fail(f"{sym.label}: sh_size {sym.sh_size:#x} is not a multiple of {_ELF64_SYM_SIZE} "
                   "(the size of an Elf64_Sym)")
    if not 0 < sym.sh_link < len(shdrs) or shdrs[sym.sh_link].sh_type != _SHT_STRTAB:
        raise fail(f"{sym.label}: sh_link {sym.sh_link} is not a string table section, "
                   "so its symbols have no names")
    return sym, shdrs[sym.sh_link]


def load_elf(path: str | Path) -> GuestImage:
    """Load a static ELF64 x86-64 executable as a :class:`GuestImage`.

    Raises :class:`GuestImageError` (a ``ValueError``) naming the file and the problem:
    not an ELF, not 64-bit, big-endian, not x86-64, not ``ET_EXEC`` (PIE/shared objects
    are refused), no ``PT_LOAD``, ``filesz > memsz``, a segment ending past 2**64,
    overlapping segments, an entry point outside every loaded segment, a file truncated
    before the data its headers describe (a section whose bytes lie beyond the end of
    the file included), a bad section-name string table index, or a malformed symbol
    table (entry size not 24, no string table): symbols are never silently dropped.
    A file without section headers, or without a ``.symtab``, loads with no symbols.
    Only a regular file of at most :data:`MAX_ELF_SIZE` bytes is read: a device or FIFO
    (``/dev/zero``) is refused before a byte is read.
    """
    path = Path(path)

    def fail(problem: str) -> GuestImageError:
        return GuestImageError(f"{path}: {problem}")

    def magic(first: bytes) -> None:  # (refused before the rest of a large file is read)
        if first[:4] != _ELF_MAGIC:
            raise fail(f"not an ELF file (starts with {first[:4]!r}, expected b'\\x7fELF')")

    try:
        raw = read_regular_file(path, MAX_ELF_SIZE, "an ELF file", head=magic)
    except FileProblem as e:
        raise GuestImageError(f"{path}: {e}") from None
    if len(raw) < 5 or raw[4] != 2:
        cls = {1: "ELFCLASS32"}.get(raw[4], f"class {raw[4]}") if len(raw) > 4 else "no class byte"
        raise fail(f"not a 64-bit ELF ({cls}); guests must be ELFCLASS64 x86-64 executables")
    if len(raw) > 5 and raw[5] != 1:
        if raw[5] == 2:
            raise fail("big-endian (ELFDATA2MSB); x86-64 guests are little-endian (ELFDATA2LSB)")
        raise fail(f"invalid data encoding EI_DATA {raw[5]} (expected 1, ELFDATA2LSB, for x86-64)")
    if len(raw) < 64:
        raise fail(f"truncated: {len(raw)} bytes, shorter than the 64-byte ELF64 header")

    try:
        elf = ELFFile(io.BytesIO(raw))
        header = elf.header
        machine = header["e_machine"]
        etype = header["e_type"]
        if machine != "EM_X86_64":
            raise fail(f"machine is {machine}, not EM_X86_64; guests are x86-64 code")
        if etype != "ET_EXEC":
            why = {
                "ET_DYN": "a PIE or shared object (ET_DYN): it needs relocation by a loader the guest "
                "does not have; link with -no-pie -static (sppkit.guests.build_guest does)",
                "ET_REL": "a relocatable object (ET_REL), not linked; link it into an executable",
                "ET_CORE": "a core dump (ET_CORE)",
            }.get(etype, f"e_type {etype}")
            raise fail(f"not a static executable (ET_EXEC): it is {why}")
        ph_end = header["e_phoff"] + header["e_phnum"] * header["e_phentsize"]
        if ph_end > len(raw):
            raise fail(f"truncated: program headers end at byte {ph_end}, file has {len(raw)}")
        shdrs = _section_headers(raw, header, fail)

        segments: list[Segment] = []
        for i, ph in enumerate(elf.iter_segments()):
            if ph["p_type"] != "PT_LOAD":
                continue
            off, filesz, memsz, vaddr = ph["p_offset"], ph["p_filesz"], ph["p_memsz"], ph["p_vaddr"]
            if filesz > memsz:
                raise fail(f"PT_LOAD #{i} at {vaddr:#x}: filesz {filesz:#x} > memsz {memsz:#x}")
            if off + filesz > len(raw):
                raise fail(
                    f"truncated: PT_LOAD #{i} at {vaddr:#x} needs file bytes {off:#x}-{off + filesz:#x}, "
                    f"file has {len(raw):#x}"
                )
            for field_name, start in (("p_vaddr", vaddr), ("p_paddr", ph["p_paddr"])):
                if start + memsz > _ADDR_LIMIT:
                    raise fail(f"PT_LOAD #{i}: {field_name} {start:#x} + memsz {memsz:#x} ends past 2**64 "
                               f"(at {start + memsz:#x})")
            if memsz == 0:
                continue
            segments.append(Segment(vaddr, raw[off:off + filesz], memsz, _flags(ph["p_flags"])))
        if not segments:
            raise fail("no PT_LOAD segment: nothing to load")
        segments.sort(key=lambda s: s.gpa)
        for a, b in zip(segments, segments[1:]):
            if b.gpa < a.end:
                raise fail(
                    f"segments overlap: {a.gpa:#x}-{a.end:#x} ({a.flags}) and {b.gpa:#x}-{b.end:#x} ({b.flags})"
                )

        entry = header["e_entry"]
        if not any(seg.contains(entry) for seg in segments):
            ranges = ", ".join(f"{s.gpa:#x}-{s.end:#x} ({s.flags})" for s in segments)
            raise fail(f"entry point {entry:#x} is outside every loadable segment: {ranges}")

        symbols: dict[str, Symbol] = {}
        every: list[Symbol] = []
        found = _symbol_table(shdrs, fail)
        if found is not None:
            sym_sh, str_sh = found
            symtab = elf.get_section(sym_sh.num)
            assert isinstance(symtab, SymbolTableSection)
            for k, st in enumerate(symtab.iter_symbols()):
                if st["st_name"] >= str_sh.sh_size:
                    raise fail(f"{sym_sh.label}: symbol #{k} has name offset {st['st_name']:#x}, past the end of "
                               f"its string table {str_sh.label} ({str_sh.sh_size:#x} bytes)")
                kind = _KINDS.get(st["st_info"]["type"], str(st["st_info"]["type"]).lower())
                if not st.name or kind in _SKIPPED_KINDS or st["st_shndx"] == "SHN_UNDEF":
                    continue
                binding = _BINDINGS.get(st["st_info"]["bind"], str(st["st_info"]["bind"]).lower())
                sym = Symbol(st.name, st["st_value"], st["st_size"], kind, binding)
                every.append(sym)
                old = symbols.get(st.name)
                if old is None or (old.binding == "local" and binding != "local"):
                    symbols[st.name] = sym
    except GuestImageError:
        raise
    except (ELFError, ValueError, KeyError, IndexError, OSError) as e:
        raise fail(f"malformed or truncated ELF: {e}") from e
    except Exception as e:  # construct.StreamError and friends on truncated input
        raise fail(f"malformed or truncated ELF: {type(e).__name__}: {e}") from e

    return GuestImage(segments=segments, entry=entry, symbols=symbols, path=path, all_symbols=every)


def flat_image(data: bytes, gpa: int, entry: int | None = None, *, flags: str = "rwx") -> GuestImage:
    """A :class:`GuestImage` for a raw binary loaded at ``gpa`` (entry defaults to ``gpa``);
    it has no symbols.  Raises :class:`GuestImageError` for arguments that do not make
    an image: ``data`` not bytes-like or empty, ``gpa``/``entry`` not integers, the
    image running past 2**64, the entry outside it, ``flags`` not ``"rwx"``-style."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        # bytes(5) would be five zero bytes, bytes("...") a TypeError: neither is an image
        raise GuestImageError(f"<flat image>: data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    for what, value in (("gpa", gpa), ("entry", entry)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise GuestImageError(f"<flat image>: {what} must be an integer, got {type(value).__name__} {value!r}")
    if not isinstance(flags, str) or len(flags) != 3 or any(
            ch not in (want, "-") for ch, want in zip(flags, "rwx")):
        raise GuestImageError(f"<flat image>: flags must be 'rwx'-style ('r', 'w', 'x' or '-' in that order, "
                              f"e.g. 'r-x'), got {flags!r}")
    if gpa < 0:
        raise GuestImageError(f"<flat image>: gpa {gpa:#x} is negative")
    if not data:
        raise GuestImageError("<flat image>: empty data, nothing to load")
    if gpa + len(data) > _ADDR_LIMIT:
        raise GuestImageError(f"<flat image>: gpa {gpa:#x} + {len(data):#x} bytes ends past 2**64")
    entry = gpa if entry is None else entry
    if not gpa <= entry < gpa + len(data):
        raise GuestImageError(
            f"<flat image>: entry {entry:#x} outside the image {gpa:#x}-{gpa + len(data):#x}"
        )
    return GuestImage(segments=[Segment(gpa, data, len(data), flags)], entry=entry)
