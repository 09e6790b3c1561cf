"""What the write path reports: SPP violations, the handler's decisions, write results."""

from __future__ import annotations

from typing import NamedTuple
from enum import Enum


class Decision(Enum):
    """What to do with a write that sub-page permissions deny.

    SKIP: discard the write (the default with no handler).
    EMULATE: commit the write; the protection stays (tracking).
    UNPROTECT: make the touched sub-pages writable, then commit.
    STOP: write nothing; the engine ends the run and returns the event.
    """

    SKIP = "skip"
    EMULATE = "emulate"
    UNPROTECT = "unprotect"
    STOP = "stop"

    @classmethod
    def parse(cls, value: "Decision | str") -> "Decision":
        if isinstance(value, Decision):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(f"decision {value!r}: must be one of skip, emulate, unprotect, stop") from None


class SppViolation(NamedTuple):
    """An SPP-induced EPT violation: a write to a protected 128-byte sub-page.

    ``gpa``/``size``/``data`` are the part of the write on the faulting page (a write
    crossing a page boundary is translated per page); ``write_gpa``/``write_size`` the
    whole write.  ``subpages`` are the sub-pages of that page the write touches,
    ``denied`` those whose permission bit is 0.
    """

    gpa: int
    gla: int | None
    size: int
    data: bytes
    rip: int | None
    vcpu: int
    qualification: int
    subpages: tuple[int, ...]
    denied: tuple[int, ...]
    write_gpa: int
    write_size: int

    @property
    def gfn(self) -> int:
        return self.gpa >> 12

    def to_dict(self) -> dict:
        return {
            "gpa": self.gpa, "gla": self.gla, "size": self.size, "data": self.data.hex(), "rip": self.rip,
            "vcpu": self.vcpu, "qualification": self.qualification, "subpages": list(self.subpages),
            "denied": list(self.denied), "write_gpa": self.write_gpa, "write_size": self.write_size,
        }


class WriteResult(NamedTuple):
    """Outcome of :meth:`Vm.write`.

    ``committed``: the bytes reached guest memory.  ``decision``: the handler's decision
    when a violation occurred (None otherwise).  ``events``: the violations, in address
    order (at most one per page).  ``stopped``: a STOP decision; the engine must end
    the run.  ``readonly``: the write hit a read-only memslot (KVM would report an
    MMIO exit) and was discarded.  ``spp_misses``: SPP misses handled on the way.
    """

    committed: bool
    decision: Decision | None = None
    events: tuple[SppViolation, ...] = ()
    stopped: bool = False
    readonly: bool = False
    spp_misses: int = 0

    @property
    def event(self) -> SppViolation | None:
        return self.events[-1] if self.events else None


ALLOWED = WriteResult(True)
