"""The processor: what happens when a guest touches a guest-physical address under EPT + SPP.

:meth:`Processor.translate` is the whole decision for one access, in the order of the
SDM flow as Bochs implements it (spec: docs/spp-rules.md §7):

1. EPT walk, level by level: a not-present entry ends it with an EPT violation (48);
   a present entry with reserved bits, an invalid memory type or W without R ends it
   with an EPT misconfiguration (49).  R/W/X are ANDed over the levels.
2. Permission check with the accumulated R/W/X.  Allowed: done (bit 61 irrelevant).
3. A write the accumulated W denies is checked for SPP eligibility (§5).  Eligible:
   SPPT walk L4E → L3E → L2E → L1E.  Miss / misconfiguration → SPP-related event (66);
   vector bit 0 → EPT violation (48, no SPP bit in the qualification); bit 1 → allowed.
   Not eligible → EPT violation.
4. After an allowed access: EPT accessed flags on every entry used and the dirty flag
   on the leaf for a write, when EPTP bit 6 is 1.

Modelling choices where the spec says UNCONFIRMED are named options documented in
docs/modelling.md.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

from .ept import (
    EPT_ACCESSED,
    EPT_DIRTY,
    EPT_SPP,
    EPTP_AD_ENABLE,
    GPA_LIMIT,
    Level,
    VALID_LEAF_MEMTYPES,
    addr_mask,
    check_gpa,
    check_u64,
    eptp_check,
    misconfig_reason,
    reserved_mask,
)
from .exits import (
    QUAL_GLA_TRANSLATION,
    QUAL_GLA_VALID,
    QUAL_NMI_UNBLOCKING,
    QUAL_READ,
    QUAL_SPP_MISS,
    QUAL_WRITE,
    EptMisconfig,
    EptViolation,
    ExitInfo,
    SppEvent,
    VmEntryFailure,
)
from .memory import HostMemory, PhysicalAddressError
from .sppt import SPP_VECTOR_ODD_BITS, SPPT_LEVEL_NAMES, spptp_check, sppt_nonleaf_reserved
from .tlb import INVEPT_ALL_CONTEXT, INVEPT_SINGLE_CONTEXT, TranslationCache

SECONDARY_ENABLE_EPT = 1 << 1  #: secondary processor-based control "enable EPT"
SECONDARY_SPP = 1 << 23  #: secondary control "sub-page write permissions for EPT"

SPP_WRITE_CHECK_ALL = "all-touched"
SPP_WRITE_CHECK_FIRST = "first-byte"
SPP_WRITE_CHECKS = (SPP_WRITE_CHECK_ALL, SPP_WRITE_CHECK_FIRST)

_EPT_LEVEL_NAMES = {4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}


class Access(IntEnum):
    """Kind of guest-physical access; the value is the exit-qualification bit number."""

    READ = 0
    WRITE = 1
    EXECUTE = 2


_new_range = tuple.__new__
_new_exit = tuple.__new__  # builds an ExitInfo without its Python-level __new__
_BAD_MEMTYPES = frozenset(m for m in range(8) if m not in VALID_LEAF_MEMTYPES)
_NEED = {Access.READ: 1, Access.WRITE: 2, Access.EXECUTE: 4}
_ACCESS_BY_NAME = {"read": Access.READ, "write": Access.WRITE, "execute": Access.EXECUTE, "fetch": Access.EXECUTE}


class HostRange(NamedTuple):
    """Where some bytes of an access live in host-physical memory."""

    hpa: int
    size: int


class Processor:
    """A VMX processor running a guest with EPT and, optionally, sub-page write permissions.

    ``secondary_controls`` is the secondary processor-based VM-execution controls field;
    by default EPT on and SPP off.  It is taken literally: SPP without
    ``SECONDARY_ENABLE_EPT`` fails VM entry; EPT off means guest-physical = host-physical.
    The controls pass the VM-entry checks when the processor is created and whenever
    :meth:`load_controls` changes them; a failed check raises :class:`VmEntryFailure`
    and changes nothing.
    """

    def __init__(
        self,
        memory: HostMemory,
        eptp: int,
        *,
        secondary_controls: int | None = None,
        spptp: int = 0,
        spp_write_check: str = SPP_WRITE_CHECK_ALL,
        cache: bool = False,
        cache_spp: bool = False,
        execute_only: bool = True,
    ) -> None:
        if not isinstance(memory, HostMemory):
            raise TypeError(f"memory must be a HostMemory, not {type(memory).__name__}")
        if spp_write_check not in SPP_WRITE_CHECKS:
            raise ValueError(
                f"spp_write_check={spp_write_check!r}: must be one of {', '.join(map(repr, SPP_WRITE_CHECKS))}"
            )
        self.memory = memory
        self.maxphyaddr = memory.maxphyaddr
        self.spp_write_check = spp_write_check
        first_byte = spp_write_check == SPP_WRITE_CHECK_FIRST
        # The SPP-vector bits a write must find set, by (first, last) sub-page touched,
        # at index first * 32 + last: every touched sub-page, or the first one only.
        self._spp_masks = tuple(
            sum(1 << (2 * s) for s in range(first, first + 1 if first_byte else last + 1))
            for first in range(32)
            for last in range(32)
        )
        # R/W/X combinations that are a misconfiguration: write without read, and
        # execute-only where it is not supported
        self._bad_rwx = tuple((rwx & 3) == 2 or (rwx == 4 and not execute_only) for rwx in range(8))
        self._execute_only = bool(execute_only)
        self.cache: TranslationCache | None = TranslationCache() if cache else None
        if cache_spp and not cache:
            raise ValueError("cache_spp=True needs cache=True: SPP vectors are cached with the mappings")
        # Whether an SPP vector that permitted a write is kept with the cached mapping
        # (docs/modelling.md, "The translation cache"); off: the SPPT is read at every
        # SPP-eligible write, as Bochs does.
        self.cache_spp = bool(cache_spp)
        n = self.maxphyaddr
        self._amask = addr_mask(n)
        # Geometry as data: (level, index shift, leaf bits, reserved if table, reserved
        # if leaf, page-frame mask of a leaf, offset mask of a leaf).  An entry is a leaf
        # when ``raw & leaf_bits``: never in a PML4E (0), with bit 7 in a PDPTE/PDE, always
        # in a PTE (-1: every bit; a present entry is non-zero).
        self._geometry = tuple(
            (
                lvl,
                shift,
                {4: 0, 3: 0x80, 2: 0x80, 1: -1}[lvl],
                reserved_mask(Level(lvl), False, n),
                reserved_mask(Level(lvl), True, n),
                self._amask & ~((1 << shift) - 1),
                (1 << shift) - 1,
            )
            for lvl, shift in ((4, 39), (3, 30), (2, 21), (1, 12))
        )
        # By bits 5:0 of an entry, whether the walk stops there: not present (R=W=X=0),
        # or a misconfiguration — bad R/W/X, or (leaf) a bad memory type.  Valid for
        # table entries too: there bits 5:3 are reserved bits, so a table entry the
        # memory-type test flags is a misconfiguration anyway (misconfig_reason then
        # names the right reason).
        self._bad_low = tuple(
            low & 7 == 0 or self._bad_rwx[low & 7] or (low >> 3) in _BAD_MEMTYPES for low in range(64)
        )
        self._sppt_rsv = sppt_nonleaf_reserved(n)
        self._eptp = self._spptp = self._controls = 0
        self._loads = 0  # controls loaded (see cache_epoch)
        self._drops = 0  # cache entries dropped one by one (see cache_epoch)
        self.load_controls(
            eptp=eptp,
            secondary_controls=SECONDARY_ENABLE_EPT if secondary_controls is None else secondary_controls,
            spptp=spptp,
        )

    @property
    def execute_only(self) -> bool:
        """Whether execute-only EPT entries are supported (fixed at construction)."""
        return self._execute_only

    # ------------------------------------------------------------------ controls
    @property
    def eptp(self) -> int:
        return self._eptp

    @property
    def spptp(self) -> int:
        return self._spptp

    @property
    def secondary_controls(self) -> int:
        return self._controls

    @property
    def ept_enabled(self) -> bool:
        return bool(self._controls & SECONDARY_ENABLE_EPT)

    @property
    def spp_enabled(self) -> bool:
        return bool(self._controls & SECONDARY_SPP)

    def load_controls(
        self, *, eptp: int | None = None, secondary_controls: int | None = None, spptp: int | None = None
    ) -> None:
        """Change EPTP / secondary controls / SPPTP as a VM entry would load them.

        The VM-entry checks (spec §1) run on the new values first; if one fails,
        :class:`VmEntryFailure` is raised and nothing changes.
        """
        eptp = self._eptp if eptp is None else eptp
        controls = self._controls if secondary_controls is None else secondary_controls
        spptp = self._spptp if spptp is None else spptp
        for name, v in (("eptp", eptp), ("secondary_controls", controls), ("spptp", spptp)):
            check_u64(name, v)
        if controls >> 32:
            raise ValueError(f"secondary_controls={controls:#x}: the field is 32 bits wide")
        if controls & SECONDARY_ENABLE_EPT:
            why = eptp_check(eptp, self.maxphyaddr)
            if why:
                raise VmEntryFailure(why)
        if controls & SECONDARY_SPP:
            if not controls & SECONDARY_ENABLE_EPT:
                raise VmEntryFailure("sub-page write permissions (bit 23) set while 'enable EPT' (bit 1) is 0")
            why = spptp_check(spptp, self.maxphyaddr)
            if why:
                raise VmEntryFailure(why)
        self._eptp, self._controls, self._spptp = eptp, controls, spptp
        self._loads += 1
        self._pml4 = eptp & self._amask
        self._ad = bool(eptp & EPTP_AD_ENABLE)
        self._spp_on = bool(controls & SECONDARY_SPP)
        self._ept_on = bool(controls & SECONDARY_ENABLE_EPT)
        self._sppt_base = spptp & self._amask
        # With EPT off there is nothing to cache: guest-physical is host-physical.
        self._tlb = self.cache.for_tag(self._pml4) if (self.cache is not None and self._ept_on) else None

    # ------------------------------------------------------------------ INVEPT
    def invept(self, kind: str, eptp: int | None = None) -> None:
        """INVEPT: ``"single-context"`` drops the mappings tagged with ``eptp``'s EP4TA;
        ``"all-context"`` drops all.  Without a cache there is nothing to drop."""
        if kind == INVEPT_SINGLE_CONTEXT:
            if eptp is None:
                raise ValueError("invept('single-context', eptp) needs the EPTP whose mappings to drop")
            check_u64("eptp", eptp)
            if self.cache is not None:
                self.cache.invalidate_tag(eptp & self._amask)
        elif kind == INVEPT_ALL_CONTEXT:
            if self.cache is not None:
                self.cache.invalidate_all()
        else:
            raise ValueError(f"INVEPT type {kind!r}: must be 'single-context' or 'all-context'")

    # ------------------------------------------------------------------ translate
    def translate(
        self,
        gpa: int,
        size: int,
        access: Access,
        *,
        gla: int | None = None,
        paging_structure: bool = False,
        linear: bool = True,
        nmi_unblocking: bool = False,
    ) -> tuple[HostRange, ...]:
        """Translate an access of ``size`` bytes at ``gpa``; return where the bytes live.

        ``gla``: the guest-linear address, if known (reported in the exit's GLA field).
        ``paging_structure``: the access is the processor's own access to a guest
        paging-structure entry (a walk, or an A/D update) — never SPP-eligible.
        ``linear``: the access has a guest-linear address (qualification bit 7; with
        ``paging_structure`` False also bit 8).  False for accesses such as PAE-PDPTE
        loads (``paging_structure=True, linear=False``): no GLA is reported, and such
        accesses are not SPP-eligible.
        ``nmi_unblocking``: the access is by an IRET that unblocked NMIs (bit 12).

        An access crossing a 4-KiB boundary is translated page by page in address
        order and fails at the first page that fails; at most two pages.
        Raises :class:`EptViolation`, :class:`EptMisconfig` or :class:`SppEvent`.
        """
        if type(access) is not Access:
            access = _coerce_access(access)
        if type(gpa) is not int or type(size) is not int or gpa < 0 or size < 1 or gpa + size > GPA_LIMIT:
            _bad_range(gpa, size)
        if paging_structure or gla is not None:
            _check_extra(access, gla, paging_structure, linear)
        first = 4096 - (gpa & 0xFFF)
        if size <= first:
            tlb = self._tlb
            if tlb is not None and not paging_structure:
                # Fast path: a cached mapping that permits the access outright.
                hit = tlb.get(gpa >> 12)
                if hit is not None and (hit[2] or access != 1 or not self._ad):
                    if hit[1] & (1 << access):
                        return (_new_range(HostRange, (hit[0] | (gpa & 0xFFF), size)),)
                    if hit[4] is not None and access == 1 and linear and self._spp_on:
                        # an SPP-eligible write and the cached vector permits it
                        off = gpa & 0xFFF
                        mask = self._spp_masks[(off >> 7) << 5 | (off + size - 1) >> 7]
                        if hit[4] & mask == mask:
                            return (_new_range(HostRange, (hit[0] | off, size)),)
            return (self._translate_page(gpa, size, access, gla, paging_structure, linear, nmi_unblocking),)
        rest = size - first
        if rest > 4096:
            raise ValueError(f"size={size} at gpa={gpa:#x} crosses more than two 4-KiB pages")
        try:
            return (
                self._translate_page(gpa, first, access, gla, paging_structure, linear, nmi_unblocking),
                self._translate_page(
                    gpa + first, rest, access, None if gla is None else gla + first, paging_structure, linear,
                    nmi_unblocking,
                ),
            )
        except PhysicalAddressError:
            if self._ept_on:
                raise
            # EPT off: name the access as it was asked for, not its second page
            raise _beyond_host(gpa, size, self.maxphyaddr) from None

    def translate_one(self, gpa: int, size: int, access: Access, gla: int | None = None) -> int | ExitInfo:
        """:meth:`translate` for the VMM's write path: one linear data access within one
        4-KiB page, whose exit is returned rather than raised.

        Returns the host-physical address of ``gpa`` when the access is allowed, else
        the exit as an :class:`ExitInfo` (``.exception()`` is what ``translate`` would
        raise).  The arguments are not checked: the caller guarantees ``access`` is an
        :class:`Access`, ``0 < size``, ``[gpa, gpa+size)`` inside one page below 2**48,
        ``gla`` None or a non-negative int.  Same decision, same side effects
        (cache, A/D flags) as ``translate(gpa, size, access, gla=gla)``.
        """
        tlb = self._tlb
        if tlb is not None:
            # Fast path: a cached mapping that permits the access outright (as translate's).
            hit = tlb.get(gpa >> 12)
            if hit is not None and (hit[2] or access != 1 or not self._ad):
                if hit[1] & (1 << access):
                    return hit[0] | (gpa & 0xFFF)
                if hit[4] is not None and access == 1 and self._spp_on:
                    off = gpa & 0xFFF  # an SPP-eligible write: the cached vector decides
                    mask = self._spp_masks[(off >> 7) << 5 | (off + size - 1) >> 7]
                    if hit[4] & mask == mask:
                        return hit[0] | off
        return self._page(gpa, size, access, gla, False, True, False)

    # -- what the cache permits (for a copy of translate_one's first step elsewhere) -------
    @property
    def spp_write_masks(self) -> tuple[int, ...]:
        """The SPP-vector bits a write must find set, at ``first << 5 | last`` (the first
        and last sub-page it touches): every touched sub-page's W bit (bit ``2*s``), or
        the first one's only with ``spp_write_check="first-byte"``."""
        return self._spp_masks

    @property
    def cache_epoch(self) -> tuple:
        """Changes whenever :meth:`cached_write_permit` may answer less for a page: an
        INVEPT (or any invalidation of the cache), new controls loaded (EPTP, SPP or EPT
        A/D on or off), or a cached entry dropped because an access it did not permit
        walks again.  (An entry that comes to permit more — a new mapping, a vector
        joining it — does not move it.)"""
        c = self.cache
        return self._loads, self._drops, -1 if c is None else c.invalidations

    def cached_write_permit(self, gfn: int) -> tuple[int, int] | None:
        """The write permission :meth:`translate_one` finds at its first step for page
        ``gfn``, from the translation cache, with no walk and no side effect:
        ``(frame_hpa, vector)`` — a write of ``[off, off+size)`` in the page is permitted
        at ``frame_hpa | off`` when ``vector & m == m`` for its mask ``m`` in
        :attr:`spp_write_masks` (``vector`` is all ones when the cached mapping is
        writable) — or None (no cached entry, or one that permits no write outright).
        It holds until :attr:`cache_epoch` changes or a write to the page walks again
        (a write the vector does not permit)."""
        tlb = self._tlb
        if tlb is None:
            return None
        hit = tlb.get(gfn)
        if hit is None or not (hit[2] or not self._ad):
            return None
        if hit[1] & 2:
            return hit[0], (1 << 64) - 1
        if hit[4] is not None and self._spp_on:
            return hit[0], hit[4]
        return None

    def _translate_page(
        self, gpa: int, size: int, access: Access, gla: int | None, paging: bool, linear: bool, nmi: bool
    ) -> HostRange:
        hpa = self._page(gpa, size, access, gla, paging, linear, nmi)
        if not isinstance(hpa, int):
            raise hpa.exception()
        return _new_range(HostRange, (hpa, size))

    def _page(
        self, gpa: int, size: int, access: Access, gla: int | None, paging: bool, linear: bool, nmi: bool
    ) -> int | ExitInfo:
        """The whole decision for an access within one page: the host-physical address,
        or the exit (unraised)."""
        vector: int | None  # the SPP vector that permits this write, when it is to be cached
        walked: int | ExitInfo  # what an SPPT walk gave
        allowed: bool | ExitInfo | None  # the SPP check: its answer, or the SPP-related event
        if not self._ept_on:  # no EPT: guest-physical addresses are host-physical
            if gpa + size > self.memory.limit:
                raise _beyond_host(gpa, size, self.maxphyaddr)
            return gpa

        # Access as EPT sees it: with EPT A/D on, guest paging-structure accesses are writes.
        write = access == 1 or (paging and self._ad)
        need = 2 if write else (1 if access == 0 else 4)
        spp_candidate = write and not paging and linear and self._spp_on

        # -- cached combined mapping (optional) ---------------------------------
        tlb = self._tlb
        if tlb is not None:
            cache = self.cache  # (a tlb is one tag of it)
            assert cache is not None
            hit = tlb.get(gpa >> 12)
            if hit is not None:
                frame, acc, dirty, spp_leaf, vector = hit
                if dirty or not write or not self._ad:
                    if acc & need:
                        cache.hits += 1
                        return frame | (gpa & 0xFFF)
                    if spp_candidate and spp_leaf and acc & 1:
                        off = gpa & 0xFFF
                        mask = self._spp_masks[(off >> 7) << 5 | (off + size - 1) >> 7]
                        if vector is None:
                            if self.cache_spp:
                                # EPT part cached; the SPPT walk's vector joins the mapping
                                # when it permits the write.
                                walked = self._spp_walk(gpa, gla, nmi)
                                if isinstance(walked, int) and walked & mask == mask:
                                    vector = walked
                                    tlb[gpa >> 12] = (frame, acc, dirty, spp_leaf, vector)
                            elif self._spp_permits(gpa, size, gla, nmi) is True:
                                # EPT part cached; the SPPT is read at every eligible write.
                                cache.hits += 1
                                return frame | off
                        if vector is not None and vector & mask == mask:
                            cache.hits += 1
                            return frame | off
                        # Anything else (a denial, an SPP miss or misconfiguration) is
                        # decided by the tables, as for any access the entry does not
                        # permit: a stale mapping or vector never faults by itself.
                del tlb[gpa >> 12]  # not good enough for this access: walk again
                self._drops += 1
            cache.misses += 1

        vector = None
        # -- 1. EPT walk ---------------------------------------------------------
        # Table addresses are masked below 2**MAXPHYADDR and 4-KiB aligned: an entry is
        # word ``idx`` of frame ``base >> 12``, at host-physical ``base + idx * 8``.
        words = self.memory._words
        amask = self._amask
        base = self._pml4
        acc = 7
        ad = self._ad
        bad_low = self._bad_low
        used: list[tuple[int, int]] = []  # (hpa, raw) of each entry, for the A/D update (EPT A/D on)
        for lvl, shift, leaf_bits, rsv_table, rsv_leaf, frame_mask, off_mask in self._geometry:
            idx = (gpa >> shift) & 0x1FF
            raw = words[base >> 12][idx]
            leaf = raw & leaf_bits
            rsv = rsv_leaf if leaf else rsv_table
            if bad_low[raw & 0x3F] or raw & rsv:  # not present, or present and misconfigured
                if not raw & 7:  # the not-present test comes first
                    return _new_exit(ExitInfo, (
                        EptViolation, self._qualification(access, paging, linear, nmi),  # bits 5:3 = 0: AND includes this entry
                        gpa, gla if linear else None,
                        _EPT_LEVEL_NAMES[lvl], raw, base + idx * 8, "EPT entry not present",
                    ))
                return _new_exit(ExitInfo, (
                    EptMisconfig, 0, gpa, None, _EPT_LEVEL_NAMES[lvl], raw, base + idx * 8,
                    misconfig_reason(raw, Level(lvl), self.maxphyaddr, execute_only=self._execute_only),
                ))
            acc &= raw
            if ad:
                used.append((base + idx * 8, raw))
            if leaf:
                break
            base = raw & amask
        hpa = (raw & frame_mask) | (gpa & off_mask)

        # -- 2. permission check with the accumulated R/W/X ------------------------
        if not acc & need:
            # -- 3. sub-page write permissions ----------------------------------------
            eligible = spp_candidate and lvl == 1 and raw & EPT_SPP and acc & 1
            if eligible and self.cache_spp and tlb is not None:
                walked = self._spp_walk(gpa, gla, nmi)
                if isinstance(walked, int):
                    vector = walked
                    off = gpa & 0xFFF
                    mask = self._spp_masks[(off >> 7) << 5 | (off + size - 1) >> 7]
                    allowed = vector & mask == mask
                else:
                    allowed = walked
            else:
                allowed = self._spp_permits(gpa, size, gla, nmi) if eligible else False
            if allowed is not True:
                if allowed is not False:
                    return allowed  # the SPP-related event
                return _new_exit(ExitInfo, (
                    EptViolation, self._qualification(access, paging, linear, nmi) | ((acc & 7) << 3),
                    gpa, gla if linear else None, _EPT_LEVEL_NAMES[lvl], raw, base + idx * 8,
                    "write denied by the SPP vector" if eligible else "access not permitted by EPT",
                ))

        # -- 4. accessed and dirty flags -----------------------------------------------
        dirty = bool(raw & EPT_DIRTY)  # the leaf's D flag as cached (re-walk to set it)
        if ad:
            write_u64 = self.memory.write_u64
            last = len(used) - 1
            for i, (ehpa, e) in enumerate(used):
                new = e | EPT_ACCESSED
                if i == last:
                    if write:
                        new |= EPT_DIRTY
                    dirty = bool(new & EPT_DIRTY)
                if new != e:
                    write_u64(ehpa, new)
        if tlb is not None:
            tlb[gpa >> 12] = (hpa & ~0xFFF, acc & 7, dirty, bool(lvl == 1 and raw & EPT_SPP), vector)
        return hpa

    def _qualification(self, access: Access, paging: bool, linear: bool, nmi: bool) -> int:
        """Bits 2:0, 7, 8 and 12 of an EPT-violation qualification (5:3 added by the caller)."""
        q = 1 << access
        if paging and self._ad:
            q |= QUAL_READ | QUAL_WRITE  # treated as a write: the SDM sets both bits
        if paging:
            if linear:  # (not for a PAE-PDPTE load, whose GPA comes from no linear address)
                q |= QUAL_GLA_VALID  # bit 8 = 0: an access to a paging-structure entry
        elif linear:
            q |= QUAL_GLA_VALID | QUAL_GLA_TRANSLATION
        return q | (QUAL_NMI_UNBLOCKING if nmi else 0)

    # ------------------------------------------------------------------ SPPT walk
    def spp_vector(self, gpa: int, *, gla: int | None = None, nmi_unblocking: bool = False) -> int:
        """The SPPT walk (spec §3, §8): return the L1E (SPP vector) for ``gpa``.

        Raises :class:`SppEvent` — bit 11 = 1 when an L4E/L3E/L2E is not present (miss),
        0 when a present entry has a reserved bit or the L1E has an odd bit set
        (misconfiguration).  The not-present test comes first at each level.
        ValueError for ``gpa`` not an int below 2**48 or ``gla`` not None or an
        unsigned 64-bit int (as :meth:`translate` checks it).
        """
        check_gpa(gpa)
        if gla is not None and (type(gla) is not int or not 0 <= gla < 1 << 64):
            raise _bad_gla(gla)
        vector = self._spp_walk(gpa, gla, nmi_unblocking)
        if not isinstance(vector, int):
            raise vector.exception()
        return vector

    def _spp_permits(self, gpa: int, size: int, gla: int | None, nmi: bool) -> bool | ExitInfo:
        """Whether the SPP vector of ``gpa``'s page permits a write of ``size`` bytes at
        ``gpa`` (True / False), or the SPP-related event the SPPT walk ends in (unraised)."""
        vector = self._spp_walk(gpa, gla, nmi)
        if not isinstance(vector, int):
            return vector
        off = gpa & 0xFFF
        mask = self._spp_masks[(off >> 7) << 5 | (off + size - 1) >> 7]
        return vector & mask == mask

    def _spp_walk(self, gpa: int, gla: int | None, nmi_unblocking: bool) -> int | ExitInfo:
        """Walk the SPPT for ``gpa``: the SPP vector (L1E), or the SPP-related event the
        walk ends in (unraised)."""
        nmi = QUAL_NMI_UNBLOCKING if nmi_unblocking else 0
        words = self.memory._words  # as in the EPT walk: entry idx of frame base >> 12
        base = self._sppt_base
        rsv = self._sppt_rsv
        check = rsv | 1  # of these bits, a usable entry has exactly bit 0 (present) set
        amask = self._amask
        for lvl, shift in ((4, 39), (3, 30), (2, 21)):
            idx = (gpa >> shift) & 0x1FF
            e = words[base >> 12][idx]
            if e & check != 1:  # not present, or present with reserved bits
                if not e & 1:  # the not-present test comes first
                    return _new_exit(ExitInfo, (
                        SppEvent, QUAL_SPP_MISS | nmi, gpa, gla, SPPT_LEVEL_NAMES[lvl], e, base + idx * 8,
                        "entry not present",
                    ))
                return _new_exit(ExitInfo, (
                    SppEvent, nmi, gpa, gla, SPPT_LEVEL_NAMES[lvl], e, base + idx * 8,
                    f"reserved bits set: {e & rsv:#x}",
                ))
            base = e & amask
        idx = (gpa >> 12) & 0x1FF
        vector = words[base >> 12][idx]
        if vector & SPP_VECTOR_ODD_BITS:
            return _new_exit(ExitInfo, (
                SppEvent, nmi, gpa, gla, "L1E", vector, base + idx * 8,
                f"reserved (odd) bits set: {vector & SPP_VECTOR_ODD_BITS:#x}",
            ))
        return vector


def _coerce_access(access) -> Access:
    if isinstance(access, str) and access.lower() in _ACCESS_BY_NAME:
        return _ACCESS_BY_NAME[access.lower()]
    if isinstance(access, int) and not isinstance(access, bool) and access in (0, 1, 2):
        return Access(access)
    raise ValueError(f"access={access!r}: must be Access.READ, Access.WRITE or Access.EXECUTE")


def _bad_range(gpa, size) -> None:
    if type(gpa) is not int or gpa < 0:
        raise ValueError(f"gpa={gpa!r}: must be a non-negative integer")
    if type(size) is not int or size < 1:
        raise ValueError(f"size={size!r}: must be a positive integer")
    raise ValueError(f"gpa={gpa:#x} size={size}: beyond the 48-bit guest-physical address space")


def _beyond_host(gpa: int, size: int, maxphyaddr: int) -> PhysicalAddressError:
    return PhysicalAddressError(
        f"gpa={gpa:#x} size={size}: beyond host MAXPHYADDR ({maxphyaddr}) with EPT off (guest-physical = host-physical)"
    )


def _bad_gla(gla) -> ValueError:
    return ValueError(f"gla={gla!r}: must be None or an unsigned 64-bit integer (a 64-bit linear address)")


def _check_extra(access: Access, gla, paging_structure: bool, linear: bool) -> None:
    if paging_structure and access == Access.EXECUTE:
        raise ValueError("a paging-structure access is a read or a write, not an execute")
    if gla is not None:
        if type(gla) is not int or not 0 <= gla < 1 << 64:
            raise _bad_gla(gla)
        if not linear:
            raise ValueError("gla given for an access with no guest-linear address (linear=False)")
