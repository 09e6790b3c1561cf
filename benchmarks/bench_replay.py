#!/usr/bin/env python3
"""Benchmark of `sppkit replay`: replay throughput, the same computation as a compiled
C loop, lackey import rate, and memory against trace length.

    python benchmarks/bench_replay.py [--writes 100000000] [--quick]

1. A synthetic trace of N writes (default 100 million) with realistic locality — a
   program's stack (a drifting window), a heap with Zipf-distributed page popularity,
   a .data segment — generated chunk by chunk (never whole in memory) and replayed
   against a policy protecting 16 small .data objects and 48 heap guard sub-pages.
   Each chunk is replayed by sppkit (numpy) and by a C loop built here with gcc doing
   the same computation (page split, access-map lookup in the same tables, counters,
   violating IPs); both are timed on the same arrays in the same run, and their
   counters are checked equal.
2. valgrind lackey: the script builds a small C program (or uses /bin/ls), records
   it with `valgrind --tool=lackey --trace-mem=yes`, imports the trace (lines/s) and
   replays it.
3. Memory: tracemalloc peak of the importer + replay for a lackey trace and the
   same trace 8x longer, and peak RSS of child processes replaying N/10 and N/2
   synthetic writes.

Targets (issue): >= 50 M writes/s on one core and within 2x of the C loop; lackey
import >= 2 M lines/s; memory flat in trace length.  Finishes in a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from sppkit.engines.replay import ProtectionModel, Replayer, open_trace
from sppkit.engines.replay.replay import ShardResult

CHUNK = 1 << 20
DATA = 0x0060_0000
HEAP = 0x1000_0000
STACK_TOP = 0x7FF0_0000_0000
HEAP_PAGES = 16384
DATA_PAGES = 64
console = Console(width=None if sys.stdout.isatty() else 120)


# =====================================================================================
# synthetic trace with locality
# =====================================================================================


class Synthetic:
    """A write stream shaped like a program's: 55 % stack (a window that drifts with
    calls and returns), 35 % heap (Zipf page popularity over 64 MiB), 10 % .data
    (Zipf over 64 pages).  Sizes 8/4/1/16/2 bytes; 3 % unaligned (some cross a page)."""

    def __init__(self, seed: int = 1) -> None:
        self.rng = np.random.default_rng(seed)
        r = self.rng
        self.heap_pool = (r.zipf(1.2, 1 << 20) % HEAP_PAGES).astype(np.uint64)
        self.data_pool = (r.zipf(1.5, 1 << 16) % DATA_PAGES).astype(np.uint64)
        self.sizes = np.repeat(np.array([8, 4, 1, 16, 2], np.uint16), [60, 20, 10, 5, 5])
        self.rip_pool = (0x401000 + (r.zipf(1.3, 1 << 16) % 40000)).astype(np.uint64)
        self.sp = 0

    def chunk(self, n: int):
        r = self.rng
        kind = r.integers(0, 100, n, dtype=np.uint8)
        gpa = np.empty(n, np.uint64)
        st = kind < 55
        hp = (kind >= 55) & (kind < 90)
        dt = kind >= 90
        ns, nh, nd = int(st.sum()), int(hp.sum()), int(dt.sum())
        steps = r.integers(-24, 25, ns, dtype=np.int64)
        depth = (self.sp + np.cumsum(steps)) % 8192  # frames drift within 64 KiB
        self.sp = int(depth[-1]) if ns else self.sp
        gpa[st] = (STACK_TOP - 8 * depth.astype(np.uint64)) - 8 * r.integers(0, 64, ns, dtype=np.uint64)
        gpa[hp] = HEAP + (self.heap_pool[r.integers(0, len(self.heap_pool), nh)] << np.uint64(12)) \
            + 8 * r.integers(0, 512, nh, dtype=np.uint64)
        gpa[dt] = DATA + (self.data_pool[r.integers(0, len(self.data_pool), nd)] << np.uint64(12)) \
            + 8 * r.integers(0, 256, nd, dtype=np.uint64)
        size = self.sizes[r.integers(0, 100, n, dtype=np.uint8)]
        unaligned = r.integers(0, 100, n, dtype=np.uint8) < 3
        gpa[unaligned] += r.integers(1, 8, int(unaligned.sum()), dtype=np.uint64)
        rip = self.rip_pool[r.integers(0, len(self.rip_pool), n)]
        return gpa, size, rip


def synthetic_policy(seed: int = 7) -> dict[int, int]:
    """16 small objects in hot .data pages (secrets, configuration) and 48 heap guard
    sub-pages (the last 128 bytes of some heap pages, GuaNary-style)."""
    r = np.random.default_rng(seed)
    maps: dict[int, int] = {}
    for k in range(16):
        g = (DATA >> 12) + k
        s0 = int(r.integers(0, 16))
        n = int(r.integers(1, 3))
        bits = ((1 << n) - 1) << s0
        maps[g] = maps.get(g, 0xFFFFFFFF) & ~bits
    for g in r.choice(HEAP_PAGES // 4, 48, replace=False):
        gfn = (HEAP >> 12) + int(g)
        maps[gfn] = maps.get(gfn, 0xFFFFFFFF) & ~(1 << 31)
    return maps


# =====================================================================================
# the C loop
# =====================================================================================

C_SOURCE = r"""
#include <stdint.h>
/* The same computation as sppkit's numpy replay: split each record into per-page
   accesses, look the page up in the same direct tables (window base, int16 pid table,
   last entry = -1 sentinel), count accesses, page-granular exits and violations,
   per-page and per-sub-page counters, and collect the IPs of violating accesses. */
