"""sppkit.vmm — the hypervisor side of SPP: memslots, EPT management, access maps,
SPPT (lazy or eager), dirty logging, violations and decisions, statistics."""

from .errors import (
    GfnNotInMemslot,
    GfnReadOnly,
    GpaNotMapped,
    MemslotError,
    SppBatchTooLarge,
    SppError,
    SppMisconfiguration,
    SppNotEnabled,
    VmmError,
)
from .events import Decision, SppViolation, WriteResult
from .memslots import Memslot
from .stats import Stats, TopCounter
from .vm import SPP_BATCH_LIMIT, Vm

__all__ = [n for n in dir() if not n.startswith("_")]
