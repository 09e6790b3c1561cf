"""Write traces: importers (valgrind lackey, CSV, Intel Pin pinatrace, sppkit's own
columnar format) and writers (the native format: ``.npz``, or Parquet with pyarrow).

Every importer streams: it yields numpy structured arrays of :data:`TRACE_DTYPE`
(``gpa`` u64, ``size`` u16, ``rip`` u64), at most ``chunk_records`` records each,
and holds one block of input (a few MiB) at a time, whatever the trace's length.

Text formats are parsed a block at a time with numpy: line ends and field
separators are found with vectorised byte comparisons, hex and decimal fields are
converted as 2-D digit gathers.  A line the vectorised path does not accept goes to
a per-line Python parser, which either accepts it (spaces, a header, upper-case
hex...) or reports it as malformed with the file and line number.

Malformed records go to a :class:`Diagnostics`: by default they are counted and
skipped (the first few are kept as examples for a warning); with ``strict=True``
the first one raises :class:`MalformedRecord`.

Trace semantics (docs/replay.md): addresses are guest-physical, every record is one
guest write of ``size`` bytes at ``gpa`` by the instruction at ``rip``.

Reserved ``rip`` values: :data:`NO_RIP` (all ones) means "unknown"; :data:`RIP_CARRY`
(``0xfffffffffffffffe``) is the internal marker of a lackey store whose IP is the last
``I`` line of the previous shard.  A record that gives ``RIP_CARRY`` as its IP (a CSV
or pinatrace rip, a native ``rip`` value, a lackey ``I`` address) is malformed ("rip
0xfffffffffffffffe is reserved"): skipped and counted, or fatal with ``strict``; for a
lackey ``I`` line, the stores after it keep an unknown IP.  (No real instruction sits in
the last two bytes of the address space, so refusing it loses nothing.)

Lackey ``I`` lines are parsed only where a store takes its IP from them; with
``strict=True`` every ``I`` line is checked (about twice the import time).
"""

from __future__ import annotations

import ast
import bz2
import functools
import gzip
import inspect
import lzma
import os
import re
import shutil
import struct
import tempfile
import tokenize
import weakref
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

__all__ = [
    "CHUNK_RECORDS", "FORMATS", "MAX_BLOCK_BYTES", "MAX_CHUNK_RECORDS", "MAX_SHARD_RECORDS", "NO_RIP", "RIP_CARRY",
    "TRACE_DTYPE", "Diagnostics", "MalformedRecord",
    "MissingDependency", "NativeWriter", "TraceFormatError", "TraceRecorder", "TraceSource", "check_native_path",
    "check_read_args", "clobbered_input", "convert_trace", "detect_format", "list_shards", "open_trace",
    "read_trace", "write_native",
]

#: One write record.  Aligned (itemsize 24) so that each field view is 8-byte aligned.
TRACE_DTYPE = np.dtype([("gpa", "<u8"), ("size", "<u2"), ("rip", "<u8")], align=True)
#: ``rip`` of a record whose instruction pointer is unknown.
NO_RIP = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
#: ``rip`` of a lackey store that precedes the first ``I`` line of a shard: its IP is
#: the last ``I`` line of the previous shard, filled in when shard results are merged.
RIP_CARRY = np.uint64(0xFFFF_FFFF_FFFF_FFFE)
_RESERVED = (f"rip {int(RIP_CARRY):#x} is reserved (sppkit's internal marker for an IP carried over from the "
             "previous shard)")
_RIP_CARRY_INT = int(RIP_CARRY)
CHUNK_RECORDS = 1 << 20
BLOCK_BYTES = 1 << 20
#: The largest ``chunk_records`` (records read, replayed or written at a time): 2**30
#: records is ~100 GiB of chunk buffers; larger values overflowed readers (Parquet
#: batch sizes are C longs).
MAX_CHUNK_RECORDS = 1 << 30
#: The largest ``block_bytes`` (bytes of text read at a time).
MAX_BLOCK_BYTES = 1 << 30
#: The largest ``shard_records`` of :func:`convert_trace`: the largest record count
#: an ``.npy`` member (a numpy array) can hold.
MAX_SHARD_RECORDS = (1 << 63) - 1
MAX_SIZE = 0xFFFF
_U64_MAX = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
#: A record at a gpa at or below this cannot run past the end of the 64-bit address
#: space (its size is at most MAX_SIZE): the cheap first test of :func:`wrapping`.
_WRAP_FLOOR = np.uint64((1 << 64) - MAX_SIZE - 1)
_NONE = np.zeros(0, np.intp)
FORMATS = ("lackey", "csv", "pinatrace", "native")
NATIVE_VERSION = "sppkit-trace 1"
_PAD = 64  # bytes of zero padding after a block, so that gathers at line start + k stay in bounds
_MAX_LINE = 1 << 20
_MAX_NPY_HEADER = 10000  # numpy's own limit on an .npy header (max_header_size)
#: What a corrupt compressed text trace raises while it is read.
_DECOMPRESS_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)
#: What zipfile (and the codecs under it) raise on a corrupt or unsupported .npz.
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, NotImplementedError, RuntimeError, EOFError,
               OSError, ValueError, struct.error)
#: Magic numbers of the compressed containers a native trace must not be wrapped in.
_COMPRESSED_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x5d\x00\x00", "lzma"))
_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".lzma")


class TraceFormatError(ValueError):
    """A trace that cannot be read at all (unknown format, unreadable file...)."""


class MalformedRecord(TraceFormatError):
    """A malformed record in strict mode; the message names the file and the line."""


class MissingDependency(RuntimeError):
    """An optional dependency (pyarrow, matplotlib, dask) is not installed."""


# =====================================================================================
# diagnostics
# =====================================================================================


@dataclass
class Diagnostics:
    """Where malformed records go: counted (and the first ``keep`` kept) or, when
    ``strict``, raised.  ``on_warning`` is called with each kept message.

    It also follows lackey's ``I`` lines across the files read through it: a malformed
    ``I`` line is reported only when a store takes its IP from it (see
    :class:`LackeySource`), which may happen in the next file.  ``ip_pending`` holds the
    last ``I`` line read while it is malformed and unused, ``(path, line, reason, text)``;
    ``ip_seen``: an ``I`` line was read; ``ip_wanted``: a store came before the first
    one (it takes its IP from what was read before: another file, or a shard read with
    its own Diagnostics, which :meth:`merge` joins on).
    """

    strict: bool = False
    keep: int = 10
    skipped: int = 0
    examples: list = field(default_factory=list)
    on_warning: Callable[[str], None] | None = None
    ip_pending: tuple | None = None
    ip_seen: bool = False
    ip_wanted: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.keep, (bool, np.bool_)) or not isinstance(self.keep, (int, np.integer)) or self.keep < 0:
            raise ValueError(f"Diagnostics keep={self.keep!r}: must be an integer >= 0 (examples kept)")
        if self.on_warning is not None and not callable(self.on_warning):
            raise TypeError(f"Diagnostics on_warning must be a callable or None, got {type(self.on_warning).__name__}")

    def malformed(self, path, line: int, reason: str, text: bytes | str | None = None, *, unit: str = "line") -> None:
        shown = ""
        if text is not None:
            if isinstance(text, bytes):
                text = text.decode("utf-8", "replace")
            text = text.rstrip("\r\n")
            shown = f": {text[:80]!r}" + ("..." if len(text) > 80 else "")
        msg = f"{path}:{line}: {reason}{shown}" if unit == "line" else f"{path}: {unit} {line}: {reason}{shown}"
        if self.strict:
            raise MalformedRecord(f"malformed record: {msg}")
        self.skipped += 1
        if len(self.examples) < self.keep:
            self.examples.append(msg)
            if self.on_warning is not None:
                self.on_warning(msg)

    def ip_used(self) -> None:
        """A store takes its IP from the last ``I`` line read (before its block): that
        line is reported if it is malformed."""
        if self.ip_pending is not None:
            pending, self.ip_pending = self.ip_pending, None
            self.malformed(*pending)
        elif not self.ip_seen:
            self.ip_wanted = True

    def ip_read(self, pending: tuple | None) -> None:
        """``I`` lines were read; ``pending``: the last one, when it is malformed and no
        store has taken its IP from it yet (``(path, line, reason, text)``), else None."""
        self.ip_seen = True
        self.ip_pending = pending

    def merge(self, other: "Diagnostics") -> None:
        """Add ``other``: the diagnostics of the piece of trace read after this one (a
        shard read on its own), as if both had been read through one Diagnostics."""
        if other.ip_wanted:
            self.ip_used()
        self.skipped += other.skipped
        room = self.keep - len(self.examples)
        if room > 0:
            self.examples.extend(other.examples[:room])
        if other.ip_seen:
            self.ip_read(other.ip_pending)



class DiagnosedCounts:
    """For counters that keep the :class:`Diagnostics` of the trace they were read from
    (a ``diagnostics`` field): its ``skipped`` count and ``examples``, read-only."""

    diagnostics: Diagnostics

    @property
    def skipped(self) -> int:
        """Malformed records skipped."""
        return self.diagnostics.skipped

    @property
    def examples(self) -> list:
        """The first messages about them."""
        return self.diagnostics.examples

# =====================================================================================
# vectorised field parsing
# =====================================================================================

