"""Guest memory as memslots: guest-physical ranges backed by host-physical frames."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from .errors import GpaNotMapped, MemslotError

PAGE = 4096
GPA_LIMIT = 1 << 48


@dataclass(eq=False)
class Memslot:
    """One memslot.  ``hpa`` is the host-physical address backing ``gpa``; the range is
    contiguous in host-physical space.  ``maps``, once SPP is enabled, holds the 32-bit
    sub-page access map of every protected page, by page index (a page not in it has
    the full map 0xFFFFFFFF: memory grows with the protected pages, not the slot);
    ``dirty`` the dirty-log bits."""

    slot: int
    gpa: int
    size: int
    hpa: int
    readonly: bool = False
    dirty_log: bool = False
    maps: dict[int, int] | None = None
    # (Any: a numpy bool array, a bit per page, or None)
    dirty: Any = field(default=None, repr=False)

    @property
    def npages(self) -> int:
        return self.size >> 12

    @property
    def base_gfn(self) -> int:
        return self.gpa >> 12

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int) -> bool:
        return self.gpa <= gpa < self.gpa + self.size

    def alloc_maps(self) -> None:
        self.maps = {}

    def describe(self) -> str:
        return f"slot {self.slot} [{self.gpa:#x}, {self.end:#x})"


class MemslotTable:
    """The VM's memslots, indexed by id and by guest-physical range."""

    def __init__(self) -> None:
        self.by_id: dict[int, Memslot] = {}
        self._starts: list[int] = []  # sorted gpa starts
        self._sorted: list[Memslot] = []
        self._last: Memslot | None = None
        #: moves whenever a memslot is inserted or removed (added, deleted or moved)
        self.generation = 0

    def __iter__(self):
        return iter(self._sorted)

    def __len__(self) -> int:
        return len(self._sorted)

    @staticmethod
    def check_id(slot: object) -> None:
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < 1 << 16:
            raise MemslotError(f"slot={slot!r}: must be an integer from 0 to 65535")

    def validate_new(self, slot: int, gpa: int, size: int, *, ignore: int | None = None) -> None:
        self.check_id(slot)
        for name, v in (("gpa", gpa), ("size", size)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise MemslotError(f"{name}={v!r}: must be an integer")
        if gpa < 0 or gpa % PAGE:
            raise MemslotError(f"gpa={gpa:#x}: must be a non-negative multiple of 4 KiB")
        if size <= 0 or size % PAGE:
            raise MemslotError(f"size={size:#x}: must be a positive multiple of 4 KiB")
        if gpa + size > GPA_LIMIT:
            raise MemslotError(f"[{gpa:#x}, {gpa + size:#x}) exceeds the 48-bit guest-physical space")
        if slot in self.by_id and slot != ignore:
            raise MemslotError(f"slot {slot} is in use ({self.by_id[slot].describe()}); delete or move it")
        for s in self._sorted:
            if s.slot != ignore and s.gpa < gpa + size and gpa < s.end:
                raise MemslotError(f"[{gpa:#x}, {gpa + size:#x}) overlaps {s.describe()}")

    def insert(self, m: Memslot) -> None:
        self.generation += 1
        self.by_id[m.slot] = m
        i = bisect.bisect(self._starts, m.gpa)
        self._starts.insert(i, m.gpa)
        self._sorted.insert(i, m)

    def remove(self, slot: int) -> Memslot:
        m = self.get(slot)
        self.generation += 1
        del self.by_id[slot]
        i = self._sorted.index(m)
        del self._sorted[i]
        del self._starts[i]
        if self._last is m:
            self._last = None
        return m

    def get(self, slot: int) -> Memslot:
        self.check_id(slot)
        try:
            return self.by_id[slot]
        except KeyError:
            raise MemslotError(f"slot {slot!r} does not exist (slots: {sorted(self.by_id) or 'none'})") from None

    def find(self, gpa: int) -> Memslot | None:
        m = self._last
        if m is not None and m.gpa <= gpa < m.gpa + m.size:
            return m
        i = bisect.bisect(self._starts, gpa) - 1
        if i >= 0:
            m = self._sorted[i]
            if gpa < m.gpa + m.size:
                self._last = m
                return m
        return None

    def lookup(self, gpa: int, what: str = "access") -> Memslot:
        m = self.find(gpa)
        if m is None:
            raise GpaNotMapped(gpa, what)
        return m
