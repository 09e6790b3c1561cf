"""EPT formats: the EPTP, the four levels of EPT paging-structure entries, pure decoders.

Entries stay raw ``int`` values in host memory; everything here is a pure function
of the raw value (and MAXPHYADDR), so it can be tested without a processor.
Bit positions follow the SDM tables (spec: docs/spp-rules.md §2).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TypeGuard

from .memory import check_maxphyaddr

# -- EPT entry bits ------------------------------------------------------------
EPT_R = 1 << 0
EPT_W = 1 << 1
EPT_X = 1 << 2
EPT_RWX = EPT_R | EPT_W | EPT_X
EPT_MEMTYPE_SHIFT = 3  # bits 5:3 of a leaf
EPT_MEMTYPE_MASK = 0x7 << EPT_MEMTYPE_SHIFT
EPT_IGNORE_PAT = 1 << 6
EPT_LARGE = 1 << 7  # PDPTE: 1-GiB page; PDE: 2-MiB page
EPT_ACCESSED = 1 << 8
EPT_DIRTY = 1 << 9
EPT_USER_X = 1 << 10  # mode-based execute control (not modelled: see docs/modelling.md)
EPT_VERIFY_GUEST_PAGING = 1 << 57
EPT_PAGING_WRITE = 1 << 58
EPT_SSS = 1 << 60  # supervisor shadow stack
EPT_SPP = 1 << 61  # sub-page write permissions (4-KiB PTE only)
EPT_SUPPRESS_VE = 1 << 63

# -- memory types ----------------------------------------------------------------
MT_UC, MT_WC, MT_WT, MT_WP, MT_WB = 0, 1, 4, 5, 6
VALID_LEAF_MEMTYPES = frozenset({MT_UC, MT_WC, MT_WT, MT_WP, MT_WB})
VALID_EPTP_MEMTYPES = frozenset({MT_UC, MT_WB})
MEMTYPE_NAMES = {MT_UC: "UC", MT_WC: "WC", MT_WT: "WT", MT_WP: "WP", MT_WB: "WB"}

# -- EPTP bits -------------------------------------------------------------------
EPTP_MEMTYPE_MASK = 0x7
EPTP_WALK_LENGTH_SHIFT = 3  # bits 5:3 = walk length - 1
EPTP_AD_ENABLE = 1 << 6
EPTP_SSS_ENABLE = 1 << 7
EPTP_RESERVED_LOW = 0xF00  # bits 11:8


class Level(IntEnum):
    """EPT (and SPPT) levels, numbered as Bochs and KVM do: 4 = top, 1 = leaf table."""

    PML4E = 4
    PDPTE = 3
    PDE = 2
    PTE = 1

    @property
    def shift(self) -> int:
        """Lowest GPA bit of this level's index (index = GPA[shift+8:shift])."""
        return 12 + 9 * (self.value - 1)

    @property
    def page_size(self) -> int:
        """Bytes mapped by one entry of this level."""
        return 1 << self.shift


#: Geometry as data: (level, index shift, leaf allowed at this level, leaf size).
EPT_GEOMETRY = (
    (Level.PML4E, 39, False, None),
    (Level.PDPTE, 30, True, 1 << 30),
    (Level.PDE, 21, True, 1 << 21),
    (Level.PTE, 12, True, 1 << 12),
)

PAGE_4K = 1 << 12
PAGE_2M = 1 << 21
PAGE_1G = 1 << 30
LEAF_LEVEL_FOR_SIZE = {PAGE_4K: Level.PTE, PAGE_2M: Level.PDE, PAGE_1G: Level.PDPTE}

#: Largest guest-physical address + 1 that 4-level EPT translates.
GPA_LIMIT = 1 << 48


def _show(v: object) -> str:
    """An argument as an error message names it: an int in hex, anything else by repr."""
    return f"{v:#x}" if type(v) is int else repr(v)


