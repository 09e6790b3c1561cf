"""Conformance: sub-page write permissions (SPP), one test class per rule of the spec.

Spec: docs/spp-rules.md (§ numbers below).  The rule under test is
always built by hand with raw ``write_u64`` entries (see spp_rig.py).  "No SPPT read"
is proved twice: the SPPT is left empty (any read would be an SPP miss, exit 66) and
the reads of SPPT frames are recorded.
"""

from __future__ import annotations

import pytest

from spp_rig import (
    ACCESSED,
    ALL_WRITABLE,
    DIRTY,
    ENABLE_EPT,
    ENABLE_SPP,
    EPT_MISCONFIG,
    EPT_VIOLATION,
    G,
    GLA,
    LARGE_HPA,
    ODD_BITS,
    Q_FETCH,
    Q_GLA_VALID,
    Q_LINEAR,
    Q_NMI,
    Q_R,
    Q_READ,
    Q_SPP_MISS,
    Q_W,
    Q_WRITE,
    Q_WRITE_DENIED_R,
    Q_X,
    R,
    RWX,
    SPP,
    SPP_EVENT,
    SPPT_NONLEAF,
    SPPT_SHIFT,
    WB,
    X,
    Exit,
    Rig,
    vector,
    W,
)
from sppkit.arch import Access, Processor, SppEvent, EptViolation, VmEntryFailure

WRITE, READ, EXECUTE = Access.WRITE, Access.READ, Access.EXECUTE

#: A 4-KiB leaf that is readable, not writable, with bit 61: the canonical SPP page.
SPP_LEAF = R | WB | SPP


def spp_page(rig: Rig, gpa: int = G, vec: int = ALL_WRITABLE, flags: int = SPP_LEAF, **kw):
    """EPT path with an SPP leaf (R only, bit 61) plus an SPPT path holding ``vec``."""
    m = rig.map(gpa, flags=flags, **kw)
    s = rig.spp(gpa, vec)
    return m, s


@pytest.fixture
def rig() -> Rig:
    return Rig()


# =====================================================================================
class TestSppControlGatesBit61:
    """spec §1, §5 clause 1: bit 61 is honoured only when secondary control bit 23
    ("sub-page write permissions for EPT") is 1; with the control 0 the bit is ignored and
    a write the EPT denies is an ordinary EPT violation, the SPPT never read."""

    def test_control_on_vector_permits_write(self, rig):
        m, _ = spp_page(rig)
        assert rig.run(rig.cpu(spp=True), G + 0x10, 4, WRITE, gla=GLA) == ((m.hpa + 0x10, 4),)
        assert rig.sppt_was_read

    def test_control_off_bit61_ignored(self, rig):
        spp_page(rig)  # vector says: every sub-page writable
        cpu = rig.cpu(spp=False)
        assert cpu.secondary_controls == ENABLE_EPT
        assert rig.run(cpu, G + 0x10, 4, WRITE, gla=GLA) == Exit(EPT_VIOLATION, Q_WRITE_DENIED_R, G + 0x10, GLA)
        assert not rig.sppt_was_read

    def test_control_off_empty_sppt_is_not_an_spp_miss(self, rig):
        rig.map(G, flags=SPP_LEAF)  # no SPPT path at all: an SPPT read would miss
        assert rig.run(rig.cpu(spp=False), G, 1, WRITE).reason == EPT_VIOLATION
        assert rig.run(rig.cpu(spp=True), G, 1, WRITE).reason == SPP_EVENT

    def test_spptp_not_checked_while_control_off(self, rig):
        rig.map(G, flags=SPP_LEAF)
        cpu = Processor(rig.mem, rig.eptp(), secondary_controls=ENABLE_EPT, spptp=0xFFF)  # garbage SPPTP
        assert rig.run(cpu, G, 1, WRITE).reason == EPT_VIOLATION

    def test_turning_the_control_on_with_load_controls(self, rig):
        m, _ = spp_page(rig)
        cpu = rig.cpu(spp=False)
        assert rig.run(cpu, G, 8, WRITE).reason == EPT_VIOLATION
        cpu.load_controls(secondary_controls=ENABLE_EPT | ENABLE_SPP)
        assert rig.run(cpu, G, 8, WRITE) == ((m.hpa, 8),)
        cpu.load_controls(secondary_controls=ENABLE_EPT)
        assert rig.run(cpu, G, 8, WRITE).reason == EPT_VIOLATION


# =====================================================================================
class TestSpptpVmEntryChecks:
    """spec §1: with control bit 23 = 1, VM entry fails (VM-instruction error 7) when
    'enable EPT' is 0, when SPPTP bits 11:0 are not 0, or when SPPTP sets a bit at or
    above MAXPHYADDR."""

    @pytest.mark.parametrize("bit", range(12))
    def test_low_bits_must_be_zero(self, rig, bit):
        with pytest.raises(VmEntryFailure) as ei:
            Processor(rig.mem, rig.eptp(), secondary_controls=ENABLE_EPT | ENABLE_SPP, spptp=rig.sppt_root | (1 << bit))
        assert ei.value.error_number == 7
        assert "SPPTP" in str(ei.value)

    def test_aligned_spptp_passes(self, rig):
        for spptp in (0, 0x1000, rig.sppt_root, 1 << 45):
            cpu = Processor(rig.mem, rig.eptp(), secondary_controls=ENABLE_EPT | ENABLE_SPP, spptp=spptp)
            assert cpu.spptp == spptp and cpu.spp_enabled

    @pytest.mark.parametrize("maxphyaddr", [36, 39, 46, 52])
    def test_bits_at_or_above_maxphyaddr(self, maxphyaddr):
        rig = Rig(maxphyaddr)
        ok = Processor(rig.mem, rig.eptp(), secondary_controls=ENABLE_EPT | ENABLE_SPP, spptp=1 << (maxphyaddr - 1))
        assert ok.spptp == 1 << (maxphyaddr - 1)
        for bit in sorted({maxphyaddr, 51, 52, 63} - set(range(maxphyaddr))):
            with pytest.raises(VmEntryFailure) as ei:
                Processor(rig.mem, rig.eptp(), secondary_controls=ENABLE_EPT | ENABLE_SPP, spptp=1 << bit)
            assert ei.value.error_number == 7

    def test_spp_requires_enable_ept(self, rig):
        with pytest.raises(VmEntryFailure) as ei:
            Processor(rig.mem, rig.eptp(), secondary_controls=ENABLE_SPP, spptp=rig.sppt_root)
        assert ei.value.error_number == 7
        assert Processor(rig.mem, rig.eptp(), secondary_controls=ENABLE_EPT | ENABLE_SPP, spptp=rig.sppt_root).spp_enabled

    def test_failed_load_changes_nothing(self, rig):
        m, _ = spp_page(rig)
        cpu = rig.cpu()
        for bad in (dict(spptp=rig.sppt_root | 0x800), dict(spptp=1 << 46), dict(secondary_controls=ENABLE_SPP)):
            with pytest.raises(VmEntryFailure):
                cpu.load_controls(**bad)
            assert (cpu.spptp, cpu.secondary_controls) == (rig.sppt_root, ENABLE_EPT | ENABLE_SPP)
            assert rig.run(cpu, G, 4, WRITE) == ((m.hpa, 4),)

    def test_load_controls_checks_spptp_when_enabling(self, rig):
        cpu = Processor(rig.mem, rig.eptp(), secondary_controls=ENABLE_EPT, spptp=0x123)
        with pytest.raises(VmEntryFailure):
            cpu.load_controls(secondary_controls=ENABLE_EPT | ENABLE_SPP)
        assert not cpu.spp_enabled


