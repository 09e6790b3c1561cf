"""Guest OS monitoring at 128 bytes: write hooks smaller than a page, as Bitdefender's
hvmi does with SPP (its introcore GPA write hooks and SPP glue), on real guests.

* :class:`WatchManager` — the integrator's API.  Register *watched regions* (byte
  ranges of guest-physical memory) with callbacks.  Each 128-byte sub-page carries a
  reference count of the watches overlapping it; the page's SPP vector is recomputed
  on every change and pushed to the :class:`~sppkit.vmm.Vm` (``set_spp_vector``) only
  when it differs from the one in force (:attr:`WatchManager.pushes` counts them).
  A violation is matched against the watched *bytes*: a write to a protected sub-page
  that misses every watched byte is committed transparently (``EMULATE``) with no
  callback; a write that touches watched bytes is handed to the callbacks of those
  watches, which return the decision (allow / deny / stop).  Unregistering restores
  the page's previous map.
* :func:`run_monitor` / ``sppkit monitor`` — run a guest (the bundled ``minikernel``
  by default) with ELF symbols watched, report every write to watched bytes with its
  symbol + offset, old and new value and instruction, check that the watched
  structures are intact after the run, and count exits: SPP (``violations``) against
  page-granular protection for the same run (``page_granular``).
* :func:`demo_monitor` — the short demo part.

A guest that initialises its structures at boot defines ``sppkit_monitor_port`` (a
``u16`` holding an I/O port): watches are *armed* when it writes 1 to that port
(like an introspection engine that protects kernel objects once the OS has set them
up); 2 and 3 mark the start and end of an attack stage, recorded with each event.
A guest without that symbol is watched from its first instruction.
"""

from __future__ import annotations

import fnmatch
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import click

from ..arch.sppt import vector_from_map
from ..engines.base import MAX_TIMEOUT, check_timeout
from ..vmm import Decision, SppViolation, Vm, VmmError
from ..guests.elf import SymbolNotFound
from ..policy import symbol_span

__all__ = [
    "MonitorError", "MonitorReport", "UnknownSymbolError", "Watch", "WatchError", "WatchEvent", "WatchManager",
    "WatchTarget", "check_run_args", "demo_monitor", "monitor_command", "print_monitor", "resolve_symbols",
    "run_monitor",
]

PAGE = 4096
SUBPAGE = 128
DEFAULT_GUEST = "minikernel"
#: What ``sppkit monitor minikernel`` watches when neither --protect-symbols nor --policy is given.
DEFAULT_SYMBOLS = "idt,syscall_table,task*_ids,task*_caps"
MONITOR_PORT_SYMBOL = "sppkit_monitor_port"
#: Largest workload length ``--ticks`` / ``run_monitor(ticks=)`` takes.
MAX_TICKS = 10_000_000
STAGES = {1: "workload", 2: "attack", 3: "after-attack"}
MINIKERNEL_BITS = {1: "syscall table hijacked", 2: "credentials escalated", 4: "IDT gate hooked",
                   8: "hot data disturbed"}


def writable_ram_problem(vm, start: int, end: int) -> str | None:
    """Why guest writes to ``[start, end)`` could not all reach guest memory — a gpa no
    memslot covers, or one in a read-only memslot — or None: the one check of the use
    cases' watched and tracked ranges."""
    slots = sorted(vm.memslots(), key=lambda m: m.gpa)
    g = start
    while g < end:
        m = next((m for m in slots if m.gpa <= g < m.end), None)
        if m is None:
            ram = ", ".join(f"[{m.gpa:#x}, {m.end:#x})" for m in slots) or "none"
            return f"lies outside guest RAM: no memslot covers gpa {g:#x} (guest RAM: {ram})"
        if m.readonly:
            return f"is in read-only memslot {m.slot} at gpa {g:#x}: guest writes there never reach guest memory"
        g = m.end
    return None


class MonitorError(ValueError):
    """Bad input to the monitor or the watch manager; the message names the problem."""


class UnknownSymbolError(MonitorError):
    """A symbol (or pattern) the guest does not define; the message lists close matches."""


class WatchError(MonitorError):
    """A watch that cannot be registered (outside RAM, read-only memory, bad range...)."""


# ====================================================================== decisions
_RANK = {Decision.EMULATE: 0, Decision.SKIP: 1, Decision.STOP: 2}
_WORDS = {"allow": Decision.EMULATE, "emulate": Decision.EMULATE, "deny": Decision.SKIP, "skip": Decision.SKIP,
          "stop": Decision.STOP}


def _as_decision(value: Any, where: str) -> Decision:
    """A callback's (or a watch's) answer as a Decision: a Decision, True/"allow"/"emulate"
    (commit), False/"deny"/"skip" (discard), "stop" (end the run)."""
    if isinstance(value, Decision):
        d = value
    elif value is True:
        d = Decision.EMULATE
    elif value is False:
        d = Decision.SKIP
    elif isinstance(value, str) and value.strip().lower() in _WORDS:
        d = _WORDS[value.strip().lower()]
    else:
        raise TypeError(f"{where} returned {value!r}: expected allow/deny/stop, True/False or a sppkit.Decision")
    if d is Decision.UNPROTECT:
        raise TypeError(f"{where} returned UNPROTECT: a watch keeps its protection; return allow, deny or stop")
    return d


def _decision_arg(value: Any, what: str) -> Decision:
    """A decision given as an argument (a watch's, the manager's default) as a Decision;
    :class:`WatchError` naming ``what`` and the valid decisions when it is none."""
    try:
        return _as_decision(value, what)
    except TypeError:
        if isinstance(value, Decision) or (isinstance(value, str) and value.strip().lower() == "unprotect"):
            raise WatchError(f"{what} {getattr(value, 'value', value)!r}: a watch keeps its protection; "
                             "use allow/emulate, deny/skip or stop") from None
        raise WatchError(f"{what} {value!r}: must be one of allow, emulate, deny, skip, stop (or True/False, "
                         "a sppkit.Decision)") from None


def _strictest(decisions: Iterable[Decision]) -> Decision:
    return max(decisions, key=_RANK.__getitem__, default=Decision.EMULATE)


