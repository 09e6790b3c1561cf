"""The Unicorn engine's permit mirror changes nothing but speed.

The C trampoline offers each store to the Vm's write cache in C
(``Vm.native_write_cache``), which makes it when the processor's translation cache
permits it outright (``Vm.write_permit``), instead of calling ``vm.write``.  Everything a run
produces must be the same with the mirror on and off (``permit_mirror=False``):
final memory, console, exit code, stop reason, RIPs, violation records, the Vm's
statistics (all of them) and the exit counts — for every bundled guest under every
policy of the differential tests, for hypothesis-generated guests, and across what
can change the permits during a run (a port handler changing access maps, UNPROTECT,
a write observer registered mid-run, a pause from another thread).

Needs the C trampoline (a C compiler and this Python's headers); skipped, with the
reason, where it cannot be built."""

from __future__ import annotations

import os
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from iced_x86 import Code, Register
from iced_x86 import Instruction as Ins

from sppkit.engines.unicorn import UnicornEngine, native_status
from sppkit.policy import Policy
from sppkit.vmm import Decision
from engine_helpers import PAGE, RAM, SUB, needs_gcc
from test_differential import (
    CODE, DATA, INIT_SRC, NPAGES, SRC, _abs, _data_regions, _policy, _scenarios, exit_ins, flat, generated, guest, mov_imm,
)
from test_engine_api_bad_input import looping_guest

NATIVE_OK, NATIVE_WHY = native_status()
pytestmark = pytest.mark.skipif(not NATIVE_OK, reason=f"the C trampoline cannot be built here: {NATIVE_WHY}")


def outcome(eng: UnicornEngine, r, regions) -> dict:
    """Everything observable of a finished run (the mirror's own count aside), down to
    the processor's translation cache: its counters and entries."""
    c = eng.vm.processor.cache
    return {
        "result": {k: v for k, v in r.to_dict().items()},
        "stats": eng.vm.stats(top=1000),
        "memory": {g: eng.vm.read(g, n) for g, n in regions},
        "cache": (c.hits, c.misses, c.invalidations, {t: dict(d) for t, d in c.tags.items()}),
    }


def both(image, policy, regions, setup=None, **kw) -> tuple[dict, dict, int]:
    """Run ``image`` with the mirror on and off: the two outcomes and how many stores
    the mirror made."""
    outs, mirrored = [], 0
    for on in (True, False):
        eng = UnicornEngine(image, policy=policy, ram_size=RAM, timeout=60.0, permit_mirror=on, **kw)
        try:
            if setup is not None:
                setup(eng)
            r = eng.run()
            outs.append(outcome(eng, r, regions))
            if on:
                mirrored = eng.mirrored_writes
            else:
                assert eng.mirrored_writes == 0
        finally:
            eng.close()
    return outs[0], outs[1], mirrored


def test_permit_mirror_argument_is_checked():
    image, _ = flat(exit_ins(0))
    with pytest.raises(TypeError, match="permit_mirror"):
        UnicornEngine(image, permit_mirror=1)


@needs_gcc
@pytest.mark.parametrize(("program", "label", "make_policy"), list(_scenarios()))
def test_bundled_program_alike(program, label, make_policy):
    image = guest(program)
    policy = make_policy(image) if make_policy else None
    on, off, mirrored = both(image, policy, _data_regions(image))
    assert on == off
    if program == "workload" and label == "subpage31-emulate":
        assert mirrored > 1000  # (its loops store to the same data pages again and again)


