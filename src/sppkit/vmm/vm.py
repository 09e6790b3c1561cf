"""``sppkit.Vm``: the hypervisor side of SPP.

Memslots backed by host frames, the EPT built from them, the SPP interface of the
KVM series (v8–v12) with its gaps closed, dirty logging, and the one write path
every engine uses: ``vm.write`` → ``Processor.translate`` → decision.
"""

from __future__ import annotations

from typing import Callable, Sequence

import sys

import numpy as np

from ..arch.ept import PAGE_4K, Level
from ..arch.exits import QUAL_SPP_MISS, EptViolation, SppEvent
from ..arch.memory import HostMemory, byte_view, check_read_length
from ..arch.processor import SECONDARY_ENABLE_EPT, SECONDARY_SPP, SPP_WRITE_CHECK_ALL, Access, Processor, _check_extra
from ..arch.sppt import FULL_ACCESS_MAP, SPP_VECTOR_ODD_BITS, map_from_vector, vector_from_map
from .ept_manager import EptManager
from .errors import (
    GfnNotInMemslot,
    GfnReadOnly,
    GpaNotMapped,
    MemslotError,
    SppBatchTooLarge,
    SppError,
    SppMisconfiguration,
    SppNotEnabled,
    VmmError,
)
from .events import Decision, SppViolation, WriteResult
from .memslots import Memslot, MemslotTable
from .stats import Stats
from .subpage import SpptManager
from .write_cache import WriteCache

#: Pages per set/get call, as KVM_CAP_X86_SPP reports it (KVM_SUBPAGE_MAX_PAGES).
SPP_BATCH_LIMIT = 512
REGION_2M = 1 << 21
REGION_1G = 1 << 30
#: The result of every write permitted outright (no event, no SPP miss): engines on a
#: hot path may test ``result is ALLOWED``.
ALLOWED = WriteResult(True)
_MAX_RETRIES = 8
_ATTEMPTS = range(_MAX_RETRIES)  # built once: the write path loops over it
_SKIP, _EMULATE, _STOP = Decision.SKIP, Decision.EMULATE, Decision.STOP
_WRITE = Access.WRITE
_new_event = tuple.__new__  # builds the NamedTuple without its Python-level __new__

ViolationHandler = Callable[[SppViolation], Decision]


def _bytes_like(data: object) -> bytes:
    """``data`` (bytes, bytearray or a memoryview of any format) as bytes; anything else
    is a TypeError naming it (HostMemory's rule)."""
    return bytes(byte_view(data))


def _touched_bits(off: int, size: int) -> int:
    """32-bit map of the sub-pages touched by [off, off+size) within one page."""
    first = off >> 7
    last = (off + size - 1) >> 7
    return ((1 << (last + 1)) - 1) & ~((1 << first) - 1)


