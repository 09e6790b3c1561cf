"""``vm.write``: sub-page exact decisions, writes spanning sub-pages and pages, the
handler's decisions, read-only and unmapped memory, lazy SPPT misses and rebuilds, and
SPP misconfigurations."""

from __future__ import annotations

import json

import pytest

from sppkit import Decision, GpaNotMapped, SppMisconfiguration, SppViolation, Vm, WriteResult
from sppkit.arch import EPT_SPP, Level
from sppkit.arch.exits import QUAL_SPP_MISS
from sppkit.vmm import VmmError

from vmm_helpers import FULL, M2, MODES, PAGE, leaf, spp_vm

BASE = 0x10000000
GFN = BASE >> 12
QUAL_WRITE = 1 << 1


def filled(vm: Vm, gpa: int, n: int, byte: int = 0x5A) -> bytes:
    data = bytes([byte]) * n
    vm.load(gpa, data)
    return data


class Recorder:
    """A violation handler answering from a script, recording what it was asked."""

    def __init__(self, *answers: Decision) -> None:
        self.answers = list(answers)
        self.events: list[SppViolation] = []

    def __call__(self, ev: SppViolation) -> Decision:
        self.events.append(ev)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


# ---------------------------------------------------------------- sub-page exact
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("amap", [0x0000FFFF, 0xAAAAAAAA, 0x80000001, 0x00000000, 0xFFFFFFFE])
def test_every_subpage_edge_byte(mode, cache, amap):
    vm = spp_vm(mode, cache=cache)
    before = filled(vm, BASE, PAGE)
    vm.set_subpage_access(GFN, [amap])
    expected = bytearray(before)
    for i in range(32):
        for off in (i * 128, i * 128 + 127):
            r = vm.write(BASE + off, b"\x01")
            allowed = bool(amap >> i & 1)
            assert r.committed == allowed, (i, off)
            if allowed:
                expected[off] = 1
                assert r.events == ()
            else:
                assert r.event.subpages == (i,) and r.event.denied == (i,)
    assert vm.read(BASE, PAGE) == bytes(expected)
    assert vm.get_subpage_access(GFN, 1) == [amap]


@pytest.mark.parametrize("mode", MODES)
def test_write_spanning_subpages_needs_every_touched_subpage_writable(mode):
    vm = spp_vm(mode)
    vm.set_subpage_access(GFN, [0b0111])  # sub-pages 0..2 writable, 3.. protected
    before = filled(vm, BASE, PAGE)
    r = vm.write(BASE + 0x7E, b"abcd")  # sub-pages 0 and 1
    assert r.committed and vm.read(BASE + 0x7E, 4) == b"abcd"
    r = vm.write(BASE + 0x40, bytes(0x140))  # sub-pages 0, 1, 2 (0x40..0x17F)
    assert r.committed
    assert vm.read(BASE + 0x40, 0x140) == bytes(0x140)
    now = vm.read(BASE, PAGE)
    r = vm.write(BASE + 0x17E, b"wxyz")  # sub-pages 2 and 3: 3 is protected
    assert not r.committed
    assert r.event.subpages == (2, 3) and r.event.denied == (3,)
    assert vm.read(BASE, PAGE) == now, "a partly denied write partly landed"
    r = vm.write(BASE + 0x100, b"\xff" * 0x300)  # sub-pages 2..7: 3..7 denied
    assert not r.committed and r.event.subpages == tuple(range(2, 8)) and r.event.denied == tuple(range(3, 8))
    assert vm.read(BASE, PAGE) == now
    assert now[0x180:] == before[0x180:]


def test_first_byte_mode_checks_only_the_first_subpage():
    vm = spp_vm("lazy", spp_write_check="first-byte")
    vm.set_subpage_access(GFN, [0b01])
    assert vm.write(BASE + 0x7E, b"abcd").committed  # Bochs: only the first byte's sub-page
    assert not vm.write(BASE + 0x80, b"a").committed


