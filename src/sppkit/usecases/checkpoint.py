"""Memory checkpointing at 128-byte granularity (``sppkit checkpoint`` / ``sppkit restore``).

The use case Intel named for SPP at XPDDS18: track which 128-byte sub-pages a guest
dirties between two checkpoints, so an incremental checkpoint holds only those.

Tracking
    At every checkpoint each sub-page of the *tracked memory* (the guest image's
    writable segments and the stack, the top 64 KiB of RAM, plus any ``track``
    ranges; whole pages) gets access map 0: write-protected.  The first write to a
    sub-page is an SPP-induced EPT violation; the handler marks the sub-page dirty
    and answers :attr:`~sppkit.vmm.Decision.UNPROTECT` (the Vm makes the touched
    sub-pages writable and commits the write), so that sub-page costs no further
    exit until the next checkpoint re-arms it.

Checkpoints
    Taken at instruction boundaries only: a port handler (``--at-port-signal``) or
    the violation handler (``--every N``) calls ``engine.request_pause()``; when
    ``run()`` returns ``"paused"`` the dirty sub-pages are read (coalesced into
    runs), the registers taken with ``engine.regs()``, the file written, the
    tracking re-armed, and ``run()`` continues the guest.  Checkpoint 0 (the base)
    holds all tracked memory and the initial registers.

File format (version 1; all integers little-endian)
    ``ckpt-NNNNNN.spck``:
      header, 64 bytes: magic ``SPPKCKPT``, u16 version, u16 header size, u16 kind
      (0 base, 1 incremental), u16 log2(granule) = 7, u32 index, u32 parent index
      (0xFFFFFFFF for the base), u32 record count, u32 0, u64 payload bytes,
      16-byte set id, u32 0, u32 CRC32 of the 60 bytes before it;
      records, each a 24-byte header (u16 type, u16 0, u32 length, u64 gpa, u32
      CRC32 of the first 16 header bytes + payload, u32 0) then ``length`` bytes:
      1 memory (at ``gpa``), 2 registers (u32 count, u32 0, then count x
      {8-byte NUL-padded name, u64 value}), 3 console output since the previous
      checkpoint, 4 metadata (UTF-8 JSON, informational);
      trailer, 48 bytes: magic ``SPPKEND\\0``, u64 file length, SHA-256 of every
      byte before the digest.
    The set (version 2): ``manifest.json`` describes it (guest, RAM size, tracked
    regions, trigger) and carries the SHA-256 of its own body; it is written once, when
    the run starts.  ``checkpoints.jsonl`` lists the checkpoints, one JSON line each
    (``{"checkpoint": {index, file, sha256, ...}, "chain": H}``), then the run's end
    (``{"final": {...}, "chain": H}``); ``H`` = SHA-256 of the previous line's ``H`` (the
    manifest's SHA-256 for the first line) followed by the line's canonical JSON
    without ``chain``, so an edited, removed or reordered line, or a journal from
    another run, is caught.  A checkpoint costs one appended line, so a long run writes
    in time linear in its checkpoints.  A last line without its newline (a run stopped
    while appending it) is not part of the set.  Version 1 sets (the checkpoint list
    inside ``manifest.json``) are still read.
    ``guest.elf`` is a copy of the guest, so a set can be resumed anywhere.
    Every file but the journal is written atomically: a temporary file in the same
    directory, ``fsync``, ``rename``, ``fsync`` of the directory; a journal line is
    appended and ``fsync``ed after its checkpoint file is in place, and a failed append
    is cut off again.

A corrupted, truncated or version-mismatched file raises a
:class:`CheckpointFileError` subclass naming the file and the problem; every file
up to the requested checkpoint is verified before anything is loaded into a guest.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import struct
import tempfile
import time
import uuid
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, NoReturn

import click

from ..engines import DEFAULT_RAM, choose_engine
from .._files import read_regular, signals_held
from ..arch.memory import MAX_READ
from ..engines.base import MAX_RAM, MAX_TIMEOUT, REGISTERS, check_ram_size
from ..engines.result import RunResult
from ..policy import parse_range_arg
from ..vmm import Decision, SppViolation
from .monitor import (ENGINE_HELP, JSON_HELP, MEMORY_HELP, Progress, check_run_args, cpl_option, engine_option,
                      memory_option, progress_option, timeout_option, writable_ram_problem)

__all__ = [
    "CHECKPOINT_PORT", "FORMAT_VERSION", "GRANULE", "JOURNAL", "MANIFEST", "SET_VERSION", "CheckpointCorrupted", "CheckpointError", "CheckpointFileError",
    "CheckpointInfo", "CheckpointMissing", "CheckpointRun", "CheckpointSet", "CheckpointTruncated",
    "CheckpointVersionMismatch", "CheckpointWriteError", "Checkpointer", "DirtyTracker", "GuestMismatch",
    "NotACheckpointSet", "Region", "RestoreResult", "RestoredState", "UnknownCheckpoint",
    "apply_state", "atomic_write", "checkpoint_command", "checkpoint_guest", "demo_checkpoint", "encode_checkpoint",
    "load_guest_spec", "memory_digest", "open_checkpoint_set", "read_checkpoint_file",
    "restore_checkpoint", "restore_command", "tracked_regions", "write_checkpoint_file",
]

#: Port on which the bundled ckpt_* workloads signal phase boundaries.
CHECKPOINT_PORT = 0xF5
FORMAT_VERSION = 1
GRANULE = 128
PAGE = 4096
STACK_BYTES = 0x10000  #: the engines' stack: the top 64 KiB of guest RAM

MAGIC = b"SPPKCKPT"
TRAILER_MAGIC = b"SPPKEND\0"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "sppkit-checkpoint-set"
JOURNAL = "checkpoints.jsonl"
SET_VERSION = 2  #: the set format written (manifest + journal); FORMAT_VERSION is the checkpoint files'
SET_VERSIONS_READ = (1, 2)  #: 1: the checkpoint list inside manifest.json
GUEST_FILE = "guest.elf"
NO_PARENT = 0xFFFFFFFF

KIND_BASE, KIND_INCREMENTAL = 0, 1
REC_MEMORY, REC_REGISTERS, REC_CONSOLE, REC_META = 1, 2, 3, 4
_REC_NAMES = {REC_MEMORY: "memory", REC_REGISTERS: "registers", REC_CONSOLE: "console", REC_META: "metadata"}

_HEADER = struct.Struct("<8sHHHHIIIIQ16sII")  # 64 bytes, CRC32 last
_REC = struct.Struct("<HHIQII")  # 24 bytes
_TRAILER = struct.Struct("<8sQ32s")  # 48 bytes
assert _HEADER.size == 64 and _REC.size == 24 and _TRAILER.size == 48


# =============================================================================== errors
class CheckpointError(ValueError):
    """Base of the errors a user of checkpoints can cause."""


class NotACheckpointSet(CheckpointError):
    """A directory that is not an sppkit checkpoint set."""


class UnknownCheckpoint(CheckpointError, LookupError):
    """A checkpoint index the set does not have."""


class GuestMismatch(CheckpointError):
    """The set's guest copy does not match what the manifest recorded."""


class CheckpointFileError(CheckpointError):
    """A checkpoint (or manifest) file that cannot be used; ``path`` names it."""

    def __init__(self, path: os.PathLike | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}; nothing was restored from it")


class CheckpointCorrupted(CheckpointFileError):
    """A checksum mismatch, a bad magic number or an inconsistent field."""


class CheckpointTruncated(CheckpointFileError):
    """A file shorter than its header says (an interrupted copy, a full disk...)."""


class CheckpointMissing(CheckpointFileError):
    """A checkpoint file the manifest lists but the directory lacks."""


class CheckpointVersionMismatch(CheckpointFileError):
    """A file written in a format version this sppkit does not read."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed; no partial file was left behind."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]" prefix
        return self.strerror or super().__str__()


# =============================================================================== guests
def load_guest_spec(guest: str | os.PathLike):
    """``(image, elf_bytes, name)`` for a bundled program name, a ``.c`` file (built)
    or a guest ELF.  Raises ValueError for anything else."""
    from ..guests import build_guest, list_programs, load_elf

    spec = os.fspath(guest)
    p = Path(spec)
    if p.is_file():
        elf = build_guest(p) if p.suffix == ".c" else p
        return load_elf(elf), Path(elf).read_bytes(), p.name
    if spec in list_programs():
        elf = build_guest(spec)
        return load_elf(elf), elf.read_bytes(), spec
    raise ValueError(
        f"guest {spec!r} is neither a file (an ELF or a .c) nor a bundled program "
        f"({', '.join(list_programs())})"
    )


# =============================================================================== regions
@dataclass(frozen=True)
class Region:
    """A tracked range of guest-physical memory (whole pages)."""

    name: str
    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def to_dict(self) -> dict:
        return {"name": self.name, "gpa": self.gpa, "size": self.size}


def _check_track(extra: Iterable[tuple[int, int]], ram_size: int) -> list[tuple[int, int]]:
    """``extra`` as a list of ``(start, length)`` ranges, each inside guest RAM; ValueError
    naming the first bad one (the words of ``--track``)."""
    if isinstance(extra, (str, bytes)):
        raise ValueError(f"--track {extra!r}: give (start, length) pairs, e.g. [(0x100000, 0x2000)] "
                         "(policy.parse_range_arg reads START:LENGTH text)")
    try:
        items = list(extra)
    except TypeError:
        raise ValueError(f"--track {extra!r}: must be a list of (start, length) pairs") from None
    out = []
    for item in items:
        if isinstance(item, (str, bytes)) or not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"--track {item!r}: must be a (start, length) pair, e.g. (0x100000, 0x2000)")
        start, length = item
        if isinstance(start, bool) or isinstance(length, bool) or not isinstance(start, int) \
                or not isinstance(length, int) or start < 0 or length <= 0:
            raise ValueError(f"--track {start!r}:{length!r}: start must be an integer >= 0 and length > 0")
        hi = (start + length + PAGE - 1) & ~(PAGE - 1)
        if hi > ram_size:
            raise ValueError(
                f"--track {start:#x}:{length:#x} ends beyond guest RAM ({ram_size >> 20} MiB, "
                f"ends at {ram_size:#x})"
            )
        out.append((start, length))
    return out


def tracked_regions(image, ram_size: int, extra: Iterable[tuple[int, int]] = (), *,
                    table_range: tuple[int, int] | None = None) -> list[Region]:
    """The memory a checkpoint covers: the image's writable segments, the stack (the
    top 64 KiB of RAM) and ``extra`` ``(start, length)`` ranges, rounded out to pages,
    overlaps merged.  ``table_range``: the engine's page tables, which may not be tracked."""
    check_ram_size(ram_size)  # what the engines take: the stack is its top 64 KiB
    if table_range is not None and (
            not isinstance(table_range, (tuple, list)) or len(table_range) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in table_range)):
        raise ValueError(f"table_range {table_range!r}: must be a (start, end) pair of addresses, or None")
    ranges = _check_track(extra, ram_size)
    raw: list[tuple[str, int, int]] = []
    for seg in image.segments:
        if seg.writable:
            raw.append((f"data@{seg.gpa:#x}", seg.gpa & ~(PAGE - 1), (seg.gpa + seg.memsz + PAGE - 1) & ~(PAGE - 1)))
    raw.append(("stack", ram_size - STACK_BYTES, ram_size))
    for start, length in ranges:
        lo, hi = start & ~(PAGE - 1), (start + length + PAGE - 1) & ~(PAGE - 1)
        if table_range and lo < table_range[1] and table_range[0] < hi:
            raise ValueError(
                f"--track {start:#x}:{length:#x} overlaps the guest's page tables "
                f"[{table_range[0]:#x}, {table_range[1]:#x}): the CPU writes their accessed/dirty bits, "
                "which sub-page protection does not see"
            )
        raw.append((f"track@{start:#x}", lo, hi))
    raw.sort(key=lambda t: t[1])
    merged: list[list] = []
    for name, lo, hi in raw:
        if merged and lo <= merged[-1][2]:
            merged[-1][2] = max(merged[-1][2], hi)
            merged[-1][0] += "+" + name
        else:
            merged.append([name, lo, hi])
    for name, lo, hi in merged:
        if hi > ram_size:
            raise ValueError(f"tracked region {name} [{lo:#x}, {hi:#x}) lies beyond guest RAM ({ram_size >> 20} MiB)")
    return [Region(n, lo, hi - lo) for n, lo, hi in merged]