# =====================================================================================
class TestBit61OnlyOn4KiBLeaf:
    """spec §2: bit 61 means "sub-page write permissions" only in an EPT PTE mapping a
    4-KiB page.  In a 2-MiB PDE leaf, a 1-GiB PDPTE leaf and every non-leaf entry it is
    ignored: not reserved (no misconfiguration), never SPP (no SPPT read)."""

    @pytest.mark.parametrize("leaf", ["PDE", "PDPTE"])
    def test_large_leaf_write_is_plain_ept_violation(self, rig, leaf):
        rig.map(G, leaf=leaf, flags=R | WB | SPP)  # SPPT left empty
        cpu = rig.cpu()
        assert rig.run(cpu, G + 0x1234, 2, WRITE, gla=GLA) == Exit(EPT_VIOLATION, Q_WRITE_DENIED_R, G + 0x1234, GLA)
        assert not rig.sppt_was_read

    @pytest.mark.parametrize("leaf", ["PDE", "PDPTE"])
    def test_large_leaf_garbage_sppt_not_read(self, rig, leaf):
        rig.map(G, leaf=leaf, flags=R | WB | SPP)
        rig.put(rig.sppt_root + 8 * ((G >> 39) & 0x1FF), 0xFFF0_0000_0000_0FFF)  # misconfigured L4E
        assert rig.run(rig.cpu(), G, 1, WRITE).reason == EPT_VIOLATION
        assert not rig.sppt_was_read

    @pytest.mark.parametrize("leaf", ["PDE", "PDPTE"])
    def test_large_leaf_full_vector_does_not_help(self, rig, leaf):
        rig.map(G, leaf=leaf, flags=R | WB | SPP)
        rig.spp(G, ALL_WRITABLE)
        assert rig.run(rig.cpu(), G, 1, WRITE).reason == EPT_VIOLATION

    @pytest.mark.parametrize("leaf", ["PDE", "PDPTE"])
    def test_bit61_not_reserved_in_large_leaf(self, rig, leaf):
        m = rig.map(G, leaf=leaf, flags=RWX | WB | SPP)
        off = G & ((1 << {"PDE": 21, "PDPTE": 30}[leaf]) - 1)
        assert rig.run(rig.cpu(), G + 8, 8, READ) == ((LARGE_HPA[leaf] + off + 8, 8),)
        assert rig.run(rig.cpu(), G + 8, 8, WRITE) == ((m.hpa + off + 8, 8),)

    @pytest.mark.parametrize("level", ["PML4E", "PDPTE", "PDE"])
    def test_bit61_ignored_in_non_leaf(self, rig, level):
        kw = {level.lower(): RWX | SPP}
        m = rig.map(G, flags=R | WB, **kw)  # PTE without bit 61
        rig.spp(G, ALL_WRITABLE)
        cpu = rig.cpu()
        assert rig.run(cpu, G, 4, WRITE).reason == EPT_VIOLATION  # not made SPP by the non-leaf bit
        assert not rig.sppt_was_read
        assert rig.run(cpu, G, 4, READ) == ((m.hpa, 4),)  # and no misconfiguration

    def test_neighbour_4k_leaf_does_read_sppt(self, rig):
        rig.map(G, flags=R | WB | SPP)  # the same leaf bits at the PTE: SPP-eligible
        assert rig.run(rig.cpu(), G, 1, WRITE) == Exit(SPP_EVENT, Q_SPP_MISS, G, None)
        assert rig.sppt_was_read


# =====================================================================================
class TestAccumulatedWritePermission:
    """spec §2, §5 clause 4: SPP is consulted only when the *accumulated* write
    permission (AND of bit 1 over every EPT entry used) is 0.  Accumulated W = 1: the
    write is allowed and bit 61 is irrelevant.  A non-leaf with W = 0 over a leaf with
    W = 1 and bit 61 makes the write SPP-eligible."""

    def test_writable_everywhere_allowed_without_sppt(self, rig):
        m = rig.map(G, flags=RWX | WB | SPP)  # SPPT empty
        assert rig.run(rig.cpu(), G + 0xF80, 0x80, WRITE) == ((m.hpa + 0xF80, 0x80),)
        assert not rig.sppt_was_read

    def test_writable_everywhere_zero_vector_still_allowed(self, rig):
        m = rig.map(G, flags=R | W | WB | SPP)
        rig.spp(G, 0)
        assert rig.run(rig.cpu(), G, 8, WRITE) == ((m.hpa, 8),)
        assert not rig.sppt_was_read

    @pytest.mark.parametrize("level", ["PML4E", "PDPTE", "PDE"])
    def test_non_leaf_w0_makes_leaf_w1_eligible(self, rig, level):
        kw = {level.lower(): R | X}
        m = rig.map(G, flags=R | W | X | WB | SPP, **kw)
        cpu = rig.cpu()
        # SPPT empty: the SPPT is consulted -> SPP miss
        assert rig.run(cpu, G + 0x100, 4, WRITE, gla=GLA) == Exit(SPP_EVENT, Q_SPP_MISS, G + 0x100, GLA)
        s = rig.spp(G, vector(2))
        assert rig.run(cpu, G + 0x100, 4, WRITE) == ((m.hpa + 0x100, 4),)
        rig.put(s["L1E"], vector(3))
        assert rig.run(cpu, G + 0x100, 4, WRITE, gla=GLA) == Exit(
            EPT_VIOLATION, Q_WRITE | Q_R | Q_X | Q_GLA_VALID | Q_LINEAR, G + 0x100, GLA
        )

    def test_leaf_w0_without_bit61_not_eligible(self, rig):
        rig.map(G, flags=R | WB)
        rig.spp(G, ALL_WRITABLE)
        assert rig.run(rig.cpu(), G, 1, WRITE, gla=GLA) == Exit(EPT_VIOLATION, Q_WRITE_DENIED_R, G, GLA)
        assert not rig.sppt_was_read


# =====================================================================================
class TestAccumulatedReadRequired:
    """spec §5 clause 4: a write is SPP-eligible only if the accumulated read
    permission is 1; an execute-only leaf (or a non-leaf with R = 0) with bit 61 gives an
    ordinary EPT violation (48) without consulting the SPPT."""

    def test_execute_only_leaf_not_eligible(self, rig):
        rig.map(G, flags=X | WB | SPP)  # SPPT empty
        assert rig.run(rig.cpu(), G, 4, WRITE, gla=GLA) == Exit(
            EPT_VIOLATION, Q_WRITE | Q_X | Q_GLA_VALID | Q_LINEAR, G, GLA
        )
        assert not rig.sppt_was_read

    def test_execute_only_leaf_full_vector_not_eligible(self, rig):
        rig.map(G, flags=X | WB | SPP)
        rig.spp(G, ALL_WRITABLE)
        assert rig.run(rig.cpu(), G, 4, WRITE).reason == EPT_VIOLATION

    @pytest.mark.parametrize("level", ["PML4E", "PDPTE", "PDE"])
    def test_non_leaf_r0_not_eligible(self, rig, level):
        rig.map(G, flags=R | WB | SPP, **{level.lower(): X})
        rig.spp(G, ALL_WRITABLE)
        assert rig.run(rig.cpu(), G, 4, WRITE, gla=GLA) == Exit(EPT_VIOLATION, Q_WRITE | Q_GLA_VALID | Q_LINEAR, G, GLA)
        assert not rig.sppt_was_read

    def test_neighbour_read_only_leaf_is_eligible(self, rig):
        rig.map(G, flags=R | WB | SPP)
        assert rig.run(rig.cpu(), G, 4, WRITE).reason == SPP_EVENT