# ---------------------------------------------------------------- page-crossing writes
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cache", [True, False])
def test_denial_on_second_page_keeps_first_page_bytes_out(mode, cache):
    vm = spp_vm(mode, cache=cache)
    before = filled(vm, BASE, 2 * PAGE)
    vm.set_subpage_access(GFN + 1, [0xFFFFFFFE])  # sub-page 0 of the second page protected
    rec = Recorder(Decision.SKIP)
    vm.on_violation(rec)
    r = vm.write(BASE + PAGE - 4, b"12345678", gla=0x7000_0FFC, rip=0x1234, vcpu=3)
    assert not r.committed and r.decision is Decision.SKIP
    assert len(rec.events) == 1 and r.events == tuple(rec.events)
    ev = r.event
    assert ev.gpa == BASE + PAGE and ev.gfn == GFN + 1 and ev.size == 4 and ev.data == b"5678"
    assert ev.gla == 0x7000_1000 and ev.rip == 0x1234 and ev.vcpu == 3
    assert ev.write_gpa == BASE + PAGE - 4 and ev.write_size == 8
    assert ev.subpages == (0,) and ev.denied == (0,)
    assert vm.read(BASE, 2 * PAGE) == before, "the first page's bytes landed"


@pytest.mark.parametrize("mode", MODES)
def test_denial_on_first_page_only(mode):
    vm = spp_vm(mode)
    before = filled(vm, BASE, 2 * PAGE)
    vm.set_subpage_access(GFN, [0x7FFFFFFF])  # last sub-page of the first page protected
    rec = Recorder(Decision.SKIP)
    vm.on_violation(rec)
    r = vm.write(BASE + PAGE - 2, b"abcd")
    assert not r.committed and [e.gfn for e in r.events] == [GFN]
    assert r.event.data == b"ab" and r.event.subpages == (31,)
    assert vm.read(BASE, 2 * PAGE) == before
    # allowed on both pages → lands on both
    vm.set_subpage_access(GFN, [FULL])
    assert vm.write(BASE + PAGE - 2, b"abcd").committed
    assert vm.read(BASE + PAGE - 2, 4) == b"abcd"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "answers, asked, committed",
    [
        ((Decision.SKIP,), 1, False),
        ((Decision.STOP,), 1, False),
        ((Decision.EMULATE, Decision.SKIP), 2, False),
        ((Decision.EMULATE, Decision.STOP), 2, False),
        ((Decision.EMULATE, Decision.EMULATE), 2, True),
        ((Decision.UNPROTECT, Decision.EMULATE), 2, True),
        ((Decision.EMULATE, Decision.UNPROTECT), 2, True),
    ],
)
def test_both_pages_deny(mode, answers, asked, committed):
    vm = spp_vm(mode)
    before = filled(vm, BASE, 2 * PAGE)
    vm.set_subpage_access(GFN, [0x7FFFFFFF, 0xFFFFFFFE])
    rec = Recorder(*answers)
    vm.on_violation(rec)
    r = vm.write(BASE + PAGE - 3, b"ABCDEF")
    assert [e.gfn for e in rec.events] == [GFN, GFN + 1][:asked]
    assert r.events == tuple(rec.events)
    assert r.committed == committed
    assert r.decision is answers[asked - 1]
    assert r.stopped == (answers[asked - 1] is Decision.STOP)
    if committed:
        assert vm.read(BASE + PAGE - 3, 6) == b"ABCDEF"
    else:
        assert vm.read(BASE, 2 * PAGE) == before
    # UNPROTECT opens the touched sub-page of its page, whatever the other page decided
    want = [0x7FFFFFFF, 0xFFFFFFFE]
    for k, d in enumerate(answers[:asked]):
        if d is Decision.UNPROTECT:
            want[k] = FULL
    assert vm.get_subpage_access(GFN, 2) == want


def test_page_crossing_into_unmapped_memory():
    vm = Vm()
    vm.add_memslot(0, BASE, PAGE)
    before = filled(vm, BASE, PAGE)
    with pytest.raises(GpaNotMapped, match=f"{BASE + PAGE:#x}"):
        vm.write(BASE + PAGE - 2, b"abcd")
    assert vm.read(BASE, PAGE) == before


def test_page_crossing_into_readonly_memory():
    vm = Vm()
    vm.add_memslot(0, BASE, PAGE)
    vm.add_memslot(1, BASE + PAGE, PAGE, readonly=True)
    before = filled(vm, BASE, PAGE)
    r = vm.write(BASE + PAGE - 2, b"abcd")
    assert not r.committed and r.readonly
    assert vm.read(BASE, 2 * PAGE) == before + bytes(PAGE)


