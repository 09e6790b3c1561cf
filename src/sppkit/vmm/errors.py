"""Errors a user of :class:`sppkit.Vm` can cause, each naming the bad value."""

from __future__ import annotations


class VmmError(Exception):
    """Base of sppkit.vmm errors."""


class MemslotError(VmmError, ValueError):
    """A memslot request that cannot be honoured (overlap, alignment, unknown slot...)."""


class GpaNotMapped(VmmError, LookupError):
    """A guest-physical address outside every memslot."""

    def __init__(self, gpa: int, what: str = "access") -> None:
        self.gpa = gpa
        super().__init__(f"{what} at gpa={gpa:#x}: no memslot covers this guest-physical address")


class SppError(VmmError):
    """Base of the SPP interface's errors."""


class SppNotEnabled(SppError):
    def __init__(self) -> None:
        super().__init__("SPP is not enabled on this VM: call vm.enable_spp() first")


class SppBatchTooLarge(SppError, ValueError):
    def __init__(self, npages: int, limit: int) -> None:
        self.npages = npages
        super().__init__(f"{npages} pages in one call: at most {limit} (the batch limit enable_spp() returned)")


class GfnNotInMemslot(SppError, LookupError):
    def __init__(self, gfn: int) -> None:
        self.gfn = gfn
        super().__init__(f"gfn={gfn:#x} (gpa {gfn << 12:#x}) is outside every memslot")


class GfnReadOnly(SppError, ValueError):
    def __init__(self, gfn: int, slot: int) -> None:
        self.gfn = gfn
        super().__init__(
            f"gfn={gfn:#x} lies in read-only memslot {slot}: sub-page write permissions cannot "
            "grant writes to read-only memory"
        )


class SppMisconfiguration(SppError):
    """An SPP-related event with qualification bit 11 = 0: the SPPT is malformed.
    The VMM built it, so this is a VMM bug (or a table corrupted on purpose)."""

    def __init__(self, exit, path) -> None:
        self.exit = exit
        self.path = path  # [(name, entry_hpa, raw), ...] L4E -> L1E
        entries = ", ".join(f"{n}@{h:#x}={r:#018x}" for n, h, r in path)
        super().__init__(f"SPP misconfiguration at gpa={exit.gpa:#x} ({exit.detail} in {exit.level}); SPPT path: {entries}")
