"""Protection policies: which guest memory to write-protect, and what to do on a violation.

A policy is a TOML file::

    decision = "skip"              # optional default for entries: skip | emulate | stop

    [[protect]]
    name = "secret key"            # optional, for reports
    symbol = "secret"              # a symbol of the guest ELF (local or global), or
    # start = 0x401000             #   an explicit guest-physical range:
    # length = 256                 #   start + length
    offset = 0                     # optional with symbol
    length = 32                    # optional with symbol (default: the symbol's size)
    decision = "stop"              # optional per entry

SPP protects whole 128-byte sub-pages, so every sub-page a range touches is
protected (ranges are rounded *out*): :meth:`Policy.access_maps` gives, per gfn, the
32-bit access map the VMM takes (bit *i* set = sub-page *i* writable).

A policy protects at most :data:`MAX_PROTECTED_PAGES` pages (4,194,304 pages, 16 GiB;
replay uses the same constant, behind the replay CLI's "protects more than 4,194,304
pages"), counting each entry's pages: the
policy keeps a per-page index, and a larger range is refused before any per-page work.

Every :class:`PolicyError` names the file, the entry (1-based index and name) and
the problem.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from ._files import FileProblem, read_regular_file
from .guests.elf import SymbolNotFound
from .vmm.events import Decision

if TYPE_CHECKING:
    from .guests.elf import GuestImage

__all__ = [
    "MAX_PROTECTED_PAGES", "POLICY_DECISIONS", "Policy", "PolicyError", "ProtectEntry", "load_policy", "parse_policy",
    "parse_protect_arg", "parse_range_arg",
]

PAGE_SIZE = 4096
SUBPAGE_SIZE = 128
SUBPAGES_PER_PAGE = PAGE_SIZE // SUBPAGE_SIZE
FULL_MAP = (1 << SUBPAGES_PER_PAGE) - 1
MAX_GPA = 1 << 64
#: Most pages a policy protects, summed over its entries (16 GiB): the per-page index,
#: :meth:`Policy.access_maps` and :meth:`Policy.gfns` are linear in pages.  Replay
#: (``sppkit replay --protect``) uses the same limit.
MAX_PROTECTED_PAGES = 1 << 22
#: The largest policy file :func:`load_policy` reads (bytes): 64 MiB, far more than a
#: policy at :data:`MAX_PROTECTED_PAGES` one-page entries needs in practice.
MAX_POLICY_SIZE = 64 << 20

#: Decisions a policy may name (``unprotect`` is a handler's choice, not a policy's).
POLICY_DECISIONS: tuple[Decision, ...] = (Decision.SKIP, Decision.EMULATE, Decision.STOP)
_DECISION_NAMES = ", ".join(d.value for d in POLICY_DECISIONS)

_TOP_KEYS = ("decision", "protect")
_ENTRY_KEYS = ("name", "symbol", "start", "offset", "length", "decision")


class PolicyError(ValueError):
    """A policy that cannot be used; the message names the source, the entry and the problem."""


@dataclass(frozen=True, slots=True)
class ProtectEntry:
    """One protected byte range ``[start, start + length)`` and its decision."""

    name: str
    start: int
    length: int
    decision: Decision

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def sub_start(self) -> int:
        """``start`` rounded down to a sub-page."""
        return self.start & ~(SUBPAGE_SIZE - 1)

    @property
    def sub_end(self) -> int:
        """``end`` rounded up to a sub-page: ``[sub_start, sub_end)`` is what SPP protects."""
        return (self.end + SUBPAGE_SIZE - 1) & ~(SUBPAGE_SIZE - 1)

    def contains(self, gpa: int) -> bool:
        return self.start <= gpa < self.end

    def covers(self, gpa: int) -> bool:
        """``gpa`` lies in a sub-page this entry protects."""
        return self.sub_start <= gpa < self.sub_end

    def gfns(self) -> range:
        return range(self.sub_start >> 12, ((self.sub_end - 1) >> 12) + 1)

    def __str__(self) -> str:
        return f"{self.name} [{self.start:#x}, {self.end:#x}) {self.decision.value}"


def _label(source: str, index: int, name: str | None) -> str:
    named = f" ({name!r})" if name else ""
    return f"{source}: [[protect]] entry {index}{named}"


class Policy:
    """An ordered set of :class:`ProtectEntry`; ``source`` names where it came from."""

    def __init__(self, entries: Iterable[ProtectEntry] = (), *, source: str = "<policy>",
                 default_decision: Decision | str = Decision.SKIP) -> None:
        self.source = source
        self.default_decision = _parse_decision(default_decision, f"{source}: decision")
        self._entries: tuple[ProtectEntry, ...] = tuple(entries)
        self._by_gfn: dict[int, list[ProtectEntry]] = {}
        pages = 0
        for i, e in enumerate(self._entries, 1):
            if not isinstance(e, ProtectEntry):
                raise TypeError(f"{source}: {e!r} is not a ProtectEntry")
            pages = _count_pages(pages, e, _label(source, i, e.name))
        for e in self._entries:
            for gfn in e.gfns():
                self._by_gfn.setdefault(gfn, []).append(e)
        self._check_conflicts()

    # -- construction -----------------------------------------------------------

    @classmethod
    def from_ranges(cls, ranges: Iterable[tuple[int, int]], decision: Decision | str = "skip", *,
                    source: str = "--protect") -> "Policy":
        """A policy protecting each ``(start, length)`` (as given by ``--protect START:LENGTH``)."""
        d = _parse_decision(decision, f"{source}: decision")
        entries = []
        pages = 0
        try:
            items = iter(ranges)
        except TypeError:
            raise PolicyError(f"{source}: ranges must be an iterable of (start, length) pairs, got "
                              f"{type(ranges).__name__} {ranges!r}") from None
        for i, item in enumerate(items, 1):
            try:
                start, length = item
            except (TypeError, ValueError):
                raise PolicyError(f"{source}: range {i}: {item!r} is not a (start, length) pair") from None
            where = f"{source}: range {i}"
            _check_int(start, "start", where)
            _check_int(length, "length", where)
            _check_range(start, length, where)
            entries.append(ProtectEntry(f"{start:#x}:{length:#x}", start, length, d))
            pages = _count_pages(pages, entries[-1], where)
        return cls(entries, source=source, default_decision=d)

    def _check_conflicts(self) -> None:
        # Sweep in sub_start order, keeping per decision the entry that reaches furthest:
        # O(n log n), so thousands of entries on one page do not take minutes.
        ordered = sorted(enumerate(self._entries, 1), key=lambda ie: (ie[1].sub_start, ie[0]))
        reach: dict[Decision, tuple[int, ProtectEntry]] = {}
        for i, e in ordered:
            for d, (j, a) in reach.items():
                if d is not e.decision and a.sub_end > e.sub_start:
                    lo, hi = max(a.sub_start, e.sub_start), min(a.sub_end, e.sub_end)
                    first, second = sorted(((j, a), (i, e)), key=lambda ie: ie[0])
                    raise PolicyError(
                        f"{_label(self.source, first[0], first[1].name)} and entry {second[0]} "
                        f"({second[1].name!r}) overlap with different decisions "
                        f"({first[1].decision.value} vs {second[1].decision.value}) in sub-pages "
                        f"[{lo:#x}, {hi:#x}); SPP protects whole 128-byte sub-pages, so one sub-page "
                        "can have only one decision"
                    )
            best = reach.get(e.decision)
            if best is None or e.sub_end > best[1].sub_end:
                reach[e.decision] = (i, e)

    # -- queries ----------------------------------------------------------------

    @property
    def entries(self) -> tuple[ProtectEntry, ...]:
        return self._entries

    def __iter__(self) -> Iterator[ProtectEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __repr__(self) -> str:
        return f"Policy({len(self._entries)} entries from {self.source})"

    def access_maps(self) -> dict[int, int]:
        """``{gfn: access map}`` for every page a protected range touches; bit *i* of a
        map set = sub-page *i* writable.  Ranges are rounded out to whole sub-pages."""
        maps: dict[int, int] = {}
        for e in self._entries:
            sub = e.sub_start
            while sub < e.sub_end:
                gfn = sub >> 12
                page_end = min(e.sub_end, (gfn + 1) << 12)
                first = (sub & (PAGE_SIZE - 1)) // SUBPAGE_SIZE
                last = ((page_end - 1) & (PAGE_SIZE - 1)) // SUBPAGE_SIZE
                bits = ((1 << (last - first + 1)) - 1) << first
                maps[gfn] = maps.get(gfn, FULL_MAP) & ~bits
                sub = page_end
        return maps

    def gfns(self) -> list[int]:
        """The pages the policy protects something in, sorted."""
        return sorted(self._by_gfn)

    def entry_at(self, gpa: int) -> ProtectEntry | None:
        """The entry responsible for ``gpa``: the first (in policy order) whose byte range
        contains it, else the first whose rounded-out sub-pages do; ``None`` if ``gpa``
        is in no protected sub-page."""
        candidates = self._by_gfn.get(gpa >> 12, ())
        for e in candidates:
            if e.contains(gpa):
                return e
        for e in candidates:
            if e.covers(gpa):
                return e
        return None

    def decision_at(self, gpa: int) -> Decision | None:
        """The decision for a violating write at ``gpa``; ``None`` if not protected."""
        e = self.entry_at(gpa)
        return e.decision if e is not None else None

    def describe(self) -> list[str]:
        return [str(e) for e in self._entries]


# -- parsing ---------------------------------------------------------------------


def _parse_decision(value, where: str) -> Decision:
    if isinstance(value, Decision):
        d = value
    elif isinstance(value, str):
        try:
            d = Decision(value.strip().lower())
        except ValueError:
            d = None
    else:
        raise PolicyError(f"{where}: decision must be a string ({_DECISION_NAMES}), got {type(value).__name__} "
                          f"{value!r}")
    if d not in POLICY_DECISIONS:
        raise PolicyError(f"{where}: unknown decision {value!r}; valid decisions: {_DECISION_NAMES}")
    return d


def _check_int(value, key: str, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(f"{where}: {key} must be an integer (hex allowed: 0x1000), got {type(value).__name__} "
                          f"{value!r}")


def _check_range(start: int, length: int, where: str) -> None:
    if start < 0:
        raise PolicyError(f"{where}: start {start} is negative")
    if length <= 0:
        raise PolicyError(f"{where}: length {length} must be positive")
    if start + length > MAX_GPA:
        raise PolicyError(f"{where}: range {start:#x}+{length:#x} runs past the 64-bit address space")


def _count_pages(total: int, e: ProtectEntry, where: str) -> int:
    """``total`` plus the pages ``e`` touches; a :class:`PolicyError` naming ``where`` if
    the entry alone, or the entries so far, exceed :data:`MAX_PROTECTED_PAGES`."""
    n = len(e.gfns())
    limit = f"a policy protects at most {MAX_PROTECTED_PAGES:,} pages ({MAX_PROTECTED_PAGES >> 8:,} MiB)"
    if n > MAX_PROTECTED_PAGES:
        raise PolicyError(f"{where}: range {e.start:#x}+{e.length:#x} covers {n:,} pages; {limit}")
    if total + n > MAX_PROTECTED_PAGES:
        raise PolicyError(f"{where}: range {e.start:#x}+{e.length:#x} ({n:,} page{'s' if n > 1 else ''}) brings "
                          f"the entries so far to {total + n:,} pages (overlaps count once per entry); {limit}")
    return total + n


def _parse_entry(raw, index: int, source: str, default: Decision, image) -> ProtectEntry:
    name = raw.get("name") if isinstance(raw, dict) else None
    where = _label(source, index, name if isinstance(name, str) else None)
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: must be a table ([[protect]]), got {type(raw).__name__}")
    unknown = [k for k in raw if k not in _ENTRY_KEYS]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, _ENTRY_KEYS, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise PolicyError(f"{where}: unknown key {', '.join(hints)}; valid keys: {', '.join(_ENTRY_KEYS)}")
    if name is not None and not isinstance(name, str):
        raise PolicyError(f"{where}: name must be a string, got {type(name).__name__} {name!r}")
    decision = _parse_decision(raw["decision"], where) if "decision" in raw else default
    for key in ("start", "offset", "length"):
        if key in raw:
            _check_int(raw[key], key, where)

    if "symbol" in raw:
        sym_name = raw["symbol"]
        if not isinstance(sym_name, str) or not sym_name:
            raise PolicyError(f"{where}: symbol must be a non-empty string, got {sym_name!r}")
        if "start" in raw:
            raise PolicyError(f"{where}: both symbol ({sym_name!r}) and start given; use one of them")
        if image is None:
            raise PolicyError(
                f"{where}: symbol {sym_name!r} given but no guest ELF to resolve it against; "
                "load the policy with the guest image (or use start/length)"
            )
        try:
            sym = image.symbol(sym_name)
        except SymbolNotFound as e:
            raise PolicyError(f"{where}: unknown symbol {sym_name!r} in {image.where}{e.hint}") from None
        offset = raw.get("offset", 0)
        try:
            start, length = symbol_span(sym, offset, raw.get("length"))
        except ValueError as e:
            raise PolicyError(f"{where}: {e}") from None
        label = name or (f"{sym_name}+{offset:#x}" if offset else sym_name)
    else:
        if "offset" in raw:
            raise PolicyError(f"{where}: offset applies only with symbol; add it to start instead")
        if "start" not in raw:
            missing = "symbol or start" + ("" if "length" in raw else " (with length)")
            raise PolicyError(f"{where}: missing {missing}; an entry needs symbol = \"...\" or start and length")
        if "length" not in raw:
            raise PolicyError(f"{where}: missing length (start = {raw['start']:#x} given)")
        start, length = raw["start"], raw["length"]
        label = name or f"{start:#x}:{length:#x}"
    _check_range(start, length, where)
    return ProtectEntry(label, start, length, decision)


def symbol_span(sym, offset: int, length: int | None) -> tuple[int, int]:
    """``(start, length)`` of ``length`` bytes (None: the rest of the symbol) at
    ``offset`` into symbol ``sym`` — the one rule for SYMBOL[+OFFSET][:LENGTH] in
    policies, ``monitor --protect-symbols`` and ``replay --protect``.  A ValueError (its
    message names no place: callers add theirs) for a negative offset, a length that is
    not positive, or bytes past the symbol's end (which would protect whatever lies
    after it); a symbol of size 0 (a label) needs a length and is not bounded."""
    if offset < 0:
        raise ValueError(f"offset {offset} is negative")
    if length is None:
        if sym.size == 0:
            raise ValueError(f"symbol {sym.name!r} has size 0; give a length")
        if offset >= sym.size:
            raise ValueError(f"offset {offset:#x} is past the end of symbol {sym.name!r} (size {sym.size:#x})")
        length = sym.size - offset
    elif length <= 0:
        raise ValueError(f"length {length} must be positive")
    elif sym.size and offset + length > sym.size:
        raise ValueError(f"{offset:#x}+{length:#x} runs past the end of symbol {sym.name!r} (size {sym.size:#x}); "
                         "give a start and length to protect memory outside a symbol")
    return sym.addr + offset, length


def parse_policy(text: str | bytes, *, source: str = "<string>", image: "GuestImage | None" = None) -> Policy:
    """Parse a TOML policy (``str``, or UTF-8 ``bytes``); ``symbol`` entries resolve
    against ``image``."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PolicyError(f"{source}: not UTF-8 text: byte {e.start} is {raw[e.start:e.start + 1]!r}; "
                              "a policy is a UTF-8 TOML file") from None
    if not isinstance(text, str):
        raise PolicyError(f"{source}: a policy is TOML text (str or UTF-8 bytes), got {type(text).__name__}")
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark (some editors write one): not TOML, no meaning
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{source}: TOML syntax error: {e}") from None
    except RecursionError:
        raise PolicyError(f"{source}: TOML arrays or inline tables nested too deeply to parse; "
                          "a policy needs no nesting beyond [[protect]] tables") from None
    except ValueError as e:  # e.g. an integer literal longer than int() accepts (4300 digits)
        problem = str(e)
        if "integer string conversion" in problem:
            problem = "an integer literal has thousands of digits (no 64-bit address needs more than 20)"
        raise PolicyError(f"{source}: TOML value error: {problem}") from None
    unknown = [k for k in doc if k not in _TOP_KEYS]
    if unknown:
        hint = ""
        if any(k in _ENTRY_KEYS for k in unknown):
            hint = " (entry keys go in a [[protect]] table)"
        raise PolicyError(
            f"{source}: unknown top-level key {', '.join(map(repr, unknown))}{hint}; valid keys: {', '.join(_TOP_KEYS)}"
        )
    default = _parse_decision(doc["decision"], source) if "decision" in doc else Decision.SKIP
    raw_entries = doc.get("protect", [])
    if not isinstance(raw_entries, list):
        raise PolicyError(f"{source}: protect must be an array of tables ([[protect]]), got {type(raw_entries).__name__}")
    entries = [_parse_entry(raw, i, source, default, image) for i, raw in enumerate(raw_entries, 1)]
    return Policy(entries, source=source, default_decision=default)


