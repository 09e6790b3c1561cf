"""The KVM engine on real guests: violations, decisions, emulator limits, memslot projection.

The engine keeps every page whose EPT leaf has W = 0 in a read-only KVM memslot, so
each guest store to it is an MMIO exit handed to ``vm.write``; the store has retired
when the VMM decides (README, "Two engines, one write path").  Every test runs a real
x86-64 guest under /dev/kvm; they skip with ``kvm_status()``'s reason when KVM is not
usable and with ``toolchain_status()``'s reason when the guests cannot be built.

CPL 0 guest code is emulated by KVM on the development machines (PVM, ~1M
instructions/s), so the CPL 0 runs are the small guests.
"""

from __future__ import annotations

import re
import struct
import time
from pathlib import Path

import pytest
from kvm_engine_helpers import (
    FULL,
    PAGE,
    PAGES_C,
    PORT_C,
    REPEAT_C,
    SPAN_C,
    SPIN_C,
    STOP_C,
    SUBPAGE,
    UNEMULATABLE_C,
    build_source,
    bundled,
    requires_gcc,
    requires_kvm,
    run_engine,
)

from sppkit.engines import EngineError
from sppkit.engines.x86 import decode
from sppkit.policy import Policy, load_policy
from sppkit.vmm import Decision

pytestmark = [requires_kvm, requires_gcc]

REPO = Path(__file__).resolve().parents[3]
MIXED_POLICY = REPO / "examples" / "mixed.toml"
RAM = 64 << 20


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kvm-guests")


def u32(b: bytes) -> int:
    return struct.unpack("<I", b)[0]


def check_instruction(run, v) -> None:
    """The recovered instruction is the one that ends exactly at RIP-after."""
    assert v.rip_at is not None and v.rip_after is not None, v
    d = decode(run.engine.vm.read(v.rip_at, 15), v.rip_at)
    assert d is not None and d.writes_memory, v
    assert v.rip_at + d.length == v.rip_after, v
    assert d.text == v.instruction


# =========================================================================== 1. real guests
class TestSelftest:
    """The KVM SPP selftest: 32 sub-pages of one page, one 4-byte store each."""

    @pytest.mark.parametrize("cpl", [3, 0])
    def test_whole_page_protected_skip_gives_one_violation_per_subpage(self, cpl):
        img = bundled("selftest")
        page = img.symbol("protected_page").addr
        run = run_engine(img, policy=Policy.from_ranges([(page, PAGE)], "skip"), cpl=cpl,
                         keep=((page, PAGE), (img.symbol("stuck").addr, 4)))
        r = run.result
        assert (r.stop_reason, r.exit_code) == ("exit", 0)
        assert "selftest: 0/32 writes stuck, 32 blocked" in r.console
        assert u32(run.memory[img.symbol("stuck").addr]) == 0
        assert run.memory[page] == bytes(PAGE)  # nothing landed
        assert len(r.violations) == 32
        for i, v in enumerate(r.violations):
            assert (v.gpa, v.size, v.subpages, v.denied, v.decision) == (page + i * SUBPAGE, 4, (i,), (i,), "skip")
            assert bytes.fromhex(v.data) == struct.pack("<I", 0x5A5A0000 | i)
            assert v.old == "00000000"
            assert v.symbol == ("protected_page" if i == 0 else f"protected_page+{i * SUBPAGE:#x}")
            assert "mov" in v.instruction
            check_instruction(run, v)
        assert r.stats["violations"] == 32 and r.stats["decisions"]["skip"] == 32
        assert r.exits["Mmio"] == 32

    def test_no_policy_all_32_stick_and_nothing_exits(self):
        img = bundled("selftest")
        run = run_engine(img, keep=((img.symbol("stuck").addr, 4),))
        r = run.result
        assert (r.stop_reason, r.exit_code) == ("exit", 0)
        assert "selftest: 32/32 writes stuck, 0 blocked" in r.console
        assert u32(run.memory[img.symbol("stuck").addr]) == 32
        assert r.violations == [] and run.writes == []
        assert "Mmio" not in r.exits
        assert run.engine.kvm_memslots == [(0, RAM, True)]


