"""Builders for EPT and SPPT structures in :class:`HostMemory`.

These are what software (a VMM, a test) does to the tables; the processor only reads
them (and sets EPT A/D flags).  Every later part of sppkit and every test builds its
tables with these.  Entries are written as raw u64 values with ``write_u64``.
"""

from __future__ import annotations

from collections.abc import Iterator

from .ept import (
    EPT_LARGE,
    EPT_MEMTYPE_SHIFT,
    EPT_RWX,
    EPT_SPP,
    EPT_W,
    GPA_LIMIT,
    MT_WB,
    PAGE_4K,
    LEAF_LEVEL_FOR_SIZE,
    Level,
    addr_mask,
    check_gpa,
    check_leaf_memory_type,
    check_u64,
    is_leaf,
    is_present,
    make_eptp,
)
from .memory import HostMemory
from .sppt import SPP_VECTOR_ODD_BITS, SPPT_PRESENT

_LEVELS = (Level.PML4E, Level.PDPTE, Level.PDE, Level.PTE)


def _check_int(name: str, v: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, not {type(v).__name__}")
    if v < 0:
        raise ValueError(f"{name}={v:#x} is negative")


def _check_memory(memory: object) -> None:
    if not isinstance(memory, HostMemory):
        raise TypeError(f"memory must be a HostMemory, not {type(memory).__name__}")


def _check_range(gpa: int, size: int) -> None:
    """``gpa`` and ``size`` ints, ``[gpa, gpa+size)`` inside the 48-bit guest-physical space."""
    check_gpa(gpa)
    _check_int("size", size)
    if gpa + size > GPA_LIMIT:
        raise ValueError(f"gpa range {gpa:#x}+{size:#x} exceeds the 48-bit guest-physical space")


def _index(gpa: int, level: Level) -> int:
    return (gpa >> level.shift) & 0x1FF


def _root_frame(memory: HostMemory, root: int | None, what: str) -> int:
    """The root table's HPA: a new frame, or ``root`` checked (4-KiB aligned, in range)."""
    if root is None:
        return memory.alloc_frame()
    _check_int(what, root)
    if root & 0xFFF:
        raise ValueError(f"{what}={root:#x} is not 4-KiB aligned (bits 11:0 must be 0)")
    if root >= memory.limit:
        raise ValueError(f"{what}={root:#x} is at or above 2**maxphyaddr")
    return root


class EptBuilder:
    """Builds and edits a 4-level EPT rooted at a PML4 frame it allocates (or is given)."""

    def __init__(self, memory: HostMemory, *, pml4: int | None = None) -> None:
        _check_memory(memory)
        self.memory = memory
        self._amask = addr_mask(memory.maxphyaddr)
        self.pml4 = _root_frame(memory, pml4, "pml4")
        self.tables: set[int] = {self.pml4}

    def eptp(self, *, memory_type: int = MT_WB, accessed_dirty: bool = False) -> int:
        return make_eptp(self.pml4, memory_type=memory_type, accessed_dirty=accessed_dirty)

    # -- reading --------------------------------------------------------------
    def walk(self, gpa: int) -> list[tuple[Level, int, int]]:
        """``[(level, entry_hpa, raw), ...]`` from the PML4E down to the leaf or the
        first not-present entry.  Reads only; sets no flags."""
        check_gpa(gpa)
        out = []
        base = self.pml4
        for level in _LEVELS:
            ehpa = base + 8 * _index(gpa, level)
            raw = self.memory.read_u64(ehpa)
            out.append((level, ehpa, raw))
            if not is_present(raw) or is_leaf(raw, level):
                break
            base = raw & self._amask
        return out

    def leaf(self, gpa: int) -> tuple[Level, int, int] | None:
        """The leaf mapping ``gpa`` as ``(level, entry_hpa, raw)``, or None if unmapped."""
        level, ehpa, raw = self.walk(gpa)[-1]
        return (level, ehpa, raw) if is_present(raw) else None

    def leaves(self, gpa: int, size: int):
        """Yield ``(gpa, level, raw)`` for every present leaf overlapping ``[gpa, gpa+size)``,
        in address order, walking each table once (a 2-MiB leaf is one item)."""
        _check_int("gpa", gpa)
        _check_int("size", size)
        for g, level, _, raw in self._leaf_entries(gpa, gpa + size):
            yield g, level, raw

    def _leaf_entries(self, gpa: int, end: int, lowest: Level = Level.PTE) -> Iterator[tuple[int, Level, int, int]]:
        """``(gpa, level, entry_hpa, raw)`` of every present leaf at ``lowest`` or above
        overlapping ``[gpa, end)``, in address order; not-present entries are skipped
        whole (the region under them is not visited), tables below ``lowest`` too."""
        read = self.memory.read_u64
        amask = self._amask

        def visit(table: int, level: Level, base: int) -> Iterator[tuple[int, Level, int, int]]:
            span = level.page_size
            first = max(0, (gpa - base) // span)
            last = min(511, (end - 1 - base) // span)
            for i in range(first, last + 1):
                ehpa = table + 8 * i
                raw = read(ehpa)
                if not is_present(raw):
                    continue
                g = base + i * span
                if is_leaf(raw, level):
                    yield g, level, ehpa, raw
                elif level > lowest:
                    yield from visit(raw & amask, Level(level - 1), g)

        if end > gpa:
            yield from visit(self.pml4, Level.PML4E, 0)

    # -- mapping ----------------------------------------------------------------
    def _table_for(self, gpa: int, level: Level) -> int:
        """HPA of the table holding ``level``'s entry for ``gpa``, allocating tables above."""
        base = self.pml4
        for upper in _LEVELS:
            if upper == level:
                return base
            ehpa = base + 8 * _index(gpa, upper)
            raw = self.memory.read_u64(ehpa)
            if not is_present(raw):
                t = self.memory.alloc_frame()
                self.tables.add(t)
                self.memory.write_u64(ehpa, t | EPT_RWX)
                base = t
            elif is_leaf(raw, upper):
                raise ValueError(
                    f"gpa={gpa:#x} is inside a {upper.page_size >> 20} MiB leaf at {upper.name}; split it first"
                )
            else:
                base = raw & self._amask
        raise AssertionError("unreachable")

    def map(
        self,
        gpa: int,
        hpa: int,
        size: int,
        *,
        r: bool = True,
        w: bool = True,
        x: bool = True,
        page_size: int = PAGE_4K,
        memory_type: int = MT_WB,
        spp: bool = False,
    ) -> None:
        """Map ``[gpa, gpa+size)`` onto ``[hpa, hpa+size)`` with leaves of ``page_size``.

        Existing leaves in the range are replaced.  ``spp`` sets bit 61 (4-KiB leaves only).
        Everything is checked before anything is written: a refused call changes nothing.
        """
        check_gpa(gpa)
        _check_int("hpa", hpa)
        _check_int("size", size)
        if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size not in LEAF_LEVEL_FOR_SIZE:
            raise ValueError(f"page_size={page_size!r}: must be 4 KiB, 2 MiB or 1 GiB")
        if size == 0 or gpa % page_size or hpa % page_size or size % page_size:
            raise ValueError(
                f"gpa={gpa:#x}, hpa={hpa:#x}, size={size:#x} must be non-zero multiples of page_size={page_size:#x}"
            )
        if gpa + size > 1 << 48:
            raise ValueError(f"gpa range {gpa:#x}+{size:#x} exceeds the 48-bit guest-physical space")
        if hpa + size > self.memory.limit:
            raise ValueError(f"hpa range {hpa:#x}+{size:#x} exceeds MAXPHYADDR={self.memory.maxphyaddr}")
        check_leaf_memory_type(memory_type)
        if spp and page_size != PAGE_4K:
            raise ValueError("bit 61 (SPP) is meaningful only on 4-KiB leaves")
        level = LEAF_LEVEL_FOR_SIZE[page_size]
        # a leaf above ``level`` anywhere in the range: refused before any table is touched
        for g, upper, _, _ in self._leaf_entries(gpa, gpa + size, Level(level + 1)):
            raise ValueError(
                f"gpa={max(g, gpa):#x} is inside a {upper.page_size >> 20} MiB leaf at {upper.name} "
                f"(mapping {g:#x}+{upper.page_size:#x}); split it first"
            )
        bits = (1 if r else 0) | (2 if w else 0) | (4 if x else 0) | (memory_type << EPT_MEMTYPE_SHIFT)
        if level != Level.PTE:
            bits |= EPT_LARGE
        if spp:
            bits |= EPT_SPP
        for off in range(0, size, page_size):
            g = gpa + off
            table = self._table_for(g, level)
            self.memory.write_u64(table + 8 * _index(g, level), (hpa + off) | bits)

    def unmap(self, gpa: int, size: int) -> None:
        """Clear the leaves covering ``[gpa, gpa+size)`` (whole leaves only).

        Every leaf in the range is checked before any is cleared: a refused call
        changes nothing.  Regions under not-present entries are skipped whole."""
        _check_range(gpa, size)
        end = gpa + size
        found = list(self._leaf_entries(gpa, end))
        for g, level, _, _ in found:
            if g < gpa or g + level.page_size > end:
                raise ValueError(
                    f"unmap of {gpa:#x}+{size:#x} would cut the {level.name} leaf at {g:#x} "
                    f"(+{level.page_size:#x}); split first"
                )
        for _, _, ehpa, _ in found:
            self.memory.write_u64(ehpa, 0)

    def update_leaf(self, gpa: int, *, set_bits: int = 0, clear_bits: int = 0) -> int:
        """Set and clear bits of the leaf mapping ``gpa``; returns the new raw entry."""
        check_gpa(gpa)
        check_u64("set_bits", set_bits)
        check_u64("clear_bits", clear_bits)
        lf = self.leaf(gpa)
        if lf is None:
            raise ValueError(f"gpa={gpa:#x} is not mapped")
        _, ehpa, raw = lf
        new = (raw | set_bits) & ~clear_bits
        self.memory.write_u64(ehpa, new)
        return new

    def set_spp(self, gpa: int, on: bool = True) -> int:
        """Set or clear bit 61 of the 4-KiB leaf mapping ``gpa``."""
        lf = self.leaf(gpa)
        if lf is None:
            raise ValueError(f"gpa={gpa:#x} is not mapped")
        if lf[0] != Level.PTE:
            raise ValueError(f"gpa={gpa:#x} is mapped by a {lf[0].name} leaf; bit 61 needs a 4-KiB PTE")
        return self.update_leaf(gpa, set_bits=EPT_SPP if on else 0, clear_bits=0 if on else EPT_SPP)

    def set_writable(self, gpa: int, writable: bool) -> int:
        return self.update_leaf(gpa, set_bits=EPT_W if writable else 0, clear_bits=0 if writable else EPT_W)

    # -- huge pages ----------------------------------------------------------------
    def split(self, gpa: int) -> bool:
        """Split the 1-GiB or 2-MiB leaf covering ``gpa`` into 512 leaves one level down
        with the same permissions and memory type.  Returns False if there was nothing
        to split (already a 4-KiB leaf or unmapped)."""
        lf = self.leaf(gpa)
        if lf is None or lf[0] == Level.PTE:
            return False
        level, ehpa, raw = lf
        below = Level(level - 1)
        t = self.memory.alloc_frame()
        self.tables.add(t)
        frame = raw & self._amask & ~(level.page_size - 1)
        # permissions, memtype, IPAT, A/D, high bits — but not bit 61: it is ignored on a
        # large leaf and would become meaningful on a 4-KiB PTE (spec §2)
        keep = raw & ~self._amask & ~EPT_LARGE & ~EPT_SPP
        if below != Level.PTE:
            keep |= EPT_LARGE
        for i in range(512):
            self.memory.write_u64(t + 8 * i, (frame + i * below.page_size) | keep)
        # the new table's pointer keeps the leaf's permissions and accessed flag
        self.memory.write_u64(ehpa, t | (raw & (EPT_RWX | 0x100)))
        return True

    def merge(self, gpa: int, level: Level) -> bool:
        """Replace the table under ``level``'s entry for ``gpa`` by one leaf at ``level``
        when its 512 entries are uniform contiguous leaves with no bit 61.  Returns
        whether it merged.  The table frame is freed."""
        if not isinstance(level, int) or isinstance(level, bool) or level not in (Level.PDE, Level.PDPTE):
            raise ValueError(f"level={level!r}: merge builds 2-MiB (PDE) or 1-GiB (PDPTE) leaves")
        level = Level(level)
        walk = self.walk(gpa)
        entry = next(((lv, eh, raw) for lv, eh, raw in walk if lv == level), None)
        if entry is None or not is_present(entry[2]) or is_leaf(entry[2], level):
            return False
        _, ehpa, ptr = entry
        table = ptr & self._amask
        below = Level(level - 1)
        first = self.memory.read_u64(table)
        if not is_present(first) or not is_leaf(first, below) or first & EPT_SPP:
            return False
        attrs = first & ~self._amask & ~(EPT_LARGE | 0x300)  # ignore A/D when comparing
        base = first & self._amask & ~(below.page_size - 1)
        if base % level.page_size:
            return False
        for i in range(512):
            e = self.memory.read_u64(table + 8 * i)
            if (
                not is_present(e)
                or not is_leaf(e, below)
                or e & ~self._amask & ~(EPT_LARGE | 0x300) != attrs
                or e & self._amask & ~(below.page_size - 1) != base + i * below.page_size
            ):
                return False
        # the pointer's R/W/X were ANDed into every access: keep them in the merged leaf
        attrs &= ~EPT_RWX | (ptr & EPT_RWX)
        self.memory.write_u64(ehpa, base | attrs | EPT_LARGE)
        self.tables.discard(table)
        self.memory.free_frame(table)
        return True


class SpptBuilder:
    """Builds and edits a 4-level SPPT rooted at an L4 frame it allocates (or is given)."""

    def __init__(self, memory: HostMemory, *, root: int | None = None) -> None:
        _check_memory(memory)
        self.memory = memory
        self._amask = addr_mask(memory.maxphyaddr)
        self.root = _root_frame(memory, root, "SPPTP root")
        self.tables: set[int] = {self.root}

    @property
    def spptp(self) -> int:
        """The value for the SPPTP VMCS field (0x2030): the root's HPA, bits 11:0 zero."""
        return self.root

    def walk(self, gpa: int) -> list[tuple[str, int, int]]:
        """``[(name, entry_hpa, raw), ...]`` L4E → L1E, stopping at a not-present entry."""
        check_gpa(gpa)
        out = []
        base = self.root
        for name, shift in (("L4E", 39), ("L3E", 30), ("L2E", 21)):
            ehpa = base + 8 * ((gpa >> shift) & 0x1FF)
            raw = self.memory.read_u64(ehpa)
            out.append((name, ehpa, raw))
            if not raw & SPPT_PRESENT:
                return out
            base = raw & self._amask
        ehpa = base + 8 * ((gpa >> 12) & 0x1FF)
        out.append(("L1E", ehpa, self.memory.read_u64(ehpa)))
        return out

    def l1_table(self, gpa: int, *, allocate: bool = True) -> int | None:
        """HPA of the L1 table covering ``gpa``'s 2-MiB region (allocating levels)."""
        check_gpa(gpa)
        base = self.root
        for shift in (39, 30, 21):
            ehpa = base + 8 * ((gpa >> shift) & 0x1FF)
            raw = self.memory.read_u64(ehpa)
            if raw & self._amask == 0:
                if not allocate:
                    return None
                t = self.memory.alloc_frame()
                self.tables.add(t)
                self.memory.write_u64(ehpa, t | SPPT_PRESENT)
                base = t
            else:
                if not raw & SPPT_PRESENT:
                    if not allocate:
                        return None
                    self.memory.write_u64(ehpa, raw | SPPT_PRESENT)
                base = raw & self._amask
        return base

    def set_vector(self, gpa: int, vector: int) -> None:
        """Write the SPP vector (L1E) for ``gpa``'s page, allocating SPPT levels."""
        check_gpa(gpa)
        if not isinstance(vector, int) or isinstance(vector, bool) or not 0 <= vector < 1 << 64:
            raise ValueError(f"vector={vector!r} is not an unsigned 64-bit value")
        if vector & SPP_VECTOR_ODD_BITS:
            raise ValueError(f"vector={vector:#018x} sets reserved odd bits {vector & SPP_VECTOR_ODD_BITS:#x}")
        table = self.l1_table(gpa)
        assert table is not None  # (allocated)
        self.memory.write_u64(table + 8 * ((gpa >> 12) & 0x1FF), vector)

    def get_vector(self, gpa: int) -> int | None:
        """The SPP vector for ``gpa``, or None when an upper level is not present."""
        walk = self.walk(gpa)
        return walk[-1][2] if walk[-1][0] == "L1E" else None

    def set_l2_present(self, gpa: int, present: bool) -> bool:
        """Set or clear bit 0 of the L2E covering ``gpa`` (keeping its table address).
        Returns False if there is no L2E with a table for that region."""
        walk = self.walk(gpa)
        for name, ehpa, raw in walk:
            if name == "L2E" and raw & self._amask:
                self.memory.write_u64(ehpa, (raw | SPPT_PRESENT) if present else (raw & ~SPPT_PRESENT))
                return True
        if not present:
            return False
        # an upper level is not present: re-validate the path
        self.l1_table(gpa)
        return True

    def free(self) -> None:
        """Free every SPPT frame (including the root)."""
        for t in self.tables:
            self.memory.free_frame(t)
        self.tables.clear()
