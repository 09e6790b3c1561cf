"""GuaNary-style buffer-overflow guards with 128-byte guard sub-pages (``sppkit guard``).

GuaNary (POMACS / SIGMETRICS 2024, "Efficient Buffer Overflow Detection In
Virtualized Clouds Using Intel EPT-based Sub-Page Write Protection Support") puts a
128-byte guard after each heap buffer and write-protects it with SPP, instead of a
4-KiB guard page, and reports 8.3x less memory for the same protected buffers, or
25x more buffers per MB (numbers from the GuaNary artifact README,
POMACS/SIGMETRICS 2024).

Guest side: ``guests/programs/guardalloc.h``, a slab allocator that rounds each
buffer up to 128 bytes, places it so that it ENDS where its guard sub-page begins,
and lists every slot in ``guard_table`` (a global symbol).  The guest signals with an
``out`` to port 0xF6 when guards are ready (after an initialisation phase, and again
after later allocations).

Host side (here): on each signal the run pauses at that instruction boundary, the
table is read and validated, and exactly the guard sub-pages are write-protected
(access-map bit cleared), with the chosen decision: STOP ends the run at the first
write into a guard (under the Unicorn engine the overflowing instruction has not
retired: ``rip_at`` is that instruction), SKIP discards such writes and lets the
guest go on.  Every hit is reported with the buffer (index, start, size), the offset
past its end and the instruction.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from typing import Callable

import click

from ..engines import DEFAULT_RAM, choose_engine
from ..engines.base import MAX_TIMEOUT, check_ram_size
from ..engines.result import RunResult
from ..vmm import Decision
from .checkpoint import load_guest_spec
from .monitor import (JSON_HELP, MEMORY_HELP, Progress, check_run_args, cpl_option, engine_option, memory_option,
                      progress_option, timeout_option)

__all__ = [
    "GUANARY_BUFFERS_RATIO", "GUANARY_MEMORY_RATIO", "GUARD_PORT", "GuardBuffer", "GuardError", "GuardHit",
    "GuardReport", "GuardSession", "GuardTable", "GuardTableError", "demo_guard", "guard_command", "guard_guest",
    "guard_numbers", "read_guard_table",
]

GUARD_PORT = 0xF6
GUARD_SIZE = 128
PAGE = 4096
MIB = 1 << 20
TABLE_SYMBOL = "guard_table"
TABLE_MAGIC = 0x44524155474B5053  # "SPKGUARD"
TABLE_VERSION = 1
_HDR = struct.Struct("<QIIIIQQQ")  # 48 bytes
_ENT = struct.Struct("<QQQII")  # 32 bytes
assert _HDR.size == 48 and _ENT.size == 32
LIVE, FREE = 1, 2

#: GuaNary's published ratios (SPP guards vs 4-KiB guard pages): memory for the same
#: protected buffers, and buffers protected in the same memory.
GUANARY_MEMORY_RATIO = 8.3
GUANARY_BUFFERS_RATIO = 25.0

#: Workload parameters of the bundled guard_bufs guest (symbol -> meaning).
PARAMS = {"buffers": "param_nbuffers", "overflow_buffer": "param_overflow_index", "overflow_by": "param_overflow_by"}


class GuardError(ValueError):
    """Bad input for the guard use case (parameters, guests, sizes)."""


class GuardTableError(GuardError):
    """The guest's guard table is malformed or points outside guest RAM / its arena."""