@pytest.mark.parametrize("decision", [Decision.EMULATE, Decision.UNPROTECT])
def test_readonly_second_page_keeps_the_first_pages_violation(decision):
    vm = Vm()
    vm.add_memslot(0, BASE, PAGE)
    vm.add_memslot(1, BASE + PAGE, PAGE, readonly=True)
    vm.enable_spp("eager")
    vm.set_subpage_access(GFN, [0x7FFFFFFF])
    rec = Recorder(decision)
    vm.on_violation(rec)
    r = vm.write(BASE + PAGE - 2, b"abcd")
    assert len(rec.events) == 1 and vm.stats()["violations"] == 1
    assert not r.committed and r.readonly
    assert vm.read(BASE + PAGE - 2, 4) == bytes(4)
    assert r.events == tuple(rec.events), "the violation the handler decided is missing from the result"
    assert r.decision is decision
    assert vm.stats()["page_granular"] == 1


@pytest.mark.parametrize("gpa, n", [(BASE, 0), (BASE, 4097), (-1, 1), (1.5, 1)])
def test_bad_writes(gpa, n):
    vm = Vm()
    vm.add_memslot(0, BASE, 2 * PAGE)
    with pytest.raises(ValueError):
        vm.write(gpa, bytes(n))


def test_full_page_writes():
    vm = spp_vm("eager")
    data = bytes(range(256)) * 16
    assert vm.write(BASE, data).committed and vm.read(BASE, PAGE) == data
    assert vm.write(BASE + PAGE + 7, data).committed and vm.read(BASE + PAGE + 7, PAGE) == data
    vm.set_subpage_access(GFN + 3, [0x7FFFFFFF])
    r = vm.write(BASE + 3 * PAGE, data[::-1])
    assert not r.committed and r.event.subpages == tuple(range(32)) and r.event.denied == (31,)


# ---------------------------------------------------------------- decisions
@pytest.mark.parametrize("mode", MODES)
def test_default_without_handler_is_skip(mode):
    vm = spp_vm(mode)
    before = filled(vm, BASE, PAGE)
    vm.set_subpage_access(GFN, [0])
    r = vm.write(BASE + 5, b"x")
    assert isinstance(r, WriteResult)
    assert not r.committed and r.decision is Decision.SKIP and not r.stopped
    assert vm.read(BASE, PAGE) == before
    assert vm.get_subpage_access(GFN, 1) == [0]
    vm.on_violation(lambda ev: Decision.EMULATE)
    vm.on_violation(None)  # back to no handler
    assert vm.write(BASE + 5, b"x").decision is Decision.SKIP


@pytest.mark.parametrize("mode", MODES)
def test_emulate_commits_and_keeps_the_protection(mode):
    vm = spp_vm(mode)
    vm.set_subpage_access(GFN, [0xFFFF0000])
    rec = Recorder(Decision.EMULATE)
    vm.on_violation(rec)
    r = vm.write(BASE + 0x100, b"tracked")
    assert r.committed and r.decision is Decision.EMULATE and len(r.events) == 1
    assert vm.read(BASE + 0x100, 7) == b"tracked"
    assert vm.get_subpage_access(GFN, 1) == [0xFFFF0000]
    lv, raw = leaf(vm, BASE)
    assert lv == Level.PTE and raw & EPT_SPP and not raw & 2
    r = vm.write(BASE + 0x100, b"again")  # still tracked: asked again
    assert r.committed and len(rec.events) == 2


@pytest.mark.parametrize("mode", MODES)
def test_unprotect_opens_the_touched_subpages_only(mode):
    vm = spp_vm(mode)
    vm.set_subpage_access(GFN, [0])
    rec = Recorder(Decision.UNPROTECT)
    vm.on_violation(rec)
    r = vm.write(BASE + 0x17F, b"ab")  # sub-pages 2 and 3
    assert r.committed and r.decision is Decision.UNPROTECT
    assert vm.read(BASE + 0x17F, 2) == b"ab"
    assert vm.get_subpage_access(GFN, 1) == [0b1100]
    assert vm.write(BASE + 0x100, b"free").committed and len(rec.events) == 1
    r = vm.write(BASE + 0x200, b"x")  # sub-page 4: still protected
    assert r.committed and len(rec.events) == 2  # unprotected in turn
    assert vm.get_subpage_access(GFN, 1) == [0b11100]
    rec.answers[:] = [Decision.SKIP]
    assert not vm.write(BASE, b"x").committed
    assert vm.get_subpage_access(GFN, 1) == [0b11100]


