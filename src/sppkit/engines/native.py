"""The Unicorn engine's native write-protect hook (writeprot.c): build, load, drive.

The hook is a software TLB in front of the Python hook.  The C source ships with the
package and is compiled on first use with the host's C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``) into ``$SPPKIT_CACHE/native`` (default
``${XDG_CACHE_HOME:-~/.cache}/sppkit/native``), keyed by a hash of the source and the
compiler, so later runs load it at once.  Without a compiler the engine runs with the
Python hook alone — the same decisions, slower — and says why (``native_status()``,
``sppkit doctor``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("writeprot.c")
PAGE_SLOTS = 4096  # pages described at once (power of two; the table fills to 3/4)
RIP_SLOTS = 4096  # store instructions known to write at most 8 bytes
_COLLECT = 512  # pages collected per call

_lib = None
_status: tuple[bool, str] | None = None

_SLOW = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int,
                         ctypes.c_int64, ctypes.c_void_p)


class PageEntry(ctypes.Structure):
    _fields_ = [("key", ctypes.c_uint64), ("allowed", ctypes.c_uint32), ("protected_page", ctypes.c_uint32),
                ("count", ctypes.c_uint64)]


class State(ctypes.Structure):
    """Mirror of ``struct state`` in writeprot.c."""

    _fields_ = [
        ("ram", ctypes.c_void_p), ("ram_size", ctypes.c_uint64),
        ("reg_read", ctypes.c_void_p), ("rip_reg", ctypes.c_int32), ("enabled", ctypes.c_int32),
        ("slow", ctypes.c_void_p), ("slow_data", ctypes.c_void_p),
        ("pages", ctypes.c_void_p), ("rips", ctypes.c_void_p),
        ("page_slots", ctypes.c_uint32), ("rip_slots", ctypes.c_uint32),
        ("cover_rip", ctypes.c_uint64), ("cover_lo", ctypes.c_uint64), ("cover_hi", ctypes.c_uint64),
        ("cover_valid", ctypes.c_int32), ("cover_ret", ctypes.c_int32),
        ("pending", ctypes.c_uint64), ("fast", ctypes.c_uint64), ("slow_calls", ctypes.c_uint64),
        ("page_used", ctypes.c_uint32), ("rip_used", ctypes.c_uint32),
    ]


def cache_dir() -> Path:
    env = os.environ.get("SPPKIT_CACHE")
    if env:
        return Path(env) / "native"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sppkit" / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build() -> Path:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc or clang)")
    src = SOURCE.read_bytes()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"cannot run {cc} --version: {e}") from None
    key = hashlib.sha256(src + version.encode() + f"{sys.platform} {platform.machine()}".encode()).hexdigest()[:16]
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    out = cache_dir() / f"writeprot-{key}{suffix}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-Wall", "-o", str(tmp_out), str(SOURCE)],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE.name}: {r.stderr.strip()[-500:]}")
        os.replace(tmp_out, out)  # atomic: a concurrent build wins or loses whole
    return out


def load():
    """The loaded library, or None (``native_status()`` says why)."""
    global _lib, _status
    if _status is not None:
        return _lib
    if sys.byteorder != "little":
        _status = (False, "the native hook commits stores as little-endian words; this host is big-endian")
        return None
    if os.environ.get("SPPKIT_NATIVE", "1") == "0":
        _status = (False, "disabled by SPPKIT_NATIVE=0")
        return None
    try:
        path = _build()
        lib = ctypes.CDLL(str(path))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        _status = (False, f"not built: {e}")
        return None
    lib.sppkit_wp_add_page.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32]
    lib.sppkit_wp_add_rip.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    lib.sppkit_wp_clear_pages.argtypes = [ctypes.c_void_p]
    lib.sppkit_wp_collect.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_uint32]
    lib.sppkit_wp_collect.restype = ctypes.c_uint32
    _lib = lib
    _status = (True, f"native write-protect hook built with {_compiler()} ({path})")
    return lib


def native_status() -> tuple[bool, str]:
    """``(available, what)`` for ``sppkit doctor`` and the engine."""
    load()
    return _status


class NativeHook:
    """One engine's native hook: its state, page and instruction tables, and the
    ``UC_HOOK_MEM_WRITE_PROT`` registration in front of ``slow`` (the Python hook,
    called as ``slow(access, address, size, value) -> bool``)."""

    def __init__(self, lib, uc, ram_address: int, ram_size: int, slow) -> None:
        from unicorn.unicorn_const import UC_HOOK_MEM_WRITE_PROT
        from unicorn.unicorn_py3.unicorn import uclib
        from unicorn.x86_const import UC_X86_REG_RIP

        self.lib = lib
        self._pages = (PageEntry * PAGE_SLOTS)()
        self._rips = (ctypes.c_uint64 * RIP_SLOTS)()
        self._slow = _SLOW(lambda _uc, access, address, size, value, _ud: bool(slow(access, address, size, value)))
        st = self.state = State()
        st.ram, st.ram_size = ram_address, ram_size
        st.reg_read = ctypes.cast(uclib.uc_reg_read, ctypes.c_void_p).value
        st.rip_reg, st.enabled = UC_X86_REG_RIP, 1
        st.slow = ctypes.cast(self._slow, ctypes.c_void_p).value
        st.pages, st.rips = ctypes.addressof(self._pages), ctypes.addressof(self._rips)
        st.page_slots, st.rip_slots = PAGE_SLOTS, RIP_SLOTS
        self._ptr = ctypes.byref(st)
        self._gfns = (ctypes.c_uint64 * _COLLECT)()
        self._counts = (ctypes.c_uint64 * _COLLECT)()
        self._prot = (ctypes.c_uint32 * _COLLECT)()
        self.handle = ctypes.c_size_t()
        fn = ctypes.cast(lib.sppkit_wp_hook, ctypes.c_void_p).value
        err = uclib.uc_hook_add(uc._uch, ctypes.byref(self.handle), UC_HOOK_MEM_WRITE_PROT, fn,
                                ctypes.addressof(st), 1, 0)
        if err:
            raise RuntimeError(f"uc_hook_add of the native write-protect hook failed (error {err})")

    def add_page(self, gfn: int, allowed: int, protected: bool) -> bool:
        return self.lib.sppkit_wp_add_page(self._ptr, gfn, allowed, int(protected)) == 0

    def add_rip(self, rip: int) -> None:
        self.lib.sppkit_wp_add_rip(self._ptr, rip)

    def set_cover(self, rip: int, lo: int, hi: int, ret: bool) -> None:
        st = self.state
        st.cover_rip, st.cover_lo, st.cover_hi, st.cover_ret, st.cover_valid = rip, lo, hi, int(ret), 1

    def collect(self):
        """Yield ``(gfn, writes, protected)`` for the writes committed natively since
        the last call."""
        if not self.state.pending:
            return
        while True:
            n = self.lib.sppkit_wp_collect(self._ptr, self._gfns, self._counts, self._prot, _COLLECT)
            for i in range(n):
                yield self._gfns[i], self._counts[i], bool(self._prot[i])
            if n < _COLLECT:
                break

    def clear_pages(self) -> None:
        self.lib.sppkit_wp_clear_pages(self._ptr)