# ============================================================================ the table
@dataclass(frozen=True)
class GuardBuffer:
    index: int
    start: int
    size: int
    guard: int
    slot_size: int
    state: int

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def live(self) -> bool:
        return self.state == LIVE

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GuardTable:
    address: int
    capacity: int
    guard_size: int
    arena: int
    arena_size: int
    arena_used: int
    buffers: list[GuardBuffer]

    @property
    def guards(self) -> list[int]:
        """Every guard sub-page (free slots keep theirs: the slot will be reused)."""
        return sorted({b.guard for b in self.buffers})

    def buffer_at_guard(self, gpa: int, size: int = 1) -> GuardBuffer | None:
        """The buffer whose guard sub-page holds a byte of ``[gpa, gpa+size)`` (a write
        may start inside the buffer and run into its guard)."""
        guards = range(gpa & ~(GUARD_SIZE - 1), gpa + size, GUARD_SIZE)
        for b in self.buffers:
            if b.guard in guards:
                return b
        return None


def _check_ram(ram_size) -> int:
    try:
        return check_ram_size(ram_size)
    except ValueError as e:
        raise GuardError(f"--memory: {e}") from None


def _reader(read: Callable[[int, int], bytes]) -> Callable[[int, int], bytes]:
    """``read`` checked: every call must return exactly the bytes asked for."""
    if not callable(read):
        raise TypeError(f"read={read!r}: must be a callable (gpa, n) -> bytes, e.g. vm.read")

    def checked(gpa: int, n: int) -> bytes:
        data = read(gpa, n)
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) != n:
            raise TypeError(f"read({gpa:#x}, {n}) returned {data!r:.40}: it must return {n} bytes")
        return bytes(data)

    return checked


def read_guard_table(read: Callable[[int, int], bytes], image, ram_size: int) -> GuardTable:
    """Read and validate the guest's ``guard_table`` (see guardalloc.h)."""
    read = _reader(read)
    _check_ram(ram_size)
    sym = image.symbols.get(TABLE_SYMBOL)
    if sym is None:
        raise GuardError(f"{image.where}: no {TABLE_SYMBOL!r} symbol: the guest must be built with guardalloc.h")
    where = f"{TABLE_SYMBOL} at {sym.addr:#x}"
    if sym.addr + _HDR.size > ram_size:
        raise GuardTableError(f"{where} lies beyond guest RAM ({ram_size >> 20} MiB)")
    magic, version, cap, count, gsize, arena, asize, used = _HDR.unpack(read(sym.addr, _HDR.size))
    if magic != TABLE_MAGIC:
        raise GuardTableError(f"{where}: bad magic {magic:#x} (expected {TABLE_MAGIC:#x}, guardalloc.h)")
    if version != TABLE_VERSION:
        raise GuardTableError(f"{where}: table version {version}; this sppkit reads version {TABLE_VERSION}")
    if gsize != GUARD_SIZE:
        raise GuardTableError(f"{where}: guard size {gsize}; SPP guards are exactly one 128-byte sub-page")
    if count > cap or (sym.size and _HDR.size + cap * _ENT.size > sym.size):
        raise GuardTableError(f"{where}: {count} entries, capacity {cap}, symbol size {sym.size}: inconsistent")
    if count and (arena % PAGE or arena + asize > ram_size or used > asize):
        raise GuardTableError(
            f"{where}: arena [{arena:#x}, {arena + asize:#x}) (used {used:#x}) is not page-aligned or lies "
            f"beyond guest RAM ({ram_size >> 20} MiB)")
    if sym.addr + _HDR.size + count * _ENT.size > ram_size:
        raise GuardTableError(f"{where}: count {count} ({count:#x}): that many {_ENT.size}-byte entries run past "
                              f"the end of guest RAM ({ram_size >> 20} MiB); the table is corrupt")
    raw = read(sym.addr + _HDR.size, count * _ENT.size)
    buffers: list[GuardBuffer] = []
    seen: dict[int, int] = {}  # guard gpa -> index of the entry it belongs to
    for i in range(count):
        start, size, guard, slot, state = _ENT.unpack_from(raw, i * _ENT.size)
        w = f"{where}: entry {i}"
        if state not in (LIVE, FREE):
            raise GuardTableError(f"{w}: state {state} (expected 1 live or 2 free)")
        if guard % GUARD_SIZE:
            raise GuardTableError(f"{w}: guard {guard:#x} is not 128-byte aligned")
        if guard + GUARD_SIZE > ram_size:
            raise GuardTableError(f"{w}: guard {guard:#x} lies beyond guest RAM ({ram_size >> 20} MiB)")
        if not (arena <= guard and guard + GUARD_SIZE <= arena + asize):
            raise GuardTableError(f"{w}: guard {guard:#x} lies outside the arena [{arena:#x}, {arena + asize:#x})")
        if slot < 2 * GUARD_SIZE or slot % GUARD_SIZE or guard - (slot - GUARD_SIZE) < arena:
            raise GuardTableError(f"{w}: slot size {slot} is not a whole number of sub-pages inside the arena")
        if not (0 < size and guard - (slot - GUARD_SIZE) <= start and start + size <= guard):
            raise GuardTableError(f"{w}: buffer [{start:#x}, {start + size:#x}) does not end at or before its guard "
                                  f"{guard:#x} inside its slot")
        if guard in seen:
            raise GuardTableError(f"{w}: guard {guard:#x} already belongs to entry {seen[guard]}")
        seen[guard] = i
        buffers.append(GuardBuffer(i, start, size, guard, slot, state))
    # slots [guard - (slot - 128), guard + 128) never overlap in guardalloc.h: one that does
    # would put a guard inside another buffer, whose legitimate writes would then trap
    spans = sorted((b.guard + GUARD_SIZE - b.slot_size, b.guard + GUARD_SIZE, b.index) for b in buffers)
    for (lo0, hi0, i0), (lo1, hi1, i1) in zip(spans, spans[1:]):
        if lo1 < hi0:
            first, second = sorted(((i0, lo0, hi0), (i1, lo1, hi1)))
            raise GuardTableError(f"{where}: entry {second[0]}: slot [{second[1]:#x}, {second[2]:#x}) overlaps "
                                  f"entry {first[0]}'s slot [{first[1]:#x}, {first[2]:#x})")
    return GuardTable(sym.addr, cap, gsize, arena, asize, used, buffers)


