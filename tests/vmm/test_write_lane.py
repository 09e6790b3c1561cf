"""The write lane (Vm.write's fast path, compiled) decides and counts exactly as
Vm.write: a Vm fed through the lane (falling back to Vm.write, then installing the
page) and a Vm fed through Vm.write alone end every step with the same memory and
the same statistics.  Skipped, with the reason, where the lane cannot be built."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sppkit.vmm import Decision, Vm
from sppkit.vmm import write_lane

OK, WHY = write_lane.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"the write lane's C code is unavailable here: {WHY}")

BASE = 0x10000
PAGES = 6
GFN0 = BASE >> 12


def _decide(ev):
    # the same answer for the same sub-page in both VMs
    return (Decision.SKIP, Decision.EMULATE, Decision.UNPROTECT, Decision.SKIP)[(ev.gfn + ev.denied[0]) % 4]


LOGGED = 0x40000  # a dirty-logged slot: its clean pages are write-protected
LPAGES = 3


def make_vm(**kw) -> Vm:
    vm = Vm(**kw)
    vm.add_memslot(0, BASE, (PAGES + 1) << 12)  # room for a write crossing the last page
    vm.add_memslot(1, LOGGED, LPAGES << 12, dirty_log=True)
    vm.enable_spp()
    vm.on_violation(_decide)
    return vm


def lane_write(vm: Vm, gpa: int, data: bytes):
    lane = vm.write_lane()
    if lane.write(gpa, data):
        return "lane"
    r = vm.write(gpa, data)
    if r.committed:
        lane.install(gpa)
    return r


class LaneAgreesWithWrite(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.a = make_vm()  # through the lane
        self.b = make_vm()  # through Vm.write
        assert self.a.write_lane() is not None
        self.lane_hits = 0

    @rule(page=st.integers(0, PAGES - 1), off=st.integers(0, 4095), size=st.sampled_from([1, 2, 4, 8]),
          byte=st.integers(0, 255))
    def write(self, page, off, size, byte):
        gpa = BASE + (page << 12) + off
        data = bytes((byte + i) & 0xFF for i in range(size))
        ra = lane_write(self.a, gpa, data)
        rb = self.b.write(gpa, data)
        if ra == "lane":
            self.lane_hits += 1
            assert rb.committed and not rb.events and not rb.spp_misses, rb
        else:
            assert (ra.committed, ra.decision, len(ra.events)) == (rb.committed, rb.decision, len(rb.events))

    @rule(page=st.integers(0, LPAGES - 1), off=st.integers(0, 4088), byte=st.integers(0, 255))
    def write_logged(self, page, off, byte):
        gpa = LOGGED + (page << 12) + off
        data = bytes([byte]) * 8
        ra = lane_write(self.a, gpa, data)
        rb = self.b.write(gpa, data)
        assert rb.committed and (ra == "lane" or ra.committed)
        if ra == "lane":
            self.lane_hits += 1

    @rule()
    def dirty_log(self):
        assert self.a.get_dirty_log(1) == self.b.get_dirty_log(1)

    @rule(page=st.integers(0, PAGES - 1), amap=st.sampled_from([0xFFFFFFFF, 0xFFFFFFFE, 0x0000FFFF, 0, 0x80000001]))
    def protect(self, page, amap):
        for vm in (self.a, self.b):
            vm.set_subpage_access(GFN0 + page, [amap])

    @rule()
    def invept(self):
        for vm in (self.a, self.b):
            vm.processor.invept("single-context", vm.processor.eptp)

    @rule(on=st.booleans())
    def observer(self, on):
        for vm in (self.a, self.b):
            vm.on_write((lambda gpa, size, rip: None) if on else None)

    @rule()
    def reset(self):
        for vm in (self.a, self.b):
            vm.reset_stats()

    @invariant()
    def same_memory_and_stats(self):
        assert self.a.read(BASE, (PAGES + 1) << 12) == self.b.read(BASE, (PAGES + 1) << 12)
        assert self.a.read(LOGGED, LPAGES << 12) == self.b.read(LOGGED, LPAGES << 12)
        assert self.a.stats(top=100) == self.b.stats(top=100)
        assert self.a.get_subpage_access(GFN0, PAGES) == self.b.get_subpage_access(GFN0, PAGES)


TestLaneAgreesWithWrite = LaneAgreesWithWrite.TestCase
TestLaneAgreesWithWrite.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)


# ---------------------------------------------------------------- the rules, one by one
def _lane_vm(**kw):
    vm = make_vm(**kw)
    lane = vm.write_lane()
    return vm, lane


def test_nothing_is_permitted_before_an_install():
    vm, lane = _lane_vm()
    assert not lane.write(BASE, b"x") and vm.read(BASE, 1) == b"\x00"
    assert vm.stats()["writes"] == 0


def test_installs_only_what_the_processor_cached():
    vm, lane = _lane_vm()
    vm.set_subpage_access(GFN0, [0xFFFFFFFE])  # sub-page 0 protected
    assert not lane.install(BASE + 0x800)  # nothing cached yet
    assert vm.write(BASE + 0x800, b"a").committed
    assert lane.install(BASE + 0x800)
    assert lane.write(BASE + 0x900, b"bb") and vm.read(BASE + 0x900, 2) == b"bb"
    assert not lane.write(BASE + 0x10, b"c")  # the protected sub-page: Vm.write decides
    assert not lane.write(BASE + 0x7F, b"cc")  # touches sub-page 0 too
    assert not lane.write(BASE + 0xFFF, b"dd")  # crosses the page
    st = vm.stats()
    assert st["writes"] == 2 and st["page_granular"] == 2
    assert st["top_page_granular"] == [{"gfn": GFN0, "writes": 2}]


def test_a_violation_drops_the_entry():
    vm, lane = _lane_vm()
    vm.set_subpage_access(GFN0, [0xFFFFFFFE])
    vm.write(BASE + 0x800, b"a")
    lane.install(BASE + 0x800)
    assert vm.write(BASE, b"z").decision is not None  # denied: the processor drops the mapping
    assert not lane.write(BASE + 0x800, b"b")


def test_an_access_map_change_empties_the_table():
    vm, lane = _lane_vm()
    vm.write(BASE, b"a")
    assert lane.install(BASE) and lane.write(BASE, b"b")
    vm.set_subpage_access(GFN0, [0xFFFFFFFE])  # INVEPT
    assert not lane.write(BASE, b"c") and vm.read(BASE, 1) == b"b"


def test_an_observer_disables_the_lane():
    vm, lane = _lane_vm()
    vm.write(BASE, b"a")
    lane.install(BASE)
    seen = []
    vm.on_write(lambda gpa, size, rip: seen.append(gpa))
    assert not lane.write(BASE, b"b")
    vm.on_write(None)
    assert lane.write(BASE, b"c")


def test_first_byte_mode_checks_the_first_sub_page_only():
    vm, lane = _lane_vm(spp_write_check="first-byte")
    vm.set_subpage_access(GFN0, [0xFFFFFFFD])  # sub-page 1 protected
    vm.write(BASE + 0x10, b"a")
    assert lane.install(BASE + 0x10)
    assert lane.write(BASE + 0x7C, b"12345678")  # first byte in sub-page 0
    assert not lane.write(BASE + 0x80, b"x")


def test_stale_counts_survive_a_clear():
    vm, lane = _lane_vm()
    vm.set_subpage_access(GFN0, [0xFFFFFFFE])
    vm.write(BASE + 0x800, b"a")
    lane.install(BASE + 0x800)
    for _ in range(5):
        assert lane.write(BASE + 0x800, b"b")
    vm.processor.invept("all-context")
    st = vm.stats()
    assert st["writes"] == 6 and st["page_granular"] == 6


def test_needs_the_translation_cache():
    vm = make_vm(cache=False)
    assert vm.write_lane() is None
