"""Stateful property test of ``sppkit.Vm`` against a plain-Python model.

The model keeps, per memslot, its guest-physical range, flags, contents (a bytearray per
written page), its 32-bit access maps (when SPP is on) and its dirty bits.  Rules add,
delete and move memslots, enable/disable SPP, set/get access maps (sometimes invalid),
read dirty logs and write (1..300 bytes, page-crossing included) with a handler whose
decisions are drawn by hypothesis.  After every step the VM must agree with the model:
memory, maps, dirty bits and the EPT leaf of every page of the window.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from sppkit import Decision, Vm
from sppkit.arch import EPT_SPP, Level
from sppkit.vmm import (
    GfnNotInMemslot,
    GfnReadOnly,
    GpaNotMapped,
    MemslotError,
    SppError,
    SppNotEnabled,
)
from sppkit.vmm.ept_manager import EPT_SPP_SAVED

PAGE = 4096
FULL = 0xFFFFFFFF
REGION_2M = 1 << 21
#: The window: 48 pages starting 8 pages below a 2-MiB boundary (page 8 is 2-MiB aligned),
#: so small slots straddle the boundary and a 512-page slot at page 8 gets a PDE leaf.
W0 = 0x400000 - 8 * PAGE
WINDOW_PAGES = 48
SLOT_IDS = (0, 1, 2, 3)
DECISIONS = (Decision.EMULATE, Decision.UNPROTECT, Decision.SKIP, Decision.UNPROTECT, Decision.EMULATE, Decision.STOP)


def touched_bits(off: int, n: int) -> int:
    first, last = off >> 7, (off + n - 1) >> 7
    return ((1 << (last + 1)) - 1) & ~((1 << first) - 1)


class ModelSlot:
    def __init__(self, sid: int, gpa: int, npages: int, readonly: bool, dirty_log: bool, spp: bool) -> None:
        self.sid, self.gpa, self.npages = sid, gpa, npages
        self.readonly, self.dirty_log = readonly, dirty_log
        self.pages: dict[int, bytearray] = {}
        self.maps: list[int] | None = [FULL] * npages if spp else None
        self.dirty = [False] * npages

    @property
    def end(self) -> int:
        return self.gpa + self.npages * PAGE

    def page(self, i: int) -> bytearray:
        if i not in self.pages:
            self.pages[i] = bytearray(PAGE)
        return self.pages[i]


map_values = st.one_of(
    st.sampled_from([0, FULL, 0xFFFFFFFE, 0x7FFFFFFF, 0x0000FFFF, 0xFFFF0000, 0x55555555, 1 << 31, 1]),
    st.integers(0, FULL),
)
bad_map_values = st.sampled_from([1 << 32, -1, (1 << 32) + 5])


class VmMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.vm: Vm | None = None
        self.slots: dict[int, ModelSlot] = {}
        self.mode: str | None = None
        self.pending: list[Decision] = []
        self.asked: list[int] = []

    # ------------------------------------------------------------------ helpers
    def find(self, gpa: int) -> ModelSlot | None:
        for s in self.slots.values():
            if s.gpa <= gpa < s.end:
                return s
        return None

    def overlaps(self, gpa: int, npages: int, ignore: int | None = None) -> bool:
        end = gpa + npages * PAGE
        return any(s.sid != ignore and s.gpa < end and gpa < s.end for s in self.slots.values())

    def handler(self, ev):
        self.asked.append(ev.gfn)
        return self.pending.pop(0)

    # ------------------------------------------------------------------ rules
    @initialize(
        cache=st.booleans(),
        ept_ad=st.booleans(),
        mode=st.sampled_from(["lazy", "eager", "lazy", "eager", None]),
        page=st.integers(0, 23),
        npages=st.sampled_from([1, 2, 3, 4, 512]),
        dirty_log=st.booleans(),
    )
    def start(self, cache, ept_ad, mode, page, npages, dirty_log):
        self.vm = Vm(cache=cache, ept_ad=ept_ad)
        self.vm.on_violation(self.handler)
        self.add_memslot(0, page, npages, False, dirty_log)
        if mode is not None:
            self.enable_spp(mode)

    def pick_gpa(self, data, *, protected_bias: bool = False) -> int:
        """A page of the window: usually one inside an existing slot (for writes, often a
        protected page or the page before one, so page-crossing writes meet protection)."""
        in_slots = [(s.gpa - W0) // PAGE + i for s in self.slots.values() for i in range(min(s.npages, 40))]
        in_slots = sorted(p for p in set(in_slots) if p < WINDOW_PAGES)
        prot = []
        if protected_bias:
            prot = sorted(
                {(s.gpa - W0) // PAGE + i + d for s in self.slots.values() if s.maps is not None
                 for i, m in enumerate(s.maps[:40]) if m != FULL for d in (0, 0, -1)}
            )
            prot = [p for p in prot if 0 <= p < WINDOW_PAGES]
        kind = data.draw(st.sampled_from(["protected", "slot", "protected", "slot", "protected", "slot", "window"]))
        if kind == "protected" and prot:
            page = data.draw(st.sampled_from(prot))
        elif kind != "window" and in_slots:
            page = data.draw(st.sampled_from(in_slots))
        else:
            page = data.draw(st.integers(0, WINDOW_PAGES - 1))
        return W0 + page * PAGE

    @rule(
        sid=st.sampled_from(SLOT_IDS),
        page=st.integers(0, 23),
        npages=st.sampled_from([1, 1, 2, 3, 4, 512]),
        readonly=st.booleans(),
        dirty_log=st.booleans(),
    )
    def add_memslot(self, sid, page, npages, readonly, dirty_log):
        readonly = readonly and npages < 512 and page % 3 == 0  # a few read-only slots
        gpa = W0 + page * PAGE
        if sid in self.slots or self.overlaps(gpa, npages):
            with pytest.raises(MemslotError):
                self.vm.add_memslot(sid, gpa, npages * PAGE, readonly=readonly, dirty_log=dirty_log)
            return
        self.vm.add_memslot(sid, gpa, npages * PAGE, readonly=readonly, dirty_log=dirty_log)
        self.slots[sid] = ModelSlot(sid, gpa, npages, readonly, dirty_log, self.mode is not None)

    @rule(sid=st.sampled_from(SLOT_IDS), go=st.integers(0, 2))
    def delete_memslot(self, sid, go):
        if go:  # hypothesis favours argument-free rules: keep memslot churn moderate
            return
        if sid not in self.slots:
            with pytest.raises(MemslotError, match=str(sid)):
                self.vm.delete_memslot(sid)
            return
        self.vm.delete_memslot(sid)
        del self.slots[sid]

    @rule(sid=st.sampled_from(SLOT_IDS), page=st.integers(0, 23))
    def move_memslot(self, sid, page):
        gpa = W0 + page * PAGE
        s = self.slots.get(sid)
        if s is None or self.overlaps(gpa, s.npages, ignore=sid):
            with pytest.raises(MemslotError):
                self.vm.move_memslot(sid, gpa)
            return
        self.vm.move_memslot(sid, gpa)
        s.gpa = gpa

    @rule(mode=st.sampled_from(["lazy", "eager"]))
    def enable_spp(self, mode):
        if self.mode is not None and mode != self.mode:
            with pytest.raises(SppError):
                self.vm.enable_spp(mode)
            return
        assert self.vm.enable_spp(mode) == 512
        if self.mode is None:
            self.mode = mode
            for s in self.slots.values():
                s.maps = [FULL] * s.npages

    @rule(go=st.integers(0, 9))
    def disable_spp(self, go):
        if go:  # see delete_memslot
            return
        if self.mode is None:
            with pytest.raises(SppNotEnabled):
                self.vm.disable_spp()
            return
        self.vm.disable_spp()
        self.mode = None
        for s in self.slots.values():
            s.maps = None

    @rule(
        data=st.data(),
        maps=st.lists(map_values, min_size=1, max_size=3),
        bad=st.one_of(st.none(), st.none(), st.none(), st.none(), st.tuples(st.integers(0, 3), bad_map_values)),
    )
    def set_subpage_access(self, data, maps, bad):
        gfn_base = self.pick_gpa(data) >> 12
        if bad is not None:
            maps = list(maps)
            maps[bad[0] % len(maps)] = bad[1]
        expected: list[type] = []
        if self.mode is None:
            expected.append(SppNotEnabled)
        else:
            for k, amap in enumerate(maps):
                if not 0 <= amap <= FULL:
                    expected.append(ValueError)
                s = self.find((gfn_base + k) << 12)
                if s is None:
                    expected.append(GfnNotInMemslot)
                elif s.readonly and 0 <= amap < FULL:
                    expected.append(GfnReadOnly)
        if expected:
            before = self.snapshot()
            event(f"set_subpage_access fails: {sorted(e.__name__ for e in set(expected))}")
            with pytest.raises((SppError, ValueError)) as ei:
                self.vm.set_subpage_access(gfn_base, maps)
            assert isinstance(ei.value, tuple(expected)), (ei.value, expected)
            assert self.snapshot() == before, "a failed set_subpage_access changed the VM"
            return
        event("set_subpage_access ok")
        assert self.vm.set_subpage_access(gfn_base, maps) == 0
        for k, amap in enumerate(maps):
            s = self.find((gfn_base + k) << 12)
            s.maps[((gfn_base + k) << 12) - s.gpa >> 12] = amap

    @rule(data=st.data(), npages=st.integers(0, 5))
    def get_subpage_access(self, data, npages):
        gfn_base = self.pick_gpa(data) >> 12
        if self.mode is None:
            with pytest.raises(SppNotEnabled):
                self.vm.get_subpage_access(gfn_base, npages)
            return
        want = []
        for k in range(npages):
            s = self.find((gfn_base + k) << 12)
            if s is None:
                with pytest.raises(GfnNotInMemslot):
                    self.vm.get_subpage_access(gfn_base, npages)
                return
            want.append(s.maps[((gfn_base + k) << 12) - s.gpa >> 12])
        assert self.vm.get_subpage_access(gfn_base, npages) == want

    @rule(sid=st.sampled_from(SLOT_IDS))
    def get_dirty_log(self, sid):
        s = self.slots.get(sid)
        if s is None or not s.dirty_log:
            with pytest.raises(MemslotError):
                self.vm.get_dirty_log(sid)
            return
        bitmap = self.vm.get_dirty_log(sid)
        want = bytearray((s.npages + 7) // 8)
        for i, d in enumerate(s.dirty):
            if d:
                want[i // 8] |= 1 << (i % 8)
        assert bitmap == bytes(want)
        s.dirty = [False] * s.npages
        assert self.vm.get_dirty_log(sid) == bytes(len(want)), "get_dirty_log must clear the bitmap"

    @rule(
        draw=st.data(),
        shape=st.sampled_from(["cross", "any", "cross", "subpage"]),
        data=st.binary(min_size=1, max_size=300),
        decisions=st.lists(st.sampled_from(DECISIONS), min_size=2, max_size=2),
    )
    def write(self, draw, shape, data, decisions):
        n = len(data)
        if shape == "cross" and n > 1:  # crosses the 4-KiB boundary
            off = PAGE - draw.draw(st.integers(1, n - 1))
        elif shape == "subpage":  # starts near a 128-byte boundary
            off = draw.draw(st.integers(0, 31)) * 128 - draw.draw(st.integers(0, 8))
            off %= PAGE
        else:
            off = draw.draw(st.integers(0, PAGE - 1))
        gpa = self.pick_gpa(draw, protected_bias=True) + off
        page = (gpa - W0) // PAGE
        n = len(data)
        frags = [(gpa, n, 0)] if off + n <= PAGE else [(gpa, PAGE - off, 0), (gpa + PAGE - off, n - (PAGE - off), PAGE - off)]
        # -- the model's decision, page by page in address order
        self.pending = list(decisions)
        self.asked = []
        events: list[int] = []
        outcome = "commit"  # or "skip", "stop", "readonly", "unmapped"
        last_decision = None
        # A page in no memslot: the write raises before anything changes (no handler
        # call, no dirty bit, no statistics), whichever page it is.
        if any(self.find(fgpa) is None for fgpa, _, _ in frags):
            outcome = "unmapped"
            frags = []
        for fgpa, fn, _ in frags:
            s = self.find(fgpa)
            assert s is not None
            if s.readonly:
                outcome = "readonly"
                break
            i = (fgpa - s.gpa) >> 12
            if s.dirty_log:
                s.dirty[i] = True  # the write-protection fault marks it, whatever SPP decides
            amap = s.maps[i] if s.maps is not None else FULL
            need = touched_bits(fgpa & 0xFFF, fn)
            if amap & need == need:
                continue
            d = decisions[len(events)]
            events.append(fgpa >> 12)
            last_decision = d
            if d in (Decision.SKIP, Decision.STOP):
                outcome = d.value
                break
            if d is Decision.UNPROTECT:
                s.maps[i] = amap | need
        event(f"write: {outcome}, {len(frags)} page(s), {len(events)} violation(s)")
        before = {p: self.vm.read(W0 + p * PAGE, PAGE) if self.find(W0 + p * PAGE) else None for p in (page, page + 1)}

        if outcome == "unmapped":
            stats = self.vm.stats()
            with pytest.raises(GpaNotMapped):
                self.vm.write(gpa, data, rip=0x1000, gla=0x7000_0000 + off)
            assert self.vm.stats() == stats, "a write that raised changed the statistics"
        else:
            r = self.vm.write(gpa, data, rip=0x1000, gla=0x7000_0000 + off)
            assert r.committed == (outcome == "commit"), (r, outcome)
            assert r.readonly == (outcome == "readonly")
            assert r.stopped == (outcome == "stop")
            assert [e.gfn for e in r.events] == events
            if events:
                assert r.decision is last_decision
                assert r.events[0].write_gpa == gpa and r.events[0].write_size == n
            else:
                assert r.decision is None
        assert self.asked == events, "the handler must be asked once per denying page, in address order"
        if outcome == "commit":
            for fgpa, fn, doff in frags:
                s = self.find(fgpa)
                i = (fgpa - s.gpa) >> 12
                o = fgpa & 0xFFF
                s.page(i)[o : o + fn] = data[doff : doff + fn]
            assert self.vm.read(gpa, n) == data
        else:
            for p, b in before.items():
                if b is not None:
                    assert self.vm.read(W0 + p * PAGE, PAGE) == b, "a write that did not commit changed memory"

    # more writes and permission changes than memslot churn
    write_again = write
    write_once_more = write
    set_subpage_access_again = set_subpage_access

    # ------------------------------------------------------------------ invariants
    def snapshot(self):
        vm = self.vm
        frames = {k: bytes(v) for k, v in vm.memory._frames.items()}
        maps = {m.slot: None if m.maps is None else dict(m.maps) for m in vm.memslots()}
        return frames, maps

    @invariant()
    def memory_matches(self):
        if self.vm is None:
            return
        for s in self.slots.values():
            for i in set(s.pages) | {0, s.npages - 1}:
                want = bytes(s.pages.get(i, bytes(PAGE)))
                assert self.vm.read(s.gpa + i * PAGE, PAGE) == want, f"slot {s.sid} page {i}"

    @invariant()
    def maps_match(self):
        if self.vm is None:
            return
        assert self.vm.spp_enabled == (self.mode is not None)
        if self.mode is None:
            return
        for s in self.slots.values():
            for k in range(0, s.npages, 512):
                got = self.vm.get_subpage_access((s.gpa >> 12) + k, min(512, s.npages - k))
                assert got == s.maps[k : k + 512], f"slot {s.sid}"

    @invariant()
    def ept_matches(self):
        if self.vm is None:
            return
        vm = self.vm
        by_id = {m.slot: m for m in vm.memslots()}
        assert set(by_id) == set(self.slots)
        for p in range(WINDOW_PAGES + 1):
            g = W0 + p * PAGE
            s = self.find(g)
            leaf = vm.ept.builder.leaf(g)
            if s is None:
                assert leaf is None, f"gpa {g:#x} outside every memslot is mapped"
                continue
            assert leaf is not None, f"gpa {g:#x} in slot {s.sid} has no EPT leaf"
            level, _, raw = leaf
            i = (g - s.gpa) >> 12
            hpa = by_id[s.sid].hpa + i * PAGE
            assert raw & ((1 << 46) - 1) & ~(level.page_size - 1) == hpa & ~(level.page_size - 1)
            prot = s.maps is not None and s.maps[i] != FULL
            armed = s.dirty_log and not s.dirty[i] and not s.readonly
            w = bool(raw & 2)
            if s.readonly:
                assert not w and not raw & EPT_SPP
            elif prot:
                assert level == Level.PTE and not w, f"protected gfn {g >> 12:#x}: {raw:#x}"
                assert bool(raw & EPT_SPP) == (not armed) and bool(raw & EPT_SPP_SAVED) == armed
            else:
                assert w == (not armed) and not raw & EPT_SPP and not raw & EPT_SPP_SAVED, f"{g:#x}: {raw:#x}"
        # huge pages: a 512-page slot on a 2-MiB aligned gpa and hpa, with no protected page
        # and no dirty logging, is mapped by one PDE leaf (split on demand, merged back)
        for s in self.slots.values():
            m = by_id[s.sid]
            if s.npages == 512 and s.gpa % REGION_2M == 0 and m.hpa % REGION_2M == 0:
                level = vm.ept.builder.leaf(s.gpa)[0]
                prot = s.maps is not None and any(x != FULL for x in s.maps)
                if s.dirty_log or prot:
                    assert level == Level.PTE
                else:
                    assert level == Level.PDE, f"slot {s.sid}: not merged back"

    @invariant()
    def stats_serialisable(self):
        if self.vm is not None:
            json.dumps(self.vm.stats())


VmMachine.TestCase.settings = settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestVmStateMachine = VmMachine.TestCase
