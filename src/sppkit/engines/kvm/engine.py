"""The KVM engine: real x86-64 guests on the real CPU, sub-page protection decided by the model.

No CPU we have exposes SPP, so the engine does in the VMM what the hardware would:
the Vm's EPT is projected onto KVM memslots — every page whose EPT leaf has W = 0
(a page holding a protected sub-page) lives in a read-only memslot, so every guest
write to it reaches Python as an MMIO exit and goes through ``vm.write``, the one
write path of every engine.  Committed bytes land in the memslot's backing memory,
which the guest sees at once.  Everything else runs at the speed of the CPU.

Semantics (README, "KVM engine"): the writing instruction has retired when the VMM
decides.  SKIP discards the write with RIP already past the instruction; STOP ends the
run there; RIP-after is recorded and the instruction recovered with iced-x86.  A
page-crossing store arrives as one exit per page and is decided per page.
"""

from __future__ import annotations

import mmap
import os
import signal
import threading
from collections import Counter

from ...vmm import GpaNotMapped
from ..base import REGISTERS, DEFAULT_RAM, EngineBase, EngineError, allocate_ram, check_engine_args, check_timeout
from ..result import RunResult
from ..x86 import CR0, CR4, EFER, PORT_CONSOLE, PORT_EXIT, decode, segments_for
from .binding import (
    CAP_NR_MEMSLOTS,
    CAP_READONLY_MEM,
    CAP_SYNC_REGS,
    MEM_READONLY,
    SYNC_X86_REGS,
    Debug,
    ExceptionExit,
    FailEntry,
    Hlt,
    InternalError,
    Intr,
    Io,
    Kvm,
    KvmUnavailable,
    Mmio,
    Shutdown,
    buffer_address,
    kvm_status,
)

TSS_ADDR = 0xFFFBD000
_REG_NAMES = REGISTERS
_UNEMULATABLE_HINT = (
    "KVM's instruction emulator cannot perform this store on a write-protected page "
    "(AVX/SSE-arithmetic, x87 stores, cmpxchg16b, fxsave/xsave are not emulated); "
    "build the guest with -mgeneral-regs-only, keep such stores off protected pages, "
    "or use --engine unicorn"
)


#: the signal that kicks the vCPU thread out of KVM_RUN (the timeout, request_pause()
#: from another thread): blocked in that thread during a run, let through by KVM_RUN's
#: signal mask, consumed by VcpuFd.run when KVM_RUN returns EINTR; its default action is
#: to be ignored, so a stray one is harmless
_KICK = signal.SIGURG