class Vm:
    """An empty VM.  Add memslots, enable SPP, set access maps, write.

    ``maxphyaddr``: host physical-address width.  ``cache``: the processor's
    translation cache (INVEPT is issued after every EPT and SPPT change).
    ``cache_spp``: the cache also keeps the SPP vector that permitted a write (default:
    as ``cache``); the INVEPTs make it change no decision.  ``spp_write_check``:
    ``"all-touched"`` (default) or ``"first-byte"`` (Bochs), see docs/modelling.md.
    ``ept_ad``: EPT accessed/dirty flags (EPTP bit 6).
    """

    def __init__(
        self,
        *,
        maxphyaddr: int = 46,
        cache: bool = True,
        cache_spp: bool | None = None,
        spp_write_check: str = SPP_WRITE_CHECK_ALL,
        ept_ad: bool = False,
    ) -> None:
        for name, flag in (("cache", cache), ("ept_ad", ept_ad)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name}={flag!r}: must be True or False")
        if cache_spp is not None and not isinstance(cache_spp, bool):
            raise ValueError(f"cache_spp={cache_spp!r}: must be True, False or None (as cache)")
        self.memory = HostMemory(maxphyaddr)
        self.ept = EptManager(self.memory)
        self.processor = Processor(
            self.memory,
            self.ept.eptp(accessed_dirty=ept_ad),
            secondary_controls=SECONDARY_ENABLE_EPT,
            spp_write_check=spp_write_check,
            cache=cache,
            # The VMM follows every SPPT change with an INVEPT, so caching the vectors
            # with the mappings changes no decision (docs/modelling.md).
            cache_spp=cache if cache_spp is None else cache_spp,
        )
        self.slots = MemslotTable()
        self.sppt: SpptManager | None = None
        self._handler: ViolationHandler | None = None
        self._observer: Callable[[int, int, int | None], None] | None = None
        self._stats = Stats()
        self._permit_changes = 0  # write observers set and statistics reset (see permit_epoch)
        self._wc: WriteCache | None = None  # the write cache in C, once an engine asks for it
        self._prot_2m: dict[int, int] = {}  # 2-MiB region gpa -> protected gfns in it
        self._prot_1g: dict[int, int] = {}
        self.invepts = 0

    # ================================================================ memslots
    def add_memslot(
        self, slot: int, gpa: int, size: int, *, readonly: bool = False, dirty_log: bool = False, backing=None
    ) -> Memslot:
        """Add guest memory ``[gpa, gpa+size)`` backed by newly reserved host frames.

        ``backing``: a writable buffer of ``size`` bytes (an engine's ``mmap``) to use as
        those frames, so that a committed write is what the guest's real vCPU reads.
        """
        self.slots.validate_new(slot, gpa, size)
        for name, flag in (("readonly", readonly), ("dirty_log", dirty_log)):
            if not isinstance(flag, bool):
                raise MemslotError(f"{name}={flag!r}: must be True or False")
        if backing is not None:
            try:
                memoryview(backing)
            except TypeError:
                raise MemslotError(f"backing={backing!r}: must be a writable buffer of {size:#x} bytes "
                                   f"(e.g. an mmap)") from None
        # Host-physical placement sharing the guest range's low address bits up to the
        # largest leaf that can fit in it (so huge EPT leaves can map it), and no more: a
        # small slot does not take a 1-GiB window of a small host-physical space.
        align = REGION_1G if size >= REGION_1G else REGION_2M if size >= REGION_2M else PAGE_4K
        hpa = self.memory.alloc_range(size, align=align, offset=gpa % align, backing=backing)
        m = Memslot(slot, gpa, size, hpa, readonly=readonly, dirty_log=dirty_log)
        try:
            if dirty_log:
                m.dirty = np.zeros(m.npages, dtype=bool)
            if self.sppt is not None:
                m.alloc_maps()
            self.slots.insert(m)
            self._map_slot(m)
        except BaseException:
            # (e.g. host-physical space exhausted by the EPT tables): undo, change nothing
            if self.slots.by_id.get(slot) is m:
                self.ept.unmap_range(m.gpa, m.size)
                self.slots.remove(slot)
            self.memory.free_range(hpa, size)
            raise
        self._invept()
        return m

    def delete_memslot(self, slot: int) -> None:
        """Delete a memslot: its memory, its EPT mappings and its access maps — nothing else."""
        m = self.slots.get(slot)
        self._count_protected(m, -1)
        self.ept.unmap_range(m.gpa, m.size)
        self.slots.remove(slot)
        self.memory.free_range(m.hpa, m.size)
        self._invept()

    def move_memslot(self, slot: int, new_gpa: int) -> Memslot:
        """Move a memslot to ``new_gpa``; contents, access maps and dirty bits move with it."""
        m = self.slots.get(slot)
        self.slots.validate_new(slot, new_gpa, m.size, ignore=slot)
        self._reserve_frames(self._tables_for(m, new_gpa), f"moving {m.describe()} to {new_gpa:#x}")
        self._count_protected(m, -1)
        self.ept.unmap_range(m.gpa, m.size)
        self.slots.remove(slot)
        m.gpa = new_gpa
        self.slots.insert(m)
        self._count_protected(m, +1)
        self._map_slot(m)
        if self.sppt is not None and m.maps is not None:
            self.sppt.on_change([(m.base_gfn + i, amap) for i, amap in sorted(m.maps.items())])
        self._invept()
        return m

    def _tables_for(self, m: Memslot, gpa: int) -> int:
        """At most how many table frames mapping ``m`` at ``gpa`` takes: the EPT tables
        of its leaves (:meth:`EptManager.map_range` takes the largest that fit; a
        dirty-logged slot 4-KiB ones only), for each 2-MiB region holding protected
        pages a 4-KiB table and for each such 1-GiB region a 2-MiB one (the splits of
        huge leaves), and with an eager SPPT three tables per such 2-MiB region."""
        end, delta, huge = gpa + m.size, m.hpa - gpa, not m.dirty_log

        def regions(size: int) -> int:  # regions of ``size`` that [gpa, end) touches
            return (end - 1) // size - gpa // size + 1

        def inside(size: int) -> int:  # regions of ``size`` that [gpa, end) covers whole
            return max(0, end // size - -(-gpa // size))

        pts = regions(REGION_2M) - (inside(REGION_2M) if huge and delta % REGION_2M == 0 else 0)
        pds = regions(REGION_1G) - (inside(REGION_1G) if huge and delta % REGION_1G == 0 else 0)
        need = pts + pds + regions(1 << 39)
        if m.maps:
            prot_2m = {(gpa + (i << 12)) >> 21 for i in m.maps}
            need += len(prot_2m) + len({r >> 9 for r in prot_2m})
            if self.sppt is not None and self.sppt.mode == "eager":
                need += 3 * len(prot_2m)
        return need

    def _reserve_frames(self, n: int, what: str) -> None:
        """Refuse (MemoryError) an operation that may need ``n`` host frames for tables
        when fewer are free, before it changes anything."""
        got: list[int] = []
        try:
            for _ in range(n):
                got.append(self.memory.alloc_frame())
        except MemoryError:
            raise MemoryError(f"host-physical address space exhausted: {what} may need {n:,} frames for its "
                              f"tables, {len(got):,} are free") from None
        finally:
            for hpa in got:
                self.memory.free_frame(hpa)

    def memslots(self) -> list[Memslot]:
        return list(self.slots)

    def _map_slot(self, m: Memslot) -> None:
        # Dirty logging starts armed: every page W = 0 until its first write (4-KiB leaves).
        self.ept.map_range(m.gpa, m.hpa, m.size, writable=not m.readonly and not m.dirty_log, huge=not m.dirty_log)
        todo: set[int] = set()
        if m.maps is not None and self.sppt is not None:
            todo.update(m.maps)
        if m.dirty_log and not m.readonly:
            todo.update(int(i) for i in np.nonzero(m.dirty)[0])
        for i in sorted(todo):
            self._sync_leaf(m, i)

    def _count_protected(self, m: Memslot, sign: int) -> None:
        if m.maps is None:
            return
        for i in m.maps:
            self._count_gfn(m.base_gfn + i, sign)

    def _count_gfn(self, gfn: int, sign: int) -> None:
        gpa = gfn << 12
        for d, r in ((self._prot_2m, gpa & ~(REGION_2M - 1)), (self._prot_1g, gpa & ~(REGION_1G - 1))):
            n = d.get(r, 0) + sign
            if n:
                d[r] = n
            else:
                d.pop(r, None)

    # ================================================================ guest memory (VMM side)
    def read(self, gpa: int, n: int) -> bytes:
        """Read guest memory as the VMM sees it (no EPT permission check); at most
        :data:`sppkit.arch.memory.MAX_READ` bytes at a time."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n={n!r}: must be a non-negative integer")
        check_read_length(n)  # (a range over several memslots is assembled here)
        out = bytearray()
        for m, g, k in self._pieces(gpa, n, "read"):
            out += self.memory.read(m.hpa + (g - m.gpa), k)
        return bytes(out)

    def load(self, gpa: int, data: bytes) -> None:
        """Write guest memory from the VMM side (loading an image): not a guest write, so
        no EPT/SPP check, no statistics, no dirty logging."""
        data = _bytes_like(data)
        pos = 0
        pieces = list(self._pieces(gpa, len(data), "load"))  # validate the whole range first
        for m, g, k in pieces:
            self.memory.write(m.hpa + (g - m.gpa), data[pos : pos + k])
            pos += k

    def _pieces(self, gpa: int, n: int, what: str):
        if not isinstance(gpa, int) or isinstance(gpa, bool) or gpa < 0:
            raise ValueError(f"gpa={gpa!r}: must be a non-negative integer")
        out = []
        end = gpa + n
        while gpa < end:
            m = self.slots.lookup(gpa, what)
            k = min(end, m.end) - gpa
            out.append((m, gpa, k))
            gpa += k
        return out

    def hpa_of(self, gpa: int) -> int:
        """Host-physical address backing ``gpa`` (from the memslots)."""
        m = self.slots.lookup(gpa)
        return m.hpa + (gpa - m.gpa)

    # ================================================================ SPP interface
    @property
    def spp_enabled(self) -> bool:
        return self.sppt is not None

    def enable_spp(self, mode: str = "lazy") -> int:
        """Turn SPP on (secondary control bit 23, SPPTP loaded); returns the batch limit
        (512).  Enabling again with the same mode is a no-op."""
        if self.sppt is not None:
            if mode != self.sppt.mode:
                raise SppError(f"SPP is already enabled in {self.sppt.mode!r} mode; disable_spp() before changing mode")
            return SPP_BATCH_LIMIT
        sppt = SpptManager(self.memory, mode)
        self.processor.load_controls(
            secondary_controls=self.processor.secondary_controls | SECONDARY_SPP, spptp=sppt.spptp
        )
        self.sppt = sppt
        for m in self.slots:
            m.alloc_maps()
        return SPP_BATCH_LIMIT

    def disable_spp(self) -> None:
        """Turn SPP off: every page unprotected, bit 61 cleared, huge pages merged back,
        the SPPT freed (the KVM series had no way to do this)."""
        if self.sppt is None:
            raise SppNotEnabled()
        changes = []
        for m in self.slots:
            for i in sorted(m.maps):
                changes.append((m, i, FULL_ACCESS_MAP))
        self._apply(changes, update_sppt=False)
        self.processor.load_controls(secondary_controls=self.processor.secondary_controls & ~SECONDARY_SPP, spptp=0)
        self.sppt.free()
        self.sppt = None
        for m in self.slots:
            m.maps = None
        self._invept()

    def _resolve(self, gfn: int) -> tuple[Memslot, int]:
        m = self.slots.find(gfn << 12)
        if m is None:
            raise GfnNotInMemslot(gfn)
        return m, gfn - m.base_gfn

    def _check_batch(self, gfn_base, npages: int) -> None:
        if self.sppt is None:
            raise SppNotEnabled()
        if not isinstance(gfn_base, int) or isinstance(gfn_base, bool) or gfn_base < 0:
            raise ValueError(f"gfn_base={gfn_base!r}: must be a non-negative integer")
        if npages > SPP_BATCH_LIMIT:
            raise SppBatchTooLarge(npages, SPP_BATCH_LIMIT)

    def set_subpage_access(self, gfn_base: int, access_maps: Sequence[int], flags: int = 0) -> int:
        """Set the 32-bit access maps of pages ``gfn_base ...`` (bit i = sub-page i writable;
        0xFFFFFFFF = not protected).  All-or-nothing: everything is validated first.
        Returns 0."""
        if not isinstance(flags, int) or isinstance(flags, bool) or flags != 0:
            raise ValueError(f"flags={flags!r}: must be 0")
        if not isinstance(access_maps, (list, tuple, range, np.ndarray)):
            raise TypeError(f"access_maps={access_maps!r:.60}: must be a sequence (list, tuple or array) of "
                            f"32-bit maps, one per page")
        maps = list(access_maps)
        self._check_batch(gfn_base, len(maps))
        changes = []
        for k, amap in enumerate(maps):
            gfn = gfn_base + k
            if not isinstance(amap, (int, np.integer)) or isinstance(amap, bool) or not 0 <= amap <= FULL_ACCESS_MAP:
                raise ValueError(f"access map {amap!r} for gfn={gfn:#x} is not a 32-bit value")
            m, i = self._resolve(gfn)
            if m.readonly and amap != FULL_ACCESS_MAP:
                raise GfnReadOnly(gfn, m.slot)
            changes.append((m, i, int(amap)))
        self._apply(changes)
        return 0

    def get_subpage_access(self, gfn_base: int, npages: int) -> list[int]:
        """The access maps of ``npages`` pages from ``gfn_base``."""
        if not isinstance(npages, int) or isinstance(npages, bool) or npages < 0:
            raise ValueError(f"npages={npages!r}: must be a non-negative integer")
        self._check_batch(gfn_base, npages)
        out = []
        for gfn in range(gfn_base, gfn_base + npages):
            m, i = self._resolve(gfn)
            assert m.maps is not None  # (_check_batch: SPP is on)
            out.append(m.maps.get(i, FULL_ACCESS_MAP))
        return out

    def set_spp_vector(self, gpa: int, vector: int) -> None:
        """Set the raw 64-bit SPP vector of ``gpa``'s page (bit 2i = sub-page i writable)."""
        if not isinstance(vector, int) or isinstance(vector, bool) or not 0 <= vector < 1 << 64:
            raise ValueError(f"vector={vector!r}: must be an unsigned 64-bit value")
        if vector & SPP_VECTOR_ODD_BITS:
            raise ValueError(f"vector={vector:#018x} sets reserved odd bits {vector & SPP_VECTOR_ODD_BITS:#x}")
        if not isinstance(gpa, int) or isinstance(gpa, bool) or gpa < 0:
            raise ValueError(f"gpa={gpa!r}: must be a non-negative integer")
        self.set_subpage_access(gpa >> 12, [map_from_vector(vector)])

    def get_spp_vector(self, gpa: int) -> int:
        if not isinstance(gpa, int) or isinstance(gpa, bool) or gpa < 0:
            raise ValueError(f"gpa={gpa!r}: must be a non-negative integer")
        return vector_from_map(self.get_subpage_access(gpa >> 12, 1)[0])

    def _apply(self, changes: list[tuple[Memslot, int, int]], *, update_sppt: bool = True) -> None:
        """Store new maps, re-project the EPT, update the SPPT, merge, INVEPT.  The
        tables the changes need are made first (:meth:`_make_tables`), so nothing after
        that can run out of frames half-way."""
        self._make_tables(changes)
        sppt_changes = []
        freed: set[tuple[int, Memslot]] = set()
        for m, i, new in changes:
            maps = m.maps
            assert maps is not None  # (changes are made with SPP on)
            old = maps.get(i, FULL_ACCESS_MAP)
            if old == new:
                continue
            gfn = m.base_gfn + i
            if new == FULL_ACCESS_MAP:
                del maps[i]
            else:
                maps[i] = new
            if old == FULL_ACCESS_MAP:
                self._count_gfn(gfn, +1)
            elif new == FULL_ACCESS_MAP:
                self._count_gfn(gfn, -1)
                freed.add((gfn << 12 & ~(REGION_2M - 1), m))
            self._sync_leaf(m, i)
            sppt_changes.append((gfn, new))
        if update_sppt and sppt_changes:
            assert self.sppt is not None  # (maps exist only with SPP on)
            self.sppt.on_change(sppt_changes)
        for region, m in sorted(freed, key=lambda t: t[0]):
            self._maybe_merge(region, m)
        if sppt_changes:
            self._invept()

    def _make_tables(self, changes: list[tuple[Memslot, int, int]]) -> None:
        """Make every table ``changes`` will need before any of them is made: a 4-KiB
        EPT leaf for each page that becomes protected and, with an eager SPPT, its SPPT
        path.  Neither changes a translation.  If host-physical frames run out
        (MemoryError), the entries written are put back and the new tables freed, so
        the call that asked changes nothing."""
        eptb = self.ept.builder
        spptb = self.sppt.builder if self.sppt is not None and self.sppt.mode == "eager" else None
        regions: set[int] = set()
        saved: list[tuple[int, int]] = []  # (entry hpa, raw) of each path before its first change
        before = (set(eptb.tables), set(spptb.tables) if spptb is not None else set(), self.ept.splits)
        try:
            for m, i, new in changes:
                if new == FULL_ACCESS_MAP or m.maps is None or i in m.maps:
                    continue  # (not a page becoming protected: its tables exist or are not needed)
                gpa = m.gpa + (i << 12)
                if gpa >> 21 in regions:
                    continue
                regions.add(gpa >> 21)
                leaf = eptb.leaf(gpa)
                if leaf is not None and leaf[0] != Level.PTE:
                    saved.extend((e, raw) for _, e, raw in eptb.walk(gpa))
                    self.ept.ensure_4k(gpa)
                if spptb is not None and spptb.l1_table(gpa, allocate=False) is None:
                    saved.extend((e, raw) for _, e, raw in spptb.walk(gpa))
                    spptb.l1_table(gpa)
        except MemoryError:
            for e, raw in reversed(saved):
                self.memory.write_u64(e, raw)
            for b, had in ((eptb, before[0]), (spptb, before[1])):
                if b is not None:
                    for t in b.tables - had:
                        b.tables.discard(t)
                        self.memory.free_frame(t)
            self.ept.splits = before[2]
            self._invept()
            raise

    def _maybe_merge(self, region: int, m: Memslot) -> None:
        if m.dirty_log or self._prot_2m.get(region):
            return
        if m.gpa <= region and region + REGION_2M <= m.end and self.ept.try_merge(region, Level.PDE):
            big = region & ~(REGION_1G - 1)
            if not self._prot_1g.get(big) and m.gpa <= big and big + REGION_1G <= m.end:
                self.ept.try_merge(big, Level.PDPTE)

    def _sync_leaf(self, m: Memslot, i: int) -> None:
        prot = self.sppt is not None and m.maps is not None and i in m.maps
        armed = m.dirty_log and not m.dirty[i]
        self.ept.set_leaf(
            m.gpa + (i << 12),
            m.hpa + (i << 12),
            writable=not m.readonly and not prot and not armed,
            spp=prot and not armed,
            saved=prot and armed,
        )

    def _invept(self) -> None:
        """INVEPT after an EPT or SPPT change."""
        self.processor.invept("single-context", self.processor.eptp)
        self.invepts += 1

    @property
    def ept_generation(self) -> int:
        """Moves whenever an EPT leaf changes: engines that mirror the EPT elsewhere
        (KVM memslots, Unicorn page protections) re-read it then.  An access-map change
        that leaves every leaf as it was (a protected page staying protected) does not
        move it."""
        return self.ept.version

    def write_protected(self, gpa: int, size: int) -> list[tuple[int, int, bool]]:
        """The EPT's view of ``[gpa, gpa+size)`` as runs ``(gpa, length, writable)``:
        what an engine mirrors (pages whose leaf has W = 0 must trap writes)."""
        runs: list[list] = []
        for g, level, raw in self.ept.builder.leaves(gpa, size):
            lo = max(g, gpa)
            hi = min(g + level.page_size, gpa + size)
            w = bool(raw & 2)
            if runs and runs[-1][2] == w and runs[-1][0] + runs[-1][1] == lo:
                runs[-1][1] += hi - lo
            else:
                runs.append([lo, hi - lo, w])
        return [tuple(r) for r in runs]

    # ================================================================ dirty logging
    def get_dirty_log(self, slot: int) -> bytes:
        """The slot's dirty bitmap (bit i of byte i//8 = page i written since the last
        call), cleared by the call; logging is re-armed on the pages it reports."""
        m = self.slots.get(slot)
        if not m.dirty_log:
            raise MemslotError(f"{m.describe()} was added without dirty_log=True")
        bitmap = np.packbits(m.dirty, bitorder="little").tobytes()
        was = np.nonzero(m.dirty)[0]
        m.dirty[:] = False
        if not m.readonly:
            for i in was:
                self._sync_leaf(m, int(i))
        if len(was):
            self._invept()
        return bitmap

    # ================================================================ the write path
    def on_violation(self, callback: ViolationHandler | None) -> None:
        """Register the handler asked for a :class:`Decision` on every SPP violation
        (None: no handler; violations are SKIPped)."""
        if callback is not None and not callable(callback):
            raise TypeError("on_violation needs a callable (event) -> Decision, or None")
        self._handler = callback

    @property
    def violation_handler(self) -> ViolationHandler | None:
        """The handler :meth:`on_violation` registered (None: violations are SKIPped);
        a handler that chains to another can check it is still the one asked."""
        return self._handler

    def on_write(self, callback: Callable[[int, int, int | None], None] | None) -> None:
        """Register an observer told of every guest write before it is decided, as
        ``callback(gpa, size, rip)`` (e.g. to record a trace); None removes it."""
        if callback is not None and not callable(callback):
            raise TypeError("on_write needs a callable (gpa, size, rip) -> None, or None")
        self._observer = callback
        self._permit_changes += 1

    def write(
        self, gpa: int, data: bytes, *, vcpu: int = 0, rip: int | None = None, gla: int | None = None
    ) -> WriteResult:
        """A guest write of ``data`` at ``gpa`` — the one path every engine uses.

        The write is translated page by page (at most two pages); SPP misses are
        handled (rebuild, retry); a denied write becomes an :class:`SppViolation` passed
        to the handler, whose :class:`Decision` applies to the whole write.  No byte
        lands before every page has been decided.

        A write that cannot be made — ``data`` not bytes-like or not 1 to 4096 bytes, a
        bad ``gpa`` or ``gla``, a page not in any memslot — raises before anything
        changes: no statistics, no observer call, no handler call.  A violation handler
        that raises: the exception propagates and no byte lands, but the write and its
        violation were made and stay counted (as an exit taken is counted).
        """
        if self._wc is not None and self._wc.table.pending:
            self._wc.fold()  # (the stores made in C come first)
        if type(data) is not bytes:
            data = _bytes_like(data)
        n = len(data)
        if type(gpa) is not int or gpa < 0 or not 0 < n <= 4096:
            self._bad_write(gpa, data)
        st = self._stats
        off = gpa & 0xFFF
        tried = None  # the first translation's exit, when the fast path below took it
        if off + n <= 4096:
            # The common case first: one page of the last memslot used, permitted at
            # the first translation (the same steps as the loop below, in its order).
            m = self.slots._last
            if gla is None and m is not None and m.gpa <= gpa < m.gpa + m.size:
                st.writes += 1
                if self._observer is not None:
                    self._observer(gpa, n, rip)
                tried = self.processor.translate_one(gpa, n, _WRITE, None)
                if type(tried) is int:
                    maps = m.maps
                    if maps is not None and (gpa - m.gpa) >> 12 in maps:
                        st.page_granular += 1
                        st.page_granular_by_page.add(gpa >> 12)
                    o = tried & 0xFFF
                    self.memory.frame(tried >> 12)[o : o + n] = data
                    return ALLOWED
                # an exit: the loop below goes on from it
            frags: tuple[tuple[int, int, int], ...] = ((gpa, n, 0),)
        else:
            first = 4096 - off
            frags = ((gpa, first, 0), (gpa + first, n - first, first))
        # Everything that can make the call fail is checked before anything changes: the
        # gla, and that every page is mapped (no statistics, observer, handler or dirty
        # bit for a write that raises).
        if gla is not None:
            _check_extra(Access.WRITE, gla, False, True)  # as translate would
        last = self.slots._last
        mapped = []
        for fgpa, _, _ in frags:
            m = last if last is not None and last.gpa <= fgpa < last.gpa + last.size else self.slots.find(fgpa)
            if m is None:
                raise GpaNotMapped(fgpa, "guest write")
            mapped.append(m)
        if tried is None:  # (else the fast path above counted it and told the observer)
            st.writes += 1
            if self._observer is not None:
                self._observer(gpa, n, rip)
        translate = self.processor.translate_one  # the exit comes back as an ExitInfo, unraised
        targets = []
        events: tuple[SppViolation, ...] = ()  # at most one per page: a tuple, ready for the result
        decision: Decision | None = None
        misses = 0
        for (fgpa, fn, doff), m in zip(frags, mapped):
            i = (fgpa - m.gpa) >> 12
            amap = FULL_ACCESS_MAP if m.maps is None else m.maps.get(i, FULL_ACCESS_MAP)
            if amap != FULL_ACCESS_MAP:
                # what page-granular write protection would trap: one exit per page
                st.page_granular += 1
                st.page_granular_by_page.add(fgpa >> 12)
            fgla = None if gla is None else (gla + doff) & 0xFFFF_FFFF_FFFF_FFFF  # linear addresses wrap
            for _ in _ATTEMPTS:
                if tried is None:
                    r = translate(fgpa, fn, _WRITE, fgla)
                else:
                    r, tried = tried, None
                if isinstance(r, int):
                    targets.append(r)
                    break
                kind = r.kind
                if kind is SppEvent:
                    if not r.qualification & QUAL_SPP_MISS:
                        assert self.sppt is not None  # (an SPPT walk happened)
                        raise SppMisconfiguration(r.exception(), self.sppt.builder.walk(fgpa))
                    misses += 1
                    self._stats.spp_misses += 1
                    self._handle_miss(fgpa)
                elif kind is EptViolation:
                    if m.readonly:
                        st.readonly_writes += 1
                        return WriteResult(False, decision, events, readonly=True, spp_misses=misses)
                    if m.dirty_log and not m.dirty[i]:
                        m.dirty[i] = True
                        self._stats.dirty_log_faults += 1
                        self._sync_leaf(m, i)
                        self._invept()
                        continue
                    if amap == FULL_ACCESS_MAP:
                        raise VmmError(f"unexpected EPT violation on an unprotected page: {r.exception()}")
                    # -- the SppViolation (built inline: this is the hot path of a denied write)
                    fo = fgpa & 0xFFF
                    s0 = fo >> 7
                    s1 = (fo + fn - 1) >> 7
                    touched: tuple[int, ...]
                    denied: tuple[int, ...]
                    if s0 == s1:  # one sub-page touched (the common case)
                        touched = (s0,)
                        denied = () if (amap >> s0) & 1 else touched
                    else:
                        touched = tuple(range(s0, s1 + 1))
                        denied = tuple([s for s in touched if not (amap >> s) & 1])
                    st.violations += 1
                    gfn = fgpa >> 12
                    st.violations_by_page.add(gfn)
                    for s in denied:
                        st.violations_by_subpage.add((gfn, s))
                    fdata = data if fn == n else data[doff : doff + fn]
                    # positional: (gpa, gla, size, data, rip, vcpu, qualification, subpages, denied,
                    # write_gpa, write_size)
                    ev = _new_event(SppViolation, (
                        fgpa, r.gla, fn, fdata if type(fdata) is bytes else bytes(fdata), rip, vcpu,
                        r.qualification, touched, denied, gpa, n,
                    ))
                    events += (ev,)
                    if self._handler is None:  # no handler: SKIP
                        decision = _SKIP
                        st.decisions["skip"] += 1
                    else:
                        layout = self.slots.generation, self.sppt
                        decision = self._decide(ev)
                        if (self.slots.generation, self.sppt) != layout:
                            raise VmmError(
                                f"the violation handler for the write at gpa={gpa:#x} added, deleted or moved a "
                                f"memslot, or turned SPP on or off: the write is abandoned, nothing of it was written "
                                f"(a handler may change access maps, not the VM's memory layout)")
                    if decision is _SKIP or decision is _STOP:
                        return _new_event(WriteResult, (False, decision, events, decision is _STOP, False, misses))
                    if decision is _EMULATE:
                        targets.append(m.hpa + (fgpa - m.gpa))
                        break
                    # UNPROTECT: the touched sub-pages become writable (in the map as it is
                    # now: the handler may have changed it); translate again
                    assert m.maps is not None  # (SPP is still on: checked above)
                    amap = m.maps.get(i, FULL_ACCESS_MAP) | _touched_bits(fgpa & 0xFFF, fn)
                    self._apply([(m, i, amap)])
                else:  # an EPT misconfiguration: a VMM bug, raised as translate raises it
                    raise r.exception()
            else:
                raise VmmError(f"write at gpa={fgpa:#x} still faults after {_MAX_RETRIES} attempts")
        # -- commit: every page decided, now the bytes land
        mem = self.memory
        if len(targets) == 1:
            hpa = targets[0]
            o = hpa & 0xFFF
            mem.frame(hpa >> 12)[o : o + n] = data
        else:
            for hpa, (fgpa, fn, doff) in zip(targets, frags):
                o = hpa & 0xFFF
                mem.frame(hpa >> 12)[o : o + fn] = data[doff : doff + fn]
        if events or misses:
            return WriteResult(True, decision, events, spp_misses=misses)
        return ALLOWED

    @staticmethod
    def _bad_write(gpa, data) -> None:
        if type(gpa) is not int or gpa < 0:
            raise ValueError(f"gpa={gpa!r}: must be a non-negative integer")
        raise ValueError(f"write of {len(data)} bytes: must be 1 to 4096 bytes")

    def _decide(self, ev: SppViolation) -> Decision:
        if self._handler is None:
            d = _SKIP
        else:
            d = self._handler(ev)
            if not isinstance(d, Decision):
                raise TypeError(f"the violation handler returned {d!r}; it must return a sppkit.Decision")
        self._stats.decisions[d.value] += 1
        return d

    def _handle_miss(self, gpa: int) -> None:
        region = gpa & ~(REGION_2M - 1)
        protected: list[tuple[int, int]] = []
        for m in self.slots:
            if m.end <= region or m.gpa >= region + REGION_2M or m.maps is None:
                continue
            lo = max(region, m.gpa)
            hi = min(region + REGION_2M, m.end)
            a, b = (lo - m.gpa) >> 12, (hi - m.gpa) >> 12
            maps = m.maps
            protected.extend((m.base_gfn + i, maps[i]) for i in range(a, b) if i in maps)
        assert self.sppt is not None  # (an SPP miss happened)
        self.sppt.rebuild_region(gpa, protected)
        self._invept()

    # ================================================================ write permits
    # For an engine that makes some guest writes without calling write(): the writes
    # write() would allow at its first step, from the processor's translation cache.
    @property
    def permit_epoch(self) -> tuple:
        """Changes whenever :meth:`write_permit` may answer less for a page with no
        write() to it in between: the processor's cache epoch, the memslots, the write
        observer, the statistics reset or their page-granular table pruned."""
        return self.processor.cache_epoch, self.slots.generation, self._permit_changes, \
            self._stats.page_granular_by_page.prunes

    def write_permit(self, gfn: int) -> tuple[int, int, bool] | None:
        """What :meth:`write` does, at its first step, with a write of 1 to 4096 bytes
        within page ``gfn`` that the processor's cached mapping permits:
        ``(frame_hpa, vector, granular)``, or None when it would decide it any other way
        (no such cached mapping, a write observer to call, no memslot, or a page holding
        a protected sub-page that is not in the page-granular counts yet: counting it
        may prune them).

        A write of ``[off, off+size)`` whose mask in ``processor.spp_write_masks`` the
        ``vector`` covers is then allowed outright: its bytes land at ``frame_hpa | off``
        and it counts as one write (and, with ``granular``, one page-granular access to
        the page: it holds a protected sub-page) — nothing else.  An engine that makes
        such writes itself reports them with :meth:`count_permitted_writes`.  The answer
        holds until :attr:`permit_epoch` changes or write() is called for the page."""
        if self._observer is not None:
            return None
        p = self.processor.cached_write_permit(gfn)
        if p is None:
            return None
        gpa = gfn << 12
        m = self.slots.find(gpa)
        if m is None:
            return None
        granular = m.maps is not None and (gpa - m.gpa) >> 12 in m.maps
        if granular and gfn not in self._stats.page_granular_by_page.counts:
            return None
        return p[0], p[1], granular

    def native_write_cache(self) -> tuple[int, int] | None:
        """This Vm's write cache in C, for an engine whose guest stores reach the VMM in C:
        ``(function, table)`` addresses, ``bool function(table, gpa, size, value)``
        making a store of ``size`` (1 to 8) bytes ``value`` (little-endian) at ``gpa`` —
        only one :meth:`write` would allow at its first step (see :meth:`write_permit`),
        with the same effect, bytes and counts — or refusing it (false: call
        :meth:`write`).  None where the C helper cannot be built.  The caller keeps it
        true: :meth:`note_write_cache` after each :meth:`write` it makes for such a
        store, :meth:`sync_write_cache` before the cache is used again after anything
        else may have changed the Vm.  The function must not run while Python code uses
        this Vm."""
        if self._wc is None:
            from .write_cache import _lib

            lib = _lib()
            if lib is None:
                return None
            self._wc = WriteCache(self, lib)
        return self._wc.entry

    def sync_write_cache(self) -> None:
        """Count the stores the write cache made, and empty it if this Vm's permits may
        have changed since it was filled (:attr:`permit_epoch`)."""
        wc = self._wc
        if wc is not None:
            if wc.table.pending:
                wc.fold()
            wc.sync()

    def note_write_cache(self, gpa: int, size: int, allowed: bool) -> None:
        """After :meth:`write` of ``size`` bytes at ``gpa`` (``allowed``: it returned the
        plain allowed result): bring the write cache up to date for the pages written
        (copy their permits, or drop them)."""
        wc = self._wc
        if wc is not None:
            wc.sync()
            wc.note(gpa >> 12, allowed)
            if (gpa + size - 1) >> 12 != gpa >> 12:
                wc.note((gpa + size - 1) >> 12, allowed)

    def count_permitted_writes(self, writes: int, granular: Sequence[tuple[int, int]] = ()) -> None:
        """Count ``writes`` writes made under :meth:`write_permit` without calling
        write(): ``granular`` lists ``(gfn, n)`` for the pages among them that hold a
        protected sub-page, ``n`` of the writes each."""
        if not isinstance(writes, int) or isinstance(writes, bool) or writes < 0:
            raise ValueError(f"writes={writes!r:.40}: must be a non-negative integer")
        pairs = [(g, n) for g, n in granular]
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for _, n in pairs) \
                or sum(n for _, n in pairs) > writes:
            raise ValueError(f"granular={pairs!r:.80}: each count must be a positive integer, together at most "
                             f"writes={writes}")
        st = self._stats
        st.writes += writes
        for gfn, n in pairs:
            st.page_granular += n
            st.page_granular_by_page.add(gfn, n)

    # ================================================================ statistics
    def stats(self, top: int = 10) -> dict:
        """Write-path statistics as plain, JSON-serialisable data (``top``: how many of
        the most-hit pages and sub-pages to list)."""
        if not isinstance(top, int) or isinstance(top, bool) or top < 0:
            raise ValueError(f"top={top!r}: must be a non-negative integer")
        if self._wc is not None:
            self._wc.fold()
        return self._stats.as_dict(top)

    def reset_stats(self) -> None:
        if self._wc is not None:
            self._wc.fold()  # (into the statistics being dropped)
        self._stats = Stats()
        self._permit_changes += 1

    def spp_memory(self) -> dict:
        """Memory the SPP state uses: the access maps (only protected pages have one:
        the tables and their int keys and values, as ``sys.getsizeof`` counts them) and
        the SPPT frames."""
        maps = sum(sys.getsizeof(m.maps) + sum(sys.getsizeof(i) + sys.getsizeof(a) for i, a in m.maps.items())
                   for m in self.slots if m.maps is not None)
        return {
            "map_bytes": maps,
            "protectable_pages": sum(m.npages for m in self.slots),
            "sppt_bytes": self.sppt.bytes if self.sppt else 0,
            "sppt_tables": len(self.sppt.builder.tables) if self.sppt else 0,
            "protected_2m_regions": len(self._prot_2m),
        }
