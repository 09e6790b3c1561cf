"""Guest OS monitoring: the WatchManager on a bare Vm, then `sppkit monitor` end to end
on the minikernel guest (and mixed), on Unicorn always and on KVM where usable."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sppkit.arch.sppt import FULL_ACCESS_MAP, vector_from_map
from sppkit.guests import build_guest, load_elf
from sppkit.usecases.monitor import (
    DEFAULT_SYMBOLS,
    MonitorError,
    UnknownSymbolError,
    WatchError,
    WatchManager,
    WatchTarget,
    compress_names,
    monitor_command,
    resolve_symbols,
    run_monitor,
)
from sppkit.vmm import Decision, Vm

from usecase_engines import ENGINES, GCC_OK, GCC_WHY, needs_gcc
PAGE = 0x10000  # gfn 0x10 of the bare Vm
TICKS = 480
POST = max(1, TICKS // 6)


# ====================================================================== a bare Vm
def amap(vm, gpa=PAGE):
    return vm.get_subpage_access(gpa >> 12, 1)[0]


class Recorder:
    def __init__(self, answer=None):
        self.events = []
        self.answer = answer

    def __call__(self, ev):
        self.events.append(ev)
        return self.answer


class TestWatchManagerRefcounts:
    def test_overlapping_watches_share_subpages_and_push_only_on_change(self, vm):
        wm = WatchManager(vm)
        a = wm.watch(PAGE + 0x10, 8, name="a")  # sub-page 0
        assert wm.pushes == 1 and amap(vm) == FULL_ACCESS_MAP & ~1
        assert vm.get_spp_vector(PAGE) == vector_from_map(FULL_ACCESS_MAP & ~1)
        b = wm.watch(PAGE + 0x40, 0x60, name="b")  # sub-pages 0 and 1: sub-page 1 is new
        assert wm.pushes == 2 and amap(vm) == FULL_ACCESS_MAP & ~3
        c = wm.watch(PAGE + 0x20, 4, name="c")  # sub-page 0 again: no change, no push
        assert wm.pushes == 2
        assert [wm.refcount(PAGE + o) for o in (0, 0x80, 0x100)] == [3, 1, 0]
        wm.unwatch(a)  # sub-page 0 still held by b and c
        assert wm.pushes == 2 and wm.refcount(PAGE) == 2
        wm.unwatch(b)  # sub-page 1 released
        assert wm.pushes == 3 and amap(vm) == FULL_ACCESS_MAP & ~1
        wm.unwatch(c)  # last: the page is unprotected again
        assert wm.pushes == 4 and amap(vm) == FULL_ACCESS_MAP
        assert wm.stats()["pages"] == 0 and wm.stats()["watches"] == 0

    def test_watch_spanning_pages(self, vm):
        wm = WatchManager(vm)
        w = wm.watch(PAGE + 0xFC0, 0x100, name="span")  # sub-page 31 of gfn 0x10, 0-1 of gfn 0x11
        assert w.subpages() == [(0x10, 31), (0x11, 0), (0x11, 1)]
        assert amap(vm) == FULL_ACCESS_MAP & ~(1 << 31)
        assert amap(vm, PAGE + 0x1000) == FULL_ACCESS_MAP & ~3
        assert wm.pushes == 2
        wm.unwatch(w)
        assert amap(vm) == amap(vm, PAGE + 0x1000) == FULL_ACCESS_MAP

    def test_unwatch_restores_a_previous_map(self, vm):
        vm.set_subpage_access(PAGE >> 12, [FULL_ACCESS_MAP & ~(1 << 5)])  # someone else's protection
        wm = WatchManager(vm)
        w = wm.watch(PAGE, 8)
        assert amap(vm) == FULL_ACCESS_MAP & ~(1 << 5) & ~1
        wm.unwatch(w)
        assert amap(vm) == FULL_ACCESS_MAP & ~(1 << 5)

    def test_unwatch_twice_is_an_error(self, vm):
        wm = WatchManager(vm)
        w = wm.watch(PAGE, 8)
        wm.unwatch(w)
        with pytest.raises(WatchError, match="not a watch of this manager"):
            wm.unwatch(w)

    def test_armed_false_pushes_nothing_until_arm(self, vm):
        wm = WatchManager(vm, armed=False)
        wm.watch(PAGE, 8)
        wm.watch(PAGE + 0x1000, 8)
        assert wm.pushes == 0 and amap(vm) == FULL_ACCESS_MAP
        assert vm.write(PAGE, b"12345678").committed and wm.violations == 0
        assert wm.arm() == 2 and amap(vm) == FULL_ACCESS_MAP & ~1
        assert wm.arm() == 0  # nothing changed
        assert wm.disarm() == 2 and amap(vm) == FULL_ACCESS_MAP

    def test_page_granular_protects_the_whole_page(self, vm):
        wm = WatchManager(vm, page_granular=True)
        wm.watch(PAGE + 0x100, 8)
        assert amap(vm) == 0
        r = vm.write(PAGE + 0x800, b"hot")  # far from the watch: exits, committed without a callback
        assert r.committed and r.decision is Decision.EMULATE
        assert wm.transparent == 1 and vm.read(PAGE + 0x800, 3) == b"hot"


class TestWatchManagerEvents:
    def test_callback_only_for_watched_bytes(self, vm):
        rec = Recorder("deny")
        wm = WatchManager(vm)
        wm.watch(PAGE + 0x10, 8, rec, name="field")
        # same sub-page, other bytes: an SPP violation, committed transparently, no callback
        r = vm.write(PAGE + 0x40, b"hot!")
        assert r.committed and r.decision is Decision.EMULATE and rec.events == []
        assert vm.read(PAGE + 0x40, 4) == b"hot!"
        assert wm.transparent == 1 and wm.transparent_by_subpage[(0x10, 0)] == 1
        # another sub-page: no violation at all
        assert vm.write(PAGE + 0x80, b"x").events == ()
        assert wm.violations == 1
        # the watched bytes: callback, denied
        vm.load(PAGE + 0x10, b"ORIGINAL")
        r = vm.write(PAGE + 0x14, b"EVIL")
        assert not r.committed and r.decision is Decision.SKIP
        assert vm.read(PAGE + 0x10, 8) == b"ORIGINAL"
        (ev,) = rec.events
        assert (ev.watch.name, ev.offset, ev.old, ev.new, ev.size) == ("field", 4, b"INAL", b"EVIL", 4)
        assert ev.watched_range() == (PAGE + 0x14, PAGE + 0x18)
        assert ev.new_value == int.from_bytes(b"EVIL", "little")
        # a write straddling the watch's edge is a write to watched bytes
        vm.write(PAGE + 0x0C, b"12345678")
        assert len(rec.events) == 2 and rec.events[1].offset == -4
        assert wm.stats()["notified"] == 2

    @pytest.mark.parametrize(("answer", "committed", "decision"), [
        ("allow", True, Decision.EMULATE), (True, True, Decision.EMULATE), ("emulate", True, Decision.EMULATE),
        ("deny", False, Decision.SKIP), (False, False, Decision.SKIP), (Decision.SKIP, False, Decision.SKIP),
        ("stop", False, Decision.STOP), (None, False, Decision.SKIP),
    ])
    def test_callback_answers(self, vm, answer, committed, decision):
        wm = WatchManager(vm)
        wm.watch(PAGE, 8, Recorder(answer))
        r = vm.write(PAGE, b"\1" * 8)
        assert (r.committed, r.decision) == (committed, decision)
        assert r.stopped == (decision is Decision.STOP)

    def test_none_answer_uses_the_watch_decision(self, vm):
        wm = WatchManager(vm)
        wm.watch(PAGE, 8, Recorder(None), decision="emulate")
        assert vm.write(PAGE, b"\1").committed

    def test_bad_answers_are_type_errors(self, vm):
        wm = WatchManager(vm)
        wm.watch(PAGE, 8, Recorder(Decision.UNPROTECT))
        with pytest.raises(TypeError, match="UNPROTECT"):
            vm.write(PAGE, b"\1")
        wm2 = WatchManager(vm)
        wm2.watch(PAGE + 0x100, 8, Recorder(42))
        with pytest.raises(TypeError, match="allow/deny/stop"):
            vm.write(PAGE + 0x100, b"\1")

    def test_overlapping_watches_strictest_wins_and_each_callback_once(self, vm):
        allow, deny = Recorder("allow"), Recorder("deny")
        wm = WatchManager(vm)
        a1 = wm.watch(PAGE, 4, allow, name="a1")
        a2 = wm.watch(PAGE + 4, 4, allow, name="a2")
        wm.watch(PAGE + 6, 4, deny, name="d")
        r = vm.write(PAGE, b"\1" * 8)  # touches a1, a2 and d
        assert not r.committed and r.decision is Decision.SKIP
        assert len(allow.events) == 1 and allow.events[0].watches == (a1, a2)
        assert len(deny.events) == 1
        assert a1.hits == a2.hits == 1
        r = vm.write(PAGE, b"\2" * 4)  # a1 only
        assert r.committed

    def test_watch_without_callback_uses_its_decision(self, vm):
        wm = WatchManager(vm, default="deny")
        w = wm.watch(PAGE, 8)
        assert not vm.write(PAGE, b"\1").committed
        assert w.hits == 1 and w.decisions["skip"] == 1

    def test_chain_sees_every_violation_and_decides_foreign_ones(self, vm):
        seen = []

        def chain(ev):
            seen.append(ev.gpa)
            return Decision.STOP

        vm.set_subpage_access(PAGE >> 12, [FULL_ACCESS_MAP & ~(1 << 5)])
        wm = WatchManager(vm, chain=chain)
        wm.watch(PAGE, 8, Recorder("allow"))
        assert vm.write(PAGE, b"\1").committed  # ours: allowed, chain told
        r = vm.write(PAGE + 5 * 128, b"\1")  # someone else's sub-page: chain decides
        assert r.stopped and wm.foreign == 1
        assert seen == [PAGE, PAGE + 5 * 128]
        wm.close()
        assert amap(vm) == FULL_ACCESS_MAP & ~(1 << 5)

    def test_page_crossing_write(self, vm):
        rec = Recorder("deny")
        wm = WatchManager(vm)
        wm.watch(PAGE + 0x1000, 2, rec, name="next-page")
        r = vm.write(PAGE + 0xFFC, b"ABCDEFGH")  # bytes 4-7 land on the watched page
        assert not r.committed
        (ev,) = rec.events
        assert ev.gpa == PAGE + 0x1000 and ev.new == b"EFGH" and ev.offset == 0


class TestWatchManagerBadInput:
    def test_outside_ram(self, vm):
        wm = WatchManager(vm)
        with pytest.raises(WatchError, match=r"outside guest RAM: no memslot covers gpa 0x400000"):
            wm.watch((4 << 20) - 8, 16, name="edge")
        assert wm.pushes == 0 and wm.stats()["pages"] == 0  # nothing half-registered

    @pytest.mark.parametrize(("start", "length", "msg"), [(-1, 8, "start >= 0"), (0, 0, "length > 0"),
                                                          ("0", 8, "must be an integer")])
    def test_bad_ranges(self, vm, start, length, msg):
        with pytest.raises(WatchError, match=msg):
            WatchManager(vm).watch(start, length)

    def test_read_only_memslot(self, vm):
        vm.add_memslot(1, 8 << 20, 1 << 20, readonly=True)
        with pytest.raises(WatchError, match="read-only memslot 1"):
            WatchManager(vm).watch(8 << 20, 8)

    def test_spp_not_enabled(self):
        v = Vm()
        v.add_memslot(0, 0, 2 << 20)
        with pytest.raises(WatchError, match="enable_spp"):
            WatchManager(v)

    def test_errors_are_value_errors(self):
        assert issubclass(WatchError, ValueError) and issubclass(UnknownSymbolError, ValueError)

    @pytest.mark.parametrize(("decision", "msg"), [
        ("bogus", r"watch 'w': decision 'bogus': must be one of allow, emulate, deny, skip, stop"),
        (1, "decision 1: must be one of allow"),
        ("unprotect", "decision 'unprotect': a watch keeps its protection"),
        (Decision.UNPROTECT, "decision 'unprotect': a watch keeps its protection"),
    ])
    def test_bad_watch_decision(self, vm, decision, msg):
        wm = WatchManager(vm)
        wm.watch(PAGE + 0x200, 8, name="other")
        before = (wm.stats(), wm.pushes, wm._next, vm.get_subpage_access(PAGE >> 12, 1)[0])
        with pytest.raises(WatchError, match=msg):
            wm.watch(PAGE, 8, name="w", decision=decision)
        assert (wm.stats(), wm.pushes, wm._next, vm.get_subpage_access(PAGE >> 12, 1)[0]) == before

    @pytest.mark.parametrize(("default", "msg"), [
        ("bogus", "default decision 'bogus': must be one of allow, emulate, deny, skip, stop"),
        ("unprotect", "default decision 'unprotect': a watch keeps its protection"),
    ])
    def test_bad_default_decision(self, vm, default, msg):
        vm.on_violation(None)
        with pytest.raises(WatchError, match=msg):
            WatchManager(vm, default=default)
        assert vm.write(PAGE, b"\1").committed  # no handler installed, nothing protected


def test_compress_names():
    assert compress_names(["idt"]) == "idt"
    assert compress_names([f"task{i}_ids" for i in range(8)] + ["x"]) == "task*_ids ×8, x"


# ====================================================================== symbols
@pytest.fixture(scope="module")
def kernel():
    if not GCC_OK:
        pytest.skip(GCC_WHY)
    return load_elf(build_guest("minikernel"))


class TestSymbols:
    def test_minikernel_layout(self, kernel):
        s = kernel.symbols
        assert s["idt"].size == 4096 and s["idt"].addr % 4096 == 0
        assert s["syscall_table"].addr == s["kdata"].addr and s["syscall_table"].size == 0x400
        for n in range(8):
            cred = s[f"task{n}_cred"]
            assert cred.addr == s["tasks"].addr + n * 512 + 0x80
            assert s[f"task{n}_ids"].addr == cred.addr + 8 and s[f"task{n}_caps"].addr == cred.addr + 0x28
        # protected structures share their pages with hot data
        assert s["kernel_hot"].addr >> 12 == s["syscall_table"].addr >> 12
        assert s["task3_sched"].addr >> 12 == s["task3_ids"].addr >> 12

    def test_resolve_names_globs_offsets(self, kernel):
        t = resolve_symbols(kernel, "idt, task*_ids, syscall_table+0x330:8")
        assert [x.name for x in t][:2] == ["idt", "task0_ids"]
        assert len(t) == 10
        assert (t[-1].name, t[-1].start, t[-1].length) == (
            "syscall_table+0x330:0x8", kernel.symbols["syscall_table"].addr + 0x330, 8)

    def test_default_symbols_resolve(self, kernel):
        assert len(resolve_symbols(kernel, DEFAULT_SYMBOLS)) == 18

    def test_unknown_symbol_lists_close_matches(self, kernel):
        with pytest.raises(UnknownSymbolError, match=r"unknown symbol 'sycall_table'.*close matches: syscall_table"):
            resolve_symbols(kernel, "idt,sycall_table")

    def test_glob_matching_nothing(self, kernel):
        with pytest.raises(UnknownSymbolError, match="matches no object symbol"):
            resolve_symbols(kernel, "nothing*")

    @pytest.mark.parametrize(("spec", "msg"), [("", "no symbol given"), ("idt+", "SYMBOL"),
                                               ("idt+0x2000", "past the end"), ("idt:0", "positive")])
    def test_bad_specs(self, kernel, spec, msg):
        with pytest.raises(MonitorError, match=msg):
            resolve_symbols(kernel, spec)

    @pytest.mark.parametrize(("spec", "msg"), [
        ([1], "item 0 is 1, not a string"), (["idt", None], "item 1 is None, not a string"),
        (5, "5 is neither a string nor a list of strings"),
    ])
    def test_bad_spec_types(self, kernel, spec, msg):
        with pytest.raises(MonitorError, match=msg):
            resolve_symbols(kernel, spec)


# ====================================================================== end to end
def _opens(ticks):
    return ticks // 16


@needs_gcc
class TestRunMonitorBadInput:
    """Refused before any engine is made."""

    @pytest.fixture(autouse=True)
    def _no_engine(self, monkeypatch):
        import sppkit.engines as engines

        def choose_engine(name):
            raise AssertionError("an engine was chosen for bad input")

        monkeypatch.setattr(engines, "choose_engine", choose_engine)

    @pytest.mark.parametrize("ticks", [0, -1, 2**70, 10_000_001, 1.5, True, "10"])
    def test_bad_ticks(self, ticks):
        with pytest.raises(MonitorError, match=r"ticks .*: must be an integer from 1 to 10000000"):
            run_monitor("minikernel", engine="unicorn", ticks=ticks)

    @pytest.mark.parametrize(("targets", "exc", "msg"), [
        ([("x", 0x500000, 8)], MonitorError, r"targets\[0\] \('x', 5242880, 8\): not a WatchTarget"),
        (5, MonitorError, "targets 5: must be a list of WatchTarget"),
        ([WatchTarget("x", 0x10000, 8.0)], WatchError, "watch 'x': length must be an integer, got 8.0"),
        ([WatchTarget("x", -5, 8)], WatchError, "needs start >= 0"),
        ([WatchTarget("x", 0x10000, 8, "bogus")], WatchError, "watch 'x': decision 'bogus': must be one of"),
    ])
    def test_bad_targets(self, targets, exc, msg):
        with pytest.raises(exc, match=msg):
            run_monitor("minikernel", engine="unicorn", targets=targets)

    def test_bad_decision(self):
        with pytest.raises(MonitorError, match="decision 'bogus'"):
            run_monitor("minikernel", engine="unicorn", decision="bogus")


@needs_gcc
@pytest.mark.parametrize("engine", ENGINES)
class TestMinikernelEndToEnd:
    def test_skip_blocks_the_rootkit_and_leaves_hot_data_alone(self, engine):
        rep = run_monitor("minikernel", engine=engine, decision="skip", ticks=TICKS)
        res = rep.result
        assert (res.stop_reason, res.exit_code) == ("exit", 0), res.console
        assert rep.verdict == {"exit_code": 0, "effects": [], "attack_blocked": True, "hot_data_intact": True}
        assert "syscall table intact" in res.console and "hot data: " in res.console
        assert "consistent" in res.console and "the rootkit had no effect" in res.console
        # every watched structure still holds its value from arming time
        assert len(rep.watches) == 18 and all(w["intact"] for w in rep.watches)
        # the attack: 1 syscall entry + 8 ids + 3 capabilities + 2 IDT words, all caught, all discarded
        hits = rep.watched_events
        assert len(hits) == 14
        assert {e["stage"] for e in hits} == {"attack"} and {e["decision"] for e in hits} == {"skip"}
        sym = {e["symbol"] for e in hits}
        assert {"syscall_table+0x330", "task3_ids", "task3_ids+0x1c", "task3_caps+0x10", "idt+0x800"} <= sym
        first = hits[0]
        assert first["old"] == hex(int(first["old"], 16)) and first["new"] != first["old"]
        assert all(e["instruction"] and e["instruction"].startswith("mov") for e in hits), hits
        creds = [e for e in hits if e["symbol"].startswith("task3_ids")]
        assert {(e["old"], e["new"]) for e in creds} == {("0x3eb", "0x0")}  # uid 1003 -> 0
        # the only other SPP exits: get_cred/put_cred refcount writes beside the ids, committed transparently
        refcount_writes = 2 * (_opens(TICKS) + _opens(POST))
        ws = rep.watch_stats
        assert ws["transparent"] == refcount_writes and ws["notified"] == 14
        assert rep.stats["violations"] == 14 + refcount_writes
        assert all(e["decision"] == "emulate" and e["symbol"].startswith("task") for e in rep.events
                   if not e["watches"])
        # page-granular protection would have exited on every one of the workload's writes
        assert rep.stats["page_granular"] > 20 * rep.stats["violations"]
        # ... and the replay engine, fed the run's recorded writes, computes the same counts
        assert rep.replay["page_granular_exits"] == rep.stats["page_granular"]
        assert rep.replay["violations"] == rep.stats["violations"]
        idt = next(p for p in rep.pages if p["watches"] == ["idt"])
        table = next(p for p in rep.pages if p["watches"] == ["syscall_table"])
        assert idt["writes"] == idt["spp_exits"] == 2  # the IDT fills its page: SPP = page-granular there
        assert table["spp_exits"] == 1 and table["writes"] > 10 * TICKS
        assert ws["pushes"] == 3  # one per page, pushed once when the kernel armed the monitor

    def test_emulate_records_and_lets_the_attack_through(self, engine):
        rep = run_monitor("minikernel", engine=engine, decision="emulate", ticks=TICKS)
        assert rep.exit_code == 7, rep.result.console  # syscall | creds | idt; hot data intact
        assert rep.verdict["effects"] == ["syscall table hijacked", "credentials escalated", "IDT gate hooked"]
        changed = {w["name"] for w in rep.watches if not w["intact"]}
        assert changed == {"syscall_table", "task3_ids", "task3_caps", "idt"}
        assert {e["decision"] for e in rep.watched_events} == {"emulate"}

    def test_stop_ends_the_run_at_the_first_attack_write(self, engine):
        rep = run_monitor("minikernel", engine=engine, decision="stop", ticks=TICKS)
        assert rep.result.stop_reason == "stop-decision" and rep.exit_code is None
        (hit,) = rep.watched_events
        assert hit["symbol"] == "syscall_table+0x330" and hit["decision"] == "stop"
        assert all(w["intact"] for w in rep.watches)

    def test_page_granular_baseline(self, engine):
        rep = run_monitor("minikernel", engine=engine, decision="skip", ticks=TICKS, page_granular=True)
        assert rep.exit_code == 0  # same outcome ...
        assert rep.stats["violations"] == rep.stats["page_granular"]  # ... with an exit on every write
        assert rep.watch_stats["notified"] == 14


@needs_gcc
@pytest.mark.parametrize("engine", ENGINES)
def test_guest_without_monitor_port_is_watched_from_the_start(engine):
    """mixed has no sppkit_monitor_port: watches are pushed before its first instruction."""
    rep = run_monitor("mixed", protect_symbols="secret,config,canary", engine=engine, decision="emulate")
    assert rep.exit_code == 0
    hits = rep.watched_events
    assert len(hits) == rep.stats["violations"] == 44  # 32 secret + 8 config + 4 canary writes
    assert {e["stage"] for e in hits} == {"run"}
    assert rep.stats["page_granular"] > 10_000


@needs_gcc
@pytest.mark.parametrize("engine", ENGINES)
def test_cpl0(engine):
    rep = run_monitor("minikernel", engine=engine, cpl=0, ticks=200)
    assert rep.exit_code == 0 and len(rep.watched_events) == 14


# ====================================================================== the CLI
@needs_gcc
class TestCli:
    def test_json(self):
        r = CliRunner().invoke(monitor_command, ["minikernel", "--engine", "unicorn", "--ticks", "300", "--json"])
        assert r.exit_code == 0, r.output
        d = json.loads(r.output)
        assert d["verdict"]["attack_blocked"] and d["exits"]["spp"] < d["exits"]["page_granular"]
        assert len(d["events"]) == 14 and all(e["watches"] for e in d["events"])
        assert d["other_events_total"] == d["watch_stats"]["transparent"] and len(d["other_events"]) <= 100

    def test_tables(self):
        r = CliRunner().invoke(monitor_command, ["--engine", "unicorn", "--ticks", "300",
                                                 "--protect-symbols", "syscall_table,task3_ids"])
        assert r.exit_code == 6, r.output  # caps and the IDT were not watched: creds (2) and IDT (4) changed
        assert "writes to watched bytes (9)" in r.output and "exits per monitored page" in r.output
        assert "syscall_table+0x330" in r.output and "attack succeeded" in r.output

    def test_emulate_exit_status_is_the_guests(self):
        r = CliRunner().invoke(monitor_command, ["--engine", "unicorn", "--ticks", "200", "--decision", "emulate"])
        assert r.exit_code == 7

    def test_policy_file(self, tmp_path):
        p = tmp_path / "kernel.toml"
        p.write_text('decision = "skip"\n[[protect]]\nsymbol = "syscall_table"\n'
                     '[[protect]]\nname = "victim creds"\nsymbol = "task3_cred"\noffset = 8\nlength = 72\n')
        r = CliRunner().invoke(monitor_command, ["--engine", "unicorn", "--ticks", "200", "--policy", str(p),
                                                 "--json"])
        assert r.exit_code == 4, r.output  # only the IDT hook (not watched) got through
        d = json.loads(r.output)
        assert [w["name"] for w in d["watches"]] == ["syscall_table", "victim creds"]

    def test_unknown_symbol_is_one_value_error(self):
        r = CliRunner().invoke(monitor_command, ["--engine", "unicorn", "--protect-symbols", "idt,sycall_tabel"])
        assert isinstance(r.exception, UnknownSymbolError)
        assert "close matches: syscall_table" in str(r.exception) and "\n" not in str(r.exception)

    def test_both_protect_and_policy_is_a_usage_error(self, tmp_path):
        p = tmp_path / "p.toml"
        p.write_text("")
        r = CliRunner().invoke(monitor_command, ["--protect-symbols", "idt", "--policy", str(p)])
        assert r.exit_code == 2 and "not both" in r.output

    def test_guest_needs_something_to_watch(self):
        r = CliRunner().invoke(monitor_command, ["selftest", "--engine", "unicorn"])
        assert isinstance(r.exception, MonitorError) and "--protect-symbols" in str(r.exception)

    def test_unknown_guest(self):
        r = CliRunner().invoke(monitor_command, ["no-such-guest"])
        assert isinstance(r.exception, MonitorError) and "bundled program" in str(r.exception)
