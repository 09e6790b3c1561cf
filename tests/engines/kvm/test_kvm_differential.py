"""Differential tests of the KVM engine: guest memory after a run, byte for byte, against
what the access maps allow — computed here independently of sppkit's model.

Two guests:

* ``stores`` (written below): ``param_count`` pseudo-random stores (xorshift64 seeded
  by ``param_seed``, both patched into guest memory before the run) of 1/2/4/8 bytes
  into a 4-page ``target``, a quarter of them aimed across a sub-page boundary (some
  across a page boundary).  The test re-derives the very same store sequence in Python.
* the bundled ``readback``: 1024 stores of every size and alignment, each read back;
  the guest returns how many did not stick.

The expected final memory follows the rules, applied here with plain bit arithmetic on
random access maps (decision SKIP): a store to a page with no protected sub-page lands;
on a protected page a store lands only if every sub-page it touches is writable; a
store crossing a 4-KiB boundary is decided per page (README: the KVM engine gets one
MMIO exit per page).  Also checked: the writes that reached ``vm.write`` are exactly the
pieces of stores that fell on protected pages, and the violations exactly the denied ones.
"""

from __future__ import annotations

import random
import struct

import pytest
from kvm_engine_helpers import (
    FULL,
    M64,
    PAGE,
    SUBPAGE,
    build_source,
    bundled,
    denied_ranges,
    fragments,
    requires_gcc,
    requires_kvm,
    run_engine,
    touched,
)

from sppkit.policy import Policy

pytestmark = [requires_kvm, requires_gcc]

PAGES = 4

STORES_C = r"""
#include "sppkit_rt.h"
#define PAGES 4
#define SIZE (PAGES * SPPKIT_PAGE_SIZE)
SPPKIT_PAGE_ALIGNED u8 target[SIZE];
volatile u64 param_seed = 1;
volatile u64 param_count = 16;

static u64 xs(u64 *s)
{
    u64 x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

int main(void)
{
    u64 s = param_seed | 1, n = param_count;
    for (u64 i = 0; i < n; i++) {
        u64 r = xs(&s);
        unsigned size = 1u << (r & 3);
        u64 off;
        if (((r >> 2) & 3) == 0) { /* at a sub-page boundary: the store ends at or crosses it */
            u64 b = ((r >> 8) % (PAGES * SPPKIT_SUBPAGES - 1) + 1) * SPPKIT_SUBPAGE_SIZE;
            off = b - 1 - (r >> 40) % size;
        } else {
            off = (r >> 8) % (SIZE - size + 1);
        }
        u64 v = xs(&s);
        rt_write(&target[off], size, v);
    }
    rt_puts("stores: done\n");
    return 0;
}
"""


def xorshift(s: int) -> int:
    s ^= (s << 13) & M64
    s ^= s >> 7
    s ^= (s << 17) & M64
    return s


def store_sequence(seed: int, count: int) -> list[tuple[int, int, int]]:
    """``(offset, size, value)`` of every store the guest makes, in order."""
    size_all = PAGES * PAGE
    s = seed | 1
    out = []
    for _ in range(count):
        s = xorshift(s)
        r = s
        size = 1 << (r & 3)
        if (r >> 2) & 3 == 0:
            b = ((r >> 8) % (PAGES * 32 - 1) + 1) * SUBPAGE
            off = b - 1 - (r >> 40) % size
        else:
            off = (r >> 8) % (size_all - size + 1)
        s = xorshift(s)
        out.append((off, size, s & ((1 << (8 * size)) - 1)))
    return out


class Expectation:
    """Final memory, vm.write traffic and violations, from the maps alone."""

    def __init__(self, base: int, size: int, maps: dict[int, int], initial: bytes | None = None) -> None:
        self.base = base
        self.maps = maps  # page index -> access map; missing = not protected
        self.mem = bytearray(initial if initial is not None else bytes(size))
        self.trapped: list[tuple[int, int]] = []  # (gpa, size) that reach vm.write
        self.violations: list[tuple[int, int, bytes]] = []  # (gpa, size, data)

    def store(self, off: int, size: int, value: int) -> bool:
        """Apply one guest store; True if every byte landed."""
        data = value.to_bytes(size, "little")
        landed = True
        for gpa, n, pos in fragments(self.base + off, size):
            o = gpa - self.base
            page, in_page = divmod(o, PAGE)
            amap = self.maps.get(page, FULL)
            if amap != FULL:
                self.trapped.append((gpa, n))
                if not all((amap >> sp) & 1 for sp in touched(in_page, n)):
                    self.violations.append((gpa, n, data[pos:pos + n]))
                    landed = False
                    continue
            self.mem[o:o + n] = data[pos:pos + n]
        return landed

    def load(self, off: int, size: int) -> int:
        return int.from_bytes(self.mem[off:off + size], "little")


