"""Conformance: the EPT walk under the SPP model, one test class per rule.

The SPP spec (docs/spp-rules.md) builds on the general SDM EPT rules
(§2 "EPT accessed/dirty", §4 qualification bits, §6 caching, §7 ordering): those are
the rules tested here.  Every entry under test is a raw ``write_u64`` (spp_rig.py).
"""

from __future__ import annotations

import pytest

from spp_rig import (
    ACCESSED,
    DIRTY,
    ENABLE_EPT,
    ENABLE_SPP,
    EPT_LEVELS,
    EPT_MISCONFIG,
    EPT_SHIFT,
    EPT_VIOLATION,
    EPTP_AD,
    EPTP_WB_4LEVEL,
    G,
    GLA,
    LARGE,
    LARGE_HPA,
    Q_FETCH,
    Q_GLA_VALID,
    Q_LINEAR,
    Q_NMI,
    Q_R,
    Q_READ,
    Q_W,
    Q_WRITE,
    Q_X,
    R,
    RWX,
    WB,
    W,
    X,
    Exit,
    Rig,
)
from sppkit.arch import Access, EptMisconfig, EptViolation, Processor, VmEntryFailure

WRITE, READ, EXECUTE = Access.WRITE, Access.READ, Access.EXECUTE
ACCESS_BIT = {READ: Q_READ, WRITE: Q_WRITE, EXECUTE: Q_FETCH}
LEAF_OFFSET_BITS = {"PTE": 12, "PDE": 21, "PDPTE": 30}


@pytest.fixture
def rig() -> Rig:
    return Rig()


def offset_in(leaf: str, gpa: int) -> int:
    return gpa & ((1 << LEAF_OFFSET_BITS[leaf]) - 1)


# =====================================================================================
class TestEptpVmEntryChecks:
    """SDM VM-entry checks on the EPTP (spec §1 lists the SPPTP ones; §10.3 for 5-level;
    with "enable EPT" = 1): memory type UC (0) or WB (6); page-walk length 4 (bits 5:3 =
    3; 5-level EPT is not modelled); bits 11:8 zero; no bit at or above MAXPHYADDR. A
    failure is VM-instruction error 7 and changes nothing. Bit 6 (A/D enable) and bit 7
    (supervisor shadow stack) are allowed."""

    def _cpu(self, rig, eptp, controls=ENABLE_EPT):
        return Processor(rig.mem, eptp, secondary_controls=controls)

    @pytest.mark.parametrize("memtype", range(8))
    def test_memory_type(self, rig, memtype):
        eptp = rig.pml4 | memtype | (3 << 3)
        if memtype in (0, 6):
            assert self._cpu(rig, eptp).eptp == eptp
        else:
            with pytest.raises(VmEntryFailure) as ei:
                self._cpu(rig, eptp)
            assert ei.value.error_number == 7

    @pytest.mark.parametrize("walk_bits", range(8))
    def test_walk_length(self, rig, walk_bits):
        eptp = rig.pml4 | 6 | (walk_bits << 3)
        if walk_bits == 3:
            assert self._cpu(rig, eptp).eptp == eptp
        else:
            with pytest.raises(VmEntryFailure):
                self._cpu(rig, eptp)

    @pytest.mark.parametrize("bit", [8, 9, 10, 11])
    def test_reserved_bits_11_8(self, rig, bit):
        with pytest.raises(VmEntryFailure):
            self._cpu(rig, rig.eptp() | (1 << bit))

    @pytest.mark.parametrize("bit", [6, 7])
    def test_ad_and_sss_bits_allowed(self, rig, bit):
        assert self._cpu(rig, rig.eptp() | (1 << bit)).eptp == rig.eptp() | (1 << bit)

    @pytest.mark.parametrize("maxphyaddr", [39, 46])
    def test_bits_at_or_above_maxphyaddr(self, maxphyaddr):
        rig = Rig(maxphyaddr)
        assert self._cpu(rig, (1 << (maxphyaddr - 1)) | EPTP_WB_4LEVEL).eptp >> (maxphyaddr - 1) == 1
        for bit in (maxphyaddr, 51, 63):
            with pytest.raises(VmEntryFailure):
                self._cpu(rig, rig.eptp() | (1 << bit))

    def test_not_checked_with_ept_off(self, rig):
        cpu = self._cpu(rig, 0xFFFF_FFFF_FFFF_FFFF, controls=0)
        assert not cpu.ept_enabled
        with pytest.raises(VmEntryFailure):
            cpu.load_controls(secondary_controls=ENABLE_EPT)
        assert cpu.secondary_controls == 0

    def test_failed_load_changes_nothing(self, rig):
        m = rig.map(G)
        cpu = rig.cpu(spp=False)
        with pytest.raises(VmEntryFailure):
            cpu.load_controls(eptp=rig.pml4 | 1 | (3 << 3))
        assert cpu.eptp == rig.eptp()
        assert rig.run(cpu, G, 8, READ) == ((m.hpa, 8),)


