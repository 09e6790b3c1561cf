"""sppkit — Intel EPT-based Sub-Page write Protection (SPP) in Python.

``sppkit.arch`` is the processor model; ``sppkit.vmm`` the hypervisor side.  The names
below are ``sppkit.vmm``'s, loaded on first use (so that ``import sppkit`` — and the
console script's start — loads nothing heavy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .vmm import (
        Decision,
        GfnNotInMemslot,
        GpaNotMapped,
        MemslotError,
        SppError,
        SppMisconfiguration,
        SppNotEnabled,
        SppViolation,
        Vm,
        WriteResult,
    )

__version__ = "0.1.0"
__all__ = [
    "Decision", "GfnNotInMemslot", "GpaNotMapped", "MemslotError", "SppError", "SppMisconfiguration",
    "SppNotEnabled", "SppViolation", "Vm", "WriteResult", "__version__",
]


def __getattr__(name: str):
    if name in __all__:
        from . import vmm

        value = getattr(vmm, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sppkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