# ============================================================================ numbers
def _round(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def guard_numbers(sizes: list[int], *, arena_used: int | None = None) -> dict:
    """Memory for guarding buffers of ``sizes``: 128-byte guard sub-pages (buffer area
    rounded to 128 B + one sub-page) vs 4-KiB guard pages (area rounded to 4 KiB + one
    page), the guards alone and whole footprints, and buffers per MiB.  ``sizes``: each
    a positive number of bytes."""
    if isinstance(sizes, (str, bytes)):
        raise GuardError(f"sizes {sizes!r}: must be a list of buffer sizes in bytes")
    try:
        sizes = list(sizes)
    except TypeError:
        raise GuardError(f"sizes {sizes!r}: must be a list of buffer sizes in bytes") from None
    for i, v in enumerate(sizes):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise GuardError(f"sizes[{i}] {v!r}: a buffer size must be a positive integer (bytes)")
    if arena_used is not None and (isinstance(arena_used, bool) or not isinstance(arena_used, int)
                                   or arena_used < 0):
        raise GuardError(f"arena_used {arena_used!r}: must be a non-negative integer (bytes), or None")
    n = len(sizes)
    if not n:
        return {"buffers": 0}
    sub_guard, page_guard = GUARD_SIZE * n, PAGE * n
    sub_foot = sum(_round(s, GUARD_SIZE) + GUARD_SIZE for s in sizes)
    page_foot = sum(_round(s, PAGE) + PAGE for s in sizes)
    data = sum(sizes)
    out = {
        "buffers": n,
        "buffer_bytes": data,
        "subpage_guard_bytes": sub_guard,
        "page_guard_bytes": page_guard,
        "guard_bytes_ratio": page_guard / sub_guard,
        "subpage_footprint_bytes": sub_foot,
        "page_footprint_bytes": page_foot,
        "footprint_ratio": page_foot / sub_foot,
        "subpage_overhead_bytes": sub_foot - data,
        "page_overhead_bytes": page_foot - data,
        "overhead_ratio": (page_foot - data) / (sub_foot - data),
        "subpage_buffers_per_mib": n * MIB / sub_foot,
        "page_buffers_per_mib": n * MIB / page_foot,
        "buffers_per_mib_ratio": (n * MIB / sub_foot) / (n * MIB / page_foot),
        "guanary_memory_ratio": GUANARY_MEMORY_RATIO,
        "guanary_buffers_ratio": GUANARY_BUFFERS_RATIO,
    }
    if arena_used is not None:
        out["arena_used_bytes"] = arena_used
    return out


# ============================================================================ the session
@dataclass
class GuardHit:
    """One write into a guard sub-page."""

    buffer: GuardBuffer | None
    gpa: int
    size: int
    offset: int | None  #: bytes past the buffer's end (0 = the first byte after it)
    decision: str
    rip_at: int | None
    rip_after: int | None
    instruction: str | None
    retired: bool  #: the writing instruction completed (RIP past it)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["buffer"] = self.buffer.to_dict() if self.buffer else None
        return d


@dataclass
class GuardReport:
    engine: str
    decision: str
    table: GuardTable | None
    protected: list[int]
    hits: list[GuardHit]
    result: RunResult
    numbers: dict
    signals: int
    exact: bool  #: the protected sub-pages were exactly the guards, at every signal

    @property
    def overflow(self) -> bool:
        return bool(self.hits)

    def to_dict(self) -> dict:
        return {
            "engine": self.engine, "decision": self.decision, "signals": self.signals, "exact": self.exact,
            "guards_protected": len(self.protected), "overflow": self.overflow,
            "hits": [h.to_dict() for h in self.hits], "numbers": self.numbers,
            "buffers": [b.to_dict() for b in (self.table.buffers if self.table else [])],
            "result": self.result.to_dict(max_violations=0),
        }


class GuardSession:
    """Protects the guest's guards on every ready signal and runs it to the end."""

    def __init__(self, engine, *, decision: Decision | str = "stop", port: int = GUARD_PORT) -> None:
        d = _guard_decision(decision)
        _check_port(port)
        if engine.image.symbols.get(TABLE_SYMBOL) is None:
            raise GuardError(f"{engine.image.where}: no {TABLE_SYMBOL!r} symbol: the guest must be built with "
                             "guardalloc.h")
        self.engine = engine
        self.decision = d
        self.port = port
        self.table: GuardTable | None = None
        self.protected: set[int] = set()
        self.signals = 0
        self.exact = True
        engine.add_port_handler(port, lambda eng, value: "pause")

    def protect(self) -> GuardTable:
        """Read the table and write-protect exactly its guard sub-pages."""
        from ..policy import Policy

        eng = self.engine
        table = read_guard_table(eng.vm.read, eng.image, eng.ram_size)
        guards = table.guards
        if guards:
            policy = Policy.from_ranges([(g, GUARD_SIZE) for g in guards], self.decision.value, source=TABLE_SYMBOL)
            eng.policy = policy
            eng.apply_policy(policy)  # the engine mirrors it after this port handler
        self.protected = set(guards)
        self.exact = self.exact and self._check_exact(guards)
        self.table = table
        self.signals += 1
        return table

    def _check_exact(self, guards: list[int]) -> bool:
        vm = self.engine.vm
        want: dict[int, int] = {}
        for g in guards:
            want[g >> 12] = want.get(g >> 12, 0xFFFFFFFF) & ~(1 << ((g & 0xFFF) >> 7))
        for gfn, amap in want.items():
            if vm.get_subpage_access(gfn, 1)[0] != amap:
                return False
        slot = vm.memslots()[0]
        protected_pages = {i + slot.base_gfn for i in slot.maps or ()}
        return protected_pages == set(want)

    def run(self) -> RunResult:
        eng = self.engine
        while True:
            r = eng.run()
            if r.stop_reason != "paused":
                return r
            self.protect()

    def hits(self, result: RunResult) -> list[GuardHit]:
        out = []
        for v in result.violations:
            b = self.table.buffer_at_guard(v.gpa, v.size) if self.table else None
            retired = not (result.stop_reason == "stop-decision" and v.decision == "stop" and v.rip_after is None)
            # (the offset of the write's first byte past the end: a write that straddles
            # the end starts inside the buffer)
            out.append(GuardHit(b, v.gpa, v.size, max(v.gpa - b.end, 0) if b else None, v.decision, v.rip_at,
                                v.rip_after, v.instruction, retired))
        return out


def _guard_decision(decision) -> Decision:
    """``decision`` as STOP or SKIP, else GuardError naming it."""
    try:
        d = Decision.parse(decision)
    except ValueError:
        d = None
    if d not in (Decision.STOP, Decision.SKIP):
        shown = decision.value if isinstance(decision, Decision) else decision
        raise GuardError(f"--decision {shown!r}: a guard takes stop or skip")
    assert d is not None
    return d


def _check_port(port) -> int:
    """``port`` if the guest can signal on it, else GuardError naming it."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF or port in (0xE9, 0xF4):
        shown = f"{port:#x}" if isinstance(port, int) and not isinstance(port, bool) else repr(port)
        raise GuardError(f"port {shown}: must be an integer from 0x0 to 0xffff, not 0xe9/0xf4 (the console and exit "
                         f"ports); guardalloc.h signals on {GUARD_PORT:#x}")
    return port


_PARAM_BYTES = 8  #: the guard_bufs parameters are u64


def _param_width(sym) -> int:
    """Bytes of a parameter variable: its symbol's size, or a u64 when the ELF gives none."""
    return sym.size if sym.size in (1, 2, 4, 8) else _PARAM_BYTES


def _param_default(image, key: str) -> int | None:
    """The initial value of parameter ``key`` in the guest's ELF (None when the guest
    has no such variable or its bytes are not in a loadable segment)."""
    sym = image.symbols.get(PARAMS[key])
    if sym is None:
        return None
    seg = image.segment_at(sym.addr)
    width = _param_width(sym)
    if seg is None or sym.addr + width > seg.end:
        return None
    off = sym.addr - seg.gpa
    return int.from_bytes((seg.data + bytes(width))[off : off + width], "little")


def _check_param_fits(image, key: str, value: int) -> None:
    sym = image.symbols.get(PARAMS[key])
    if sym is None:
        return
    width = _param_width(sym)
    if value >= 1 << (8 * width):
        raise GuardError(f"--{key.replace('_', '-')} {value}: does not fit the guest's {PARAMS[key]!r} "
                         f"({width}-byte variable, at most {(1 << (8 * width)) - 1})")


def _patch_params(engine, params: dict[str, int | None]) -> None:
    image = engine.image
    for key, value in params.items():  # check them all before patching any
        if value is None:
            continue
        if image.symbols.get(PARAMS[key]) is None:
            raise GuardError(f"--{key.replace('_', '-')}: {image.where} has no {PARAMS[key]!r} to set "
                             "(only the bundled guard_bufs workload takes it)")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise GuardError(f"--{key.replace('_', '-')} {value!r}: must be a non-negative integer")
        _check_param_fits(image, key, value)
    for key, value in params.items():
        if value is not None:
            sym = image.symbols[PARAMS[key]]
            engine.vm.load(sym.addr, value.to_bytes(_param_width(sym), "little"))


def _check_params(image, buffers, overflow_buffer, overflow_by, ram_size: int | None = None) -> None:
    if ram_size is not None:
        for name in ("ga_arena", TABLE_SYMBOL):
            sym = image.symbols.get(name)
            if sym is not None and sym.addr + sym.size > ram_size:
                need = -(-(sym.addr + sym.size + 0x10000) // (2 << 20)) * 2
                raise GuardError(
                    f"the guest's {'guard arena' if name == 'ga_arena' else 'guard table'} [{sym.addr:#x}, "
                    f"{sym.addr + sym.size:#x}) lies beyond guest RAM ({ram_size >> 20} MiB): use --memory {need}M "
                    "or more")
    cap = None
    sym = image.symbols.get(TABLE_SYMBOL)
    if sym is not None:
        seg = image.segment_at(sym.addr)
        if seg is not None and sym.addr + 16 <= seg.gpa + len(seg.data):
            off = sym.addr - seg.gpa
            cap = struct.unpack_from("<I", seg.data, off + 12)[0]
    for name, v in (("buffers", buffers), ("overflow-buffer", overflow_buffer), ("overflow-by", overflow_by)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise GuardError(f"--{name} {v!r}: must be a non-negative integer")
    if buffers is not None:  # the table's capacity first: it is the real limit, far below the variable's
        if buffers == 0:
            raise GuardError("--buffers 0: at least one buffer")
        if cap is not None and buffers > cap:
            raise GuardError(f"--buffers {buffers}: the guest's guard table holds at most {cap} buffers (1..{cap})")
    if overflow_buffer is not None:
        # without --buffers the guest allocates its default count (its param_nbuffers, capped by the table)
        n = buffers if buffers is not None else _param_default(image, "buffers")
        if n is not None and cap is not None:
            n = min(n, cap)
        if n is not None and overflow_buffer >= n:
            which = f" (0..{n - 1})" if n else ""
            if buffers is None:
                which += f": the guest's default {PARAMS['buffers']}; --buffers sets more"
            raise GuardError(f"--overflow-buffer {overflow_buffer}: there are only {n} buffers{which}")
    if overflow_by is not None and overflow_by > PAGE:
        raise GuardError(f"--overflow-by {overflow_by}: at most {PAGE} bytes past the end")
    # last: a value can pass the limits above and still not fit a narrower guest variable
    for key, v in (("buffers", buffers), ("overflow_buffer", overflow_buffer), ("overflow_by", overflow_by)):
        if v is not None:
            _check_param_fits(image, key, v)


def guard_guest(guest="guard_bufs", *, decision: str = "stop", engine: str = "auto", ram_size: int = DEFAULT_RAM,
                cpl: int = 3, timeout: float = 60.0, buffers: int | None = None, overflow_buffer: int | None = None,
                overflow_by: int | None = None, port: int = GUARD_PORT) -> GuardReport:
    """Run a guardalloc.h guest with its guards protected; report every guard hit and
    the memory numbers (128-byte guards vs 4-KiB guard pages) for its buffers."""
    d = _guard_decision(decision)
    _check_port(port)
    _check_ram(ram_size)
    check_run_args(engine, timeout, cpl=cpl)
    image, _, _ = load_guest_spec(guest)
    _check_params(image, buffers, overflow_buffer, overflow_by, ram_size)
    cls, _ = choose_engine(engine)
    eng = cls(image, ram_size=ram_size, cpl=cpl, timeout=timeout)
    try:
        _patch_params(eng, {"buffers": buffers, "overflow_buffer": overflow_buffer, "overflow_by": overflow_by})
        session = GuardSession(eng, decision=d, port=port)
        result = session.run()
        table = session.table
        if table is None:  # never signalled: read what it allocated anyway, for the numbers
            table = read_guard_table(eng.vm.read, image, eng.ram_size)
        hits = session.hits(result)
        live = [b.size for b in table.buffers if b.live]
        numbers = guard_numbers(live, arena_used=table.arena_used)
        return GuardReport(eng.name, d.value, table, sorted(session.protected), hits, result, numbers,
                           session.signals, session.exact)
    finally:
        eng.close()


# ============================================================================ reports
def _group_hits(hits: list[GuardHit]) -> list[list[GuardHit]]:
    """Consecutive hits by the same instruction on the same buffer, as one group."""
    groups: list[list[GuardHit]] = []
    for h in hits:
        g = groups[-1] if groups else None
        if g and g[-1].buffer == h.buffer and g[-1].rip_at == h.rip_at and g[-1].decision == h.decision:
            g.append(h)
        else:
            groups.append([h])
    return groups


def print_guard_report(rep: GuardReport, console, *, max_rows: int = 20) -> None:
    from rich.markup import escape
    from rich.table import Table

    if rep.result.console:
        console.rule(f"guest console ({rep.engine})")
        console.out(rep.result.console.rstrip("\n"), highlight=False)
    console.rule("overflow guards")
    console.print(f"{len(rep.protected)} guard sub-pages protected ({rep.signals} ready signal(s)); protected set "
                  f"{'is exactly' if rep.exact else 'is NOT exactly'} the guest's guards; decision {rep.decision}")
    if rep.hits:
        console.print(f"[bold red]{len(rep.hits)} write(s) into guards[/]")
        for group in _group_hits(rep.hits)[:max_rows]:
            h, last, n = group[0], group[-1], len(group)
            b = h.buffer
            who = (f"buffer #{b.index} (start {b.start:#x}, {b.size} bytes)" if b else "an unknown buffer")
            # the bytes past the end the writes cover: from the first one's offset to the
            # last byte of the last one
            far = last.gpa + last.size - 1 - b.end if b is not None else None
            off = (f"+{h.offset}" if far is None or far == h.offset else f"+{h.offset}..+{far}") \
                if h.offset is not None else "?"
            rip = f"{h.rip_at:#x}" if h.rip_at is not None else f"before {h.rip_after:#x}"
            state = "not retired, RIP still at it" if not h.retired else "retired, the write discarded"
            console.print(
                f"  overflow of {who}: {n} write(s), {off} past its end (gpa {h.gpa:#x}), by "
                f"`{escape(h.instruction or '?')}` at {rip} ({h.decision}: {state})", highlight=False)
    else:
        console.print("no overflow: no write reached a guard")
    nums = rep.numbers  # not `n`: that is the group size (an int) above
    if nums.get("buffers"):
        t = Table(title=f"memory for {nums['buffers']} guarded buffers ({nums['buffer_bytes']} bytes of data)")
        for col in ("", "128-B guards", "4-KiB guard pages", "ratio"):
            t.add_column(col, justify="right")
        t.add_row("guard bytes", f"{nums['subpage_guard_bytes']:,} B", f"{nums['page_guard_bytes']:,} B",
                  f"{nums['guard_bytes_ratio']:.1f}×")
        t.add_row("footprint", f"{nums['subpage_footprint_bytes']:,} B",
                  f"{nums['page_footprint_bytes']:,} B", f"{nums['footprint_ratio']:.1f}×")
        t.add_row("overhead", f"{nums['subpage_overhead_bytes']:,} B", f"{nums['page_overhead_bytes']:,} B",
                  f"{nums['overhead_ratio']:.1f}×")
        t.add_row("buffers per MiB", f"{nums['subpage_buffers_per_mib']:.0f}", f"{nums['page_buffers_per_mib']:.0f}",
                  f"{nums['buffers_per_mib_ratio']:.1f}×")
        console.print(t)
        console.print("footprint = buffers rounded up to 128 B (4 KiB) + one guard each; overhead = footprint - data")
        console.print(f"GuaNary (SIGMETRICS 2024) reports {GUANARY_MEMORY_RATIO}× less memory and "
                      f"{GUANARY_BUFFERS_RATIO:.0f}× more buffers per MB with SPP guards; the guest's slab arena "
                      f"used {nums.get('arena_used_bytes', 0):,} B (slabs hold unused slots too)")
    r = rep.result
    console.print(f"stop: {r.stop_reason}, guest exit code {'—' if r.exit_code is None else r.exit_code}"
                  + (f", rip {r.rip_at:#x}" if r.stop_reason == "stop-decision" and r.rip_at is not None else ""))


# ============================================================================ CLI
@click.command("guard", short_help="Overflow guards: a 128-byte write-protected guard after every buffer.")
@click.argument("guest")
@click.option("--decision", type=click.Choice(["stop", "skip"]), default="stop", show_default=True,
              help="stop: end the run at the first write into a guard; skip: discard such writes and go on "
                   "(every write into the guard is reported; bytes more than 128 past the end are beyond the "
                   "guard, in the next slot, and neither stopped nor reported).")
@engine_option
@click.option("--buffers", metavar="N", type=int, default=None,
              help="guard_bufs only: how many buffers to allocate, 1 to the guard table's capacity (512).  "
                   "[default: the guest's own, 64]")
@click.option("--overflow-buffer", metavar="I", type=int, default=None,
              help="guard_bufs only: index of the buffer the guest overflows, 0 to buffers-1.  "
                   "[default: the guest's own, 22]")
@click.option("--overflow-by", metavar="BYTES", type=int, default=None,
              help="guard_bufs only: bytes written past that buffer's end, 0 (no overflow) to 4096.  "
                   "[default: the guest's own, 3]")
@click.option("--memory", metavar="SIZE", default="64M", show_default=True, callback=memory_option,
              help=MEMORY_HELP + "  (guard_bufs needs 6M.)")
@cpl_option
@click.option("--timeout", metavar="SECONDS", type=float, default=60.0, show_default=True, callback=timeout_option,
              help=f"Seconds each run segment (between two ready signals) may take before the guest is stopped, "
                   f"from 0 to {MAX_TIMEOUT}; 0: no limit.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@progress_option
def guard_command(guest, decision, engine, buffers, overflow_buffer, overflow_by, memory, cpl, timeout, as_json,
                  progress):
    """Run GUEST (guard_bufs, or a .c/ELF built with guardalloc.h) with a 128-byte
    write-protected guard sub-page after every buffer; report overflows (buffer,
    offset past its end, instruction) and the memory guards cost versus 4-KiB guard
    pages.

    Exit status: 1 when an overflow was detected (or the run ended otherwise), else
    the guest's exit code; 2 on bad input.

    \b
    Examples:
      sppkit guard guard_bufs                              # off-by-3 into buffer 22: stopped
      sppkit guard guard_bufs --decision skip --overflow-by 200
      sppkit guard guard_bufs --overflow-by 0 --json       # no overflow: the memory numbers
    """
    from rich.console import Console

    with Progress(f"guard: running {guest} ({engine} engine)…", progress):
        rep = guard_guest(guest, decision=decision, engine=engine, ram_size=memory, cpl=int(cpl), timeout=timeout,
                          buffers=buffers, overflow_buffer=overflow_buffer, overflow_by=overflow_by)
    if as_json:
        click.echo(json.dumps(rep.to_dict()))
    else:
        print_guard_report(rep, Console())
    r = rep.result
    if rep.overflow:
        raise SystemExit(1)
    raise SystemExit(r.exit_status)


# ============================================================================ demo
def demo_guard(console, engine: str = "auto"):
    """`guard_bufs`: 64 buffers with 128-byte guards, an off-by-3 copy, STOP."""
    from ..guests import toolchain_status

    ok, why = toolchain_status()
    if not ok:
        console.print(f"[yellow]guard demo skipped: {why}[/]")
        return None
    cls, reason = choose_engine(engine)
    console.rule(f"[bold]overflow guards: 128-byte guard sub-pages, `guard_bufs` on {cls.name} ({reason})")
    rep = guard_guest("guard_bufs", decision="stop", engine=cls.name)
    print_guard_report(rep, console, max_rows=5)
    return rep