# =====================================================================================
class TestEptNotPresent:
    """SDM (spec §7 step 2, §4 bits 3-5): an EPT entry with bits 2:0 = 0 is not present and
    ends the walk with an EPT violation (48). Bits 5:3 of the qualification (AND of
    R/W/X over the entries used, including the not-present one) are 0. The present test
    comes before any other check: other bits of a not-present entry (even reserved ones)
    are not examined."""

    @pytest.mark.parametrize("level", EPT_LEVELS)
    @pytest.mark.parametrize("access", [READ, WRITE, EXECUTE])
    def test_not_present_each_level(self, rig, level, access):
        m = rig.map(G)
        rig.put(m.entry[level], 0)
        cpu = rig.cpu()
        assert rig.run(cpu, G + 0x5A0, 8, access, gla=GLA) == Exit(
            EPT_VIOLATION, ACCESS_BIT[access] | Q_GLA_VALID | Q_LINEAR, G + 0x5A0, GLA
        )
        exc = pytest.raises(EptViolation, cpu.translate, G, 1, access).value
        assert exc.level == level

    @pytest.mark.parametrize("level", EPT_LEVELS)
    def test_not_present_with_other_bits_set(self, rig, level):
        m = rig.map(G)
        old = rig.get(m.entry[level])
        rig.put(m.entry[level], (old & ~7) | 0xF8 | (1 << 50) | (0xFFF << 52))
        assert rig.run(rig.cpu(), G, 4, READ, gla=GLA) == Exit(EPT_VIOLATION, Q_READ | Q_GLA_VALID | Q_LINEAR, G, GLA)

    @pytest.mark.parametrize("level", EPT_LEVELS)
    def test_each_permission_bit_alone_makes_present(self, rig, level):
        m = rig.map(G)
        old = rig.get(m.entry[level])
        for perms in (R, X, R | X):  # W alone is present too, but misconfigured
            rig.put(m.entry[level], (old & ~7) | perms)
            got = rig.run(rig.cpu(), G, 4, READ if perms & R else EXECUTE)
            assert got == ((m.hpa, 4),), perms

    def test_nmi_and_non_linear(self, rig):
        m = rig.map(G)
        rig.put(m.entry["PTE"], 0)
        cpu = rig.cpu()
        assert rig.run(cpu, G, 4, WRITE, nmi_unblocking=True) == Exit(
            EPT_VIOLATION, Q_WRITE | Q_GLA_VALID | Q_LINEAR | Q_NMI, G, None
        )
        assert rig.run(cpu, G, 4, WRITE, linear=False) == Exit(EPT_VIOLATION, Q_WRITE, G, None)


# =====================================================================================
class TestEptReservedBits:
    """SDM (spec §7 step 2): a present EPT entry with a reserved bit set is an EPT
    misconfiguration (49), qualification 0, guest-linear-address field not valid.
    Reserved: PML4E bits 7:3; non-leaf PDPTE/PDE bits 6:3; 1-GiB leaf bits 29:12; 2-MiB
    leaf bits 20:12; bits 51:N (N = MAXPHYADDR) everywhere. Bits 11:8 and 63:52 are
    A/D/ignored, not reserved."""

    CASES = {
        # (level, leaf-level of the mapping): reserved low bits
        ("PML4E", "PTE"): list(range(3, 8)),
        ("PDPTE", "PTE"): list(range(3, 7)),
        ("PDE", "PTE"): list(range(3, 7)),
        ("PTE", "PTE"): [],
        ("PDPTE", "PDPTE"): list(range(12, 30)),
        ("PDE", "PDE"): list(range(12, 21)),
    }

    @pytest.mark.parametrize("maxphyaddr", [39, 46])
    @pytest.mark.parametrize("level, leaf", list(CASES))
    def test_reserved_bits(self, maxphyaddr, level, leaf):
        rig = Rig(maxphyaddr)
        m = rig.map(G, leaf=leaf)
        good = rig.get(m.entry[level])
        cpu = rig.cpu(spp=False)
        for bit in self.CASES[level, leaf] + list(range(maxphyaddr, 52)):
            rig.put(m.entry[level], good | (1 << bit))
            for access in (READ, WRITE):
                assert rig.run(cpu, G + 0x88, 8, access, gla=GLA) == Exit(EPT_MISCONFIG, 0, G + 0x88, None), bit
            exc = pytest.raises(EptMisconfig, cpu.translate, G, 1, READ).value
            assert exc.level == level and exc.entry == good | (1 << bit)
        rig.put(m.entry[level], good)
        assert rig.run(cpu, G + 0x88, 8, WRITE) == ((m.hpa + offset_in(leaf, G) + 0x88, 8),)

    @pytest.mark.parametrize("level, leaf", list(CASES))
    def test_ignored_and_flag_bits_are_not_reserved(self, rig, level, leaf):
        m = rig.map(G, leaf=leaf)
        good = rig.get(m.entry[level])
        cpu = rig.cpu(spp=False)  # with SPP off, bit 61 means nothing anywhere
        for bit in [8, 9, 10, 11] + list(range(52, 64)):
            rig.put(m.entry[level], good | (1 << bit))
            assert rig.run(cpu, G + 0x88, 8, WRITE) == ((m.hpa + offset_in(leaf, G) + 0x88, 8),), bit

    def test_pte_bit7_is_ignored(self, rig):
        m = rig.map(G)
        rig.put(m.entry["PTE"], rig.get(m.entry["PTE"]) | LARGE)
        assert rig.run(rig.cpu(), G + 0x10, 8, WRITE) == ((m.hpa + 0x10, 8),)

    @pytest.mark.parametrize("leaf, bit", [("PDPTE", 30), ("PDE", 21), ("PTE", 12)])
    def test_lowest_address_bit_of_a_leaf(self, rig, leaf, bit):
        m = rig.map(G, leaf=leaf)
        rig.put(m.entry[leaf], rig.get(m.entry[leaf]) | (1 << bit))
        off = offset_in(leaf, G)
        assert rig.run(rig.cpu(), G + 4, 4, READ) == (((m.hpa | (1 << bit)) + off + 4, 4),)

    @pytest.mark.parametrize("maxphyaddr", [39, 46])
    @pytest.mark.parametrize("level", ["PML4E", "PDPTE", "PDE"])
    def test_bit_below_maxphyaddr_is_table_address(self, maxphyaddr, level):
        rig = Rig(maxphyaddr)
        m = rig.map(G)
        rig.put(m.entry[level], rig.get(m.entry[level]) | (1 << (maxphyaddr - 1)))
        # the next table is a never-written frame: its entry is 0, not present
        assert rig.run(rig.cpu(), G, 4, READ) == Exit(EPT_VIOLATION, Q_READ | Q_GLA_VALID | Q_LINEAR, G, None)

    @pytest.mark.parametrize("maxphyaddr", [39, 46])
    def test_leaf_bit_below_maxphyaddr_is_address(self, maxphyaddr):
        rig = Rig(maxphyaddr)
        m = rig.map(G)
        rig.put(m.entry["PTE"], rig.get(m.entry["PTE"]) | (1 << (maxphyaddr - 1)))
        assert rig.run(rig.cpu(), G + 1, 1, READ) == ((m.hpa + (1 << (maxphyaddr - 1)) + 1, 1),)