typedef struct { int64_t accesses, page_granular, violations, nrips; } counters_t;

void replay_chunk(const uint64_t *gpa, const uint16_t *size, const uint64_t *rip, int64_t n,
                  int64_t nwin, const uint64_t *win_base, const int64_t *win_len, const int16_t *const *win_table,
                  const int64_t *maps, int first_byte,
                  int64_t *pg_per_page, int64_t *viol_per_page, int64_t *viol_per_sub, int64_t *writes_per_sub,
                  uint64_t *viol_rips, counters_t *c)
{
    for (int64_t i = 0; i < n; i++) {
        uint64_t a = gpa[i], end = a + size[i];
        while (a < end) {
            uint64_t pend = (a | 0xFFF) + 1, e = end < pend ? end : pend;
            c->accesses++;
            int64_t pid = -1;
            for (int64_t w = 0; w < nwin; w++) {
                uint64_t k = (a - win_base[w]) >> 12;
                if (k < (uint64_t)(win_len[w] - 1)) { pid = win_table[w][k]; if (pid >= 0) break; }
            }
            if (pid >= 0) {
                unsigned off = a & 0xFFF, len = (unsigned)(e - a);
                unsigned s0 = off >> 7, s1 = (off + len - 1) >> 7;
                uint64_t touched = (2ULL << s1) - (1ULL << s0);
                uint64_t amap = (uint64_t)maps[pid];
                uint64_t denied = touched & ~amap & 0xFFFFFFFFULL;
                int viol = first_byte ? !((amap >> s0) & 1) : denied != 0;
                c->page_granular++;
                pg_per_page[pid]++;
                for (unsigned s = s0; s <= s1; s++) writes_per_sub[pid * 32 + s]++;
                if (viol) {
                    c->violations++;
                    viol_per_page[pid]++;
                    for (unsigned s = s0; s <= s1; s++) if ((denied >> s) & 1) viol_per_sub[pid * 32 + s]++;
                    viol_rips[c->nrips++] = rip[i];
                }
            }
            a = e;
        }
    }
}
"""


class CLoop:
    class Counters(ctypes.Structure):
        _fields_ = [("accesses", ctypes.c_int64), ("page_granular", ctypes.c_int64),
                    ("violations", ctypes.c_int64), ("nrips", ctypes.c_int64)]

    def __init__(self, model: ProtectionModel, workdir: Path) -> None:
        src = workdir / "replay_loop.c"
        so = workdir / "replay_loop.so"
        src.write_text(C_SOURCE)
        subprocess.run(["gcc", "-O2", "-march=native", "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
        self.lib = ctypes.CDLL(str(so))
        self.fn = self.lib.replay_chunk
        self.fn.restype = None
        idx = model.index
        assert idx.direct is not None, "the benchmark policy uses the direct-table strategy"
        self.tables = [np.ascontiguousarray(t, np.int16) for _, t in idx.direct]
        self.win_base = np.array([int(b) for b, _ in idx.direct], np.uint64)
        self.win_len = np.array([len(t) for t in self.tables], np.int64)
        self.win_ptrs = (ctypes.c_void_p * len(self.tables))(*[t.ctypes.data for t in self.tables])
        self.maps = np.ascontiguousarray(model.maps, np.int64)
        self.first_byte = int(model.spp_write_check == "first-byte")
        P = model.npages
        self.res = ShardResult.empty(P)
        self.c = self.Counters()
        self.rips = np.empty(CHUNK * 2, np.uint64)

    def feed(self, gpa, size, rip) -> None:
        n = len(gpa)
        r = self.res
        if len(self.rips) < 2 * n:
            self.rips = np.empty(2 * n, np.uint64)
        self.c.nrips = 0
        P = ctypes.c_void_p
        self.fn(P(gpa.ctypes.data), P(size.ctypes.data), P(rip.ctypes.data), ctypes.c_int64(n),
                ctypes.c_int64(len(self.tables)), P(self.win_base.ctypes.data), P(self.win_len.ctypes.data),
                self.win_ptrs, P(self.maps.ctypes.data), ctypes.c_int(self.first_byte),
                P(r.pg_per_page.ctypes.data), P(r.viol_per_page.ctypes.data), P(r.viol_per_sub.dense.ctypes.data),
                P(r.writes_per_sub.dense.ctypes.data), P(self.rips.ctypes.data), ctypes.byref(self.c))
        r.writes += n
        # the same IP aggregation as the numpy replay
        u, k = np.unique(self.rips[: self.c.nrips], return_counts=True)
        d = r.ip_counts
        for ip, m in zip(u.tolist(), k.tolist()):
            d[ip] = d.get(ip, 0) + m

    def finish(self) -> ShardResult:
        self.res.accesses = self.c.accesses
        self.res.page_granular = self.c.page_granular
        self.res.violations = self.c.violations
        return self.res


def same_counters(a: ShardResult, b: ShardResult) -> bool:
    return (a.writes, a.accesses, a.page_granular, a.violations) == (b.writes, b.accesses, b.page_granular,
                                                                      b.violations) \
        and all(np.array_equal(x, y) for x, y in ((a.pg_per_page, b.pg_per_page), (a.viol_per_page, b.viol_per_page),
                                                   (a.viol_per_sub.dense, b.viol_per_sub.dense),
                                                   (a.writes_per_sub.dense, b.writes_per_sub.dense))) \
        and a.ip_counts == b.ip_counts


# =====================================================================================
# parts
# =====================================================================================


def bench_synthetic(total: int, workdir: Path) -> dict:
    model = ProtectionModel(synthetic_policy())
    gen = Synthetic()
    rp = Replayer(model)
    rp_struct = Replayer(model)
    have_gcc = shutil.which("gcc") is not None
    cl = CLoop(model, workdir) if have_gcc else None
    t_np = t_c = t_gen = t_struct = 0.0
    n_struct = 0
    done = 0
    while done < total:
        n = min(CHUNK, total - done)
        t0 = time.perf_counter()
        gpa, size, rip = gen.chunk(n)
        t1 = time.perf_counter()
        rp.feed_columns(gpa, size, rip)
        t2 = time.perf_counter()
        t_gen += t1 - t0
        t_np += t2 - t1
        if cl is not None:
            t3 = time.perf_counter()
            cl.feed(gpa, size, rip)
            t_c += time.perf_counter() - t3
        if done < 16 * CHUNK:  # the importer-shaped path (structured chunks) on a sample
            rec = np.empty(n, [("gpa", "<u8"), ("size", "<u2"), ("rip", "<u8")])
            rec = np.empty(n, np.dtype([("gpa", "<u8"), ("size", "<u2"), ("rip", "<u8")], align=True))
            rec["gpa"], rec["size"], rec["rip"] = gpa, size, rip
            t4 = time.perf_counter()
            rp_struct.feed(rec)
            t_struct += time.perf_counter() - t4
            n_struct += n
        done += n
    r = rp.result
    out = {
        "writes": total, "accesses": r.accesses, "page_granular": r.page_granular, "violations": r.violations,
        "protected_pages": model.npages, "gen_s": t_gen, "numpy_s": t_np, "numpy_rate": total / t_np,
        "struct_rate": n_struct / t_struct if t_struct else None, "struct_writes": n_struct,
    }
    if cl is not None:
        cres = cl.finish()
        out.update(c_s=t_c, c_rate=total / t_c, c_equal=same_counters(r, cres))
    return out


LACKEY_PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
/* A small workload: build and sort records, hash a buffer, keep a ring log. */
#define NREC 6000
#define BUF (1 << 15)
#define ROUNDS 3
struct rec { long key; char name[24]; double val; };
static long ring[512];
static char config[256];
static int cmp(const void *a, const void *b) {
    long x = ((const struct rec *)a)->key, y = ((const struct rec *)b)->key;
    return (x > y) - (x < y);
}
int main(void) {
    struct rec *r = malloc(sizeof *r * NREC);
    unsigned long h = 1469598103934665603UL;
    for (int i = 0; i < NREC; i++) {
        r[i].key = (i * 2654435761UL) % 1000003;
        snprintf(r[i].name, sizeof r[i].name, "rec%d", i);
        r[i].val = i * 0.5;
        ring[i % 512] = r[i].key;
    }
    qsort(r, NREC, sizeof *r, cmp);
    char *buf = malloc(BUF);
    for (int round = 0; round < ROUNDS; round++) {
        memset(buf, round, BUF);
        for (int i = 0; i < BUF; i++) h = (h ^ (unsigned char)buf[i]) * 1099511628211UL;
        snprintf(config, sizeof config, "round=%d hash=%lx", round, h);
    }
    printf("%ld %lx %s\n", r[NREC / 2].key, h, config);
    free(buf);
    free(r);
    return 0;
}
"""