def load_policy(path: str | os.PathLike, image: "GuestImage | str | os.PathLike | None" = None) -> Policy:
    """Read and parse a TOML policy file; ``image`` (a GuestImage or the path of a guest
    ELF) resolves ``symbol`` entries."""
    try:
        path = Path(path)
    except TypeError:
        raise PolicyError(f"policy path must be a file path (str or os.PathLike), got {type(path).__name__} "
                          f"{path!r}") from None
    data = _read_policy_file(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PolicyError(f"{path}: not UTF-8 text: line {line} (byte {e.start}) has {data[e.start:e.start + 1]!r}; "
                          "a policy is a UTF-8 TOML file") from None
    if image is None or hasattr(image, "symbols"):
        img = cast("GuestImage | None", image)
    else:
        from .guests.elf import GuestImageError, load_elf

        try:
            img = load_elf(cast("str | Path", image))
        except GuestImageError as e:
            raise PolicyError(f"{path}: cannot load the guest image that resolves its symbols: {e}") from None
    return parse_policy(text, source=str(path), image=img)


def _read_policy_file(path: Path) -> bytes:
    """The bytes of a regular file of at most :data:`MAX_POLICY_SIZE` bytes; a directory,
    device or FIFO is refused before a byte is read (``/dev/zero`` would never end)."""
    try:
        return read_regular_file(path, MAX_POLICY_SIZE, "a policy file")
    except FileProblem as e:
        raise PolicyError(f"{path}: {e}") from None


def parse_range_arg(arg: str, option: str = "--protect") -> tuple[int, int]:
    """``"0x1000:256"`` → ``(0x1000, 256)``: START:LENGTH, each decimal or 0x/0o/0b-prefixed,
    a range within the 64-bit address space; a :class:`PolicyError` naming ``option``."""
    if not isinstance(arg, str):
        raise PolicyError(f"{option}: expected START:LENGTH text, e.g. 0x401000:256, got {type(arg).__name__} {arg!r}")
    text = arg.strip()
    start_s, sep, length_s = text.partition(":")
    if not sep or not start_s.strip() or not length_s.strip():
        raise PolicyError(f"{option} {arg!r}: expected START:LENGTH, e.g. 0x401000:256")
    values = []
    for what, s in (("START", start_s), ("LENGTH", length_s)):
        try:
            values.append(int(s.strip(), 0))
        except ValueError:
            raise PolicyError(f"{option} {arg!r}: {what} {s.strip()!r} is not an integer (decimal or 0x...)") from None
    start, length = values
    _check_range(start, length, f"{option} {arg!r}")
    return start, length


def parse_protect_arg(arg: str) -> tuple[int, int]:
    """``--protect START:LENGTH`` (see :func:`parse_range_arg`)."""
    return parse_range_arg(arg, "--protect")