def _is_int(v: object) -> TypeGuard[int]:
    """An integer argument: an ``int`` (or IntEnum), not a bool, not a numpy scalar."""
    return isinstance(v, int) and not isinstance(v, bool)


def check_gpa(gpa: object, name: str = "gpa") -> None:
    """Refuse (ValueError) anything but an int in the 48-bit guest-physical space."""
    if not _is_int(gpa) or not 0 <= gpa < GPA_LIMIT:
        raise ValueError(f"{name}={_show(gpa)}: must be an integer from 0 to 2**48 - 1 (48-bit guest-physical address)")


def check_u64(name: str, v: object) -> None:
    """Refuse (ValueError) anything but an unsigned 64-bit int (as ``Processor.load_controls``)."""
    if not _is_int(v) or not 0 <= v < 1 << 64:
        raise ValueError(f"{name}={v!r}: must be an unsigned 64-bit integer")


def _check_level(level: object) -> None:
    if not _is_int(level) or level not in (1, 2, 3, 4):
        raise ValueError(f"level={level!r}: must be a Level, 4 (PML4E) to 1 (PTE)")


def check_leaf_memory_type(memory_type: object) -> None:
    """Refuse (ValueError) a leaf memory type other than UC, WC, WT, WP or WB."""
    if not _is_int(memory_type) or memory_type not in VALID_LEAF_MEMTYPES:
        raise ValueError(
            f"memory_type={memory_type!r}: must be one of {sorted(VALID_LEAF_MEMTYPES)} "
            "(UC, WC, WT, WP, WB)"
        )


def addr_mask(maxphyaddr: int) -> int:
    """Bits N-1:12: the physical-address field of a table pointer or entry."""
    return ((1 << maxphyaddr) - 1) & ~0xFFF


def high_reserved(maxphyaddr: int) -> int:
    """Bits 51:N, reserved in every EPT and SPPT entry."""
    return ((1 << 52) - 1) & ~((1 << maxphyaddr) - 1)


def reserved_mask(level: Level, leaf: bool, maxphyaddr: int) -> int:
    """Bits that must be 0 in a present EPT entry of ``level`` (leaf or not)."""
    rsv = high_reserved(maxphyaddr)
    if level == Level.PML4E:
        return rsv | 0xF8  # bits 7:3
    if level == Level.PTE:
        return rsv
    if not leaf:
        return rsv | 0x78  # bits 6:3 of a PDPTE/PDE pointing to a table
    if level == Level.PDPTE:
        return rsv | 0x3FFFF000  # bits 29:12 of a 1-GiB leaf
    return rsv | 0x1FF000  # bits 20:12 of a 2-MiB leaf


def leaf_address_mask(level: Level, maxphyaddr: int) -> int:
    """The page-frame field of a leaf at ``level`` (N-1:30, N-1:21 or N-1:12)."""
    return addr_mask(maxphyaddr) & ~(level.page_size - 1)


def is_present(raw: int) -> bool:
    """An EPT entry is present when any of bits 2:0 is 1."""
    return bool(raw & EPT_RWX)


def is_leaf(raw: int, level: Level) -> bool:
    """Whether a present entry at ``level`` maps a page (PTE always; PDE/PDPTE with bit 7)."""
    if level == Level.PTE:
        return True
    if level == Level.PML4E:
        return False
    return bool(raw & EPT_LARGE)


def misconfig_reason(raw: int, level: Level, maxphyaddr: int, *, execute_only: bool = True) -> str | None:
    """Why a *present* entry is an EPT misconfiguration, or None if it is well formed.

    SDM "EPT Misconfigurations": write without read; execute-only when not supported;
    a reserved bit set; a leaf with memory type 2, 3 or 7.
    """
    if raw & EPT_W and not raw & EPT_R:
        return "write permission without read permission (bit 1 = 1, bit 0 = 0)"
    if not execute_only and (raw & EPT_RWX) == EPT_X:
        return "execute-only entry, and execute-only translations are not supported"
    leaf = is_leaf(raw, level)
    rsv = raw & reserved_mask(level, leaf, maxphyaddr)
    if rsv:
        return f"reserved bits set: {rsv:#x}"
    if leaf:
        mt = (raw & EPT_MEMTYPE_MASK) >> EPT_MEMTYPE_SHIFT
        if mt not in VALID_LEAF_MEMTYPES:
            return f"invalid memory type {mt}"
    return None