_HEX = np.full(256, 255, np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i
_DEC = np.full(256, 255, np.uint8)
for _i, _c in enumerate(b"0123456789"):
    _DEC[_c] = _i
_HEX_SHIFT = (4 * np.arange(15, -1, -1)).astype(np.uint64)
_DEC_POW = (10 ** np.arange(18, -1, -1, dtype=np.uint64)).astype(np.uint64)


def _parse_uint(buf: np.ndarray, a: np.ndarray, b: np.ndarray, base: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``buf[a[i]:b[i]]`` as an unsigned integer in ``base`` (16: at most 16
    digits; 10: at most 19).  Returns ``(values, ok)``; a field that is empty, too
    long or holds a non-digit has ``ok`` False (its value is meaningless)."""
    n = len(a)
    if n == 0:
        return np.zeros(0, np.uint64), np.zeros(0, bool)
    width = 16 if base == 16 else 19
    lut = _HEX if base == 16 else _DEC
    length = b - a
    ok = (length >= 1) & (length <= width)
    j = np.arange(width)
    pos = b[:, None] - width + j
    np.maximum(pos, 0, out=pos)
    d = lut[buf[pos]]
    valid = j >= (width - length)[:, None]
    bad = valid & (d == 255)
    ok &= ~bad.any(axis=1)
    d = np.where(valid & ~bad, d, 0).astype(np.uint64)
    if base == 16:
        vals = np.bitwise_or.reduce(d << _HEX_SHIFT, axis=1)
    else:
        vals = (d * _DEC_POW).sum(axis=1, dtype=np.uint64)
    return vals, ok


def _digits(text: bytes, base: int = 10) -> int:
    """A field of digits (decimal, or hex without ``0x``) as an int, whatever its length:
    a value with more digits than any 64-bit value (leading zeros aside) is returned as
    ``2**64``, out of every field's range, without being converted -- int() refuses more
    than 4300 decimal digits with a ValueError that names no file or line."""
    d = text.lstrip(b"0")
    return int(d or b"0", base) if len(d) <= (16 if base == 16 else 20) else 1 << 64


def _size_reason(size: int) -> str:
    """Why a record's ``size`` (as :func:`_digits` gives it) is malformed."""
    return f"size {size if size < 1 << 64 else 'of 2**64 or more'} out of range (1..{MAX_SIZE})"


def wrapping(gpa: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Indices (ascending) of the records whose write runs past the end of the 64-bit
    address space: ``gpa + size > 2**64``.  One reduction over ``gpa`` (``max``); exact
    work only when some record starts in the last 64 KiB of the space.  A ``size`` of 0
    or less never wraps (range checks are the caller's)."""
    if len(gpa) == 0 or gpa.max() <= _WRAP_FLOOR:
        return _NONE
    near = np.flatnonzero(gpa > _WRAP_FLOOR)
    s = np.asarray(size)[near]
    s = np.where(s >= 1, s, 1).astype(np.uint64)  # (a size the caller refuses anyway: no wrap)
    return near[gpa[near] > (_U64_MAX - s) + np.uint64(1)]  # gpa > 2**64 - size


def refuse_negative(a: np.ndarray, name: str, first: int) -> None:
    """A TraceFormatError naming the first record (``first`` + its index) whose ``name``
    (a column of integers, ``a``) is negative."""
    if a.dtype.kind == "i" and len(a) and a.min() < 0:
        j = int(np.argmax(a < 0))
        raise TraceFormatError(f"record {first + j}: {name} {int(a[j])} is negative")


def unreadable(what, skipped: int, examples: list, formats) -> TraceFormatError:
    """The error for a trace none of whose ``skipped`` records could be read (most
    likely read in the wrong format)."""
    fmts = f"as {'/'.join(formats)}" if formats else "in the format detected"
    first = f" (first: {examples[0]})" if examples else ""
    return TraceFormatError(f"{what}: none of its {skipped:,} record(s) could be read {fmts}{first}; "
                            "is the format right (--format)?")


def wrap_reason(gpa: int, size: int) -> str:
    """What :func:`wrapping` found, for a malformed-record message."""
    return f"a write of {int(size)} bytes at gpa {int(gpa):#x} runs past the 64-bit address space"


def _first_at_or_after(sorted_pos: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """For each row, the first position in ``sorted_pos`` within ``[lo, hi)``, else -1."""
    if len(sorted_pos) == 0:
        return np.full(len(lo), -1, np.int64)
    k = np.searchsorted(sorted_pos, lo)
    p = sorted_pos[np.minimum(k, len(sorted_pos) - 1)].astype(np.int64)
    return np.where((k < len(sorted_pos)) & (p < hi), p, -1)


class _Block:
    """One block of text: whole lines, zero-padded, with line starts and ends."""

    __slots__ = ("raw", "buf", "starts", "ends", "line0")

    def __init__(self, raw: bytes, line0: int) -> None:
        self.raw = raw
        self.buf = np.frombuffer(raw + b"\0" * _PAD, np.uint8)
        view = self.buf[: len(raw)]
        nl = np.flatnonzero(view == 10)
        starts = np.empty(len(nl), np.int64)
        starts[:1] = 0
        starts[1:] = nl[:-1] + 1
        ends = nl.astype(np.int64)
        # tolerate CRLF: drop a '\r' before the '\n'
        cr = self.buf[np.maximum(ends - 1, 0)] == 13
        cr &= ends > starts
        ends -= cr
        self.starts = starts
        self.ends = ends
        self.line0 = line0

    def __len__(self) -> int:
        return len(self.starts)

    def line(self, i: int) -> bytes:
        return self.raw[self.starts[i] : self.ends[i]]

    def char(self, k: int) -> np.ndarray:
        """Byte ``k`` of every line (0 past the end of a line: padding or '\\n' → never a
        character the parsers accept)."""
        c = self.buf[self.starts + k]
        return np.where(self.starts + k < self.ends, c, 0)


def _open_text(path: Path):
    """(binary file object yielding decompressed bytes, raw file for progress)."""
    raw = open(path, "rb")
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw), raw
    if name.endswith(".bz2"):
        return bz2.BZ2File(raw), raw
    if name.endswith(".xz") or name.endswith(".lzma"):
        return lzma.LZMAFile(raw), raw
    return raw, raw


# =====================================================================================
# sources
# =====================================================================================


class TraceSource:
    """A trace file to stream: iterate for chunks of :data:`TRACE_DTYPE`.

    ``bytes_total``/``bytes_done`` (input bytes, compressed size for .gz/.bz2/.xz)
    drive progress bars.  ``last_ip`` is the ``rip`` the next record without an IP of
    its own would get (lackey: the last ``I`` line read), :data:`RIP_CARRY` until one
    is seen.
    """

    format = "?"

    def __init__(self, path, *, chunk_records: int = CHUNK_RECORDS, diagnostics: Diagnostics | None = None,
                 block_bytes: int = BLOCK_BYTES) -> None:
        self.chunk_records = _chunk_records(chunk_records)
        self.block_bytes = _positive_int("block_bytes", block_bytes, MAX_BLOCK_BYTES, "2**30")
        self.path = _trace_file(path)
        self.diagnostics = diagnostics if diagnostics is not None else Diagnostics()
        try:
            self.bytes_total = self.path.stat().st_size
            open(self.path, "rb").close()  # an unreadable file fails here, named once, not deep in a reader
        except OSError as e:
            raise TraceFormatError(f"{self.path}: cannot read: {_reason(e)}") from None
        self.bytes_done = 0
        self.records = 0
        self.last_ip = RIP_CARRY

    def __iter__(self) -> Iterator[np.ndarray]:
        """Chunks as structured arrays of :data:`TRACE_DTYPE`."""
        for gpa, size, rip in self.columns():
            out = np.empty(len(gpa), TRACE_DTYPE)
            out["gpa"] = gpa
            out["size"] = size
            out["rip"] = rip
            yield out

    def columns(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Chunks as contiguous columns ``(gpa u64, size u16, rip u64)`` — what replay
        consumes (no strided field views)."""
        for gpa, size, rip in self._chunks():
            n = len(gpa)
            for k in range(0, n, self.chunk_records):
                j = min(n, k + self.chunk_records)
                self.records += j - k
                yield gpa[k:j], size[k:j], rip[k:j]

    def _chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:  # pragma: no cover - abstract
        raise NotImplementedError


def shown(value) -> str:
    """``repr(value)`` for an error message, cut short when it is long (a 400-digit int)."""
    r = repr(value)
    return r if len(r) <= 40 else f"{r[:20]}... ({len(r)} characters)"


def _positive_int(name: str, value, maximum: int, limit: str) -> int:
    """``value`` as an int in 1..``maximum`` (``limit``: how the docs write it), else a
    ValueError naming the argument."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not 1 <= value <= maximum:
        raise ValueError(f"{name}={shown(value)}: must be a positive integer, at most {limit}")
    return int(value)


def _chunk_records(value) -> int:
    """``chunk_records`` checked: an int 1..:data:`MAX_CHUNK_RECORDS`, else a ValueError."""
    return _positive_int("chunk_records", value, MAX_CHUNK_RECORDS, "2**30")


def _reason(e: BaseException) -> str:
    """What went wrong, for a message that names the file already: an OSError about a
    file gives its strerror ("Permission denied"), not "[Errno 13] Permission denied: 'X'"."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def _trace_file(path) -> Path:
    """``path`` as a Path to an existing regular file, else a TraceFormatError that says
    what it is instead."""
    p = Path(path)
    if p.is_dir():
        raise TraceFormatError(f"{p} is a directory, not a trace file (read_trace and replay read a directory "
                               "of shards)")
    if not p.exists():
        raise TraceFormatError(f"{p}: no such trace file")
    if not p.is_file():
        raise TraceFormatError(f"{p}: not a regular file")
    return p


def _write_size(size) -> int:
    """``size`` (the pinatrace write size) as an int in 1..MAX_SIZE, else a ValueError."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= MAX_SIZE:
        raise ValueError(f"size={shown(size)}: the pinatrace write size (--size) must be an integer 1..{MAX_SIZE}")
    return int(size)


class _TextSource(TraceSource):
    """Block-wise reader of a line-oriented text trace."""

    def _read(self, f) -> bytes:
        try:
            return f.read(self.block_bytes)
        except _DECOMPRESS_ERRORS as e:
            raise TraceFormatError(f"{self.path}: cannot read: {_reason(e)}") from None

    def _blocks(self) -> Iterator[_Block]:
        try:
            f, raw = _open_text(self.path)
        except OSError as e:
            raise TraceFormatError(f"{self.path}: cannot read: {_reason(e)}") from None
        line0 = 1
        carry = b""
        try:
            while True:
                data = self._read(f)
                self.bytes_done = raw.tell()
                if not data:
                    if carry:
                        blk = _Block(carry + b"\n", line0)
                        yield blk
                    return
                block = carry + data if carry else data
                cut = block.rfind(b"\n")
                if cut < 0:
                    if len(block) > _MAX_LINE:
                        self.diagnostics.malformed(self.path, line0, f"line longer than {_MAX_LINE} bytes",
                                                   block[:80])
                        # skip to the end of this line
                        carry = b""
                        skipping = True
                        while skipping:
                            data = self._read(f)
                            if not data:
                                return
                            cut = data.find(b"\n")
                            if cut >= 0:
                                carry = data[cut + 1 :]
                                skipping = False
                        line0 += 1
                        continue
                    carry = block
                    continue
                body, carry = block[: cut + 1], block[cut + 1 :]
                blk = _Block(body, line0)
                line0 += len(blk)
                yield blk
        finally:
            self.bytes_done = self.bytes_total
            f.close()
            if raw is not f:
                raw.close()

    @staticmethod
    def _records(gpa, size, rip) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.ascontiguousarray(gpa, np.uint64), np.ascontiguousarray(size, np.uint16),
                np.ascontiguousarray(rip, np.uint64))

    def _bad(self, blk: _Block, i: int, reason: str) -> None:
        self.diagnostics.malformed(self.path, blk.line0 + int(i), reason, blk.line(int(i)))


# ------------------------------------------------------------------------------- lackey
_LACKEY_LINE = re.compile(rb"^(?:I  |\s[SLM] )\s*([0-9a-fA-F]+)\s*,\s*([0-9]+)\s*$")
#: valgrind's own messages: ``==PID== text`` (``--PID-- text`` with -v), with
#: --time-stamp=yes ``==DD:HH:MM:SS.mmm PID== text``.
_VALGRIND_LINE = re.compile(rb"^(==|--)(?:[0-9]+:[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3} )?[0-9]+\1(?: |$)")


class LackeySource(_TextSource):
    """valgrind ``--tool=lackey --trace-mem=yes`` output.

    ``I  addr,size`` instruction fetch (its address is the IP of the stores after it);
    `` S addr,size`` store and `` M addr,size`` modify are the writes; `` L`` loads,
    ``==pid==`` and ``--pid--`` lines and blank lines are ignored.  Addresses are hex
    without ``0x``, sizes decimal.
    """

    format = "lackey"

    # A malformed I line is reported when a store takes its IP from it.  The last I line
    # of a block is parsed for the next block's stores (or the next file's: shards); when
    # it is malformed and no store of its block uses it, it waits in the diagnostics
    # (Diagnostics.ip_pending): reported if a store of a later block or file takes its IP
    # from it, dropped at the next I line -- so what is reported depends neither on where
    # the block boundaries fall nor on where the trace is cut into shards.

    def _chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for blk in self._blocks():
            yield self._parse(blk)

    def _parse(self, blk: _Block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c0, c1, c2 = blk.char(0), blk.char(1), blk.char(2)
        is_i = (c0 == 73) & (c1 == 32) & (c2 == 32)  # "I  "
        data = (c0 == 32) & (c2 == 32)
        is_store = data & ((c1 == 83) | (c1 == 77))  # " S ", " M "
        is_load = data & (c1 == 76)  # " L "
        ignored = blk.ends == blk.starts  # blank
        for v in np.flatnonzero(((c0 == 61) & (c1 == 61)) | ((c0 == 45) & (c1 == 45))):  # ==pid==, --pid--?
            ignored[v] = _VALGRIND_LINE.match(blk.line(int(v))) is not None
        other = ~(is_i | is_store | is_load | ignored)
        buf = blk.buf
        commas = np.flatnonzero(buf[: len(blk.raw)] == 44)

        st = np.flatnonzero(is_store)
        a = blk.starts[st] + 3
        e = blk.ends[st]
        comma = _first_at_or_after(commas, a, e)
        addr, ok1 = _parse_uint(buf, a, comma, 16)
        size, ok2 = _parse_uint(buf, comma + 1, e, 10)
        ok = ok1 & ok2 & (comma >= 0) & (size >= 1) & (size <= MAX_SIZE)

        # IP of each store: the last I line before it (in this block, else carried over)
        ii = np.flatnonzero(is_i)
        k = np.searchsorted(ii, st) - 1
        rip = np.full(len(st), self.last_ip, np.uint64)
        if (k < 0).any():  # stores take their IP from the last I line of an earlier block (or file)
            self.diagnostics.ip_used()
        need = np.unique(k[k >= 0])
        carry_only = -1  # (index in ii of) the last I line, when it is parsed for the carry only
        if len(ii):
            if not len(need) or need[-1] != len(ii) - 1:
                carry_only = len(ii) - 1
            need = np.union1d(need, [len(ii) - 1])  # the carry for the next block
        if self.diagnostics.strict:
            # strict: every I line is checked, also those no store takes its IP from (the
            # default mode parses only the I lines stores use: the others affect no record)
            need = np.arange(len(ii))
            carry_only = -1
        ia = blk.starts[ii[need]] + 3
        ie = blk.ends[ii[need]]
        icomma = _first_at_or_after(commas, ia, ie)
        ipv, iok = _parse_uint(buf, ia, icomma, 16)
        iok &= icomma >= 0
        if self.diagnostics.strict:  # the size too (the default mode reads only the address)
            iok &= _parse_uint(buf, icomma + 1, ie, 10)[1]
        bad_i = {}
        if not iok.all():
            for j in np.flatnonzero(~iok):
                line = ii[need[j]]
                if not self._slow_ok(blk.line(int(line))):
                    bad_i[int(line)] = "malformed instruction line (the IP of the stores after it is unknown)"
                    ipv[j] = NO_RIP
                else:
                    m_ip = _LACKEY_LINE.match(blk.line(int(line)))
                    assert m_ip is not None  # _slow_ok just matched this very line
                    ipv[j] = int(m_ip.group(1), 16)
        reserved = ipv == RIP_CARRY
        if reserved.any():
            for j in np.flatnonzero(reserved):
                bad_i[int(ii[need[j]])] = f"{_RESERVED} (the IP of the stores after it is unknown)"
            ipv[reserved] = NO_RIP
        ip_of = np.full(len(ii), NO_RIP, np.uint64)
        ip_of[need] = ipv
        have = k >= 0
        rip[have] = ip_of[k[have]]
        if len(ii):
            self.last_ip = ip_of[-1]
            pending = None
            if carry_only >= 0 and int(ii[carry_only]) in bad_i:  # reported if and when a store uses it
                line = int(ii[carry_only])
                pending = (self.path, blk.line0 + line, bad_i.pop(line), blk.line(line))
            self.diagnostics.ip_read(pending)  # (replaces an earlier block's: no store took its IP from it)

        bad_lines = []
        if not ok.all():
            for j in np.flatnonzero(~ok):
                line = blk.line(int(st[j]))
                m = _LACKEY_LINE.match(line)
                if m and 1 <= _digits(m.group(2)) <= MAX_SIZE and len(m.group(1)) <= 16:
                    addr[j], size[j], ok[j] = int(m.group(1), 16), _digits(m.group(2)), True
                else:
                    bad_lines.append((int(st[j]), self._why(line)))
        for j in wrapping(addr, size):
            if ok[j]:
                ok[j] = False
                bad_lines.append((int(st[j]), wrap_reason(addr[j], size[j])))
        for i_other in np.flatnonzero(other):
            bad_lines.append((int(i_other), "not a lackey line (expected 'I  ', ' S ', ' M ', ' L ' or '==pid==')"))
        bad_lines.extend(bad_i.items())
        for i, why in sorted(bad_lines):
            self._bad(blk, i, why)
        return self._records(addr[ok], size[ok], rip[ok])

    @staticmethod
    def _slow_ok(line: bytes) -> bool:
        m = _LACKEY_LINE.match(line)
        return m is not None and len(m.group(1)) <= 16

    @staticmethod
    def _why(line: bytes) -> str:
        m = _LACKEY_LINE.match(line)
        if m is None:
            return "malformed store: expected ' S ADDR,SIZE' (hex address, decimal size)"
        if len(m.group(1)) > 16:
            return "address wider than 64 bits"
        return _size_reason(_digits(m.group(2)))


# ------------------------------------------------------------------------------- CSV
_CSV_FIELD = re.compile(rb"0[xX][0-9a-fA-F]+|[0-9]+")
#: The header line 1 may hold: the names of its columns (any case, spaces around them).
_CSV_HEADERS = ([b"gpa", b"size"], [b"gpa", b"size", b"rip"])


class CsvSource(_TextSource):
    """``gpa,size[,rip]`` per line; each field hex (``0x...``) or decimal.  An optional
    header on line 1 (``gpa,size,rip`` or ``gpa,size``); blank lines and ``#`` comments
    are skipped."""

    format = "csv"

    def _chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for blk in self._blocks():
            yield self._parse(blk)

    def _field(self, buf, a, b):
        hexa = (buf[a] == 48) & ((buf[a + 1] | 0x20) == 120) & (b - a > 2)  # "0x" / "0X"
        hv, hok = _parse_uint(buf, a + 2, b, 16)
        dv, dok = _parse_uint(buf, a, b, 10)
        return np.where(hexa, hv, dv), np.where(hexa, hok, dok)

    def _parse(self, blk: _Block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        buf = blk.buf
        commas = np.flatnonzero(buf[: len(blk.raw)] == 44)
        s, e = blk.starts, blk.ends
        c1 = _first_at_or_after(commas, s, e)
        has1 = c1 >= 0
        c1s = np.where(has1, c1, e)
        c2 = _first_at_or_after(commas, c1s + 1, e)
        has2 = c2 >= 0
        c3 = _first_at_or_after(commas, np.where(has2, c2 + 1, e), e)
        f2_end = np.where(has2, c2, e)
        gpa, ok_g = self._field(buf, s, c1s)
        size, ok_s = self._field(buf, c1s + 1, f2_end)
        rip, ok_r = self._field(buf, np.where(has2, c2 + 1, e), e)
        rip = np.where(has2, rip, NO_RIP)
        ok = has1 & ok_g & ok_s & (~has2 | ok_r) & (c3 < 0) & (size >= 1) & (size <= MAX_SIZE) & (rip != RIP_CARRY)
        ok[wrapping(gpa, size)] = False  # the slow path says why
        if not ok.all():
            for i in np.flatnonzero(~ok):
                rec = self._slow(blk, int(i))
                if rec is not None:
                    gpa[i], size[i], rip[i] = rec
                    ok[i] = True
        return self._records(gpa[ok], size[ok], rip[ok])

    def _slow(self, blk: _Block, i: int):
        text = blk.line(i).strip()
        if not text or text.startswith(b"#"):
            return None
        parts = [p.strip() for p in text.split(b",")]
        vals: list[int] | None
        # the documented forms only: int() would also take "1_000", "+5" or "0x_10"
        if all(_CSV_FIELD.fullmatch(p) for p in parts):
            vals = [_digits(p[2:], 16) if p[:2].lower() == b"0x" else _digits(p) for p in parts]
        else:
            vals = None
        if vals is None or len(vals) not in (2, 3):
            if blk.line0 + i == 1 and [p.lower() for p in parts] in _CSV_HEADERS:
                return None  # the header
            why = (f"expected 2 or 3 fields (gpa,size[,rip]), got {len(parts)}" if vals is not None
                   else "expected integers (decimal or 0x-prefixed hex): gpa,size[,rip]")
            self._bad(blk, i, why)
            return None
        gpa, size = vals[0], vals[1]
        rip = vals[2] if len(vals) == 3 else int(NO_RIP)
        if not 1 <= size <= MAX_SIZE:
            self._bad(blk, i, _size_reason(size))
            return None
        if not 0 <= gpa < 1 << 64 or not 0 <= rip < 1 << 64:
            self._bad(blk, i, "address out of the 64-bit range")
            return None
        if gpa + size > 1 << 64:
            self._bad(blk, i, wrap_reason(gpa, size))
            return None
        if rip == int(RIP_CARRY):
            self._bad(blk, i, _RESERVED)
            return None
        return gpa, size, rip


# ------------------------------------------------------------------------------- pinatrace
_PIN_LINE = re.compile(rb"^\s*(?:0[xX])?([0-9a-fA-F]+)\s*:\s*([RW])\s+(?:0[xX])?([0-9a-fA-F]+)\s*$")


class PinatraceSource(_TextSource):
    """Intel Pin ``pinatrace`` output: ``IP: W ADDR`` (writes) and ``IP: R ADDR`` (reads,
    ignored), ``#eof`` and other ``#`` lines ignored.  Records carry no size: every
    write is ``size`` bytes (default 8)."""

    format = "pinatrace"

    def __init__(self, path, *, size: int = 8, **kw) -> None:
        super().__init__(path, **kw)
        self.size = _write_size(size)

    def _chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for blk in self._blocks():
            yield self._parse(blk)

    def _parse(self, blk: _Block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        buf = blk.buf
        s, e = blk.starts, blk.ends
        colons = np.flatnonzero(buf[: len(blk.raw)] == 58)
        col = _first_at_or_after(colons, s, e)
        has = col >= 0
        colc = np.where(has, col, s)
        kind = buf[colc + 2]
        shape = has & (buf[colc + 1] == 32) & (buf[colc + 3] == 32) & ((kind == 87) | (kind == 82))
        ipx = (buf[s] == 48) & ((buf[s + 1] | 0x20) == 120)
        ax = colc + 4
        adx = (buf[ax] == 48) & ((buf[ax + 1] | 0x20) == 120)
        ip, ok_i = _parse_uint(buf, s + 2 * ipx, colc, 16)
        addr, ok_a = _parse_uint(buf, ax + 2 * adx, e, 16)
        ok = shape & ok_i & ok_a
        write = ok & (kind == 87)
        skip = (e == s) | (buf[s] == 35)  # blank, "#eof", comments
        fix = ~ok & ~skip
        bad_lines = []
        if fix.any():
            for i in np.flatnonzero(fix):
                m = _PIN_LINE.match(blk.line(int(i)))
                if m and len(m.group(1)) <= 16 and len(m.group(3)) <= 16:
                    if m.group(2) == b"W":
                        ip[i], addr[i], write[i] = int(m.group(1), 16), int(m.group(3), 16), True
                else:
                    bad_lines.append((int(i), "expected 'IP: W ADDR' or 'IP: R ADDR' (hex)"))
        reserved = write & (ip == RIP_CARRY)
        if reserved.any():
            for i in np.flatnonzero(reserved):
                bad_lines.append((int(i), _RESERVED))
            write &= ~reserved
        if addr.max(initial=0) > _U64_MAX - np.uint64(self.size):  # some write may run past 2**64
            for w in np.flatnonzero(write & (addr > _U64_MAX - np.uint64(self.size) + np.uint64(1))):
                bad_lines.append((int(w), wrap_reason(addr[w], self.size)))
                write[w] = False
        for line, why in sorted(bad_lines):
            self._bad(blk, line, why)
        n = int(np.count_nonzero(write))
        return self._records(addr[write], np.full(n, self.size, np.uint16), ip[write])


# ------------------------------------------------------------------------------- native
_COLUMNS = (("gpa", np.dtype("<u8")), ("size", np.dtype("<u2")), ("rip", np.dtype("<u8")))


def _member_count(path: Path, name: str, shape, dtype: np.dtype, header_len: int, info: zipfile.ZipInfo) -> int:
    """The record count of a member whose ``.npy`` header was just read, checked
    against the member's size: a header that claims more (or fewer) records than the
    member holds would read on into the next member, or stop short."""
    if len(shape) != 1:
        raise TraceFormatError(f"{path}: member {name}: expected a 1-D array, got shape {shape}")
    n = shape[0]
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise TraceFormatError(f"{path}: member {name}: header shape {shape!r} is not a record count")
    if dtype.itemsize <= 0:
        raise TraceFormatError(f"{path}: member {name}: dtype {dtype.str!r} has no size")
    if header_len + n * dtype.itemsize != info.file_size:
        raise TraceFormatError(f"{path}: member {name}: header says {n} records but the member holds "
                               f"{info.file_size - header_len} bytes of {dtype.itemsize}-byte records")
    return n


def _member_header(path: Path, name: str, f) -> tuple[tuple, np.dtype]:
    try:
        return _npy_header(f)
    except TraceFormatError:
        raise
    except ValueError as e:
        raise TraceFormatError(f"{path}: member {name}: {e}") from None


def _npz_member(path: Path, zf: zipfile.ZipFile, name: str, fd):
    """A reader for one ``.npy`` member: ``(dtype, count, read(start, stop) -> array)``,
    called for consecutive ranges of records.  Stored (uncompressed) members are read in
    place through ``fd`` (an open handle on ``path``: plain reads, no mapping, so memory
    stays flat) and their CRC-32 checked on the way; compressed ones stream (zipfile
    checks theirs)."""
    info = zf.getinfo(name)
    if info.flag_bits & 0x1:
        raise TraceFormatError(f"{path}: member {name} is encrypted")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.compress_size != info.file_size:
            raise TraceFormatError(f"{path}: member {name}: stored with {info.compress_size} bytes "
                                   f"but its size is {info.file_size}")
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise TraceFormatError(f"{path}: member {name}: bad local header")
            nlen = int.from_bytes(local[26:28], "little")
            xlen = int.from_bytes(local[28:30], "little")
            local_name = f.read(nlen)
            if local_name.decode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace") != info.orig_filename:
                raise TraceFormatError(f"{path}: member {name}: its local header names {local_name!r}")
            start = info.header_offset + 30 + nlen + xlen
            f.seek(start)
            shape, dtype = _member_header(path, name, f)
            offset = f.tell()
            f.seek(start)
            header = f.read(offset - start)
        n = _member_count(path, name, shape, dtype, offset - start, info)
        # the member's CRC-32 (over its .npy header and data) is checked as the records are
        # read, in order, and compared once the last one is: what zipfile does for the others
        stored = {"pos": 0, "crc": zlib.crc32(header)}

        def check_crc():
            if stored["pos"] == n and stored["crc"] != info.CRC:
                raise TraceFormatError(f"{path}: member {name}: bad CRC-32 (its data is damaged)")

        check_crc()  # (an empty member: its header alone)

        def read_stored(a, b):
            assert a == stored["pos"], "stored members are read in order (their CRC-32 is checked)"
            out = np.empty(b - a, dtype)
            if b > a:
                fd.seek(offset + a * dtype.itemsize)
                raw = out.view(np.uint8)
                if fd.readinto(raw) != (b - a) * dtype.itemsize:
                    raise TraceFormatError(f"{path}: member {name} is truncated")
                stored["crc"] = zlib.crc32(raw.data, stored["crc"])
            stored["pos"] = b
            check_crc()
            return out

        return dtype, n, read_stored

    fh = zf.open(name)
    shape, dtype = _member_header(path, name, fh)
    n = _member_count(path, name, shape, dtype, fh.tell(), info)
    state = {"pos": 0}

    def read(a, b):
        assert a == state["pos"], "compressed members are read in order"
        want = (b - a) * dtype.itemsize
        raw = fh.read(want)
        if len(raw) != want:
            raise TraceFormatError(f"{path}: member {name} is truncated (records {a}..{b - 1})")
        state["pos"] = b
        return np.frombuffer(raw, dtype).copy()

    return dtype, n, read


#: Native chunks of at least this many records are read one chunk ahead (_read_ahead);
#: for smaller ones, handing each over between threads costs more than it saves.
_READ_AHEAD_RECORDS = 1 << 16


def _read_ahead(read, starts) -> Iterator:
    """``read(a)`` for each ``a`` of ``starts``, in order, each computed in a worker
    thread while the caller works on the previous result: reading a chunk (file I/O and
    its CRC-32, which release the GIL) overlaps with its replay.  One call ahead at most;
    an early close waits for that one."""
    with ThreadPoolExecutor(1, thread_name_prefix="sppkit-trace-read") as ex:
        it = iter(starts)
        a = next(it, None)
        pending = None if a is None else ex.submit(read, a)
        while pending is not None:
            out = pending.result()
            a = next(it, None)
            pending = None if a is None else ex.submit(read, a)
            yield out


def _npy_header(f) -> tuple[tuple, np.dtype]:
    fmt = np.lib.format
    version = fmt.read_magic(f)
    try:
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        elif version == (3, 0):
            shape, dtype = _npy_header_3_0(f)
        else:
            raise ValueError(f".npy header version {version[0]}.{version[1]} is not supported (1.0, 2.0 or 3.0)")
    except (tokenize.TokenError, SyntaxError, TypeError, RecursionError) as e:
        # numpy's header parser lets the tokenizer's errors out (a header cut off mid-dict)
        raise ValueError(f".npy header is malformed: {e}") from None
    if dtype.hasobject:
        raise ValueError("object arrays are not traces")
    return shape, dtype


def _npy_header_3_0(f) -> tuple[tuple, np.dtype]:
    """An ``.npy`` header of version 3.0 (what numpy writes for utf-8 field names): the
    2.0 layout (a little-endian u32 length, then a Python dict literal) in utf-8.
    numpy has no public reader for it; the dict is checked as numpy checks it."""
    raw = f.read(4)
    if len(raw) != 4:
        raise ValueError(".npy header is truncated")
    n = int.from_bytes(raw, "little")
    if n > _MAX_NPY_HEADER:
        raise ValueError(f".npy header of {n} bytes is too long (at most {_MAX_NPY_HEADER})")
    text = f.read(n)
    if len(text) != n:
        raise ValueError(".npy header is truncated")
    try:
        d = ast.literal_eval(text.decode("utf-8"))
    except (UnicodeDecodeError, SyntaxError, ValueError) as e:
        raise ValueError(f".npy header is not a dict literal: {e}") from None
    if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
        raise ValueError(f".npy header must hold exactly descr, fortran_order and shape: {d!r}")
    shape = d["shape"]
    if not isinstance(shape, tuple) or not all(isinstance(x, int) and x >= 0 for x in shape):
        raise ValueError(f".npy header shape is not a tuple of sizes: {shape!r}")
    if not isinstance(d["fortran_order"], bool):
        raise ValueError(f".npy header fortran_order is not a bool: {d['fortran_order']!r}")
    try:
        dtype = np.lib.format.descr_to_dtype(d["descr"])
    except (TypeError, ValueError) as e:
        raise ValueError(f".npy header descr is not a dtype: {d['descr']!r} ({e})") from None
    return shape, dtype


class NativeSource(TraceSource):
    """sppkit's columnar trace: ``.npz`` with 1-D members ``gpa`` (u64), ``size`` (u16)
    and optionally ``rip`` (u64; missing = unknown), or a Parquet file with those
    columns (needs pyarrow: ``pip install 'sppkit[parquet]'``)."""

    format = "native"

    def _chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        if self.path.suffix.lower() in (".parquet", ".pq"):
            yield from self._parquet()
        else:
            yield from self._npz()

    def _check(self, gpa, size, rip, first: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A chunk of columns read from the file (record ``first`` onwards) checked:
        a column of the wrong type is a TraceFormatError; malformed records (a negative
        gpa or rip, a size outside 1..MAX_SIZE, the reserved rip, a write running past
        the end of the 64-bit address space) go to the diagnostics.  Reductions only,
        bar one pass over ``rip``, when every record is good."""
        cols = {"gpa": np.asarray(gpa), "size": np.asarray(size)}
        if rip is not None:
            cols["rip"] = np.asarray(rip)
        n = len(cols["gpa"])
        for name, a in cols.items():
            if a.dtype.kind not in "ui":
                raise TraceFormatError(f"{self.path}: records {first}..{first + n - 1}: expected an integer "
                                       f"{name} column, got {a.dtype}")
        sz = cols["size"]
        g = cols["gpa"].astype(np.uint64, copy=False)
        r = cols["rip"].astype(np.uint64, copy=False) if rip is not None else np.full(n, NO_RIP)
        negative = [c for c in ("gpa", "rip") if c in cols and cols[c].dtype.kind == "i" and n and cols[c].min() < 0]
        size_bad = n and (sz.min() < 1 or sz.max() > MAX_SIZE)
        reserved = r == RIP_CARRY if rip is not None else None
        wraps = wrapping(g, sz)
        if not (negative or size_bad or len(wraps) or (reserved is not None and reserved.any())):
            return g, sz.astype(np.uint16, copy=False), r
        bad = np.zeros(n, bool)
        bad[wraps] = True
        for c in negative:
            bad |= cols[c] < 0
        if size_bad:
            bad |= (sz < 1) | (sz > MAX_SIZE)
        if reserved is not None:
            bad |= reserved
        for j in np.flatnonzero(bad):
            if "gpa" in negative and cols["gpa"][j] < 0:
                why = f"gpa {int(cols['gpa'][j])} is negative"
            elif not 1 <= sz[j] <= MAX_SIZE:
                why = f"size {int(sz[j])} out of range (1..{MAX_SIZE})"
            elif "rip" in negative and cols["rip"][j] < 0:
                why = f"rip {int(cols['rip'][j])} is negative"
            elif reserved is not None and reserved[j]:
                why = _RESERVED
            else:
                why = wrap_reason(g[j], sz[j])
            self.diagnostics.malformed(self.path, first + int(j), why, unit="record")
        keep = ~bad
        return g[keep], sz[keep].astype(np.uint16), r[keep]

    def _npz(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        try:
            zf = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as e:
            kind = _compressed_kind(self.path)
            if kind is not None:
                raise TraceFormatError(f"{self.path}: a {kind}-compressed native trace is not supported; "
                                       f"decompress it first") from None
            raise TraceFormatError(f"{self.path}: not a native trace (.npz): {_reason(e)}") from None
        except _ZIP_ERRORS as e:  # NotImplementedError: zip version...
            raise TraceFormatError(f"{self.path}: unreadable native trace: {_reason(e)}") from None
        with zf, open(self.path, "rb") as fd:
            names = set(zf.namelist())
            for col in ("gpa", "size"):
                if col + ".npy" not in names:
                    raise TraceFormatError(f"{self.path}: not a native trace: no '{col}' array "
                                           f"(members: {', '.join(sorted(names)) or 'none'})")
            try:
                readers = {c: _npz_member(self.path, zf, c + ".npy", fd) for c, _ in _COLUMNS if c + ".npy" in names}
            except TraceFormatError:
                raise
            except _ZIP_ERRORS as e:  # zipfile's BadZipFile, zlib.error, NotImplementedError, RuntimeError...
                raise TraceFormatError(f"{self.path}: unreadable native trace: {_reason(e)}") from None
            counts = {c: r[1] for c, r in readers.items()}
            if len(set(counts.values())) != 1:
                raise TraceFormatError(f"{self.path}: columns of different lengths: {counts}")
            n = counts["gpa"]
            step = self.chunk_records

            def read(a):
                b = min(n, a + step)
                try:
                    return a, b, {c: r[2](a, b) for c, r in readers.items()}
                except TraceFormatError:
                    raise
                except _ZIP_ERRORS as e:  # a bad CRC or deflate stream shows up as the member is read
                    raise TraceFormatError(f"{self.path}: unreadable native trace: {_reason(e)}") from None

            starts = range(0, n, step)
            ahead = step >= _READ_AHEAD_RECORDS and n > step
            for a, b, cols in _read_ahead(read, starts) if ahead else map(read, starts):
                self.bytes_done = int(self.bytes_total * b / max(n, 1))
                yield self._check(cols["gpa"], cols["size"], cols.get("rip"), a)
        self.bytes_done = self.bytes_total

    def _parquet(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        pq = _pyarrow_parquet()
        try:
            # (a page whose CRC does not match is an OSError while the batches are read)
            pf = pq.ParquetFile(self.path, **_parquet_option(pq.ParquetFile, "page_checksum_verification"))
        except Exception as e:  # pyarrow raises its own ArrowInvalid etc.
            raise TraceFormatError(f"{self.path}: not a Parquet trace: {e}") from None
        try:
            names = pf.schema_arrow.names
            n = pf.metadata.num_rows
        except Exception as e:
            raise TraceFormatError(f"{self.path}: unreadable Parquet trace: {e}") from None
        for col in ("gpa", "size"):
            if col not in names:
                raise TraceFormatError(f"{self.path}: no '{col}' column (columns: {', '.join(names)})")
        cols = [c for c, _ in _COLUMNS if c in names]
        for c in cols:
            if names.count(c) > 1:
                raise TraceFormatError(f"{self.path}: column '{c}' appears twice")
        first = 0
        try:
            batches = pf.iter_batches(batch_size=self.chunk_records, columns=cols)
        except Exception as e:
            raise TraceFormatError(f"{self.path}: unreadable Parquet trace: {e}") from None
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as e:  # pyarrow: OSError (corrupt pages, thrift), ArrowInvalid...
                raise TraceFormatError(f"{self.path}: unreadable Parquet trace: {e}") from None
            try:
                arrays = {c: batch.column(c).to_numpy(zero_copy_only=False) for c in cols}
            except Exception as e:
                raise TraceFormatError(f"{self.path}: unreadable Parquet trace: {e}") from None
            k = len(arrays["gpa"])
            yield self._check(arrays["gpa"], arrays["size"], arrays.get("rip"), first)
            first += k
            self.bytes_done = int(self.bytes_total * first / max(n, 1))
        self.bytes_done = self.bytes_total


def _compressed_kind(path: Path) -> str | None:
    """"gzip", "bzip2"... when ``path`` starts with that compressor's magic number."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return None
    for magic, kind in _COMPRESSED_MAGIC:
        if head.startswith(magic):
            return kind
    return None


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependency(
            "Parquet traces need pyarrow, which is not installed: pip install 'sppkit[parquet]' (or pyarrow)"
        ) from None
    return pq


@functools.lru_cache(maxsize=None)
def _parquet_option(fn, option: str) -> dict[str, bool]:
    """``{option: True}`` when the installed pyarrow's ``fn`` takes ``option``, else
    ``{}``.  Page checksums (``write_page_checksum`` for ParquetWriter,
    ``page_checksum_verification`` for ParquetFile) came with pyarrow 15: with an
    older pyarrow, Parquet traces are written and read without them."""
    try:
        return {option: True} if option in inspect.signature(fn).parameters else {}
    except (TypeError, ValueError):  # (no signature to inspect)
        return {}


# =====================================================================================
# opening: formats, detection, shards
# =====================================================================================

_SOURCES = {"lackey": LackeySource, "csv": CsvSource, "pinatrace": PinatraceSource, "native": NativeSource}


_NUM = rb"\s*(?:0[xX][0-9a-fA-F]+|\d+)\s*"
_CSV_LINE = re.compile(rb"^" + _NUM + rb"," + _NUM + rb"(?:," + _NUM + rb")?$")


def detect_format(path) -> str:
    """Guess a trace file's format from its name, then from its first lines."""
    path = Path(path)
    full = path.name.lower()
    name = full
    for z in _COMPRESSED_SUFFIXES:
        name = name.removesuffix(z)
    compressed = name != full
    if name.endswith((".npz", ".parquet", ".pq")):
        if compressed:
            raise TraceFormatError(f"{path}: compressed native traces are not supported; decompress it first")
        return "native"
    if name.endswith(".csv"):
        return "csv"
    try:
        f, raw = _open_text(path)
        try:
            head = f.read(1 << 16)
        finally:
            f.close()
            raw.close()  # (a GzipFile given a file object leaves it open)
    except _DECOMPRESS_ERRORS as e:
        raise TraceFormatError(f"{path}: cannot read: {_reason(e)}") from None
    if head[:2] == b"PK":
        if compressed:
            raise TraceFormatError(f"{path}: compressed native traces are not supported; decompress it first")
        return "native"
    lines = [ln for ln in head.split(b"\n")[:200] if ln.strip()]
    votes = {"lackey": 0, "pinatrace": 0, "csv": 0}
    for ln in lines:
        if re.match(rb"^(I  |\s[SLM] )[0-9a-fA-F]+,\d+\s*$", ln) or _VALGRIND_LINE.match(ln):
            votes["lackey"] += 1
        elif _PIN_LINE.match(ln) or ln.strip() == b"#eof":
            votes["pinatrace"] += 1
        elif _CSV_LINE.match(ln):
            votes["csv"] += 1
    best = max(votes, key=votes.__getitem__)
    if votes[best] == 0:
        raise TraceFormatError(f"{path}: cannot tell the trace format; give it (--format, or fmt= in Python: "
                               f"{', '.join(FORMATS)})")
    return best


def _shard_files(path: Path) -> list[Path]:
    """The shards of directory ``path``: its regular, non-hidden files in sorted name
    order (what a replay of the directory reads)."""
    try:
        return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError as e:
        raise TraceFormatError(f"{path}: cannot list the directory: {_reason(e)}") from None


def list_shards(path) -> list[Path]:
    """A trace path → its files: the file itself, or a directory's regular,
    non-hidden files in sorted name order (its shards, replayed as one trace)."""
    path = Path(path)
    if path.is_dir():
        files = _shard_files(path)
        if not files:
            raise TraceFormatError(f"{path}: directory holds no trace shards")
        return files
    if not path.exists():
        raise TraceFormatError(f"{path}: no such trace file or directory")
    return [path]


def _diagnostics(diagnostics: Diagnostics | None, strict: bool) -> Diagnostics:
    """The Diagnostics a reader reports to: ``diagnostics``, or a new one with ``strict``.
    ``strict=True`` with a lenient ``diagnostics`` is a ValueError (it was ignored)."""
    if diagnostics is None:
        return Diagnostics(strict=bool(strict))
    if not isinstance(diagnostics, Diagnostics):
        raise TypeError(f"diagnostics must be a Diagnostics or None, got {type(diagnostics).__name__}")
    if strict and not diagnostics.strict:
        raise ValueError("strict=True contradicts diagnostics=Diagnostics(strict=False): give Diagnostics(strict=True), "
                         "or only one of the two")
    return diagnostics


def check_read_args(fmt, size, chunk_records) -> None:
    """The arguments every trace reader takes, checked up front (before any file is
    opened): ``fmt`` one of :data:`FORMATS` or ``"auto"`` (a TraceFormatError, a
    ValueError, else), ``size`` 1..65535 and ``chunk_records`` 1..2**30 (ValueErrors
    naming the argument)."""
    if not isinstance(fmt, str) or (fmt != "auto" and fmt not in _SOURCES):
        raise TraceFormatError(f"trace format {fmt!r}: must be one of {', '.join(FORMATS)} or auto")
    _write_size(size)
    _chunk_records(chunk_records)


def open_trace(path, fmt: str = "auto", *, size: int = 8, chunk_records: int = CHUNK_RECORDS,
               diagnostics: Diagnostics | None = None, strict: bool = False) -> TraceSource:
    """A :class:`TraceSource` for one trace file.  ``fmt``: lackey, csv, pinatrace,
    native or auto.  ``size``: pinatrace write size (1..65535).  ``chunk_records``:
    1..:data:`MAX_CHUNK_RECORDS` (2**30).  A bad ``fmt``, ``size`` or ``chunk_records``
    is a ValueError naming the argument, raised before the file is looked at."""
    check_read_args(fmt, size, chunk_records)
    diagnostics = _diagnostics(diagnostics, strict)
    _trace_file(path)
    if fmt == "auto":
        fmt = detect_format(path)
    kw: dict[str, Any] = {"chunk_records": chunk_records, "diagnostics": diagnostics}
    if fmt == "pinatrace":
        kw["size"] = size
    return _SOURCES[fmt](path, **kw)


def read_trace(path, fmt: str = "auto", **kw) -> np.ndarray:
    """A whole (small) trace file or shard directory as one array (tests, tools).
    ``rip`` carried over shards like one concatenated trace."""
    parts = []
    carry = NO_RIP
    for p in list_shards(path):
        src = open_trace(p, fmt, **kw)
        for chunk in src:
            chunk = chunk.copy()
            chunk["rip"][chunk["rip"] == RIP_CARRY] = carry
            parts.append(chunk)
        if src.last_ip != RIP_CARRY:
            carry = src.last_ip
    return np.concatenate(parts) if parts else np.zeros(0, TRACE_DTYPE)


# =====================================================================================
# writers
# =====================================================================================


def _writable(records, first: int) -> dict[str, np.ndarray]:
    """The columns of ``records`` as written (gpa u64, size u16, rip u64), checked as
    the readers check them: integer fields, no negative gpa or rip, sizes 1..MAX_SIZE,
    no write running past the end of the 64-bit address space, no reserved rip.  A bad
    record is a TraceFormatError naming it (``record first + i``); a chunk that is not
    a structured array with those fields, a TypeError."""
    names = records.dtype.names if isinstance(records, np.ndarray) else None
    if names is None or "gpa" not in names or "size" not in names:
        raise TypeError("records must be a structured array with integer gpa and size fields (and optionally rip), "
                        f"got {type(records).__name__}" + (f" of dtype {records.dtype}" if names is None and
                                                           isinstance(records, np.ndarray) else ""))
    if records.ndim != 1:
        raise TypeError(f"records must be a 1-D array, got shape {records.shape}")
    raw = {c: records[c] for c in ("gpa", "size", "rip") if c in names}
    n = len(records)
    for c, a in raw.items():
        if a.dtype.kind not in "ui":
            raise TypeError(f"the {c} field must hold integers, got dtype {a.dtype}")
        refuse_negative(a, c, first)
    sz = raw["size"]
    if n and (sz.min() < 1 or sz.max() > MAX_SIZE):
        j = int(np.argmax((sz < 1) | (sz > MAX_SIZE)))
        raise TraceFormatError(f"record {first + j}: size {int(sz[j])} out of range (1..{MAX_SIZE})")
    cols: dict[str, np.ndarray] = {
        "gpa": np.ascontiguousarray(raw["gpa"], np.uint64), "size": np.ascontiguousarray(sz, np.uint16),
        "rip": np.ascontiguousarray(raw["rip"], np.uint64) if "rip" in raw else np.full(n, NO_RIP)}
    wraps = wrapping(cols["gpa"], cols["size"])
    if len(wraps):
        j = int(wraps[0])
        raise TraceFormatError(f"record {first + j}: {wrap_reason(cols['gpa'][j], cols['size'][j])}")
    if "rip" in raw and n and (cols["rip"] == RIP_CARRY).any():
        j = int(np.argmax(cols["rip"] == RIP_CARRY))
        raise TraceFormatError(f"record {first + j}: {_RESERVED}")
    return cols


_NATIVE_SUFFIXES = (".npz", ".parquet", ".pq")


def _output_file(path, what: str = "a native trace") -> Path:
    """``path`` checked as the file a writer will create or replace: not empty, not a
    directory, in an existing directory.  Errors (a ValueError, else the OSError
    subclass that fits) name ``path`` and the problem; nothing is created.  The string
    ``"-"`` is refused (a ValueError): it usually means standard output, which sppkit
    does not write to, and would otherwise be a file named "-" (``"./-"`` or
    ``Path("-")`` names that file)."""
    if isinstance(path, (str, bytes)) and not str(path).strip():
        raise ValueError(f"an empty path; give a file name for {what}")
    if isinstance(path, str) and path == "-":
        raise ValueError(f"'-': standard output is not supported; give a file name for {what} "
                         "(./- for a file named '-')")
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{p} is a directory; give a file name for {what}")
    if p.exists() and not p.is_file():
        # (the file is written beside it and renamed over it: a device node or FIFO —
        # /dev/null, /dev/full — would be replaced by a regular file)
        raise FileExistsError(f"{p} is a device, FIFO or socket, not a file sppkit can replace; give a file name "
                              f"for {what}")
    parent = p.parent
    if not parent.exists():
        raise FileNotFoundError(f"{p}: directory {parent} does not exist")
    if not parent.is_dir():
        raise NotADirectoryError(f"{p}: {parent} is not a directory")
    return p


def check_native_path(path) -> Path:
    """``path`` checked as the target of a native trace, as :class:`NativeWriter` checks
    it before creating anything (callers that do long work before writing check it
    first): not empty (a ValueError), a ``.npz``, ``.parquet`` or ``.pq`` name (a
    TraceFormatError), not a directory, in an existing directory (OSErrors naming
    ``path``), pyarrow installed for Parquet (:class:`MissingDependency`)."""
    p = _output_file(path, "a native trace (.npz or .parquet)")
    suffix = p.suffix.lower()
    if suffix not in _NATIVE_SUFFIXES:
        raise TraceFormatError(f"{p}: a native trace is written as .npz or .parquet")
    if suffix != ".npz":
        _pyarrow_parquet()
    return p


def _temp_dir(target: Path) -> str:
    """A hidden temporary directory beside ``target`` (list_shards skips it); an
    OSError names ``target``, not the temporary name."""
    try:
        return tempfile.mkdtemp(prefix=".sppkit-trace-", dir=target.parent)
    except OSError as e:
        raise type(e)(f"{target}: cannot write in {target.parent}: {_reason(e)}") from None


class NativeWriter:
    """Stream records into a native trace: ``.npz`` (columns as uncompressed ``.npy``
    members, so readers can memory-map them) or ``.parquet``/``.pq`` (pyarrow).  Memory
    use is one chunk; the ``.npz`` columns are spooled to temporary files beside ``path``
    and assembled on :meth:`close`, a Parquet file is written beside ``path``: either
    replaces ``path`` only on a successful :meth:`close` (:meth:`abort` leaves an
    existing file alone).

    ``path`` is checked before anything is created: a suffix other than .npz, .parquet
    or .pq is a TraceFormatError, an empty path a ValueError; a directory, or a path in
    a directory that does not exist, an OSError (IsADirectoryError, FileNotFoundError...)
    naming ``path``."""

    def __init__(self, path) -> None:
        self.path = check_native_path(path)
        suffix = self.path.suffix.lower()
        self.count = 0
        self._closed = False
        self._failed: BaseException | None = None
        self.parquet = suffix != ".npz"
        if self.parquet:
            pq = _pyarrow_parquet()
            import pyarrow as pa

            self._pa = pa
            self._schema = pa.schema([("gpa", pa.uint64()), ("size", pa.uint16()), ("rip", pa.uint64())])
            self._dir = _temp_dir(self.path)
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)  # never closed: no litter
            self._tmp = Path(self._dir) / self.path.name
            try:
                # a CRC-32 in every page header, which the reader verifies (_parquet_option)
                self._pq = pq.ParquetWriter(str(self._tmp), self._schema,
                                            **_parquet_option(pq.ParquetWriter, "write_page_checksum"))
            except BaseException:
                shutil.rmtree(self._dir, ignore_errors=True)
                raise
        else:
            self._dir = _temp_dir(self.path)
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
            self._files = {}
            try:
                for c, _ in _COLUMNS:
                    self._files[c] = open(os.path.join(self._dir, c), "wb")
            except BaseException:
                for f in self._files.values():
                    f.close()
                shutil.rmtree(self._dir, ignore_errors=True)
                raise

    def write(self, records: np.ndarray) -> None:
        """Append records (an array of :data:`TRACE_DTYPE`, or any structured array
        with integer ``gpa`` and ``size`` fields and optionally ``rip``).  A record the
        readers would refuse (see :func:`_writable`) is a TraceFormatError naming it;
        nothing of that call is written.  A write that fails on the way to the disk
        writes nothing either (.npz), or discards the trace (Parquet: :meth:`abort`)."""
        if self._closed:
            why = f" (aborted after a failed write: {self._failed})" if self._failed is not None else ""
            raise ValueError(f"{self.path}: writer is closed{why}")
        cols = _writable(records, self.count)
        n = len(cols["gpa"])
        if n == 0:
            return
        if self.parquet:
            try:
                self._pq.write_table(self._pa.table(cols, schema=self._schema))
            except BaseException as e:
                self._failed = e
                self.abort()
                raise
        else:
            at = {c: f.tell() for c, f in self._files.items()}
            try:
                for c, dt in _COLUMNS:
                    self._files[c].write(cols[c].astype(dt, copy=False).tobytes())
            except BaseException:
                for c, f in self._files.items():  # the columns stay the same length
                    f.seek(at[c])
                    f.truncate()
                raise
        self.count += n

    def close(self) -> None:
        """Finish the trace: it replaces ``path`` now.  On failure (an OSError naming
        ``path``) ``path`` is left as it was and the temporary files are removed."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.parquet:
                try:
                    self._pq.close()
                    os.replace(self._tmp, self.path)
                finally:
                    shutil.rmtree(self._dir, ignore_errors=True)
                return
            tmp = self.path.with_name(f".{self.path.name}.partial")
            try:
                for f in self._files.values():
                    f.close()
                with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                    for c, dt in _COLUMNS:
                        spool = os.path.join(self._dir, c)
                        with zf.open(c + ".npy", "w", force_zip64=True) as out, open(spool, "rb") as src:
                            np.lib.format.write_array_header_2_0(
                                out, {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False,
                                      "shape": (self.count,)})
                            shutil.copyfileobj(src, out, 8 << 20)
                    with zf.open("format.npy", "w") as out:
                        np.lib.format.write_array(out, np.array(NATIVE_VERSION))
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)
                shutil.rmtree(self._dir, ignore_errors=True)
        except OSError as e:
            raise type(e)(f"{self.path}: cannot write: {_reason(e)}") from e

    def abort(self) -> None:
        """Discard what was written (an error happened)."""
        if self._closed:
            return
        self._closed = True
        if self.parquet:
            try:
                self._pq.close()
            except Exception:  # the error being handled is the one to report
                pass
            finally:
                shutil.rmtree(self._dir, ignore_errors=True)
        else:
            for f in self._files.values():
                f.close()
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "NativeWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_native(path, records: np.ndarray) -> int:
    """Write an array of records as a native trace; returns the record count."""
    with NativeWriter(path) as w:
        w.write(records)
    return w.count


class TraceRecorder:
    """An ``on_write`` observer (``recorder(gpa, size, rip)``) that records a guest's
    writes into a native trace, a chunk at a time.  Call :meth:`close` at the end (or
    :meth:`abort` to discard the trace; as a context manager: close, or abort on an
    exception).

    ``path`` is checked as :class:`NativeWriter` checks it and ``chunk_records`` is an
    int 1..:data:`MAX_CHUNK_RECORDS` (a ValueError), both before anything is created.
    Each record is checked as it is given: ``gpa`` an integer 0..2**64-1, ``size``
    1..65535, ``gpa + size <= 2**64``, ``rip`` None or an integer 0..2**64-1 other than
    :data:`RIP_CARRY`; a bad one is a ValueError (TypeError: not an integer) naming it
    (``record N``, counted from 0) and is not recorded."""

    def __init__(self, path, *, chunk_records: int = 1 << 16) -> None:
        n = _chunk_records(chunk_records)
        buf = np.empty(n, TRACE_DTYPE)  # before the writer: a failure here leaves no temporary files
        self.writer = NativeWriter(path)
        self._buf = buf
        self._n = 0
        self.count = 0

    def __call__(self, gpa: int, size: int, rip: int | None) -> None:
        if type(gpa) is not int or type(size) is not int or (rip is not None and type(rip) is not int):
            gpa, size, rip = self._ints(gpa, size, rip)
        if not (0 <= gpa and 1 <= size <= MAX_SIZE and gpa + size <= 1 << 64) or \
                (rip is not None and (not 0 <= rip < 1 << 64 or rip == _RIP_CARRY_INT)):
            self._refuse(gpa, size, rip)
        if self.writer._closed:
            raise ValueError(f"{self.writer.path}: recorder is closed")
        r = self._buf[self._n]
        r["gpa"] = gpa
        r["size"] = size
        r["rip"] = NO_RIP if rip is None else rip
        self._n += 1
        self.count += 1
        if self._n == len(self._buf):
            self.flush()

    def _ints(self, gpa, size, rip) -> tuple[int, int, int | None]:
        out: list[int | None] = []
        for name, v in (("gpa", gpa), ("size", size), ("rip", rip)):
            if v is None and name == "rip":
                out.append(None)
            elif isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"record {self.count}: {name} must be an integer, got {type(v).__name__} {v!r}")
            else:
                out.append(int(v))
        g, s = out[0], out[1]
        assert g is not None and s is not None
        return g, s, out[2]

    def _refuse(self, gpa: int, size: int, rip: int | None):
        where = f"record {self.count}"
        if not 0 <= gpa < 1 << 64:
            raise ValueError(f"{where}: gpa {gpa:#x} is outside the 64-bit address space")
        if not 1 <= size <= MAX_SIZE:
            raise ValueError(f"{where}: size {size} out of range (1..{MAX_SIZE})")
        if gpa + size > 1 << 64:
            raise ValueError(f"{where}: {wrap_reason(gpa, size)}")
        assert rip is not None
        if rip == _RIP_CARRY_INT:
            raise ValueError(f"{where}: {_RESERVED}")
        raise ValueError(f"{where}: rip {rip:#x} is outside the 64-bit address space")

    def flush(self) -> None:
        if self._n:
            self.writer.write(self._buf[: self._n])
            self._n = 0

    def close(self) -> None:
        """Write what is buffered and finish the trace (it replaces ``path`` now); on
        failure the trace is discarded and ``path`` left as it was."""
        try:
            self.flush()
        except BaseException:
            self.writer.abort()
            raise
        self.writer.close()

    def abort(self) -> None:
        """Discard the trace: ``path`` is left as it was."""
        self._n = 0
        self.writer.abort()

    def __enter__(self) -> "TraceRecorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _shard_target(out_path: Path) -> tuple[Path, str]:
    """Where ``convert_trace(..., shard_records=N)`` writes: ``(directory, shard
    suffix)``, the directory being ``out_path`` without its suffix."""
    suffix = out_path.suffix if out_path.suffix in (".npz", ".parquet") else ".npz"
    out_dir = out_path if not out_path.suffix else out_path.with_suffix("")
    return out_dir, suffix


def overwritten_input(src_path, out_path, shard_records: int | None = None, *,
                      shards: list[Path] | None = None) -> Path | None:
    """The file of trace ``src_path`` (the file, or one of its shards) that converting
    it into ``out_path`` would overwrite, else None.  ``shards``: ``list_shards(src_path)``
    if the caller has it."""
    out_path = Path(out_path)
    if shards is None:
        shards = list_shards(src_path)
    if shard_records is None:
        return next((p for p in shards if _same_file(p, out_path)), None)
    out_dir, suffix = _shard_target(out_path)
    part = re.compile(r"part-\d{5,}" + re.escape(suffix))
    return next((p for p in shards if part.fullmatch(p.name) and _same_file(p.parent, out_dir)), None)


def clobbered_input(src_path, out_path, shard_records: int | None = None, *,
                    shards: list[Path] | None = None) -> str | None:
    """Why writing ``out_path`` (with ``shard_records``: the shards of
    :func:`convert_trace`) would damage trace ``src_path``, else None: it would
    overwrite one of the trace's files (:func:`overwritten_input`), or ``src_path`` is a
    directory of shards and the output would land in it, where every later replay of
    the directory would read it as one more shard."""
    clash = overwritten_input(src_path, out_path, shard_records, shards=shards)
    if clash is not None:
        return f"would overwrite the input {clash}"
    src, out_path = Path(src_path), Path(out_path)
    target = _shard_target(out_path)[0] if shard_records is not None else out_path.parent
    if src.is_dir() and _same_file(target, src):
        return (f"would write into the input shard directory {src}, where a replay of it would read the new "
                "file as one more shard")
    return None


def _missing_dirs(d: Path) -> list[Path]:
    """``d`` and its ancestors that do not exist yet, deepest first."""
    out = []
    while not d.exists() and d != d.parent:
        out.append(d)
        d = d.parent
    return out


def convert_trace(src_path, out_path, fmt: str = "auto", *, size: int = 8, strict: bool = False,
                  shard_records: int | None = None, chunk_records: int = CHUNK_RECORDS,
                  diagnostics: Diagnostics | None = None, progress=None) -> dict:
    """Convert a trace (file or shard directory) into the native format.

    ``out_path``: ``.npz`` or ``.parquet`` file, replaced only when the conversion
    succeeds; with ``shard_records`` (1..2**63-1), a directory (``out_path`` without its
    suffix; created if missing) of shards ``part-00000.npz`` (``.parquet`` if
    ``out_path`` ends so) ... of at most that many records each.  IPs are carried
    across input shards as for one concatenated trace.  Returns counts.

    Everything is checked before anything is written: bad arguments are ValueErrors
    naming them; an ``out_path`` that would overwrite the input, or that lies in the
    input's shard directory (see :func:`clobbered_input`), is a ValueError; a
    directory for a single-file output, or a missing parent directory, an OSError.
    A shard directory that already holds files (anything a replay of the directory
    would read: regular, non-hidden files) is a FileExistsError: they would be read
    with the new shards.  A conversion that fails leaves no output behind: the shards
    it wrote and the directories it created are removed, an existing ``out_path``
    file is kept."""
    diagnostics = _diagnostics(diagnostics, strict)
    check_read_args(fmt, size, chunk_records)
    if shard_records is not None:
        shard_records = _positive_int("shard_records", shard_records, MAX_SHARD_RECORDS, "2**63-1")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable or None, got {type(progress).__name__}")
    if isinstance(out_path, (str, bytes)) and not str(out_path).strip():
        raise ValueError("out_path: an empty path; give a file name ending in .npz or .parquet "
                         "(or a directory with shard_records)")
    out_path = Path(out_path)
    shards = list_shards(src_path)
    why = clobbered_input(src_path, out_path, shard_records, shards=shards)
    if why is not None:
        raise ValueError(f"{out_path}: {why}; write the converted trace elsewhere")
    created: list[Path] = []
    out_dir, suffix = out_path.parent, out_path.suffix
    if shard_records is None:
        if out_path.is_dir():
            raise IsADirectoryError(f"{out_path} is a directory; a directory of shards needs --shard-records "
                                    "(shard_records= in Python)")
        # the other checks of out_path (suffix, parent directory, pyarrow) are NativeWriter's, made before
        # anything is read or written
    else:
        out_dir, suffix = _shard_target(out_path)
        if suffix == ".parquet":
            _pyarrow_parquet()
        if out_dir.exists() and not out_dir.is_dir():
            raise NotADirectoryError(f"{out_dir} exists and is not a directory; --shard-records (shard_records=) "
                                     "writes a directory of shards there")
        if out_dir.is_dir():
            old = _shard_files(out_dir)
            if old:
                more = ", ..." if len(old) > 1 else ""
                raise FileExistsError(
                    f"{out_dir} already holds {len(old)} shard(s) ({old[0].name}{more}); a directory of shards is "
                    "read whole, so they would be replayed with the new ones: remove them or give another output "
                    "directory")
        created = _missing_dirs(out_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            for d in created:
                _rmdir_quietly(d)
            raise type(e)(f"{out_dir}: cannot create the directory: {_reason(e)}") from None
    carry = NO_RIP
    total = 0
    writer = None
    shard_no = 0
    written_files: list[Path] = []

    def new_writer():
        nonlocal shard_no
        p = out_dir / f"part-{shard_no:05d}{suffix}" if shard_records else out_path
        w = NativeWriter(p)
        shard_no += 1
        written_files.append(p)
        return w

    formats: list[str] = []
    try:
        writer = new_writer()
        for p in shards:
            src = open_trace(p, fmt, size=size, chunk_records=chunk_records, diagnostics=diagnostics)
            for chunk in src:
                rip = chunk["rip"]
                rip[rip == RIP_CARRY] = carry
                while len(chunk):
                    room = len(chunk) if not shard_records else shard_records - writer.count
                    if room == 0:
                        writer.close()
                        writer = new_writer()
                        continue
                    writer.write(chunk[:room])
                    total += min(room, len(chunk))
                    chunk = chunk[room:]
                if progress is not None:
                    progress(src)
            formats.append(src.format)
            if src.last_ip != RIP_CARRY:
                carry = src.last_ip
        if total == 0 and diagnostics.skipped:  # (nothing written: a wrong format, most likely)
            raise unreadable(src_path, diagnostics.skipped, diagnostics.examples, sorted(set(formats)))
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        if shard_records is not None:  # shards already closed: ours (the directory held none)
            for f in written_files:
                f.unlink(missing_ok=True)
            for d in created:
                _rmdir_quietly(d)
        raise
    return {"records": total, "skipped_records": diagnostics.skipped, "files": [str(p) for p in written_files]}


def _rmdir_quietly(d: Path) -> None:
    try:
        d.rmdir()
    except OSError:  # not empty (someone else's file), or gone: leave it
        pass