@settings(max_examples=int(os.environ.get("SPPKIT_DIFF_EXAMPLES", "30")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=generated())
def test_generated_guest_alike(case):
    """Random stores of 1-16 bytes (aligned or not, across sub-pages and pages, string
    stores, movdqu, push/call) under random access maps."""
    decision, maps, prog = case
    image, _ = flat(prog.ins)
    on, off, _ = both(image, _policy(maps, decision), [(DATA, NPAGES * PAGE)])
    assert on == off


# ------------------------------------------------------------------ permits changing mid-run
P = DATA + 2 * PAGE  # a page with a protected sub-page (sub-page 0)
ALLOWED = P + 0x800  # sub-page 16 of it: writable until the port handler protects it
N = 5_000


def _loop_then_port_then_loop(n: int = N, width: int = 8) -> tuple:
    """n stores to ALLOWED (`add [ALLOWED], 1`, 8 or 4 bytes), `out 0x80`, n more, exit 0.
    (The mirror takes an 8-byte store only from an instruction vm.write has seen: the
    second loop's first one goes to vm.write; a 4-byte one can be mirrored at once.)"""
    store = Ins.create_mem_i32(Code.ADD_RM64_IMM8 if width == 8 else Code.ADD_RM32_IMM8, _abs(ALLOWED), 1)
    body = [store, Ins.create_reg_i32(Code.SUB_RM64_IMM8, Register.RCX, 1)]
    ins = [mov_imm(Register.RCX, n)]
    loop1 = len(ins)
    ins += body + [Ins.create_branch(Code.JNE_REL32_64, CODE)]  # (targets set below)
    ins += [mov_imm(Register.RAX, 1), Ins.create_u32_reg(Code.OUT_IMM8_AL, 0x80, Register.AL), mov_imm(Register.RCX, n)]
    loop2 = len(ins)
    ins += body + [Ins.create_branch(Code.JNE_REL32_64, CODE)] + exit_ins(0)
    _, ips = flat(ins)
    ins[loop1 + 2] = Ins.create_branch(Code.JNE_REL32_64, ips[loop1])
    ins[loop2 + 2] = Ins.create_branch(Code.JNE_REL32_64, ips[loop2])
    return flat(ins)[0]


def test_access_map_changed_by_a_port_handler_is_enforced_at_once():
    """The port handler protects the sub-page the guest has been storing to (the
    mirror made those stores): every store after the `out` is denied."""
    image = _loop_then_port_then_loop()
    policy = Policy.from_ranges([(P, SUB)], "skip")
    seen = []

    def setup(eng):
        def protect(e, value):
            seen.append(e.vm.stats()["writes"])  # exact inside a callback
            gfn = ALLOWED >> 12
            e.vm.set_subpage_access(gfn, [e.vm.get_subpage_access(gfn, 1)[0] & ~(1 << 16)])
        eng.add_port_handler(0x80, protect)

    on, off, mirrored = both(image, policy, [(P, PAGE)], setup)
    assert on == off
    assert mirrored >= N - 2  # (the first stores go to vm.write, which caches the mapping, then the vector)
    assert on["stats"]["violations"] == N and on["stats"]["writes"] == 2 * N
    assert seen == [N, N]  # the writes counted when the handler ran, mirror on and off
    assert int.from_bytes(on["memory"][P][0x800:0x808], "little") == int.from_bytes(
        image.segments[1].data[2 * PAGE + 0x800:2 * PAGE + 0x808], "little") + N


def test_unprotect_then_the_mirror_makes_the_stores():
    """UNPROTECT makes the stored-to sub-page writable (the page keeps another protected
    sub-page, so its stores still trap): the mirror makes the later ones."""
    image = _loop_then_port_then_loop()
    policy = Policy.from_ranges([(P, SUB), (ALLOWED, SUB)], "skip")

    def setup(eng):
        eng.vm.on_violation(lambda ev: Decision.UNPROTECT)

    on, off, mirrored = both(image, policy, [(P, PAGE)], setup)
    assert on == off
    assert on["stats"]["violations"] == 1 and on["stats"]["decisions"]["unprotect"] == 1
    assert mirrored >= 2 * N - 3  # (the violation, then the walks that cache the mapping and its vector)


def test_a_write_observer_registered_mid_run_sees_every_later_store():
    image = _loop_then_port_then_loop()
    policy = Policy.from_ranges([(P, SUB)], "skip")
    told = {True: [], False: []}

    for on in (True, False):
        eng = UnicornEngine(image, policy=policy, ram_size=RAM, permit_mirror=on)
        eng.add_port_handler(0x80, lambda e, v, on=on: e.vm.on_write(lambda g, n, rip: told[on].append(g)))
        r = eng.run()
        assert r.stop_reason == "exit"
        eng.close()
    assert told[True] == told[False] == [ALLOWED] * N


def test_a_pause_from_another_thread_lands_while_the_mirror_makes_every_store():
    """Only mirrored stores and no port I/O: the other thread turns the mirror off, so
    the next store reaches the engine and the run pauses there, exactly: continued, the
    guest makes every store once."""
    n = 30_000_000
    image = looping_guest(n, [], [Ins.create_mem_i32(Code.ADD_RM64_IMM8, _abs(ALLOWED), 1)])
    eng = UnicornEngine(image, policy=Policy.from_ranges([(P, SUB)], "skip"), ram_size=RAM, timeout=60.0)
    start = int.from_bytes(eng.vm.read(ALLOWED, 8), "little")

    def pause():
        time.sleep(0.1)
        for _ in range(500):
            try:
                eng.request_pause()
                return
            except Exception:
                time.sleep(0.01)

    t = threading.Thread(target=pause)
    t.start()
    try:
        r = eng.run()
    finally:
        t.join()
    assert r.stop_reason == "paused", r
    done = int.from_bytes(eng.vm.read(ALLOWED, 8), "little") - start
    assert 0 < done < n and eng.mirrored_writes > 0
    assert eng.vm.stats()["writes"] == done  # every store made so far is counted, no more
    r = eng.run()
    assert (r.stop_reason, r.exit_code) == ("exit", 0)
    assert int.from_bytes(eng.vm.read(ALLOWED, 8), "little") - start == n
    assert eng.vm.stats()["writes"] == n
    eng.close()


def test_a_vector_store_on_a_mirrored_page_is_still_decided_whole():
    """Plain 8-byte stores make the page's permit known to the mirror; a movdqu on the
    same page across a writable and a protected sub-page (Unicorn reports it in 8-byte
    pieces, the first one allowed) is still decided whole: one 16-byte violation,
    nothing of it written."""
    prot = P + 0x880  # sub-page 17
    policy = Policy.from_ranges([(prot, SUB)], "skip")
    # (4-byte stores: the mirror takes an 8-byte one only from an instruction vm.write
    # has seen store 8 bytes at once; these are all different instructions)
    plain = [mov_imm(Register.RAX, 0x1111), Ins.create_mem_reg(Code.MOV_RM32_R32, _abs(ALLOWED), Register.EAX)]
    vec = [Ins.create_reg_mem(Code.MOVDQU_XMM_XMMM128, Register.XMM0, _abs(SRC)),
           Ins.create_mem_reg(Code.MOVDQU_XMMM128_XMM, _abs(prot - 8), Register.XMM0)]
    image, _ = flat(plain * 3 + vec + plain + exit_ins(0))
    on, off, mirrored = both(image, policy, [(P, PAGE)])
    assert on == off
    assert mirrored >= 1  # (the first two stores cache the mapping, then its vector)
    (v,) = on["result"]["violations"]
    assert (v["gpa"], v["size"]) == (prot - 8, 16)
    assert on["memory"][P][0x878:0x888] == image.segments[1].data[2 * PAGE + 0x878:2 * PAGE + 0x888]
    assert INIT_SRC[:16] != on["memory"][P][0x878:0x888]


def test_stores_into_code_never_go_through_the_mirror():
    """Stores to the code page (a writable sub-page of it; another one protected) go to
    the engine each time — it drops the translations of code they patch — never to
    the mirror."""
    target = CODE + 0xF00  # past the code: patching it changes nothing that runs
    image, _ = flat([Ins.create_mem_u32(Code.MOV_RM8_IMM8, _abs(target), 0x90)] * 4 + exit_ins(0))
    on, off, mirrored = both(image, Policy.from_ranges([(CODE + 0xF80, SUB)], "skip"), [(CODE, PAGE)])
    assert on == off and mirrored == 0
    assert on["stats"]["writes"] == 4 and on["memory"][CODE][0xF00] == 0x90


@pytest.mark.parametrize("stale_sppt", [False, True])
def test_a_cache_entry_dropped_by_a_handler_write_is_dropped_from_the_mirror(stale_sppt):
    """A port handler's own vm.write to the mirrored page, denied, drops the processor's
    cache entry for the page (no INVEPT): the guest's next store walks again, mirror on
    or off.  With the page's SPP vector changed in the SPPT first without an INVEPT
    (stale entries permit until then), that walk denies it: every later store is a
    violation.  Before: the mirror kept its copy and made them."""
    image = _loop_then_port_then_loop(50, width=4)
    policy = Policy.from_ranges([(P, SUB)], "skip")

    def setup(eng):
        def handler(e, value):
            if stale_sppt:
                old = e.vm.sppt.builder.get_vector(P)
                e.vm.sppt.builder.set_vector(P, old & ~(1 << 32))  # sub-page 16 denied, no INVEPT
            assert not e.vm.write(P, b"\x99").committed  # sub-page 0: denied
        eng.add_port_handler(0x80, handler)

    on, off, mirrored = both(image, policy, [(P, PAGE)], setup)
    assert on == off and mirrored > 0
    assert on["stats"]["violations"] == (51 if stale_sppt else 1)


def test_a_pause_from_another_thread_during_the_mirror_refresh_is_kept():
    """request_pause() from another thread between the refresh's reading of the flags
    and its turning the mirror on: the mirror stays off (else the pause would land only
    at the next Python callback, or never).  The other thread is simulated at exactly
    that point."""

    class Racy(UnicornEngine):
        @property
        def _record_hook(self):  # (read by the refresh while it checks the flags)
            if getattr(self, "_race", False):
                self._race = False
                self._pause = True  # what request_pause() does from another thread ...
                self._interrupt()  # ... then this
            return None

        @_record_hook.setter
        def _record_hook(self, value):
            pass

    image, _ = flat(exit_ins(0))
    eng = Racy(image, policy=Policy.from_ranges([(P, SUB)], "skip"), ram_size=RAM)
    eng._race = True
    eng._mirror_refresh()
    assert eng._pause and eng._mirror.fast_ok == 0
    eng._pause = False
    eng._mirror_refresh()
    assert eng._mirror.fast_ok == 1  # (and with nothing asked, it is on)
    eng.close()


def test_page_counts_are_alike_when_they_are_pruned():
    """Over 8,192 pages holding a protected sub-page: the page-granular counts are
    pruned.  A page pruned from them is counted by vm.write again (a new key may prune
    the table), not by the mirror, whose counts arrive in a batch: the pruned tables
    are the same with the mirror on and off.  (Before: a batch re-added a pruned page
    before the others of the batch were counted, and the prune kept other counts.)"""
    base = 0x1000000
    x = 8190  # (its mirror slot is 254; y's is 255: counted after it in a batch)
    ops = [i for i in range(8192) for _ in (0, 1)]  # 8,192 pages twice: the first prune
    phase_b, i = [], 8192
    while len(phase_b) < 4093:
        if i & 255 not in (254, 255):
            phase_b.append(i)
        i += 1
    while i & 255 != 255:
        i += 1
    y = i
    ops += [p for p in phase_b + [y] for _ in (0, 1)] + [y, y, y, x]
    npages = max(ops) + 1
    image, _ = flat([mov_imm(Register.RAX, 0x11)]
                    + [Ins.create_mem_reg(Code.MOV_RM32_R32, _abs(base + p * PAGE + 0x800), Register.EAX) for p in ops]
                    + exit_ins(0))
    policy = Policy.from_ranges([(base + k * PAGE, SUB) for k in range(npages)], "skip")
    outs = []
    for on in (True, False):
        eng = UnicornEngine(image, policy=policy, ram_size=128 << 20, spp_mode="eager", permit_mirror=on)
        r = eng.run()
        assert r.stop_reason == "exit"
        outs.append((eng.vm.stats(top=10_000), eng.mirrored_writes))
        eng.close()
    assert not outs[0][0]["counters_exact"]  # (pruned)
    assert outs[0][0] == outs[1][0] and outs[0][1] > 0
