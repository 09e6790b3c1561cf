"""Vectorised what-if replay of write traces: page-granular exits vs SPP.

Semantics (docs/replay.md) — identical, counter for counter, to feeding every
access through :meth:`sppkit.Vm.write` one by one on a Vm whose memslots cover every
touched page, with SPP enabled (lazy SPPT), the policy's access maps set and no
violation handler (every violation SKIPped):

* a trace record is one write of ``size`` bytes at guest-physical ``gpa``; a write
  crossing 4-KiB boundaries is one *access* per page (what the hardware and KVM do);
* an access to a page holding a protected sub-page is a **page-granular exit**: with
  page-granular write protection (EPT W = 0 on the whole page) it would exit;
* an access **violates** when it touches a protected sub-page (``all-touched``, the
  default) or when the sub-page of its first byte is protected (``first-byte``, as
  Bochs checks);
* lazy SPPT: the first access to a protected page in each 2-MiB region takes one **SPP
  miss** (the region's SPPT entries are built then); an eager SPPT takes none.

Per chunk the work is a handful of numpy passes over all records (page-crossing
count, a range test that selects records near protected pages) and exact work on the
few records that pass it (page split, access-map lookup, counters).  Memory is one
chunk plus counters sized by the policy, whatever the trace's length.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from ...arch.processor import SPP_WRITE_CHECK_ALL, SPP_WRITE_CHECK_FIRST, SPP_WRITE_CHECKS
from ...policy import MAX_PROTECTED_PAGES
from .formats import (
    CHUNK_RECORDS,
    NO_RIP,
    RIP_CARRY,
    DiagnosedCounts,
    Diagnostics,
    MissingDependency,
    TraceFormatError,
    check_read_args,
    list_shards,
    shown,
    open_trace,
    refuse_negative,
    wrap_reason,
    wrapping,
)

__all__ = [
    "MAX_CYCLES", "MAX_PROTECTED_PAGES", "CostModel", "PageIndex", "ProtectionModel", "ReplayResult", "ShardResult", "Replayer",
    "SubCounts", "check_run_args", "maps_from_ranges", "replay", "replay_arrays", "replay_shard", "trace_columns",
]

FULL_MAP = 0xFFFF_FFFF
REGION_2M_PAGES = 512
_LOOKBACK = 16  # a record of at most 65535 bytes starts at most 16 pages before its last page
_U64 = np.uint64
_MAX_GFN = (1 << 52) - 1  # the last 4-KiB page of the 64-bit address space


def _int_arg(value, what: str) -> int:
    """A Python or numpy integer (not a bool) as an int, else a TypeError naming ``what``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def _top_arg(n, what: str = "top") -> int | None:
    """A row count: an integer >= 0 (not a bool), 0 or None meaning all rows (returned
    as None), else a ValueError/TypeError."""
    if n is None:
        return None
    n = _int_arg(n, what)
    if n < 0:
        raise ValueError(f"{what}={n}: must be >= 0")
    return n or None


def _byte_range(item, what: str) -> tuple[int, int]:
    """``(start, length)`` checked as a policy range is: integers, start >= 0, length > 0,
    inside the 64-bit address space; else a ValueError/TypeError naming ``what``."""
    try:
        start, length = item
    except (TypeError, ValueError):
        raise TypeError(f"{what}: {item!r} is not a (start, length) pair") from None
    start, length = _int_arg(start, f"{what}: start"), _int_arg(length, f"{what}: length")
    if start < 0:
        raise ValueError(f"{what}: start {start} is negative")
    if length <= 0:
        raise ValueError(f"{what}: length {length} must be positive")
    if start + length > 1 << 64:
        raise ValueError(f"{what}: range {start:#x}+{length:#x} runs past the 64-bit address space")
    return start, length


def _int_column(a, name: str, first: int | None = None) -> np.ndarray:
    """``a`` as a 1-D array of integers >= 0 (ValueError/TypeError else).  With ``first``
    (a column of trace records), a negative value is a TraceFormatError naming its
    record, ``record first + i``."""
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValueError(f"the {name} column must be 1-D, got shape {a.shape}")
    if len(a) and a.dtype.kind not in "ui":
        raise TypeError(f"the {name} column must hold integers, got dtype {a.dtype}")
    if first is not None:
        refuse_negative(a, name, first)
    elif a.dtype.kind == "i" and len(a) and int(a.min()) < 0:
        raise ValueError(f"the {name} column holds a negative value ({int(a.min())})")
    return a


def trace_columns(gpa, size, rip=None, *, first: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Check and convert write-record columns: ``gpa`` u64, ``size`` u16 (1..65535),
    ``rip`` u64 or None — equal-length 1-D integer arrays (ValueError/TypeError else).
    A record with a negative field or a size outside 1..65535 is a
    :class:`TraceFormatError` (a ValueError) naming it: ``record first + i``.  (A write
    running past the end of the 64-bit address space is refused, naming its record, by
    :meth:`PageIndex.select`, at no extra pass.)  O(1) for columns that already have
    those dtypes, bar the size range check."""
    gpa, size = _int_column(gpa, "gpa", first), _int_column(size, "size", first)
    r = None if rip is None else _int_column(rip, "rip", first)
    if len(size) != len(gpa) or (r is not None and len(r) != len(gpa)):
        lens = f"gpa {len(gpa)}, size {len(size)}" + ("" if r is None else f", rip {len(r)}")
        raise ValueError(f"trace columns of different lengths: {lens}")
    if len(gpa) == 0:
        return gpa.astype(np.uint64), size.astype(np.uint16), None if r is None else r.astype(np.uint64)
    if size.dtype != np.uint16:
        if size.min() < 1 or size.max() > 0xFFFF:
            _bad_size(size, first)
        size = np.ascontiguousarray(size, np.uint16)
    else:
        size = np.ascontiguousarray(size)  # a structured chunk's field is a strided view
        if size.min() < 1:
            _bad_size(size, first)
    gpa = np.ascontiguousarray(gpa, np.uint64)
    if r is not None:
        r = np.ascontiguousarray(r, np.uint64)
    return gpa, size, r


def _bad_size(size: np.ndarray, first: int):
    j = int(np.flatnonzero((size < 1) | (size > 0xFFFF))[0])
    raise TraceFormatError(f"record {first + j}: size {int(size[j])} out of range: record sizes must be 1..65535")


def _check_wrap(gpa: np.ndarray, size: np.ndarray, cross: np.ndarray, first: int) -> None:
    """A :class:`TraceFormatError` naming the first record (``first`` + its index) whose
    write runs past the end of the 64-bit address space.  Only page-crossing records can
    (2**64 is a page boundary), and they are few: this is cheap."""
    idx = np.flatnonzero(cross)
    wraps = wrapping(gpa[idx], size[idx])
    if len(wraps):
        j = int(idx[wraps[0]])
        raise TraceFormatError(f"record {first + j}: {wrap_reason(gpa[j], size[j])}")


# =====================================================================================
# cost model
# =====================================================================================


#: The largest cycle cost per exit (or SPP miss) a :class:`CostModel` takes: totals
#: (counts of at most ~2**70 exits) stay finite floats, so reports never hold inf or
#: nan (which JSON cannot carry).
MAX_CYCLES = 1e12


def _cycles(name: str, v) -> None:
    """A cycle cost: a real number 0..MAX_CYCLES (TypeError / ValueError naming it)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"CostModel {name}={shown(v)}: must be a number of cycles")
    if not 0 <= v <= MAX_CYCLES:  # False for nan too; exact for big ints
        raise ValueError(f"CostModel {name}={shown(v)}: must be a finite number of cycles, 0 to {MAX_CYCLES:g}")