# =====================================================================================
class TestWriteWithoutRead:
    """SDM (spec §7 step 2 "W-only misconfig"): a present EPT entry with bit 1 (write) set
    and bit 0 (read) clear is an EPT misconfiguration (49) at any level, whatever the
    access."""

    @pytest.mark.parametrize("level", EPT_LEVELS)
    @pytest.mark.parametrize("perms", [W, W | X])
    def test_w_without_r(self, rig, level, perms):
        m = rig.map(G)
        rig.put(m.entry[level], (rig.get(m.entry[level]) & ~7) | perms)
        for access in (READ, WRITE, EXECUTE):
            assert rig.run(rig.cpu(), G, 4, access, gla=GLA) == Exit(EPT_MISCONFIG, 0, G, None)

    @pytest.mark.parametrize("level", EPT_LEVELS)
    def test_neighbour_r_and_w_is_fine(self, rig, level):
        m = rig.map(G)
        rig.put(m.entry[level], (rig.get(m.entry[level]) & ~7) | R | W)
        assert rig.run(rig.cpu(), G, 4, WRITE) == ((m.hpa, 4),)


# =====================================================================================
class TestExecuteOnlyOption:
    """SDM (docs/modelling.md option; spec §5 clause 4 uses execute-only leaves): an
    execute-only entry (bits 2:0 = 100b) is a misconfiguration unless the processor
    supports execute-only translations (IA32_VMX_EPT_VPID_CAP bit 0); the model supports
    them by default (``execute_only=True``)."""

    @pytest.mark.parametrize("level", EPT_LEVELS)
    def test_supported(self, rig, level):
        m = rig.map(G)
        rig.put(m.entry[level], (rig.get(m.entry[level]) & ~7) | X)
        cpu = rig.cpu()
        assert rig.run(cpu, G, 4, EXECUTE) == ((m.hpa, 4),)
        assert rig.run(cpu, G, 4, READ, gla=GLA) == Exit(EPT_VIOLATION, Q_READ | Q_X | Q_GLA_VALID | Q_LINEAR, G, GLA)

    @pytest.mark.parametrize("level", EPT_LEVELS)
    def test_not_supported(self, rig, level):
        m = rig.map(G)
        rig.put(m.entry[level], (rig.get(m.entry[level]) & ~7) | X)
        cpu = rig.cpu(execute_only=False)
        assert rig.run(cpu, G, 4, EXECUTE) == Exit(EPT_MISCONFIG, 0, G, None)
        rig.put(m.entry[level], (rig.get(m.entry[level]) & ~7) | R | X)
        assert rig.run(cpu, G, 4, EXECUTE) == ((m.hpa, 4),)