@pytest.mark.parametrize("mode", MODES)
def test_unprotect_of_the_last_subpage_unprotects_the_page_and_merges(mode):
    vm = spp_vm(mode, slots=((0, M2, M2),))
    gfn = (M2 >> 12) + 4
    vm.set_subpage_access(gfn, [0x7FFFFFFF])
    assert leaf(vm, M2)[0] == Level.PTE
    vm.on_violation(lambda ev: Decision.UNPROTECT)
    r = vm.write((gfn << 12) + 0xFFF, b"!")
    assert r.committed and vm.get_subpage_access(gfn, 1) == [FULL]
    lv, raw = leaf(vm, gfn << 12)
    assert lv == Level.PDE and raw & 2, "a fully unprotected region was not merged back"
    assert vm.read((gfn << 12) + 0xFFF, 1) == b"!"


@pytest.mark.parametrize("mode", MODES)
def test_stop_writes_nothing(mode):
    vm = spp_vm(mode)
    before = filled(vm, BASE, PAGE)
    vm.set_subpage_access(GFN, [0])
    vm.on_violation(lambda ev: Decision.STOP)
    r = vm.write(BASE + 1, b"xyz")
    assert not r.committed and r.stopped and r.decision is Decision.STOP
    assert vm.read(BASE, PAGE) == before
    assert vm.get_subpage_access(GFN, 1) == [0]
    assert vm.stats()["decisions"]["stop"] == 1


@pytest.mark.parametrize("bad", ["skip", None, 0, True, "emulate"])
def test_handler_returning_a_non_decision_is_a_type_error(bad):
    vm = spp_vm("lazy")
    before = filled(vm, BASE, PAGE)
    vm.set_subpage_access(GFN, [0])
    vm.on_violation(lambda ev: bad)
    with pytest.raises(TypeError, match="Decision"):
        vm.write(BASE, b"x")
    assert vm.read(BASE, PAGE) == before
    assert vm.get_subpage_access(GFN, 1) == [0]


def test_on_violation_needs_a_callable():
    vm = Vm()
    with pytest.raises(TypeError):
        vm.on_violation(Decision.SKIP)


def test_violation_event_fields_and_to_dict():
    vm = spp_vm("eager")
    vm.set_subpage_access(GFN, [0])
    rec = Recorder(Decision.SKIP)
    vm.on_violation(rec)
    vm.write(BASE + 0x234, b"\x01\x02", vcpu=2, rip=0xFFFF_8000_0000_1000, gla=0xFFFF_9000_0000_0234)
    (ev,) = rec.events
    assert ev.qualification & QUAL_WRITE
    assert ev.gpa == BASE + 0x234 and ev.gla == 0xFFFF_9000_0000_0234
    assert ev.subpages == (4,) and ev.denied == (4,)
    d = ev.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["data"] == "0102" and d["vcpu"] == 2 and d["subpages"] == [4]


# ---------------------------------------------------------------- read-only and unmapped
def test_readonly_slot_writes_are_discarded():
    vm = Vm()
    vm.add_memslot(0, BASE, 2 * PAGE, readonly=True)
    vm.load(BASE, b"rom image")  # the VMM may load it
    asked = []
    vm.on_violation(lambda ev: asked.append(ev) or Decision.EMULATE)
    r = vm.write(BASE + 1, b"patched")
    assert not r.committed and r.readonly and r.events == ()
    assert vm.read(BASE, 9) == b"rom image"
    assert asked == []
    assert vm.stats()["readonly_writes"] == 1
    vm.enable_spp("lazy")
    assert vm.write(BASE + 1, b"patched").readonly


def test_writes_outside_memslots():
    vm = Vm()
    vm.add_memslot(0, BASE, PAGE)
    for gpa in (0, BASE - 1, BASE + PAGE, 1 << 47):
        with pytest.raises(GpaNotMapped, match=f"gpa={gpa:#x}") as ei:
            vm.write(gpa, b"x")
        assert ei.value.gpa == gpa
    with pytest.raises(GpaNotMapped):
        vm.read(BASE + PAGE, 1)


