"""Write-path statistics: plain data, JSON-serialisable, bounded memory."""

from __future__ import annotations

from dataclasses import dataclass, field


class TopCounter:
    """Counts per key with bounded memory: exact totals, top-N per key.

    Exact while fewer than ``2 * capacity`` distinct keys have been seen; beyond that
    the table is pruned to the ``capacity`` largest counts, so a rarely-hit key may be
    under-counted (never over-counted).  ``total`` is always exact.
    """

    __slots__ = ("capacity", "counts", "total", "pruned", "prunes")

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self.counts: dict = {}
        self.total = 0
        self.pruned = False
        self.prunes = 0  #: how many times the table was pruned

    def add(self, key, n: int = 1) -> None:
        self.total += n
        c = self.counts
        c[key] = c.get(key, 0) + n
        if len(c) >= 2 * self.capacity:
            self.prune()

    def prune(self) -> None:
        """Keep the ``capacity`` largest counts (called once the table doubles)."""
        # (ties broken by key, as top() does: the same counts keep the same keys,
        # whatever order they were first counted in)
        keep = sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[: self.capacity]
        self.counts = dict(keep)
        self.pruned = True
        self.prunes += 1

    def top(self, n: int = 10) -> list:
        return sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    def __len__(self) -> int:
        return len(self.counts)


@dataclass
class Stats:
    writes: int = 0  #: calls of vm.write
    page_granular: int = 0  #: page accesses (a write per page it touches) to a page holding a protected sub-page
    violations: int = 0  #: SPP-induced EPT violations
    spp_misses: int = 0  #: SPP-related events with bit 11 = 1, handled by rebuilding
    dirty_log_faults: int = 0  #: write-protection faults taken for dirty logging
    readonly_writes: int = 0  #: writes discarded by read-only memslots
    decisions: dict = field(default_factory=lambda: {"skip": 0, "emulate": 0, "unprotect": 0, "stop": 0})
    violations_by_page: TopCounter = field(default_factory=TopCounter)
    violations_by_subpage: TopCounter = field(default_factory=TopCounter)
    page_granular_by_page: TopCounter = field(default_factory=TopCounter)

    def as_dict(self, top: int = 10) -> dict:
        return {
            "writes": self.writes,
            "page_granular": self.page_granular,
            "violations": self.violations,
            "spp_misses": self.spp_misses,
            "dirty_log_faults": self.dirty_log_faults,
            "readonly_writes": self.readonly_writes,
            "exits_avoided": self.page_granular - self.violations,
            "decisions": dict(self.decisions),
            "top_pages": [{"gfn": g, "violations": n} for g, n in self.violations_by_page.top(top)],
            "top_subpages": [
                {"gfn": g, "subpage": i, "violations": n} for (g, i), n in self.violations_by_subpage.top(top)
            ],
            "top_page_granular": [{"gfn": g, "writes": n} for g, n in self.page_granular_by_page.top(top)],
            "counters_exact": not (
                self.violations_by_page.pruned or self.violations_by_subpage.pruned or self.page_granular_by_page.pruned
            ),
        }