# =====================================================================================
class TestLeafMemoryType:
    """SDM (spec §7 step 2 "memory-type misconfig"): the memory type (bits 5:3) of a leaf
    must be UC 0, WC 1, WT 4, WP 5 or WB 6; 2, 3 and 7 are EPT misconfigurations. A non-
    leaf has no memory type: its bits 5:3 are reserved (PML4E 7:3, PDPTE/PDE 6:3), so
    any value there is a misconfiguration."""

    @pytest.mark.parametrize("leaf", ["PTE", "PDE", "PDPTE"])
    @pytest.mark.parametrize("memtype", range(8))
    def test_leaf_memory_type(self, rig, leaf, memtype):
        m = rig.map(G, leaf=leaf, flags=RWX | (memtype << 3))
        got = rig.run(rig.cpu(), G + 0x40, 4, READ, gla=GLA)
        if memtype in (2, 3, 7):
            assert got == Exit(EPT_MISCONFIG, 0, G + 0x40, None)
        else:
            assert got == ((m.hpa + offset_in(leaf, G) + 0x40, 4),)

    @pytest.mark.parametrize("level", ["PML4E", "PDPTE", "PDE"])
    @pytest.mark.parametrize("memtype", [1, 2, 6, 7])
    def test_non_leaf_bits_5_3_are_reserved(self, rig, level, memtype):
        m = rig.map(G)
        rig.put(m.entry[level], rig.get(m.entry[level]) | (memtype << 3))
        exc = pytest.raises(EptMisconfig, rig.cpu().translate, G, 4, READ).value
        assert (exc.qualification, exc.gla, exc.level) == (0, None, level)
        assert "memory type" not in exc.detail  # reserved bits, not a memory-type check


# =====================================================================================
class TestLargePageTranslation:
    """SDM (spec §2 "2-MByte and 1-GByte leaves"): bit 7 of a PDPTE / PDE makes it a 1-GiB
    / 2-MiB leaf; the HPA is the leaf's frame (bits N-1:30 / N-1:21) plus GPA bits 29:0
    / 20:0."""

    @pytest.mark.parametrize("leaf", ["PDPTE", "PDE"])
    @pytest.mark.parametrize("offset", [0, 0xFF8, 0x1000, 0x1F_FFF8])
    def test_offset_within_large_page(self, rig, leaf, offset):
        base = G & ~((1 << LEAF_OFFSET_BITS[leaf]) - 1)
        m = rig.map(base, leaf=leaf)
        assert rig.run(rig.cpu(), base + offset, 8, READ) == ((m.hpa + offset, 8),)

    def test_two_pages_of_one_large_leaf(self, rig):
        base = G & ~((1 << 21) - 1)
        m = rig.map(base, leaf="PDE")
        assert rig.run(rig.cpu(), base + 0xFFC, 8, WRITE) == ((m.hpa + 0xFFC, 4), (m.hpa + 0x1000, 4))

    @pytest.mark.parametrize("leaf", ["PDPTE", "PDE"])
    def test_walk_stops_at_large_leaf(self, rig, leaf):
        m = rig.map(G, leaf=leaf)
        # were the leaf's frame taken for a table, the next entry would be misconfigured
        below = EPT_LEVELS[EPT_LEVELS.index(leaf) + 1]
        rig.put(m.hpa + 8 * ((G >> EPT_SHIFT[below]) & 0x1FF), 0xFFFF_FFFF_FFFF_FFFF)
        assert rig.run(rig.cpu(), G, 4, READ) == ((m.hpa + offset_in(leaf, G), 4),)


# =====================================================================================
class TestAccumulatedPermissions:
    """SDM (spec §2 "accumulated", §4 bits 3/4/5): the access rights of a translation are
    the AND of R/W/X over every EPT entry used; an access they deny is an EPT violation
    whose qualification bits 3/4/5 are those ANDed R/W/X bits, bits 2:0 the access, bits
    7/8 for a linear access."""

    @pytest.mark.parametrize("level", EPT_LEVELS)
    @pytest.mark.parametrize("perms", [R, R | W, R | X, X])
    def test_one_level_restricts(self, rig, level, perms):
        m = rig.map(G)
        rig.put(m.entry[level], (rig.get(m.entry[level]) & ~7) | perms)
        cpu = rig.cpu()
        for access, need in ((READ, R), (WRITE, W), (EXECUTE, X)):
            got = rig.run(cpu, G + 0x300, 2, access, gla=GLA)
            if perms & need:
                assert got == ((m.hpa + 0x300, 2),)
            else:
                assert got == Exit(
                    EPT_VIOLATION, ACCESS_BIT[access] | (perms << 3) | Q_GLA_VALID | Q_LINEAR, G + 0x300, GLA
                ), (access, perms)

    def test_and_over_levels(self, rig):
        m = rig.map(G, pml4e=R | W, pdpte=RWX, pde=R | X, flags=RWX | WB)  # AND = R
        cpu = rig.cpu()
        assert rig.run(cpu, G, 1, READ) == ((m.hpa, 1),)
        assert rig.run(cpu, G, 1, WRITE) == Exit(EPT_VIOLATION, Q_WRITE | Q_R | Q_GLA_VALID | Q_LINEAR, G, None)
        assert rig.run(cpu, G, 1, EXECUTE) == Exit(EPT_VIOLATION, Q_FETCH | Q_R | Q_GLA_VALID | Q_LINEAR, G, None)

    @pytest.mark.parametrize("leaf", ["PDE", "PDPTE"])
    def test_large_leaf_and_over_fewer_levels(self, rig, leaf):
        rig.map(G, leaf=leaf, flags=R | X | WB, pml4e=R | W)  # AND = R
        assert rig.run(rig.cpu(), G, 1, WRITE) == Exit(EPT_VIOLATION, Q_WRITE | Q_R | Q_GLA_VALID | Q_LINEAR, G, None)