# ---------------------------------------------------------------- lazy SPPT: misses and rebuilds
@pytest.mark.parametrize("mode", MODES)
def test_permission_change_after_the_sppt_is_populated(mode):
    vm = spp_vm(mode)
    vm.set_subpage_access(GFN, [0b01])
    r = vm.write(BASE, b"a")  # populates the SPPT (lazy: one miss)
    assert r.committed and r.spp_misses == (1 if mode == "lazy" else 0)
    assert not vm.write(BASE + 0x80, b"b").committed
    assert vm.stats()["spp_misses"] == (1 if mode == "lazy" else 0)
    l2e = vm.sppt.builder.walk(BASE)[2]
    assert l2e[0] == "L2E" and l2e[2] & 1

    vm.set_subpage_access(GFN, [0b10])  # change after population
    l2e = vm.sppt.builder.walk(BASE)[2]
    if mode == "lazy":
        assert not l2e[2] & 1, "lazy mode: a change must clear the L2E present bit"
        assert vm.sppt.builder.get_vector(BASE) is None
    else:
        assert l2e[2] & 1 and vm.sppt.builder.get_vector(BASE) == 0b0100

    r = vm.write(BASE + 0x80, b"b")  # now allowed
    assert r.committed and r.spp_misses == (1 if mode == "lazy" else 0)
    assert vm.sppt.builder.get_vector(BASE) == 0b0100
    r = vm.write(BASE, b"c")  # now denied, no further miss
    assert not r.committed and r.spp_misses == 0
    st = vm.stats()
    assert st["spp_misses"] == (2 if mode == "lazy" else 0)
    assert st["violations"] == 2  # misses are counted apart from violations
    assert vm.read(BASE, 0x81) == b"a" + bytes(0x7F) + b"b"


def test_lazy_miss_rebuilds_the_whole_2m_region():
    # two slots sharing a 2-MiB region, three protected pages; one more in another region
    vm = spp_vm("lazy", slots=((0, BASE, 4 * PAGE), (1, BASE + 64 * PAGE, 4 * PAGE), (2, BASE + M2, PAGE)))
    vm.set_subpage_access(GFN, [0x1])
    vm.set_subpage_access(GFN + 65, [0x2, 0x4])
    vm.set_subpage_access((BASE + M2) >> 12, [0x8])
    assert vm.sppt.builder.get_vector(BASE) is None
    r = vm.write(BASE, b"x")
    assert r.committed and r.spp_misses == 1
    # every protected page of the region has its vector now...
    assert vm.sppt.builder.get_vector(BASE) == 0x1
    assert vm.sppt.builder.get_vector(BASE + 65 * PAGE) == 0b100
    assert vm.sppt.builder.get_vector(BASE + 66 * PAGE) == 0b10000
    # ...so their writes take no miss; the other region does
    assert vm.write(BASE + 65 * PAGE + 0x80, b"x").spp_misses == 0
    assert not vm.write(BASE + 66 * PAGE, b"x").committed
    assert vm.write(BASE + M2 + 3 * 128, b"x").spp_misses == 1
    assert vm.stats()["spp_misses"] == 2
    assert vm.sppt.rebuilds == 2


def test_eager_builds_the_vector_when_set():
    vm = spp_vm("eager")
    vm.set_subpage_access(GFN + 2, [0xF0F0F0F0])
    walk = vm.sppt.builder.walk(BASE + 2 * PAGE)
    assert [n for n, _, _ in walk] == ["L4E", "L3E", "L2E", "L1E"]
    assert walk[-1][2] == 0x5500_5500_5500_5500
    assert vm.write(BASE + 2 * PAGE + 0x200, b"x").spp_misses == 0


@pytest.mark.parametrize("mode", MODES)
def test_miss_then_violation_on_one_write(mode):
    vm = spp_vm(mode)
    vm.set_subpage_access(GFN, [0])
    r = vm.write(BASE, b"x")
    assert not r.committed and len(r.events) == 1
    assert r.spp_misses == (1 if mode == "lazy" else 0)
    assert r.event.qualification & QUAL_WRITE  # an EPT violation (write), not an exit 66
    st = vm.stats()
    assert st["violations"] == 1 and st["spp_misses"] == (1 if mode == "lazy" else 0)


