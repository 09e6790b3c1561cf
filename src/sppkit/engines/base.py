"""What the KVM and Unicorn engines share: a Vm with guest RAM, the guest image and
its long-mode set-up, the policy turned into access maps, decisions and records.

An engine never decides a permission: it hands every write to ``vm.write`` and acts
on the :class:`~sppkit.vmm.WriteResult`.
"""

from __future__ import annotations

import math
import mmap
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..vmm import Decision, SppViolation, Vm
from .result import RunResult, ViolationRecord
from .x86 import LongModeLayout, plan_long_mode

if TYPE_CHECKING:  # pragma: no cover
    from ..guests.elf import GuestImage
    from ..policy import Policy

DEFAULT_RAM = 64 << 20
RAM_SLOT = 0


class EngineError(RuntimeError):
    """The guest cannot go on (an instruction the engine cannot run on a protected
    page, a triple fault, a timeout...).  The message names the instruction and GPA."""


def parse_size(text: str | int) -> int:
    """'64M', '1G', '65536', 0x... → bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"memory size {text!r}: must be positive")
        return text
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "KMG" else t
    try:
        value = int(num, 0) * mult
    except ValueError:
        raise ValueError(f"memory size {text!r}: expected a number with an optional K/M/G suffix, e.g. 64M") from None
    if value <= 0:
        raise ValueError(f"memory size {text!r}: must be positive")
    return value


#: The registers both engines' ``regs()``/``set_regs()`` use (and a checkpoint holds).
REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")

#: RFLAGS bits a 64-bit guest cannot have set: the reserved bits (3, 5, 15, 22-63) and
#: VM (17, virtual-8086 mode).  Bit 1 is always 1: both engines set it.
RFLAGS_RESERVED = ((1 << 64) - (1 << 22)) | (1 << 17) | (1 << 15) | (1 << 5) | (1 << 3)


def check_regs(regs: object) -> dict[str, int]:
    """``regs`` (register name -> value, as ``regs()`` returns them) if every name is one
    of :data:`REGISTERS` and every value a 64-bit unsigned integer (RFLAGS without
    reserved bits); else TypeError/ValueError naming the first bad entry.  Checked
    whole before an engine loads any of them."""
    if not isinstance(regs, Mapping):
        raise TypeError(f"registers {regs!r:.80}: must be a dict of register name -> value, e.g. {{'rax': 1}}")
    out: dict[str, int] = {}
    for n, v in regs.items():
        if n not in REGISTERS:
            raise ValueError(f"register {n!r}: must be one of {', '.join(REGISTERS)}")
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 64:
            raise ValueError(f"register {n}={v!r:.40}: must be an integer from 0 to 2**64-1")
        if n == "rflags" and v & RFLAGS_RESERVED:
            raise ValueError(f"rflags={v:#x}: bits {v & RFLAGS_RESERVED:#x} are reserved in a 64-bit guest "
                             f"(must be 0: bits 3, 5, 15, 17 (VM) and 22-63)")
        out[n] = int(v)
    return out


def check_port(port: object) -> int:
    """``port`` if it is an I/O port a handler may take: 0..0xFFFF but not the console
    (0xE9) or exit (0xF4) port."""
    if not isinstance(port, int) or isinstance(port, bool):
        raise TypeError(f"port {port!r:.40}: must be an integer I/O port 0..0xFFFF")
    if port in (0xE9, 0xF4) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port:#x}: must be 0..0xFFFF and not 0xE9/0xF4 (console/exit)")
    return port


SPP_MODES = ("lazy", "eager")


def check_engine_args(image: object, policy: object, ram_size: object, cpl: object, spp_mode: object) -> None:
    """The constructor arguments both engines take, checked before anything is built:
    TypeError/ValueError naming the first bad one."""
    from ..guests.elf import GuestImage, Segment
    from ..policy import Policy
    from .x86 import segments_for

    if not isinstance(image, GuestImage):
        raise TypeError(f"image {image!r:.60}: must be a sppkit.guests.GuestImage "
                        "(load one with sppkit.guests.load_elf or flat_image)")
    segs = image.segments
    if not isinstance(segs, (list, tuple)) or not segs:
        raise ValueError(f"{image.where}: the image has no segments: nothing to run")
    for seg in segs:
        if not isinstance(seg, Segment):
            raise TypeError(f"{image.where}: segment {seg!r:.60}: must be a sppkit.guests.Segment")
        if not isinstance(seg.gpa, int) or isinstance(seg.gpa, bool) or seg.gpa < 0:
            raise ValueError(f"{image.where}: segment gpa={seg.gpa!r:.40}: must be a non-negative integer")
        if not isinstance(seg.memsz, int) or isinstance(seg.memsz, bool) \
                or not isinstance(seg.data, (bytes, bytearray)) or not len(seg.data) <= seg.memsz:
            raise ValueError(f"{image.where}: segment at {seg.gpa:#x}: data must be bytes and memsz "
                             f"({seg.memsz!r:.40}) an integer at least its length")
    entry = image.entry
    if not isinstance(entry, int) or isinstance(entry, bool) or not 0 <= entry < 1 << 64:
        raise ValueError(f"{image.where}: entry point {entry!r:.40}: must be an address from 0 to 2**64-1")
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(f"policy {policy!r:.60}: must be a sppkit.policy.Policy or None "
                        "(load one with sppkit.policy.load_policy or Policy.from_ranges)")
    check_ram_size(ram_size)
    segments_for(cpl)  # type: ignore[arg-type]  # (checks cpl: 0 or 3)
    if not isinstance(spp_mode, str) or spp_mode not in SPP_MODES:
        raise ValueError(f"spp_mode={spp_mode!r:.40}: must be 'lazy' or 'eager'")


#: The largest guest RAM: the engines identity-map it with one page-directory-pointer
#: table of 2-MiB pages (512 GiB).
MAX_RAM = 512 << 30


def check_ram_size(ram_size: object) -> int:
    """``ram_size`` if it is a RAM size both engines take, else ValueError naming it."""
    if not isinstance(ram_size, int) or isinstance(ram_size, bool):
        raise ValueError(f"RAM size {ram_size!r}: must be an integer number of bytes")
    if ram_size % (2 << 20) or not (2 << 20) <= ram_size <= MAX_RAM:
        raise ValueError(f"RAM size {ram_size:#x}: must be a multiple of 2 MiB from 2 MiB to 512 GiB")
    return ram_size


#: The longest run timeout (seconds): a year.  Longer waits overflow the engines' timers
#: (setitimer's time_t, threading's TIMEOUT_MAX); 0 means no limit.
MAX_TIMEOUT = 365 * 24 * 3600


def check_timeout(timeout: object) -> float:
    """``timeout`` (seconds; 0 = no limit) if it is a number from 0 to MAX_TIMEOUT."""
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not math.isfinite(timeout) \
            or not 0 <= timeout <= MAX_TIMEOUT:
        raise ValueError(f"timeout {timeout!r}: must be a finite number of seconds from 0 to {MAX_TIMEOUT} "
                         "(a year; 0: no limit)")
    return float(timeout)


#: mmap's MAP_NORESERVE (Python 3.11's mmap module lacks the name; 0x4000 on Linux)
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)


def allocate_ram(ram_size: int, flags: int | None = None) -> mmap.mmap:
    """An anonymous mapping of ``ram_size`` bytes for guest RAM (``flags``: the mmap
    flags, default MAP_SHARED | MAP_ANONYMOUS), taken lazily where the host can
    (MAP_NORESERVE: only the pages the guest touches take host memory, so a large,
    sparsely used guest RAM fits a small host, as with a VM's); EngineError naming the
    size when the host refuses it."""
    try:
        if not hasattr(mmap, "MAP_ANONYMOUS"):  # (Windows: no mmap flags)
            return mmap.mmap(-1, ram_size)
        if flags is None:
            flags = mmap.MAP_SHARED | mmap.MAP_ANONYMOUS
        return mmap.mmap(-1, ram_size, flags=flags | MAP_NORESERVE)
    except (OSError, OverflowError, ValueError) as e:
        raise EngineError(f"cannot allocate {ram_size >> 20:,} MiB of guest RAM: "
                          f"{getattr(e, 'strerror', None) or e}") from None


@dataclass
class GuestSetup:
    ram_size: int
    cpl: int
    layout: LongModeLayout


class EngineBase:
    """Builds the Vm and the guest; subclasses run it."""

    name = "base"

    def __init__(
        self,
        image: "GuestImage",
        *,
        policy: "Policy | None" = None,
        ram_size: int = DEFAULT_RAM,
        cpl: int = 3,
        spp_mode: str = "lazy",
        backing=None,
    ) -> None:
        check_engine_args(image, policy, ram_size, cpl, spp_mode)
        self.image = image
        self.policy = policy
        self.vm = Vm()
        self.ram_size = ram_size
        self.cpl = cpl
        occupied = []
        for seg in image.segments:
            if seg.gpa + seg.memsz > ram_size:
                raise ValueError(
                    f"{image.where}: segment at {seg.gpa:#x}+{seg.memsz:#x} lies beyond guest RAM "
                    f"({ram_size >> 20} MiB); use a larger memory size"
                )
            occupied.append((seg.gpa & ~0xFFF, (seg.gpa + seg.memsz + 0xFFF) & ~0xFFF))
        self.layout = plan_long_mode(ram_size, image.entry, occupied, cpl=cpl)
        self.vm.add_memslot(RAM_SLOT, 0, ram_size, backing=backing)
        for seg in image.segments:
            self.vm.load(seg.gpa, seg.data)
        self.vm.load(self.layout.pml4, self.layout.tables)
        self.vm.enable_spp(mode=spp_mode)
        if policy is not None:
            self.apply_policy(policy)
        self.vm.on_violation(self._on_violation)
        self.console = bytearray()
        self.records: list[ViolationRecord] = []
        self.exit_code: int | None = None
        self._pending: list[tuple[SppViolation, bytes]] = []
        self._port_handlers: dict = {}
        self._insn_cache: dict = {}
        self._insn_at: dict = {}
        self._sym_cache: dict = {}
        self._pause = False
        self._closed = False
        self._run_lock = threading.Lock()  # held while run() runs (see _begin_run)
        self._run_thread: int | None = None

    # -- extension points used by the usecases ------------------------------------------
    def add_port_handler(self, port: int, handler) -> None:
        """Call ``handler(engine, value)`` on every guest ``out`` to ``port`` (other than the
        console 0xE9 and exit 0xF4 ports).  If it returns ``"pause"`` the run pauses
        after the instruction (see :meth:`request_pause`); any other string is an error
        raised from :meth:`run` (a misspelt request), other values are ignored.
        ``handler=None`` removes the port's handler."""
        self._check_open("add_port_handler()")
        check_port(port)
        if handler is None:
            self._port_handlers.pop(port, None)
            return
        if not callable(handler):
            raise TypeError(f"port {port:#x} handler {handler!r:.60}: must be a callable (engine, value) -> "
                            "'pause' | None, or None to remove the handler")
        self._port_handlers[port] = handler

    def _port_out(self, port: int, value: int) -> bool:
        """Dispatch an OUT to a registered handler; True if the run should pause."""
        h = self._port_handlers.get(port)
        if h is not None:
            r = h(self, value)
            if r == "pause":
                self._pause = True
            elif isinstance(r, str):
                raise ValueError(f"the handler of port {port:#x} returned {r!r:.40}: it must return 'pause' "
                                 "(pause the run) or None")
        return self._pause

    #: whether :meth:`record_writes` sees every guest write (False: only writes to
    #: pages holding a protected sub-page, the ones that reach the VMM)
    records_every_write = False

    def record_writes(self, callback) -> None:
        """Call ``callback(gpa, size, rip)`` for guest writes, e.g. to record a trace
        (None: stop recording; a later call replaces the callback).  This base version
        sees the writes the engine hands to ``vm.write``; an exception the callback
        raises is re-raised from :meth:`run` and the write it was told of is not made."""
        self._check_open("record_writes()")
        if callback is not None and not callable(callback):
            raise TypeError(f"record_writes callback {callback!r:.60}: must be a callable (gpa, size, rip) -> None, "
                            "or None")
        self.vm.on_write(callback)

    def request_pause(self) -> None:
        """Ask the running guest to stop at the next instruction boundary the engine can
        reach (KVM: once the current exit is handled; Unicorn: right after the current
        instruction where it can stop there, else at the next store to a protected
        page, port I/O or newly translated block, see docs/modelling.md) — from a callback of :meth:`run` (a port handler, the violation
        handler, a write observer), or from another thread: KVM then interrupts the
        guest where it runs (it kicks the vCPU thread out of KVM_RUN); Unicorn pauses at
        its next callback (a store to a protected page, port I/O), because Unicorn
        stopped from another thread leaves the guest in the middle of a translated
        block.  :meth:`run` then returns ``stop_reason == "paused"`` and a later
        :meth:`run` continues from there.  EngineError when no run is in progress (a
        request that would otherwise be dropped)."""
        self._check_open("request_pause()")
        if self._run_thread is None:
            raise EngineError("request_pause(): no run is in progress; call it from a port handler, the violation "
                              "handler or a write observer while run() runs (or return 'pause' from a port handler)")
        self._pause = True
        if threading.get_ident() != self._run_thread:
            self._interrupt()

    def _interrupt(self) -> None:
        """request_pause() from a thread other than the one in run(): make the running
        guest reach the engine's loop, which sees ``_pause``.  This base version does
        nothing (the pause lands at the engine's next callback)."""

    def run(self) -> RunResult:
        """Run (or, after a pause, continue) the guest until it exits, halts, faults,
        stops on a decision, pauses or times out.  An exception raised by a callback
        (port handler, violation handler, write observer) is re-raised here; the write
        it was deciding is not made, and a later run() goes on from where the guest
        stopped — under Unicorn at that store, which is then decided again; under KVM
        after its instruction, which had retired (the write is lost, as a SKIP would
        lose it).  EngineError once the guest has exited, once the engine is closed,
        and when called while this engine is already running (from one of its callbacks
        or another thread)."""
        self._begin_run()
        try:
            return self._run()
        except BaseException:
            self._pending.clear()  # violations of a write that was not made: no record
            raise
        finally:
            self._pause = False  # a request that did not land before the run ended
            self._run_thread = None
            self._run_lock.release()

    def _run(self) -> RunResult:  # pragma: no cover - engines override
        raise NotImplementedError

    def _begin_run(self) -> None:
        self._check_open("run()")
        if not self._run_lock.acquire(blocking=False):
            raise EngineError("run(): this engine is already running (run() was called from one of its callbacks "
                              "or from another thread); return from the callback instead — a port handler can "
                              "return 'pause' to stop the run")
        try:
            self._check_open("run()")  # (closed by another thread meanwhile)
            if self.exit_code is not None:
                raise EngineError(f"run(): the guest has already exited (exit code {self.exit_code}); "
                                  "construct a new engine to run it again")
        except BaseException:
            self._run_lock.release()
            raise
        self._pause = False  # (before the run is visible to request_pause() from another thread)
        self._run_thread = threading.get_ident()

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise EngineError(f"{what}: this {self.name} engine is closed")

    def close(self) -> None:
        """Release the engine's resources (the emulator or KVM VM); the Vm, and so guest
        memory, stays readable.  Idempotent; EngineError while the engine is running
        (from one of its callbacks or another thread: close it after run() returns)."""
        if self._closed:
            return
        if not self._run_lock.acquire(blocking=False):  # (never under a running emulator or vCPU)
            raise EngineError("close(): the engine is running (close() was called from one of its callbacks or from "
                              "another thread); close it after run() returns")
        try:
            if not self._closed:
                self._closed = True
                self._release()
        finally:
            self._run_lock.release()

    def _release(self) -> None:  # pragma: no cover - engines override
        raise NotImplementedError

    def regs(self) -> dict[str, int]:
        """General-purpose registers, RIP and RFLAGS (between runs or in a callback)."""
        self._check_open("regs()")
        return self._get_regs()

    def set_regs(self, regs: dict[str, int]) -> None:
        """Load registers (names as :meth:`regs`; missing ones keep their value).  Every
        name and value is checked before any register changes (see :func:`check_regs`)."""
        self._check_open("set_regs()")
        self._set_regs(check_regs(regs))

    def _get_regs(self) -> dict[str, int]:  # pragma: no cover - engines override
        raise NotImplementedError

    def _set_regs(self, regs: dict[str, int]) -> None:  # pragma: no cover - engines override
        raise NotImplementedError

    def code_at(self, rip: int) -> bytes:
        """Up to 15 bytes of guest memory from ``rip`` for decoding: fewer near the end of
        guest RAM, none outside it."""
        if not isinstance(rip, int) or isinstance(rip, bool) or not 0 <= rip < self.ram_size:
            return b""
        return self.vm.read(rip, min(15, self.ram_size - rip))

    # -- policy -------------------------------------------------------------------
    def apply_policy(self, policy: "Policy") -> None:
        maps = policy.access_maps()
        for gfn in sorted(maps):
            if (gfn << 12) >= self.ram_size:
                raise ValueError(f"policy protects gpa {gfn << 12:#x}, beyond guest RAM ({self.ram_size >> 20} MiB)")
        gfns = sorted(maps)
        i = 0
        while i < len(gfns):  # contiguous batches of at most 512 pages
            j = i
            while j + 1 < len(gfns) and gfns[j + 1] == gfns[j] + 1 and j + 1 - i < 512:
                j += 1
            self.vm.set_subpage_access(gfns[i], [maps[g] for g in gfns[i : j + 1]])
            i = j + 1

    def handle_violation(self, ev: SppViolation) -> Decision:
        """The engine's own violation handler (installed with ``vm.on_violation`` at
        construction): it queues the event for a violation record and returns the
        policy's decision.  A use case that installs its own handler calls this one for
        the violations it wants recorded."""
        return self._on_violation(ev)

    def _on_violation(self, ev: SppViolation) -> Decision:
        self._pending.append((ev, self.vm.read(ev.gpa, ev.size)))  # the bytes before the write
        if self.policy is None:
            return Decision.SKIP
        # The decision belongs to the protected sub-page the write hit, which need not
        # hold the write's first byte (a store running into a protected sub-page).
        page = ev.gpa & ~0xFFF
        for sub in ev.denied:
            d = self.policy.decision_at(page | (sub << 7))
            if d is not None:
                return Decision.parse(d)
        return Decision.parse(self.policy.default_decision)

    # -- records -----------------------------------------------------------------------
    def instruction_before(self, rip_after: int, gpa: int, size: int, regs: dict[str, int] | None):
        """The instruction that wrote ``gpa`` and retired with RIP = ``rip_after``: decoded
        forward from the start of the ELF function containing it when the image has one
        (exact), else recovered by :func:`~sppkit.engines.x86.find_writer`."""
        from .x86 import decode_forward, find_writer

        d = self._insn_cache.get(rip_after)
        if d is not None:
            return d
        try:
            hit = self.image.symbol_at(rip_after - 1)
        except Exception:
            hit = None
        if hit is not None and hit[0].kind == "func" and hit[0].size:
            d = decode_forward(self.vm.read, hit[0].addr, rip_after)
            if d is not None:
                self._insn_cache[rip_after] = d  # (the Unicorn engine forgets it when guest code is written)
                return d
        return find_writer(self.vm.read, rip_after, gpa, size, regs or {})

    def instruction_at(self, rip: int):
        """The instruction at guest-physical ``rip`` (decoded once per address), or None
        where the bytes do not decode.  ValueError for an address outside guest RAM."""
        from .x86 import decode

        d = self._insn_at.get(rip)
        if d is None:
            if not isinstance(rip, int) or isinstance(rip, bool) or not 0 <= rip < self.ram_size:
                raise ValueError(f"rip={rip!r:.40}: must be a guest-physical address in guest RAM "
                                 f"(0 to {self.ram_size - 1:#x})")
            d = self._insn_at[rip] = decode(self.code_at(rip), rip, None)
        return d

    def symbolize(self, gpa: int) -> str | None:
        if gpa in self._sym_cache:
            return self._sym_cache[gpa]
        self._sym_cache[gpa] = name = self._symbolize(gpa)
        return name

    def _symbolize(self, gpa: int) -> str | None:
        try:
            hit = self.image.symbol_at(gpa)
        except Exception:
            return None
        if not hit:
            return None
        sym, off = hit
        return f"{sym.name}+{off:#x}" if off else sym.name

    def record(self, ev: SppViolation, decision: Decision, *, old: bytes | None = None, rip_at=None,
               rip_after=None, instruction=None) -> None:
        self.records.append(
            ViolationRecord(
                gpa=ev.gpa, size=ev.size, subpages=ev.subpages, denied=ev.denied, decision=decision.value,
                data=ev.data.hex(), rip_at=rip_at, rip_after=rip_after, instruction=instruction,
                symbol=self.symbolize(ev.gpa), old=old.hex() if old is not None else None,
            )
        )

    def result(self, stop_reason: str, *, rip_at=None, rip_after=None, exits=None, detail: str = "") -> RunResult:
        return RunResult(detail=detail,
            engine=self.name, exit_code=self.exit_code, console=self.console.decode("utf-8", "replace"),
            stats=self.vm.stats(), violations=list(self.records), stop_reason=stop_reason,
            rip_at=rip_at, rip_after=rip_after, exits=dict(exits or {}),
        )