# =====================================================================================
class TestEptViolationQualification:
    """SDM (spec §4): bits 2:0 = read / write / fetch; bit 7 = guest-linear address valid;
    bit 8 = the access is to the translation of a linear address (clear for a guest
    paging-structure access); bit 12 = NMI unblocking due to IRET; the GPA field holds
    the full GPA and the GLA field the linear address when bit 7 is set."""

    @pytest.mark.parametrize("access", [READ, WRITE, EXECUTE])
    def test_access_bits(self, rig, access):
        rig.map(G, flags=WB | X if access != EXECUTE else WB | R)
        got = rig.run(rig.cpu(), G + 0xFFF, 1, access, gla=GLA + 0xFFF)
        perms = X if access != EXECUTE else R
        assert got == Exit(EPT_VIOLATION, ACCESS_BIT[access] | (perms << 3) | Q_GLA_VALID | Q_LINEAR, G + 0xFFF, GLA + 0xFFF)

    def test_linear_access_with_unknown_gla(self, rig):
        """docs/modelling.md: gla=None with linear=True keeps bits 7 and 8; the GLA field is None."""
        rig.map(G, flags=R | WB)
        assert rig.run(rig.cpu(), G + 8, 8, WRITE) == Exit(EPT_VIOLATION, Q_WRITE | Q_R | Q_GLA_VALID | Q_LINEAR, G + 8, None)

    def test_non_linear_access(self, rig):
        rig.map(G, flags=R | WB)
        assert rig.run(rig.cpu(), G + 8, 8, WRITE, linear=False) == Exit(EPT_VIOLATION, Q_WRITE | Q_R, G + 8, None)

    def test_paging_structure_access(self, rig):
        rig.map(G, flags=R | WB)
        assert rig.run(rig.cpu(), G + 8, 8, WRITE, gla=GLA, paging_structure=True) == Exit(
            EPT_VIOLATION, Q_WRITE | Q_R | Q_GLA_VALID, G + 8, GLA
        )

    def test_pdpte_load_has_no_guest_linear_address(self, rig):
        """spec §4 / SDM: the GLA field is valid for every EPT violation except those of
        a PAE-PDPTE load (MOV to CR) — a paging-structure access whose GPA comes from no
        linear address: bit 7 clear, no GLA; a gla given with it is refused."""
        rig.map(G, flags=X | WB)
        assert rig.run(rig.cpu(), G + 8, 8, READ, paging_structure=True, linear=False) == Exit(
            EPT_VIOLATION, Q_READ | Q_X, G + 8, None
        )
        with pytest.raises(ValueError, match="no guest-linear address"):
            rig.run(rig.cpu(), G + 8, 8, READ, gla=GLA, paging_structure=True, linear=False)

    def test_nmi_unblocking(self, rig):
        rig.map(G, flags=R | WB)
        assert rig.run(rig.cpu(), G, 8, WRITE, gla=GLA, nmi_unblocking=True) == Exit(
            EPT_VIOLATION, Q_WRITE | Q_R | Q_GLA_VALID | Q_LINEAR | Q_NMI, G, GLA
        )

    def test_misconfig_ignores_nmi_and_gla(self, rig):
        rig.map(G, flags=RWX | (7 << 3))
        assert rig.run(rig.cpu(), G, 8, WRITE, gla=GLA, nmi_unblocking=True) == Exit(EPT_MISCONFIG, 0, G, None)


