"""EPTP-tagged translation cache (guest-physical mappings) and INVEPT.

Spec: docs/spp-rules.md §6; modelling choices in docs/modelling.md ("Caching").

* Entries are tagged with the EP4TA (the EPTP's PML4 address), as the SDM tags
  guest-physical mappings; switching EPTP keeps each tag's entries.
* An entry is created only by a successful walk, never from a failed one.
* An entry holds the combined EPT permissions.  A write that SPP permits leaves an
  entry whose W is 0 (Bochs's rule: no SPP-permitted page is cached as writable), so
  every later write to the page is checked against the SPP vector: read from the
  SPPT again (the default, as Bochs), or — with ``Processor(cache_spp=True)`` — the
  vector kept in the entry by the walk that permitted a write (the "sub-page control
  storage" of Intel's patent US10255196B2).  A cached vector only ever permits: a
  write it does not permit drops the entry and walks again.
* Stale entries survive changes to the tables until INVEPT; an entry that denies an
  access is dropped and the access re-walked (an EPT violation invalidates the
  mappings used for the faulting access).
"""

from __future__ import annotations

INVEPT_SINGLE_CONTEXT = "single-context"
INVEPT_ALL_CONTEXT = "all-context"
INVEPT_TYPES = {INVEPT_SINGLE_CONTEXT: 1, INVEPT_ALL_CONTEXT: 2}


class TranslationCache:
    """``{ep4ta: {gfn: (host_frame_hpa, combined_rwx, dirty, spp_leaf, spp_vector)}}``
    (``spp_vector``: None, or the cached vector with ``cache_spp``).

    ``misses`` counts walks taken with the cache on; ``hits`` counts hits on the slow
    path only (the single-page fast path in ``Processor.translate`` does not count, to
    stay fast)."""

    __slots__ = ("tags", "hits", "misses", "invalidations")

    def __init__(self) -> None:
        self.tags: dict[int, dict[int, tuple[int, int, bool, bool, int | None]]] = {}
        self.hits = 0
        self.misses = 0
        self.invalidations = 0

    def for_tag(self, ep4ta: int) -> dict[int, tuple[int, int, bool, bool, int | None]]:
        d = self.tags.get(ep4ta)
        if d is None:
            d = self.tags[ep4ta] = {}
        return d

    def invalidate_tag(self, ep4ta: int) -> None:
        d = self.tags.get(ep4ta)
        if d:
            d.clear()
        self.invalidations += 1

    def invalidate_all(self) -> None:
        for d in self.tags.values():
            d.clear()
        self.invalidations += 1

    def __len__(self) -> int:
        return sum(len(d) for d in self.tags.values())
