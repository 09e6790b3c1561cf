"""VM exits that a guest-physical access can cause, and their exit qualifications.

Spec: docs/spp-rules.md §4.  Each exit is an exception carrying the fields the
processor writes to the VMCS: ``reason``, ``qualification``, ``gpa`` (guest-physical
address field) and ``gla`` (guest-linear address field, None when not valid or not
known), plus diagnostics the VMCS does not hold: the level that failed and its raw entry.
"""

from __future__ import annotations

from typing import NamedTuple

EXIT_REASON_EPT_VIOLATION = 48
EXIT_REASON_EPT_MISCONFIG = 49
EXIT_REASON_SPP = 66

# EPT-violation exit-qualification bits (SDM; spec §4)
QUAL_READ = 1 << 0
QUAL_WRITE = 1 << 1
QUAL_FETCH = 1 << 2
QUAL_READABLE = 1 << 3  # AND of bit 0 over the entries used
QUAL_WRITABLE = 1 << 4  # AND of bit 1
QUAL_EXECUTABLE = 1 << 5  # AND of bit 2
QUAL_USER_EXECUTABLE = 1 << 6  # AND of bit 10 (mode-based execute; not modelled, always 0)
QUAL_GLA_VALID = 1 << 7
QUAL_GLA_TRANSLATION = 1 << 8  # access to the translation of a linear address
QUAL_NMI_UNBLOCKING = 1 << 12
# SPP-related event (exit 66) qualification
QUAL_SPP_MISS = 1 << 11  # 1 = SPP miss, 0 = SPP misconfiguration


class VmExit(Exception):
    """Base class of the VM exits raised by :meth:`Processor.translate`."""

    reason: int = 0
    name: str = "VM exit"

    def __init__(
        self,
        qualification: int,
        gpa: int,
        gla: int | None,
        *,
        level: str | None = None,
        entry: int | None = None,
        entry_hpa: int | None = None,
        detail: str = "",
    ) -> None:
        self.qualification = qualification
        self.gpa = gpa
        self.gla = gla
        self.level = level
        self.entry = entry
        self.entry_hpa = entry_hpa
        self.detail = detail
        # The message is built on demand (__str__): exits are frequent, messages are not.

    def __str__(self) -> str:
        return self._message()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._message()!r})"

    def _message(self) -> str:
        s = f"{self.name} (exit {self.reason}) at gpa={self.gpa:#x} qualification={self.qualification:#x}"
        if self.level is not None:
            s += f", {self.level}"
            if self.entry is not None:
                s += f"={self.entry:#018x}"
            if self.entry_hpa is not None:
                s += f" @hpa {self.entry_hpa:#x}"
        if self.detail:
            s += f": {self.detail}"
        return s

    def __reduce__(self):  # keep exits picklable with their keyword fields
        return (_rebuild, (type(self), self.qualification, self.gpa, self.gla, self.level, self.entry, self.entry_hpa, self.detail))


def _rebuild(cls, qualification, gpa, gla, level, entry, entry_hpa, detail):
    return cls(qualification, gpa, gla, level=level, entry=entry, entry_hpa=entry_hpa, detail=detail)


class EptViolation(VmExit):
    """Exit 48: not-present EPT entry, or an access the accumulated permissions deny
    (including a write that the SPP vector denies: there is no SPP bit in the qualification)."""

    reason = EXIT_REASON_EPT_VIOLATION
    name = "EPT violation"

    @property
    def is_write(self) -> bool:
        return bool(self.qualification & QUAL_WRITE)


class EptMisconfig(VmExit):
    """Exit 49: a present EPT entry with reserved bits, a bad memory type or W without R.
    The qualification is 0 and the guest-linear address field is not written."""

    reason = EXIT_REASON_EPT_MISCONFIG
    name = "EPT misconfiguration"


class SppEvent(VmExit):
    """Exit 66 "SPP-related event": an SPP miss (qualification bit 11 = 1) or an SPP
    misconfiguration (bit 11 = 0) met while determining a write's sub-page permission."""

    reason = EXIT_REASON_SPP
    name = "SPP-related event"

    @property
    def is_miss(self) -> bool:
        return bool(self.qualification & QUAL_SPP_MISS)

    @property
    def is_misconfig(self) -> bool:
        return not self.is_miss

    def _message(self) -> str:
        kind = "SPP miss" if self.qualification & QUAL_SPP_MISS else "SPP misconfiguration"
        return f"{kind}: " + super()._message()


class ExitInfo(NamedTuple):
    """A VM exit described but not raised: what :meth:`Processor.translate_one` returns
    for an access that exits.  Building a tuple is much cheaper than building and
    raising an exception, which matters on the write path of a VMM that handles
    (and discards) thousands of denied writes a second.  :meth:`exception` gives the
    exit as :meth:`Processor.translate` raises it."""

    kind: type  #: EptViolation, EptMisconfig or SppEvent
    qualification: int
    gpa: int
    gla: int | None
    level: str | None = None
    entry: int | None = None
    entry_hpa: int | None = None
    detail: str = ""

    def exception(self) -> VmExit:
        return self.kind(
            self.qualification, self.gpa, self.gla,
            level=self.level, entry=self.entry, entry_hpa=self.entry_hpa, detail=self.detail,
        )


class VmEntryFailure(ValueError):
    """VM entry fails with VM-instruction error 7 (invalid control field)."""

    VM_INSTRUCTION_ERROR = 7

    def __init__(self, check: str) -> None:
        self.check = check
        self.error_number = self.VM_INSTRUCTION_ERROR
        super().__init__(f"VM entry fails (VM-instruction error 7, invalid control field): {check}")
