"""sppkit — Intel EPT-based Sub-Page write Protection (SPP) in Python.

``sppkit.arch`` is the processor model; ``sppkit.vmm`` the hypervisor side.
"""

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