# ---------------------------------------------------------------- misconfiguration
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cache, cache_spp", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize(
    "level, bits",
    [("L2E", 1 << 1), ("L2E", 1 << 63), ("L3E", 1 << 5), ("L4E", 1 << 11), ("L1E", 1 << 1), ("L1E", 1 << 63)],
)
def test_corrupted_sppt_entry_is_a_misconfiguration(mode, cache, cache_spp, level, bits):
    vm = spp_vm(mode, cache=cache, cache_spp=cache_spp)
    vm.set_subpage_access(GFN, [0xFFFF])
    assert vm.write(BASE, b"a").committed  # the SPPT path exists (lazy: after a miss)
    walk = vm.sppt.builder.walk(BASE)
    names = [n for n, _, _ in walk]
    assert names == ["L4E", "L3E", "L2E", "L1E"]
    _, hpa, raw = walk[names.index(level)]
    vm.memory.write_u64(hpa, raw | bits)
    if cache_spp:
        # The vector cached with the mapping still permits (as a processor caching SPP
        # data would): the corruption is seen once the mapping is invalidated.
        assert vm.write(BASE + 2, b"z").committed
        vm.processor.invept("single-context", vm.processor.eptp)
    with pytest.raises(SppMisconfiguration) as ei:
        vm.write(BASE + 1, b"b")
    e = ei.value
    assert [n for n, _, _ in e.path] == ["L4E", "L3E", "L2E", "L1E"]
    assert dict((n, (h, r)) for n, h, r in e.path)[level] == (hpa, raw | bits)
    assert e.exit.level == level and not e.exit.qualification & QUAL_SPP_MISS
    msg = str(e)
    assert f"{hpa:#x}" in msg and f"{raw | bits:#018x}" in msg and "L1E@" in msg
    assert vm.read(BASE, 2) == b"a\x00"
    # an unprotected page of the same region never consults the SPPT
    assert vm.write(BASE + PAGE, b"c").committed
    # repairing the entry repairs the page
    vm.memory.write_u64(hpa, raw)
    assert vm.write(BASE + 1, b"b").committed


def test_unprotect_applies_to_the_map_the_handler_left():
    """UNPROTECT widens the page's map as it is when the handler returns: a handler that
    lifted the page's protection itself and answered UNPROTECT used to have its change
    undone (the map read before the handler was written back, plus the touched bits)."""
    vm = Vm()
    vm.add_memslot(0, 0, 4 << 20)
    vm.enable_spp()
    vm.set_subpage_access(0x10, [0])

    def lift(ev):
        vm.set_subpage_access(ev.gfn, [0xFFFFFFFF])
        return Decision.UNPROTECT

    vm.on_violation(lift)
    assert vm.write(0x10000, b"x").committed
    assert vm.get_subpage_access(0x10, 1) == [0xFFFFFFFF]
    vm.set_subpage_access(0x10, [0b100])  # the handler narrows instead: its map, widened
    vm.on_violation(lambda ev: vm.set_subpage_access(ev.gfn, [0b1100]) or Decision.UNPROTECT)
    assert vm.write(0x10000, b"y").committed
    assert vm.get_subpage_access(0x10, 1) == [0b1101]


@pytest.mark.parametrize("change", ["delete_memslot", "disable_spp", "add_memslot"])
@pytest.mark.parametrize("decision", [Decision.EMULATE, Decision.UNPROTECT])
def test_a_handler_that_changes_the_memory_layout_abandons_the_write(change, decision):
    """The write's host targets were found before the handler ran: a handler that adds,
    deletes or moves a memslot or turns SPP off makes the write raise, nothing landing
    (EMULATE after delete_memslot used to write into freed host frames; UNPROTECT after
    disable_spp failed an assertion)."""
    vm = Vm()
    vm.add_memslot(0, 0, 4 << 20)
    vm.enable_spp()
    vm.set_subpage_access(0x10, [0])
    do = {"delete_memslot": lambda: vm.delete_memslot(0), "disable_spp": vm.disable_spp,
          "add_memslot": lambda: vm.add_memslot(1, 1 << 30, 4096)}[change]
    vm.on_violation(lambda ev: (do(), decision)[1])
    with pytest.raises(VmmError, match="the violation handler for the write at gpa=0x10000 added, deleted or moved"):
        vm.write(0x10000, b"x")
    if change != "delete_memslot":
        assert vm.read(0x10000, 1) == b"\0"


def test_page_crossing_write_gla_wraps_at_2_to_the_64():
    """The second page's linear address is the first's + its length, modulo 2**64 (a
    GLA of 2**64 - 4 used to give the second page's event a GLA of 2**64)."""
    vm = Vm()
    vm.add_memslot(0, 0, 4 << 20)
    vm.enable_spp()
    vm.set_subpage_access(0x11, [0])
    r = vm.write(0x11000 - 4, b"12345678", gla=(1 << 64) - 4)
    assert r.events[0].gpa == 0x11000 and r.events[0].gla == 0
