"""Benchmarks of sppkit.vmm (a script that prints figures; not a test).

(a) set_subpage_access of 512 pages (lazy and eager): time per call.
(b) vm.write throughput — allowed (unprotected page), allowed on a protected page
    (writable sub-page), denied (no handler → SKIP) — translation cache on, one core,
    against a target of 200,000 writes/s and against a baseline measured here: a bare
    bytearray slice-assignment loop over the same writes.
(c) memory: access-map bytes with SPP on and with 0 / 4,096 / 65,536 pages protected,
    against a per-page array of maps (4 bytes a protectable page, the KVM series'
    layout), and SPPT bytes against the number of 2-MiB regions holding protected pages.
(d) a memslot over an engine's guest RAM of 1, 8 and 64 GiB: time and Python memory,
    against making the anonymous mapping alone.

Run: .venv/bin/python benchmarks/bench_vmm.py  (about 15 s)
"""

from __future__ import annotations

import os
import platform
import random
import time

from rich.console import Console
from rich.table import Table

from sppkit import Vm

PAGE = 4096
M2 = 1 << 21
G1 = 1 << 30
FULL = 0xFFFFFFFF
TARGET_WPS = 200_000
N_WRITES = 100_000
REPEATS = 3

console = Console(width=120)


def pin_one_core() -> str:
    try:
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
        return f"pinned to CPU {cpu}"
    except (AttributeError, OSError):
        return "not pinned (sched_setaffinity unavailable)"


def best_of(fn, repeats: int = REPEATS) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ====================================================================== (a)
def bench_set_subpage_access() -> Table:
    table = Table(title="(a) set_subpage_access, 512 pages per call (one 2-MiB region)")
    for col in ("mode", "operation", "calls", "µs / call", "µs / page"):
        table.add_column(col, justify="right" if col not in ("mode", "operation") else "left")
    rng = random.Random(1)
    maps_a = [rng.randrange(0, FULL) for _ in range(512)]
    maps_b = [m ^ 0x0F0F0F0F for m in maps_a]
    calls = 20
    for mode in ("lazy", "eager"):
        vm = Vm()
        vm.add_memslot(0, M2, 2 * M2)  # two 2-MiB leaves
        vm.enable_spp(mode)
        gfn = M2 >> 12
        protect = change = unprotect = 0.0
        for _ in range(calls):
            t0 = time.perf_counter()
            vm.set_subpage_access(gfn, maps_a)  # FULL → map: split the 2-MiB leaf, 512 leaves
            t1 = time.perf_counter()
            vm.set_subpage_access(gfn, maps_b)  # map → other map: leaves unchanged, SPPT updated
            t2 = time.perf_counter()
            vm.set_subpage_access(gfn, [FULL] * 512)  # → FULL: 512 leaves, merge back
            t3 = time.perf_counter()
            protect += t1 - t0
            change += t2 - t1
            unprotect += t3 - t2
        for name, total in (("protect (split)", protect), ("change", change), ("unprotect (merge)", unprotect)):
            us = total / calls * 1e6
            table.add_row(mode, name, str(calls), f"{us:,.0f}", f"{us / 512:,.2f}")
        assert vm.ept.splits == calls and vm.ept.merges == calls
    return table


# ====================================================================== (b)
def make_writes(rng: random.Random, base: int, npages: int, allowed_subpages: range, size: int = 8):
    """``N_WRITES`` (gpa, data) pairs of ``size`` bytes inside ``allowed_subpages`` of pages
    ``base``.. (never crossing a sub-page boundary)."""
    out = []
    for _ in range(N_WRITES):
        page = rng.randrange(npages)
        sp = rng.choice(allowed_subpages)
        off = sp * 128 + rng.randrange(0, 128 - size + 1)
        out.append((base + page * PAGE + off, bytes([rng.randrange(256)]) * size))
    return out


def bench_writes() -> tuple[Table, list[str]]:
    rng = random.Random(2)
    npages = 64
    vm = Vm(cache=True)
    base_plain = 0x10000000
    base_prot = 0x20000000
    vm.add_memslot(0, base_plain, npages * PAGE)
    vm.add_memslot(1, base_prot, npages * PAGE)
    vm.enable_spp("lazy")
    # pages of slot 1: sub-pages 0..15 writable, 16..31 protected
    vm.set_subpage_access(base_prot >> 12, [0x0000FFFF] * npages)

    scenarios = [
        ("allowed (unprotected page)", make_writes(rng, base_plain, npages, range(32)), True),
        ("allowed on a protected page", make_writes(rng, base_prot, npages, range(0, 16)), True),
        ("denied (no handler → SKIP)", make_writes(rng, base_prot, npages, range(16, 32)), False),
    ]
    table = Table(title=f"(b) vm.write throughput: {N_WRITES:,} writes of 8 bytes, cache on, best of {REPEATS}")
    for col in ("writes", "writes/s", "µs / write", "baseline writes/s", "× baseline time", f"≥ {TARGET_WPS:,}/s"):
        table.add_column(col, justify="left" if col == "writes" else "right")
    verdicts = []
    for name, writes, committed in scenarios:
        # warm up (lazy SPPT miss, translation cache) and check the outcome
        for gpa, data in writes[:100]:
            assert vm.write(gpa, data).committed == committed, name
        write = vm.write

        def run(writes=writes, write=write):
            for gpa, data in writes:
                write(gpa, data)

        buf = bytearray(2 * npages * PAGE)
        base = base_plain if writes[0][0] < base_prot else base_prot
        flat = [(gpa - base, data, len(data)) for gpa, data in writes]

        def baseline(flat=flat, buf=buf):
            for o, data, n in flat:
                buf[o : o + n] = data

        t = best_of(run)
        tb = best_of(baseline)
        wps = N_WRITES / t
        bwps = N_WRITES / tb
        met = wps >= TARGET_WPS
        verdicts.append(f"{name}: {wps:,.0f} writes/s — target {'met' if met else 'NOT met'}")
        table.add_row(
            name, f"{wps:,.0f}", f"{t / N_WRITES * 1e6:.2f}", f"{bwps:,.0f}", f"{t / tb:,.1f}",
            "[green]met[/green]" if met else "[red]not met[/red]",
        )
    st = vm.stats()
    assert st["violations"] >= N_WRITES  # every denied write was a violation
    return table, verdicts


