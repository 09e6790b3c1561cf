"""The VMM's EPT: memslots projected onto EPT leaves, huge pages split and merged.

A page's leaf is a function of the VMM's state (see :meth:`EptManager.leaf_raw`):

* read-only memslot: W = 0;
* protected gfn (access map != 0xFFFFFFFF, SPP enabled): 4-KiB leaf, W = 0, bit 61 = 1;
* dirty logging armed on a clean page: W = 0, and bit 61 moved to a software bit
  (``EPT_SPP_SAVED``), as the KVM series' "SPP saved" scheme did, so the first write
  takes a write-protection fault that marks the page dirty and restores bit 61;
* otherwise W = 1.
"""

from __future__ import annotations

from ..arch.builders import EptBuilder
from ..arch.ept import EPT_ACCESSED, EPT_DIRTY, EPT_MEMTYPE_SHIFT, EPT_SPP, MT_WB, PAGE_1G, PAGE_2M, PAGE_4K, Level
from ..arch.memory import HostMemory

EPT_SPP_SAVED = 1 << 62  #: software bit (ignored by the processor) holding bit 61 while dirty logging is armed
_LEAF_BASE = 0b101 | (MT_WB << EPT_MEMTYPE_SHIFT)  # R, X, WB


class EptManager:
    def __init__(self, memory: HostMemory) -> None:
        self.memory = memory
        self.builder = EptBuilder(memory)
        self.splits = 0
        self.merges = 0
        #: bumped on every change of a leaf (mapping, W, bit 61, split, merge): engines
        #: that mirror the EPT elsewhere re-read it when this moves
        self.version = 0

    def eptp(self, *, accessed_dirty: bool = False) -> int:
        return self.builder.eptp(accessed_dirty=accessed_dirty)

    # -- slots ---------------------------------------------------------------------
    def map_range(self, gpa: int, hpa: int, size: int, *, writable: bool, huge: bool = True) -> None:
        """Map with the largest leaf that fits each piece (1 GiB, 2 MiB, 4 KiB): a huge
        leaf needs gpa and hpa aligned to its size and the piece to cover it."""
        end = gpa + size
        while gpa < end:
            for ps in (PAGE_1G, PAGE_2M, PAGE_4K) if huge else (PAGE_4K,):
                if gpa % ps == 0 and hpa % ps == 0 and gpa + ps <= end:
                    break
            self.builder.map(gpa, hpa, ps, w=writable, page_size=ps)
            gpa += ps
            hpa += ps
        self.version += 1

    def unmap_range(self, gpa: int, size: int) -> None:
        self.builder.unmap(gpa, size)
        self.version += 1

    # -- leaves ----------------------------------------------------------------------
    @staticmethod
    def leaf_raw(hpa: int, *, writable: bool, spp: bool, saved: bool, keep: int = 0) -> int:
        raw = hpa | _LEAF_BASE | (keep & (EPT_ACCESSED | EPT_DIRTY))
        if writable:
            raw |= 0b10
        if spp:
            raw |= EPT_SPP
        if saved:
            raw |= EPT_SPP_SAVED
        return raw

    def ensure_4k(self, gpa: int) -> None:
        """Split the 1-GiB / 2-MiB leaf covering ``gpa`` down to 4-KiB leaves."""
        while True:
            leaf = self.builder.leaf(gpa)
            if leaf is None or leaf[0] == Level.PTE:
                return
            self.builder.split(gpa)
            self.splits += 1
            self.version += 1

    def set_leaf(self, gpa: int, hpa: int, *, writable: bool, spp: bool, saved: bool) -> None:
        """Make the leaf of ``gpa`` say what the VMM's state says (4-KiB leaf if anything
        but plain W is needed; a plain huge leaf is left alone)."""
        leaf = self.builder.leaf(gpa)
        if leaf is None:
            raise AssertionError(f"gpa={gpa:#x} has no EPT leaf")
        level, ehpa, raw = leaf
        if level != Level.PTE:
            if writable and not spp and not saved and raw & 0b10:
                return
            self.ensure_4k(gpa)
            leaf = self.builder.leaf(gpa)
            assert leaf is not None  # (split, still mapped)
            level, ehpa, raw = leaf
        new = self.leaf_raw(hpa & ~0xFFF, writable=writable, spp=spp, saved=saved, keep=raw)
        if new != raw:
            self.memory.write_u64(ehpa, new)
            self.version += 1

    def try_merge(self, gpa: int, level: Level) -> bool:
        if self.builder.merge(gpa, level):
            self.merges += 1
            self.version += 1
            return True
        return False