class KvmEngine(EngineBase):
    """Run a guest image under Linux KVM with the Vm deciding every write to a
    write-protected page.  ``timeout`` (seconds) ends a guest that never exits."""

    name = "kvm"

    def __init__(self, image, *, policy=None, ram_size: int = DEFAULT_RAM, cpl: int = 3,
                 timeout: float = 60.0, spp_mode: str = "lazy", path: str = "/dev/kvm") -> None:
        check_engine_args(image, policy, ram_size, cpl, spp_mode)
        self.timeout = check_timeout(timeout)
        if not isinstance(path, (str, bytes, os.PathLike)):
            raise TypeError(f"path {path!r:.60}: must be the path of the KVM device (a str, bytes or os.PathLike), "
                            "e.g. /dev/kvm")
        ok, why = kvm_status(path)
        if not ok:
            raise KvmUnavailable(why)
        self._ram = allocate_ram(ram_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        super().__init__(image, policy=policy, ram_size=ram_size, cpl=cpl, spp_mode=spp_mode, backing=self._ram)
        self.kvm = Kvm(path)
        self.kvm.require(CAP_READONLY_MEM, CAP_SYNC_REGS)
        self.max_memslots = self.kvm.check_extension(CAP_NR_MEMSLOTS) or 32
        self.vmfd = self.kvm.create_vm()
        self.vmfd.set_tss_addr(TSS_ADDR)
        self._host = buffer_address(self._ram)
        self._kslots: dict[tuple[int, int, bool], int] = {}
        self._free_ids: list[int] = []
        self._next_id = 0
        self.projections = 0
        self._project()
        self.vcpu = self.vmfd.create_vcpu(0)
        try:
            self.vcpu.set_cpuid2(self.kvm.get_supported_cpuid())
        except Exception:  # pragma: no cover - the guest runs without a CPUID table too
            pass
        self._setup_cpu()
        self.vcpu.enable_sync_regs(SYNC_X86_REGS)
        self._decoded: dict[tuple[int, int], object] = {}
        # The timeout and request_pause() from another thread kick the vCPU thread out
        # of KVM_RUN with _KICK (see _run); the lock orders a kick against the run's end
        self._kick_lock = threading.RLock()  # (re-entered when a signal handler asks for a pause inside _kick)
        self._kick_thread: int | None = None  # the thread in run(), while it blocks _KICK

    # -- EPT -> memslots --------------------------------------------------------------
    def _project(self) -> None:
        """Mirror the Vm's EPT onto KVM memslots: W = 0 runs become read-only slots."""
        want = {(g, n, w) for g, n, w in self.vm.write_protected(0, self.ram_size)}
        have = set(self._kslots)
        if len(want) > self.max_memslots:
            raise EngineError(
                f"the protections need {len(want)} KVM memslots, more than this host's "
                f"KVM_CAP_NR_MEMSLOTS ({self.max_memslots}); protect fewer, more clustered pages"
            )
        for key in have - want:  # delete first: KVM refuses overlapping slots
            sid = self._kslots.pop(key)
            self.vmfd.delete_memory_region(sid)
            self._free_ids.append(sid)
        for key in sorted(want - have):
            gpa, size, writable = key
            sid = self._free_ids.pop() if self._free_ids else self._alloc_id()
            self.vmfd.set_user_memory_region(sid, gpa, size, self._host + gpa, 0 if writable else MEM_READONLY)
            self._kslots[key] = sid
        self._generation = self.vm.ept_generation
        self.projections += 1

    def _alloc_id(self) -> int:
        sid = self._next_id
        self._next_id += 1
        return sid

    @property
    def kvm_memslots(self) -> list[tuple[int, int, bool]]:
        """The current projection: ``(gpa, size, writable)`` per KVM memslot."""
        return sorted(self._kslots)

    # -- vCPU state ---------------------------------------------------------------------
    def _setup_cpu(self) -> None:
        code, data = segments_for(self.cpl)
        sregs = self.vcpu.get_sregs()
        for name, seg in (("cs", code), ("ds", data), ("es", data), ("fs", data), ("gs", data), ("ss", data)):
            s = getattr(sregs, name)
            for k, v in seg.fields.items():
                setattr(s, k, v)
        sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = CR0, self.layout.pml4, CR4, EFER
        self.vcpu.set_sregs(sregs)
        regs = self.vcpu.get_regs()
        for name in _REG_NAMES:
            setattr(regs, name, 0)
        regs.rip, regs.rsp, regs.rflags = self.layout.entry, self.layout.rsp, self.layout.rflags
        self.vcpu.set_regs(regs)

    def _regs(self) -> dict[str, int]:
        r = self.vcpu.sync_regs()
        return {n: getattr(r, n) for n in _REG_NAMES}

    def _get_regs(self) -> dict[str, int]:
        r = self.vcpu.get_regs()
        return {n: getattr(r, n) for n in _REG_NAMES}

    def _set_regs(self, regs: dict[str, int]) -> None:
        r = self.vcpu.get_regs()
        for n, v in regs.items():  # (checked by set_regs: all or nothing)
            setattr(r, n, v)
        self.vcpu.set_regs(r)

    def _read_guest(self, gpa: int, n: int) -> bytes:
        return self.vm.read(gpa, n)

    # -- the run loop -----------------------------------------------------------------------
    def _run(self) -> RunResult:
        exits: Counter = Counter()
        vcpu = self.vcpu
        self._timed_out = False
        # The timeout and request_pause() from another thread kick this thread out of
        # KVM_RUN with _KICK, which the thread blocks while the run lasts and KVM_RUN
        # lets through (KVM_SET_SIGNAL_MASK): no signal handler, so any thread can run.
        old_mask = None
        timer = None
        try:
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {_KICK})
            vcpu.set_signal_mask(old_mask - {_KICK})
            vcpu.kick_signals = frozenset({_KICK})
            vcpu.immediate_exit = False  # (a timer or kick that fired as the last run ended)
            with self._kick_lock:
                self._kick_thread = threading.get_ident()
            if self.timeout:
                timer = threading.Timer(self.timeout, self._time_out)
                timer.daemon = True
                timer.start()
            if self._pause:  # asked for from another thread before the kick was armed
                vcpu.immediate_exit = True
            return self._loop(exits)
        finally:
            if timer is not None:
                timer.cancel()
            with self._kick_lock:
                self._kick_thread = None
            if old_mask is not None:
                vcpu.drain_kicks()  # (none delivered to a handler of the caller's once unblocked)
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _time_out(self) -> None:
        self._timed_out = True
        self._kick()

    def _interrupt(self) -> None:
        """request_pause() from another thread: KVM_RUN returns at once (now, or when
        next entered), and _loop sees the pause."""
        self._kick()

    def _kick(self) -> None:
        """Make the vCPU thread leave KVM_RUN (or not enter it) at once: Intr."""
        with self._kick_lock:
            if self._kick_thread is not None:
                self.vcpu.immediate_exit = True
                signal.pthread_kill(self._kick_thread, _KICK)

    def _loop(self, exits: Counter) -> RunResult:
        vcpu = self.vcpu
        console = self.console
        while True:
            if self.vm.ept_generation != self._generation:
                self._project()  # protections changed outside a write exit (API, port handler)
            ex = vcpu.run()
            kind = type(ex).__name__
            exits[kind] += 1
            if type(ex) is Mmio:
                if ex.is_write:
                    stop = self._on_write(ex)
                    if stop is not None:
                        return self.result("stop-decision", rip_at=stop[0], rip_after=stop[1], exits=exits)
                    continue
                raise EngineError(f"guest read from gpa={ex.phys_addr:#x}, outside guest RAM "
                                  f"(rip={vcpu.sync_rip():#x})")
            if type(ex) is Io:
                if ex.direction == "out" and ex.port == PORT_CONSOLE:
                    console += ex.data
                elif ex.direction == "out" and ex.port == PORT_EXIT:
                    self.exit_code = int.from_bytes(ex.data[: ex.size], "little")
                    return self.result("exit", rip_after=vcpu.sync_rip(), exits=exits)
                elif ex.direction == "in":
                    vcpu.complete_io_in(b"\xff" * (ex.size * ex.count))
                elif self._port_handlers and self._port_out(ex.port, int.from_bytes(ex.data[: ex.size], "little")):
                    vcpu.immediate_exit = True  # KVM_RUN completes the OUT, then returns at once
                continue
            if type(ex) is Intr:
                vcpu.immediate_exit = False
                if self._pause:
                    self._pause = False
                    return self.result("paused", rip_after=vcpu.sync_rip(), exits=exits)
                if self._timed_out:
                    return self.result("timeout", rip_after=vcpu.sync_rip(), exits=exits,
                                       detail=f"no exit within {self.timeout} s")
                continue  # (immediate_exit set with no pause or timeout: nothing to stop for)
            if type(ex) is Hlt:
                return self.result("halt", rip_after=vcpu.sync_rip(), exits=exits)
            if type(ex) is Shutdown:
                rip = vcpu.sync_rip()
                d = decode(self.code_at(rip), rip, None)
                return self.result("shutdown", rip_at=rip, exits=exits,
                                   detail=f"guest fault at rip={rip:#x} (triple fault: no IDT)"
                                   + (f" (`{d.text}`)" if d else ""))
            if type(ex) is InternalError:
                raise self._emulation_error(ex)
            if type(ex) in (FailEntry, ExceptionExit, Debug):
                raise EngineError(f"unexpected KVM exit {ex!r} at rip={vcpu.sync_rip():#x}")
            raise EngineError(f"unexpected KVM exit {ex!r}")

    def _on_write(self, ex: Mmio):
        gpa, data = ex.phys_addr, ex.data
        rip_after = self.vcpu.sync_rip()
        try:
            r = self.vm.write(gpa, data, rip=rip_after)
        except GpaNotMapped:
            raise EngineError(f"guest wrote {len(data)} bytes to gpa={gpa:#x}, outside guest RAM "
                              f"(instruction before rip={rip_after:#x})") from None
        if self._pending:
            assert r.decision is not None  # (a violation was handled: it has a decision)
            regs = self._regs()
            for ev, old in self._pending:
                d = self.instruction_before(rip_after, ev.gpa, ev.size, regs)
                self.record(ev, r.decision, old=old, rip_at=d.rip if d else None, rip_after=rip_after,
                            instruction=d.text if d else None)
            self._pending.clear()
            if r.stopped:
                return (self.records[-1].rip_at, rip_after)
        if r.stopped:
            # STOP from a violation handler that queued no record (one that does not
            # call handle_violation): the run ends all the same.
            d = self.instruction_before(rip_after, gpa, len(data), self._regs())
            return (d.rip if d else None, rip_after)
        if self.vm.ept_generation != self._generation:
            self._project()
        if self._pause:
            self.vcpu.immediate_exit = True
        return None

    def _emulation_error(self, ex: InternalError) -> EngineError:
        rip = self.vcpu.sync_rip()
        regs = self._regs()
        code = ex.insn_bytes or self.code_at(rip)
        d = decode(code, rip, regs)
        if d is None:
            return EngineError(f"KVM internal error (suberror {ex.suberror}) at rip={rip:#x}; "
                               f"instruction bytes {code.hex()} do not decode")
        where = f" writing gpa={d.address:#x}" if d.address is not None else ""
        return EngineError(f"KVM could not emulate `{d.text}` at rip={rip:#x}{where}: {_UNEMULATABLE_HINT}")

    def _release(self) -> None:
        for obj in (getattr(self, "vcpu", None), getattr(self, "vmfd", None), getattr(self, "kvm", None)):
            if obj is not None:
                obj.close()