@dataclass(frozen=True)
class CostModel:
    """Cycles per exit, for a what-if estimate.

    * ``exit_cycles`` (500): a VM-exit + VM-entry round trip handled in the kernel on a
      Haswell-class CPU (~3000 on the first VT-x parts, ~400 on Broadwell) — Bitdefender's
      "HVI extensions" paper (bitdefender/hvmi, docs/papers), citing Intel.
    * ``user_exit_cycles`` (1500): the same exit handled in user space (KVM_RUN returns to
      the VMM), ~3x the in-kernel cost: KVM's ``vmexit`` unit test measured
      ``inl_from_qemu`` / ``inl_from_kernel`` = 46747 / 15218 ≈ 3.1 and 44826 / 13518 ≈ 3.3
      cycles (nested, so only the ratio is used) — Paolo Bonzini, "VMX optimizations"
      cover letter [KVM-VMXOPT].
    * ``miss_cycles`` (None = ``exit_cycles``): an SPP miss is always handled in the
      kernel (KVM rebuilds the region's SPPT entries), even when violations go to user
      space.

    Page-granular: every page-granular exit costs one exit.  SPP: every violation costs
    one exit, every SPP miss ``miss_cycles``.

    Each cost is a number 0..:data:`MAX_CYCLES` (1e12; a ValueError else, a TypeError
    for what is not a number), so that every figure of :meth:`estimate` is a finite
    float.
    """

    exit_cycles: float = 500.0
    user_exit_cycles: float = 1500.0
    miss_cycles: float | None = None

    def __post_init__(self) -> None:
        for name in ("exit_cycles", "user_exit_cycles", "miss_cycles"):
            v = getattr(self, name)
            if v is None and name == "miss_cycles":
                continue
            _cycles(name, v)

    def estimate(self, page_granular: int, violations: int, misses: int) -> dict:
        """Cycles under page-granular protection vs SPP for these counts (integers
        0..2**64).  ``speedup`` is None when SPP costs nothing (or so little that the
        ratio is not a finite float); every number is finite."""
        for name, v in (("page_granular", page_granular), ("violations", violations), ("misses", misses)):
            if not 0 <= _int_arg(v, f"estimate: {name}") <= 1 << 64:
                raise ValueError(f"estimate: {name}={v!r}: must be a count, 0..2**64")
        page_granular, violations, misses = int(page_granular), int(violations), int(misses)
        ck, cu = float(self.exit_cycles), float(self.user_exit_cycles)
        cm = ck if self.miss_cycles is None else float(self.miss_cycles)
        pg_k, pg_u = page_granular * ck, page_granular * cu
        spp_k = violations * ck + misses * cm
        spp_u = violations * cu + misses * cm
        return {
            "cycles_per_exit": {"kernel": ck, "user_space": cu, "spp_miss": cm},
            "sources": {
                "kernel": "~500 cycles per VM exit round trip on Haswell (Bitdefender HVI paper citing Intel)",
                "user_space": "~3x in-kernel (KVM vmexit unit test: inl_from_qemu vs inl_from_kernel)",
                "spp_miss": "handled in the kernel (SPPT rebuilt for the 2-MiB region)",
            },
            "page_granular": {"exits": page_granular, "kernel_cycles": pg_k, "user_space_cycles": pg_u},
            "spp": {"exits": violations + misses, "violations": violations, "spp_misses": misses,
                    "kernel_cycles": spp_k, "user_space_cycles": spp_u},
            "saved": {"kernel_cycles": pg_k - spp_k, "user_space_cycles": pg_u - spp_u},
            "speedup": {"kernel": _ratio(pg_k, spp_k), "user_space": _ratio(pg_u, spp_u)},
        }


def _ratio(a: float, b: float) -> float | None:
    """a / b, or None when b is 0 or the ratio overflows (a tiny SPP cost)."""
    if b == 0:
        return None
    r = a / b
    return r if math.isfinite(r) else None


# =====================================================================================
# page index: which records touch which listed pages
# =====================================================================================