# =====================================================================================
class TestAccessedDirtyFlags:
    """SDM EPT A/D (spec §2): with EPTP bit 6 = 1, a successful access sets the accessed
    flag (bit 8) in every EPT entry used and, for a write, the dirty flag (bit 9) in the
    leaf only. With bit 6 = 0 nothing is written; a failed access sets nothing."""

    @pytest.mark.parametrize("leaf", ["PTE", "PDE", "PDPTE"])
    @pytest.mark.parametrize("access", [READ, WRITE, EXECUTE])
    def test_successful_access(self, rig, leaf, access):
        m = rig.map(G, leaf=leaf)
        before = {n: rig.get(h) for n, h in m.entry.items()}
        assert isinstance(rig.run(rig.cpu(ad=True), G, 8, access), tuple)
        for n, h in m.entry.items():
            want = before[n] | ACCESSED
            if n == leaf and access == WRITE:
                want |= DIRTY
            assert rig.get(h) == want, n

    @pytest.mark.parametrize("access", [READ, WRITE, EXECUTE])
    def test_off_without_eptp_bit6(self, rig, access):
        m = rig.map(G)
        before = {n: rig.get(h) for n, h in m.entry.items()}
        assert isinstance(rig.run(rig.cpu(ad=False), G, 8, access), tuple)
        assert {n: rig.get(h) for n, h in m.entry.items()} == before

    @pytest.mark.parametrize(
        "fault",
        ["write-denied", "not-present-pte", "misconfig-pte", "misconfig-pde"],
    )
    def test_failed_access_sets_nothing(self, rig, fault):
        m = rig.map(G, flags=R | X | WB if fault == "write-denied" else RWX | WB)
        if fault == "not-present-pte":
            rig.put(m.entry["PTE"], 0)
        elif fault == "misconfig-pte":
            rig.put(m.entry["PTE"], rig.get(m.entry["PTE"]) | (1 << 50))
        elif fault == "misconfig-pde":
            rig.put(m.entry["PDE"], rig.get(m.entry["PDE"]) | (1 << 4))
        before = {n: rig.get(h) for n, h in m.entry.items()}
        assert isinstance(rig.run(rig.cpu(ad=True), G, 8, WRITE), Exit)
        assert {n: rig.get(h) for n, h in m.entry.items()} == before

    def test_flags_already_set_are_kept(self, rig):
        m = rig.map(G, flags=RWX | WB | ACCESSED | DIRTY | (1 << 62))
        assert isinstance(rig.run(rig.cpu(ad=True), G, 8, READ), tuple)
        assert rig.get(m.entry["PTE"]) == m.hpa | RWX | WB | ACCESSED | DIRTY | (1 << 62)

    def test_non_leaf_never_gets_dirty(self, rig):
        m = rig.map(G)
        rig.run(rig.cpu(ad=True), G, 8, WRITE)
        for n in ("PML4E", "PDPTE", "PDE"):
            assert rig.get(m.entry[n]) & DIRTY == 0

    def test_page_crossing_write_sets_both_leaves(self, rig):
        m1 = rig.map(G)
        m2 = rig.map(G + 0x1000)
        assert isinstance(rig.run(rig.cpu(ad=True), G + 0xFFC, 8, WRITE), tuple)
        assert rig.get(m1.entry["PTE"]) & (ACCESSED | DIRTY) == ACCESSED | DIRTY
        assert rig.get(m2.entry["PTE"]) & (ACCESSED | DIRTY) == ACCESSED | DIRTY


# =====================================================================================
class TestPagingStructureAccessWithAD:
    """SDM (spec §2): with EPTP bit 6 = 1 a guest paging-structure access (read or write)
    is treated as a write by EPT: it needs W, an EPT violation it causes sets both
    qualification bits 0 and 1, and a successful one sets the leaf's dirty flag. With
    bit 6 = 0 a paging-structure read is a read."""

    def test_read_treated_as_write(self, rig):
        rig.map(G, flags=R | X | WB)
        assert rig.run(rig.cpu(ad=True), G + 0x10, 8, READ, gla=GLA, paging_structure=True) == Exit(
            EPT_VIOLATION, Q_READ | Q_WRITE | Q_R | Q_X | Q_GLA_VALID, G + 0x10, GLA
        )

    def test_write_sets_both_bits(self, rig):
        rig.map(G, flags=R | WB)
        assert rig.run(rig.cpu(ad=True), G + 0x10, 8, WRITE, gla=GLA, paging_structure=True) == Exit(
            EPT_VIOLATION, Q_READ | Q_WRITE | Q_R | Q_GLA_VALID, G + 0x10, GLA
        )

    def test_successful_read_sets_dirty(self, rig):
        m = rig.map(G)
        assert rig.run(rig.cpu(ad=True), G, 8, READ, paging_structure=True) == ((m.hpa, 8),)
        assert rig.get(m.entry["PTE"]) & (ACCESSED | DIRTY) == ACCESSED | DIRTY
        assert rig.get(m.entry["PDE"]) & (ACCESSED | DIRTY) == ACCESSED

    def test_without_ad_a_read_is_a_read(self, rig):
        m = rig.map(G, flags=R | WB)
        cpu = rig.cpu(ad=False)
        assert rig.run(cpu, G, 8, READ, paging_structure=True) == ((m.hpa, 8),)
        assert rig.run(cpu, G, 8, WRITE, gla=GLA, paging_structure=True) == Exit(
            EPT_VIOLATION, Q_WRITE | Q_R | Q_GLA_VALID, G, GLA
        )

    def test_data_read_with_ad_is_still_a_read(self, rig):
        m = rig.map(G, flags=R | WB)
        assert rig.run(rig.cpu(ad=True), G, 8, READ) == ((m.hpa, 8),)
        assert rig.get(m.entry["PTE"]) & DIRTY == 0