def random_maps(rng: random.Random, kinds: list[str]) -> dict[int, int]:
    maps = {}
    for page, kind in enumerate(kinds):
        if kind == "none":
            continue
        amap = 0 if kind == "all" else rng.getrandbits(32)
        if kind == "sparse":
            amap |= rng.getrandbits(32) | rng.getrandbits(32)  # mostly writable
        if amap != FULL:
            maps[page] = amap
    return maps


def first_difference(got: bytes, want: bytes, base: int) -> str:
    diffs = [i for i in range(len(want)) if got[i] != want[i]]
    if not diffs:
        return "equal"
    i = diffs[0]
    return (f"{len(diffs)} bytes differ; first at gpa {base + i:#x} (page {i // PAGE}, sub-page "
            f"{i % PAGE // SUBPAGE}): got {got[i:i + 8].hex()} want {want[i:i + 8].hex()}")


@pytest.fixture(scope="module")
def stores_image(tmp_path_factory):
    return build_source(STORES_C, "stores", tmp_path_factory.mktemp("kvm-diff-guests"))


KINDS = ["none", "all", "random", "sparse"]


@pytest.mark.parametrize(("seed", "count", "cpl"), [
    (1, 1500, 3), (2, 1500, 3), (3, 1500, 3), (4, 1500, 3), (5, 1500, 3), (6, 1500, 3),
    (7, 300, 0),
])
def test_random_stores_under_a_random_policy(stores_image, seed, count, cpl):
    img = stores_image
    base = img.symbol("target").addr
    rng = random.Random(seed)
    kinds = KINDS[seed % 4:] + KINDS[:seed % 4]  # every kind of page, in a different order
    maps = random_maps(rng, kinds)
    policy = Policy.from_ranges(denied_ranges(base, maps), "skip")
    assert policy.access_maps() == {(base >> 12) + p: m for p, m in maps.items()}

    def patch(eng):
        eng.vm.load(img.symbol("param_seed").addr, struct.pack("<Q", seed))
        eng.vm.load(img.symbol("param_count").addr, struct.pack("<Q", count))

    run = run_engine(img, policy=policy, cpl=cpl, before_run=patch, keep=((base, PAGES * PAGE),))
    r = run.result
    assert (r.stop_reason, r.exit_code) == ("exit", 0), r.console

    want = Expectation(base, PAGES * PAGE, maps)
    seq = store_sequence(seed, count)
    for off, size, value in seq:
        want.store(off, size, value)
    # the sequence exercised what it is meant to
    assert any(off // SUBPAGE != (off + size - 1) // SUBPAGE for off, size, _ in seq)
    assert want.violations and len(want.trapped) > len(want.violations)

    got = run.memory[base]
    assert got == bytes(want.mem), first_difference(got, bytes(want.mem), base)
    assert [(g, n) for g, n, _ in run.writes] == want.trapped
    assert [(v.gpa, v.size, bytes.fromhex(v.data)) for v in r.violations] == want.violations
    for v in r.violations:
        page, in_page = divmod(v.gpa - base, PAGE)
        assert v.denied == tuple(sp for sp in touched(in_page, v.size) if not (maps[page] >> sp) & 1)
        assert v.decision == "skip"


@pytest.mark.parametrize("cpl", [3, 0])
def test_random_stores_all_emulated_land_everywhere(stores_image, cpl):
    """EMULATE: every byte lands, and every piece of a store on a protected page is a
    violation, every time.  (Whole pages are denied, so every trapped piece starts in a
    protected sub-page: see test_engine.py's decision-lookup xfail for the other case.)"""
    img = stores_image
    base = img.symbol("target").addr
    seed, count = 11, 400 if cpl == 3 else 150
    maps = {1: 0, 3: 0}
    policy = Policy.from_ranges(denied_ranges(base, maps), "emulate")

    def patch(eng):
        eng.vm.load(img.symbol("param_seed").addr, struct.pack("<Q", seed))
        eng.vm.load(img.symbol("param_count").addr, struct.pack("<Q", count))

    run = run_engine(img, policy=policy, cpl=cpl, before_run=patch, keep=((base, PAGES * PAGE),))
    everything = Expectation(base, PAGES * PAGE, {})
    skipped = Expectation(base, PAGES * PAGE, maps)
    for off, size, value in store_sequence(seed, count):
        everything.store(off, size, value)
        skipped.store(off, size, value)
    assert run.memory[base] == bytes(everything.mem), first_difference(run.memory[base], bytes(everything.mem), base)
    assert [(v.gpa, v.size) for v in run.result.violations] == [(g, n) for g, n, _ in skipped.violations]
    assert {v.decision for v in run.result.violations} == {"emulate"}


# ------------------------------------------------------------------ readback
PROBES = ((0, 1), (2, 2), (4, 4), (8, 8), (17, 2), (21, 4), (35, 8), (124, 8))
TARGET_SIZE = 4 * PAGE


def readback_pattern(k: int, size: int) -> int:
    v = (0x0101010101010101 * ((k % 0xFD) + 1)) & M64
    v ^= (k * 0x9E3779B97F4A7C15) & M64
    v |= 0x0101010101010101
    return v & ((1 << (8 * size)) - 1) if size < 8 else v


def simulate_readback(want: Expectation) -> int:
    """readback.c's loop against ``want``; returns its count of stores that did not stick."""
    failed = k = 0
    for sp in range(TARGET_SIZE // SUBPAGE):
        for po, size in PROBES:
            off = sp * SUBPAGE + po
            if off + size > TARGET_SIZE:
                off, size = TARGET_SIZE - 8, 4
            value = readback_pattern(k, size)
            if want.load(off, size) == value:
                value = ~value & ((1 << (8 * size)) - 1)
            want.store(off, size, value)
            if want.load(off, size) != value:
                failed += 1
            k += 1
    return failed


READBACK_POLICIES = {
    # page index -> access map
    "scattered": {0: FULL & ~(0b111 << 3), 1: 0, 2: FULL & ~(1 << 31), 3: FULL & ~(1 | 1 << 31)},
    "alternate": {0: 0x55555555, 2: 0xAAAAAAAA},
}


@pytest.mark.parametrize(("name", "cpl"), [("scattered", 3), ("alternate", 3), ("scattered", 0)])
def test_readback_failures_match_the_maps(name, cpl):
    img = bundled("readback")
    base = img.symbol("target").addr
    maps = READBACK_POLICIES[name]
    policy = Policy.from_ranges(denied_ranges(base, maps), "skip")
    syms = [img.symbol(n) for n in ("result_total", "result_stuck", "result_failed")]
    run = run_engine(img, policy=policy, cpl=cpl, keep=((base, TARGET_SIZE), *((s.addr, 4) for s in syms)))
    r = run.result

    want = Expectation(base, TARGET_SIZE, maps)
    failed = simulate_readback(want)
    assert failed > 0
    assert r.stop_reason == "exit"
    assert r.exit_code == failed, r.console
    total, stuck, got_failed = (struct.unpack("<I", run.memory[s.addr])[0] for s in syms)
    assert (total, stuck, got_failed) == (1024, 1024 - failed, failed)
    assert f"readback: 1024 writes, {1024 - failed} stuck, {failed} did not stick" in r.console
    assert run.memory[base] == bytes(want.mem), first_difference(run.memory[base], bytes(want.mem), base)
    assert [(v.gpa, v.size, bytes.fromhex(v.data)) for v in r.violations] == want.violations
    assert [(g, n) for g, n, _ in run.writes] == want.trapped


def test_readback_without_policy_all_stick():
    img = bundled("readback")
    base = img.symbol("target").addr
    run = run_engine(img, keep=((base, TARGET_SIZE),))
    want = Expectation(base, TARGET_SIZE, {})
    assert simulate_readback(want) == 0
    assert (run.result.exit_code, run.result.violations, run.writes) == (0, [], [])
    assert run.memory[base] == bytes(want.mem)