# =====================================================================================
class TestOnlyDataWritesConsultSppt:
    """spec §5 clause 3: only data writes are SPP-eligible; reads and instruction
    fetches never consult the SPPT and bit 61 does not affect them."""

    def test_read_of_spp_page_allowed_with_garbage_sppt(self, rig):
        m = rig.map(G, flags=SPP_LEAF)
        rig.spp(G, ODD_BITS, l4e=0xFFE | 1)  # every SPPT read would be a misconfiguration
        assert rig.run(rig.cpu(), G + 0xFFF, 1, READ) == ((m.hpa + 0xFFF, 1),)
        assert not rig.sppt_was_read

    def test_fetch_from_executable_spp_page_allowed(self, rig):
        m = rig.map(G, flags=R | X | WB | SPP)
        assert rig.run(rig.cpu(), G + 0x80, 15, EXECUTE) == ((m.hpa + 0x80, 15),)
        assert not rig.sppt_was_read

    def test_fetch_denied_is_ept_violation_not_spp(self, rig):
        rig.map(G, flags=SPP_LEAF)
        rig.spp(G, ALL_WRITABLE)
        assert rig.run(rig.cpu(), G + 0x80, 4, EXECUTE, gla=GLA) == Exit(
            EPT_VIOLATION, Q_FETCH | Q_R | Q_GLA_VALID | Q_LINEAR, G + 0x80, GLA
        )
        assert not rig.sppt_was_read

    def test_read_denied_is_ept_violation_not_spp(self, rig):
        rig.map(G, flags=X | WB | SPP)
        assert rig.run(rig.cpu(), G, 4, READ, gla=GLA) == Exit(EPT_VIOLATION, Q_READ | Q_X | Q_GLA_VALID | Q_LINEAR, G, GLA)
        assert not rig.sppt_was_read


# =====================================================================================
class TestPagingStructureWritesNotEligible:
    """spec §5 clause 5, §2: the processor's own accesses to guest paging structures
    (walks, A/D updates) are never SPP-eligible.  With EPTP bit 6 = 1 such accesses
    (reads too) are writes for EPT: an SPP page with W = 0 faults on every walk, with
    qualification bits 0 and 1 both set; bit 7 set, bit 8 clear."""

    def test_paging_write_on_spp_page_is_ept_violation(self, rig):
        m, _ = spp_page(rig)
        cpu = rig.cpu()
        assert rig.run(cpu, G + 0x40, 8, WRITE, gla=GLA, paging_structure=True) == Exit(
            EPT_VIOLATION, Q_WRITE | Q_R | Q_GLA_VALID, G + 0x40, GLA
        )
        assert not rig.sppt_was_read
        # neighbour: the same write as a data write is permitted by the vector
        assert rig.run(cpu, G + 0x40, 8, WRITE, gla=GLA) == ((m.hpa + 0x40, 8),)

    def test_paging_read_with_ad_is_a_write(self, rig):
        spp_page(rig)
        cpu = rig.cpu(ad=True)
        assert rig.run(cpu, G + 0x40, 8, READ, gla=GLA, paging_structure=True) == Exit(
            EPT_VIOLATION, Q_READ | Q_WRITE | Q_R | Q_GLA_VALID, G + 0x40, GLA
        )
        assert not rig.sppt_was_read

    def test_paging_read_without_ad_is_a_read(self, rig):
        m, _ = spp_page(rig)
        assert rig.run(rig.cpu(ad=False), G + 0x40, 8, READ, paging_structure=True) == ((m.hpa + 0x40, 8),)


# =====================================================================================
class TestNonLinearWritesNotEligible:
    """spec §5 clause 6: only writes to the translation of a linear address are
    eligible (e.g. not PDPTE loads).  Such a write is an EPT violation with
    qualification bits 7 and 8 clear and no guest-linear address."""

    def test_non_linear_write_is_ept_violation(self, rig):
        spp_page(rig)
        assert rig.run(rig.cpu(), G + 0x18, 8, WRITE, linear=False) == Exit(EPT_VIOLATION, Q_WRITE | Q_R, G + 0x18, None)
        assert not rig.sppt_was_read

    def test_linear_neighbour_is_permitted(self, rig):
        m, _ = spp_page(rig)
        assert rig.run(rig.cpu(), G + 0x18, 8, WRITE, linear=True) == ((m.hpa + 0x18, 8),)


# =====================================================================================
class TestSppMiss:
    """spec §3, §4 outcome 1: walking L4E → L3E → L2E, an entry with bit 0 = 0 is an SPP
    miss: exit 66 with qualification bit 11 = 1 (and bit 12 for NMI unblocking), GPA and
    GLA fields written.  The walk stops there: the present test comes before the reserved
    bits, and lower levels are not read."""

    @pytest.mark.parametrize("level", SPPT_NONLEAF)
    def test_not_present_entry(self, rig, level):
        _, s = spp_page(rig)
        rig.put(s[level], rig.get(s[level]) & ~1)  # table address kept, bit 0 cleared
        cpu = rig.cpu()
        assert rig.run(cpu, G + 0x3C4, 4, WRITE, gla=GLA + 0x3C4) == Exit(SPP_EVENT, Q_SPP_MISS, G + 0x3C4, GLA + 0x3C4)
        assert rig.run(cpu, G + 0x3C4, 4, WRITE, gla=GLA, nmi_unblocking=True) == Exit(
            SPP_EVENT, Q_SPP_MISS | Q_NMI, G + 0x3C4, GLA
        )

    @pytest.mark.parametrize("level", SPPT_NONLEAF)
    def test_not_present_with_reserved_bits_is_a_miss(self, rig, level):
        _, s = spp_page(rig)
        rig.put(s[level], (rig.get(s[level]) & ~1) | 0xFFE | (0xFFF << 52) | (1 << 50))
        assert rig.run(rig.cpu(), G, 1, WRITE) == Exit(SPP_EVENT, Q_SPP_MISS, G, None)

    @pytest.mark.parametrize("level", SPPT_NONLEAF)
    def test_walk_stops_at_missing_level(self, rig, level):
        _, s = spp_page(rig)
        order = list(SPPT_NONLEAF) + ["L1E"]
        for lower in order[order.index(level) + 1 :]:
            rig.put(s[lower], 0xFFFF_FFFF_FFFF_FFFF)  # misconfigured if it were read
        rig.put(s[level], 0)
        cpu = rig.cpu()
        exc = pytest.raises(SppEvent, cpu.translate, G, 1, WRITE).value
        assert exc.is_miss and exc.level == level
        lower_frames = {s[lower] >> 12 for lower in order[order.index(level) + 1 :]}
        rig.run(cpu, G, 1, WRITE)
        assert s[level] >> 12 in rig.mem.frames_looked_up
        assert not lower_frames & rig.mem.frames_looked_up

    def test_fresh_sppt_misses_at_l4e(self, rig):
        rig.map(G, flags=SPP_LEAF)
        exc = pytest.raises(SppEvent, rig.cpu().translate, G + 5, 1, WRITE, gla=7).value
        assert (exc.reason, exc.qualification, exc.gpa, exc.gla, exc.level) == (66, Q_SPP_MISS, G + 5, 7, "L4E")
        assert not isinstance(exc, EptViolation)

    def test_miss_takes_the_place_of_the_ept_violation(self, rig):
        rig.map(G, flags=SPP_LEAF)
        assert rig.run(rig.cpu(spp=False), G, 1, WRITE).reason == EPT_VIOLATION
        assert rig.run(rig.cpu(spp=True), G, 1, WRITE).reason == SPP_EVENT