@dataclass(frozen=True, slots=True)
class EptEntry:
    """A decoded EPT paging-structure entry (pure view of the raw u64)."""

    raw: int
    level: Level
    present: bool
    leaf: bool
    read: bool
    write: bool
    execute: bool
    address: int  # next table (non-leaf) or page frame (leaf)
    memory_type: int | None
    ignore_pat: bool
    accessed: bool
    dirty: bool
    spp: bool  # bit 61 meaningful only on a 4-KiB PTE
    suppress_ve: bool
    misconfig: str | None

    @property
    def page_size(self) -> int | None:
        return self.level.page_size if self.leaf else None


def decode_ept_entry(raw: int, level: Level | int, maxphyaddr: int = 46) -> EptEntry:
    """Decode a raw EPT entry at ``level`` (4 = PML4E … 1 = PTE)."""
    check_u64("raw", raw)
    check_maxphyaddr(maxphyaddr)
    _check_level(level)
    level = Level(level)
    present = is_present(raw)
    leaf = present and is_leaf(raw, level)
    amask = leaf_address_mask(level, maxphyaddr) if leaf else addr_mask(maxphyaddr)
    return EptEntry(
        raw=raw,
        level=level,
        present=present,
        leaf=leaf,
        read=bool(raw & EPT_R),
        write=bool(raw & EPT_W),
        execute=bool(raw & EPT_X),
        address=raw & amask,
        memory_type=((raw & EPT_MEMTYPE_MASK) >> EPT_MEMTYPE_SHIFT) if leaf else None,
        ignore_pat=bool(raw & EPT_IGNORE_PAT) if leaf else False,
        accessed=bool(raw & EPT_ACCESSED),
        dirty=bool(raw & EPT_DIRTY) if leaf else False,
        spp=bool(raw & EPT_SPP) if (leaf and level == Level.PTE) else False,
        suppress_ve=bool(raw & EPT_SUPPRESS_VE) if leaf else False,
        misconfig=misconfig_reason(raw, level, maxphyaddr) if present else None,
    )


def make_ept_entry(
    address: int,
    *,
    r: bool = True,
    w: bool = True,
    x: bool = True,
    leaf: bool = False,
    level: Level | int | None = None,
    memory_type: int | None = None,
    spp: bool = False,
    accessed: bool = False,
    dirty: bool = False,
) -> int:
    """Build a raw EPT entry.

    ``leaf=False`` (the default): a pointer to the next table, at ``level`` PML4E, PDPTE
    or PDE (the format is the same at each; a PTE always maps a page).  ``leaf=True``:
    an entry mapping a page at ``level`` PTE (the default), PDE or PDPTE — for the last
    two the large-page bit is set; ``memory_type`` defaults to WB.  The leaf-only fields
    (``memory_type``, ``spp``, ``dirty``) given for a table pointer, a table pointer at
    PTE level, or a leaf at PML4E level are refused (ValueError), never dropped.
    """
    if not _is_int(address) or not 0 <= address < 1 << 52:
        raise ValueError(f"address={_show(address)}: must be a host-physical address below 2**52")
    if address & 0xFFF:
        raise ValueError(f"address={address:#x} is not 4-KiB aligned (bits 11:0 must be 0)")
    if level is not None:
        _check_level(level)
        level = Level(level)
    raw = address | (EPT_R if r else 0) | (EPT_W if w else 0) | (EPT_X if x else 0)
    if accessed:
        raw |= EPT_ACCESSED
    if leaf:
        level = Level.PTE if level is None else level
        if level == Level.PML4E:
            raise ValueError("leaf=True at level PML4E: a PML4E cannot map a page (PDPTE, PDE or PTE can)")
        memory_type = MT_WB if memory_type is None else memory_type
        check_leaf_memory_type(memory_type)
        raw |= memory_type << EPT_MEMTYPE_SHIFT
        if level in (Level.PDE, Level.PDPTE):
            raw |= EPT_LARGE
        if dirty:
            raw |= EPT_DIRTY
        if spp:
            if level != Level.PTE:
                raise ValueError(f"spp=True at level {level.name}: bit 61 applies to 4-KiB leaves (PTEs) only; "
                                 "the processor ignores it on a 2-MiB or 1-GiB leaf")
            raw |= EPT_SPP
    else:
        if level == Level.PTE:
            raise ValueError("leaf=False at level PTE: a PTE always maps a page (pass leaf=True, "
                             "or a level above PTE for a table pointer)")
        given = [name for name, on in (("memory_type", memory_type is not None), ("spp", spp), ("dirty", dirty)) if on]
        if given:
            raise ValueError(f"{', '.join(given)} given for a table pointer (leaf=False): only an entry "
                             "that maps a page has them")
    return raw


