"""The Unicorn engine: the same guests anywhere, with hardware-exact faults.

Guest RAM is one buffer shared by the Vm (its memslot's backing) and Unicorn
(``mem_map_ptr``).  Every page whose EPT leaf has W = 0 is mapped read-only in Unicorn,
and one ``UC_HOOK_MEM_WRITE_PROT`` hook hands each write to it to ``vm.write`` — the
write path of every engine.  The hook fires *before* the store retires:

* allowed / EMULATE / UNPROTECT: ``vm.write`` committed the bytes; the hook returns
  True and Unicorn continues without storing again;
* SKIP: nothing was written; the hook returns True and the guest goes on;
* STOP: the hook returns False: the run ends with RIP **at** the faulting instruction
  and memory untouched — exactly the SPP-induced EPT violation.

An exception raised inside a hook is stored and re-raised from :meth:`run`, never
swallowed at the C boundary.

The hook is registered with the library directly: a small C trampoline
(``uc_write_hook.c``, built on first use by :mod:`sppkit._native`) where a C compiler
and this Python's headers are present, else a ctypes callback.  Both only read RIP,
pack the store's bytes and call :meth:`UnicornEngine._on_store`, which calls
``vm.write``; the results are the same either way, only the cost per store differs.

The C trampoline first offers a store to the Vm's write cache
(:meth:`Vm.native_write_cache`): ``vm.write``'s first step in C, which makes the
stores the processor's cache permits outright, with the same effect, without a call
into Python; every other store goes to ``vm.write``.  The engine keeps it true (after
each ``vm.write``, at its callbacks) and leaves it out while the run ends or pauses,
while code is patched and while writes are recorded.  ``permit_mirror=False`` turns
it off (same results, slower).
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import selectors
import signal
import socket
import sys
import threading
from collections.abc import Callable
from collections import Counter
from pathlib import Path

from unicorn import (
    UC_ARCH_X86,
    UC_ERR_WRITE_PROT,
    UC_HOOK_CODE,
    UC_HOOK_INSN,
    UC_HOOK_MEM_WRITE,
    UC_HOOK_MEM_WRITE_PROT,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
    Uc,
    UcError,
)
from unicorn import __version__ as UNICORN_VERSION
from unicorn.x86_const import (
    UC_X86_INS_IN,
    UC_X86_INS_OUT,
    UC_X86_REG_CR0,
    UC_X86_REG_CR3,
    UC_X86_REG_CR4,
    UC_X86_REG_CS,
    UC_X86_REG_DS,
    UC_X86_REG_ES,
    UC_X86_REG_MSR,
    UC_X86_REG_RFLAGS,
    UC_X86_REG_RIP,
    UC_X86_REG_RSP,
    UC_X86_REG_SS,
)

from .._files import signals_held
from ..vmm import GpaNotMapped
from ..vmm.vm import ALLOWED
from .base import REGISTERS, DEFAULT_RAM, EngineBase, EngineError, allocate_ram, check_engine_args, check_timeout
from .result import RunResult
from .x86 import CR0, CR4, EFER, PORT_CONSOLE, PORT_EXIT, decode, segments_for

MSR_EFER = 0xC0000080
_RO = UC_PROT_READ | UC_PROT_EXEC
#: emu_start's "until": an address no guest instruction can be at (not canonical)
_NO_STOP_ADDRESS = 0x8000_0000_0000_0000
# uc_cb_eventmem_t: (uc, type, address, size, value, user_data) -> bool
_WRITE_PROT_CFUNC = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int,
                                     ctypes.c_int64, ctypes.c_void_p)


def unicorn_version() -> str:
    return UNICORN_VERSION


_NPLAIN = 256  # RIPs of 8-byte stores made at once (uc_write_hook.c: NPLAIN)


class _HookState(ctypes.Structure):
    """``struct hook`` of uc_write_hook.c."""

    _fields_ = [
        ("reg_read", ctypes.c_void_p),
        ("emu_stop", ctypes.c_void_p),
        ("callback", ctypes.c_void_p),
        ("error", ctypes.c_void_p),
        ("rip_reg", ctypes.c_int32),
        ("cover_valid", ctypes.c_int32),
        ("cover_rip", ctypes.c_uint64),
        ("cover_lo", ctypes.c_uint64),
        ("cover_hi", ctypes.c_uint64),
        ("cover_last", ctypes.c_uint64),
        ("cover_last_size", ctypes.c_int64),
        ("fast_ok", ctypes.c_int32),
        ("pad", ctypes.c_int32),
        ("code_lo", ctypes.c_uint64),
        ("code_hi", ctypes.c_uint64),
        ("fast_count", ctypes.c_uint64),
        ("plain_rip", ctypes.c_uint64 * _NPLAIN),
        ("cached_write", ctypes.c_void_p),
        ("cache", ctypes.c_void_p),
    ]


_HOOK_SOURCE = Path(__file__).with_name("uc_write_hook.c")
_lib_cache: list = []


def _native_lib():
    """The C trampoline's library (ctypes.PyDLL: its helpers run with the GIL held),
    or None when it cannot be built (see :func:`native_status`)."""
    if not _lib_cache:
        from .. import _native

        lib = _native.load(_HOOK_SOURCE)
        if lib is not None:
            lib = ctypes.PyDLL(lib._name)
            lib.sppkit_uc_take_error.restype = ctypes.py_object
            lib.sppkit_uc_take_error.argtypes = [ctypes.c_void_p]
            lib.sppkit_uc_reset_cover.restype = None
            lib.sppkit_uc_reset_cover.argtypes = [ctypes.c_void_p]
        _lib_cache.append(lib)
    return _lib_cache[0]


def native_status() -> tuple[bool, str]:
    """``(available, what)`` of the C write-protect hook trampoline."""
    from .. import _native

    _native_lib()
    return _native.status(_HOOK_SOURCE)


def setup_cpu(uc: Uc, layout, cpl: int) -> None:
    """Put ``uc``'s vCPU in 64-bit long mode on ``layout``'s page tables (a
    ``plan_long_mode`` result) at privilege level ``cpl``, as the engine starts a guest."""
    uc.reg_write(UC_X86_REG_CR3, layout.pml4)
    uc.reg_write(UC_X86_REG_CR4, CR4)
    uc.reg_write(UC_X86_REG_MSR, (MSR_EFER, EFER))
    uc.reg_write(UC_X86_REG_CR0, CR0)
    code, data = segments_for(cpl)
    if cpl:
        uc.reg_write(UC_X86_REG_CS, code.selector)
        for reg in (UC_X86_REG_SS, UC_X86_REG_DS, UC_X86_REG_ES):
            uc.reg_write(reg, data.selector)
    uc.reg_write(UC_X86_REG_RSP, layout.rsp)
    uc.reg_write(UC_X86_REG_RFLAGS, layout.rflags)


def _guard(fn):
    """Decorator for the engine's Unicorn (instruction and code) hooks: the first
    exception is kept and the emulation stopped, and run() re-raises it (never swallowed
    at the C boundary).  emu_stop() only takes effect at the end of the translated
    block: until then every store is held back (see _hold_stores), so none lands after
    the failing callback."""

    def wrapper(self, uc, *args):
        try:
            if self._mirror is not None:
                self._mirror_count()  # (the callback may look at the exits)
            return fn(self, uc, *args)
        except BaseException as e:  # re-raised from run()
            self._fail(e, hold=True)
            return False
        finally:
            if self._mirror is not None:
                self.vm.sync_write_cache()  # (the callback may have changed the Vm's permits)

    return wrapper


class UnicornEngine(EngineBase):
    """Run a guest image under Unicorn with the Vm deciding every write to a
    write-protected page.  ``timeout`` in seconds; ``max_instructions`` 0 = no limit.

    ``native_hook``: hand protected stores to ``vm.write`` through the small C
    trampoline (built on first use with the host C compiler; about half the cost per
    protected store) — None: when it can be built, True: required (EngineError
    otherwise), False: never (a ctypes callback).  ``permit_mirror``: with the C
    trampoline, offer stores to the Vm's write cache in C first (see the module's
    docstring); False: every protected store calls ``vm.write``.  Results are
    identical either way."""

    name = "unicorn"

    def __init__(self, image, *, policy=None, ram_size: int = DEFAULT_RAM, cpl: int = 3,
                 timeout: float = 60.0, spp_mode: str = "lazy", max_instructions: int = 0,
                 native_hook: bool | None = None, permit_mirror: bool = True) -> None:
        check_engine_args(image, policy, ram_size, cpl, spp_mode)
        self.timeout = check_timeout(timeout)
        if not isinstance(max_instructions, int) or isinstance(max_instructions, bool) \
                or not 0 <= max_instructions < 1 << 64:
            raise ValueError(f"max_instructions={max_instructions!r:.40}: must be an integer from 0 (no limit) "
                             "to 2**64-1")
        if native_hook is not None and not isinstance(native_hook, bool):
            raise TypeError(f"native_hook={native_hook!r:.40}: must be None (the C trampoline when it can be "
                            "built), True (required) or False (never)")
        if not isinstance(permit_mirror, bool):
            raise TypeError(f"permit_mirror={permit_mirror!r:.40}: must be True or False")
        self.max_instructions = max_instructions
        self._ram = allocate_ram(ram_size)
        super().__init__(image, policy=policy, ram_size=ram_size, cpl=cpl, spp_mode=spp_mode, backing=self._ram)
        self.uc = uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self._ram_ptr = ctypes.c_char.from_buffer(self._ram)
        uc.mem_map_ptr(0, ram_size, UC_PROT_ALL, ctypes.addressof(self._ram_ptr))
        setup_cpu(uc, self.layout, self.cpl)
        self._prot: set[tuple[int, int, bool]] = set()
        self._generation = -1
        self._project()
        self._error: BaseException | None = None
        self._stop: tuple[int, int] | None = None  # (rip_at, gpa) of a STOP
        self._held = False  # the run stopped at a store it did not decide (see _on_store)
        #: why the guest cannot be continued (a run that timed out between two stores), or None
        self._inexact: str | None = None
        self._stop_lock = threading.Lock()  # orders the timeout's and Ctrl-C's stops against the run's end
        self._run_id = 0  # which run a timer or Ctrl-C belongs to
        self._emulating = False
        self._hard_stopped = False  # the run was stopped from another thread (mid-block)
        #: the run was stopped for a pause (else, if it ended between two instructions
        #: with a pause asked for, it ended for another reason: a hlt, the limit...)
        self._pause_landed = False
        self._ctrl_c = False  # Ctrl-C stopped this run (its KeyboardInterrupt may have been swallowed)
        self._hard_timer: threading.Timer | None = None
        self._ending = False  # a pause, the exit port or the timeout: stores are held back
        self._holding = False  # every page read-only until the run stops (see _hold_stores)
        self._timed_out = False
        #: one-address code hooks of a pause that cannot stop at once (see _pause_at_next),
        #: removed after each run
        self._pause_hooks: list = []
        self._pause_ips: set[int] = set()
        self._wide_cache: dict = {}  # rip -> ((register, size), instruction) or () for vector stores
        self._helper_cache: dict[int, bool] = {}  # rip -> whether its stores are made in a QEMU helper
        # Self-modifying code (see _on_store): the pages of the image's executable
        # segments, the RIP of a store into code held back to be run alone, and the
        # code ranges written during that step (their translations dropped after it).
        self._code_pages = frozenset(p for seg in image.segments if "x" in seg.flags
                                     for p in range(seg.gpa >> 12, (seg.gpa + max(seg.memsz, 1) + 0xFFF) >> 12))
        # gpa range in which a store (up to 32 bytes) may touch a code page
        self._code_span = ((min(self._code_pages) << 12) - 32, (max(self._code_pages) + 1) << 12) \
            if self._code_pages else (0, 0)
        self._smc: int | None = None
        self._smc_store: tuple[int, int] | None = None
        self._smc_step = False
        self._smc_dirty: list[tuple[int, int]] = []
        self._beyond: tuple[int, int] | None = None  # (gpa, size) of a store running past the end of RAM
        # (rip, gpa, answer) of a store decided and made, then abandoned so that the run
        # can pause right after its instruction (see _on_store, _pause_after_store)
        self._replay: tuple[int, int, object] | None = None
        self._record_hook = None
        self.exits: Counter = Counter()
        self._pc = image.entry
        uc.hook_add(UC_HOOK_INSN, self._hook_out, None, 1, 0, UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, self._hook_in, None, 1, 0, UC_X86_INS_IN)
        self._ept = self.vm.ept
        self._wp_calls = 0  # stores handed to _on_store (exits["WriteProt"])
        self._native = None
        # the hook's state when stores are offered to the Vm's write cache (see the
        # module's docstring), else None
        self._mirror: _HookState | None = None
        #: stores the Vm's write cache made (in C, without calling vm.write), over all
        #: runs; they are counted in the Vm's statistics and exits["WriteProt"] like the others
        self.mirrored_writes = 0
        lib = None
        if native_hook is not False:
            lib = _native_lib()
            if lib is None and native_hook:
                raise EngineError(f"native write-protect hook unavailable: {native_status()[1]}")
        # The write-protect hook is on the path of every protected store, so it is
        # registered with the library directly, not through the binding: the C
        # trampoline (uc_write_hook.c) when it is built, else a ctypes callback.  Both
        # hand each store to the same Python method, _on_store, which calls vm.write.
        from unicorn.unicorn_py3.unicorn import uclib

        self._uch = uc._uch
        self._on_store_ref = self._on_store  # one bound method, kept alive for the C side
        if lib is not None:
            state = _HookState(reg_read=ctypes.cast(uclib.uc_reg_read, ctypes.c_void_p),
                               emu_stop=ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p),
                               callback=id(self._on_store_ref), rip_reg=UC_X86_REG_RIP)
            self._native = (lib, state)
            cache = self.vm.native_write_cache() if permit_mirror else None
            if cache is not None:
                state.code_lo, state.code_hi = self._code_span
                state.cached_write, state.cache = cache
                self._mirror = state
            fn, data = ctypes.cast(lib.sppkit_uc_write_prot, ctypes.c_void_p), ctypes.addressof(state)
        else:
            self._rip_buf = ctypes.c_uint64()
            self._rip_ref = ctypes.byref(self._rip_buf)
            self._reg_read = uclib.uc_reg_read
            # (rip, lo, hi, last address, last size) of the last access decided whole
            self._cover: tuple[int, int, int, int, int] | None = None
            self._wp_cb = _WRITE_PROT_CFUNC(self._hook_write_prot)
            fn, data = ctypes.cast(self._wp_cb, ctypes.c_void_p), None
        handle = ctypes.c_size_t()
        err = uclib.uc_hook_add(self._uch, ctypes.byref(handle), UC_HOOK_MEM_WRITE_PROT, fn, data, 1, 0)
        if err:
            raise UcError(err)

    @property
    def native_hook(self) -> bool:
        """Whether protected stores reach vm.write through the C trampoline."""
        return self._native is not None

    # -- set-up ----------------------------------------------------------------------------
    def _project(self) -> None:
        """Mirror the Vm's EPT onto Unicorn's page protections: a page whose leaf has
        W = 0 is read-only, and so are its two neighbours (a guard band).

        The band is what makes page-crossing stores exact: Unicorn reports a store that
        starts on a read-only page as one access, but stores the bytes that fall on a
        writable page itself, before (or after) reporting the protected bytes one by
        one.  With both neighbours read-only, every store touching a protected page is
        one whole access decided by ``vm.write`` before any byte lands; stores to the
        neighbours go through ``vm.write`` too, which allows them.
        """
        page = 0x1000
        ro: list[list[int]] = []
        for gpa, size, writable in self.vm.write_protected(0, self.ram_size):
            if writable:
                continue
            lo, hi = max(0, gpa - page), min(self.ram_size, gpa + size + page)
            if ro and lo <= ro[-1][1]:
                ro[-1][1] = max(ro[-1][1], hi)
            else:
                ro.append([lo, hi])
        runs, pos = set(), 0
        for lo, hi in ro:
            if pos < lo:
                runs.add((pos, lo - pos, True))
            runs.add((lo, hi - lo, False))
            pos = hi
        if pos < self.ram_size:
            runs.add((pos, self.ram_size - pos, True))
        for gpa, size, writable in sorted(runs - self._prot):
            self.uc.mem_protect(gpa, size, UC_PROT_ALL if writable else _RO)
        self._holding = False
        self._prot = runs
        self._generation = self.vm.ept_generation

    def _fail(self, e: BaseException, *, hold: bool = False) -> None:
        """A callback raised ``e``: keep the first exception (run() re-raises it, never
        swallowed at the C boundary) and stop the emulation; with ``hold``, every store
        until the block ends is held back too (see _hold_stores)."""
        if self._error is None:
            self._error = e
        self._mirror_off()
        try:
            if hold:
                self._hold_stores()
        finally:
            self.uc.emu_stop()

    def _hold_stores(self) -> None:
        """The run is to stop (a pause) but emu_stop() only takes effect at the end of the
        translated block: until then every page is read-only, so that each store still
        on the way faults into _on_store, which holds it back — the run stops at the
        first one, nothing written, as KVM stops right after the pausing instruction.
        The next run() restores the real protections (_project)."""
        if not self._holding:
            self._mirror_off()
            self.uc.mem_protect(0, self.ram_size, _RO)
            self._prot = {(0, self.ram_size, False)}
            self._holding = True
            self._ending = True

    # -- the permit mirror (see the module's docstring) ----------------------------------
    def _mirror_off(self) -> None:
        """Every protected store goes to _on_store from now on (also from another thread:
        the trampoline reads the flag at each store)."""
        if self._mirror is not None:
            self._mirror.fast_ok = 0

    def _mirror_refresh(self) -> None:
        """Before emu_start: offer stores to the Vm's write cache unless the engine's
        state says otherwise (whatever sets that state during the run turns the offer
        off itself), the cache brought up to date."""
        m = self._mirror
        if m is None:
            return
        self._mirror_sync()
        ok = not (self._ending or self._pause or self._timed_out or self._holding or self._smc_step
                  or self._pause_hooks or self._record_hook is not None or self._error is not None
                  or self._replay is not None or self._inexact is not None)
        m.fast_ok = ok
        if ok and (self._pause or self._timed_out or self._ending):
            # another thread asked for a pause or timed the run out between the check
            # and the store above (it sets the flag, then turns the mirror off)
            m.fast_ok = 0

    def _mirror_count(self) -> None:
        """Count the stores the Vm's write cache made in exits["WriteProt"] (the Vm
        counts them in its statistics before anything reads them)."""
        m = self._mirror
        assert m is not None
        n = m.fast_count
        if n:
            m.fast_count = 0
            self._wp_calls += n
            self.mirrored_writes += n

    def _mirror_sync(self) -> None:
        """_mirror_count(), and the Vm's write cache counted and brought up to date."""
        self._mirror_count()
        self.vm.sync_write_cache()

    # -- hooks ---------------------------------------------------------------------------
    @_guard
    def _hook_out(self, uc, port, size, value, user_data):
        self.exits["Io"] += 1
        if port == PORT_CONSOLE:
            self.console += (value & 0xFF).to_bytes(1, "little")
        elif port == PORT_EXIT:
            self.exit_code = value & 0xFFFFFFFF
            self._ending = True
            uc.emu_stop()
        elif self._port_handlers:
            pause = self._port_out(port, value & ((1 << (8 * size)) - 1))
            if self.vm.ept_generation != self._generation:
                self._project()
            if pause:
                self._pause_landed = True
                self._hold_stores()
                uc.emu_stop()
                return
        if self.exit_code is None:
            self._stop_if_asked(uc)

    @_guard
    def _hook_in(self, uc, port, size, user_data):
        self.exits["Io"] += 1
        self._stop_if_asked(uc)
        return (1 << (8 * size)) - 1

    def _stop_if_asked(self, uc) -> None:
        """At port I/O: the timeout, or a pause asked for from another thread, at a
        read-modify-write store or by a write observer, stops the run here, as a port
        handler's pause does."""
        if self._timed_out or self._pause:
            self._pause_landed = self._pause
            self._hold_stores()
            uc.emu_stop()

    def _hook_write_prot(self, uch, access, address, size, value, user_data):
        """The pure-Python trampoline (when the C one is not built): what
        uc_write_hook.c does, with a ctypes callback.  Called by the library directly."""
        try:
            rip = None if self._reg_read(uch, UC_X86_REG_RIP, self._rip_ref) else self._rip_buf.value
            cover = self._cover
            if rip is not None and cover is not None and cover[0] == rip and cover[1] <= address \
                    and address + size <= cover[2] and size < cover[2] - cover[1] \
                    and (address > cover[3] or (address == cover[3] and size < cover[4])):
                # Unicorn re-reports an unaligned or page-crossing store byte by byte after
                # the whole access (and a vector store in 8-byte pieces): already decided.
                # (In order: address ascending, a smaller size after a larger at one
                # address; anything else is a new access, e.g. the same store run again.)
                self._cover = (rip, cover[1], cover[2], address, size)
                return True
            self._cover = None
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little") if 1 <= size <= 8 else None
        except BaseException as e:  # re-raised from run()
            self._fail(e)
            return False
        r = self._on_store(address, data, rip)
        if r is False:
            return False
        if rip is not None:
            self._cover = (rip, address, address + (size if r is True else r), address, size)
        return True

    def _on_store(self, address: int, data: bytes | None, rip: int | None):
        """A guest store to a read-only page, before it retires: hand it to vm.write.

        Called by a trampoline (see uc_write_hook.c for the protocol).  Returns True
        to continue (the store was committed or skipped), False to stop the run at this
        instruction, or the size of a whole vector store decided at its first 8-byte
        piece.  Like every hook here it never lets an exception out: the first one is
        kept, the emulation stopped, and run() re-raises it."""
        mirror = self._mirror
        if mirror is not None:
            try:
                self._mirror_count()  # (the stores the write cache made come first; vm.write counts them too)
            except BaseException as e:  # re-raised from run()
                self._fail(e)
                return False
        if self._ending:
            rp = self._replay
            if rp is not None and rp[0] == rip and rp[1] == address:
                # The store of a pause, already decided and made, met again as its
                # instruction runs alone (_pause_after_store): the same answer, no second call.
                self._replay = None
                return rp[2]
            # The run is ending (a port handler's pause, the timeout, the exit port):
            # emu_stop() only takes effect at the end of the translated block, and
            # Unicorn abandons a store it meets on the way and runs it again on resume.
            # So the store is not decided here: the run stops at it, nothing written,
            # and a resumed run hands it to vm.write once.
            if self.exit_code is not None or not self._helper_store(rip):
                self._held = True
                return False
            # (a store made inside a QEMU helper cannot be abandoned — its instruction
            # goes on without it — so for a pause or the timeout it is decided now and
            # the run stops later; after the guest's exit nothing more is made)
        code_lo, code_hi = self._code_span  # (one comparison first: the path of every protected store)
        if (code_lo <= address < code_hi or (rip is not None and (0 <= (address >> 12) - (rip >> 12) <= 1
                                                               or ((address + 31) >> 12) - (rip >> 12) == 0))) \
                and data is not None and rip is not None \
                and not self._smc_step and self._near_running_code(address, rip) \
                and not self._helper_store(rip):  # (its instruction would go on without the store, then run again)
            # A store into code that the running translated block may hold (Unicorn
            # performs the bytes committed here behind QEMU's back, so QEMU's own
            # self-modifying-code check never sees them): nothing is decided here; the
            # run stops at the store and _emulate() runs that instruction alone on fresh
            # translations, then goes on, so the patched code is what runs next.
            self._smc = rip
            self._smc_store = (rip, address)  # (recorded already: not again when it runs alone)
            return False
        self._wp_calls += 1
        try:
            if rip is None:
                rip = self.uc.reg_read(UC_X86_REG_RIP)  # the library refused: let the binding raise
            if data is None:
                raise EngineError(f"Unicorn reported a store of unsupported size to gpa={address:#x} "
                                  f"(rip={rip:#x})")
            size = n = len(data)
            if size == 8:
                wide = self._wide_cache.get(rip)
                if wide is None:
                    wide = self._wide_cache[rip] = _vector_store_info(self.code_at(rip), rip)
                    if not wide and mirror is not None:  # the mirror may make this instruction's stores
                        mirror.plain_rip[rip & (_NPLAIN - 1)] = rip + 1
                if wide and address == _operand_address(wide[1], self._get_regs()):
                    # Unicorn hands a 16/32-byte vector store over in 8-byte pieces:
                    # decide the whole store at its first piece, from the source register.
                    reg, n = wide[0]
                    data = (self.uc.reg_read(reg) & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
            try:
                r = self.vm.write(address, data, rip=rip)
            except GpaNotMapped:
                # The store runs past the end of guest RAM, which the guest's page tables
                # do not map: a page fault (a triple fault with no IDT), as under KVM.
                self._beyond = (address, n)
                return False
            if mirror is not None:  # (vm.write may have walked: the page's permit may differ)
                self.vm.note_write_cache(address, n, r is ALLOWED)
            if code_lo <= address + n and address < code_hi and r.committed \
                    and ((address >> 12) in self._code_pages or ((address + n - 1) >> 12) in self._code_pages):
                self._drop_code(address, n)
            if r is not ALLOWED:  # (the result of every write permitted outright)
                if self._pending:
                    assert r.decision is not None  # (a violation was handled: it has a decision)
                    d = self.instruction_at(rip)
                    for ev, old in self._pending:
                        self.record(ev, r.decision, old=old, rip_at=rip, instruction=d.text if d else None)
                    self._pending.clear()
                if r.stopped:
                    if self._helper_store(rip):
                        # Unicorn cannot stop at this instruction: it goes on without this
                        # store, and on to the end of its block.  The run ends with an error
                        # and every later store of the block held back (none lands).
                        d = self.instruction_at(rip)
                        self._inexact = _mid_block(f"stopped at `{d.text if d else '?'}`, a store Unicorn makes "
                                                   "inside one of its helpers")
                        self._fail(EngineError(
                            f"STOP on `{d.text if d else '?'}` at rip={rip:#x} (gpa={address:#x}): Unicorn makes "
                            f"this instruction's stores inside a helper and cannot stop at it; the store was not "
                            f"made, but the instruction went on (use skip or emulate for it, or the kvm engine)"),
                            hold=True)
                        return False
                    self._stop = (rip, address)
                    return False
            if self._ept.version != self._generation:
                self._project()
            if self._pause and not self._smc_step:  # (an SMC step stops after its instruction anyway)
                return self._pause_at_store(rip, address, n, True if n == size else n)
            return True if n == size else n
        except BaseException as e:  # re-raised from run()
            self._fail(e)
            return False

    def _helper_store(self, rip: int | None) -> bool:
        """Whether the instruction at ``rip`` makes its stores inside a QEMU helper
        (cmpxchg8b/16b, fxsave, xsave, fnstenv/fnsave, x87 80-bit stores, maskmovdqu):
        Unicorn then neither stops at it when a hook says
        so nor abandons the store — the instruction goes on without it."""
        if rip is None:
            return False
        h = self._helper_cache.get(rip)
        if h is None:
            d = self.instruction_at(rip)
            h = self._helper_cache[rip] = d is not None and _is_helper_store(d.text)
        return h

    def _pause_at_store(self, rip: int, address: int, n: int, answer):
        """A pause was asked for while the store at ``address`` (``n`` bytes, decided and
        made) was decided — by the violation handler, a write observer, another thread.
        Stopping inside a memory hook would leave RIP at this instruction and repeat it
        on resume, and a code hook on the next instruction is not seen by the block
        already running.  So the store is abandoned before its instruction retires
        (restartable, like a store that faults once its bytes landed) and
        _pause_after_store() runs that instruction again alone, this store answered as
        decided (``answer``): the run pauses right after it, as under KVM."""
        d = decode(self.code_at(rip), rip, None)
        if d is not None and d.size == n and not d.reads_memory:
            # (only an instruction that reads no memory runs again the same: a
            # read-modify-write one would read the bytes already made, and its flags and
            # registers would differ)
            self._replay = (rip, address, answer)
            self._ending = True
            self._mirror_off()
            return False
        # An instruction that reads memory (add [m], 1; xadd...), or that stores in
        # several pieces (fxsave, x87 stores...): its store is made and it retires; the
        # run stops at the next store (held back, as after a port handler's pause), the
        # next port I/O, or the next instruction when a block is translated from it (a
        # code hook on it).  Neither emu_stop() nor dropping the running block's
        # translation, which would make the hook seen at once: inside a memory hook,
        # both make Unicorn run this instruction again.
        self._hold_stores()
        self._pause_at_next(rip + (d.length if d else 1))
        return answer

    # -- self-modifying code ---------------------------------------------------------------
    def _near_running_code(self, address: int, rip: int) -> bool:
        """Whether a store at ``address`` (up to 32 bytes: a vector store arrives in
        8-byte pieces) touches a code page the running block may span: the pages
        before, of and after RIP (a translated block spans at most two pages); for code
        run from a page the image does not mark executable, that page and the next."""
        page = rip >> 12
        if page not in self._code_pages:  # code run from a data page: its own and the next
            return any(page <= p <= page + 1 for p in range(address >> 12, ((address + 31) >> 12) + 1))
        return any(p in self._code_pages and page - 1 <= p <= page + 1
                   for p in range(address >> 12, ((address + 31) >> 12) + 1))

    def _drop_code(self, address: int, n: int) -> None:
        """Bytes were committed to code: drop Unicorn's translations of them, which
        would otherwise run the old instructions.  Not from inside a block that may
        be one of them (a step): then after it."""
        self._code_changed()
        if self._smc_step:
            self._smc_dirty.append((address, address + n))
        else:
            self.uc.ctl_remove_cache(address, address + n)

    def _code_changed(self) -> None:
        """Guest code was written: forget what was learnt of the instructions by their
        address (decodings, vector and helper stores, the mirror's 8-byte stores)."""
        self._wide_cache.clear()
        self._helper_cache.clear()
        self._insn_at.clear()
        self._insn_cache.clear()
        if self._mirror is not None:
            ctypes.memset(ctypes.addressof(self._mirror.plain_rip), 0, ctypes.sizeof(self._mirror.plain_rip))

    def _flush_code(self) -> None:
        for lo, hi in self._smc_dirty:
            self.uc.ctl_remove_cache(lo, hi)
        self._smc_dirty.clear()

    def _emulate(self, start: int) -> None:
        """emu_start from ``start``; a store held back by _on_store because it writes
        code near the running block is run alone, on translations made after its
        neighbourhood was dropped from the cache, and the run goes on from there.  A
        store abandoned for a pause is run again alone, and the run ends after it."""
        uc = self.uc
        while True:
            try:
                self._mirror_refresh()
                uc.emu_start(start, _NO_STOP_ADDRESS, count=self.max_instructions)
                return
            except UcError as e:
                if e.errno != UC_ERR_WRITE_PROT or self._error is not None:
                    raise
                if self._replay is not None:
                    self._pause_after_store()
                    return
                if self._smc is None:
                    raise
            rip, self._smc = self._smc, None
            page = rip & ~0xFFF
            lo, hi = max(0, page - 0x1000), min(self.ram_size, page + 0x2000)
            uc.ctl_remove_cache(lo, hi)
            self._smc_step = True
            self._mirror_off()
            try:
                uc.emu_start(rip, _NO_STOP_ADDRESS, count=1)
            finally:
                self._smc_step = False
                uc.ctl_remove_cache(lo, hi)
                self._flush_code()
                self._code_changed()
            if self._pause:
                self._pause_landed = True  # (right after the instruction, as under KVM)
            if self.exit_code is not None or self._pause or self._timed_out:
                return
            start = uc.reg_read(UC_X86_REG_RIP)

    def _pause_after_store(self) -> None:
        """Run the instruction of the store abandoned for a pause (``_replay``) alone:
        _on_store answers that store as it was decided, and the run stops after it."""
        uc = self.uc
        rip = self._replay[0] if self._replay is not None else 0
        page = rip & ~0xFFF
        lo, hi = max(0, page - 0x1000), min(self.ram_size, page + 0x2000)
        uc.ctl_remove_cache(lo, hi)  # (translations that hold the one-instruction count)
        self._ending = True  # the store is answered at the top of _on_store
        self._pause_landed = True
        self._mirror_off()
        try:
            uc.emu_start(rip, _NO_STOP_ADDRESS, count=1)
        finally:
            self._replay = None
            uc.ctl_remove_cache(lo, hi)

    records_every_write = True

    def record_writes(self, callback) -> None:
        """Call ``callback(gpa, size, rip)`` for *every* guest write (a memory hook on
        all of RAM: slower, but the trace holds the whole workload); None stops
        recording, a later call replaces the callback.  An exception it raises is
        re-raised from :meth:`run`: a write to a page holding a protected sub-page is
        then not made (as under KVM); Unicorn makes a write to any other page all the
        same (the hook sees it before it lands but cannot cancel it)."""
        self._check_open("record_writes()")
        if callback is not None and not callable(callback):
            raise TypeError(f"record_writes callback {callback!r:.60}: must be a callable (gpa, size, rip) -> None, "
                            "or None")
        if self._record_hook is not None:
            self.uc.hook_del(self._record_hook)
            self._record_hook = None
        if callback is None:
            return
        last: list[tuple[int, int, int] | None] = [None]  # (rip, lo, hi) of the last access recorded

        def hook(uc, access, address, size, value, user_data):
            try:
                rip = uc.reg_read(UC_X86_REG_RIP)
                prev = last[0]
                if prev is not None and prev[0] == rip and prev[1] <= address and address + size <= prev[2] \
                        and size < prev[2] - prev[1]:
                    return  # Unicorn's byte-by-byte re-report of an access already recorded
                last[0] = (rip, address, address + size)
                if self._smc_step and self._smc_store == (rip, address):
                    self._smc_store = None
                    return  # (the store held back for a step into code: recorded when first met)
                if self._ending and self._not_made_now(address, size, rip):
                    return
                asked = self._pause
                callback(address, size, rip)
                if self._pause and not asked:
                    # A pause asked for by the observer: a store to a read-only page goes on
                    # to _on_store, which pauses right after its instruction; for any other
                    # store (the hook cannot stop it), at the next store to a protected
                    # page, port I/O, or block beginning with the next instruction.
                    d = decode(self.code_at(rip), rip, None)
                    self._pause_at_next(rip + (d.length if d else 1))
            except BaseException as e:
                self._ending = True  # the store, if it reaches _on_store, is not made
                self._fail(e)

        self._mirror_off()  # (every store goes through the recording hook's checks)
        self._record_hook = self.uc.hook_add(UC_HOOK_MEM_WRITE, hook, None, 0, self.ram_size - 1)

    def _not_made_now(self, address: int, size: int, rip: int) -> bool:
        """While the run ends: whether a store the recording hook sees is not made now —
        _on_store holds it back (it is recorded when it runs again) or makes nothing
        after the exit — or is the store of a pause run again alone (recorded the first
        time).  Mirrors _on_store's rules for a store to a read-only page."""
        rp = self._replay
        if rp is not None and rp[0] == rip and rp[1] == address:
            return True
        if self.exit_code is None and self._helper_store(rip):
            return False  # (made all the same)
        return self._holding or any(lo < address + size and address < lo + n
                                    for lo, n, writable in self._prot if not writable)

    def _pause_at_next(self, ip: int) -> None:
        """From inside a memory hook, with a pause asked for: also stop when a block
        beginning at ``ip`` (the next instruction) is translated — a code hook limited to
        that address.  The translations already made are kept, so the hook is not seen
        by the running block (or by one already translated from ``ip``): dropping them,
        or emu_stop(), inside a memory hook would make Unicorn run the instruction again."""
        self._mirror_off()
        if ip not in self._pause_ips:  # (once: each piece of a helper store asks again)
            self._pause_ips.add(ip)
            self._pause_hooks.append(self.uc.hook_add(UC_HOOK_CODE, self._hook_stop, None, ip, ip))

    @_guard
    def _hook_stop(self, uc, address, size, user_data):
        if self._pause:
            self._pause_landed = True
            uc.emu_stop()

    # -- run -------------------------------------------------------------------------------
    _REGS = {name: name.upper() for name in REGISTERS}  # sppkit name -> unicorn.x86_const suffix

    def _get_regs(self) -> dict[str, int]:
        import unicorn.x86_const as X

        return {n: self.uc.reg_read(getattr(X, f"UC_X86_REG_{u}")) for n, u in self._REGS.items()}

    def _set_regs(self, regs: dict[str, int]) -> None:
        import unicorn.x86_const as X

        for n, v in regs.items():  # (checked by set_regs: all or nothing)
            self.uc.reg_write(getattr(X, f"UC_X86_REG_{self._REGS[n]}"), v)
        if "rip" in regs:
            self._pc = regs["rip"]

    def _raise_error(self) -> None:
        """Re-raise the exception a callback raised; a later run() goes on from where
        the guest stopped (a store held back, or not made because the callback deciding
        it raised, runs again)."""
        err, self._error = self._error, None
        self._pc = self.uc.reg_read(UC_X86_REG_RIP)
        self._held = False
        self._stop = self._beyond = self._replay = None
        assert err is not None
        raise err

    def _run(self) -> RunResult:
        if self._inexact is not None:
            raise EngineError(f"run(): {self._inexact}")
        uc = self.uc
        start = self._pc
        if self._holding or self.vm.ept_generation != self._generation:
            self._project()  # protections changed since the last run or pause
        if self._native is not None:
            self._native[0].sppkit_uc_reset_cover(ctypes.byref(self._native[1]))
        else:
            self._cover = None
        timer = None
        watch = _CtrlC()
        try:
            with self._stop_lock:  # (a timer or Ctrl-C of an earlier run acts on its own run only)
                self._run_id += 1
                self._stop = None  # (this run's STOP, if any)
                self._ctrl_c = False  # (set by _on_ctrl_c)
                self._emulating = True
                self._timed_out = False
                self._held = False
                self._ending = False
                self._hard_stopped = False
                self._pause_landed = False
            if self.timeout:
                # The timeout is a timer calling _time_out: emu_start(timeout=...) would
                # make Unicorn check a clock in every block (about 20 % slower here).
                timer = threading.Timer(self.timeout, self._time_out, args=(self._run_id,))
                timer.daemon = True
                timer.start()
            try:
                # (no stop address: the guest stops by its exit port; 0 would stop a guest
                # whose entry point is gpa 0 before its first instruction)
                watch.start(functools.partial(self._on_ctrl_c, self._run_id))
                self._emulate(start)
            finally:
                watch.close()
                self._smc = None
                self._flush_code()
                self._mirror_off()
                if self._mirror is not None:
                    self._mirror_sync()
                if self._wp_calls:
                    self.exits["WriteProt"] = self._wp_calls
                if self._native is not None:
                    err = self._native[0].sppkit_uc_take_error(ctypes.byref(self._native[1]))
                    if err is not None and self._error is None:
                        self._error = err
        except UcError as e:
            if self._error is not None:
                self._raise_error()
            rip = uc.reg_read(UC_X86_REG_RIP)
            if self.exit_code is not None:
                # emu_stop() takes effect at the end of the translation block: the
                # start-up code's ud2 after the exit port write may already have run.
                return self.result("exit", exits=self.exits)
            if e.errno == UC_ERR_WRITE_PROT and self._held:
                # stopped at a store held back by _on_store: it has not run
                self._held = False
                self._pc = rip
                if self._pause:
                    self._pause = False
                    return self.result("paused", rip_at=rip, exits=self.exits)
                return self.result("timeout", rip_at=rip, exits=self.exits, detail=f"no exit within {self.timeout} s")
            if e.errno == UC_ERR_WRITE_PROT and self._stop is not None:
                at = self._stop[0]
                self._stop = None
                self._pc = at  # (a later run() executes the stopped store again: README)
                return self.result("stop-decision", rip_at=at, exits=self.exits)
            if e.errno == UC_ERR_WRITE_PROT and self._beyond is not None:
                gpa, n = self._beyond
                self._beyond = None
                d = decode(self.code_at(rip), rip, None)
                return self.result("shutdown", rip_at=rip, exits=self.exits,
                                   detail=f"guest fault at rip={rip:#x}: a {n}-byte store at gpa={gpa:#x} runs "
                                   f"past the end of guest RAM (triple fault: no IDT)" + (f" (`{d.text}`)" if d else ""))
            d = decode(self.code_at(rip), rip, None)
            # A fault with no IDT is a triple fault on a real CPU: KVM reports a shutdown.
            return self.result("shutdown", rip_at=rip, exits=self.exits,
                               detail=f"guest fault at rip={rip:#x}: {e}" + (f" (`{d.text}`)" if d else ""))
        finally:
            with signals_held():  # (a Ctrl-C here must not leave the watcher, or a timer, armed)
                with self._stop_lock:
                    self._emulating = False
                    hard, self._hard_timer = self._hard_timer, None
                watch.close()  # (idempotent: also when an exception came before the inner finally)
                if timer is not None:
                    timer.cancel()
                if hard is not None:
                    hard.cancel()
                for h in self._pause_hooks:
                    uc.hook_del(h)
                self._pause_hooks.clear()
                self._pause_ips.clear()
        if self._ctrl_c:
            # The Ctrl-C stopped the guest, but its KeyboardInterrupt was raised inside a
            # callback of Unicorn's binding (a port or recording hook), where ctypes
            # swallows it ("Exception ignored"): the run must not end as if nothing
            # happened — it would report a normal stop and commit its output.
            raise KeyboardInterrupt
        if self._error is not None:
            self._raise_error()
        rip = uc.reg_read(UC_X86_REG_RIP)
        self._pc = rip
        if self.exit_code is not None:
            return self.result("exit", rip_after=rip, exits=self.exits)
        if self._pause and not self._hard_stopped and self._pause_landed:
            self._pause = False
            return self.result("paused", rip_at=rip, exits=self.exits)
        if self._timed_out:
            self._pause = False
            if not self._hard_stopped:  # (it ended on its own meanwhile: exact)
                return self.result("timeout", rip_at=rip, exits=self.exits,
                                   detail=f"no exit within {self.timeout} s")
            # The hard stop's emu_stop() comes from another thread: Unicorn then leaves
            # the guest in the middle of a translated block with RIP at the block's start
            # (measured: the block's first store made, RIP still before it), so the
            # instructions already done would run again.
            self._inexact = _mid_block("timed out, and Unicorn stops a run from its timer", "with a longer timeout")
            return self.result("timeout", rip_at=rip, exits=self.exits,
                               detail=f"no exit within {self.timeout} s; RIP is the start of the translated block "
                                      "that was running (Unicorn stops mid-block), so the run cannot be continued")
        # Unicorn ends a run by itself at its instruction limit, or after a `hlt` (RIP
        # then after it, as under KVM) — or, measured after two pauses in one run, at a
        # CPU exception it swallows (RIP at the faulting instruction, no error).
        # x86 does not decode backwards: the byte before RIP reads as `hlt` (f4) also as
        # the last byte of a longer instruction.  With an instruction limit, such a
        # doubt is the limit; without one, Unicorn has no other reason to end the run
        # between two instructions, so a `hlt` there is the hlt.
        hlt = rip - 1
        d = decode(self.code_at(hlt), hlt, None) if hlt >= 0 else None
        is_hlt = d is not None and d.text == "hlt" and d.length == 1
        if is_hlt and self.max_instructions:
            window = self.code_at(max(0, rip - 15))[: rip - max(0, rip - 15)]
            is_hlt = not any((cand := decode(window[k:] + bytes(15), rip - len(window) + k, None)) is not None
                             and cand.length == len(window) - k for k in range(len(window) - 1))
        if not is_hlt:
            if self.max_instructions:
                return self.result("halt", rip_at=rip, exits=self.exits,
                                   detail=f"the instruction limit ({self.max_instructions:,}) was reached")
            f = self.instruction_at(rip) if 0 <= rip < self.ram_size else None
            return self.result("shutdown", rip_at=rip, exits=self.exits,
                               detail=f"guest fault at rip={rip:#x} (triple fault: no IDT)"
                                      + (f" (`{f.text}`)" if f else ""))
        if self.cpl == 3:
            # hlt is privileged: at CPL 3 it raises #GP, with no IDT a triple fault, which
            # Unicorn does not model (it halts) and KVM reports as a shutdown
            return self.result("shutdown", rip_at=hlt, exits=self.exits,
                               detail=f"guest fault at rip={hlt:#x} (triple fault: no IDT): `hlt` at CPL 3 "
                                      "raises #GP")
        return self.result("halt", rip_after=rip, exits=self.exits)

    #: seconds the timeout waits for the run to stop exactly (at its next store to a
    #: protected page, held back, or its next port I/O) before stopping it from the timer
    #: thread, which Unicorn does mid-block
    _HARD_STOP_AFTER = 0.05

    def _time_out(self, run_id: int) -> None:
        """The timer of run ``run_id``: mark the run as ending (its next store to a
        protected page is held back, its next port I/O stops it: both exact), and stop
        it from this thread only if it has not stopped after _HARD_STOP_AFTER."""
        with self._stop_lock:
            if not self._emulating or run_id != self._run_id:
                return  # (that run is over)
            self._timed_out = True
            self._ending = True
            self._mirror_off()
            t = threading.Timer(self._HARD_STOP_AFTER, self._hard_stop, args=(run_id,))
            t.daemon = True
            self._hard_timer = t
            t.start()

    def _hard_stop(self, run_id: int) -> bool:
        """Stop run ``run_id`` from another thread, mid-block (see _run); False when that
        run is over (or the engine closed)."""
        with self._stop_lock:
            if not self._emulating or run_id != self._run_id or self._closed:
                return False
            self._hard_stopped = True
            self._ending = True
            self._mirror_off()
            self.uc.emu_stop()
            return True

    def _interrupt(self) -> None:
        """request_pause() from another thread: the pause lands at the next store to a
        protected page (or port I/O), so none may be made by the mirror."""
        self._mirror_off()

    def _on_ctrl_c(self, run_id: int) -> None:
        """Ctrl-C while the guest runs (see _CtrlC): stop the emulation, from the watching
        thread, so run() raises KeyboardInterrupt now.  That stop may land mid-block (see
        _run), so the guest cannot be continued."""
        if self._hard_stop(run_id):
            self._ctrl_c = True
            self._inexact = _mid_block("was interrupted (KeyboardInterrupt), which stops Unicorn")

    def _release(self) -> None:
        # uc_close: the emulator and its translation cache (guest RAM is the Vm's and
        # stays readable).  Through the binding's finalizer, which runs once.
        fin = getattr(self.uc, "_Uc__finalizer", None)
        if fin is not None:
            fin()


def _mid_block(how: str, advice: str = "") -> str:
    """Why a guest stopped from another thread cannot be continued (see UnicornEngine._run)."""
    return (f"the last run {how} in the middle of a translated block with RIP at the block's start "
            "(continuing would run instructions twice): this guest cannot be continued exactly; construct a "
            "new engine" + (f", {advice}" if advice else ""))


class _CtrlC:
    """While the main thread is inside Unicorn: Ctrl-C stops the emulation at once.

    Python runs its SIGINT handler (which raises KeyboardInterrupt) only between
    bytecodes, never inside ``emu_start``, so a guest that makes no callback would run on
    until the timeout.  Python's C-level handler also writes the signal's number to the
    wakeup fd (``signal.set_wakeup_fd``, here one end of a socket pair, which works on
    every platform); a thread waiting on the other end calls ``on_sigint`` (which stops
    the emulation) and passes every number on to the wakeup fd that was there before.
    Only on the main thread, and only while SIGINT has Python's default handler (so
    KeyboardInterrupt follows for sure).  :meth:`start`, then :meth:`close`, which is
    idempotent and undoes whatever :meth:`start` did, even when start() was interrupted."""

    def __init__(self) -> None:
        self._socks: tuple[socket.socket, ...] = ()
        self._thread: threading.Thread | None = None
        self._wakeup: int | None = None  # the wakeup fd set here (still ours to restore)
        self._old = -1  # the wakeup fd before (-1: none, or lost to a KeyboardInterrupt in start())
        self._prev_unraisable: Callable | None = None  # sys.unraisablehook before start(), while ours is installed

    def start(self, on_sigint) -> None:
        if threading.current_thread() is not threading.main_thread() \
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return
        try:
            r, w = socket.socketpair()
            self._socks = (r, w)
            stop_r, stop_w = socket.socketpair()
            self._socks = (r, w, stop_r, stop_w)
            w.setblocking(False)
            with signals_held():
                # (ours marked first: whenever a KeyboardInterrupt lands, close() puts back
                # whatever is not ours)
                self._wakeup = w.fileno()
                self._old = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
            # SIGTERM too where it raises KeyboardInterrupt as SIGINT does (the command line)
            stops = bytes([signal.SIGINT] + [signal.SIGTERM] * (getattr(signal, "SIGTERM", None) is not None
                          and signal.getsignal(signal.SIGTERM) is signal.default_int_handler))
            self._thread = threading.Thread(target=self._watch, args=(r, stop_r, self._old, on_sigint, stops),
                                            daemon=True, name="sppkit-unicorn-ctrl-c")
            self._thread.start()
            # The KeyboardInterrupt may be raised inside a callback of Unicorn's binding,
            # where ctypes "ignores" it with a traceback on stderr; the run raises it all
            # the same (UnicornEngine._run), so that report is not printed.
            self._prev_unraisable = sys.unraisablehook
            sys.unraisablehook = self._unraisable
        except (OSError, ValueError):
            self.close()  # (no sockets or no wakeup fd here: no prompt Ctrl-C)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _watch(r: socket.socket, stop_r: socket.socket, old: int, on_sigint, stops: bytes) -> None:
        with selectors.DefaultSelector() as sel:  # (not select.select: no limit on fd numbers)
            sel.register(r, selectors.EVENT_READ)
            sel.register(stop_r, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in sel.select()}
                if r in ready:
                    data = r.recv(512)
                    if any(sig in data for sig in stops):
                        on_sigint()
                    if old != -1:
                        try:
                            os.write(old, data)
                        except OSError:
                            pass
                if stop_r in ready:
                    return

    def __del__(self) -> None:
        # (a close() cut short by a Ctrl-C storm: never leave the wakeup fd on a closed socket)
        if self._wakeup is not None and threading.current_thread() is threading.main_thread():
            try:
                self.close()
            except Exception:
                pass

    def close(self) -> None:
        if self._wakeup is None and self._thread is None and not self._socks:
            return
        with signals_held():  # (all of it, or a Ctrl-C could leave the wakeup fd on a closed socket)
            if self._wakeup is not None:
                # put the caller's wakeup fd back, unless someone replaced ours meanwhile
                cur = signal.set_wakeup_fd(self._old)
                if cur != self._wakeup:
                    signal.set_wakeup_fd(cur)
                self._wakeup = None
            if self._thread is not None:
                if self._thread.is_alive():
                    self._socks[3].send(b"x")
                    self._thread.join()
                self._thread = None
            for sock in self._socks:
                sock.close()
            self._socks = ()
            if self._prev_unraisable is not None:
                if sys.unraisablehook == self._unraisable:
                    sys.unraisablehook = self._prev_unraisable
                self._prev_unraisable = None

    def _unraisable(self, u) -> None:
        if not isinstance(u.exc_value, KeyboardInterrupt):
            (self._prev_unraisable or sys.__unraisablehook__)(u)


#: instructions whose stores QEMU makes inside a helper (not in translated code)
_HELPER_STORE = re.compile(r"^(?:lock )?(?:cmpxchg8b|cmpxchg16b|fxsave|fxsave64|xsave\w*|fn?stenv|fn?save|fbstp|"
                           r"maskmovdqu|maskmovq)\b|^fstp tbyte")


def _is_helper_store(text: str) -> bool:
    return _HELPER_STORE.search(text) is not None


def _vector_store_info(code: bytes, rip: int):
    """Decode ``code``: for `movdqu/movaps/movntdq... [mem], xmm` return
    ((unicorn register, operand bytes), instruction); () otherwise."""
    import iced_x86
    import unicorn.x86_const as X

    ins = iced_x86.Decoder(64, code, ip=rip).decode()
    if ins.code == iced_x86.Code.INVALID or ins.op_count != 2 or ins.op0_kind != iced_x86.OpKind.MEMORY:
        return ()
    if ins.op1_kind != iced_x86.OpKind.REGISTER:
        return ()
    reg = ins.op1_register
    size = iced_x86.MemorySizeInfo(ins.memory_size).size
    if size <= 8:
        return ()
    for prefix, count, width in (("XMM", 32, 16), ("YMM", 32, 32)):
        for i in range(count):
            if reg == getattr(iced_x86.Register, f"{prefix}{i}", None):
                ureg = getattr(X, f"UC_X86_REG_{prefix}{i}", None)
                if ureg is None or size != width:
                    return ()
                return ((ureg, size), ins)
    return ()


def _operand_address(ins, regs: dict[str, int]) -> int | None:
    """The memory operand's address of ``ins`` with ``regs`` (flat segments)."""
    import iced_x86

    from .x86 import _REG64

    def val(r):
        if r == iced_x86.Register.NONE:
            return 0
        if r == iced_x86.Register.RIP:
            return ins.next_ip
        name = _REG64.get(r)
        return regs.get(name, 0) if name else 0

    return (val(ins.memory_base) + val(ins.memory_index) * ins.memory_index_scale
            + ins.memory_displacement) & 0xFFFF_FFFF_FFFF_FFFF