def bench_lackey(workdir: Path) -> dict:
    if shutil.which("valgrind") is None:
        return {"error": "valgrind is not installed (apt-get install valgrind): lackey part skipped"}
    target = ["/bin/ls", "-la", "/usr/bin"]
    what = "/bin/ls -la /usr/bin"
    if shutil.which("gcc"):
        src = workdir / "workload.c"
        exe = workdir / "workload"
        src.write_text(LACKEY_PROGRAM)
        subprocess.run(["gcc", "-O1", "-o", str(exe), str(src)], check=True)
        target, what = [str(exe)], "workload.c (sort 6000 records, hash 3 x 32 KiB), gcc -O1"
    log = workdir / "trace.lackey"
    t0 = time.perf_counter()
    subprocess.run(["valgrind", "--tool=lackey", "--trace-mem=yes", f"--log-file={log}", *target],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t_record = time.perf_counter() - t0
    with open(log, "rb") as f:
        lines = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b""))
    size_mb = log.stat().st_size / 1e6
    # import rate: best of 3 (the file is in the page cache after the first)
    best = None
    for _ in range(3):
        src = open_trace(log, "lackey")
        t0 = time.perf_counter()
        writes = sum(len(g) for g, _, _ in src.columns())
        dt = time.perf_counter() - t0
        best = dt if best is None or dt < best else best
    # replay with a policy: the first sub-page of the 32 most-written pages (guard-like)
    gpa_all = np.concatenate([g for g, _, _ in open_trace(log, "lackey").columns()])
    pages, counts = np.unique(gpa_all >> np.uint64(12), return_counts=True)
    top = pages[np.argsort(-counts)[:32]]
    model = ProtectionModel({int(g): 0xFFFFFFFE for g in top})
    from sppkit.engines.replay import replay

    t0 = time.perf_counter()
    res = replay(log, model, "lackey")
    t_replay = time.perf_counter() - t0
    return {"program": what, "record_s": t_record, "lines": lines, "mb": size_mb, "writes": writes,
            "import_s": best, "lines_per_s": lines / best, "replay_s": t_replay,
            "page_granular": res.page_granular_exits, "violations": res.violations, "spp_misses": res.spp_misses,
            "path": log}


