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
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.constants import P_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

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


class GuestImageError(ValueError):
    """A file that cannot be loaded as a guest image; the message names the file and why."""


class SymbolNotFound(KeyError):
    """:meth:`GuestImage.symbol` of a name the image does not define."""

    def __init__(self, name: str, matches: list[str], where: str) -> None:
        self.name = name
        self.matches = matches
        hint = f"; close matches: {', '.join(matches)}" if matches else ""
        self.message = f"{where}: no symbol {name!r}{hint}"
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
            raise SymbolNotFound(name, matches, self.where) from None

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


def load_elf(path: str | Path) -> GuestImage:
    """Load a static ELF64 x86-64 executable as a :class:`GuestImage`.

    Raises :class:`GuestImageError` (a ``ValueError``) naming the file and the problem:
    not an ELF, not 64-bit, not x86-64, not ``ET_EXEC`` (PIE/shared objects are
    refused), no ``PT_LOAD``, ``filesz > memsz``, overlapping segments, or a file
    truncated before the data its headers describe.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise GuestImageError(f"{path}: cannot read: {e.strerror or e}") from e

    def fail(problem: str) -> GuestImageError:
        return GuestImageError(f"{path}: {problem}")

    if raw[:4] != _ELF_MAGIC:
        raise fail(f"not an ELF file (starts with {raw[:4]!r}, expected b'\\x7fELF')")
    if len(raw) < 5 or raw[4] != 2:
        cls = {1: "ELFCLASS32"}.get(raw[4], f"class {raw[4]}") if len(raw) > 4 else "no class byte"
        raise fail(f"not a 64-bit ELF ({cls}); guests must be ELFCLASS64 x86-64 executables")
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
        sh_end = header["e_shoff"] + header["e_shnum"] * header["e_shentsize"]
        if header["e_shoff"] and sh_end > len(raw):
            raise fail(f"truncated: section headers end at byte {sh_end}, file has {len(raw)}")

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

        symbols: dict[str, Symbol] = {}
        every: list[Symbol] = []
        symtab = elf.get_section_by_name(".symtab")
        if isinstance(symtab, SymbolTableSection):
            if symtab["sh_offset"] + symtab["sh_size"] > len(raw):
                raise fail(f"truncated: .symtab ends at byte {symtab['sh_offset'] + symtab['sh_size']}, "
                           f"file has {len(raw)}")
            for st in symtab.iter_symbols():
                kind = _KINDS.get(st["st_info"]["type"], str(st["st_info"]["type"]).lower())
                if not st.name or kind in _SKIPPED_KINDS or st["st_shndx"] == "SHN_UNDEF":
                    continue
                binding = _BINDINGS.get(st["st_info"]["bind"], str(st["st_info"]["bind"]).lower())
                sym = Symbol(st.name, st["st_value"], st["st_size"], kind, binding)
                every.append(sym)
                old = symbols.get(st.name)
                if old is None or (old.binding == "local" and binding != "local"):
                    symbols[st.name] = sym
        entry = header["e_entry"]
    except GuestImageError:
        raise
    except (ELFError, ValueError, KeyError, IndexError, OSError) as e:
        raise fail(f"malformed or truncated ELF: {e}") from e
    except Exception as e:  # construct.StreamError and friends on truncated input
        raise fail(f"malformed or truncated ELF: {type(e).__name__}: {e}") from e

    return GuestImage(segments=segments, entry=entry, symbols=symbols, path=path, all_symbols=every)


def flat_image(data: bytes, gpa: int, entry: int | None = None, *, flags: str = "rwx") -> GuestImage:
    """A :class:`GuestImage` for a raw binary loaded at ``gpa`` (entry defaults to ``gpa``);
    it has no symbols."""
    data = bytes(data)
    if gpa < 0:
        raise GuestImageError(f"<flat image>: gpa {gpa:#x} is negative")
    if not data:
        raise GuestImageError("<flat image>: empty data, nothing to load")
    entry = gpa if entry is None else entry
    if not gpa <= entry < gpa + len(data):
        raise GuestImageError(
            f"<flat image>: entry {entry:#x} outside the image {gpa:#x}-{gpa + len(data):#x}"
        )
    return GuestImage(segments=[Segment(gpa, data, len(data), flags)], entry=entry)
