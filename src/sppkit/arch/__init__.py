"""sppkit.arch — the processor: EPT + SPPT walks, SPP eligibility, VM exits, TLB/INVEPT.

Exact to the bit as ``docs/spp-rules.md`` writes it down; knows nothing of
hypervisors.  Modelling choices: docs/modelling.md.
"""

from .builders import EptBuilder, SpptBuilder
from .ept import (
    EPT_ACCESSED,
    EPT_DIRTY,
    EPT_LARGE,
    EPT_R,
    EPT_RWX,
    EPT_SPP,
    EPT_SUPPRESS_VE,
    EPT_W,
    EPT_X,
    EPTP_AD_ENABLE,
    MT_UC,
    MT_WB,
    PAGE_1G,
    PAGE_2M,
    PAGE_4K,
    EptEntry,
    Eptp,
    Level,
    decode_ept_entry,
    decode_eptp,
    make_ept_entry,
    make_eptp,
)
from .exits import (
    EXIT_REASON_EPT_MISCONFIG,
    EXIT_REASON_EPT_VIOLATION,
    EXIT_REASON_SPP,
    QUAL_SPP_MISS,
    EptMisconfig,
    EptViolation,
    ExitInfo,
    SppEvent,
    VmEntryFailure,
    VmExit,
)
from .memory import PAGE_SIZE, HostMemory, PhysicalAddressError
from .processor import (
    SECONDARY_ENABLE_EPT,
    SECONDARY_SPP,
    SPP_WRITE_CHECK_ALL,
    SPP_WRITE_CHECK_FIRST,
    Access,
    HostRange,
    Processor,
)
from .sppt import (
    FULL_ACCESS_MAP,
    SPP_VECTOR_ODD_BITS,
    SUBPAGE_SIZE,
    VMCS_SPPTP,
    SpptEntry,
    decode_sppt_entry,
    map_from_vector,
    subpage_index,
    vector_from_map,
)
from .tlb import TranslationCache

__all__ = [n for n in dir() if not n.startswith("_")]