@dataclass(frozen=True, slots=True)
class Eptp:
    """A decoded EPT pointer (VMCS field 0x201A)."""

    raw: int
    memory_type: int
    walk_length: int
    accessed_dirty: bool
    supervisor_shadow_stack: bool
    pml4: int

    @property
    def ep4ta(self) -> int:
        """The EPT PML4 table address: the tag of cached guest-physical mappings."""
        return self.pml4


def decode_eptp(raw: int, maxphyaddr: int = 46) -> Eptp:
    check_u64("raw", raw)
    check_maxphyaddr(maxphyaddr)
    return Eptp(
        raw=raw,
        memory_type=raw & EPTP_MEMTYPE_MASK,
        walk_length=((raw >> EPTP_WALK_LENGTH_SHIFT) & 7) + 1,
        accessed_dirty=bool(raw & EPTP_AD_ENABLE),
        supervisor_shadow_stack=bool(raw & EPTP_SSS_ENABLE),
        pml4=raw & addr_mask(maxphyaddr),
    )


def make_eptp(pml4: int, *, memory_type: int = MT_WB, accessed_dirty: bool = False) -> int:
    """Build an EPTP for a 4-level walk."""
    if not _is_int(pml4) or not 0 <= pml4 < 1 << 52:
        raise ValueError(f"pml4={_show(pml4)}: must be a host-physical address below 2**52")
    if pml4 & 0xFFF:
        raise ValueError(f"pml4={pml4:#x} is not 4-KiB aligned")
    if not _is_int(memory_type) or memory_type not in VALID_EPTP_MEMTYPES:
        raise ValueError(f"memory_type={memory_type!r}: an EPTP memory type must be UC (0) or WB (6)")
    return pml4 | memory_type | (3 << EPTP_WALK_LENGTH_SHIFT) | (EPTP_AD_ENABLE if accessed_dirty else 0)


def eptp_check(raw: int, maxphyaddr: int) -> str | None:
    """VM-entry checks on the EPTP; the failed check's description, or None."""
    mt = raw & EPTP_MEMTYPE_MASK
    if mt not in VALID_EPTP_MEMTYPES:
        return f"EPTP memory type {mt} is not UC (0) or WB (6)"
    wl = ((raw >> EPTP_WALK_LENGTH_SHIFT) & 7) + 1
    if wl != 4:
        return f"EPTP page-walk length {wl} is not 4 (5-level EPT is not modelled)"
    if raw & EPTP_RESERVED_LOW:
        return f"EPTP reserved bits 11:8 set: {raw & EPTP_RESERVED_LOW:#x}"
    if raw >> maxphyaddr:
        return f"EPTP sets bits at or above MAXPHYADDR ({maxphyaddr}): {raw:#x}"
    return None