class TestMixed:
    """The mixed workload: rare protected writes among many unprotected ones on the same pages."""

    SYMBOL = re.compile(r"^(secret|config|canary)(\+0x[0-9a-f]+)?$")

    def _check(self, run, img, iterations: int) -> None:
        r = run.result
        assert (r.stop_reason, r.exit_code) == ("exit", 0), r.console
        m = re.search(r"mixed: protected writes = (\d+)", r.console)
        assert m, r.console
        reported = int(m.group(1))
        per = {k: struct.unpack("<Q", run.memory[img.symbol(f"writes_{k}").addr])[0]
               for k in ("secret", "config", "canary")}
        assert sum(per.values()) == reported
        expect = {"secret": iterations // 64, "config": iterations // 256, "canary": iterations // 512}
        assert per == expect
        assert len(r.violations) == reported
        by_symbol = {k: 0 for k in per}
        for v in r.violations:
            m = self.SYMBOL.match(v.symbol or "")
            assert m, v
            by_symbol[m.group(1)] += 1
            assert "mov" in v.instruction, v
            assert v.decision == "skip"
            check_instruction(run, v)
            text = next(s for s in img.segments if s.executable)
            assert text.contains(v.rip_at), v
        assert by_symbol == per
        # SKIP: the protected structures still hold their initial contents
        data = next(s for s in img.segments if s.writable)
        for name in ("secret", "config", "canary"):
            sym = img.symbol(name)
            initial = data.image()[sym.addr - data.gpa: sym.addr - data.gpa + sym.size]
            assert run.memory[sym.addr] == initial, name
        # the hot data around them was written natively: only protected pages trapped
        protected_pages = {img.symbol(n).addr >> 12 for n in ("secret", "config", "canary")}
        assert {g >> 12 for g, _, _ in run.writes} <= protected_pages

    def _keep(self, img):
        names = ("writes_secret", "writes_config", "writes_canary", "secret", "config", "canary")
        return tuple((img.symbol(n).addr, img.symbol(n).size) for n in names)

    def test_cpl3_example_policy(self):
        img = bundled("mixed")
        run = run_engine(img, policy=load_policy(MIXED_POLICY, img), keep=self._keep(img))
        self._check(run, img, 2048)
        assert len(run.result.violations) == 44

    def test_cpl0_short_run(self):
        img = bundled("mixed")
        it = img.symbol("param_iterations").addr
        run = run_engine(img, policy=load_policy(MIXED_POLICY, img), cpl=0, keep=self._keep(img),
                         before_run=lambda eng: eng.vm.load(it, struct.pack("<Q", 512)))
        self._check(run, img, 512)
        assert len(run.result.violations) == 8 + 2 + 1


# =========================================================================== 3. decisions
class TestDecisions:
    def test_stop_ends_the_run_before_the_write_lands(self, cache):
        img = build_source(STOP_C, "stop", cache)
        area = img.symbol("area").addr
        run = run_engine(img, policy=Policy.from_ranges([(area, SUBPAGE)], "stop"), keep=((area, 64),))
        r = run.result
        assert r.stop_reason == "stop-decision"
        assert r.exit_code is None
        assert r.console == "before\n"  # the guest did not go on
        assert run.memory[area] == bytes(64)  # memory not written
        (v,) = r.violations
        assert (v.gpa, v.size, v.decision) == (area + 0x10, 8, "stop")
        assert bytes.fromhex(v.data) == struct.pack("<Q", 0x1122334455667788)
        assert r.rip_after is not None and r.rip_after == v.rip_after
        assert r.rip_at == v.rip_at
        check_instruction(run, v)
        assert r.stats["decisions"]["stop"] == 1

    def test_stop_at_cpl0(self, cache):
        img = build_source(STOP_C, "stop", cache)
        area = img.symbol("area").addr
        run = run_engine(img, policy=Policy.from_ranges([(area, SUBPAGE)], "stop"), cpl=0, keep=((area, 64),))
        assert (run.result.stop_reason, run.result.exit_code) == ("stop-decision", None)
        assert run.memory[area] == bytes(64)

    def test_emulate_commits_and_keeps_protecting(self, cache):
        """Every one of the K stores is a violation (the protection stays) and every one lands."""
        k = 7
        img = build_source(REPEAT_C, "repeat", cache, (f"-DREPEAT={k}",))
        area = img.symbol("area").addr
        run = run_engine(img, policy=Policy.from_ranges([(area + 0x100, 4)], "emulate"), keep=((area + 0x100, 4),))
        r = run.result
        assert (r.stop_reason, r.exit_code) == ("exit", k)
        assert f"repeat: {k} stuck" in r.console
        assert len(r.violations) == k
        assert [v.decision for v in r.violations] == ["emulate"] * k
        assert [bytes.fromhex(v.data) for v in r.violations] == [struct.pack("<I", 0xC0DE0000 | i)
                                                                 for i in range(1, k + 1)]
        # `old` is what the previous (emulated) store left there
        assert [v.old for v in r.violations] == ["00000000"] + [struct.pack("<I", 0xC0DE0000 | i).hex()
                                                                for i in range(1, k)]
        assert u32(run.memory[area + 0x100]) == 0xC0DE0000 | k
        assert r.stats["decisions"]["emulate"] == k
        assert run.engine.vm.get_subpage_access(area >> 12, 1) == [FULL & ~(1 << 2)]
        assert (area, PAGE, False) in run.engine.kvm_memslots

    def test_skip_discards_every_time(self, cache):
        k = 5
        img = build_source(REPEAT_C, "repeat", cache, (f"-DREPEAT={k}",))
        area = img.symbol("area").addr
        run = run_engine(img, policy=Policy.from_ranges([(area + 0x100, 4)], "skip"), keep=((area + 0x100, 4),))
        r = run.result
        assert (r.stop_reason, r.exit_code) == ("exit", 0)
        assert len(r.violations) == k and {v.decision for v in r.violations} == {"skip"}
        assert {v.old for v in r.violations} == {"00000000"}
        assert run.memory[area + 0x100] == bytes(4)

    def test_allowed_subpage_of_a_protected_page_exits_and_commits(self, cache):
        """A store to a writable sub-page of a protected page still exits (the whole page
        is a read-only memslot) and vm.write commits it: no violation."""
        k = 4
        img = build_source(REPEAT_C, "repeat", cache, (f"-DREPEAT={k}",))
        area = img.symbol("area").addr
        run = run_engine(img, policy=Policy.from_ranges([(area + 31 * SUBPAGE, SUBPAGE)], "stop"))
        r = run.result
        assert (r.stop_reason, r.exit_code, r.violations) == ("exit", k, [])
        assert [(g, n) for g, n, _ in run.writes] == [(area + 0x100, 4)] * k
        assert r.exits["Mmio"] == k

    @pytest.mark.parametrize("decision", ["emulate", "stop"])
    def test_decision_comes_from_the_denied_subpage(self, cache, decision):
        img = build_source(SPAN_C, "span", cache)
        area = img.symbol("area").addr
        run = run_engine(img, policy=Policy.from_ranges([(area + SUBPAGE, SUBPAGE)], decision),
                         keep=((area + 0x7C, 8),))
        (v,) = run.result.violations
        assert (v.gpa, v.size, v.denied) == (area + 0x7C, 8, (1,))
        assert v.decision == decision
        if decision == "emulate":
            assert run.memory[area + 0x7C] == struct.pack("<Q", 0x1122334455667788)
        else:
            assert run.result.stop_reason == "stop-decision"


# =========================================================================== 4. emulator limits
class TestEmulatorLimits:
    """KVM's instruction emulator cannot perform some stores to a read-only memslot
    (emulate.c: cmpxchg16b, fxsave/xsave, AVX and x87 stores): the run must end with
    an EngineError naming the instruction and the GPA, never hang."""

    @pytest.mark.parametrize(("mode", "mnemonic", "offset", "cpl"), [
        (1, "fxsave64", 0x100, 3),
        (2, "cmpxchg16b", 0x200, 3),
        (1, "fxsave64", 0x100, 0),
    ])
    def test_unemulatable_store_on_a_protected_page_is_an_error(self, cache, mode, mnemonic, offset, cpl):
        img = build_source(UNEMULATABLE_C, "unemulatable", cache, (f"-DMODE={mode}",))
        area = img.symbol("area").addr
        # the store's own sub-page is even writable: the page is read-only all the same
        policy = Policy.from_ranges([(area + 31 * SUBPAGE, SUBPAGE)])
        t0 = time.monotonic()
        with pytest.raises(EngineError) as ei:
            run_engine(img, policy=policy, cpl=cpl, timeout=20)
        assert time.monotonic() - t0 < 15
        msg = str(ei.value)
        assert mnemonic in msg
        assert f"gpa={area + offset:#x}" in msg
        assert "emulat" in msg

    @pytest.mark.parametrize("mode", [1, 2])
    def test_the_same_store_on_an_unprotected_page_runs(self, cache, mode):
        img = build_source(UNEMULATABLE_C, "unemulatable", cache, (f"-DMODE={mode}",))
        area = img.symbol("area").addr
        far = (area + 16 * PAGE)  # protect something else entirely
        run = run_engine(img, policy=Policy.from_ranges([(far, SUBPAGE)]))
        assert (run.result.stop_reason, run.result.exit_code) == ("exit", 0)
        assert "unemulatable: done" in run.result.console

    @pytest.mark.parametrize("cpl", [3, 0])
    def test_page_crossing_store_is_decided_per_page(self, cache, cpl):
        """Both pages protected: two MMIO exits, two violations, one per page."""
        img = build_source(UNEMULATABLE_C, "unemulatable", cache, ("-DMODE=3",))
        area = img.symbol("area").addr
        run = run_engine(img, policy=Policy.from_ranges([(area, 2 * PAGE)]), cpl=cpl, keep=((area + PAGE - 4, 8),))
        r = run.result
        assert (r.stop_reason, r.exit_code) == ("exit", 0)
        assert [(v.gpa, v.size, v.denied) for v in r.violations] == [(area + PAGE - 4, 4, (31,)),
                                                                    (area + PAGE, 4, (0,))]
        assert [bytes.fromhex(v.data) for v in r.violations] == [bytes.fromhex("88776655"),
                                                                 bytes.fromhex("44332211")]
        assert len({v.rip_after for v in r.violations}) == 1
        assert r.exits["Mmio"] == 2
        for v in r.violations:
            assert v.instruction.startswith("mov")
            check_instruction(run, v)
        assert run.memory[area + PAGE - 4] == bytes(8)
        assert [(g, n) for g, n, _ in run.writes] == [(area + PAGE - 4, 4), (area + PAGE, 4)]

    def test_page_crossing_store_half_protected(self, cache):
        """Only the second page protected: its half is a violation and is discarded; the
        first half lands natively (README: decided per page)."""
        img = build_source(UNEMULATABLE_C, "unemulatable", cache, ("-DMODE=3",))
        area = img.symbol("area").addr
        run = run_engine(img, policy=Policy.from_ranges([(area + PAGE, SUBPAGE)]), keep=((area + PAGE - 4, 8),))
        r = run.result
        assert [(v.gpa, v.size) for v in r.violations] == [(area + PAGE, 4)]
        assert run.memory[area + PAGE - 4] == bytes.fromhex("88776655") + bytes(4)

    @pytest.mark.parametrize("cpl", [3, 0])
    def test_a_guest_that_never_exits_times_out(self, cache, cpl):
        img = build_source(SPIN_C, "spin", cache)
        t0 = time.monotonic()
        run = run_engine(img, cpl=cpl, timeout=0.5)
        assert time.monotonic() - t0 < 10
        assert run.result.stop_reason == "timeout"
        assert run.result.exit_code is None
        assert run.result.console == "spin\n"


# =========================================================================== 5. projection
def _check_partition(slots, ram: int = RAM) -> None:
    """The memslots tile guest RAM exactly: sorted, contiguous, non-overlapping."""
    pos = 0
    for gpa, size, _w in slots:
        assert gpa == pos and size > 0
        pos += size
    assert pos == ram


class TestProjection:
    def test_initial_projection_mirrors_the_ept(self, cache):
        img = build_source(PAGES_C, "pages", cache)
        arr = img.symbol("arr").addr
        # even pages: sub-page 0 protected (offset 8 lies in it); odd pages untouched
        policy = Policy.from_ranges([(arr + 2 * i * PAGE, SUBPAGE) for i in range(32)])
        run = run_engine(img, policy=policy)
        eng, r = run.engine, run.result
        slots = eng.kvm_memslots
        _check_partition(slots)
        assert slots == [tuple(x) for x in eng.vm.write_protected(0, RAM)]
        assert [g for g, n, w in slots if not w] == [arr + 2 * i * PAGE for i in range(32)]
        assert all(n == PAGE for g, n, w in slots if not w)
        assert len(slots) == 65 <= eng.max_memslots
        assert (r.stop_reason, r.exit_code) == ("exit", 32)
        assert [v.gpa for v in r.violations] == [arr + 2 * i * PAGE + 8 for i in range(32)]
        assert [g for g, _, _ in run.writes] == [arr + 2 * i * PAGE + 8 for i in range(32)]

    def test_unprotect_decisions_reproject_the_memslots(self):
        """An UNPROTECT decision opens the touched sub-page; once the page is fully
        writable it leaves its read-only memslot, and the guest's later stores run natively."""
        from sppkit.engines.kvm.engine import KvmEngine

        class Unprotecting(KvmEngine):
            def _on_violation(self, ev):
                super()._on_violation(ev)
                return Decision.UNPROTECT

        img = bundled("selftest")
        page = img.symbol("protected_page").addr
        far = 0x800000  # a protected page the guest never touches
        policy = Policy.from_ranges([(page, PAGE), (far, SUBPAGE)])
        seen = []

        def spy(eng):
            orig = eng._project

            def project():
                orig()
                seen.append(eng.kvm_memslots)
                assert len(eng.kvm_memslots) <= eng.max_memslots
            eng._project = project

        run = run_engine(img, policy=policy, engine_cls=Unprotecting, before_run=spy)
        eng, r = run.engine, run.result
        assert (r.stop_reason, r.exit_code) == ("exit", 0)
        assert "selftest: 32/32 writes stuck" in r.console
        assert [v.decision for v in r.violations] == ["unprotect"] * 32
        assert r.exits["Mmio"] == 32
        assert eng.vm.get_subpage_access(page >> 12, 1) == [FULL]
        assert eng.kvm_memslots == [(0, far, True), (far, PAGE, False), (far + PAGE, RAM - far - PAGE, True)]
        assert seen and seen[-1] == eng.kvm_memslots
        assert all((page, PAGE, False) in s for s in seen[:-1])  # protected until the last sub-page opened

    def test_too_many_memslots_is_an_error_naming_the_limit(self, cache, monkeypatch):
        from sppkit.engines.kvm import binding
        from sppkit.engines.kvm.engine import KvmEngine

        real = binding.Kvm.check_extension

        def fake(self, cap):
            return 5 if cap == binding.CAP_NR_MEMSLOTS else real(self, cap)

        monkeypatch.setattr(binding.Kvm, "check_extension", fake)
        img = build_source(PAGES_C, "pages", cache)
        arr = img.symbol("arr").addr
        ok = KvmEngine(img, policy=Policy.from_ranges([(arr, SUBPAGE), (arr + 2 * PAGE, SUBPAGE)]))
        try:  # 5 slots: RW, RO, RW, RO, RW - exactly the limit
            assert ok.max_memslots == 5 and len(ok.kvm_memslots) == 5
        finally:
            ok.close()
        with pytest.raises(EngineError, match=r"7 KVM memslots.*NR_MEMSLOTS \(5\)"):
            KvmEngine(img, policy=Policy.from_ranges([(arr + 2 * i * PAGE, SUBPAGE) for i in range(3)]))

    def test_protections_set_before_run_are_projected(self, cache):
        img = build_source(STOP_C, "stop", cache)
        area = img.symbol("area").addr
        run = run_engine(img, before_run=lambda eng: eng.vm.set_subpage_access(area >> 12, [FULL & ~1]),
                         keep=((area + 0x10, 8),))
        assert [v.gpa for v in run.result.violations] == [area + 0x10]
        assert run.memory[area + 0x10] == bytes(8)

    def test_protections_set_by_a_port_handler_are_projected(self, cache):
        img = build_source(PORT_C, "port", cache)
        area = img.symbol("area").addr

        def arm(eng):
            eng.add_port_handler(0x80, lambda e, value: e.vm.set_subpage_access(area >> 12, [FULL & ~1]))

        run = run_engine(img, before_run=arm, keep=((area + 0x10, 4),))
        assert [v.gpa for v in run.result.violations] == [area + 0x10]
        assert run.result.exit_code == 0
        assert u32(run.memory[area + 0x10]) == 0x11111111