def read_in_pieces(read: Callable[[int, int], bytes], gpa: int, size: int) -> Iterator[tuple[int, bytes]]:
    """``(gpa, bytes)`` pieces of ``[gpa, gpa+size)``, each at most MAX_READ bytes (the
    most one read returns): a tracked region or dirty run may be larger."""
    for g in range(gpa, gpa + size, MAX_READ):
        yield g, read(g, min(MAX_READ, gpa + size - g))


def memory_digest(read: Callable[[int, int], bytes], regions: Iterable[Region]) -> str:
    """SHA-256 of the tracked memory: each region's gpa and size, then its bytes."""
    h = hashlib.sha256()
    for r in sorted(regions, key=lambda r: r.gpa):
        h.update(struct.pack("<QQ", r.gpa, r.size))
        for _, data in read_in_pieces(read, r.gpa, r.size):
            h.update(data)
    return h.hexdigest()


# =============================================================================== tracking
class DirtyTracker:
    """Sub-page dirty tracking through SPP: arm() write-protects every tracked sub-page;
    the violation handler records the first write to each and unprotects it.

    ``regions``: whole pages of guest RAM (writable memslots).  A violation on a page
    the tracker does not track is someone else's protection: it is neither recorded
    nor unprotected, and the write is discarded (``SKIP``, as the Vm does without a
    handler)."""

    def __init__(self, vm, regions: list[Region], *, on_dirty: Callable[[int], None] | None = None) -> None:
        if on_dirty is not None and not callable(on_dirty):
            raise TypeError(f"on_dirty={on_dirty!r}: must be a callable (violations since arm) -> None, or None")
        try:
            regions = list(regions)
        except TypeError:
            raise ValueError(f"regions {regions!r}: must be a list of Region") from None
        for r in regions:
            if not isinstance(r, Region):
                raise ValueError(f"region {r!r}: must be a Region(name, gpa, size)")
            if isinstance(r.gpa, bool) or isinstance(r.size, bool) or not isinstance(r.gpa, int) \
                    or not isinstance(r.size, int) or r.gpa < 0 or r.size <= 0 or r.gpa % PAGE or r.size % PAGE:
                raise ValueError(f"region {r.name!r} gpa={r.gpa!r} size={r.size!r}: must be whole 4-KiB pages "
                                 "(gpa page-aligned, size a positive multiple of 4096)")
            problem = writable_ram_problem(vm, r.gpa, r.end)
            if problem is not None:
                raise ValueError(f"region {r.name!r} [{r.gpa:#x}, {r.end:#x}) {problem}")
        self.vm = vm
        self.regions = regions
        self.gfns = sorted({g for r in regions for g in range(r.gpa >> 12, r.end >> 12)})
        self._tracked = frozenset(self.gfns)
        self.dirty: dict[int, int] = {}  # gfn -> 32-bit mask of dirty sub-pages
        self.violations = 0  #: since the last arm()
        self.total_violations = 0
        self.on_dirty = on_dirty

    def arm(self, gfns: Iterable[int] | None = None) -> None:
        """Write-protect every sub-page of ``gfns`` (default: all tracked pages; each
        must be tracked) and forget the dirty set.  All or nothing: every page is
        checked before any is protected."""
        if gfns is None:
            todo = list(self.gfns)
        else:
            try:
                todo = sorted(set(gfns))
            except TypeError:
                raise ValueError(f"gfns {gfns!r}: must be page frame numbers of tracked pages") from None
            bad = next((g for g in todo if isinstance(g, bool) or not isinstance(g, int) or g not in self._tracked),
                       None)
            if bad is not None:
                raise ValueError(f"gfn {bad!r}: not a page this tracker tracks ("
                                 + ", ".join(f"[{r.gpa >> 12:#x}, {r.end >> 12:#x})" for r in self.regions)
                                 + ")")
        batches = []
        i = 0
        while i < len(todo):  # contiguous batches of at most 512 pages
            j = i
            while j + 1 < len(todo) and todo[j + 1] == todo[j] + 1 and j + 1 - i < 512:
                j += 1
            batches.append((todo[i], j - i + 1))
            i = j + 1
        for gfn, n in batches:  # raises (SPP off, a memslot gone) before any page changes
            self.vm.get_subpage_access(gfn, n)
        for gfn, n in batches:
            self.vm.set_subpage_access(gfn, [0] * n)
        self.dirty = {}
        self.violations = 0

    def rearm(self) -> None:
        """Re-protect only the pages dirtied since the last arm (the others still are)."""
        self.arm(self.dirty.keys())

    def handle(self, ev: SppViolation) -> Decision:
        if ev.gfn not in self._tracked:
            return Decision.SKIP  # someone else's protection: not ours to record or lift
        bits = 0
        for s in ev.subpages:
            bits |= 1 << s
        if self.on_dirty is not None:  # first: a callback that raises leaves the tracker as it was
            self.on_dirty(self.violations + 1)
        self.dirty[ev.gfn] = self.dirty.get(ev.gfn, 0) | bits
        self.violations += 1
        self.total_violations += 1
        return Decision.UNPROTECT

    def dirty_runs(self) -> list[tuple[int, int]]:
        """The dirty sub-pages as ``(gpa, length)`` runs, coalesced, in address order."""
        runs: list[list[int]] = []
        for gfn in sorted(self.dirty):
            mask = self.dirty[gfn]
            for s in range(32):
                if mask >> s & 1:
                    gpa = (gfn << 12) + s * GRANULE
                    if runs and runs[-1][0] + runs[-1][1] == gpa:
                        runs[-1][1] += GRANULE
                    else:
                        runs.append([gpa, GRANULE])
        return [(g, n) for g, n in runs]

    @property
    def dirty_subpages(self) -> int:
        return sum(bin(m).count("1") for m in self.dirty.values())

    @property
    def dirty_pages(self) -> int:
        return len(self.dirty)


# =============================================================================== file format
def _pack_regs(regs: dict[str, int]) -> bytes:
    out = bytearray(struct.pack("<II", len(regs), 0))
    for name in sorted(regs):
        nb = name.encode("ascii")
        if len(nb) > 8:
            raise ValueError(f"register name {name!r}: at most 8 characters")
        out += nb.ljust(8, b"\0") + struct.pack("<Q", regs[name] & 0xFFFF_FFFF_FFFF_FFFF)
    return bytes(out)


def _unpack_regs(data: bytes, path: Path) -> dict[str, int]:
    if len(data) < 8:
        raise CheckpointCorrupted(path, "register record shorter than its 8-byte count")
    (n, _) = struct.unpack_from("<II", data)
    if len(data) != 8 + 16 * n:
        raise CheckpointCorrupted(path, f"register record of {len(data)} bytes does not hold {n} registers")
    regs = {}
    for i in range(n):
        name = data[8 + 16 * i : 16 + 16 * i].rstrip(b"\0").decode("ascii", "replace")
        regs[name] = struct.unpack_from("<Q", data, 16 + 16 * i)[0]
    return regs


def encode_checkpoint(*, index: int, kind: int, set_id: bytes, memory: list[tuple[int, bytes]],
                      regs: dict[str, int], console: bytes = b"", meta: dict | None = None,
                      version: int = FORMAT_VERSION) -> bytes:
    """The bytes of one checkpoint file (``version`` other than 1 only for tests).

    ``index``: 0 for the base (``kind`` 0), from 1 for an incremental checkpoint (kind
    1); ``set_id``: 16 bytes; ``memory``: ``(gpa, bytes)`` records of whole 128-byte
    sub-pages; ``regs``: register name (at most 8 ASCII characters) -> unsigned 64-bit
    value; ``console``: bytes; ``meta``: a JSON object.  A bad field is a
    :class:`CheckpointError` naming it, raised before anything is encoded.  (Register
    names are not checked against the engines': :func:`read_checkpoint_file` refuses
    unknown ones, and tests write such files to check that it does.)"""
    recs = _checked_records(index, kind, set_id, memory, regs, console, meta, version)
    payload = sum(len(d) for _, _, d in recs)
    parent = NO_PARENT if kind == KIND_BASE else index - 1
    head = _HEADER.pack(MAGIC, version, _HEADER.size, kind, 7, index, parent, len(recs), 0, payload,
                        set_id, 0, 0)[:-4]
    out = bytearray(head + struct.pack("<I", zlib.crc32(head)))
    for typ, gpa, data in recs:
        rh = struct.pack("<HHIQ", typ, 0, len(data), gpa)
        out += rh + struct.pack("<II", zlib.crc32(data, zlib.crc32(rh)), 0) + data
    total = len(out) + _TRAILER.size
    tail = TRAILER_MAGIC + struct.pack("<Q", total)
    out += tail
    out += hashlib.sha256(bytes(out)).digest()
    return bytes(out)


