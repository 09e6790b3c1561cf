"""Build and load sppkit's small C helpers with the host C compiler.

The C sources ship with the package and are compiled on first use (``$CC``, else
``cc``, ``gcc`` or ``clang``; ``-O2 -shared -fPIC`` against this Python's headers) into
``$SPPKIT_CACHE/native`` (default ``${XDG_CACHE_HOME:-~/.cache}/sppkit/native``), under
a name keyed by a hash of the source and the compiler's version, written atomically, so
later runs load them at once.  Without a compiler — or with ``SPPKIT_NATIVE=0`` — every
caller keeps its pure-Python path (same results, slower) and :func:`status` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from ._cache import cache_root

_loaded: dict[Path, tuple[ctypes.CDLL | None, str]] = {}


def cache_dir() -> Path:
    return cache_root() / "native"


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def python_include() -> Path | None:
    """The directory holding this interpreter's ``Python.h``, or None."""
    inc = sysconfig.get_paths().get("include")
    return Path(inc) if inc and (Path(inc) / "Python.h").exists() else None


def _build(source: Path) -> Path:
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc or clang)")
    inc = python_include()
    if inc is None:
        raise RuntimeError(f"Python.h not found (the Python development headers of {sys.executable} "
                           "are not installed)")
    src = source.read_bytes() + str(inc).encode() + sys.version.encode()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"cannot run {cc} --version: {e}") from None
    key = hashlib.sha256(src + version.encode() + f"{sys.platform} {platform.machine()}".encode()).hexdigest()[:16]
    out = cache_dir() / f"{source.stem}-{key}{'.dylib' if sys.platform == 'darwin' else '.so'}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = Path(tmp) / out.name
        # Python's symbols are resolved at load time from the running interpreter.
        extra = ["-undefined", "dynamic_lookup"] if sys.platform == "darwin" else []
        r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-Wall", f"-I{inc}", *extra, "-o", str(tmp_out),
                            str(source)],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed on {source.name}: {r.stderr.strip()[-500:]}")
        os.replace(tmp_out, out)  # atomic: a concurrent build wins or loses whole
    return out


def load(source: Path) -> ctypes.CDLL | None:
    """The compiled ``source``, or None (:func:`status` says why)."""
    source = Path(source)
    hit = _loaded.get(source)
    if hit is None:
        hit = _loaded[source] = _load(source)
    return hit[0]


def _load(source: Path) -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("SPPKIT_NATIVE", "1") == "0":
        return None, "disabled by SPPKIT_NATIVE=0"
    if sys.byteorder != "little":
        return None, "the helpers pass guest words little-endian; this host is big-endian"
    try:
        path = _build(source)
        lib = ctypes.CDLL(str(path))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return None, f"not built: {e}"
    return lib, f"built with {compiler()} ({path})"


def status(source: Path) -> tuple[bool, str]:
    """``(available, what)`` of ``source``'s library (built on first call)."""
    load(source)
    lib, what = _loaded[Path(source)]
    return lib is not None, what
