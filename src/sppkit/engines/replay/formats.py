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
import gzip
import lzma
import os
import re
import shutil
import struct
import tempfile
import tokenize
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

__all__ = [
    "CHUNK_RECORDS", "FORMATS", "NO_RIP", "RIP_CARRY", "TRACE_DTYPE", "Diagnostics", "MalformedRecord",
    "MissingDependency", "NativeWriter", "TraceFormatError", "TraceRecorder", "TraceSource", "convert_trace",
    "detect_format", "list_shards", "open_trace", "read_trace", "write_native",
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
CHUNK_RECORDS = 1 << 20
BLOCK_BYTES = 1 << 20
MAX_SIZE = 0xFFFF
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
    ``strict``, raised.  ``on_warning`` is called with each kept message."""

    strict: bool = False
    keep: int = 10
    skipped: int = 0
    examples: list = field(default_factory=list)
    on_warning: Callable[[str], None] | None = None

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

    def merge(self, other: "Diagnostics") -> None:
        self.skipped += other.skipped
        room = self.keep - len(self.examples)
        if room > 0:
            self.examples.extend(other.examples[:room])


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
        self.path = Path(path)
        if not self.path.is_file():
            raise TraceFormatError(f"{self.path}: no such trace file")
        self.chunk_records = _positive_int("chunk_records", chunk_records)
        self.block_bytes = _positive_int("block_bytes", block_bytes)
        self.diagnostics = diagnostics if diagnostics is not None else Diagnostics()
        self.bytes_total = self.path.stat().st_size
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


def _positive_int(name: str, value) -> int:
    """``value`` as an int >= 1, else a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a positive integer")
    return int(value)


def _write_size(size) -> int:
    """``size`` (the pinatrace write size) as an int in 1..MAX_SIZE, else a ValueError."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= size <= MAX_SIZE:
        raise ValueError(f"size={size!r}: the pinatrace write size (--size) must be an integer 1..{MAX_SIZE}")
    return int(size)


class _TextSource(TraceSource):
    """Block-wise reader of a line-oriented text trace."""

    def _read(self, f) -> bytes:
        try:
            return f.read(self.block_bytes)
        except _DECOMPRESS_ERRORS as e:
            raise TraceFormatError(f"{self.path}: cannot read: {e}") from None

    def _blocks(self) -> Iterator[_Block]:
        try:
            f, raw = _open_text(self.path)
        except OSError as e:
            raise TraceFormatError(f"{self.path}: cannot read: {e}") from None
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


class LackeySource(_TextSource):
    """valgrind ``--tool=lackey --trace-mem=yes`` output.

    ``I  addr,size`` instruction fetch (its address is the IP of the stores after it);
    `` S addr,size`` store and `` M addr,size`` modify are the writes; `` L`` loads,
    ``==pid==`` and ``--pid--`` lines and blank lines are ignored.  Addresses are hex
    without ``0x``, sizes decimal.
    """

    format = "lackey"

    def _chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for blk in self._blocks():
            yield self._parse(blk)

    def _parse(self, blk: _Block) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c0, c1, c2 = blk.char(0), blk.char(1), blk.char(2)
        is_i = (c0 == 73) & (c1 == 32) & (c2 == 32)  # "I  "
        data = (c0 == 32) & (c2 == 32)
        is_store = data & ((c1 == 83) | (c1 == 77))  # " S ", " M "
        is_load = data & (c1 == 76)  # " L "
        ignored = (c0 == 61) | (c0 == 45) | (blk.ends == blk.starts)  # ==pid==, --pid--, blank
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
        need = np.unique(k[k >= 0])
        if len(ii):
            need = np.union1d(need, [len(ii) - 1])  # the carry for the next block
        if self.diagnostics.strict:
            # strict: every I line is checked, also those no store takes its IP from (the
            # default mode parses only the I lines stores use: the others affect no record)
            need = np.arange(len(ii))
        ia = blk.starts[ii[need]] + 3
        ie = blk.ends[ii[need]]
        icomma = _first_at_or_after(commas, ia, ie)
        ipv, iok = _parse_uint(buf, ia, icomma, 16)
        iok &= icomma >= 0
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

        bad_lines = []
        if not ok.all():
            for j in np.flatnonzero(~ok):
                line = blk.line(int(st[j]))
                m = _LACKEY_LINE.match(line)
                if m and 1 <= int(m.group(2)) <= MAX_SIZE and len(m.group(1)) <= 16:
                    addr[j], size[j], ok[j] = int(m.group(1), 16), int(m.group(2)), True
                else:
                    bad_lines.append((int(st[j]), self._why(line)))
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
        return f"size {int(m.group(2))} out of range (1..{MAX_SIZE})"


# ------------------------------------------------------------------------------- CSV
class CsvSource(_TextSource):
    """``gpa,size[,rip]`` per line; each field hex (``0x...``) or decimal.  An optional
    header (a first line that is not numeric, e.g. ``gpa,size,rip``); blank lines and
    ``#`` comments are skipped."""

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
        vals = []
        try:
            for p in parts:
                vals.append(int(p, 16) if p[:2].lower() == b"0x" else int(p, 10))
        except ValueError:
            vals = None
        if vals is None or len(vals) not in (2, 3):
            if blk.line0 + i == 1 and all(re.fullmatch(rb"[A-Za-z_][A-Za-z0-9_ ]*", p) for p in parts):
                return None  # header: gpa,size,rip
            why = (f"expected 2 or 3 fields (gpa,size[,rip]), got {len(parts)}" if vals is not None
                   else "expected integers (decimal or 0x-prefixed hex): gpa,size[,rip]")
            self._bad(blk, i, why)
            return None
        gpa, size = vals[0], vals[1]
        rip = vals[2] if len(vals) == 3 else int(NO_RIP)
        if not 1 <= size <= MAX_SIZE:
            self._bad(blk, i, f"size {size} out of range (1..{MAX_SIZE})")
            return None
        if not 0 <= gpa < 1 << 64 or not 0 <= rip < 1 << 64:
            self._bad(blk, i, "address out of the 64-bit range")
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
        if fix.any():
            for i in np.flatnonzero(fix):
                m = _PIN_LINE.match(blk.line(int(i)))
                if m and len(m.group(1)) <= 16 and len(m.group(3)) <= 16:
                    if m.group(2) == b"W":
                        ip[i], addr[i], write[i] = int(m.group(1), 16), int(m.group(3), 16), True
                else:
                    self._bad(blk, int(i), "expected 'IP: W ADDR' or 'IP: R ADDR' (hex)")
        reserved = write & (ip == RIP_CARRY)
        if reserved.any():
            for i in np.flatnonzero(reserved):
                self._bad(blk, int(i), _RESERVED)
            write &= ~reserved
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
    """A reader for one ``.npy`` member: ``(dtype, count, read(start, stop) -> array)``.
    Stored (uncompressed) members are read in place through ``fd`` (an open handle on
    ``path``: plain reads, no mapping, so memory stays flat); compressed ones stream."""
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
        n = _member_count(path, name, shape, dtype, offset - start, info)

        def read_stored(a, b):
            out = np.empty(b - a, dtype)
            if b > a:
                fd.seek(offset + a * dtype.itemsize)
                if fd.readinto(out.view(np.uint8)) != (b - a) * dtype.itemsize:
                    raise TraceFormatError(f"{path}: member {name} is truncated")
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
        try:
            g = _as_unsigned(gpa, np.uint64)
            r = _as_unsigned(rip, np.uint64) if rip is not None else np.full(len(g), NO_RIP)
            sz = np.asarray(size)
            if sz.dtype.kind not in "ui":
                raise TypeError(f"expected an integer size column, got {sz.dtype}")
            bad = (sz < 1) | (sz > MAX_SIZE)
        except (ValueError, TypeError, OverflowError) as e:
            raise TraceFormatError(f"{self.path}: records {first}..{first + len(gpa) - 1}: {e}") from None
        reserved = r == RIP_CARRY if rip is not None else None
        if reserved is not None and reserved.any():
            bad = bad | reserved
        if bad.any():
            for j in np.flatnonzero(bad):
                why = _RESERVED if reserved is not None and reserved[j] else \
                    f"size {int(sz[j])} out of range (1..{MAX_SIZE})"
                self.diagnostics.malformed(self.path, first + int(j), why, unit="record")
            keep = ~bad
            g, sz, r = g[keep], sz[keep], r[keep]
        return g, sz.astype(np.uint16, copy=False), r

    def _npz(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        try:
            zf = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as e:
            kind = _compressed_kind(self.path)
            if kind is not None:
                raise TraceFormatError(f"{self.path}: a {kind}-compressed native trace is not supported; "
                                       f"decompress it first") from None
            raise TraceFormatError(f"{self.path}: not a native trace (.npz): {e}") from None
        except _ZIP_ERRORS as e:  # NotImplementedError: zip version...
            raise TraceFormatError(f"{self.path}: unreadable native trace: {e}") from None
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
                raise TraceFormatError(f"{self.path}: unreadable native trace: {e}") from None
            counts = {c: r[1] for c, r in readers.items()}
            if len(set(counts.values())) != 1:
                raise TraceFormatError(f"{self.path}: columns of different lengths: {counts}")
            n = counts["gpa"]
            step = self.chunk_records
            for a in range(0, n, step):
                b = min(n, a + step)
                try:
                    cols = {c: r[2](a, b) for c, r in readers.items()}
                except TraceFormatError:
                    raise
                except _ZIP_ERRORS as e:  # a bad CRC or deflate stream shows up as the member is read
                    raise TraceFormatError(f"{self.path}: unreadable native trace: {e}") from None
                self.bytes_done = int(self.bytes_total * b / max(n, 1))
                yield self._check(cols["gpa"], cols["size"], cols.get("rip"), a)
        self.bytes_done = self.bytes_total

    def _parquet(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        pq = _pyarrow_parquet()
        try:
            pf = pq.ParquetFile(self.path)
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


def _as_unsigned(a, dtype) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind == "u":
        return a.astype(dtype, copy=False)
    if a.dtype.kind == "i":
        if len(a) and a.min() < 0:
            raise ValueError("negative address")
        return a.astype(dtype)
    raise TypeError(f"expected an unsigned integer column, got {a.dtype}")


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependency(
            "Parquet traces need pyarrow, which is not installed: pip install 'sppkit[parquet]' (or pyarrow)"
        ) from None
    return pq


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
        with f:
            head = f.read(1 << 16)
    except _DECOMPRESS_ERRORS as e:
        raise TraceFormatError(f"{path}: cannot read: {e}") from None
    if head[:2] == b"PK":
        if compressed:
            raise TraceFormatError(f"{path}: compressed native traces are not supported; decompress it first")
        return "native"
    lines = [ln for ln in head.split(b"\n")[:200] if ln.strip()]
    votes = {"lackey": 0, "pinatrace": 0, "csv": 0}
    for ln in lines:
        if re.match(rb"^(I  |\s[SLM] )[0-9a-fA-F]+,\d+\s*$", ln) or re.match(rb"^(==|--)\d+(==|--)", ln):
            votes["lackey"] += 1
        elif _PIN_LINE.match(ln) or ln.strip() == b"#eof":
            votes["pinatrace"] += 1
        elif _CSV_LINE.match(ln):
            votes["csv"] += 1
    best = max(votes, key=votes.__getitem__)
    if votes[best] == 0:
        raise TraceFormatError(f"{path}: cannot tell the trace format; give --format ({', '.join(FORMATS)})")
    return best


def list_shards(path) -> list[Path]:
    """A trace path → its files: the file itself, or a directory's regular,
    non-hidden files in sorted name order (its shards, replayed as one trace)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise TraceFormatError(f"{path}: directory holds no trace shards")
        return files
    if not path.exists():
        raise TraceFormatError(f"{path}: no such trace file or directory")
    return [path]


def open_trace(path, fmt: str = "auto", *, size: int = 8, chunk_records: int = CHUNK_RECORDS,
               diagnostics: Diagnostics | None = None, strict: bool = False) -> TraceSource:
    """A :class:`TraceSource` for one trace file.  ``fmt``: lackey, csv, pinatrace,
    native or auto.  ``size``: pinatrace write size (1..65535).  A bad ``size`` or
    ``chunk_records`` is a ValueError naming the argument."""
    _write_size(size)
    _positive_int("chunk_records", chunk_records)
    if diagnostics is None:
        diagnostics = Diagnostics(strict=strict)
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in _SOURCES:
        raise TraceFormatError(f"trace format {fmt!r}: must be one of {', '.join(FORMATS)} or auto")
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


class NativeWriter:
    """Stream records into a native trace: ``.npz`` (columns as uncompressed ``.npy``
    members, so readers can memory-map them) or ``.parquet`` (pyarrow).  Memory use is
    one chunk; the ``.npz`` columns are spooled to temporary files beside ``path``
    and assembled on :meth:`close`, a Parquet file is written beside ``path``: either
    replaces ``path`` only on a successful :meth:`close` (:meth:`abort` leaves an
    existing file alone)."""

    def __init__(self, path) -> None:
        self.path = Path(path)
        self.count = 0
        self._closed = False
        self.parquet = self.path.suffix.lower() in (".parquet", ".pq")
        if self.parquet:
            pq = _pyarrow_parquet()
            import pyarrow as pa

            self._pa = pa
            self._schema = pa.schema([("gpa", pa.uint64()), ("size", pa.uint16()), ("rip", pa.uint64())])
            self._dir = tempfile.mkdtemp(prefix=".sppkit-trace-", dir=self.path.parent or ".")
            self._tmp = Path(self._dir) / self.path.name
            try:
                self._pq = pq.ParquetWriter(str(self._tmp), self._schema)
            except BaseException:
                shutil.rmtree(self._dir, ignore_errors=True)
                raise
        else:
            if self.path.suffix.lower() != ".npz":
                raise TraceFormatError(f"{self.path}: a native trace is written as .npz or .parquet")
            self._dir = tempfile.mkdtemp(prefix=".sppkit-trace-", dir=self.path.parent or ".")
            self._files = {c: open(os.path.join(self._dir, c), "wb") for c, _ in _COLUMNS}

    def write(self, records: np.ndarray) -> None:
        """Append records (an array of :data:`TRACE_DTYPE`, or any structured array
        with ``gpa`` and ``size`` fields and optionally ``rip``)."""
        if self._closed:
            raise ValueError("writer is closed")
        n = len(records)
        if n == 0:
            return
        names = records.dtype.names or ()
        cols: dict[str, np.ndarray] = {
            "gpa": np.ascontiguousarray(records["gpa"], np.uint64),
            "size": np.ascontiguousarray(records["size"], np.uint16),
            "rip": np.ascontiguousarray(records["rip"], np.uint64) if "rip" in names else np.full(n, NO_RIP),
        }
        if self.parquet:
            self._pq.write_table(self._pa.table(cols, schema=self._schema))
        else:
            for c, dt in _COLUMNS:
                self._files[c].write(cols[c].astype(dt, copy=False).tobytes())
        self.count += n

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
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
    writes into a native trace, a chunk at a time.  Call :meth:`close` at the end."""

    def __init__(self, path, *, chunk_records: int = 1 << 16) -> None:
        self.writer = NativeWriter(path)
        self._buf = np.empty(chunk_records, TRACE_DTYPE)
        self._n = 0
        self.count = 0

    def __call__(self, gpa: int, size: int, rip: int | None) -> None:
        r = self._buf[self._n]
        r["gpa"] = gpa
        r["size"] = size
        r["rip"] = NO_RIP if rip is None else rip
        self._n += 1
        self.count += 1
        if self._n == len(self._buf):
            self.flush()

    def flush(self) -> None:
        if self._n:
            self.writer.write(self._buf[: self._n])
            self._n = 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def overwritten_input(src_path, out_path, shard_records: int | None = None) -> Path | None:
    """The file of trace ``src_path`` (the file, or one of its shards) that converting
    it into ``out_path`` would overwrite, else None."""
    out_path = Path(out_path)
    shards = list_shards(src_path)
    if shard_records is None:
        return next((p for p in shards if _same_file(p, out_path)), None)
    suffix = out_path.suffix if out_path.suffix in (".npz", ".parquet") else ".npz"
    out_dir = out_path if not out_path.suffix else out_path.with_suffix("")
    part = re.compile(r"part-\d{5,}" + re.escape(suffix))
    return next((p for p in shards if part.fullmatch(p.name) and _same_file(p.parent, out_dir)), None)


def convert_trace(src_path, out_path, fmt: str = "auto", *, size: int = 8, strict: bool = False,
                  shard_records: int | None = None, chunk_records: int = CHUNK_RECORDS,
                  diagnostics: Diagnostics | None = None, progress=None) -> dict:
    """Convert a trace (file or shard directory) into the native format.

    ``out_path``: ``.npz`` or ``.parquet`` file; with ``shard_records``, a directory
    of shards ``part-00000.npz`` ... of at most that many records each.  IPs are
    carried across input shards as for one concatenated trace.  Returns counts."""
    diagnostics = diagnostics if diagnostics is not None else Diagnostics(strict=strict)
    out_path = Path(out_path)
    shards = list_shards(src_path)
    if shard_records is not None:
        if shard_records < 1:
            raise ValueError(f"--shard-records {shard_records}: must be positive")
    clash = overwritten_input(src_path, out_path, shard_records)
    if clash is not None:
        raise ValueError(f"{out_path}: would overwrite the input {clash}; write the converted trace elsewhere")
    if shard_records is not None:
        suffix = out_path.suffix if out_path.suffix in (".npz", ".parquet") else ".npz"
        out_dir = out_path if not out_path.suffix else out_path.with_suffix("")
        out_dir.mkdir(parents=True, exist_ok=True)
    carry = NO_RIP
    total = 0
    writer = None
    shard_no = 0
    written_files = []

    def new_writer():
        nonlocal shard_no
        p = out_dir / f"part-{shard_no:05d}{suffix}" if shard_records else out_path
        shard_no += 1
        written_files.append(p)
        return NativeWriter(p)

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
            if src.last_ip != RIP_CARRY:
                carry = src.last_ip
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return {"records": total, "skipped_records": diagnostics.skipped, "files": [str(p) for p in written_files]}
