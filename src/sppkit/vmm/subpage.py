"""SPPT management: lazy (the KVM series) or eager (Bitdefender's napoca).

* lazy: a permission change clears the present bit of the covering L2E (keeping its
  table); the next eligible write in that 2-MiB region takes an SPP miss, and the miss
  handler writes the vector of *every* protected page of the region — an L1E has no
  present bit, so after one miss the region must be right all at once.
* eager: the vector is written (levels allocated) when the permission is set.
"""

from __future__ import annotations

from ..arch.builders import SpptBuilder
from ..arch.memory import HostMemory
from ..arch.sppt import vector_from_map

SPPT_MODES = ("lazy", "eager")
REGION_2M = 1 << 21


class SpptManager:
    def __init__(self, memory: HostMemory, mode: str) -> None:
        if mode not in SPPT_MODES:
            raise ValueError(f"mode={mode!r}: must be 'lazy' or 'eager'")
        self.mode = mode
        self.builder = SpptBuilder(memory)
        self.rebuilds = 0

    @property
    def spptp(self) -> int:
        return self.builder.spptp

    def on_change(self, changes: list[tuple[int, int]]) -> None:
        """``changes``: ``[(gfn, new_map), ...]`` already stored in the VMM's maps."""
        if self.mode == "eager":
            for gfn, new in changes:
                if new != 0xFFFFFFFF or self.builder.l1_table(gfn << 12, allocate=False) is not None:
                    self.builder.set_vector(gfn << 12, vector_from_map(new))
        else:
            for region in sorted({(gfn << 12) & ~(REGION_2M - 1) for gfn, _ in changes}):
                self.builder.set_l2_present(region, False)

    def rebuild_region(self, gpa: int, protected: list[tuple[int, int]]) -> None:
        """SPP-miss handler: write every protected page's vector of ``gpa``'s 2-MiB region
        (``protected``: ``[(gfn, map), ...]``) and re-validate the path."""
        region = gpa & ~(REGION_2M - 1)
        self.builder.l1_table(region)  # allocate / set present on L4E, L3E, L2E
        for gfn, amap in protected:
            self.builder.set_vector(gfn << 12, vector_from_map(amap))
        self.rebuilds += 1

    @property
    def bytes(self) -> int:
        return 4096 * len(self.builder.tables)

    def free(self) -> None:
        self.builder.free()