# ====================================================================== watches
class Watch:
    """A registered watch: the byte range ``[start, end)``, its callback and default
    decision, and what happened to it (``hits``: writes to its bytes it was told of;
    ``decisions``: what was decided for them)."""

    __slots__ = ("id", "name", "start", "length", "callback", "decision", "hits", "decisions", "active")

    def __init__(self, wid: int, name: str, start: int, length: int, callback, decision: Decision) -> None:
        self.id = wid
        self.name = name
        self.start = start
        self.length = length
        self.callback = callback
        self.decision = decision
        self.hits = 0
        self.decisions: Counter = Counter()
        self.active = True

    @property
    def end(self) -> int:
        return self.start + self.length

    def subpages(self) -> list[tuple[int, int]]:
        """``(gfn, sub-page)`` of every 128-byte sub-page the watch overlaps."""
        first, last = self.start >> 7, (self.end - 1) >> 7
        return [(s >> 5, s & 31) for s in range(first, last + 1)]

    def overlaps(self, gpa: int, size: int) -> bool:
        return gpa < self.end and self.start < gpa + size

    def to_dict(self) -> dict:
        return {"name": self.name, "start": self.start, "length": self.length, "decision": self.decision.value,
                "subpages": [[g, i] for g, i in self.subpages()], "hits": self.hits,
                "decisions": dict(self.decisions)}

    def __repr__(self) -> str:
        return f"Watch({self.name!r}, [{self.start:#x}, {self.end:#x}), {self.decision.value}, hits={self.hits})"


@dataclass(frozen=True)
class WatchEvent:
    """A guest write that touches watched bytes, as a callback sees it.

    ``gpa``/``size``/``new``: the write's part on one page (a page-crossing write is
    decided per page); ``old``: the bytes there before; ``watches``: the callback's
    watches the write touches (``watch`` is the first).  The decision applies to the
    whole write, watched bytes or not.
    """

    watch: Watch
    watches: tuple[Watch, ...]
    gpa: int
    size: int
    old: bytes
    new: bytes
    rip: int | None
    vcpu: int
    violation: SppViolation

    @property
    def offset(self) -> int:
        """Offset of the write from the start of :attr:`watch` (negative if it starts before)."""
        return self.gpa - self.watch.start

    def watched_range(self, watch: Watch | None = None) -> tuple[int, int]:
        """``(lo, hi)``: the watched bytes of ``watch`` (default: :attr:`watch`) the write covers."""
        w = watch or self.watch
        return max(w.start, self.gpa), min(w.end, self.gpa + self.size)

    @property
    def old_value(self) -> int:
        return int.from_bytes(self.old, "little")

    @property
    def new_value(self) -> int:
        return int.from_bytes(self.new, "little")


class _Page:
    __slots__ = ("gfn", "base_map", "cur_map", "counts", "watches")

    def __init__(self, gfn: int, base_map: int) -> None:
        self.gfn = gfn
        self.base_map = base_map  # the map before the first watch: restored after the last
        self.cur_map = base_map  # the map in force in the Vm
        self.counts = [0] * 32
        self.watches: list[Watch] = []