def _checked_records(index, kind, set_id, memory, regs, console, meta, version) -> list[tuple[int, int, bytes]]:
    """The records of :func:`encode_checkpoint`, every field checked first."""

    def bad(field: str, value, valid: str) -> NoReturn:
        text = repr(value)
        raise CheckpointError(f"checkpoint {field} {text if len(text) <= 60 else text[:57] + '...'}: {valid}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def as_bytes(field: str, v) -> bytes:
        if isinstance(v, str) or v is None:
            bad(field, v, "must be bytes")
        try:
            return bytes(memoryview(v))
        except TypeError:
            bad(field, v, "must be bytes")

    if not is_int(version) or not 0 <= version <= 0xFFFF:
        bad("version", version, "must be an integer from 0 to 65535")
    if not is_int(kind) or kind not in (KIND_BASE, KIND_INCREMENTAL):
        bad("kind", kind, f"must be {KIND_BASE} (base) or {KIND_INCREMENTAL} (incremental)")
    if not is_int(index) or not 0 <= index < NO_PARENT:
        bad("index", index, f"must be an integer from 0 to {NO_PARENT - 1}")
    if (index == 0) != (kind == KIND_BASE):
        bad("index", index, "the base checkpoint (kind 0) is index 0, an incremental one (kind 1) index 1 or more")
    sid = as_bytes("set_id", set_id)
    if len(sid) != 16:
        bad("set_id", set_id, f"must be 16 bytes, not {len(sid)}")
    if isinstance(memory, (str, bytes, dict)):
        bad("memory", memory, "must be a list of (gpa, bytes) records")
    try:
        mem = list(memory)
    except TypeError:
        bad("memory", memory, "must be a list of (gpa, bytes) records")
    recs: list[tuple[int, int, bytes]] = []
    for i, rec in enumerate(mem):
        if not isinstance(rec, (tuple, list)) or len(rec) != 2:
            bad(f"memory[{i}]", rec, "must be a (gpa, bytes) pair")
        gpa, data = rec[0], as_bytes(f"memory[{i}] data", rec[1])
        if not is_int(gpa) or gpa < 0 or gpa % GRANULE:
            bad(f"memory[{i}] gpa", gpa, f"must be a non-negative multiple of {GRANULE}")
        if not data or len(data) % GRANULE or len(data) > 0xFFFFFFFF or gpa + len(data) > 1 << 64:
            bad(f"memory[{i}] data of {len(data)} bytes at", gpa,
                f"must be whole {GRANULE}-byte sub-pages (at most 4 GiB), ending at or below 2**64")
        recs.append((REC_MEMORY, gpa, data))
    if not isinstance(regs, dict):
        bad("regs", regs, "must be a dict of register name -> value")
    for name, v in regs.items():
        if not isinstance(name, str) or not name.isascii() or not 0 < len(name) <= 8:
            bad("register name", name, "must be 1 to 8 ASCII characters")
        if not is_int(v) or not 0 <= v < 1 << 64:
            bad(f"register {name}", v, "must be an integer from 0 to 2**64 - 1")
    recs.append((REC_REGISTERS, 0, _pack_regs(regs)))
    text = as_bytes("console", console)
    if text:
        recs.append((REC_CONSOLE, 0, text))
    if meta is not None:
        if not isinstance(meta, dict):
            bad("meta", meta, "must be a dict (a JSON object) or None")
        try:
            recs.append((REC_META, 0, json.dumps(meta, sort_keys=True).encode()))
        except (TypeError, ValueError) as e:
            bad("meta", meta, f"must be JSON-serialisable ({e})")
    for _, _, data in recs:
        if len(data) > 0xFFFFFFFF:
            bad("record of", len(data), "bytes: a record holds at most 4 GiB")
    return recs


@dataclass
class CheckpointFile:
    """A verified checkpoint file."""

    path: Path
    index: int
    kind: int
    parent: int
    set_id: bytes
    memory: list[tuple[int, bytes]]
    regs: dict[str, int]
    console: bytes
    meta: dict


def read_checkpoint_file(path: os.PathLike | str, data: bytes | None = None) -> CheckpointFile:
    """Read and verify one checkpoint file: magic, version, header CRC, length, each
    record's CRC, the trailer and the whole-file SHA-256."""
    path = Path(path)
    if data is None:
        try:
            data = read_regular(path)
        except FileNotFoundError:
            raise CheckpointMissing(path, "file is missing") from None
        except OSError as e:
            raise CheckpointFileError(path, f"cannot be read: {e.strerror or e}") from None
    n = len(data)
    if data[: min(n, 8)] != MAGIC[: min(n, 8)]:
        raise CheckpointCorrupted(path, f"bad magic {data[:8]!r}: not an sppkit checkpoint file (expected {MAGIC!r})")
    if n < _HEADER.size:
        raise CheckpointTruncated(path, f"file is {n} bytes, shorter than the {_HEADER.size}-byte header")
    (_magic, version, hsize, kind, glog, index, parent, nrec, _r0, payload, set_id, _r1,
     hcrc) = _HEADER.unpack_from(data)
    header_ok = zlib.crc32(data[: _HEADER.size - 4]) == hcrc
    if version != FORMAT_VERSION:
        raise CheckpointVersionMismatch(
            path, f"format version {version}; this sppkit reads version {FORMAT_VERSION}"
            + ("" if header_ok else " (its header checksum does not match either: the file may be corrupted)")
        )
    if not header_ok:
        raise CheckpointCorrupted(path, "header checksum (CRC32) mismatch")
    if hsize != _HEADER.size or glog != 7 or kind not in (KIND_BASE, KIND_INCREMENTAL):
        raise CheckpointCorrupted(path, f"header fields out of range (size {hsize}, granule 2^{glog}, kind {kind})")
    expected = _HEADER.size + nrec * _REC.size + payload + _TRAILER.size
    if n < expected:
        raise CheckpointTruncated(path, f"file is {n} bytes, its header says {expected}")
    if n > expected:
        raise CheckpointCorrupted(path, f"file is {n} bytes, its header says {expected} (trailing garbage)")
    pos = _HEADER.size
    memory, regs, console, meta = [], None, b"", {}
    for i in range(nrec):
        typ, _z, length, gpa, crc, _z2 = _REC.unpack_from(data, pos)
        body = data[pos + _REC.size : pos + _REC.size + length]
        what = f"record {i} ({_REC_NAMES.get(typ, f'type {typ}')}" + (
            f" at gpa {gpa:#x})" if typ == REC_MEMORY else ")")
        if pos + _REC.size + length > n - _TRAILER.size:
            raise CheckpointCorrupted(path, f"{what} runs past the end of the records")
        if zlib.crc32(body, zlib.crc32(data[pos : pos + 16])) != crc:
            raise CheckpointCorrupted(path, f"{what}: checksum (CRC32) mismatch")
        if typ == REC_MEMORY:
            if gpa % GRANULE or length % GRANULE or not length:
                raise CheckpointCorrupted(path, f"{what}: not whole 128-byte sub-pages ({length} bytes)")
            memory.append((gpa, body))
        elif typ == REC_REGISTERS:
            regs = _unpack_regs(body, path)
        elif typ == REC_CONSOLE:
            console += body
        elif typ == REC_META:
            try:
                meta = json.loads(body)
            except ValueError:
                raise CheckpointCorrupted(path, f"{what}: not JSON") from None
            except RecursionError:
                raise CheckpointCorrupted(path, f"{what}: JSON nested too deeply") from None
        else:
            raise CheckpointCorrupted(path, f"{what}: unknown record type")
        pos += _REC.size + length
    tmagic, tlen, digest = _TRAILER.unpack_from(data, pos)
    if tmagic != TRAILER_MAGIC or tlen != n:
        raise CheckpointCorrupted(path, "trailer missing or damaged")
    if hashlib.sha256(data[:-32]).digest() != digest:
        raise CheckpointCorrupted(path, "whole-file checksum (SHA-256) mismatch")
    if regs is None:
        raise CheckpointCorrupted(path, "no register record")
    unknown = sorted(set(regs) - set(REGISTERS))
    if unknown:
        raise CheckpointCorrupted(path, f"register record holds unknown register(s) {', '.join(map(repr, unknown))} "
                                        f"(known: {', '.join(REGISTERS)})")
    if "rip" not in regs:
        raise CheckpointCorrupted(path, "register record lacks rip")
    return CheckpointFile(path, index, kind, parent, set_id, memory, regs, console, meta)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: os.PathLike | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file in the same directory,
    fsync, rename over ``path``, fsync of the directory.  On any failure the
    temporary file is removed and :class:`CheckpointWriteError` names ``path``."""
    path = Path(path)
    d = path.parent
    tmp = f = None
    try:
        with signals_held():  # (a Ctrl-C or SIGTERM lands once the temporary file is known)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=d)
            f = os.fdopen(fd, "wb")
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if f is not None:
            f.close()
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(e, OSError):
            raise CheckpointWriteError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
        raise
    _fsync_dir(d)


def write_checkpoint_file(path: os.PathLike | str, **fields) -> int:
    """Encode (see :func:`encode_checkpoint`) and write atomically; returns the size."""
    data = encode_checkpoint(**fields)
    atomic_write(path, data)
    return len(data)


def _ckpt_name(index: int) -> str:
    return f"ckpt-{index:06d}.spck"


_CKPT_FILE = re.compile(r"ckpt-(\d{6,})\.spck")


def _unlisted_files(directory: Path, listed: int) -> tuple[str, ...]:
    """Names of the checkpoint files in ``directory`` numbered ``listed`` or more."""
    try:
        names = os.listdir(directory)
    except OSError:
        return ()
    found = [(int(m[1]), n) for n in names if (m := _CKPT_FILE.fullmatch(n)) and int(m[1]) >= listed]
    return tuple(n for _, n in sorted(found))


def _unlisted_note(names: tuple[str, ...], listed_in: str) -> str:
    shown = names[0] if len(names) == 1 else f"{names[0]} … {names[-1]}"
    why = ("the checkpointing run may have stopped between writing it and listing it" if len(names) == 1
           else f"{listed_in} may have been cut short")
    return (f"[yellow]note: {len(names)} checkpoint file(s) beyond the last one {listed_in} lists ({shown}): "
            f"{why}; they are not part of the set[/]")


def _canonical_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _manifest_canonical(body: dict) -> str:
    """The manifest's canonical JSON without its ``sha256`` field."""
    return _canonical_json({k: v for k, v in body.items() if k != "sha256"})


def _manifest_digest(body: dict) -> str:
    """SHA-256 of the manifest's canonical JSON without its ``sha256`` field."""
    return hashlib.sha256(_manifest_canonical(body).encode()).hexdigest()


def _display_json(value) -> str:
    return json.dumps(value, sort_keys=True)


def _manifest_bytes(body: dict) -> bytes:
    """The manifest file: one top-level key per line (a version 1 manifest: one
    checkpoint per line), its ``sha256`` field the digest of the rest."""
    full = dict(body, sha256=_manifest_digest(body))
    lines = []
    for key in sorted(full):
        value = full[key]
        if key == "checkpoints" and isinstance(value, list) and value:
            encoded = "[\n  " + ",\n  ".join(_display_json(e) for e in value) + "\n ]"
        else:
            encoded = _display_json(value)
        lines.append(f" {_display_json(key)}: {encoded}")
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode()


def _chain(prev: str, record: dict) -> str:
    """A journal line's ``chain``: SHA-256 of the previous line's (or the manifest's
    SHA-256) followed by the line's canonical JSON without ``chain``."""
    return hashlib.sha256((prev + _canonical_json(record)).encode()).hexdigest()


def _journal_line(prev: str, record: dict) -> tuple[str, bytes]:
    """``(chain, line)``: ``record`` ({"checkpoint": entry} or {"final": ...}) as the
    journal line that follows the one whose chain is ``prev``."""
    chain = _chain(prev, record)
    return chain, (_canonical_json(dict(record, chain=chain)) + "\n").encode()


def _append(path: Path, line: bytes) -> None:
    """Append ``line`` to the journal and fsync it.  On failure the journal is cut back
    to what it was (so no torn line is left before a later one) and
    :class:`CheckpointWriteError` names it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise CheckpointWriteError(e.errno, f"cannot append to {path}: {e.strerror or e}") from e
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass  # the torn line is the last one: readers leave it out
            if isinstance(e, OSError):
                raise CheckpointWriteError(e.errno, f"cannot append to {path}: {e.strerror or e}") from e
            raise
    finally:
        os.close(fd)


# =============================================================================== the set
@dataclass
class RestoredState:
    """Guest state rebuilt from checkpoints 0..index (verified)."""

    index: int
    regions: list[Region]
    memory: dict[int, bytearray]  # region gpa -> its bytes
    regs: dict[str, int]
    console: bytes
    recorded_sha256: str | None  # the digest taken when the checkpoint was written

    def read(self, gpa: int, n: int) -> bytes:
        """``n`` bytes of the rebuilt memory at ``gpa`` (inside one tracked region)."""
        for what, v in (("gpa", gpa), ("n", n)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{what}={v!r}: must be a non-negative integer")
        for r in self.regions:
            if r.gpa <= gpa and gpa + n <= r.end:
                return bytes(self.memory[r.gpa][gpa - r.gpa : gpa - r.gpa + n])
        raise ValueError(f"[{gpa:#x}, {gpa + n:#x}) is not inside one tracked region")

    @property
    def sha256(self) -> str:
        return memory_digest(self.read, self.regions)


class CheckpointSet:
    """A checkpoint directory: its manifest (verified) and access to its checkpoints."""

    def __init__(self, directory: Path, manifest: dict, *, listed_in: str = MANIFEST,
                 torn_line: int | None = None) -> None:
        self.dir = directory
        #: the manifest's body; for a version 2 set, with the journal's checkpoint
        #: entries as ``checkpoints`` and its end record as ``final``, as version 1 had them
        self.manifest = manifest
        #: the file that lists the checkpoints: checkpoints.jsonl, or manifest.json (version 1)
        self.listed_in = listed_in
        #: the number of the journal's last line when it lacks its newline (a run stopped
        #: while appending it): that line is not part of the set; else None
        self.torn_line = torn_line
        self.set_id = bytes.fromhex(manifest["set_id"])
        self.regions = [Region(r["name"], int(r["gpa"]), int(r["size"])) for r in manifest["regions"]]
        self.entries = manifest["checkpoints"]
        #: checkpoint files in the directory beyond the last one the index lists (a run
        #: stopped between writing a file and listing it leaves one; more mean the index
        #: was cut): not part of the set, named so that a cut index does not go unseen
        self.unlisted = _unlisted_files(directory, len(self.entries))

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def indices(self) -> list[int]:
        return [e["index"] for e in self.entries]

    def _check_index(self, k) -> int:
        if isinstance(k, bool) or not isinstance(k, int):
            raise UnknownCheckpoint(f"checkpoint index {k!r}: must be an integer")
        if not self.entries:
            raise UnknownCheckpoint(f"{self.dir} holds no checkpoints yet")
        if not 0 <= k < len(self.entries):
            raise UnknownCheckpoint(
                f"{self.dir} has no checkpoint {k}: it holds checkpoints 0..{len(self.entries) - 1}"
            )
        return k

    def read(self, k: int) -> CheckpointFile:
        """Read and verify checkpoint ``k`` alone (checksums, place in this set)."""
        k = self._check_index(k)
        e = self.entries[k]
        path = self.dir / e["file"]
        try:
            data = read_regular(path)
        except FileNotFoundError:
            raise CheckpointMissing(path, f"checkpoint {k} is listed in {self.listed_in} but the file is "
                                          "missing") from None
        except OSError as err:
            raise CheckpointFileError(path, f"checkpoint {k} cannot be read: {err.strerror or err}") from None
        f = read_checkpoint_file(path, data)
        if f.set_id != self.set_id:
            raise CheckpointCorrupted(path, f"belongs to another checkpoint set (its set id {f.set_id.hex()}, "
                                            f"{MANIFEST}'s {self.set_id.hex()}): it or {MANIFEST} was copied "
                                            "from another run")
        if f.index != k or (k == 0) != (f.kind == KIND_BASE) or f.parent != (NO_PARENT if k == 0 else k - 1):
            raise CheckpointCorrupted(path, f"holds checkpoint {f.index} (kind {f.kind}), expected {k}")
        if hashlib.sha256(data).hexdigest() != e.get("sha256"):
            raise CheckpointCorrupted(path, f"SHA-256 differs from the one {self.listed_in} recorded")
        return f

    def load(self, k: int) -> RestoredState:
        """Verify checkpoints 0..k, then rebuild the tracked memory, registers and console."""
        k = self._check_index(k)
        files = [self.read(i) for i in range(k + 1)]  # everything verified before use
        memory: dict[int, bytearray | None] = {r.gpa: None for r in self.regions}
        base = files[0]
        for gpa, data in base.memory:
            r = next((r for r in self.regions if r.gpa == gpa and r.size == len(data)), None)
            if r is None:
                raise CheckpointCorrupted(base.path, f"base record at {gpa:#x}+{len(data):#x} is not a tracked region")
            memory[gpa] = bytearray(data)
        missing = [r.name for r in self.regions if memory[r.gpa] is None]
        if missing:
            raise CheckpointCorrupted(base.path, f"base checkpoint lacks region(s) {', '.join(missing)}")
        restored: dict[int, bytearray] = {}
        for gpa, buf in memory.items():
            assert buf is not None  # `missing` is empty: the base held every tracked region
            restored[gpa] = buf
        for f in files[1:]:
            for gpa, data in f.memory:
                r = next((r for r in self.regions if r.gpa <= gpa and gpa + len(data) <= r.end), None)
                if r is None:
                    raise CheckpointCorrupted(
                        f.path, f"record at {gpa:#x}+{len(data):#x} lies outside the tracked regions")
                restored[r.gpa][gpa - r.gpa : gpa - r.gpa + len(data)] = data
        console = b"".join(f.console for f in files)
        return RestoredState(k, self.regions, restored, dict(files[-1].regs), console,
                             self.entries[k].get("memory_sha256"))

    def check_guest(self) -> Path:
        """Verify the set's guest copy against the manifest (its SHA-256); its path, or
        :class:`GuestMismatch` naming it and the problem."""
        g = self.manifest["guest"]
        path = self.dir / g["elf"]
        try:
            data = read_regular(path)
        except FileNotFoundError:
            raise GuestMismatch(f"{path}: the set's copy of the guest is missing") from None
        except OSError as e:
            raise GuestMismatch(f"{path}: the set's copy of the guest cannot be read: {e.strerror or e}") from None
        if hashlib.sha256(data).hexdigest() != g["sha256"]:
            raise GuestMismatch(f"{path}: the guest copy differs from the one the checkpoints were taken of "
                                f"(SHA-256 mismatch)")
        return path

    def guest_image(self):
        """The guest copy stored in the set, verified against the manifest."""
        from ..guests import load_elf

        return load_elf(self.check_guest())


_MISSING = object()
_HEX = re.compile(r"[0-9a-f]+")


def _field_error(path: Path, field: str, value, problem: str, where: str = "") -> NoReturn:
    if value is _MISSING:
        raise CheckpointCorrupted(path, f"{where}field {field} is missing")
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    raise CheckpointCorrupted(path, f"{where}field {field} = {text}: {problem}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_hex(v, digits: int) -> bool:
    return isinstance(v, str) and len(v) == digits and _HEX.fullmatch(v) is not None


def _is_name(v) -> bool:  # a file directly inside the set directory
    return isinstance(v, str) and v not in ("", ".", "..") and "\0" not in v and os.path.basename(v) == v


def _check_manifest(mpath: Path, body: dict) -> None:
    """Check every manifest field restoring uses (the checkpoint list aside: see
    :func:`_check_entries`).  Its SHA-256 only shows the body is the one written: a hand
    edit with the digest recomputed, or a buggy writer, gets here."""

    def fail(field: str, value, problem: str) -> NoReturn:
        _field_error(mpath, field, value, problem)

    v = body.get("set_id", _MISSING)
    if not _is_hex(v, 32):
        fail("set_id", v, "must be 32 lowercase hex digits")
    guest = body.get("guest", _MISSING)
    if not isinstance(guest, dict):
        fail("guest", guest, "must be an object with elf and sha256")
    v = guest.get("elf", _MISSING)
    if not _is_name(v):
        fail("guest.elf", v, "must be the name of a file in the set directory")
    v = guest.get("sha256", _MISSING)
    if not _is_hex(v, 64):
        fail("guest.sha256", v, "must be 64 lowercase hex digits")
    ram = body.get("ram_size", _MISSING)
    try:
        check_ram_size(ram)  # what the engines take
    except ValueError:
        fail("ram_size", ram, f"must be a multiple of 2 MiB from 2 MiB to {MAX_RAM >> 30} GiB")
    v = body.get("cpl", _MISSING)
    if not _is_int(v) or v not in (0, 3):
        fail("cpl", v, "must be 0 or 3")
    regions = body.get("regions", _MISSING)
    if not isinstance(regions, list):
        fail("regions", regions, "must be a list")
    end = 0
    for i, r in enumerate(regions):
        if not isinstance(r, dict):
            fail(f"regions[{i}]", r, "must be an object with name, gpa and size")
        v = r.get("name", _MISSING)
        if not isinstance(v, str):
            fail(f"regions[{i}].name", v, "must be a string")
        gpa, size = r.get("gpa", _MISSING), r.get("size", _MISSING)
        if not _is_int(gpa) or gpa % PAGE or not end <= gpa < ram:
            fail(f"regions[{i}].gpa", gpa, f"must be page-aligned, from {end:#x}"
                 + (f" (the end of regions[{i - 1}])" if i else "") + f" to below ram_size ({ram:#x})")
        if not _is_int(size) or size <= 0 or size % PAGE or gpa + size > ram:
            fail(f"regions[{i}].size", size, f"must be a positive number of pages ending within ram_size ({ram:#x})")
        end = gpa + size


def _check_entries(path: Path, entries, final, *, lines: bool) -> None:
    """Check the checkpoint list and the run's end record, as listed in ``path`` (the
    manifest, or with ``lines`` the journal, whose line numbers the errors give)."""

    def fail(i: int | None, field: str, value, problem: str) -> NoReturn:
        where = f"line {i + 1}: " if lines and i is not None else ""
        _field_error(path, field, value, problem, where)

    if not isinstance(entries, list):
        fail(None, "checkpoints", entries, "must be a list")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            fail(i, f"checkpoints[{i}]", e, "must be an object with index, file and sha256")
        v = e.get("index", _MISSING)
        if not _is_int(v) or v != i:
            fail(i, f"checkpoints[{i}].index", v, f"must be {i}, its place in the list")
        v = e.get("file", _MISSING)
        if not _is_name(v):
            fail(i, f"checkpoints[{i}].file", v, "must be the name of a file in the set directory")
        v = e.get("sha256", _MISSING)
        if not _is_hex(v, 64):
            fail(i, f"checkpoints[{i}].sha256", v, "must be 64 lowercase hex digits")
        v = e.get("memory_sha256")
        if v is not None and not _is_hex(v, 64):
            fail(i, f"checkpoints[{i}].memory_sha256", v, "must be 64 lowercase hex digits")
        for key in ("bytes", "dirty_subpages", "dirty_pages", "spp_exits"):  # (informational, but listed)
            v = e.get(key, _MISSING)
            if v is not _MISSING and (not _is_int(v) or v < 0):
                fail(i, f"checkpoints[{i}].{key}", v, "must be a non-negative integer")
        v = e.get("reason", _MISSING)
        if v is not _MISSING and not isinstance(v, str):
            fail(i, f"checkpoints[{i}].reason", v, "must be a string")
    if final is _MISSING:
        return
    at = len(entries) if isinstance(entries, list) else None
    if not isinstance(final, dict):
        fail(at, "final", final, "must be an object")
    v = final.get("exit_code")
    if v is not None and (not _is_int(v) or not 0 <= v < 1 << 32):
        fail(at, "final.exit_code", v, "must be an integer from 0 to 2**32 - 1, or null")
    v = final.get("stop_reason", _MISSING)
    if v is not _MISSING and not isinstance(v, str):
        fail(at, "final.stop_reason", v, "must be a string")
    v = final.get("console_sha256")
    if v is not None and not _is_hex(v, 64):
        fail(at, "final.console_sha256", v, "must be 64 lowercase hex digits")


def _read_journal(jpath: Path, root: str) -> tuple[list, object, int | None]:
    """``(entries, final, torn_line)`` from a version 2 set's journal, every line's chain
    checked from ``root`` (the manifest's SHA-256); ``final`` is ``_MISSING`` when the
    journal has no end record."""
    try:
        raw = read_regular(jpath)
    except IsADirectoryError:
        raise CheckpointCorrupted(jpath, "is a directory, not the set's list of checkpoints") from None
    except FileNotFoundError:
        raise CheckpointMissing(jpath, f"the set's list of checkpoints is missing ({MANIFEST} is there)") from None
    except OSError as e:
        raise CheckpointFileError(jpath, f"cannot be read: {e.strerror or e}") from None
    pieces = raw.split(b"\n")
    tail = pieces.pop()  # b"" when the journal ends with a newline
    torn = len(pieces) + 1 if tail else None
    entries: list = []
    final: object = _MISSING
    prev = root
    for n, piece in enumerate(pieces, 1):
        if final is not _MISSING:
            raise CheckpointCorrupted(jpath, f"line {n}: a line after the run's final record (line {n - 1})")
        try:
            rec = json.loads(piece.decode("utf-8"))
        except UnicodeDecodeError:
            raise CheckpointCorrupted(jpath, f"line {n}: not UTF-8") from None
        except ValueError:
            raise CheckpointCorrupted(jpath, f"line {n}: not valid JSON") from None
        except RecursionError:
            raise CheckpointCorrupted(jpath, f"line {n}: JSON nested too deeply") from None
        if not isinstance(rec, dict) or set(rec) not in ({"checkpoint", "chain"}, {"final", "chain"}):
            raise CheckpointCorrupted(jpath, f'line {n}: must be {{"checkpoint": ..., "chain": ...}} or '
                                             f'{{"final": ..., "chain": ...}}')
        chain = rec.pop("chain")
        try:
            expected = _chain(prev, rec)
        except RecursionError:
            raise CheckpointCorrupted(jpath, f"line {n}: JSON nested too deeply") from None
        if chain != expected:
            raise CheckpointCorrupted(
                jpath, f"line {n}: chain checksum (SHA-256) mismatch: the line, or one before it, was edited, "
                       f"removed or reordered, or it and {MANIFEST} come from different runs")
        prev = chain
        if "final" in rec:
            final = rec["final"]
        else:
            entries.append(rec["checkpoint"])
    return entries, final, torn


def open_checkpoint_set(directory: os.PathLike | str) -> CheckpointSet:
    """Open and verify a checkpoint directory's manifest."""
    if not str(os.fspath(directory)).strip():
        raise NotACheckpointSet("DIRECTORY '': an empty path; give a checkpoint directory (`sppkit checkpoint "
                                "--out DIRECTORY` writes one)")
    d = Path(directory)
    if not d.exists():
        raise NotACheckpointSet(f"{d}: no such directory")
    if not d.is_dir():
        raise NotACheckpointSet(f"{d} is not a directory, so not a checkpoint set")
    mpath = d / MANIFEST
    if not mpath.exists() and not mpath.is_symlink():
        raise NotACheckpointSet(f"{d} is not an sppkit checkpoint set: it has no {MANIFEST}")
    if mpath.is_dir():
        raise CheckpointCorrupted(mpath, "is a directory, not the set's manifest file")
    try:
        raw = read_regular(mpath)
    except OSError as e:
        raise CheckpointFileError(mpath, f"cannot be read: {e.strerror or e}") from None
    try:
        body = json.loads(raw)
    except ValueError:
        raise CheckpointCorrupted(mpath, "not valid JSON") from None
    except RecursionError:
        raise CheckpointCorrupted(mpath, "JSON nested too deeply") from None
    if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT:
        raise NotACheckpointSet(f"{d} is not an sppkit checkpoint set: {MANIFEST} is not a {MANIFEST_FORMAT} manifest")
    version = body.get("version")
    if isinstance(version, bool) or version not in SET_VERSIONS_READ:
        raise CheckpointVersionMismatch(
            mpath, f"format version {version!r}; this sppkit reads versions "
                   f"{', '.join(map(str, SET_VERSIONS_READ))}")
    try:
        digest = _manifest_digest(body)
    except RecursionError:
        raise CheckpointCorrupted(mpath, "JSON nested too deeply") from None
    if body.get("sha256") != digest:
        raise CheckpointCorrupted(mpath, "manifest checksum (SHA-256) mismatch")
    _check_manifest(mpath, body)
    torn = None
    if version == 1:
        listed_in = mpath
        _check_entries(mpath, body.get("checkpoints", _MISSING), body.get("final", _MISSING), lines=False)
    else:
        for key in ("checkpoints", "final"):
            if key in body:
                raise CheckpointCorrupted(mpath, f"field {key}: a version 2 manifest lists no checkpoints "
                                                 f"({JOURNAL} does)")
        listed_in = d / JOURNAL
        entries, final, torn = _read_journal(listed_in, digest)
        _check_entries(listed_in, entries, final, lines=True)
        body = dict(body, checkpoints=entries)
        if final is not _MISSING:
            body["final"] = final
    try:
        return CheckpointSet(d, body, listed_in=listed_in.name, torn_line=torn)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointCorrupted(mpath, f"missing or malformed field: {e}") from None


def apply_state(engine, state: RestoredState) -> None:
    """Load a restored state into a fresh engine: tracked memory, registers, and the
    console output so far (so the run's console is the whole run's).  Everything is
    checked before anything is loaded: a state that does not fit the engine changes
    nothing in it."""
    if not isinstance(state, RestoredState):
        raise TypeError(f"apply_state: {state!r:.60} is not a RestoredState (CheckpointSet.load returns one)")
    for r in state.regions:
        if r.end > engine.ram_size:
            raise ValueError(f"region {r.name} ends at {r.end:#x}, beyond this engine's RAM ({engine.ram_size:#x})")
        data = state.memory.get(r.gpa)
        if data is None or len(data) != r.size:
            have = "no bytes" if data is None else f"{len(data):#x} bytes"
            raise ValueError(f"region {r.name} [{r.gpa:#x}, {r.end:#x}): the state holds {have} for it, "
                             f"not {r.size:#x}")
    for name, v in state.regs.items():
        if name not in REGISTERS:
            raise ValueError(f"register {name!r}: must be one of {', '.join(REGISTERS)}")
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 64:
            raise ValueError(f"register {name} {v!r}: must be an integer from 0 to 2**64 - 1")
    for r in state.regions:
        engine.vm.load(r.gpa, bytes(state.memory[r.gpa]))
    regs = dict(state.regs)
    if "rflags" in regs:
        # IOPL is the engine's set-up (3 at CPL 3, so `out` works), not guest state:
        # a CPL-3 guest cannot change it, and KVM under PVM reports RFLAGS without it.
        regs["rflags"] = (regs["rflags"] & ~0x3000) | (engine.layout.rflags & 0x3000)
    engine.set_regs(regs)
    engine.console[:] = state.console


# =============================================================================== taking checkpoints
@dataclass
class CheckpointInfo:
    """One checkpoint, with what it cost and what 4-KiB dirty logging would have cost."""

    index: int
    reason: str
    dirty_subpages: int
    dirty_pages: int
    payload_bytes: int  #: memory bytes stored (128-byte granules)
    page_payload_bytes: int  #: memory bytes 4-KiB dirty logging would store
    file_bytes: int
    spp_exits: int  #: SPP violations since the previous checkpoint (one per first write to a sub-page)
    dirty_log_exits: int  #: write-protection faults 4-KiB dirty logging would take (one per dirty page)
    engine_write_exits: int  #: writes this engine trapped to emulate SPP (W = 0 pages), all kinds
    memory_sha256: str
    rip: int
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CheckpointRun:
    directory: Path
    engine: str
    regions: list[Region]
    checkpoints: list[CheckpointInfo]
    result: RunResult
    seconds: float

    @property
    def incremental(self) -> list[CheckpointInfo]:
        return self.checkpoints[1:]

    def totals(self) -> dict:
        inc = self.incremental
        b128 = sum(c.payload_bytes for c in inc)
        b4k = sum(c.page_payload_bytes for c in inc)
        return {
            "checkpoints": len(self.checkpoints),
            "tracked_bytes": sum(r.size for r in self.regions),
            "base_file_bytes": self.checkpoints[0].file_bytes if self.checkpoints else 0,
            "incremental_payload_bytes": b128,
            "incremental_payload_bytes_4k": b4k,
            "incremental_file_bytes": sum(c.file_bytes for c in inc),
            "bytes_ratio_4k_over_128": (b4k / b128) if b128 else None,
            "spp_exits": sum(c.spp_exits for c in inc),
            "dirty_log_exits": sum(c.dirty_log_exits for c in inc),
            "engine_write_exits": sum(c.engine_write_exits for c in inc),
            "exit_code": self.result.exit_code,
            "stop_reason": self.result.stop_reason,
            "seconds": round(self.seconds, 3),
        }

    def to_dict(self) -> dict:
        return {
            "directory": str(self.directory), "engine": self.engine,
            "regions": [r.to_dict() for r in self.regions],
            "checkpoints": [c.to_dict() for c in self.checkpoints], "totals": self.totals(),
            "result": self.result.to_dict(max_violations=0),
        }


def _parse_every(every) -> int | None:
    if every is None:
        return None
    if isinstance(every, bool):
        raise ValueError(f"--every {every!r}: expected a number of writes, e.g. 500 or 500-writes")
    if isinstance(every, int):
        n = every
    else:
        text = str(every).strip().lower()
        for suffix in ("-writes", "writes", "-write", "w"):
            if text.endswith(suffix):
                text = text[: -len(suffix)]
                break
        try:
            n = int(text, 0)
        except ValueError:
            raise ValueError(f"--every {every!r}: expected a number of writes, e.g. 500 or 500-writes") from None
    if n <= 0:
        raise ValueError(f"--every {every!r}: must be a positive number of writes")
    return n


def _check_out(out: os.PathLike | str) -> Path:
    """``out`` as a Path if a checkpoint set can be written there: a new or empty
    directory (checked before any work; nothing is created)."""
    text = os.fspath(out)
    if not str(text).strip():
        raise ValueError("--out '': an empty path; give a new or empty directory")
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ValueError(f"--out {p}: exists and is not a directory")
    for parent in p.parents:  # the nearest existing ancestor must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {p}: {parent} is not a directory")
            break
    try:
        if p.is_dir() and any(p.iterdir()):
            raise ValueError(f"--out {p}: directory is not empty; give a new or empty directory")
    except OSError as e:
        raise ValueError(f"--out {p}: cannot list the directory: {e.strerror or e}") from None
    return p


def _prepare_dir(out: Path) -> bool:
    """Check ``out`` (:func:`_check_out`) and create it; True when it was created here."""
    _check_out(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointWriteError(e.errno, f"cannot create {out}: {e.strerror or e}") from e
    return created


class Checkpointer:
    """Runs one engine, taking checkpoints into a directory."""

    def __init__(self, engine, out_dir: os.PathLike | str, *, guest_name: str, elf_bytes: bytes,
                 every: int | None = None, port: int | None = None, track: Iterable[tuple[int, int]] = (),
                 on_checkpoint: Callable[[object, CheckpointInfo], None] | None = None) -> None:
        if every is None and port is None:
            raise ValueError("give --every N (tracked writes) or --at-port-signal (or both): otherwise only the "
                             "base checkpoint would be taken")
        if on_checkpoint is not None and not callable(on_checkpoint):
            raise TypeError(f"on_checkpoint={on_checkpoint!r}: must be a callable (engine, CheckpointInfo) -> None, "
                            "or None")
        self.engine = engine
        self.out = Path(out_dir)
        self.every = _parse_every(every)
        self.port = port
        self.on_checkpoint = on_checkpoint
        self.regions = tracked_regions(engine.image, engine.ram_size, track, table_range=engine.layout.table_range)
        subpages = sum(r.size for r in self.regions) // GRANULE
        if self.every is not None and self.every > subpages:
            # each sub-page takes one tracked write between two checkpoints (then it is writable)
            raise ValueError(f"--every {every}: more than the {subpages} tracked sub-pages, so no checkpoint would "
                             f"be taken after the base (a sub-page counts once between two checkpoints); give at "
                             f"most {subpages}, or --track more memory")
        self.tracker = DirtyTracker(engine.vm, self.regions, on_dirty=self._on_dirty if self.every else None)
        self.set_id = uuid.uuid4().bytes
        self.infos: list[CheckpointInfo] = []
        self._reason: list[str] = []
        self._console_at = 0
        self._writes_at = 0
        self.manifest = {
            "format": MANIFEST_FORMAT, "version": SET_VERSION, "set_id": self.set_id.hex(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "guest": {"name": guest_name, "elf": GUEST_FILE, "sha256": hashlib.sha256(elf_bytes).hexdigest()},
            "engine": engine.name, "ram_size": engine.ram_size, "cpl": engine.cpl, "granule": GRANULE,
            "regions": [r.to_dict() for r in self.regions],
            "trigger": {"every_writes": self.every, "port": port},
        }
        self._chain = ""  # the journal's last chain (the manifest's SHA-256 before the first line)
        self._elf = elf_bytes
        if port is not None:
            engine.add_port_handler(port, self._on_port)

    # -- triggers ---------------------------------------------------------------------------
    def _on_port(self, engine, value: int):
        self._reason.append(f"port {self.port:#x} <- {value}")
        return "pause"

    def _on_dirty(self, n: int) -> None:
        # The KVM engine pauses right after this write; Unicorn at the end of the
        # translated block it is running (a few more tracked writes may land first):
        # either way the checkpoint is taken at an instruction boundary.
        every = self.every
        assert every is not None  # __init__ hands this callback to the tracker only when `every` is set
        if n >= every:
            if n == every:
                self._reason.append(f"every {every} tracked writes")
            self.engine.request_pause()

    # -- checkpoints ----------------------------------------------------------------------
    def _begin_set(self) -> None:
        """An empty journal, then the manifest (written once): a reader that finds the
        manifest finds the journal too."""
        atomic_write(self.out / JOURNAL, b"")
        atomic_write(self.out / MANIFEST, _manifest_bytes(self.manifest))
        self._chain = _manifest_digest(self.manifest)

    def _log(self, record: dict) -> None:
        """Append ``record`` to the journal: one line, whatever the set's length."""
        chain, line = _journal_line(self._chain, record)
        _append(self.out / JOURNAL, line)
        self._chain = chain

    def _take(self, reason: str, *, base: bool) -> CheckpointInfo:
        t0 = time.perf_counter()
        eng, vm, tr = self.engine, self.engine.vm, self.tracker
        index = len(self.infos)
        regs = eng.regs()
        if base:
            regs["rip"] = eng.layout.entry  # before the first run() Unicorn's RIP register is not set yet
            # (one record a region, as the format has it, however many reads it takes)
            memory = [(r.gpa, b"".join(d for _, d in read_in_pieces(vm.read, r.gpa, r.size))) for r in self.regions]
            sub = sum(r.size for r in self.regions) // GRANULE
            pages = sum(r.size for r in self.regions) // PAGE
        else:
            memory = [piece for g, n in tr.dirty_runs() for piece in read_in_pieces(vm.read, g, n)]
            sub, pages = tr.dirty_subpages, tr.dirty_pages
        console = bytes(eng.console[self._console_at :])
        digest = memory_digest(vm.read, self.regions)
        writes = vm.stats()["writes"]
        meta = {"reason": reason, "rip": regs["rip"], "engine": eng.name, "memory_sha256": digest,
                "time": time.time()}
        path = self.out / _ckpt_name(index)
        data = encode_checkpoint(index=index, kind=KIND_BASE if base else KIND_INCREMENTAL, set_id=self.set_id,
                                 memory=memory, regs=regs, console=console, meta=meta)
        atomic_write(path, data)
        info = CheckpointInfo(
            index=index, reason=reason, dirty_subpages=sub, dirty_pages=pages,
            payload_bytes=sum(len(d) for _, d in memory), page_payload_bytes=pages * PAGE, file_bytes=len(data),
            spp_exits=0 if base else tr.violations, dirty_log_exits=0 if base else pages,
            engine_write_exits=writes - self._writes_at, memory_sha256=digest, rip=regs["rip"],
        )
        entry = {
            "index": index, "file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "reason": reason, "memory_sha256": digest, "dirty_subpages": sub, "dirty_pages": pages,
            "spp_exits": info.spp_exits,
        }
        self._log({"checkpoint": entry})
        self._console_at = len(eng.console)
        self._writes_at = writes
        if base:
            tr.arm()
        else:
            tr.rearm()
        info.seconds = time.perf_counter() - t0
        self.infos.append(info)
        if self.on_checkpoint is not None:
            self.on_checkpoint(eng, info)
        return info

    def run(self) -> CheckpointRun:
        t0 = time.perf_counter()
        eng = self.engine
        created = _prepare_dir(self.out)
        try:
            atomic_write(self.out / GUEST_FILE, self._elf)
            self._begin_set()
            eng.vm.on_violation(self.tracker.handle)
            self._take("base", base=True)
        except BaseException:
            if not self.infos:  # no usable set yet: leave --out as it was (new: gone; empty: empty)
                for name in (MANIFEST, JOURNAL, _ckpt_name(0), GUEST_FILE):
                    try:
                        (self.out / name).unlink()
                    except OSError:
                        pass
                if created:
                    try:
                        self.out.rmdir()
                    except OSError:
                        pass
            raise
        while True:
            result = eng.run()  # the engine mirrors protections changed by _take itself
            if result.stop_reason != "paused":
                break
            reason = "; ".join(self._reason) or "pause"
            self._reason.clear()
            self._take(reason, base=False)
        final = {
            "stop_reason": result.stop_reason, "exit_code": result.exit_code,
            "console_sha256": hashlib.sha256(result.console.encode()).hexdigest(),
        }
        self._log({"final": final})
        return CheckpointRun(self.out, eng.name, self.regions, self.infos, result, time.perf_counter() - t0)


def _make_engine(image, engine: str, *, ram_size: int, cpl: int, timeout: float):
    cls, why = choose_engine(engine)
    return cls(image, ram_size=ram_size, cpl=cpl, timeout=timeout), why


def checkpoint_guest(guest, out_dir, *, every=None, at_port_signal: bool = False, port: int = CHECKPOINT_PORT,
                     engine: str = "auto", ram_size: int = DEFAULT_RAM, cpl: int = 3, timeout: float = 60.0,
                     track: Iterable[tuple[int, int]] = (),
                     on_checkpoint: Callable[[object, CheckpointInfo], None] | None = None) -> CheckpointRun:
    """Run ``guest`` (a bundled program, a .c or an ELF) to completion on ``engine``,
    taking a base checkpoint and one incremental checkpoint after every ``every``
    tracked writes and/or at every ``out`` to ``port``, into ``out_dir`` (new or empty)."""
    if not isinstance(at_port_signal, bool):
        raise ValueError(f"at_port_signal={at_port_signal!r}: must be True or False")
    if not at_port_signal and every is None:
        raise ValueError("give --every N (tracked writes) or --at-port-signal (or both)")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF or port in (0xE9, 0xF4):
        shown = f"{port:#x}" if isinstance(port, int) and not isinstance(port, bool) else repr(port)
        raise ValueError(f"--port {shown}: must be 0x0..0xffff and not 0xe9/0xf4 (the console and exit ports)")
    _parse_every(every)
    check_run_args(engine, timeout, ram_size=ram_size, cpl=cpl)
    if on_checkpoint is not None and not callable(on_checkpoint):
        raise TypeError(f"on_checkpoint={on_checkpoint!r}: must be a callable (engine, CheckpointInfo) -> None, "
                        "or None")
    track = _check_track(track, ram_size)
    _check_out(out_dir)  # before building and running anything
    image, elf, name = load_guest_spec(guest)
    eng, _ = _make_engine(image, engine, ram_size=ram_size, cpl=cpl, timeout=timeout)
    try:
        cp = Checkpointer(eng, out_dir, guest_name=name, elf_bytes=elf, every=every,
                          port=port if at_port_signal else None, track=track, on_checkpoint=on_checkpoint)
        return cp.run()
    finally:
        eng.close()


# =============================================================================== restore / resume
@dataclass
class RestoreResult:
    directory: Path
    index: int
    regions: list[Region]
    sha256: str
    recorded_sha256: str | None
    regs: dict[str, int]
    result: RunResult | None = None  # with resume
    recorded_final: dict | None = None
    engine: str | None = None
    #: why the set's guest copy cannot be used (missing, unreadable, differs): the memory
    #: and registers are rebuilt all the same, but the set cannot be resumed; None when it verified
    guest_problem: str | None = None
    #: the set's journal ends in this incomplete line (a run stopped while appending
    #: it), left out of the set; None when the journal is whole
    torn_line: int | None = None
    #: checkpoint files beyond the set's index (:attr:`CheckpointSet.unlisted`)
    unlisted: tuple[str, ...] = ()
    listed_in: str = JOURNAL

    @property
    def verified(self) -> bool:
        return self.recorded_sha256 is not None and self.sha256 == self.recorded_sha256

    @property
    def matches_recorded_run(self) -> bool | None:
        if self.result is None or not self.recorded_final:
            return None
        f = self.recorded_final
        return (self.result.exit_code == f.get("exit_code") and self.result.stop_reason == f.get("stop_reason")
                and hashlib.sha256(self.result.console.encode()).hexdigest() == f.get("console_sha256"))

    def to_dict(self) -> dict:
        return {
            "directory": str(self.directory), "index": self.index, "sha256": self.sha256,
            "recorded_sha256": self.recorded_sha256, "verified": self.verified,
            "regs": self.regs, "engine": self.engine,
            "guest_verified": self.guest_problem is None, "guest_problem": self.guest_problem,
            "result": self.result.to_dict(max_violations=0) if self.result else None,
            "matches_recorded_run": self.matches_recorded_run, "torn_line": self.torn_line,
            "unlisted_files": list(self.unlisted),
        }


def restore_checkpoint(directory, to: int | None = None, *, resume: bool = False, engine: str = "auto",
                       timeout: float = 60.0) -> RestoreResult:
    """Rebuild the guest state of checkpoint ``to`` (default: the last) after verifying
    every file up to it, and check it against the hash taken when it was written.
    With ``resume``, load it into a fresh engine (:func:`apply_state`) and run the
    guest to completion; ``result.console`` is then the whole run's console."""
    if not isinstance(resume, bool):
        raise ValueError(f"resume={resume!r}: must be True or False")
    check_run_args(engine, timeout)  # checked even without resume (then unused), as the CLI does
    cs = open_checkpoint_set(directory)
    k = len(cs) - 1 if to is None else to
    state = cs.load(k)
    digest = state.sha256
    if state.recorded_sha256 is not None and digest != state.recorded_sha256:
        raise CheckpointCorrupted(cs.dir / cs.entries[k]["file"],
                                  f"rebuilt memory hashes to {digest[:16]}..., the checkpoint recorded "
                                  f"{state.recorded_sha256[:16]}...")
    out = RestoreResult(cs.dir, k, cs.regions, digest, state.recorded_sha256, state.regs,
                        recorded_final=cs.manifest.get("final"), torn_line=cs.torn_line, unlisted=cs.unlisted,
                        listed_in=cs.listed_in)
    if not resume:
        try:
            cs.check_guest()
        except GuestMismatch as e:
            out.guest_problem = str(e)
        return out
    image = cs.guest_image()
    eng, _ = _make_engine(image, engine, ram_size=int(cs.manifest["ram_size"]), cpl=int(cs.manifest["cpl"]),
                          timeout=timeout)
    try:
        apply_state(eng, state)
        out.engine = eng.name
        out.result = eng.run()
    finally:
        eng.close()
    return out


# =============================================================================== reports
def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.2f} MiB"
    if n >= 1 << 10:
        return f"{n / 1024:.1f} KiB"
    return f"{n} B"


def _torn_note(line: int) -> str:
    return (f"[yellow]note: line {line} of {JOURNAL} is incomplete (the checkpointing run stopped while writing "
            "it): it is not part of the set[/]")


def set_listing(cs: CheckpointSet) -> dict:
    """What ``sppkit restore --list --json`` prints: the set's description and index."""
    m = cs.manifest
    return {
        "directory": str(cs.dir), "version": m["version"], "guest": m["guest"], "engine": m.get("engine"),
        "ram_size": m["ram_size"], "regions": m["regions"], "trigger": m.get("trigger"),
        "checkpoints": cs.entries, "final": m.get("final"), "torn_line": cs.torn_line,
        "unlisted_files": list(cs.unlisted),
    }


def print_listing(cs: CheckpointSet, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    m = cs.manifest
    t = Table(title=f"{escape(str(cs.dir))}: {len(cs)} checkpoint(s) of {escape(str(m['guest'].get('name', '?')))} "
                    f"on {escape(str(m.get('engine', '?')))}")
    for col in ("index", "reason", "size", "dirty sub-pages", "dirty pages", "SPP exits"):
        t.add_column(col, justify="left" if col == "reason" else "right")
    for e in cs.entries:
        t.add_row(str(e["index"]), escape(str(e.get("reason", ""))), _fmt_bytes(e.get("bytes")),
                  *(escape(str(e.get(k, "—"))) for k in ("dirty_subpages", "dirty_pages", "spp_exits")))
    console.print(t)
    f = m.get("final")
    if f is None:
        console.print("run end: not recorded (the checkpointing run stopped before it ended)")
    else:
        code = f.get("exit_code")
        console.print(f"run end: {escape(str(f.get('stop_reason')))}, exit code {'—' if code is None else code}")
    if cs.torn_line is not None:
        console.print(_torn_note(cs.torn_line))
    if cs.unlisted:
        console.print(_unlisted_note(cs.unlisted, cs.listed_in))
    console.print("[dim]listed from the verified index; `sppkit restore DIR --to K` verifies the files 0..K[/]")


def print_checkpoint_run(run: CheckpointRun, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    from rich import box

    t = Table(title=f"checkpoints in {escape(str(run.directory))} ({run.engine} engine)", box=box.SIMPLE_HEAD,
              pad_edge=False)
    for col in ("#", "trigger", "dirty\n128 B", "dirty\n4 KiB", "KiB\n@128 B", "KiB\n@4 KiB", "file\nKiB",
                "SPP\nexits", "dirty-log\nexits", "engine\nexits"):
        t.add_column(col, justify="left" if col == "trigger" else "right", no_wrap=col == "trigger")

    def kib(n: int) -> str:
        return f"{n / 1024:.1f}"

    for c in run.checkpoints:
        trigger = c.reason.replace("port ", "").replace(" <- ", "=").replace("every ", "").replace(" tracked", "")
        t.add_row(str(c.index), escape(trigger), str(c.dirty_subpages), str(c.dirty_pages),
                  kib(c.payload_bytes), kib(c.page_payload_bytes), kib(c.file_bytes),
                  "—" if c.index == 0 else str(c.spp_exits), "—" if c.index == 0 else str(c.dirty_log_exits),
                  str(c.engine_write_exits))
    console.print(t)
    tot = run.totals()
    ratio = tot["bytes_ratio_4k_over_128"]
    console.print(
        f"tracked {_fmt_bytes(tot['tracked_bytes'])} in {len(run.regions)} region(s); incremental checkpoints hold "
        f"{_fmt_bytes(tot['incremental_payload_bytes'])} with 128-byte tracking vs "
        f"{_fmt_bytes(tot['incremental_payload_bytes_4k'])} with 4-KiB dirty logging"
        + (f" ({ratio:.1f}× less)" if ratio else "")
        + f"; exits: {tot['spp_exits']} SPP violations vs {tot['dirty_log_exits']} dirty-log faults "
        f"(this engine trapped {tot['engine_write_exits']} writes to emulate SPP)"
    )
    code = "—" if run.result.exit_code is None else run.result.exit_code
    console.print(f"guest: stop {run.result.stop_reason}, exit code {code}; {tot['seconds']} s")


def print_restore(res: RestoreResult, console) -> None:
    from rich.markup import escape

    state = "matches" if res.verified else "DOES NOT MATCH"
    console.print(f"checkpoint {res.index} of {escape(str(res.directory))}: checkpoint files 0..{res.index} verified; "
                  f"rebuilt memory sha256 {res.sha256[:16]}… {state} the hash taken at the checkpoint")
    console.print(f"registers: rip {res.regs.get('rip', 0):#x}, rsp {res.regs.get('rsp', 0):#x}, "
                  f"rflags {res.regs.get('rflags', 0):#x}")
    if res.torn_line is not None:
        console.print(_torn_note(res.torn_line))
    if res.unlisted:
        console.print(_unlisted_note(res.unlisted, res.listed_in))
    if res.guest_problem is not None:
        console.print(f"[red]guest copy: {escape(res.guest_problem)}: the set cannot be resumed[/]")
    if res.result is not None:
        r = res.result
        console.rule(f"resumed on the {res.engine} engine: guest console (whole run)")
        console.out(r.console.rstrip("\n"), highlight=False)
        m = res.matches_recorded_run
        console.print(f"stop: {r.stop_reason}, exit code {'—' if r.exit_code is None else r.exit_code}"
                      + ("" if m is None else ("; identical to the checkpointed run" if m else
                                                "; DIFFERS from the checkpointed run")))


# =============================================================================== CLI


def _given(ctx: click.Context, name: str) -> bool:
    """Whether option ``name`` was given on the command line (not its default)."""
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)


@click.command("checkpoint", short_help="Memory checkpointing: incremental checkpoints of 128-byte dirty sub-pages.")
@click.argument("guest")
@click.option("--every", metavar="N[-writes]",
              help="Take a checkpoint after every N tracked writes (first writes to a sub-page since the last "
                   "checkpoint), 1 to the number of tracked sub-pages; e.g. 500 or 500-writes.")
@click.option("--at-port-signal", is_flag=True,
              help="Take a checkpoint whenever the guest writes to --port (the bundled ckpt_* guests do at "
                   "each phase).")
@click.option("--port", metavar="PORT", default=hex(CHECKPOINT_PORT), show_default=True,
              help="I/O port of --at-port-signal (decimal or 0x hex, 0 to 0xffff, not 0xe9/0xf4: the console and "
                   "exit ports).")
@click.option("--out", "out_dir", metavar="DIRECTORY", required=True, type=click.Path(file_okay=False),
              help="Where the set is written: a new or empty directory (an existing set is never overwritten).")
@engine_option
@click.option("--memory", metavar="SIZE", default="64M", show_default=True, callback=memory_option,
              help=MEMORY_HELP)
@cpl_option
@click.option("--track", multiple=True, metavar="START:LENGTH",
              help="Track this guest-physical range too (decimal or 0x hex, whole pages; repeatable).  Always "
                   "tracked: the guest's writable segments and its stack.")
@click.option("--timeout", metavar="SECONDS", type=float, default=60.0, show_default=True, callback=timeout_option,
              help=f"Seconds each run segment (between two checkpoints) may take before the guest is stopped, "
                   f"from 0 to {MAX_TIMEOUT}; 0: no limit.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show the checkpoints as they are taken on stderr (only when stderr is a terminal).")
@click.pass_context
def checkpoint_command(ctx, guest, every, at_port_signal, port, out_dir, engine, memory, cpl, track, timeout, as_json,
                       progress):
    """Run GUEST with 128-byte dirty tracking, writing a base checkpoint and then
    incremental checkpoints (only the sub-pages written since the previous one) to
    --out, with what 4-KiB dirty logging would have stored.  `sppkit restore` verifies
    a set, rebuilds any checkpoint and resumes the guest from it.

    GUEST: a bundled program (ckpt_kvstore, ckpt_sort, ckpt_log signal phases on
    port 0xF5), a .c file (built with gcc), or an x86-64 ELF.  Give --every,
    --at-port-signal or both.

    Exit status: the guest's exit code when it exits, 1 when the run ends otherwise
    (timeout, fault), 2 on bad input.

    \b
    Examples:
      sppkit checkpoint ckpt_kvstore --at-port-signal --out /tmp/set
      sppkit checkpoint ckpt_sort --every 500 --out /tmp/sort --json
      sppkit restore /tmp/set --to 2 --resume
    """
    from rich.console import Console

    if not at_port_signal and _given(ctx, "port"):
        raise click.UsageError("--port applies to --at-port-signal (the port whose writes trigger a checkpoint); "
                               "add --at-port-signal or drop --port")
    try:
        port_n = int(str(port).strip(), 0)
    except ValueError:
        raise ValueError(f"--port {port!r}: not an integer (decimal or 0x hex, e.g. 0xf5)") from None
    ranges = [parse_range_arg(t, "--track") for t in track]
    written = [0]

    with Progress(f"checkpoint: running {guest} ({engine} engine)…", progress) as prog:
        def on_checkpoint(eng, info: CheckpointInfo) -> None:
            written[0] += info.file_bytes
            prog.update(f"checkpoint {info.index} taken ({info.reason}); {info.index + 1} checkpoint file(s), "
                        f"{_fmt_bytes(written[0])} in {out_dir}")

        run = checkpoint_guest(guest, out_dir, every=every, at_port_signal=at_port_signal, port=port_n,
                               engine=engine, ram_size=memory, cpl=int(cpl), timeout=timeout, track=ranges,
                               on_checkpoint=on_checkpoint)
    if as_json:
        click.echo(json.dumps(run.to_dict()))
    else:
        print_checkpoint_run(run, Console())
    r = run.result
    raise SystemExit(r.exit_status)


@click.command("restore", short_help="Verify a checkpoint set, rebuild a checkpoint, optionally resume the guest.")
@click.argument("directory", type=click.Path())
@click.option("--to", "to", metavar="INDEX", type=int, default=None,
              help="Checkpoint to rebuild, 0 (the base) to the last.  [default: the last]")
@click.option("--resume", is_flag=True,
              help="Load the rebuilt state into a fresh engine and run the guest to completion; its console is "
                   "the whole run's, compared with the checkpointed run.")
@click.option("--engine", type=click.Choice(["auto", "kvm", "unicorn"]), default="auto", show_default=True,
              help="With --resume: the engine that runs the guest on (ignored without --resume).  " + ENGINE_HELP)
@click.option("--timeout", metavar="SECONDS", type=float, default=60.0, show_default=True, callback=timeout_option,
              help=f"With --resume: seconds before the resumed guest is stopped, from 0 to {MAX_TIMEOUT}; "
                   "0: no limit (ignored without --resume).")
@click.option("--list", "list_", is_flag=True,
              help="List the set's checkpoints (index, reason, size, dirty sub-pages and pages, SPP exits) and "
                   "how the run ended, from its verified index, without reading the checkpoint files; with "
                   "neither --to nor --resume.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@progress_option
@click.pass_context
def restore_command(ctx, directory, to, resume, engine, timeout, list_, as_json, progress):
    """Verify checkpoint set DIRECTORY (written by `sppkit checkpoint --out`) up to
    checkpoint --to, rebuild that checkpoint's memory and registers and check them
    against the hash taken when it was written; with --resume, run the guest on from
    there.  Nothing in DIRECTORY is ever changed.

    Exit status: 0 when every file up to --to and the guest copy verify; 1 when the
    guest copy is missing or differs (the memory is rebuilt, the set cannot be
    resumed); with --resume, the guest's exit code; 2 on bad input or a damaged
    checkpoint file (the message names the file).

    \b
    Examples:
      sppkit restore /tmp/set --list           # what the set holds
      sppkit restore /tmp/set                  # verify every checkpoint
      sppkit restore /tmp/set --to 2 --resume --engine unicorn
    """
    from rich.console import Console

    if list_:
        given = [f"--{n}" for n in ("to", "resume") if _given(ctx, n)]
        if given:
            raise click.UsageError(f"--list lists the set; it takes neither {' nor '.join(given)}")
        cs = open_checkpoint_set(directory)
        if as_json:
            click.echo(json.dumps(set_listing(cs)))
        else:
            print_listing(cs, Console())
        raise SystemExit(0)
    # --engine and --timeout matter only with --resume; without it they are checked and
    # ignored, so that scripts may pass one --engine to every sppkit command
    with Progress(f"restore: verifying {directory}…", progress):
        try:
            res = restore_checkpoint(directory, to, resume=resume, engine=engine, timeout=timeout)
        except UnknownCheckpoint as e:
            if to is None:
                raise
            raise UnknownCheckpoint(f"--to {to}: {e}") from None
    if as_json:
        click.echo(json.dumps(res.to_dict()))
    else:
        print_restore(res, Console())
    if res.result is not None:
        r = res.result
        raise SystemExit(r.exit_status)
    raise SystemExit(0 if res.verified and res.guest_problem is None else 1)


# =============================================================================== demo
def demo_checkpoint(console, engine: str = "auto"):
    """`ckpt_kvstore` checkpointed at its phase signals, checkpoint 2 restored (hash
    checked) and resumed; the resumed run must print what the checkpointed run did."""
    from ..guests import toolchain_status

    ok, why = toolchain_status()
    if not ok:
        console.print(f"[yellow]checkpoint demo skipped: {why}[/]")
        return None
    cls, reason = choose_engine(engine)
    console.rule(f"[bold]memory checkpointing at 128-byte granularity: `ckpt_kvstore` on {cls.name} ({reason})")
    with tempfile.TemporaryDirectory(prefix="sppkit-ckpt-") as d:
        run = checkpoint_guest("ckpt_kvstore", Path(d) / "set", at_port_signal=True, engine=cls.name)
        print_checkpoint_run(run, console)
        k = min(2, len(run.checkpoints) - 1)
        res = restore_checkpoint(Path(d) / "set", k, resume=True, engine=cls.name)
        resumed = res.result
        assert resumed is not None  # resume=True: restore_checkpoint ran the guest and set its result
        same = resumed.exit_code == run.result.exit_code and resumed.console == run.result.console
        console.print(
            f"restore --to {k}: memory hash {'matches' if res.verified else 'DOES NOT match'} the one taken at the "
            f"checkpoint; resumed run {'prints and exits exactly like' if same else 'DIFFERS from'} the "
            f"checkpointed run (exit code {resumed.exit_code})"
        )
    return run