# =====================================================================================
class TestSppNonLeafReservedBits:
    """spec §3, §4 outcome 2: a present L4E/L3E/L2E with any reserved bit set — 11:1,
    51:N (N = MAXPHYADDR) or 63:52 — is an SPP misconfiguration: exit 66 with
    qualification bit 11 = 0 (bit 12 for NMI unblocking).  Bits N-1:12 are the address."""

    @staticmethod
    def reserved_bits(n):
        return list(range(1, 12)) + list(range(n, 52)) + list(range(52, 64))

    @pytest.mark.parametrize("maxphyaddr", [39, 46])
    @pytest.mark.parametrize("level", SPPT_NONLEAF)
    def test_each_reserved_bit(self, level, maxphyaddr):
        rig = Rig(maxphyaddr)
        _, s = spp_page(rig)
        good = rig.get(s[level])
        cpu = rig.cpu()
        for bit in self.reserved_bits(maxphyaddr):
            rig.put(s[level], good | (1 << bit))
            assert rig.run(cpu, G + 0x700, 2, WRITE, gla=GLA) == Exit(SPP_EVENT, 0, G + 0x700, GLA), bit
            assert rig.run(cpu, G + 0x700, 2, WRITE, gla=GLA, nmi_unblocking=True) == Exit(
                SPP_EVENT, Q_NMI, G + 0x700, GLA
            ), bit
        rig.put(s[level], good)
        assert isinstance(rig.run(cpu, G + 0x700, 2, WRITE), tuple)

    @pytest.mark.parametrize("maxphyaddr", [39, 46])
    @pytest.mark.parametrize("level", SPPT_NONLEAF)
    def test_bit_below_maxphyaddr_is_address(self, level, maxphyaddr):
        rig = Rig(maxphyaddr)
        _, s = spp_page(rig)
        # bit N-1 moves the pointer to a never-written (all-zero) frame: no misconfiguration
        rig.put(s[level], rig.get(s[level]) | (1 << (maxphyaddr - 1)))
        got = rig.run(rig.cpu(), G, 2, WRITE)
        if level == "L2E":  # the L1E read there is 0: a valid vector that denies
            assert got == Exit(EPT_VIOLATION, Q_WRITE_DENIED_R, G, None)
        else:  # the next level's entry is 0: not present
            assert got == Exit(SPP_EVENT, Q_SPP_MISS, G, None)

    @pytest.mark.parametrize("level", SPPT_NONLEAF)
    def test_misconfiguration_level_reported(self, rig, level):
        _, s = spp_page(rig)
        rig.put(s[level], rig.get(s[level]) | 2)
        exc = pytest.raises(SppEvent, rig.cpu().translate, G, 1, WRITE).value
        assert exc.is_misconfig and not exc.is_miss and exc.level == level


# =====================================================================================
class TestL1eHasNoPresentBit:
    """spec §3: an L1E is the SPP vector and has no present bit.  An all-zero L1E is a
    valid vector denying every sub-page (EPT violation) and never causes an SPP miss;
    bit 0 is sub-page 0's write permission."""

    @pytest.mark.parametrize("offset", [0, 0x7F, 0x80, 0xF7F, 0xF80, 0xFFF])
    def test_zero_vector_denies_every_subpage(self, rig, offset):
        spp_page(rig, vec=0)
        assert rig.run(rig.cpu(), G + offset, 1, WRITE, gla=GLA) == Exit(EPT_VIOLATION, Q_WRITE_DENIED_R, G + offset, GLA)

    def test_bit0_is_subpage0_permission_not_present(self, rig):
        m, _ = spp_page(rig, vec=1)
        cpu = rig.cpu()
        assert rig.run(cpu, G, 1, WRITE) == ((m.hpa, 1),)
        assert rig.run(cpu, G + 0x80, 1, WRITE).reason == EPT_VIOLATION

    def test_vector_without_bit0_is_used(self, rig):
        m, _ = spp_page(rig, vec=1 << 62)  # only sub-page 31
        cpu = rig.cpu()
        assert rig.run(cpu, G + 0xF80, 0x80, WRITE) == ((m.hpa + 0xF80, 0x80),)
        assert rig.run(cpu, G, 1, WRITE) == Exit(EPT_VIOLATION, Q_WRITE_DENIED_R, G, None)


# =====================================================================================
class TestL1eOddBitsReserved:
    """spec §3, §4 outcome 2: in the L1E, bit 2i is sub-page i's write permission and
    bit 2i+1 is reserved; any odd bit set is an SPP misconfiguration (exit 66,
    qualification bit 11 = 0) whichever sub-page is written."""

    @pytest.mark.parametrize("i", [0, 1, 15, 30, 31])
    def test_odd_bit_is_misconfiguration(self, rig, i):
        spp_page(rig, vec=ALL_WRITABLE | (1 << (2 * i + 1)))
        cpu = rig.cpu()
        for off in (0, 128 * i, 0xFFF):
            assert rig.run(cpu, G + off, 1, WRITE, gla=GLA) == Exit(SPP_EVENT, 0, G + off, GLA)
            assert rig.run(cpu, G + off, 1, WRITE, nmi_unblocking=True) == Exit(SPP_EVENT, Q_NMI, G + off, None)

    @pytest.mark.parametrize("i", [0, 1, 15, 30, 31])
    def test_even_bit_is_permission(self, rig, i):
        m, _ = spp_page(rig, vec=1 << (2 * i))
        cpu = rig.cpu()
        assert rig.run(cpu, G + 128 * i, 128, WRITE) == ((m.hpa + 128 * i, 128),)
        for j in (i - 1, i + 1):
            if 0 <= j < 32:
                assert rig.run(cpu, G + 128 * j, 1, WRITE) == Exit(EPT_VIOLATION, Q_WRITE_DENIED_R, G + 128 * j, None)

    def test_odd_bit_misconfiguration_not_a_miss(self, rig):
        spp_page(rig, vec=1 << 63)
        exc = pytest.raises(SppEvent, rig.cpu().translate, G, 1, WRITE).value
        assert exc.is_misconfig and exc.level == "L1E" and exc.qualification & Q_SPP_MISS == 0