class WatchManager:
    """Byte-granular write watches on a :class:`~sppkit.vmm.Vm`, enforced with SPP.

    ``chain``: the violation handler that was installed before (an engine's
    ``_on_violation``, which records the violation with its instruction): it is called
    for *every* violation, and its decision applies to violations of sub-pages this
    manager does not protect.  ``armed=False``: watches are counted but not pushed
    until :meth:`arm`.  ``page_granular=True``: a watched page is protected whole
    (vector 0) — the fallback without SPP, and the baseline to compare with.
    ``default``: decision for a watch registered without one (``"deny"``).

    The manager owns the maps of the pages it watches while it watches them.
    """

    def __init__(self, vm: Vm, *, chain: Callable[[SppViolation], Decision] | None = None, armed: bool = True,
                 page_granular: bool = False, default: Decision | str = Decision.SKIP) -> None:
        if not isinstance(vm, Vm):
            raise TypeError(f"WatchManager needs a sppkit.Vm, got {vm!r}")
        if not vm.spp_enabled:
            raise WatchError("SPP is not enabled on this Vm: call vm.enable_spp() first")
        if chain is not None and not callable(chain):
            raise TypeError("chain must be a violation handler (event) -> Decision, or None")
        for what, flag in (("armed", armed), ("page_granular", page_granular)):
            if not isinstance(flag, bool):
                raise WatchError(f"{what}={flag!r}: must be True or False")
        self.vm = vm
        self.chain = chain
        self.page_granular = page_granular
        self.default = _decision_arg(default, "default decision")
        self._armed = armed
        self._closed = False
        self._watches: dict[int, Watch] = {}
        self._pages: dict[int, _Page] = {}
        self._next = 1
        self.pushes = 0  #: vectors pushed to the Vm (only when one changes)
        self.violations = 0  #: violations seen
        self.transparent = 0  #: ... on watched pages that touched no watched byte: committed, no callback
        self.foreign = 0  #: ... on sub-pages protected by someone else: decided by ``chain``
        self.notified = 0  #: ... that touched watched bytes: callbacks called
        self.decisions: Counter = Counter()
        self.transparent_by_subpage: Counter = Counter()  #: (gfn, sub-page) -> transparent commits
        vm.on_violation(self._on_violation)

    def _usable(self, what: str) -> None:
        """WatchError, before anything changes, when ``what`` cannot be done now: the
        manager was closed, or SPP was turned off on its Vm (``vm.disable_spp()`` drops
        every protection, so the manager's maps are no longer the Vm's)."""
        if self._closed:
            raise WatchError(f"{what}: this WatchManager is closed (close() gave the Vm back to its chain); "
                             "make a new one")
        if not self.vm.spp_enabled:
            raise WatchError(f"{what}: SPP is not enabled on this Vm any more (vm.disable_spp() dropped every "
                             "protection); call vm.enable_spp() again first")

    def _check_pages(self, what: str, gfns: Iterable[int]) -> None:
        """WatchError, before anything changes, when a page's map can no longer be read
        or set (its memslot was deleted or moved since it was watched)."""
        for gfn in gfns:
            try:
                self.vm.get_subpage_access(gfn, 1)
            except VmmError as e:
                raise WatchError(f"{what}: page {gfn << 12:#x}: {e} (its memslot was deleted or moved while "
                                 "it was watched)") from None

    # ------------------------------------------------------------------ registration
    def watch(self, start: int, length: int, callback: Callable[[WatchEvent], Any] | None = None, *,
              name: str | None = None, decision: Decision | str | None = None) -> Watch:
        """Watch ``[start, start + length)``.  ``callback(event)`` is called for each
        write touching those bytes and returns the decision (allow/deny/stop, True/False
        or a Decision; None = the watch's ``decision``).  Without a callback the
        watch's ``decision`` (default: the manager's) applies."""
        if name is not None and (not isinstance(name, str) or not name):
            raise WatchError(f"watch name {name!r}: must be a non-empty string, or None (named after its range)")
        for what, v in (("start", start), ("length", length)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise WatchError(f"watch {name or '?'}: {what} must be an integer, got {v!r}")
        label = name or f"{start:#x}:{length:#x}"
        self._usable(f"watch {label!r}")
        if start < 0 or length <= 0:
            raise WatchError(f"watch {label!r}: needs start >= 0 and length > 0 "
                             f"(got start={start:#x}, length={length})")
        if callback is not None and not callable(callback):
            raise TypeError(f"watch {label!r}: callback must be callable or None")
        d = self.default if decision is None else _decision_arg(decision, f"watch {label!r}: decision")
        self._check_ram(label, start, length)
        w = Watch(self._next, label, start, length, callback, d)
        self._next += 1
        touched: dict[int, _Page] = {}
        for gfn, i in w.subpages():
            page = self._pages.get(gfn)
            if page is None:
                page = self._pages[gfn] = _Page(gfn, self.vm.get_subpage_access(gfn, 1)[0])
            page.counts[i] += 1
            touched[gfn] = page
        for page in touched.values():
            page.watches.append(w)
            self._sync(page)
        self._watches[w.id] = w
        return w

    def unwatch(self, w: Watch) -> None:
        """Remove a watch; pages nobody watches any more get their previous map back."""
        if not isinstance(w, Watch) or self._watches.get(w.id) is not w:
            raise WatchError(f"{w!r} is not a watch of this manager (already removed?)")
        self._usable(f"unwatch {w.name!r}")
        self._check_pages(f"unwatch {w.name!r}", {gfn for gfn, _ in w.subpages()})
        del self._watches[w.id]
        w.active = False
        touched: dict[int, _Page] = {}
        for gfn, i in w.subpages():
            page = self._pages[gfn]
            page.counts[i] -= 1
            touched[gfn] = page
        for gfn, page in touched.items():
            page.watches.remove(w)
            self._sync(page)
            if not page.watches:
                del self._pages[gfn]

    def arm(self) -> int:
        """Push the vectors of every watched page (for ``armed=False``); returns the pushes made."""
        self._usable("arm")
        self._check_pages("arm", self._pages)
        before = self.pushes
        self._armed = True
        for page in self._pages.values():
            self._sync(page)
        return self.pushes - before

    def disarm(self) -> int:
        """Restore every watched page's previous map; watches stay registered."""
        self._usable("disarm")
        self._check_pages("disarm", self._pages)
        before = self.pushes
        self._armed = False
        for page in self._pages.values():
            self._sync(page)
        return self.pushes - before

    def close(self) -> None:
        """Remove every watch and give the Vm back to ``chain`` (only if this manager is
        still the Vm's violation handler: a handler installed since, such as another
        manager chaining to this one, stays).  Closing again does nothing; a closed
        manager takes no new watches."""
        if self._closed:
            return
        if self._watches:  # all or nothing: every page checked before any watch is removed
            self._usable("close")
            self._check_pages("close", self._pages)
        for w in list(self._watches.values()):
            self.unwatch(w)
        if self.vm.violation_handler == self._on_violation:
            self.vm.on_violation(self.chain)
        self._closed = True

    @property
    def armed(self) -> bool:
        return self._armed

    @property
    def watches(self) -> list[Watch]:
        return sorted(self._watches.values(), key=lambda w: (w.start, w.id))

    def refcount(self, gpa: int) -> int:
        """Watches overlapping the sub-page holding ``gpa``."""
        if isinstance(gpa, bool) or not isinstance(gpa, int) or gpa < 0:
            raise WatchError(f"refcount gpa={gpa!r}: must be a non-negative integer (a guest-physical address)")
        page = self._pages.get(gpa >> 12)
        return page.counts[(gpa >> 7) & 31] if page else 0

    def access_map(self, gfn: int) -> int:
        """The 32-bit map this manager wants for ``gfn`` (bit i = sub-page i writable)."""
        if isinstance(gfn, bool) or not isinstance(gfn, int) or gfn < 0:
            raise WatchError(f"access_map gfn={gfn!r}: must be a non-negative integer (a guest page frame number)")
        page = self._pages.get(gfn)
        return self._desired(page) if page else self.vm.get_subpage_access(gfn, 1)[0]

    def _check_ram(self, label: str, start: int, length: int) -> None:
        problem = writable_ram_problem(self.vm, start, start + length)
        if problem is not None:
            raise WatchError(f"watch {label!r} [{start:#x}, {start + length:#x}) {problem}")

    def _desired(self, page: _Page) -> int:
        if not self._armed:
            return page.base_map
        mine = 0
        for i, c in enumerate(page.counts):
            if c:
                mine |= 1 << i
        if self.page_granular and mine:
            return 0
        return page.base_map & ~mine

    def _sync(self, page: _Page) -> None:
        want = self._desired(page)
        # compared with the map in force in the Vm, not only the one last pushed: SPP
        # turned off and on again, for one, leaves every page writable
        if want != page.cur_map or want != self.vm.get_subpage_access(page.gfn, 1)[0]:
            self.vm.set_spp_vector(page.gfn << 12, vector_from_map(want))
            page.cur_map = want
            self.pushes += 1

    # ------------------------------------------------------------------ violations
    def _chained(self, ev: SppViolation) -> Decision:
        if self.chain is None:
            return Decision.SKIP
        d = self.chain(ev)
        if not isinstance(d, Decision):
            raise TypeError(f"the chained violation handler {self.chain!r} returned {d!r}; it must return a "
                            "sppkit.Decision")
        return d

    def _on_violation(self, ev: SppViolation) -> Decision:
        # Everything is decided first (the chain and the callbacks may raise, or answer
        # something that is no decision): a violation that raises changes no counter.
        outer = self._chained(ev)
        page = self._pages.get(ev.gfn)
        if page is None:
            self.violations += 1
            self.foreign += 1
            self.decisions[outer.value] += 1
            return outer
        # The manager owns the maps of the pages it watches: the chain may not unprotect
        # one (the Vm would change a map behind it; the next push would undo it).
        if outer is Decision.UNPROTECT:
            outer = Decision.EMULATE
        if not self._armed:
            self.violations += 1
            self.foreign += 1
            self.decisions[outer.value] += 1
            return outer
        foreign = any(not (page.base_map >> s) & 1 for s in ev.denied)
        hit = [w for w in page.watches if w.overlaps(ev.gpa, ev.size)]
        decisions: list[Decision] = [outer] if foreign else []
        decided: list[tuple[list[Watch], Decision]] = []
        if hit:
            old = self.vm.read(ev.gpa, ev.size)
            groups: dict[int, tuple[Any, list[Watch]]] = {}
            for w in hit:
                groups.setdefault(id(w.callback) if w.callback is not None else -w.id, (w.callback, []))[1].append(w)
            for cb, ws in groups.values():
                if cb is None:
                    d = _strictest(w.decision for w in ws)
                else:
                    wev = WatchEvent(ws[0], tuple(ws), ev.gpa, ev.size, old, ev.data, ev.rip, ev.vcpu, ev)
                    ans = cb(wev)
                    d = (_strictest(w.decision for w in ws) if ans is None
                         else _as_decision(ans, f"callback of {ws[0].name!r}"))
                decided.append((ws, d))
        # -- decided: count
        self.violations += 1
        if foreign:
            self.foreign += 1
        if hit:
            self.notified += 1
            for ws, d in decided:
                for w in ws:
                    w.hits += 1
                    w.decisions[d.value] += 1
                decisions.append(d)
        elif not foreign:
            self.transparent += 1
            for s in ev.denied:
                self.transparent_by_subpage[(ev.gfn, s)] += 1
        d = _strictest(decisions)
        self.decisions[d.value] += 1
        return d

    def stats(self) -> dict:
        return {
            "watches": len(self._watches), "pages": len(self._pages), "pushes": self.pushes, "armed": self._armed,
            "page_granular": self.page_granular, "violations": self.violations, "notified": self.notified,
            "transparent": self.transparent, "foreign": self.foreign, "decisions": dict(self.decisions),
        }


# ====================================================================== symbols
@dataclass(frozen=True)
class WatchTarget:
    """A byte range to watch, named for reports."""

    name: str
    start: int
    length: int
    decision: Decision | None = None


_ITEM = re.compile(r"^(?P<name>[A-Za-z_.$*?\[][\w.$*?\[\]\-]*)(?:\+(?P<off>0[xX][0-9a-fA-F]+|\d+))?"
                   r"(?::(?P<len>0[xX][0-9a-fA-F]+|\d+))?$")


def resolve_symbols(image, spec: str | Iterable[str], *, decision: Decision | None = None) -> list[WatchTarget]:
    """``"idt,syscall_table+0x138:8,task*_ids"`` → targets.  An item is a symbol name
    or a glob pattern over the image's object symbols, with an optional ``+OFFSET`` and
    ``:LENGTH`` (default: the rest of the symbol).  :class:`UnknownSymbolError` lists
    close matches for a name the image does not define."""
    if isinstance(spec, str):
        raw = spec.split(",")
    else:
        try:
            raw = list(spec)
        except TypeError:
            raise MonitorError(f"--protect-symbols: {spec!r} is neither a string nor a list of strings") from None
        for i, s in enumerate(raw):
            if not isinstance(s, str):
                raise MonitorError(f"--protect-symbols: item {i} is {s!r}, not a string "
                                   "(SYMBOL[+OFFSET][:LENGTH])")
    items = [s.strip() for s in raw]
    items = [s for s in items if s]
    if not items:
        raise MonitorError("--protect-symbols: no symbol given (e.g. --protect-symbols idt,syscall_table)")
    out: list[WatchTarget] = []
    for item in items:
        m = _ITEM.match(item)
        if m is None:
            raise MonitorError(f"--protect-symbols: {item!r} is not SYMBOL[+OFFSET][:LENGTH] "
                               "(e.g. syscall_table+0x138:8)")
        pat, off, length = m["name"], int(m["off"] or "0", 0), int(m["len"], 0) if m["len"] else None
        if any(ch in pat for ch in "*?["):
            syms = sorted((s for n, s in image.symbols.items() if fnmatch.fnmatchcase(n, pat) and s.kind == "object"),
                          key=lambda s: (s.addr, s.name))
            if not syms:
                raise UnknownSymbolError(f"--protect-symbols: pattern {pat!r} matches no object symbol "
                                         f"in {image.where}")
        else:
            try:
                syms = [image.symbol(pat)]
            except SymbolNotFound as e:
                raise UnknownSymbolError(f"--protect-symbols: unknown symbol {pat!r} in {image.where}{e.hint}") \
                    from None
        for sym in syms:
            try:
                start, n = symbol_span(sym, off, length)
            except ValueError as e:
                raise MonitorError(f"--protect-symbols: {item!r}: {e}") from None
            label = sym.name + (f"+{off:#x}" if off else "") + (f":{n:#x}" if length is not None else "")
            out.append(WatchTarget(label, start, n, decision))
    return out


def _targets_from_policy(path, image) -> list[WatchTarget]:
    from ..policy import load_policy

    pol = load_policy(path, image)
    if not pol:
        raise MonitorError(f"{path}: the policy protects nothing")
    return [WatchTarget(e.name, e.start, e.length, e.decision) for e in pol]


def load_guest_image(guest: str | os.PathLike):
    """A bundled program name, a ``.c`` file (built) or an ELF path → GuestImage."""
    from ..guests import build_guest, list_programs, load_elf

    s = os.fspath(guest)
    if s.endswith(".c"):
        return load_elf(build_guest(s))
    if os.path.exists(s):
        return load_elf(s)
    if s in list_programs():
        return load_elf(build_guest(s))
    raise MonitorError(f"guest {s!r} is neither a file nor a bundled program ({', '.join(list_programs())})")


def _read_param(image, vm, name: str, size: int) -> int | None:
    sym = image.symbols.get(name)
    if sym is None:
        return None
    return int.from_bytes(vm.read(sym.addr, size), "little")


def _patch(image, vm, name: str, value: int) -> None:
    sym = image.symbols.get(name)
    if sym is None:
        raise MonitorError(f"the guest has no {name!r} parameter to set")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        raise MonitorError(f"{name} {value!r}: must be an integer from 0 to 2**64 - 1")
    vm.load(sym.addr, value.to_bytes(8, "little"))


def exact_instruction(image, read: Callable[[int, int], bytes], rip_after: int):
    """The instruction that retired with RIP = ``rip_after``, decoded forward from the
    start of the function symbol containing it; None when no function symbol covers it."""
    from ..engines.x86 import decode_forward

    hit = image.symbol_at(rip_after - 1)
    if hit is None or hit[0].kind != "func" or not hit[0].size:
        return None
    return decode_forward(read, hit[0].addr, rip_after)


# ====================================================================== the run
@dataclass
class MonitorReport:
    engine: str
    engine_reason: str
    guest: str
    cpl: int
    decision: str
    page_granular: bool
    result: Any  # RunResult
    watches: list[dict]
    events: list[dict]
    pages: list[dict]
    stats: dict
    watch_stats: dict
    seconds: float
    verdict: dict | None = None
    #: the run's recorded writes replayed by sppkit.engines.replay against the watches'
    #: access maps: ``{"writes", "page_granular_exits", "violations"}``
    replay: dict | None = None

    @property
    def exit_code(self) -> int | None:
        return self.result.exit_code

    @property
    def watched_events(self) -> list[dict]:
        return [e for e in self.events if e["watches"]]

    def to_dict(self, max_other: int = 100) -> dict:
        """Plain data; ``events`` holds every write to watched bytes, ``other_events`` the
        first ``max_other`` SPP exits that touched no watched byte (``other_events_total``)."""
        res = self.result.to_dict(max_violations=0)
        res.pop("violations", None)
        res.pop("violations_total", None)
        other = [e for e in self.events if not e["watches"]]
        return {
            "engine": self.engine, "engine_reason": self.engine_reason, "guest": self.guest, "cpl": self.cpl,
            "decision": self.decision, "page_granular": self.page_granular, "run": res, "watches": self.watches,
            "events": self.watched_events, "other_events": other[:max_other], "other_events_total": len(other),
            "pages": self.pages, "stats": self.stats, "watch_stats": self.watch_stats,
            "seconds": round(self.seconds, 3), "verdict": self.verdict,
            "exits": {"spp": self.stats["violations"], "page_granular": self.stats["page_granular"],
                      "avoided": self.stats["page_granular"] - self.stats["violations"]},
            "replay": self.replay,
        }


def _value(hexstr: str | None) -> str | None:
    if hexstr is None:
        return None
    b = bytes.fromhex(hexstr)
    return f"{int.from_bytes(b, 'little'):#x}" if len(b) in (1, 2, 4, 8) else hexstr


def run_monitor(guest: str | os.PathLike = DEFAULT_GUEST, *, protect_symbols: str | Iterable[str] | None = None,
                policy: str | os.PathLike | None = None, targets: Iterable[WatchTarget] | None = None,
                engine: str = "auto", decision: Decision | str = "skip", cpl: int = 3, page_granular: bool = False,
                timeout: float = 60.0, memory: int | None = None, ticks: int | None = None) -> MonitorReport:
    """Run ``guest`` with its structures watched; see the module doc.

    Give at most one of ``protect_symbols`` (see :func:`resolve_symbols`), ``policy``
    (a TOML policy file: each entry's byte range and decision) and ``targets``; with
    none, the bundled ``minikernel`` gets :data:`DEFAULT_SYMBOLS`.  ``decision``
    applies to writes to watched bytes (skip: discarded; emulate: committed and
    recorded; stop: the run ends).  ``ticks`` patches the guest's ``param_ticks``.
    """
    from ..engines import DEFAULT_RAM, choose_engine

    given = [x is not None for x in (protect_symbols, policy, targets)]
    if sum(given) > 1:
        raise MonitorError("give --protect-symbols or --policy, not both")
    try:
        dec = Decision.parse(decision)
    except ValueError:
        raise MonitorError(f"decision {decision!r}: must be skip, emulate or stop") from None
    if dec is Decision.UNPROTECT:
        raise MonitorError("decision unprotect: a watch keeps its protection; use skip, emulate or stop")
    check_run_args(engine, timeout, cpl=cpl, page_granular=page_granular, memory=memory, error=MonitorError)
    if ticks is not None and (isinstance(ticks, bool) or not isinstance(ticks, int)
                              or not 1 <= ticks <= MAX_TICKS):
        raise MonitorError(f"ticks {ticks!r}: must be an integer from 1 to {MAX_TICKS} (--ticks)")
    image = load_guest_image(guest)
    if targets is not None:
        try:
            tlist = list(targets)
        except TypeError:
            raise MonitorError(f"targets {targets!r}: must be a list of WatchTarget") from None
        for i, t in enumerate(tlist):
            if not isinstance(t, WatchTarget):
                raise MonitorError(f"targets[{i}] {t!r}: not a WatchTarget(name, start, length, decision)")
            for what, v in (("start", t.start), ("length", t.length)):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise WatchError(f"watch {t.name!r}: {what} must be an integer, got {v!r}")
            if t.start < 0 or t.length <= 0:
                raise WatchError(f"watch {t.name!r}: needs start >= 0 and length > 0 "
                                 f"(got start={t.start:#x}, length={t.length})")
            if t.decision is not None:
                _decision_arg(t.decision, f"watch {t.name!r}: decision")
    elif policy is not None:
        tlist = _targets_from_policy(policy, image)
    elif protect_symbols is not None:
        tlist = resolve_symbols(image, protect_symbols)
    elif all(n in image.symbols for n in ("idt", "syscall_table", "task0_ids")):
        tlist = resolve_symbols(image, DEFAULT_SYMBOLS)
    else:
        raise MonitorError(f"{image.where}: say what to watch: --protect-symbols SYM,... or --policy FILE")
    if not tlist:
        raise MonitorError("nothing to watch")
    ram = DEFAULT_RAM if memory is None else memory
    source = (f"--policy {os.fspath(policy)}: " if policy is not None
              else "--protect-symbols: " if protect_symbols is not None else "")
    for t in tlist:
        if t.start + t.length > ram:
            raise WatchError(f"{source}watch {t.name!r} [{t.start:#x}, {t.start + t.length:#x}) lies outside guest "
                             f"RAM [0x0, {ram:#x})")

    cls, why = choose_engine(engine)
    eng = cls(image, policy=None, ram_size=ram, cpl=int(cpl), timeout=timeout)
    t0 = time.perf_counter()
    try:
        vm = eng.vm
        if ticks is not None:
            _patch(image, vm, "param_ticks", ticks)
            if "param_post_ticks" in image.symbols:
                _patch(image, vm, "param_post_ticks", max(1, ticks // 6))
        port = _read_param(image, vm, MONITOR_PORT_SYMBOL, 2)
        stage = ["boot" if port is not None else "run"]
        log: list[dict] = []

        def chain(ev: SppViolation) -> Decision:
            log.append({"ev": ev, "stage": stage[0], "watches": [], "decision": None})
            return eng.handle_violation(ev)  # the engine records it (old bytes, instruction)

        def on_watch(wev: WatchEvent):
            log[-1]["watches"] = [w.name for w in wev.watches]
            return _strictest(w.decision for w in wev.watches)

        wm = WatchManager(vm, chain=chain, armed=port is None, page_granular=page_granular)
        # Record the run's writes once the watches are armed: the replay engine then
        # computes what page-granular protection would have cost for this very run.
        recorded: tuple[list, list, list] = ([], [], [])

        def record(gpa: int, size: int, rip) -> None:
            if wm.armed:
                recorded[0].append(gpa)
                recorded[1].append(size)
                recorded[2].append(rip if rip is not None else -1)

        eng.record_writes(record)
        watches = [wm.watch(t.start, t.length, on_watch, name=t.name, decision=t.decision or dec) for t in tlist]
        snapshot: dict[int, bytes] = {}
        if port is None:
            snapshot = {w.id: vm.read(w.start, w.length) for w in watches}
        else:
            def on_port(engine_, value):
                if value == 1 and not wm.armed:
                    wm.arm()
                    snapshot.update({w.id: vm.read(w.start, w.length) for w in watches})
                    stage[0] = STAGES[1]
                    return "pause"  # the engine must mirror the new protections before going on
                stage[0] = STAGES.get(value, f"stage-{value}")
                return None

            eng.add_port_handler(port, on_port)
        result = eng.run()  # engines mirror protection changes before running and after port handlers
        while result.stop_reason == "paused":
            result = eng.run()
    finally:
        eng.close()
    seconds = time.perf_counter() - t0

    # -- events: the Vm's violations in order, with the engine's records (same order)
    events = []
    for i, entry in enumerate(log):
        ev = entry["ev"]
        rec = eng.records[i] if i < len(eng.records) and eng.records[i].gpa == ev.gpa else None
        insn = rec.instruction if rec else None
        rip = (rec.rip_at if rec.rip_at is not None else rec.rip_after) if rec else ev.rip
        if rec is not None and rec.rip_after is not None and entry["watches"]:
            d = exact_instruction(image, vm.read, rec.rip_after)
            if d is not None:
                insn, rip = d.text, d.rip
        events.append({
            "stage": entry["stage"], "gpa": ev.gpa, "size": ev.size, "symbol": image.describe(ev.gpa),
            "watches": entry["watches"], "old": _value(rec.old if rec else None), "new": _value(ev.data.hex()),
            "decision": rec.decision if rec else None, "instruction": insn, "rip": rip,
            "subpages": list(ev.denied),
        })
    st = vm.stats(top=4096)
    viol_by_page = {d["gfn"]: d["violations"] for d in st["top_pages"]}
    writes_by_page = {d["gfn"]: d["writes"] for d in st["top_page_granular"]}
    pages = []
    for gfn in sorted({g for w in watches for g, _ in w.subpages()}):
        on = [w for w in watches if any(g == gfn for g, _ in w.subpages())]
        evs = [e for e in events if e["gpa"] >> 12 == gfn]
        protected = sorted({i for w in on for g, i in w.subpages() if g == gfn})
        pages.append({
            "gfn": gfn, "gpa": gfn << 12, "page_symbol": image.describe(gfn << 12),
            "watches": sorted({w.name for w in on}, key=lambda n: n), "protected_subpages": len(protected),
            "writes": writes_by_page.get(gfn, 0), "spp_exits": viol_by_page.get(gfn, 0),
            "watched_writes": sum(1 for e in evs if e["watches"]),
            "same_subpage_writes": sum(1 for e in evs if not e["watches"]),
        })
    wlist = []
    for w in watches:
        d = w.to_dict()
        d["intact"] = (vm.read(w.start, w.length) == snapshot[w.id]) if w.id in snapshot else None
        d["symbol"] = image.describe(w.start)
        wlist.append(d)
    replayed = _replay_recorded(vm, watches, recorded)
    verdict = None
    is_minikernel = Path(image.where).name.startswith("minikernel")
    if is_minikernel and result.stop_reason == "exit" and result.exit_code is not None:
        code = result.exit_code
        verdict = {"exit_code": code, "effects": [v for b, v in MINIKERNEL_BITS.items() if code & b],
                   "attack_blocked": not code & 7, "hot_data_intact": not code & 8}
    return MonitorReport(
        engine=eng.name, engine_reason=why, guest=image.where, cpl=int(cpl), decision=dec.value,
        page_granular=page_granular, result=result, watches=wlist, events=events, pages=pages, stats=st,
        watch_stats=wm.stats(), seconds=seconds, verdict=verdict, replay=replayed,
    )


def _replay_recorded(vm, watches, recorded) -> dict:
    """Replay the writes recorded during the run against the watched pages' access maps
    (sppkit.engines.replay): page-granular exits and SPP exits for the same run."""
    import numpy as np

    from ..engines.replay import ProtectionModel, replay_arrays

    gfns = sorted({g for w in watches for g, _ in w.subpages()})
    maps = {g: m for g in gfns if (m := vm.get_subpage_access(g, 1)[0]) != 0xFFFFFFFF}
    gpa = np.array(recorded[0], dtype=np.uint64)
    size = np.array(recorded[1], dtype=np.uint16)
    rip = np.array([r & 0xFFFF_FFFF_FFFF_FFFF for r in recorded[2]], dtype=np.uint64)
    res = replay_arrays(ProtectionModel(maps), [(gpa, size, rip)] if len(gpa) else [])
    return {"writes": res.writes, "page_granular_exits": res.page_granular_exits, "violations": res.violations}


# ====================================================================== reports
def compress_names(names: Iterable[str]) -> str:
    """``task0_ids, task1_ids, ...`` → ``task*_ids ×8``: numbered families folded."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(re.sub(r"\d+", "*", n), []).append(n)
    return ", ".join(k + (f" ×{len(v)}" if len(v) > 1 else "") if len(v) > 1 else v[0] for k, v in groups.items())


def print_monitor(rep: MonitorReport, console, *, max_rows: int = 40) -> None:
    from rich.markup import escape
    from rich.table import Table

    res = rep.result
    if res.console:
        console.rule(f"guest console ({rep.engine})")
        console.out(res.console.rstrip("\n"), highlight=False)
    console.rule(f"sppkit monitor: {len(rep.watches)} watches, decision {rep.decision}"
                 + (", page-granular" if rep.page_granular else ""))
    t = Table(title="watched structures")
    for col in ("watch", "range", "sub-pages", "writes caught", "intact"):
        t.add_column(col)
    for w in rep.watches[:max_rows]:
        intact = "—" if w["intact"] is None else ("[green]yes[/]" if w["intact"] else "[red]no[/]")
        t.add_row(escape(w["name"]), f"{w['start']:#x}+{w['length']:#x}", str(len(w["subpages"])), str(w["hits"]),
                  intact)
    console.print(t)
    if len(rep.watches) > max_rows:
        console.print(f"… {len(rep.watches) - max_rows} more watches")
    hits = rep.watched_events
    t = Table(title=f"writes to watched bytes ({len(hits)})")
    t.add_column("stage")
    t.add_column("where", no_wrap=True)
    t.add_column("old → new")
    t.add_column("decision")
    t.add_column("instruction", ratio=1)
    for e in hits[:max_rows]:
        t.add_row(e["stage"], escape(e["symbol"]), f"{e['old'] or '?'} → {e['new']}", e["decision"] or "—",
                  escape(e["instruction"] or "—"))
    console.print(t)
    if len(hits) > max_rows:
        console.print(f"… {len(hits) - max_rows} more (use --json)")
    t = Table(title="exits per monitored page (page-granular = every guest write to the page)")
    t.add_column("page", no_wrap=True)
    t.add_column("watched", ratio=1)
    for col in ("page-granular\nexits", "SPP\nexits", "on watched\nbytes", "beside\nthem"):
        t.add_column(col, justify="right")
    for p in rep.pages:
        t.add_row(f"{p['gpa']:#x}", escape(compress_names(p["watches"])), str(p["writes"]), str(p["spp_exits"]),
                  str(p["watched_writes"]), str(p["same_subpage_writes"]))
    console.print(t)
    st, ws = rep.stats, rep.watch_stats
    if rep.replay is not None:
        console.print(f"replay of the run's {rep.replay['writes']} recorded writes: page-granular protection "
                      f"would take {rep.replay['page_granular_exits']} exits, SPP {rep.replay['violations']}")
    console.print(
        f"exits: SPP {st['violations']} vs page-granular {st['page_granular']} "
        f"(avoided {st['page_granular'] - st['violations']}); {ws['notified']} writes to watched bytes, "
        f"{ws['transparent']} writes beside them in the same sub-page committed without a callback; "
        f"{ws['pushes']} SPP vector pushes; {st['spp_misses']} SPP misses; {rep.seconds:.2f} s"
    )
    console.print(f"[dim]{rep.engine} engine exits {sum(res.exits.values())}: no CPU here has SPP, so the engine "
                  "traps every write to a monitored page and the Vm decides it; the SPP column is what SPP "
                  "hardware would exit on[/]")
    code = "—" if res.exit_code is None else str(res.exit_code)
    line = f"stop: {res.stop_reason}, guest exit code {code}"
    if rep.verdict is not None:
        v = rep.verdict
        line += (" — attack blocked" if v["attack_blocked"] else " — attack succeeded: " + ", ".join(
            e for e in v["effects"] if e != "hot data disturbed"))
        line += ", hot data intact" if v["hot_data_intact"] else ", [red]hot data disturbed[/]"
    console.print(line)


# ====================================================================== CLI helpers
# Shared by the five use-case commands (monitor, device, checkpoint, restore, guard).

ENGINE_HELP = ("kvm: the real CPU (needs a usable /dev/kvm); unicorn: emulated anywhere, a denied write faults "
               "before it retires; auto: kvm when usable, else unicorn.")
CPL_HELP = "Privilege level the guest runs at; 3 runs natively under KVM on hosts where CPL 0 is emulated."
JSON_HELP = "Print one JSON object on stdout instead of tables (notes and progress go to stderr)."
MEMORY_HELP = ("Guest RAM at GPA 0: bytes, or with a K/M/G suffix; a multiple of 2 MiB from 2M to 512G, taken "
               "lazily (only the pages the guest touches use host memory).")
PROGRESS_HELP = "Show what is running on stderr while it runs (only when stderr is a terminal)."


def check_run_args(engine, timeout, *, ram_size=None, cpl=None, page_granular=None, memory=None,
                   error: type[ValueError] = ValueError) -> None:
    """``error`` (a ValueError) naming the first bad page_granular flag, memory size,
    engine name, timeout, RAM size or CPL of a run function: checked before a guest is
    built, an engine made or a file written."""
    from ..engines import ENGINES
    from ..engines.base import check_ram_size

    if page_granular is not None and not isinstance(page_granular, bool):
        raise error(f"page_granular={page_granular!r}: must be True or False")
    if memory is not None:
        try:
            check_ram_size(memory)
        except ValueError as e:
            raise error(f"memory: {e}") from None
    try:
        if engine not in ("auto", *ENGINES):
            raise ValueError(f"engine {engine!r}: must be kvm, unicorn or auto")
        check_timeout(timeout)
        if ram_size is not None:
            check_ram_size(ram_size)
        if cpl is not None and (isinstance(cpl, bool) or not isinstance(cpl, int) or cpl not in (0, 3)):
            raise ValueError(f"cpl={cpl!r}: must be 0 or 3")
    except ValueError as e:
        if error is ValueError:
            raise
        raise error(str(e)) from None


def timeout_option(ctx, param, value):
    """click callback: a --timeout the engines take (check_timeout: seconds, finite,
    from 0 (no limit) to MAX_TIMEOUT), else a usage error naming the option."""
    if value is None:
        return value
    try:
        return check_timeout(value)
    except ValueError as e:
        raise click.BadParameter(str(e).removeprefix("timeout ")) from None


def memory_option(ctx, param, value) -> int:
    """click callback: a --memory size (K/M/G suffixes) both engines take, in bytes."""
    from ..engines.base import check_ram_size, parse_size

    try:
        return check_ram_size(parse_size(value))
    except ValueError as e:
        raise click.BadParameter(f"{value!r}: {str(e).partition(': ')[2] or e}") from None


def engine_option(f):
    return click.option("--engine", type=click.Choice(["auto", "kvm", "unicorn"]), default="auto",
                        show_default=True, help=ENGINE_HELP)(f)


def cpl_option(f):
    return click.option("--cpl", type=click.Choice(["0", "3"]), default="3", show_default=True, help=CPL_HELP)(f)


def progress_option(f):
    return click.option("--progress/--no-progress", default=True, show_default=True, help=PROGRESS_HELP)(f)


def stderr_is_terminal() -> bool:
    import sys

    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False


class Progress:
    """One transient status line on stderr (a spinner, a text and the seconds elapsed),
    shown only when ``enabled`` and stderr is a terminal; otherwise every call does
    nothing.  A context manager: the line disappears at the end."""

    def __init__(self, text: str, enabled: bool = True) -> None:
        self._live = None
        self._shown = float("-inf")  # time.monotonic() of the last immediate refresh
        if enabled and stderr_is_terminal():
            from rich.console import Console
            from rich.live import Live
            from rich.spinner import Spinner
            from rich.text import Text

            started = time.monotonic()

            class _Elapsed(Spinner):  # the text, then the seconds so far, at every refresh
                status = ""

                def render(self, t: float):
                    self.text = Text.from_markup(self.status) + Text(f"  {time.monotonic() - started:.0f} s", "dim")
                    return super().render(t)

            self._spinner = _Elapsed("dots")
            self._spinner.status = text
            self._live = Live(self._spinner, console=Console(stderr=True, force_terminal=True), transient=True,
                              refresh_per_second=8)

    def __enter__(self) -> "Progress":
        if self._live is not None:
            self._live.start(refresh=True)
        return self

    def update(self, text: str) -> None:
        """Show ``text``: at once the first time and then at most every 0.1 s (the
        spinner's own refresh picks up the rest), so frequent updates cost little."""
        if self._live is not None:
            self._spinner.status = text
            now = time.monotonic()
            if now - self._shown >= 0.1:
                self._shown = now
                self._live.refresh()

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.stop()


# ====================================================================== CLI
@click.command("monitor", short_help="Guest OS monitoring: watch kernel structures at 128-byte granularity.")
@click.argument("guest", default=DEFAULT_GUEST)
@click.option("--protect-symbols", metavar="SYM[,SYM...]",
              help="Watch these ELF symbols of the guest, comma-separated: a name, a glob over object symbols "
                   "(task*_ids), or SYM+OFFSET:LENGTH for part of one (syscall_table+0x138:8).  "
                   f"[default for minikernel: {DEFAULT_SYMBOLS}]")
@click.option("--policy", "policy_file", metavar="FILE", type=click.Path(exists=True, dir_okay=False),
              help="TOML policy whose [[protect]] byte ranges (and decisions) become watches, instead of "
                   "--protect-symbols; see examples/mixed.toml.")
@engine_option
@click.option("--decision", type=click.Choice(["skip", "emulate", "stop"]), default=None,
              help="For writes to --protect-symbols bytes: skip = discard (the structure stays intact), emulate = "
                   "commit and record, stop = end the run.  Writes beside them in the same sub-page are always "
                   "committed.  [default: skip; a --policy file states its own decisions]")
@cpl_option
@click.option("--page-granular", is_flag=True,
              help="Protect watched pages whole (the baseline SPP improves on): every write to them exits.")
@click.option("--ticks", type=click.IntRange(1, MAX_TICKS), default=None,
              help=f"Workload length, 1 to {MAX_TICKS:,}: patches the guest's param_ticks (and param_post_ticks "
                   "to a sixth of it).  [default: the guest's own; minikernel: 3000]")
@click.option("--timeout", metavar="SECONDS", type=float, default=60.0, show_default=True, callback=timeout_option,
              help=f"Seconds before the guest is stopped (exit status 1), from 0 to {MAX_TIMEOUT}; 0: no limit.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@progress_option
def monitor_command(guest, protect_symbols, policy_file, engine, decision, cpl, page_granular, ticks, timeout,
                    as_json, progress):
    """Run GUEST (default: the bundled minikernel, whose second stage is a rootkit)
    with kernel structures write-protected at 128-byte granularity, and report every
    write to them: symbol+offset, old and new value, instruction.  Hot data sharing
    the pages is never disturbed; exits are compared with page-granular protection.

    GUEST is a bundled program (minikernel, or another: a name that is neither lists
    them), a .c file (built with gcc) or an x86-64 ELF.  A guest other than minikernel
    needs --protect-symbols or --policy.

    Exit status: the guest's exit code (minikernel: 0 = attack blocked, hot data
    intact; bits 1/2/4 = syscall/creds/IDT changed, 8 = hot data disturbed), 1 when the
    run ends otherwise (stop decision, fault, timeout), 2 on bad input.

    \b
    Examples:
      sppkit monitor                                   # minikernel and its rootkit
      sppkit monitor --protect-symbols 'syscall_table+0x138:8,idt' --decision stop
      sppkit monitor mixed --policy examples/mixed.toml --engine unicorn --json
    """
    from ..report import emit_report

    if protect_symbols is not None and policy_file is not None:
        raise click.UsageError("give --protect-symbols or --policy, not both")
    if decision is not None and policy_file is not None:
        raise click.UsageError("--decision applies to --protect-symbols (a --policy file states its own decisions)")
    decision = decision or "skip"
    with Progress(f"monitor: running {guest} ({engine} engine)…", progress):
        rep = run_monitor(guest, protect_symbols=protect_symbols, policy=policy_file, engine=engine,
                          decision=decision, cpl=int(cpl), page_granular=page_granular, timeout=timeout, ticks=ticks)
    emit_report(rep, as_json, print_monitor)


# ====================================================================== demo
def demo_monitor(console, engine: str = "auto") -> MonitorReport | None:
    """`sppkit demo` part: the minikernel and its rootkit, watched at 128 bytes."""
    from ..guests import toolchain_status

    ok, why = toolchain_status()
    if not ok:
        console.print(f"[yellow]monitor demo skipped: {why}[/]")
        return None
    console.rule("[bold]guest OS monitoring: a rootkit against SPP write hooks")
    rep = run_monitor(DEFAULT_GUEST, engine=engine, decision="skip", ticks=1500)
    console.print(f"[dim]engine: {rep.engine_reason}[/]")
    lines = [ln for ln in rep.result.console.splitlines() if ln.startswith(("rootkit:", "minikernel: getuid",
                                                                            "minikernel: task 3", "minikernel: idt",
                                                                            "minikernel: hot", "minikernel: verdict"))]
    console.out("\n".join(lines), highlight=False)
    st, ws = rep.stats, rep.watch_stats
    hits = rep.watched_events
    targets = ", ".join(sorted({e["symbol"].split("+")[0] for e in hits}))
    console.print(
        f"{len(hits)} rootkit writes caught and discarded ({targets}); "
        f"{sum(1 for w in rep.watches if w['intact'])}/{len(rep.watches)} watched structures intact; "
        f"exits: SPP {st['violations']} (of which {ws['transparent']} refcount writes beside the creds, committed) "
        f"vs page-granular {st['page_granular']}; {ws['pushes']} SPP vector pushes"
    )
    return rep