# =====================================================================================
class TestPageCrossingAccesses:
    """SDM / spec §5: an access crossing a 4-KiB boundary is translated page by page in
    address order and fails at the first page that fails; for the second page the exit's
    GPA is the page start and its GLA the access's GLA plus the bytes in the first page."""

    def test_two_frames(self, rig):
        m1 = rig.map(G)
        m2 = rig.map(G + 0x1000, hpa=0x5_0000_0000)  # not adjacent to page 1's frame
        assert rig.run(rig.cpu(), G + 0xFF9, 16, READ) == ((m1.hpa + 0xFF9, 7), (m2.hpa, 9))

    def test_exact_page_end_does_not_cross(self, rig):
        m1 = rig.map(G)  # G + 0x1000 not mapped
        assert rig.run(rig.cpu(), G + 0xFF8, 8, READ) == ((m1.hpa + 0xFF8, 8),)
        assert rig.run(rig.cpu(), G + 0xFF9, 8, READ, gla=GLA) == Exit(
            EPT_VIOLATION, Q_READ | Q_GLA_VALID | Q_LINEAR, G + 0x1000, GLA + 7
        )

    def test_first_page_fails_first(self, rig):
        rig.map(G, flags=R | WB)  # page 1 not writable, page 2 not present
        assert rig.run(rig.cpu(), G + 0xFFF, 2, WRITE, gla=GLA) == Exit(
            EPT_VIOLATION, Q_WRITE | Q_R | Q_GLA_VALID | Q_LINEAR, G + 0xFFF, GLA
        )

    def test_second_page_misconfig(self, rig):
        rig.map(G)
        rig.map(G + 0x1000, flags=RWX | (2 << 3))
        assert rig.run(rig.cpu(), G + 0xFFF, 2, READ, gla=GLA) == Exit(EPT_MISCONFIG, 0, G + 0x1000, None)

    def test_second_page_gla_none_when_unknown(self, rig):
        rig.map(G)
        assert rig.run(rig.cpu(), G + 0xFFE, 4, READ).gla is None

    def test_full_two_pages(self, rig):
        m1 = rig.map(G)
        m2 = rig.map(G + 0x1000)
        assert rig.run(rig.cpu(), G + 0xFFF, 4097, READ) == ((m1.hpa + 0xFFF, 1), (m2.hpa, 4096))
        assert rig.run(rig.cpu(), G, 8192, READ) == ((m1.hpa, 4096), (m2.hpa, 4096))