# =====================================================================================
class TestSubPageIndexing:
    """spec §3: the sub-page of a write is GPA[11:7]; bytes [128i, 128i+127] use bit 2i
    of the L1E.  The SPPT is indexed like 4-level EPT: L4 by GPA[47:39], L3 by [38:30],
    L2 by [29:21], L1 by [20:12]; one vector per 4-KiB page."""

    @pytest.mark.parametrize(
        "allowed, offset, ok",
        [
            (0, 0, True), (0, 127, True), (0, 128, False),
            (1, 127, False), (1, 128, True), (1, 255, True), (1, 256, False),
            (30, 0xF7F, True), (30, 0xF80, False),
            (31, 0xF7F, False), (31, 0xF80, True), (31, 0xFFF, True),
        ],
    )
    def test_edges(self, rig, allowed, offset, ok):
        m, _ = spp_page(rig, vec=vector(allowed))
        got = rig.run(rig.cpu(), G + offset, 1, WRITE)
        assert got == (((m.hpa + offset, 1),) if ok else Exit(EPT_VIOLATION, Q_WRITE_DENIED_R, G + offset, None))

    def test_every_subpage(self, rig):
        m, s = spp_page(rig, vec=0)
        cpu = rig.cpu()
        for i in range(32):
            rig.put(s["L1E"], vector(i))
            for off in range(0, 4096, 64):
                got = rig.run(cpu, G + off, 1, WRITE)
                if off // 128 == i:
                    assert got == ((m.hpa + off, 1),), (i, off)
                else:
                    assert got == Exit(EPT_VIOLATION, Q_WRITE_DENIED_R, G + off, None), (i, off)

    @pytest.mark.parametrize("level", ["L4E", "L3E", "L2E", "L1E"])
    def test_index_bits_of_each_level(self, rig, level):
        g2 = G ^ (1 << SPPT_SHIFT[level])  # differs from G only in that level's index
        m1, _ = spp_page(rig, G, vec=vector(3))
        m2, _ = spp_page(rig, g2, vec=vector(5))
        cpu = rig.cpu()
        assert rig.run(cpu, G + 3 * 128, 4, WRITE) == ((m1.hpa + 3 * 128, 4),)
        assert rig.run(cpu, G + 5 * 128, 4, WRITE).reason == EPT_VIOLATION
        assert rig.run(cpu, g2 + 5 * 128, 4, WRITE) == ((m2.hpa + 5 * 128, 4),)
        assert rig.run(cpu, g2 + 3 * 128, 4, WRITE).reason == EPT_VIOLATION

    def test_neighbour_pages_vectors_not_used(self, rig):
        spp_page(rig, vec=0)
        l1_table = rig.spp(G, 0)["L1E"] & ~0xFFF
        idx = (G >> 12) & 0x1FF
        rig.put(l1_table + 8 * (idx - 1), ALL_WRITABLE)
        rig.put(l1_table + 8 * (idx + 1), ALL_WRITABLE)
        cpu = rig.cpu()
        for off in (0, 0x800, 0xFFF):
            assert rig.run(cpu, G + off, 1, WRITE).reason == EPT_VIOLATION

    def test_sppt_addresses_are_host_physical(self, rig):
        """The SPPT path is found through host-physical pointers, wherever the frames are."""
        m = rig.map(G, flags=SPP_LEAF)
        l3, l2, l1 = 0x7_0000_0000, 0x3_1234_5000, 0x1000
        rig.sppt_frames |= {l3, l2, l1}
        rig.put(rig.sppt_root + 8 * ((G >> 39) & 0x1FF), l3 | 1)
        rig.put(l3 + 8 * ((G >> 30) & 0x1FF), l2 | 1)
        rig.put(l2 + 8 * ((G >> 21) & 0x1FF), l1 | 1)
        rig.put(l1 + 8 * ((G >> 12) & 0x1FF), vector(9))
        cpu = rig.cpu()
        assert rig.run(cpu, G + 9 * 128, 8, WRITE) == ((m.hpa + 9 * 128, 8),)
        assert rig.run(cpu, G + 8 * 128, 8, WRITE).reason == EPT_VIOLATION


# =====================================================================================
class TestSppDenialIsOrdinaryEptViolation:
    """spec §4 outcome 3: a zero vector bit gives exit 48 whose qualification is built
    exactly like any EPT write denial — bit 1, bits 3/4/5 = AND of R/W/X over the entries,
    bits 7 and 8, bit 12 on NMI unblocking — with no SPP-specific bit (bit 11 clear)."""

    @pytest.mark.parametrize(
        "leaf, qual",
        [
            (R | WB | SPP, Q_WRITE | Q_R | Q_GLA_VALID | Q_LINEAR),
            (R | X | WB | SPP, Q_WRITE | Q_R | Q_X | Q_GLA_VALID | Q_LINEAR),
        ],
    )
    def test_exact_qualification(self, rig, leaf, qual):
        spp_page(rig, vec=vector(0), flags=leaf)
        cpu = rig.cpu()
        assert rig.run(cpu, G + 0x123, 4, WRITE, gla=GLA + 0x123) == Exit(EPT_VIOLATION, qual, G + 0x123, GLA + 0x123)
        assert rig.run(cpu, G + 0x123, 4, WRITE, gla=GLA, nmi_unblocking=True) == Exit(
            EPT_VIOLATION, qual | Q_NMI, G + 0x123, GLA
        )
        assert qual & (1 << 11) == 0 and qual & Q_W == 0

    def test_same_as_non_spp_write_denial(self, rig):
        g2 = G + 0x1000
        spp_page(rig, vec=0)
        rig.map(g2, flags=R | WB)  # same permissions, no bit 61
        cpu = rig.cpu()
        a = rig.run(cpu, G + 0x44, 4, WRITE, gla=GLA)
        b = rig.run(cpu, g2 + 0x44, 4, WRITE, gla=GLA)
        assert a.reason == b.reason == EPT_VIOLATION and a.qualification == b.qualification
        assert (a.gpa, b.gpa) == (G + 0x44, g2 + 0x44)

    def test_exit_class(self, rig):
        spp_page(rig, vec=0)
        exc = pytest.raises(EptViolation, rig.cpu().translate, G, 1, WRITE).value
        assert exc.reason == 48 and exc.is_write and not isinstance(exc, SppEvent)


# =====================================================================================
class TestSppEventExitFields:
    """spec §4 "Other exit-info fields": for exit 66 the guest-physical-address field is
    the GPA of the write including the page offset, and the guest-linear-address field is
    its linear address."""

    @pytest.mark.parametrize("offset", [0, 0x7F, 0x80, 0xABC, 0xFFF])
    def test_miss_fields(self, rig, offset):
        rig.map(G, flags=SPP_LEAF)
        assert rig.run(rig.cpu(), G + offset, 1, WRITE, gla=GLA + offset) == Exit(
            SPP_EVENT, Q_SPP_MISS, G + offset, GLA + offset
        )

    @pytest.mark.parametrize("offset", [0, 0xABC, 0xFFF])
    def test_misconfig_fields(self, rig, offset):
        spp_page(rig, vec=2)
        assert rig.run(rig.cpu(), G + offset, 1, WRITE, gla=GLA + offset) == Exit(SPP_EVENT, 0, G + offset, GLA + offset)

    def test_gla_none_when_not_known(self, rig):
        rig.map(G, flags=SPP_LEAF)
        assert rig.run(rig.cpu(), G + 0x10, 1, WRITE).gla is None