class _Scratch:
    """Reusable work buffers (allocating big arrays per chunk costs page faults), one
    set per thread: a model is shared by the threads of a dask worker."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, name: str, n: int, dtype) -> np.ndarray:
        bufs = getattr(self._local, "bufs", None)
        if bufs is None:
            bufs = self._local.bufs = {}
        b = bufs.get(name)
        if b is None or len(b) < n or b.dtype != dtype:
            b = np.empty(max(n, 1 << 16), dtype)
            bufs[name] = b
        return b[:n]


class PageIndex:
    """A sorted set of guest page numbers (gfns) with a fast membership test for
    whole chunks of write records.

    ``select(gpa, size)`` → ``(accesses, parts)``: the number of page-split accesses
    in the chunk and a list of ``(pid, off, length, src)`` arrays covering every access
    that lands on a listed page: its page's index in :attr:`gfns`, offset and length
    within the page, and its record's index in the chunk (empty list: none does).

    Two strategies:

    * *direct* (at most :attr:`MAX_DIRECT` clusters of listed pages, each spanning at
      most :attr:`DIRECT_SPAN` pages): a per-cluster table maps every page of the
      cluster to its pid (-1 if not listed); every record's first page is looked up
      with one gather (``take(mode="clip")``, out-of-range indices land on a -1
      sentinel), so only records on listed pages, and the few page-crossing records,
      get further work;
    * *filtered* (otherwise): a range test (or a hashed 2-MiB-region byte map) selects
      records near listed pages; those are split into pages and looked up exactly.
    """

    DENSE_LIMIT = 1 << 22  # entries of the dense lookup table of the filtered strategy
    CLUSTER_GAP = REGION_2M_PAGES  # pages: a bigger gap starts a new cluster
    MAX_RANGE_TESTS = 4
    MAX_DIRECT = 4
    DIRECT_SPAN = 1 << 22  # pages a direct table may span (8 MiB of int16)
    DIRECT_MERGE = 1 << 18  # clusters closer than this share one direct table

    def __init__(self, gfns) -> None:
        g = np.unique(np.asarray(gfns, dtype=np.uint64))
        self.gfns = g
        self.n = len(g)
        self._scratch = _Scratch()
        self.direct = None
        if self.n == 0:
            self.clusters = []
            return
        gi = g.astype(np.int64)
        breaks = np.flatnonzero(np.diff(gi) > self.CLUSTER_GAP) + 1
        lo_i = np.r_[0, breaks]
        hi_i = np.r_[breaks - 1, self.n - 1]
        self.c_lo = gi[lo_i]
        self.c_span = gi[hi_i] - self.c_lo  # inclusive span - 1
        self.clusters = list(zip(self.c_lo.tolist(), (self.c_lo + self.c_span).tolist()))
        total = int((self.c_span + 1).sum())
        if total <= self.DENSE_LIMIT:
            self.c_off = np.r_[0, np.cumsum(self.c_span + 1)[:-1]].astype(np.int64)
            dense = np.full(total, -1, np.int32)
            c = np.searchsorted(self.c_lo, gi, side="right") - 1
            dense[self.c_off[c] + (gi - self.c_lo[c])] = np.arange(self.n)
            self.dense: np.ndarray | None = dense
        else:
            self.dense = None
        # direct tables: clusters merged into windows while a window's table stays small
        windows = [list(c) for c in self.clusters]
        merged = [windows[0]]
        for lo, hi in windows[1:]:
            if hi - merged[-1][0] < self.DIRECT_MERGE:
                merged[-1][1] = hi
            else:
                merged.append([lo, hi])
        pid_t = np.int16 if self.n < (1 << 15) else np.int32
        if len(merged) <= self.MAX_DIRECT and max(hi - lo for lo, hi in merged) < self.DIRECT_SPAN:
            self.direct = []
            for lo, hi in merged:
                t = np.full(hi - lo + 2, -1, pid_t)  # last entry: the sentinel for out-of-range pages
                sel = (gi >= lo) & (gi <= hi)
                t[gi[sel] - lo] = np.flatnonzero(sel)
                self.direct.append((_U64(lo << 12), t))
        # candidate test on record start addresses (filtered strategy)
        if len(self.clusters) <= self.MAX_RANGE_TESTS:
            self.ranges: list[tuple[np.uint64, np.uint64]] | None = []
            for lo, hi in self.clusters:
                base = max(lo - _LOOKBACK, 0) << 12
                self.ranges.append((_U64(base), _U64(((hi + 1) << 12) - base)))
            self.bytemap = None
        else:
            self.ranges = None
            bm = np.zeros(1 << 16, bool)
            for back in (0, _LOOKBACK):
                r = (np.maximum(gi - back, 0) >> 9) & 0xFFFF
                bm[r] = True
            self.bytemap = bm

    def __len__(self) -> int:
        return self.n

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_scratch"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._scratch = _Scratch()

    # -- lookup ------------------------------------------------------------------------
    def lookup(self, pages: np.ndarray) -> np.ndarray:
        """pid (index in :attr:`gfns`) of each page number, -1 if not listed."""
        if self.n == 0:
            return np.full(len(pages), -1, np.int64)
        p = pages.astype(np.int64)
        if self.dense is not None:
            if len(self.clusters) == 1:
                k = p - self.c_lo[0]
                ok = (k >= 0) & (k <= self.c_span[0])
                return np.where(ok, self.dense[np.where(ok, k, 0)], -1).astype(np.int64)
            c = np.searchsorted(self.c_lo, p, side="right") - 1
            cc = np.maximum(c, 0)
            k = p - self.c_lo[cc]
            ok = (c >= 0) & (k >= 0) & (k <= self.c_span[cc])
            return np.where(ok, self.dense[self.c_off[cc] + np.where(ok, k, 0)], -1).astype(np.int64)
        pos = np.searchsorted(self.gfns, pages.astype(np.uint64))
        pos = np.minimum(pos, self.n - 1)
        return np.where(self.gfns[pos] == pages, pos, -1)

    # -- the per-chunk pass ----------------------------------------------------------------
    def _crossing(self, gpa: np.ndarray, size: np.ndarray, first: int = 0) -> tuple[int, np.ndarray, int]:
        """(accesses after page splitting, mask of records that cross a page boundary,
        how many do); a TraceFormatError naming the record (``first`` + its index) that
        runs past the 64-bit space, if one does."""
        n = len(gpa)
        sc = self._scratch
        t = sc.get("u32", n, np.uint32)
        np.copyto(t, gpa, casting="unsafe")  # low 32 bits
        np.bitwise_and(t, np.uint32(0xFFF), out=t)
        np.add(t, size, out=t, casting="unsafe")
        cross = sc.get("cross", n, np.bool_)
        np.greater(t, np.uint32(4096), out=cross)
        ncross = int(np.count_nonzero(cross))
        if ncross:
            _check_wrap(gpa, size, cross, first)
        if ncross == 0 or int(size.max()) <= 4096:
            return n + ncross, cross, ncross
        np.add(t, np.uint32(4095), out=t)
        np.right_shift(t, np.uint32(12), out=t)
        return int(t.sum(dtype=np.int64)), cross, ncross

    def count_accesses(self, gpa: np.ndarray, size: np.ndarray) -> int:
        """Accesses after page splitting: one per 4-KiB page each record touches (a
        TraceFormatError for a record that runs past the 64-bit address space)."""
        if len(gpa) == 0:
            return 0
        return self._crossing(gpa, size)[0]

    def candidates(self, gpa: np.ndarray) -> np.ndarray | None:
        """Indices of records that may touch a listed page (None: none do)."""
        n = len(gpa)
        if self.n == 0 or n == 0:
            return None
        sc = self._scratch
        mask = sc.get("mask", n, np.bool_)
        if self.ranges is not None:
            tmp = sc.get("u64", n, np.uint64)
            first = True
            for base, span in self.ranges:
                if base == 0:
                    src = gpa
                else:
                    np.subtract(gpa, base, out=tmp)
                    src = tmp
                if first:
                    np.less(src, span, out=mask)
                    first = False
                else:
                    m2 = sc.get("mask2", n, np.bool_)
                    np.less(src, span, out=m2)
                    np.logical_or(mask, m2, out=mask)
        else:
            tmp = sc.get("u64", n, np.uint64)
            np.right_shift(gpa, _U64(21), out=tmp)
            np.bitwise_and(tmp, _U64(0xFFFF), out=tmp)
            bytemap = self.bytemap
            assert bytemap is not None  # __init__ sets the byte map whenever it sets ranges to None
            np.take(bytemap, tmp.view(np.int64), out=mask, mode="clip")
        if not mask.any():
            return None
        return np.flatnonzero(mask)

    def _split(self, gpa, size, idx):
        """Page-split the records ``idx``: (page, off, length, src) per access."""
        g = gpa[idx]
        s = size[idx].astype(np.int64)
        off = (g & _U64(0xFFF)).astype(np.int64)
        end = off + s
        page = g >> _U64(12)
        if not (end > 4096).any():
            return page, off, s, idx
        npg = (end + 4095) >> 12
        rep = np.repeat(np.arange(len(idx)), npg)
        first = np.repeat(np.cumsum(npg) - npg, npg)
        k = np.arange(len(rep)) - first
        page = page[rep] + k.astype(np.uint64)
        a_off = np.where(k == 0, off[rep], 0)
        a_end = np.minimum(end[rep] - (k << 12), 4096)
        return page, a_off, a_end - a_off, idx[rep]

    def select(self, gpa: np.ndarray, size: np.ndarray, *, first: int = 0):
        """See the class docstring.  Pure: changes nothing but scratch buffers.  A record
        that runs past the end of the 64-bit address space is a TraceFormatError naming
        it as ``record first + i``."""
        n = len(gpa)
        if n == 0:
            return 0, []
        accesses, cross, ncross = self._crossing(gpa, size, first)
        if self.n == 0:
            return accesses, []
        if self.direct is None:
            part = self._select_filtered(gpa, size, accesses)
            return accesses, [] if part is None else [part]
        sc = self._scratch
        tmp = sc.get("u64", n, np.uint64)
        ti = tmp.view(np.int64)
        pid = None
        for k, (lo, table) in enumerate(self.direct):
            # (gpa - base) >> 12: addresses below the cluster wrap to values >= 2**52, which
            # take(mode="clip") sends to the -1 sentinel at the end of the table
            np.subtract(gpa, lo, out=tmp)
            np.right_shift(tmp, _U64(12), out=tmp)
            if pid is None:
                pid = sc.get("pid", n, table.dtype)
                np.take(table, ti, out=pid, mode="clip")
            else:
                p2 = sc.get("pid2", n, table.dtype)
                np.take(table, ti, out=p2, mode="clip")
                np.maximum(pid, p2, out=pid)
        assert pid is not None  # self.direct holds at least one table (n > 0), so the loop set pid
        hit = sc.get("mask", n, np.bool_)
        np.greater_equal(pid, 0, out=hit)
        if ncross:
            np.logical_and(hit, ~cross, out=hit)
        parts = []
        if hit.any():
            idx = np.flatnonzero(hit)
            parts.append((pid[idx].astype(np.int64), (gpa[idx] & _U64(0xFFF)).astype(np.int64),
                          size[idx].astype(np.int64), idx))
        if ncross:
            idx = np.flatnonzero(cross)
            page, off, length, src = self._split(gpa, size, idx)
            p = self.lookup(page)
            h = p >= 0
            if h.any():
                parts.append((p[h], off[h], length[h], src[h]))
        return accesses, parts

    def _select_filtered(self, gpa, size, accesses):
        idx = self.candidates(gpa)
        if idx is None:
            return None
        page, off, length, src = self._split(gpa, size, idx)
        pid = self.lookup(page)
        hit = pid >= 0
        if not hit.all():
            pid, off, length, src = pid[hit], off[hit], length[hit], src[hit]
        if len(pid) == 0:
            return None
        return pid, off, length, src


def _accumulate(arr: np.ndarray, keys: np.ndarray) -> None:
    """arr[k] += 1 for every k in keys (duplicates counted)."""
    if len(keys) == 0:
        return
    if len(keys) * 8 >= len(arr):
        arr += np.bincount(keys, minlength=len(arr))
    else:
        np.add.at(arr, keys, 1)


def _touched(off: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First and last sub-page of each access, and the 32-bit map of those touched."""
    s0 = off >> 7
    s1 = (off + length - 1) >> 7
    mask = (np.int64(2) << s1) - (np.int64(1) << s0)
    return s0, s1, mask