def bench_memory_lackey(log: Path, workdir: Path, times: int = 8) -> list[tuple[str, int, float]]:
    """tracemalloc peak of import + replay for the trace and the trace repeated."""
    big = workdir / "trace8.lackey"
    with open(big, "wb") as out:
        for _ in range(times):
            with open(log, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
    model = ProtectionModel(synthetic_policy())
    from sppkit.engines.replay import replay

    rows = []
    for p, label in ((log, "lackey trace x1"), (big, f"lackey trace x{times}")):
        tracemalloc.start()
        res = replay(p, model, "lackey")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        rows.append((label, res.writes, peak / 2**20))
    big.unlink()
    return rows


def _vm_hwm_mib() -> float:
    """Peak RSS of this process (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_rss(n: int) -> None:
    """(child process) replay n synthetic writes; print peak RSS in MiB."""
    model = ProtectionModel(synthetic_policy())
    gen = Synthetic()
    rp = Replayer(model)
    done = 0
    while done < n:
        k = min(CHUNK, n - done)
        rp.feed_columns(*gen.chunk(k))
        done += k
    print(json.dumps({"writes": n, "rss_mib": _vm_hwm_mib()}))


def bench_memory_rss(sizes) -> list[tuple[int, float]]:
    rows = []
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "--child-rss", str(n)], check=True, capture_output=True,
                             text=True)
        d = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((d["writes"], d["rss_mib"]))
    return rows


# =====================================================================================


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writes", type=int, default=100_000_000, help="synthetic trace length")
    ap.add_argument("--quick", action="store_true", help="10 million writes, smaller memory runs")
    ap.add_argument("--child-rss", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child_rss:
        child_rss(a.child_rss)
        return
    total = 10_000_000 if a.quick else a.writes
    t_start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="sppkit-bench-"))
    try:
        console.print(f"[bold]sppkit replay benchmark[/] — numpy {np.__version__}, Python "
                      f"{sys.version.split()[0]}, {os.cpu_count()} CPUs; one core used")
        s = bench_synthetic(total, workdir)
        t = Table(title=f"1. synthetic trace: {total:,} writes with locality (chunks of {CHUNK:,})")
        for col in ("replay", "seconds", "M writes/s", "note"):
            t.add_column(col, justify="left" if col in ("replay", "note") else "right")
        t.add_row("sppkit (numpy), columns", f"{s['numpy_s']:.2f}", f"{s['numpy_rate'] / 1e6:,.1f}",
                  "target >= 50 M/s")
        if s.get("struct_rate"):
            t.add_row("sppkit (numpy), structured chunks", "", f"{s['struct_rate'] / 1e6:,.1f}",
                      f"importer-shaped input, first {s['struct_writes']:,} writes")
        if "c_rate" in s:
            t.add_row("C loop (gcc -O2 -march=native)", f"{s['c_s']:.2f}", f"{s['c_rate'] / 1e6:,.1f}",
                      "same arrays, same run; counters "
                      + ("[green]identical[/]" if s["c_equal"] else "[red]DIFFER[/]"))
            t.add_row("numpy time / C time", f"{s['numpy_s'] / s['c_s']:.2f}x", "", "target <= 2x")
        else:
            t.add_row("C loop", "—", "—", "gcc not found: comparison skipped")
        t.add_row("(trace generation, not timed above)", f"{s['gen_s']:.2f}", "", "")
        console.print(t)
        console.print(f"   accesses {s['accesses']:,}, page-granular exits {s['page_granular']:,}, "
                      f"SPP violations {s['violations']:,}, protected pages {s['protected_pages']}")

        lk = bench_lackey(workdir)
        if "error" in lk:
            console.print(f"[yellow]2. lackey: {lk['error']}[/]")
        else:
            t = Table(title=f"2. valgrind lackey trace of {lk['program']}")
            t.add_column("what")
            t.add_column("value", justify="right")
            t.add_row("recording under valgrind", f"{lk['record_s']:.2f} s")
            t.add_row("trace", f"{lk['lines']:,} lines, {lk['mb']:.1f} MB, {lk['writes']:,} writes (S+M)")
            t.add_row("import (parse only), best of 3", f"{lk['import_s']:.3f} s")
            t.add_row("lackey import rate", f"{lk['lines_per_s'] / 1e6:,.2f} M lines/s (target >= 2)")
            t.add_row("import + replay (32 hottest pages, sub-page 0 protected)",
                      f"{lk['replay_s']:.3f} s; page-granular {lk['page_granular']:,}, "
                      f"violations {lk['violations']:,}, misses {lk['spp_misses']}")
            console.print(t)

        t = Table(title="3. peak memory against trace length")
        t.add_column("run")
        t.add_column("writes", justify="right")
        t.add_column("peak", justify="right")
        if "error" not in lk:
            for label, w, mib in bench_memory_lackey(lk["path"], workdir):
                t.add_row(f"{label}: import + replay (tracemalloc)", f"{w:,}", f"{mib:,.1f} MiB")
        sizes = (total // 10, total // 2)
        for w, mib in bench_memory_rss(sizes):
            t.add_row("synthetic replay, child process (peak RSS)", f"{w:,}", f"{mib:,.1f} MiB")
        console.print(t)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    console.print(f"total benchmark time {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