# =====================================================================================
class TestWritesSpanningSubPages:
    """spec §5 "Crossing a 128-byte boundary", §10.1 (UNCONFIRMED; a named option):
    by default a write is permitted only if every sub-page it touches is writable;
    ``spp_write_check="first-byte"`` (Bochs) checks only the sub-page of the first byte."""

    @pytest.mark.parametrize(
        "vec, offset, size, ok",
        [
            (vector(0), 124, 4, True),  # bytes 124..127
            (vector(0), 125, 4, False),  # bytes 125..128
            (vector(0, 1), 125, 4, True),
            (vector(1), 127, 2, False),
            (vector(30), 0xF7F, 2, False),
            (vector(30, 31), 0xF7F, 2, True),
            (vector(*range(32)), 0, 4096, True),
            (vector(*(set(range(32)) - {17})), 0, 4096, False),
            (vector(5, 6, 7), 5 * 128, 3 * 128, True),
            (vector(5, 7), 5 * 128, 3 * 128, False),
        ],
    )
    def test_every_touched_subpage_by_default(self, rig, vec, offset, size, ok):
        m, _ = spp_page(rig, vec=vec)
        cpu = rig.cpu()
        assert cpu.spp_write_check == "all-touched"
        got = rig.run(cpu, G + offset, size, WRITE, gla=GLA)
        assert got == (((m.hpa + offset, size),) if ok else Exit(EPT_VIOLATION, Q_WRITE_DENIED_R, G + offset, GLA))

    @pytest.mark.parametrize(
        "vec, offset, size, ok",
        [
            (vector(0), 125, 4, True),  # first byte in sub-page 0
            (vector(1), 127, 2, False),  # first byte in sub-page 0, which is denied
            (vector(1), 128, 2, True),
            (vector(30), 0xF7F, 2, True),
            (vector(31), 0xF7F, 2, False),
            (vector(0), 0, 4096, True),
        ],
    )
    def test_first_byte_mode(self, rig, vec, offset, size, ok):
        m, _ = spp_page(rig, vec=vec)
        cpu = rig.cpu(spp_write_check="first-byte")
        got = rig.run(cpu, G + offset, size, WRITE, gla=GLA)
        assert got == (((m.hpa + offset, size),) if ok else Exit(EPT_VIOLATION, Q_WRITE_DENIED_R, G + offset, GLA))


# =====================================================================================
class TestPageCrossingWrites:
    """spec §5 "Crossing a 4-KB page boundary": each page is translated separately, in
    address order, with its own EPT + SPP decision; the access fails at the first page
    that fails.  On the second page the sub-page at offset 0 is checked and the exit's
    GLA is the write's GLA plus the bytes in the first page."""

    G2 = G + 0x1000

    def test_both_pages_permitted(self, rig):
        m1, _ = spp_page(rig, G, vec=vector(31))
        m2, _ = spp_page(rig, self.G2, vec=vector(0))
        assert rig.run(rig.cpu(), G + 0xFFA, 16, WRITE, gla=GLA) == ((m1.hpa + 0xFFA, 6), (m2.hpa, 10))

    def test_second_page_denied(self, rig):
        spp_page(rig, G, vec=vector(31))
        spp_page(rig, self.G2, vec=vector(1))  # sub-page 0 of page 2 denied
        assert rig.run(rig.cpu(), G + 0xFFA, 16, WRITE, gla=GLA) == Exit(EPT_VIOLATION, Q_WRITE_DENIED_R, self.G2, GLA + 6)

    def test_both_pages_miss_first_page_reported(self, rig):
        rig.map(G, flags=SPP_LEAF)
        rig.map(self.G2, flags=SPP_LEAF)  # no SPPT at all: both pages would miss
        assert rig.run(rig.cpu(), G + 0xFFC, 8, WRITE, gla=GLA) == Exit(SPP_EVENT, Q_SPP_MISS, G + 0xFFC, GLA)

    def test_first_page_decides_first(self, rig):
        spp_page(rig, G, vec=vector(30))  # sub-page 31 of page 1 denied; page 2 not even mapped
        assert rig.run(rig.cpu(), G + 0xFFC, 8, WRITE, gla=GLA) == Exit(EPT_VIOLATION, Q_WRITE_DENIED_R, G + 0xFFC, GLA)

    def test_second_page_checked_after_first_succeeds(self, rig):
        spp_page(rig, G, vec=vector(31))  # page 2 not mapped in EPT
        assert rig.run(rig.cpu(), G + 0xFFC, 8, WRITE, gla=GLA) == Exit(
            EPT_VIOLATION, Q_WRITE | Q_GLA_VALID | Q_LINEAR, self.G2, GLA + 4
        )

    def test_second_page_spp_miss_fields(self, rig):
        g3 = ((G >> 21) + 1) << 21  # first page of the next 2-MiB region: its L2E is not present
        m1, _ = spp_page(rig, g3 - 0x1000, vec=vector(31))
        rig.map(g3, flags=SPP_LEAF)
        assert rig.run(rig.cpu(), g3 - 4, 8, WRITE, gla=GLA) == Exit(SPP_EVENT, Q_SPP_MISS, g3, GLA + 4)

    def test_first_byte_mode_checks_offset_0_of_second_page(self, rig):
        m1, _ = spp_page(rig, G, vec=vector(30))  # sub-page 31 denied, but not a first byte
        m2, s2 = spp_page(rig, self.G2, vec=vector(0))  # sub-page 1 denied, but not a first byte
        cpu = rig.cpu(spp_write_check="first-byte")
        assert rig.run(cpu, G + 0xF00, 0x200, WRITE) == ((m1.hpa + 0xF00, 0x100), (m2.hpa, 0x100))
        assert rig.run(rig.cpu(), G + 0xF00, 0x200, WRITE).reason == EPT_VIOLATION  # default mode
        rig.put(s2["L1E"], vector(1))
        assert rig.run(cpu, G + 0xF00, 0x200, WRITE) == Exit(EPT_VIOLATION, Q_WRITE_DENIED_R, self.G2, None)


# =====================================================================================
class TestSppPermittedWriteSetsAccessedDirty:
    """spec §2 "EPT accessed/dirty": a write that SPP permits is a successful write, so
    with EPTP bit 6 = 1 the accessed flag is set in every EPT entry used and the dirty
    flag in the leaf.  A write SPP denies (or an SPP event) sets nothing."""

    def test_permitted_write_sets_a_and_d(self, rig):
        m, _ = spp_page(rig, vec=vector(4))
        before = {n: rig.get(h) for n, h in m.entry.items()}
        assert rig.run(rig.cpu(ad=True), G + 4 * 128, 8, WRITE) == ((m.hpa + 4 * 128, 8),)
        for n, h in m.entry.items():
            want = before[n] | ACCESSED | (DIRTY if n == "PTE" else 0)
            assert rig.get(h) == want, n

    @pytest.mark.parametrize("vec", [vector(3), ALL_WRITABLE | 2])
    def test_denied_write_sets_nothing(self, rig, vec):
        m, _ = spp_page(rig, vec=vec)
        before = {n: rig.get(h) for n, h in m.entry.items()}
        assert rig.run(rig.cpu(ad=True), G + 4 * 128, 8, WRITE).reason in (EPT_VIOLATION, SPP_EVENT)
        assert {n: rig.get(h) for n, h in m.entry.items()} == before

    def test_without_ad_nothing_set(self, rig):
        m, _ = spp_page(rig)
        before = {n: rig.get(h) for n, h in m.entry.items()}
        assert isinstance(rig.run(rig.cpu(ad=False), G, 8, WRITE), tuple)
        assert {n: rig.get(h) for n, h in m.entry.items()} == before