def _expand_bits(keys_base: np.ndarray, s0: np.ndarray, s1: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """For each row, ``keys_base + s`` for every sub-page s in [s0, s1] whose bit is set."""
    single = s0 == s1
    out = [keys_base[single] + s0[single]] if single.any() else []
    multi = ~single
    if multi.any():
        kb, a, b, m = keys_base[multi], s0[multi], s1[multi], bits[multi]
        cnt = b - a + 1
        rep = np.repeat(np.arange(len(kb)), cnt)
        first = np.repeat(np.cumsum(cnt) - cnt, cnt)
        s = a[rep] + (np.arange(len(rep)) - first)
        keep = ((m[rep] >> s) & 1).astype(bool)
        out.append(kb[rep][keep] + s[keep])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


class SubCounts:
    """Counts per (page index, sub-page) key ``pid * 32 + s``: a dense array while the
    policy is small (:attr:`DENSE_LIMIT` keys), else a dict fed with ``np.unique``."""

    DENSE_LIMIT = 1 << 21

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.dense = np.zeros(self.size, np.int64) if self.size <= self.DENSE_LIMIT else None
        self.sparse: dict | None = None if self.dense is not None else {}

    def add(self, keys: np.ndarray) -> None:
        if len(keys) == 0:
            return
        if self.dense is not None:
            _accumulate(self.dense, keys)
            return
        u, c = np.unique(keys, return_counts=True)
        d = self.sparse
        assert d is not None  # exactly one of dense and sparse is set
        for k, n in zip(u.tolist(), c.tolist()):
            d[k] = d.get(k, 0) + n

    def merge(self, other: "SubCounts") -> None:
        if self.dense is not None:
            assert other.dense is not None  # counters of one model have the same size, so the same layout
            self.dense += other.dense
        else:
            sparse, other_sparse = self.sparse, other.sparse
            assert sparse is not None and other_sparse is not None  # not dense, and same size as other: sparse
            for k, n in other_sparse.items():
                sparse[k] = sparse.get(k, 0) + n

    def nonzero(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, counts) of the non-zero keys, in key order."""
        if self.dense is not None:
            k = np.flatnonzero(self.dense)
            return k, self.dense[k]
        sparse = self.sparse
        assert sparse is not None  # exactly one of dense and sparse is set
        items = sorted((k, n) for k, n in sparse.items() if n)
        return (np.array([k for k, _ in items], np.int64), np.array([n for _, n in items], np.int64))

    def get(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, np.int64)
        if self.dense is not None:
            return self.dense[keys]
        sparse = self.sparse
        assert sparse is not None  # exactly one of dense and sparse is set
        return np.array([sparse.get(int(k), 0) for k in keys.ravel()], np.int64).reshape(keys.shape)

    def to_array(self) -> np.ndarray:
        """Dense copy (tests, small policies)."""
        if self.dense is not None:
            return self.dense.copy()
        out = np.zeros(self.size, np.int64)
        k, n = self.nonzero()
        out[k] = n
        return out


# =====================================================================================
# the protection model and its counters
# =====================================================================================


#: Most protected pages a replay handles (16 GiB of protected memory): per-page
#: counters are dense arrays.


def maps_from_ranges(ranges: Iterable[tuple[int, int]], *, limit: int = MAX_PROTECTED_PAGES):
    """Access maps of byte ranges ``(start, length)``, rounded out to whole sub-pages
    (as :meth:`sppkit.policy.Policy.access_maps`), computed with numpy:
    ``(gfns u64 sorted, maps int64)``, pages with something protected only.  ``limit``:
    the most pages the ranges may cover, 0..:data:`MAX_PROTECTED_PAGES`."""
    if not 0 <= _int_arg(limit, "limit") <= MAX_PROTECTED_PAGES:
        raise ValueError(f"limit={limit!r}: must be 0..{MAX_PROTECTED_PAGES:,} pages")
    pages, clear = [], []
    total = 0
    for i, item in enumerate(ranges):
        start, length = _byte_range(item, f"range {i}")
        lo = start & ~0x7F
        hi = (start + length + 0x7F) & ~0x7F
        g0, g1 = lo >> 12, (hi - 1) >> 12
        total += g1 - g0 + 1
        if total > limit:
            raise ValueError(f"the policy protects more than {limit:,} pages ({limit >> 8:,} MiB); "
                             "replay supports at most that many")
        c = np.full(g1 - g0 + 1, FULL_MAP, np.int64)
        c[0] &= ~((1 << ((lo & 0xFFF) >> 7)) - 1) & FULL_MAP
        c[-1] &= (2 << (((hi - 1) & 0xFFF) >> 7)) - 1
        pages.append(np.arange(g0, g1 + 1, dtype=np.uint64))
        clear.append(c)
    if not pages:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    p = np.concatenate(pages)
    c = np.concatenate(clear)
    order = np.argsort(p, kind="stable")
    p, c = p[order], c[order]
    first = np.r_[0, np.flatnonzero(np.diff(p)) + 1]
    cleared = np.bitwise_or.reduceat(c, first)
    return p[first], (~cleared) & FULL_MAP


class ProtectionModel:
    """What the replay checks against: per-page 32-bit access maps (bit i set =
    sub-page i writable), the write check and the SPPT mode.  Picklable.

    ``access_maps``: ``{gfn: map}``, or a pair of arrays ``(gfns, maps)``.
    """

    def __init__(self, access_maps, *, spp_write_check: str = SPP_WRITE_CHECK_ALL, spp_mode: str = "lazy") -> None:
        if spp_write_check not in SPP_WRITE_CHECKS:
            raise ValueError(f"spp_write_check={spp_write_check!r}: must be one of {', '.join(SPP_WRITE_CHECKS)}")
        if spp_mode not in ("lazy", "eager"):
            raise ValueError(f"spp_mode={spp_mode!r}: must be 'lazy' or 'eager'")
        if isinstance(access_maps, dict):
            keys = [_int_arg(k, "access maps: gfn") for k in access_maps]
            vals = [_int_arg(v, f"access map of gfn {k:#x}") for k, v in zip(keys, access_maps.values())]
            for k, v in zip(keys, vals):
                if not 0 <= k <= _MAX_GFN:
                    raise ValueError(f"access maps: gfn {k:#x} is outside the 64-bit address space "
                                     f"(0..{_MAX_GFN:#x})")
                if not 0 <= v <= FULL_MAP:
                    raise ValueError(f"access map {v!r} for gfn {k:#x} is not a 32-bit value")
            g = np.array(keys, np.uint64)
            m = np.array(vals, np.int64)
        else:
            try:
                g, m = access_maps
            except (TypeError, ValueError):
                raise TypeError("access maps: expected {gfn: map} or a pair of arrays (gfns, maps), got "
                                f"{type(access_maps).__name__}") from None
            g, m = _int_column(g, "gfns"), _int_column(m, "access maps")
            if len(g) != len(m):
                raise ValueError(f"access maps: {len(g)} gfns but {len(m)} maps")
            if len(g) and g.max() > _MAX_GFN:
                raise ValueError(f"access maps: gfn {int(g.max()):#x} is outside the 64-bit address space "
                                 f"(0..{_MAX_GFN:#x})")
            if len(m) and m.max() > FULL_MAP:
                bad = int(np.argmax(m))
                raise ValueError(f"access map {int(m[bad])!r} for gfn {int(g[bad]):#x} is not a 32-bit value")
            g, m = g.astype(np.uint64), m.astype(np.int64)
        keep = m != FULL_MAP
        g, m = g[keep], m[keep]
        if len(np.unique(g)) != len(g):
            raise ValueError("access maps: a gfn appears twice")
        if len(g) > MAX_PROTECTED_PAGES:
            raise ValueError(f"{len(g):,} protected pages: replay supports at most {MAX_PROTECTED_PAGES:,}")
        order = np.argsort(g)
        self.index = PageIndex(g[order])
        self.maps = m[order]
        self.spp_write_check = spp_write_check
        self.spp_mode = spp_mode

    @classmethod
    def from_policy(cls, policy, **kw) -> "ProtectionModel":
        """The access maps of a :class:`~sppkit.policy.Policy` (as ``Policy.access_maps()``,
        computed with numpy so that large ranges stay cheap)."""
        if policy is None:
            return cls({}, **kw)
        return cls(maps_from_ranges((e.start, e.length) for e in policy), **kw)

    @property
    def gfns(self) -> np.ndarray:
        return self.index.gfns

    @property
    def npages(self) -> int:
        return self.index.n

    def new_counters(self) -> "ShardResult":
        return ShardResult.empty(self.npages)


@dataclass
class ShardResult(DiagnosedCounts):
    """Counters of one replayed piece of trace (a shard, or a whole trace); mergeable in
    trace order with :meth:`merge`.  Per-page arrays are indexed like the model's gfns."""

    writes: int = 0
    accesses: int = 0
    page_granular: int = 0
    violations: int = 0
    pg_per_page: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    viol_per_page: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    viol_per_sub: SubCounts = field(default_factory=lambda: SubCounts(0))
    writes_per_sub: SubCounts = field(default_factory=lambda: SubCounts(0))
    ip_counts: dict = field(default_factory=dict)
    #: the malformed records skipped (see :attr:`skipped`, :attr:`examples`)
    diagnostics: Diagnostics = field(default_factory=Diagnostics)
    last_ip: int = int(RIP_CARRY)
    files: list = field(default_factory=list)
    formats: list = field(default_factory=list)

    @classmethod
    def empty(cls, npages: int) -> "ShardResult":
        return cls(
            pg_per_page=np.zeros(npages, np.int64), viol_per_page=np.zeros(npages, np.int64),
            viol_per_sub=SubCounts(npages * 32), writes_per_sub=SubCounts(npages * 32),
        )

    def merge(self, later: "ShardResult") -> "ShardResult":
        """Add the counters of the piece of trace that follows this one.  Records of
        ``later`` whose IP is carried over (:data:`RIP_CARRY`) get this piece's last IP."""
        carry = self.last_ip
        if carry == int(RIP_CARRY):
            carry = int(NO_RIP)
        self.writes += later.writes
        self.accesses += later.accesses
        self.page_granular += later.page_granular
        self.violations += later.violations
        self.pg_per_page += later.pg_per_page
        self.viol_per_page += later.viol_per_page
        self.viol_per_sub.merge(later.viol_per_sub)
        self.writes_per_sub.merge(later.writes_per_sub)
        for ip, n in later.ip_counts.items():
            key = carry if ip == int(RIP_CARRY) else ip
            self.ip_counts[key] = self.ip_counts.get(key, 0) + n
        self.diagnostics.merge(later.diagnostics)
        self.last_ip = later.last_ip if later.last_ip != int(RIP_CARRY) else carry
        self.files.extend(later.files)
        self.formats.extend(later.formats)
        return self


class Replayer:
    """Feed chunks of write records; read the counters from :attr:`result`."""

    def __init__(self, model: ProtectionModel, *, carry: bool = False) -> None:
        if not isinstance(model, ProtectionModel):
            raise TypeError(f"Replayer needs a ProtectionModel, got {type(model).__name__}")
        self.model = model
        self.result = model.new_counters()
        self._first_byte = model.spp_write_check == SPP_WRITE_CHECK_FIRST
        #: rips equal to RIP_CARRY are the readers' "IP carried over from the previous
        #: shard" (replay_shard); in caller-given columns that value is refused
        self._carry = carry

    def feed(self, chunk: np.ndarray) -> None:
        """A structured array with ``gpa``, ``size`` and (optionally) ``rip`` fields."""
        names = chunk.dtype.names if isinstance(chunk, np.ndarray) else None
        if names is None or "gpa" not in names or "size" not in names:
            raise TypeError("a chunk must be a structured array with gpa and size (and optionally rip) fields, "
                            f"or a (gpa, size, rip) tuple of columns; got {type(chunk).__name__}"
                            + (f" of dtype {chunk.dtype}" if isinstance(chunk, np.ndarray) else ""))
        self.feed_columns(chunk["gpa"], chunk["size"], chunk["rip"] if "rip" in names else None)

    #: records handled per numpy pass: small enough for the work arrays to stay in cache
    SLICE = 1 << 18

    def feed_columns(self, gpa: np.ndarray, size: np.ndarray, rip: np.ndarray | None = None) -> None:
        """Contiguous columns: ``gpa`` u64, ``size`` (1..65535, any integer dtype),
        ``rip`` u64 or None (unknown); see :func:`trace_columns`.

        A bad record (a size outside 1..65535, a write running past the end of the 64-bit
        address space, or -- unless the chunks come from a trace reader, ``carry=True``
        -- a violating record whose rip is :data:`RIP_CARRY`) is a TraceFormatError
        naming it as ``record N``, counted from the first record fed to this Replayer;
        the call then changes no counter: every slice is computed before any is counted."""
        first = self.result.writes
        gpa, size, rip = trace_columns(gpa, size, rip, first=first)
        n = len(gpa)
        if n == 0:
            return
        step = self.SLICE
        if n <= step:
            self._apply(self._slice(gpa, size, rip, first))
            return
        done = [self._slice(gpa[k : k + step], size[k : k + step], None if rip is None else rip[k : k + step],
                            first + k) for k in range(0, n, step)]
        for counts in done:
            self._apply(counts)

    def _slice(self, gpa: np.ndarray, size: np.ndarray, rip: np.ndarray | None, first: int) -> tuple:
        """The counts of one slice of records (``first``: the index of its first record),
        computed without changing :attr:`result`: ``(writes, accesses, parts)``."""
        accesses, parts = self.model.index.select(gpa, size, first=first)
        return len(gpa), accesses, [self._count(part, rip, first) for part in parts]

    def _apply(self, counts: tuple) -> None:
        r = self.result
        writes, accesses, parts = counts
        r.writes += writes
        r.accesses += accesses
        for pid, wkeys, viol in parts:
            r.page_granular += len(pid)
            _accumulate(r.pg_per_page, pid)
            r.writes_per_sub.add(wkeys)
            if viol is None:
                continue
            vp, vkeys, u, c = viol
            r.violations += len(vp)
            _accumulate(r.viol_per_page, vp)
            r.viol_per_sub.add(vkeys)
            d = r.ip_counts
            for ip, k in zip(u.tolist(), c.tolist()):
                d[ip] = d.get(ip, 0) + k

    def _count(self, part, rip: np.ndarray | None, first: int) -> tuple:
        """The counts of one part of :meth:`PageIndex.select`: ``(pid, sub-page write
        keys, violations)``, violations None or ``(pids, sub-page keys, rips, counts)``."""
        pid, off, length, src = part
        s0, s1, touched = _touched(off, length)
        amap = self.model.maps[pid]
        denied = touched & ~amap & FULL_MAP
        if self._first_byte:
            viol = ((amap >> s0) & 1) == 0
        else:
            viol = denied != 0
        base = pid * 32
        wkeys = _expand_bits(base, s0, s1, touched)
        nv = int(np.count_nonzero(viol))
        if nv == 0:
            return pid, wkeys, None
        vkeys = _expand_bits(base[viol], s0[viol], s1[viol], denied[viol])
        rips = rip[src[viol]] if rip is not None else np.full(nv, NO_RIP)
        u, c = np.unique(rips, return_counts=True)
        if not self._carry and (u[-2:] == RIP_CARRY).any():  # sorted: RIP_CARRY, if any, is just before NO_RIP
            j = int(src[viol][rips == RIP_CARRY].min())
            raise TraceFormatError(f"record {first + j}: rip {int(RIP_CARRY):#x} is reserved (sppkit's marker for "
                                   "an IP carried over from the previous shard); it cannot be a record's rip")
        return pid, wkeys, (pid[viol], vkeys, u, c)


# =====================================================================================
# results
# =====================================================================================


class ReplayResult:
    """A whole replay: merged counters, the model, derived figures and the report."""

    def __init__(self, counters: ShardResult, model: ProtectionModel, *, cost: CostModel | None = None,
                 elapsed: float | None = None, trace: str | None = None) -> None:
        _cost_arg(cost)
        self.c = counters
        self.model = model
        self.cost = cost or CostModel()
        self.elapsed = _elapsed_arg(elapsed)
        self.trace = trace

    # -- headline numbers -----------------------------------------------------------------
    @property
    def writes(self) -> int:
        return self.c.writes

    @property
    def accesses(self) -> int:
        return self.c.accesses

    @property
    def page_granular_exits(self) -> int:
        return self.c.page_granular

    @property
    def violations(self) -> int:
        return self.c.violations

    @property
    def spp_misses(self) -> int:
        """Lazy SPPT: one miss per 2-MiB region in which a protected page was written."""
        if self.model.spp_mode == "eager":
            return 0
        touched = self.model.gfns[self.c.pg_per_page > 0]
        return int(len(np.unique(touched >> _U64(9))))

    @property
    def exits_avoided(self) -> int:
        return self.c.page_granular - self.c.violations

    @property
    def skipped_records(self) -> int:
        return self.c.skipped

    # -- per page / sub-page / IP -----------------------------------------------------------
    def page_counts(self) -> dict[int, tuple[int, int]]:
        """``{gfn: (page_granular_exits, violations)}`` for every protected page written."""
        nz = np.flatnonzero(self.c.pg_per_page)
        g = self.model.gfns
        return {int(g[i]): (int(self.c.pg_per_page[i]), int(self.c.viol_per_page[i])) for i in nz}

    def subpage_violations(self) -> dict[tuple[int, int], int]:
        """``{(gfn, sub-page): violations}`` (an access counts once for each protected
        sub-page it touches, as :class:`sppkit.vmm.Stats` does)."""
        keys, counts = self.c.viol_per_sub.nonzero()
        g = self.model.gfns
        return {(int(g[k // 32]), int(k % 32)): int(n) for k, n in zip(keys.tolist(), counts.tolist())}

    def ip_violations(self) -> dict[int | None, int]:
        """``{rip: violations}``; ``None`` for records without an IP."""
        return {(None if ip == int(NO_RIP) else ip): n for ip, n in self.c.ip_counts.items()}

    def top_pages(self, n: int | None = 10) -> list[dict]:
        n = _top_arg(n)
        pg, v = self.c.pg_per_page, self.c.viol_per_page
        order = np.lexsort((self.model.gfns, -v, -pg))
        out = []
        for i in order[:n]:
            if pg[i] == 0:
                break
            g = int(self.model.gfns[i])
            out.append({"gfn": g, "gpa": g << 12, "page_granular_exits": int(pg[i]), "violations": int(v[i]),
                        "access_map": int(self.model.maps[i])})
        return out

    def top_subpages(self, n: int | None = 10) -> list[dict]:
        n = _top_arg(n)
        keys, counts = self.c.viol_per_sub.nonzero()
        order = np.lexsort((keys, -counts))[:n]
        writes = self.c.writes_per_sub.get(keys[order])
        out = []
        for k, v, w in zip(keys[order].tolist(), counts[order].tolist(), writes.tolist()):
            g = int(self.model.gfns[k // 32])
            s = int(k % 32)
            out.append({"gfn": g, "subpage": s, "gpa": (g << 12) + 128 * s, "violations": int(v), "writes": int(w)})
        return out

    def top_ips(self, n: int | None = 10) -> list[dict]:
        n = _top_arg(n)
        items = sorted(self.ip_violations().items(), key=lambda kv: (-kv[1], -1 if kv[0] is None else kv[0]))
        return [{"rip": ip, "violations": c} for ip, c in items[:n]]

    def estimated_overhead(self) -> dict:
        return self.cost.estimate(self.page_granular_exits, self.violations, self.spp_misses)

    def to_dict(self, top: int | None = 10, image=None) -> dict:
        top = _top_arg(top)
        def sym(addr):
            if image is None or addr is None:
                return None
            try:
                hit = image.symbol_at(addr)
            except Exception:  # pragma: no cover - symbolisation is best effort
                return None
            if not hit:
                return None
            s, off = hit
            return f"{s.name}+{off:#x}" if off else s.name

        pages = self.top_pages(top)
        subs = self.top_subpages(top)
        ips = self.top_ips(top)
        if image is not None:
            for p in pages:
                p["symbol"] = sym(p["gpa"])
            for s in subs:
                s["symbol"] = sym(s["gpa"])
            for i in ips:
                i["symbol"] = sym(i["rip"])
        d: dict[str, Any] = {
            "trace": self.trace,
            "shards": len(self.c.files),
            "formats": sorted(set(self.c.formats)),
            "writes": self.writes,
            "accesses": self.accesses,
            "page_granular_exits": self.page_granular_exits,
            "violations": self.violations,
            "spp_misses": self.spp_misses,
            "exits_avoided": self.exits_avoided,
            "estimated_overhead": self.estimated_overhead(),
            "skipped_records": self.skipped_records,
            "skipped_examples": list(self.c.examples),
            "protected_pages": self.model.npages,
            "protected_pages_written": int(np.count_nonzero(self.c.pg_per_page)),
            "spp_write_check": self.model.spp_write_check,
            "spp_mode": self.model.spp_mode,
            "top_pages": pages,
            "top_subpages": subs,
            "top_ips": ips,
        }
        if self.elapsed is not None:
            d["elapsed_seconds"] = self.elapsed
            d["writes_per_second"] = _ratio(self.writes, self.elapsed)
        return d


def _cost_arg(cost) -> None:
    if cost is not None and not isinstance(cost, CostModel):
        raise TypeError(f"cost must be a CostModel or None, got {type(cost).__name__}")


def _elapsed_arg(elapsed) -> float | None:
    """``elapsed`` (seconds) as a finite float >= 0, or None; else a ValueError/TypeError."""
    if elapsed is None:
        return None
    if isinstance(elapsed, (bool, np.bool_)) or not isinstance(elapsed, (int, float, np.integer, np.floating)):
        raise TypeError(f"elapsed={elapsed!r}: must be a number of seconds or None")
    if not 0 <= elapsed < math.inf:
        raise ValueError(f"elapsed={elapsed!r}: must be a finite number of seconds >= 0")
    return float(elapsed)


# =====================================================================================
# drivers
# =====================================================================================


def check_run_args(fmt, size, chunk_records, cost, *, dask: bool, scheduler, workers, callbacks=()) -> None:
    """The arguments of :func:`replay` and :func:`~sppkit.engines.replay.sweep.sweep`,
    checked before any trace is read or any dask cluster started: the readers' (see
    :func:`~sppkit.engines.replay.formats.check_read_args`), ``cost`` a CostModel or None,
    ``scheduler`` (a non-empty address) and ``workers`` (an int >= 1) only with ``dask``
    and not together, ``callbacks`` ``(name, value)`` pairs callable or None."""
    check_read_args(fmt, size, chunk_records)
    _cost_arg(cost)
    if scheduler is not None:
        if not isinstance(scheduler, str) or not scheduler.strip():
            raise ValueError(f"scheduler={scheduler!r}: must be the address of a dask scheduler "
                             "(e.g. tcp://host:8786)")
        if not dask:
            raise ValueError("scheduler needs dask=True")
    if workers is not None:
        if isinstance(workers, (bool, np.bool_)) or not isinstance(workers, (int, np.integer)) or workers < 1:
            raise ValueError(f"workers={workers!r}: must be a positive integer (threads of the local dask cluster)")
        if not dask:
            raise ValueError("workers needs dask=True (it sets the threads of the local dask cluster)")
        if scheduler is not None:
            raise ValueError("workers sets the threads of a local dask cluster; the cluster behind scheduler has "
                             "its own workers")
    for name, fn in callbacks:
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be a callable or None, got {type(fn).__name__}")


def replay_arrays(model: ProtectionModel, chunks: Iterable) -> ReplayResult:
    """Replay an iterable of chunks (structured arrays or ``(gpa, size, rip)`` tuples)."""
    rp = Replayer(model)
    for ch in chunks:
        if isinstance(ch, tuple):
            if len(ch) not in (2, 3):
                raise ValueError(f"a chunk tuple must be (gpa, size) or (gpa, size, rip), got {len(ch)} items")
            rp.feed_columns(*ch)
        else:
            rp.feed(ch)
    acc = ShardResult.empty(model.npages)
    acc.last_ip = int(NO_RIP)
    return ReplayResult(acc.merge(rp.result), model)


def replay_shard(path, model: ProtectionModel, fmt: str = "auto", *, size: int = 8, strict: bool = False,
                 chunk_records: int = CHUNK_RECORDS, on_chunk=None, on_warning=None) -> ShardResult:
    """Replay one trace file; IPs that lackey carries over from a previous shard stay
    :data:`RIP_CARRY` until :meth:`ShardResult.merge`.  Runs on dask workers too."""
    diag = Diagnostics(strict=strict, on_warning=on_warning)
    src = open_trace(path, fmt, size=size, chunk_records=chunk_records, diagnostics=diag)
    rp = Replayer(model, carry=True)
    for gpa, sz, rip in src.columns():
        rp.feed_columns(gpa, sz, rip)
        if on_chunk is not None:
            on_chunk(src)
    r = rp.result
    r.diagnostics = diag
    r.last_ip = int(src.last_ip)
    r.files = [str(path)]
    r.formats = [src.format]
    return r


def _fold(model: ProtectionModel, parts: Iterable[ShardResult], on_warning=None) -> ShardResult:
    acc = ShardResult.empty(model.npages)
    acc.last_ip = int(NO_RIP)  # the start of the trace: no IP yet
    acc.diagnostics.on_warning = on_warning  # (what the merge reports: a bad I line ending a shard)
    for p in parts:
        acc.merge(p)
    return acc


def replay(trace, model: ProtectionModel, fmt: str = "auto", *, size: int = 8, strict: bool = False,
           chunk_records: int = CHUNK_RECORDS, progress: bool = False, dask: bool = False,
           scheduler: str | None = None, workers: int | None = None, cost: CostModel | None = None,
           on_warning=None) -> ReplayResult:
    """Replay a trace file, or a directory of shards (sorted by name, one trace), and
    return the merged :class:`ReplayResult`.

    ``dask``: replay the shards as tasks on a dask.distributed cluster (``scheduler``:
    its address; default a LocalCluster in this process) and merge the results in
    shard order — identical counters to the single-process run.

    Every argument is checked before the trace is read (see :func:`check_run_args`):
    ``chunk_records`` 1..2**30, ``size`` 1..65535, ``fmt`` a format or "auto", ``cost``
    a CostModel, ``scheduler``/``workers`` only with ``dask``.
    """
    if not isinstance(model, ProtectionModel):
        raise TypeError(f"replay needs a ProtectionModel, got {type(model).__name__}")
    check_run_args(fmt, size, chunk_records, cost, dask=dask, scheduler=scheduler, workers=workers,
                   callbacks=(("on_warning", on_warning),))
    shards = list_shards(trace)
    t0 = time.perf_counter()
    kw = {"size": size, "strict": strict, "chunk_records": chunk_records}
    parts: Iterable[ShardResult]
    if dask:
        parts = _replay_dask(shards, model, fmt, kw, scheduler=scheduler, workers=workers, progress=progress)
    else:
        parts = _replay_local(shards, model, fmt, kw, progress=progress, on_warning=on_warning)
    counters = _fold(model, parts, None if dask else on_warning)
    return ReplayResult(counters, model, cost=cost, elapsed=time.perf_counter() - t0, trace=str(trace))


def _progress_bar(total: float, what: str):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    cols = [TextColumn("[bold]{task.description}"), BarColumn()]
    cols.append(DownloadColumn() if what == "bytes" else TextColumn("{task.completed:.0f}/{task.total:.0f} shards"))
    cols.append(TimeRemainingColumn())
    return Progress(*cols, console=Console(stderr=True), transient=True)


def _want_progress(progress: bool) -> bool:
    return bool(progress) and sys.stderr.isatty()


def _replay_local(shards, model, fmt, kw, *, progress: bool, on_warning) -> Iterator[ShardResult]:
    if not _want_progress(progress):
        for p in shards:
            yield replay_shard(p, model, fmt, on_warning=on_warning, **kw)
        return
    total = sum(os.path.getsize(p) for p in shards)
    with _progress_bar(total, "bytes") as bar:
        task = bar.add_task("replay", total=total)
        done = 0
        for p in shards:
            yield replay_shard(p, model, fmt, on_warning=on_warning,
                               on_chunk=lambda src: bar.update(task, completed=done + src.bytes_done), **kw)
            done += os.path.getsize(p)
            bar.update(task, completed=done)


def dask_client(scheduler: str | None = None, workers: int | None = None):
    """A dask.distributed Client: to ``scheduler`` if given, else to a LocalCluster of
    threads in this process (``processes=False``)."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise MissingDependency(
            "--dask needs dask.distributed, which is not installed: pip install 'sppkit[distributed]'"
        ) from None
    if scheduler:
        return Client(scheduler), None
    cluster = LocalCluster(n_workers=1, threads_per_worker=workers or os.cpu_count() or 1, processes=False,
                           dashboard_address=None)
    return Client(cluster), cluster


def _replay_dask(shards, model, fmt, kw, *, scheduler, workers, progress) -> list[ShardResult]:
    return _replay_dask_generic(replay_shard, shards, model, fmt, kw, scheduler=scheduler, workers=workers,
                                progress=progress)


@contextlib.contextmanager
def _quiet_dask_worker_log():
    """dask's worker logs a task that raised at ERROR level, traceback included
    ("Compute Failed ... Traceback: ..."), before the client re-raises the exception,
    which sppkit reports in one line (a bad shard: a damaged file, a malformed record
    with strict).  The ``distributed.worker`` logger (the in-process workers of the
    local cluster) is silenced for sppkit's own dask run, and restored afterwards."""
    log = logging.getLogger("distributed.worker")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _replay_dask_generic(fn, shards, model, fmt, kw, *, scheduler, workers, progress) -> list:
    """``fn(path, model, fmt, **kw)`` for every shard as dask tasks; results in shard order."""
    with _quiet_dask_worker_log():
        return _run_dask(fn, shards, model, fmt, kw, scheduler=scheduler, workers=workers, progress=progress)


def _run_dask(fn, shards, model, fmt, kw, *, scheduler, workers, progress) -> list:
    client, cluster = dask_client(scheduler, workers)
    try:
        from dask.distributed import as_completed

        m = client.scatter(model, broadcast=True)
        # absolute paths: a remote cluster's workers must see the same files (shared filesystem)
        futures = [client.submit(fn, os.path.abspath(p), m, fmt, pure=False, **kw) for p in shards]
        if _want_progress(progress):
            with _progress_bar(len(futures), "shards") as bar:
                task = bar.add_task("replay (dask)", total=len(futures))
                for _ in as_completed(futures):
                    bar.advance(task)
        return client.gather(futures)  # in shard order
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