# ====================================================================== (c)
def bench_memory() -> tuple[Table, Table]:
    vm = Vm()
    vm.add_memslot(0, 0x10000000, 16 * PAGE)
    vm.add_memslot(1, G1, G1)
    vm.add_memslot(2, 4 * G1, 3 * M2 + 5 * PAGE)
    vm.enable_spp("lazy")
    t1 = Table(title="(c1) access maps: kept for protected pages only")
    for col in ("protectable pages", "protected pages", "map bytes", "a per-page array (4 B a page)", "ratio"):
        t1.add_column(col, justify="right")
    protected = 0
    for target in (0, 4096, 65536):
        base = G1 >> 12  # protect the first pages of the 1-GiB slot, 512 at a time
        while protected < target:
            vm.set_subpage_access(base + protected, [0x0000FFFF] * 512)
            protected += 512
        mem = vm.spp_memory()
        dense = 4 * mem["protectable_pages"]
        t1.add_row(f"{mem['protectable_pages']:,}", f"{protected:,}", f"{mem['map_bytes']:,}", f"{dense:,}",
                   f"{mem['map_bytes'] / dense:.3f}x")

    t2 = Table(title="(c2) SPPT size vs 2-MiB regions holding protected pages (1-GiB slot, 16 pages protected per region)")
    for col in ("mode", "regions", "protected pages", "SPPT tables", "sppt_bytes", "bytes / region"):
        t2.add_column(col, justify="left" if col == "mode" else "right")
    for mode in ("lazy", "eager"):
        for nregions in (1, 2, 4, 8):
            vm = Vm()
            vm.add_memslot(0, G1, G1)
            vm.enable_spp(mode)
            for r in range(nregions):
                region = G1 + r * 37 * M2
                vm.set_subpage_access(region >> 12, [0x0000FFFF] * 16)
                vm.write(region, b"x")  # lazy: the SPP miss builds the region's tables
            mem = vm.spp_memory()
            assert mem["protected_2m_regions"] == nregions
            t2.add_row(
                mode, str(nregions), str(16 * nregions), str(mem["sppt_tables"]), f"{mem['sppt_bytes']:,}",
                f"{mem['sppt_bytes'] / nregions:,.0f}",
            )
    return t1, t2


# ====================================================================== (d)
def bench_engine_ram() -> Table:
    """A memslot over an engine's guest RAM (an anonymous MAP_NORESERVE mapping, as the
    engines make) of 1, 8 and 64 GiB: time and Python memory.  Baseline in the same run:
    making every frame up front, two views of the backing a page (what alloc_range did
    before its frames were made on first use), for 1 and 8 GiB."""
    import gc
    import mmap
    import tracemalloc

    from sppkit.engines.base import allocate_ram

    def views_per_page(ram, size: int) -> list:
        mv = memoryview(ram).cast("B")
        return [(v, v.cast("Q")) for v in (mv[k << 12:(k + 1) << 12] for k in range(size >> 12))]

    t = Table(title="(d) a memslot over an engine's guest RAM: frames made on first use, vs up front")
    for col in ("guest RAM", "add_memslot + enable_spp", "Python memory", "frames up front (baseline)",
                "its Python memory", "speed-up"):
        t.add_column(col, justify="right")
    for gib in (1, 8, 64):
        size = gib * G1
        ram = allocate_ram(size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        tracemalloc.start()
        t1 = time.perf_counter()
        vm = Vm()
        vm.add_memslot(0, 0, size, backing=ram)
        vm.enable_spp("lazy")
        dt = time.perf_counter() - t1
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del vm
        base = base_mem = None
        if gib <= 8:
            tracemalloc.start()
            t1 = time.perf_counter()
            views = views_per_page(ram, size)
            base = time.perf_counter() - t1
            base_mem = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            for v, w in views:
                w.release()
                v.release()
            del views
        t.add_row(f"{gib} GiB", f"{dt * 1e3:.0f} ms", f"{peak / (1 << 20):.0f} MiB",
                  "—" if base is None else f"{base * 1e3:,.0f} ms",
                  "—" if base_mem is None else f"{base_mem / (1 << 20):,.0f} MiB",
                  "—" if base is None else f"{base / dt:.0f}x")
        del ram
        gc.collect()  # (the Vm's views of the mapping go with it)
    t.caption = ("Python memory: peak traced allocations (the access maps of protected pages only remain); "
                 "64 GiB baseline not run (about 8 GB)")
    return t


def main() -> None:
    t0 = time.perf_counter()
    pinned = pin_one_core()
    console.print(f"[bold]sppkit.vmm benchmarks[/bold] — Python {platform.python_version()}, {platform.machine()}, {pinned}")
    console.print(bench_set_subpage_access())
    table, verdicts = bench_writes()
    console.print(table)
    for v in verdicts:
        console.print("  " + v)
    t1, t2 = bench_memory()
    console.print(t1)
    console.print(t2)
    console.print(bench_engine_ram())
    console.print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