# =====================================================================================
class TestSppAfterEptWalk:
    """spec §7: the EPT walk comes first — an EPT misconfiguration (49) or a not-present
    EPT entry (48) ends it and SPP is never consulted; only a completed walk whose
    accumulated permissions deny the write reaches the SPPT."""

    def test_misconfigured_spp_leaf_is_49(self, rig):
        rig.map(G, flags=R | (7 << 3) | SPP)  # memory type 7: invalid
        assert rig.run(rig.cpu(), G, 4, WRITE, gla=GLA) == Exit(EPT_MISCONFIG, 0, G, None)
        assert not rig.sppt_was_read

    def test_reserved_bit_in_spp_leaf_is_49(self, rig):
        rig.map(G, flags=R | WB | SPP | (1 << 47))
        assert rig.run(rig.cpu(), G, 4, WRITE) == Exit(EPT_MISCONFIG, 0, G, None)
        assert not rig.sppt_was_read

    def test_not_present_pte_is_48(self, rig):
        m = rig.map(G, flags=SPP_LEAF)
        rig.spp(G, ALL_WRITABLE)
        rig.put(m.entry["PTE"], SPP | WB | m.hpa)  # bits 2:0 = 0
        assert rig.run(rig.cpu(), G, 4, WRITE, gla=GLA) == Exit(EPT_VIOLATION, Q_WRITE | Q_GLA_VALID | Q_LINEAR, G, GLA)
        assert not rig.sppt_was_read

    @pytest.mark.parametrize("level", ["PML4E", "PDPTE", "PDE"])
    def test_misconfigured_upper_level_is_49(self, rig, level):
        m = rig.map(G, flags=SPP_LEAF)
        rig.put(m.entry[level], rig.get(m.entry[level]) | (1 << 3))
        assert rig.run(rig.cpu(), G, 4, WRITE, gla=GLA) == Exit(EPT_MISCONFIG, 0, G, None)
        assert not rig.sppt_was_read


# =====================================================================================
class TestSppAndTranslationCache:
    """spec §6 (model: docs/modelling.md "Caching"): a write that SPP permits is never
    cached as a writable page — every eligible write reads the SPPT again — so a changed
    vector (or a cleared L2E) takes effect on the next write even without INVEPT.
    Nothing is cached from a write that SPP denies or from an SPP event."""

    def test_vector_change_denies_next_write_without_invept(self, rig):
        m, s = spp_page(rig, vec=ALL_WRITABLE)
        cpu = rig.cpu(cache=True)
        assert rig.run(cpu, G + 0x10, 8, WRITE) == ((m.hpa + 0x10, 8),)
        assert rig.run(cpu, G + 0x10, 8, WRITE) == ((m.hpa + 0x10, 8),)
        rig.put(s["L1E"], vector(5))
        assert rig.run(cpu, G + 0x10, 8, WRITE, gla=GLA) == Exit(EPT_VIOLATION, Q_WRITE_DENIED_R, G + 0x10, GLA)
        assert rig.sppt_was_read
        rig.put(s["L1E"], vector(0))
        assert rig.run(cpu, G + 0x10, 8, WRITE) == ((m.hpa + 0x10, 8),)

    def test_other_subpage_after_permitted_write(self, rig):
        m, _ = spp_page(rig, vec=vector(0))
        cpu = rig.cpu(cache=True)
        assert rig.run(cpu, G, 8, WRITE) == ((m.hpa, 8),)
        assert rig.run(cpu, G + 0x80, 8, WRITE).reason == EPT_VIOLATION

    def test_cleared_l2e_misses_after_permitted_write(self, rig):
        m, s = spp_page(rig, vec=ALL_WRITABLE)
        cpu = rig.cpu(cache=True, ad=True)
        assert rig.run(cpu, G, 8, WRITE) == ((m.hpa, 8),)
        rig.put(s["L2E"], rig.get(s["L2E"]) & ~1)
        assert rig.run(cpu, G, 8, WRITE, gla=GLA) == Exit(SPP_EVENT, Q_SPP_MISS, G, GLA)

    def test_cached_read_then_write_consults_sppt(self, rig):
        m, s = spp_page(rig, vec=0)
        cpu = rig.cpu(cache=True)
        assert rig.run(cpu, G, 8, READ) == ((m.hpa, 8),)
        assert rig.run(cpu, G, 8, WRITE).reason == EPT_VIOLATION
        rig.put(s["L1E"], vector(0))
        assert rig.run(cpu, G, 8, WRITE) == ((m.hpa, 8),)

    def test_nothing_cached_from_spp_denied_write(self, rig):
        m, _ = spp_page(rig, vec=0)
        cpu = rig.cpu(cache=True)
        assert rig.run(cpu, G, 8, WRITE).reason == EPT_VIOLATION
        other = rig.mem.alloc_frame()
        rig.put(m.entry["PTE"], other | SPP_LEAF)  # remap without INVEPT
        assert rig.run(cpu, G, 8, READ) == ((other, 8),)

    def test_nothing_cached_from_spp_event(self, rig):
        m = rig.map(G, flags=SPP_LEAF)
        cpu = rig.cpu(cache=True)
        assert rig.run(cpu, G, 8, WRITE).reason == SPP_EVENT
        other = rig.mem.alloc_frame()
        rig.put(m.entry["PTE"], other | SPP_LEAF)
        assert rig.run(cpu, G, 8, READ) == ((other, 8),)

    @pytest.mark.parametrize("cache_spp", [False, True])
    @pytest.mark.parametrize("sppt", ["denies", "misses"])
    def test_stale_spp_leaf_never_faults_by_itself(self, rig, cache_spp, sppt):
        """docs/modelling.md "Caching": an entry that does not permit an access is
        dropped and the tables walked again, so a less permissive stale entry never
        causes a fault by itself — an SPP leaf's included.  A read caches the page as
        an SPP leaf with W = 0; the leaf is then made writable without INVEPT; a write
        that the SPPT would deny (vector 0) or miss on is allowed, as with no cache."""
        if sppt == "denies":
            m, _ = spp_page(rig, vec=0)
        else:
            m = rig.map(G, flags=SPP_LEAF)  # no SPPT entry for the page: a miss
        cpu = rig.cpu(cache=True, cache_spp=cache_spp)
        assert rig.run(cpu, G, 8, READ) == ((m.hpa, 8),)
        rig.put(m.entry["PTE"], rig.get(m.entry["PTE"]) | W)  # more permissive: no INVEPT needed
        assert rig.run(cpu, G + 8, 8, WRITE, gla=GLA) == ((m.hpa + 8, 8),)


