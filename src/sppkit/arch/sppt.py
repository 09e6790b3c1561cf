"""SPPT formats: the SPPTP, non-leaf entries (L4E, L3E, L2E) and the L1E "SPP vector".

Spec: docs/spp-rules.md §1 (SPPTP), §3 (format and walk).  Pure functions only.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ept import addr_mask, check_maxphyaddr, check_u64, high_reserved

VMCS_SPPTP = 0x2030  #: 64-bit control field "sub-page-permission-table pointer" (full)
VMCS_SPPTP_HIGH = 0x2031
VMCS_EPTP = 0x201A

SPPT_PRESENT = 1 << 0
SUBPAGE_SIZE = 128
SUBPAGES_PER_PAGE = 32
SPP_VECTOR_ODD_BITS = 0xAAAA_AAAA_AAAA_AAAA  #: reserved bits of an L1E
SPP_VECTOR_EVEN_BITS = 0x5555_5555_5555_5555
FULL_ACCESS_MAP = 0xFFFF_FFFF  #: 32-bit access map: every sub-page writable
SPPT_LEVEL_NAMES = {4: "L4E", 3: "L3E", 2: "L2E", 1: "L1E"}
SPPT_SHIFTS = ((4, 39), (3, 30), (2, 21), (1, 12))


def sppt_nonleaf_reserved(maxphyaddr: int) -> int:
    """Reserved bits of a present L4E/L3E/L2E: 63:52, 51:N and 11:1."""
    return (0xFFF << 52) | high_reserved(maxphyaddr) | 0xFFE


def spptp_check(spptp: int, maxphyaddr: int) -> str | None:
    """VM-entry checks on SPPTP (when the SPP control is 1); description of the failure or None."""
    if spptp & 0xFFF:
        return f"SPPTP bits 11:0 must be 0 (got {spptp:#x})"
    if spptp >> maxphyaddr:
        return f"SPPTP sets bits at or above MAXPHYADDR ({maxphyaddr}): {spptp:#x}"
    return None


def subpage_index(gpa: int) -> int:
    """Sub-page number 0..31 of a GPA: bits 11:7."""
    return (gpa >> 7) & 0x1F


def subpages_touched(gpa: int, size: int) -> range:
    """Sub-page numbers touched by ``size`` bytes at ``gpa`` (within one 4-KiB page)."""
    first = (gpa & 0xFFF) >> 7
    last = ((gpa & 0xFFF) + size - 1) >> 7
    return range(first, min(last, 31) + 1)


def vector_from_map(access_map: int) -> int:
    """Spread a 32-bit access map (bit i = sub-page i writable) onto the even bits of a vector."""
    if not isinstance(access_map, int) or isinstance(access_map, bool) or not 0 <= access_map <= FULL_ACCESS_MAP:
        raise ValueError(f"access map {access_map!r} is not a 32-bit value")
    v = access_map
    # Interleave with zeros (Morton spread of 32 bits into 64).
    v = (v | (v << 16)) & 0x0000_FFFF_0000_FFFF
    v = (v | (v << 8)) & 0x00FF_00FF_00FF_00FF
    v = (v | (v << 4)) & 0x0F0F_0F0F_0F0F_0F0F
    v = (v | (v << 2)) & 0x3333_3333_3333_3333
    v = (v | (v << 1)) & 0x5555_5555_5555_5555
    return v


def map_from_vector(vector: int) -> int:
    """Gather the even bits of an SPP vector into a 32-bit access map (odd bits ignored)."""
    check_u64("vector", vector)
    v = vector & SPP_VECTOR_EVEN_BITS
    v = (v | (v >> 1)) & 0x3333_3333_3333_3333
    v = (v | (v >> 2)) & 0x0F0F_0F0F_0F0F_0F0F
    v = (v | (v >> 4)) & 0x00FF_00FF_00FF_00FF
    v = (v | (v >> 8)) & 0x0000_FFFF_0000_FFFF
    v = (v | (v >> 16)) & 0x0000_0000_FFFF_FFFF
    return v


@dataclass(frozen=True, slots=True)
class SpptEntry:
    """A decoded SPPT entry.  ``level`` 4..2 are table pointers, 1 is the SPP vector."""

    raw: int
    level: int
    present: bool  # always True for an L1E: it has no present bit
    address: int | None  # next-level table, non-leaf only
    reserved: int  # reserved bits that are set (0 when well formed)
    access_map: int | None  # L1E only: the 32-bit map of writable sub-pages

    @property
    def name(self) -> str:
        return SPPT_LEVEL_NAMES[self.level]

    @property
    def misconfigured(self) -> bool:
        return self.present and self.reserved != 0


def decode_sppt_entry(raw: int, level: int, maxphyaddr: int = 46) -> SpptEntry:
    check_u64("raw", raw)
    check_maxphyaddr(maxphyaddr)
    if not isinstance(level, int) or isinstance(level, bool) or level not in SPPT_LEVEL_NAMES:
        raise ValueError(f"SPPT level {level!r}: must be 4 (L4E), 3, 2 or 1 (L1E)")
    if level == 1:
        return SpptEntry(raw, 1, True, None, raw & SPP_VECTOR_ODD_BITS, map_from_vector(raw))
    return SpptEntry(
        raw,
        level,
        bool(raw & SPPT_PRESENT),
        raw & addr_mask(maxphyaddr),
        raw & sppt_nonleaf_reserved(maxphyaddr),
        None,
    )
