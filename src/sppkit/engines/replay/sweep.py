"""Sweep: for each of many candidate regions, what protecting it *alone* would cost —
exits under page-granular protection vs sub-page (SPP) protection — in one pass.

The pass builds, for every page any candidate touches, a histogram of accesses by
(first sub-page, last sub-page) touched: at most 32 × 32 cells a page.  A region
covers the sub-pages ``[a, b]`` of each of its pages, so protecting it alone makes an
access violate iff ``s0 <= b and s1 >= a`` (``all-touched``) or ``a <= s0 <= b``
(``first-byte``); with 2-D prefix sums each (region, page) pair costs O(1).  The
figures equal a separate :func:`~sppkit.engines.replay.replay` of a policy holding
just that region (tested).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from ...arch.processor import SPP_WRITE_CHECK_ALL, SPP_WRITE_CHECK_FIRST, SPP_WRITE_CHECKS
from .formats import CHUNK_RECORDS, DiagnosedCounts, Diagnostics, list_shards, open_trace
from .replay import (CostModel, PageIndex, _accumulate, _byte_range, _cost_arg, _elapsed_arg, _replay_dask_generic,
                     _top_arg, _want_progress, check_run_args, trace_columns)

__all__ = ["SweepModel", "SweepCounters", "SweepRow", "sweep", "sweep_shard", "candidates_from_elf",
           "candidates_from_policy"]

SUB = 128
#: Pages the candidates of one sweep may cover (the histogram holds 1024 counters a page).
MAX_SWEEP_PAGES = 1 << 16


@dataclass(frozen=True)
class SweepRow:
    name: str
    start: int
    length: int
    pages: int
    page_granular_exits: int
    violations: int
    spp_misses: int

    @property
    def exits_avoided(self) -> int:
        return self.page_granular_exits - self.violations

    def to_dict(self, cost: CostModel | None = None) -> dict:
        d = {"name": self.name, "start": self.start, "length": self.length, "pages": self.pages,
             "page_granular_exits": self.page_granular_exits, "violations": self.violations,
             "spp_misses": self.spp_misses, "exits_avoided": self.exits_avoided,
             "reduction": None if self.page_granular_exits == 0 else
             1 - (self.violations + self.spp_misses) / self.page_granular_exits}
        if cost is not None:
            est = cost.estimate(self.page_granular_exits, self.violations, self.spp_misses)
            d["saved_cycles"] = est["saved"]
        return d


def candidates_from_policy(policy) -> list[tuple[str, int, int]]:
    return [(e.name, e.start, e.length) for e in policy]


def candidates_from_elf(image) -> list[tuple[str, int, int]]:
    """Every sized object symbol of a guest image (``name`` or ``name@addr`` when a
    name repeats)."""
    syms = [s for s in image.all_symbols if s.kind in ("object", "common", "tls") and s.size > 0]
    seen: dict[str, int] = {}
    for s in syms:
        seen[s.name] = seen.get(s.name, 0) + 1
    out = []
    done = set()
    for s in syms:
        if (s.addr, s.size) in done:
            continue
        done.add((s.addr, s.size))
        name = s.name if seen[s.name] == 1 else f"{s.name}@{s.addr:#x}"
        out.append((name, s.addr, s.size))
    return out


class SweepModel:
    """Candidate regions ``(name, start, length)`` (rounded out to sub-pages, as
    policies are) and the page index over every page they touch.  Picklable."""

    def __init__(self, candidates: Iterable[tuple[str, int, int]], *, spp_write_check: str = SPP_WRITE_CHECK_ALL,
                 spp_mode: str = "lazy") -> None:
        if spp_write_check not in SPP_WRITE_CHECKS:
            raise ValueError(f"spp_write_check={spp_write_check!r}: must be one of {', '.join(SPP_WRITE_CHECKS)}")
        if spp_mode not in ("lazy", "eager"):
            raise ValueError(f"spp_mode={spp_mode!r}: must be 'lazy' or 'eager'")
        self.candidates = []
        for i, item in enumerate(candidates):
            try:
                name, start, length = item
            except (TypeError, ValueError):
                raise TypeError(f"sweep candidate {i}: {item!r} is not a (name, start, length) triple") from None
            start, length = _byte_range((start, length), f"sweep candidate {str(name)!r}")
            self.candidates.append((str(name), start, length))
        if not self.candidates:
            raise ValueError("sweep: no candidate regions (give --policy, --protect or --elf with object symbols)")
        rows_c, rows_g, rows_a, rows_b = [], [], [], []
        total = 0
        for ci, (name, start, length) in enumerate(self.candidates):
            total += ((start + length - 1) >> 12) - (start >> 12) + 1
            if total > MAX_SWEEP_PAGES:
                raise ValueError(f"sweep: the candidate regions cover more than {MAX_SWEEP_PAGES:,} pages "
                                 f"(at {name!r}); sweep fewer or smaller regions")
            lo = start & ~(SUB - 1)
            hi = (start + length + SUB - 1) & ~(SUB - 1)
            sub = lo
            while sub < hi:
                g = sub >> 12
                page_end = min(hi, (g + 1) << 12)
                rows_c.append(ci)
                rows_g.append(g)
                rows_a.append((sub & 0xFFF) >> 7)
                rows_b.append(((page_end - 1) & 0xFFF) >> 7)
                sub = page_end
        self.index = PageIndex(rows_g)
        self.row_cand = np.array(rows_c, np.int64)
        self.row_pid = self.index.lookup(np.array(rows_g, np.uint64))
        self.row_a = np.array(rows_a, np.int64)
        self.row_b = np.array(rows_b, np.int64)
        self.spp_write_check = spp_write_check
        self.spp_mode = spp_mode

    @property
    def npages(self) -> int:
        return self.index.n

    def new_counters(self) -> "SweepCounters":
        return SweepCounters(hist=np.zeros(self.npages * 1024, np.int64))

    def feed_columns(self, c: "SweepCounters", gpa, size) -> None:
        gpa, size, _ = trace_columns(gpa, size, first=c.writes)
        accesses, parts = self.index.select(gpa, size, first=c.writes)  # may refuse a record: nothing counted yet
        c.writes += len(gpa)
        c.accesses += accesses
        for pid, off, length, _src in parts:
            s0 = off >> 7
            s1 = s0 if self.spp_write_check == SPP_WRITE_CHECK_FIRST else (off + length - 1) >> 7
            _accumulate(c.hist, pid * 1024 + s0 * 32 + s1)

    def rows(self, c: "SweepCounters") -> list[SweepRow]:
        P = self.npages
        h = c.hist.reshape(P, 32, 32)
        total = h.sum(axis=(1, 2))
        cum = np.cumsum(h, axis=1)  # over s0 <= b
        cum = np.flip(np.cumsum(np.flip(cum, axis=2), axis=2), axis=2)  # over s1 >= a
        viol_rows = cum[self.row_pid, self.row_b, self.row_a]
        pg_rows = total[self.row_pid]
        n = len(self.candidates)
        pg = np.bincount(self.row_cand, weights=pg_rows, minlength=n).astype(np.int64)
        viol = np.bincount(self.row_cand, weights=viol_rows, minlength=n).astype(np.int64)
        pages = np.bincount(self.row_cand, minlength=n)
        misses = np.zeros(n, np.int64)
        if self.spp_mode == "lazy":
            written = pg_rows > 0
            region = self.index.gfns[self.row_pid].astype(np.int64) >> 9
            pairs = np.unique(np.stack([self.row_cand[written], region[written]], axis=1), axis=0)
            if len(pairs):
                misses = np.bincount(pairs[:, 0], minlength=n).astype(np.int64)
        return [SweepRow(name, start, length, int(pages[i]), int(pg[i]), int(viol[i]), int(misses[i]))
                for i, (name, start, length) in enumerate(self.candidates)]


@dataclass
class SweepCounters(DiagnosedCounts):
    hist: np.ndarray
    writes: int = 0
    accesses: int = 0
    #: the malformed records skipped (see :attr:`skipped`, :attr:`examples`)
    diagnostics: Diagnostics = field(default_factory=Diagnostics)
    files: list = field(default_factory=list)
    formats: list = field(default_factory=list)

    def merge(self, later: "SweepCounters") -> "SweepCounters":
        self.hist += later.hist
        self.writes += later.writes
        self.accesses += later.accesses
        self.diagnostics.merge(later.diagnostics)
        self.files.extend(later.files)
        self.formats.extend(later.formats)
        return self


def sweep_shard(path, model: SweepModel, fmt: str = "auto", *, size: int = 8, strict: bool = False,
                chunk_records: int = CHUNK_RECORDS, on_chunk=None) -> SweepCounters:
    diag = Diagnostics(strict=strict)
    src = open_trace(path, fmt, size=size, chunk_records=chunk_records, diagnostics=diag)
    c = model.new_counters()
    for gpa, sz, _rip in src.columns():
        model.feed_columns(c, gpa, sz)
        if on_chunk is not None:
            on_chunk(src)
    c.diagnostics = diag
    c.files = [str(path)]
    c.formats = [src.format]
    return c


_SORT_KEYS = {
    "avoided": lambda r: (-r.exits_avoided, -r.page_granular_exits, r.name),
    "page": lambda r: (-r.page_granular_exits, r.violations, r.name),
    "spp": lambda r: (-r.violations, -r.page_granular_exits, r.name),
    "name": lambda r: (r.name, r.start),
    "address": lambda r: (r.start, r.name),
}
SORT_KEYS = tuple(_SORT_KEYS)


@dataclass
class SweepResult:
    rows: list
    counters: SweepCounters
    model: SweepModel
    elapsed: float
    trace: str | None = None
    cost: CostModel | None = None

    def __post_init__(self) -> None:
        _cost_arg(self.cost)
        elapsed = _elapsed_arg(self.elapsed)
        if elapsed is None:
            raise TypeError("elapsed=None: a sweep's elapsed time is a number of seconds")
        self.elapsed = elapsed

    def to_dict(self, top: int | None = None) -> dict:
        """The report: ``top`` rows (an int >= 0; 0 or None: all)."""
        top = _top_arg(top)
        rows = self.rows if top is None else self.rows[:top]
        return {
            "trace": self.trace, "shards": len(self.counters.files), "formats": sorted(set(self.counters.formats)),
            "writes": self.counters.writes, "accesses": self.counters.accesses,
            "skipped_records": self.counters.skipped, "skipped_examples": list(self.counters.examples),
            "spp_write_check": self.model.spp_write_check, "spp_mode": self.model.spp_mode,
            "candidates": len(self.model.candidates), "elapsed_seconds": self.elapsed,
            "sweep": [r.to_dict(self.cost) for r in rows],
        }


def sweep(trace, model: SweepModel, fmt: str = "auto", *, sort: str = "avoided", size: int = 8,
          strict: bool = False, chunk_records: int = CHUNK_RECORDS, progress: bool = False, dask: bool = False,
          scheduler: str | None = None, workers: int | None = None, cost: CostModel | None = None) -> SweepResult:
    """One pass over a trace (file or shard directory) for every candidate of ``model``;
    rows sorted by ``sort`` (avoided, page, spp, name, address).  Every argument is
    checked before the trace is read (as :func:`~sppkit.engines.replay.replay` checks
    its own)."""
    if not isinstance(model, SweepModel):
        raise TypeError(f"sweep needs a SweepModel, got {type(model).__name__}")
    if not isinstance(sort, str) or sort not in _SORT_KEYS:
        raise ValueError(f"sort {sort!r}: must be one of {', '.join(_SORT_KEYS)}")
    check_run_args(fmt, size, chunk_records, cost, dask=dask, scheduler=scheduler, workers=workers)
    shards = list_shards(trace)
    t0 = time.perf_counter()
    kw: dict[str, Any] = {"size": size, "strict": strict, "chunk_records": chunk_records}
    if dask:
        parts = _replay_dask_generic(sweep_shard, shards, model, fmt, kw, scheduler=scheduler, workers=workers,
                                     progress=progress)
    else:
        parts = []
        if _want_progress(progress):
            from .replay import _progress_bar
            import os

            total = sum(os.path.getsize(p) for p in shards)
            with _progress_bar(total, "bytes") as bar:
                task = bar.add_task("sweep", total=total)
                done = 0
                for p in shards:
                    parts.append(sweep_shard(p, model, fmt, on_chunk=lambda s: bar.update(
                        task, completed=done + s.bytes_done), **kw))
                    done += os.path.getsize(p)
        else:
            parts = [sweep_shard(p, model, fmt, **kw) for p in shards]
    acc = model.new_counters()
    for p in parts:
        acc.merge(p)
    rows = sorted(model.rows(acc), key=_SORT_KEYS[sort])
    return SweepResult(rows, acc, model, time.perf_counter() - t0, str(trace), cost)