# =====================================================================================
class TestSppVectorCachedWithMapping:
    """spec §6 (model: docs/modelling.md "The translation cache", option ``cache_spp``):
    with ``cache_spp=True`` the vector read by a walk that permitted a write is kept with
    the EPTP-tagged mapping (the patent's sub-page control storage).  A later write that
    the cached vector permits reads no SPPT; a write it does not permit drops the entry
    and walks again (a stale vector denies nothing by itself); INVEPT drops the vector
    with the mapping; nothing is cached from a denied write, a miss or a
    misconfiguration; the mapping still never becomes writable."""

    def test_needs_the_translation_cache(self, rig):
        with pytest.raises(ValueError, match="cache_spp=True needs cache=True"):
            rig.cpu(cache=False, cache_spp=True)

    def test_permitted_write_then_no_sppt_read(self, rig):
        m, _ = spp_page(rig, vec=vector(0, 1))
        cpu = rig.cpu(cache=True, cache_spp=True)
        assert rig.run(cpu, G + 0x10, 8, WRITE) == ((m.hpa + 0x10, 8),)
        assert rig.sppt_was_read
        assert rig.run(cpu, G + 0x80, 8, WRITE) == ((m.hpa + 0x80, 8),)  # sub-page 1, same vector
        assert not rig.sppt_was_read
        # the neighbour rule: without the option every eligible write reads the SPPT
        plain = rig.cpu(cache=True)
        assert rig.run(plain, G, 8, WRITE) == ((m.hpa, 8),)
        assert rig.run(plain, G, 8, WRITE) == ((m.hpa, 8),) and rig.sppt_was_read

    def test_stale_vector_permits_until_invept(self, rig):
        m, s = spp_page(rig, vec=ALL_WRITABLE)
        cpu = rig.cpu(cache=True, cache_spp=True)
        assert rig.run(cpu, G, 8, WRITE) == ((m.hpa, 8),)
        rig.put(s["L1E"], 0)  # deny everything, no INVEPT
        assert rig.run(cpu, G, 8, WRITE) == ((m.hpa, 8),)
        cpu.invept("single-context", rig.eptp())
        assert rig.run(cpu, G, 8, WRITE, gla=GLA) == Exit(EPT_VIOLATION, Q_WRITE_DENIED_R, G, GLA)

    def test_all_context_invept_drops_the_vector(self, rig):
        m, s = spp_page(rig, vec=ALL_WRITABLE)
        cpu = rig.cpu(cache=True, cache_spp=True)
        assert rig.run(cpu, G, 8, WRITE) == ((m.hpa, 8),)
        rig.put(s["L2E"], rig.get(s["L2E"]) & ~1)
        cpu.invept("all-context")
        assert rig.run(cpu, G, 8, WRITE, gla=GLA) == Exit(SPP_EVENT, Q_SPP_MISS, G, GLA)

    def test_write_the_cached_vector_denies_walks_again(self, rig):
        m, s = spp_page(rig, vec=vector(0))
        cpu = rig.cpu(cache=True, cache_spp=True)
        assert rig.run(cpu, G, 8, WRITE) == ((m.hpa, 8),)
        rig.put(s["L1E"], vector(0, 3))  # more permissive, no INVEPT
        assert rig.run(cpu, G + 3 * 128, 8, WRITE) == ((m.hpa + 3 * 128, 8),)
        assert rig.sppt_was_read
        rig.put(s["L1E"], vector(0))
        assert rig.run(cpu, G + 5 * 128, 8, WRITE, gla=GLA) == Exit(
            EPT_VIOLATION, Q_WRITE_DENIED_R, G + 5 * 128, GLA)

    def test_denied_write_drops_the_mapping(self, rig):
        m, s = spp_page(rig, vec=vector(0))
        cpu = rig.cpu(cache=True, cache_spp=True)
        assert rig.run(cpu, G, 8, WRITE) == ((m.hpa, 8),)
        assert rig.run(cpu, G + 128, 8, WRITE).reason == EPT_VIOLATION
        rig.put(s["L1E"], 0)  # no INVEPT: the violation already dropped the cached vector
        assert rig.run(cpu, G, 8, WRITE).reason == EPT_VIOLATION

    @pytest.mark.parametrize("offset, size, ok", [(0x7C, 8, True), (0xFC, 8, False), (0xF8, 8, True)])
    def test_write_spanning_subpages_checks_every_touched_one(self, rig, offset, size, ok):
        m, _ = spp_page(rig, vec=vector(0, 1))
        cpu = rig.cpu(cache=True, cache_spp=True)
        assert rig.run(cpu, G, 8, WRITE) == ((m.hpa, 8),)
        got = rig.run(cpu, G + offset, size, WRITE)
        assert (got == ((m.hpa + offset, size),)) is ok, got

    def test_first_byte_mode_with_cached_vector(self, rig):
        m, _ = spp_page(rig, vec=vector(0))
        cpu = rig.cpu(cache=True, cache_spp=True, spp_write_check="first-byte")
        assert rig.run(cpu, G, 8, WRITE) == ((m.hpa, 8),)
        assert rig.run(cpu, G + 0x7C, 8, WRITE) == ((m.hpa + 0x7C, 8),)
        assert not rig.sppt_was_read
        assert rig.run(cpu, G + 0x80, 8, WRITE).reason == EPT_VIOLATION

    def test_cached_vector_ignored_when_spp_is_turned_off(self, rig):
        m, _ = spp_page(rig, vec=ALL_WRITABLE)
        cpu = rig.cpu(cache=True, cache_spp=True)
        assert rig.run(cpu, G, 8, WRITE) == ((m.hpa, 8),)
        cpu.load_controls(secondary_controls=ENABLE_EPT)
        assert rig.run(cpu, G, 8, WRITE).reason == EPT_VIOLATION

    def test_read_then_write_caches_the_vector(self, rig):
        m, _ = spp_page(rig, vec=vector(0))
        cpu = rig.cpu(cache=True, cache_spp=True)
        assert rig.run(cpu, G, 8, READ) == ((m.hpa, 8),)
        assert rig.run(cpu, G, 8, WRITE) == ((m.hpa, 8),) and rig.sppt_was_read
        assert rig.run(cpu, G + 8, 8, WRITE) == ((m.hpa + 8, 8),) and not rig.sppt_was_read

    def test_nothing_cached_from_a_miss_or_misconfiguration(self, rig):
        m, s = spp_page(rig, vec=vector(0) | (1 << 1))  # odd bit: misconfiguration
        cpu = rig.cpu(cache=True, cache_spp=True)
        assert rig.run(cpu, G, 8, WRITE).reason == SPP_EVENT
        assert rig.run(cpu, G, 8, WRITE).reason == SPP_EVENT and rig.sppt_was_read
        rig.put(s["L2E"], rig.get(s["L2E"]) & ~1)
        assert rig.run(cpu, G, 8, WRITE, gla=GLA) == Exit(SPP_EVENT, Q_SPP_MISS, G, GLA)

    def test_the_mapping_never_becomes_writable(self, rig):
        m, _ = spp_page(rig, vec=ALL_WRITABLE)
        cpu = rig.cpu(cache=True, cache_spp=True)
        assert rig.run(cpu, G, 8, WRITE) == ((m.hpa, 8),)
        (entry,) = cpu.cache.tags[rig.pml4].values()
        assert not entry[1] & 2 and entry[4] == ALL_WRITABLE
        assert rig.run(cpu, G, 8, WRITE, paging_structure=True).reason == EPT_VIOLATION
        assert rig.run(cpu, G, 8, WRITE, linear=False).reason == EPT_VIOLATION