# =====================================================================================
class TestTranslationCache:
    """spec §6 (model: docs/modelling.md "Caching"), with ``cache=True``: mappings are
    tagged by the EPTP's PML4 address; a permissive stale mapping survives table changes
    until INVEPT (single-context for that EPTP, or all-context); switching EPTP keeps
    each tag's mappings; nothing is cached from a failed access. ``cache=False`` never
    goes stale."""

    def test_no_cache_sees_changes_immediately(self, rig):
        m = rig.map(G)
        cpu = rig.cpu(cache=False)
        assert rig.run(cpu, G, 8, WRITE) == ((m.hpa, 8),)
        rig.put(m.entry["PTE"], m.hpa | R | WB)
        assert rig.run(cpu, G, 8, WRITE).reason == EPT_VIOLATION

    @pytest.mark.parametrize("invept", ["single-context", "all-context"])
    def test_stale_permissive_entry_until_invept(self, rig, invept):
        m = rig.map(G)
        cpu = rig.cpu(cache=True)
        assert rig.run(cpu, G, 8, WRITE) == ((m.hpa, 8),)
        rig.put(m.entry["PTE"], m.hpa | R | WB)  # write-protect without INVEPT
        assert rig.run(cpu, G + 8, 8, WRITE) == ((m.hpa + 8, 8),)  # stale
        rig.put(m.entry["PDE"], 0)  # even the whole path gone
        assert rig.run(cpu, G + 8, 8, READ) == ((m.hpa + 8, 8),)
        cpu.invept(invept, rig.eptp()) if invept == "single-context" else cpu.invept(invept)
        assert rig.run(cpu, G + 8, 8, READ, gla=GLA) == Exit(EPT_VIOLATION, Q_READ | Q_GLA_VALID | Q_LINEAR, G + 8, GLA)

    def test_stale_remap_until_invept(self, rig):
        m = rig.map(G)
        cpu = rig.cpu(cache=True)
        assert rig.run(cpu, G, 8, READ) == ((m.hpa, 8),)
        other = rig.mem.alloc_frame()
        rig.put(m.entry["PTE"], other | RWX | WB)
        assert rig.run(cpu, G, 8, READ) == ((m.hpa, 8),)
        cpu.invept("single-context", rig.eptp())
        assert rig.run(cpu, G, 8, READ) == ((other, 8),)

    def test_tagged_by_eptp(self, rig):
        pml4_b = rig.mem.alloc_frame()
        ma = rig.map(G)
        mb = rig.map(G, pml4=pml4_b)
        eptp_a, eptp_b = rig.eptp(), rig.eptp(pml4=pml4_b)
        cpu = rig.cpu(cache=True)
        assert rig.run(cpu, G, 8, READ) == ((ma.hpa, 8),)
        cpu.load_controls(eptp=eptp_b)
        assert rig.run(cpu, G, 8, READ) == ((mb.hpa, 8),)
        # change both EPTs without INVEPT: each tag keeps its own stale mapping
        new_a, new_b = rig.mem.alloc_frame(), rig.mem.alloc_frame()
        rig.put(ma.entry["PTE"], new_a | RWX | WB)
        rig.put(mb.entry["PTE"], new_b | RWX | WB)
        assert rig.run(cpu, G, 8, READ) == ((mb.hpa, 8),)
        cpu.load_controls(eptp=eptp_a)
        assert rig.run(cpu, G, 8, READ) == ((ma.hpa, 8),)
        cpu.invept("single-context", eptp_b)  # drops B's mappings only
        assert rig.run(cpu, G, 8, READ) == ((ma.hpa, 8),)
        cpu.load_controls(eptp=eptp_b)
        assert rig.run(cpu, G, 8, READ) == ((new_b, 8),)
        cpu.load_controls(eptp=eptp_a)
        cpu.invept("all-context")
        assert rig.run(cpu, G, 8, READ) == ((new_a, 8),)

    def test_eptp_flags_do_not_split_the_tag(self, rig):
        m = rig.map(G)
        cpu = rig.cpu(cache=True)
        assert rig.run(cpu, G, 8, READ) == ((m.hpa, 8),)
        rig.put(m.entry["PTE"], 0)
        cpu.load_controls(eptp=rig.eptp(ad=True))  # same PML4: same EP4TA tag
        assert rig.run(cpu, G, 8, READ) == ((m.hpa, 8),)

    @pytest.mark.parametrize("fault", ["write-denied", "misconfig", "not-present"])
    def test_nothing_cached_from_failed_access(self, rig, fault):
        m = rig.map(G, flags=R | WB)
        if fault == "misconfig":
            rig.put(m.entry["PTE"], m.hpa | R | W | (3 << 3))
        elif fault == "not-present":
            rig.put(m.entry["PTE"], m.hpa | WB)
        cpu = rig.cpu(cache=True)
        assert isinstance(rig.run(cpu, G, 8, WRITE), Exit)
        other = rig.mem.alloc_frame()
        rig.put(m.entry["PTE"], other | RWX | WB)  # no INVEPT
        assert rig.run(cpu, G, 8, READ) == ((other, 8),)
        assert rig.run(cpu, G, 8, WRITE) == ((other, 8),)

    def test_restrictive_entry_is_rewalked(self, rig):
        m = rig.map(G, flags=R | WB)
        cpu = rig.cpu(cache=True)
        assert rig.run(cpu, G, 8, READ) == ((m.hpa, 8),)
        rig.put(m.entry["PTE"], m.hpa | RWX | WB)  # more permissive: no INVEPT needed
        assert rig.run(cpu, G, 8, WRITE) == ((m.hpa, 8),)

    def test_dirty_flag_set_after_cached_read(self, rig):
        m = rig.map(G)
        cpu = rig.cpu(cache=True, ad=True)
        assert rig.run(cpu, G, 8, READ) == ((m.hpa, 8),)
        assert rig.get(m.entry["PTE"]) & DIRTY == 0
        assert rig.run(cpu, G, 8, WRITE) == ((m.hpa, 8),)
        assert rig.get(m.entry["PTE"]) & DIRTY == DIRTY

    def test_invept_type_checked(self, rig):
        cpu = rig.cpu(cache=True)
        with pytest.raises(ValueError, match="single-context"):
            cpu.invept("single-context")
        with pytest.raises(ValueError, match="INVEPT type"):
            cpu.invept("global")


# =====================================================================================
class TestEptDisabled:
    """Processor model: with "enable EPT" = 0 guest-physical addresses are host-physical
    (no walk, no exits) and the EPTP is neither checked nor used."""

    GL = 0x12_3456_7000  # below 2**46: an HPA too when EPT is off

    def test_identity(self, rig):
        cpu = Processor(rig.mem, 0, secondary_controls=0)
        assert cpu.translate(self.GL + 0x123, 8, WRITE) == ((self.GL + 0x123, 8),)
        assert tuple(cpu.translate(0xFFC, 8, READ)) == ((0xFFC, 4), (0x1000, 4))

    def test_identity_after_switching_off_without_cache(self, rig):
        m = rig.map(self.GL)
        cpu = rig.cpu(spp=False)
        assert rig.run(cpu, self.GL + 0x10, 4, READ) == ((m.hpa + 0x10, 4),)
        cpu.load_controls(secondary_controls=0)
        assert rig.run(cpu, self.GL + 0x10, 4, READ) == ((self.GL + 0x10, 4),)

    def test_identity_after_switching_off_with_cache(self, rig):
        m = rig.map(self.GL)
        cpu = rig.cpu(spp=False, cache=True)
        assert rig.run(cpu, self.GL + 0x10, 4, READ) == ((m.hpa + 0x10, 4),)
        cpu.load_controls(secondary_controls=0)
        assert rig.run(cpu, self.GL + 0xFFE, 4, READ) == ((self.GL + 0xFFE, 2), (self.GL + 0x1000, 2))
        assert rig.run(cpu, self.GL + 0x10, 4, READ) == ((self.GL + 0x10, 4),)
