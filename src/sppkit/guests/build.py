"""Build freestanding guest programs with the system gcc, with a content-addressed cache.

A guest is ``runtime/start.S`` + ``runtime/sppkit_rt.c`` + one program ``.c``, linked
by ``runtime/link.ld`` into a static ELF at 0x400000.  The flags keep the code to
general-purpose registers: KVM cannot emulate SSE/AVX/x87 stores, ``cmpxchg16b`` or
``fxsave`` on write-protected pages (platform notes §1.4).

Outputs are cached in ``$SPPKIT_CACHE/guests`` (default ``~/.cache/sppkit/guests``,
honouring ``$XDG_CACHE_HOME``) under a name keyed by a hash of the sources (the
program, every runtime file, every ``.h`` beside the program), the flags and the
compiler's version, and written atomically (temporary file + rename), so concurrent
builds and interrupted builds never leave a partial ELF behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .._cache import cache_root

__all__ = [
    "BASE_CFLAGS", "GuestBuildError", "PROGRAMS_DIR", "RUNTIME_DIR", "build_guest", "guest_cache_dir",
    "list_programs", "program_path", "toolchain_status",
]

GUESTS_DIR = Path(__file__).resolve().parent
RUNTIME_DIR = GUESTS_DIR / "runtime"
PROGRAMS_DIR = GUESTS_DIR / "programs"
LINK_SCRIPT = RUNTIME_DIR / "link.ld"
RUNTIME_SOURCES = (RUNTIME_DIR / "start.S", RUNTIME_DIR / "sppkit_rt.c")

COMPILER = "gcc"
INSTALL_HINT = "install a C toolchain, e.g. on Debian/Ubuntu: apt-get install gcc binutils"

BASE_CFLAGS: tuple[str, ...] = (
    "-O2", "-ffreestanding", "-fno-pie", "-no-pie", "-nostdlib", "-static",
    "-mgeneral-regs-only", "-mno-sse", "-mno-mmx", "-mno-80387", "-mno-red-zone",
    "-fno-asynchronous-unwind-tables", "-fno-stack-protector", "-fcf-protection=none",
    "-Wall", "-Wextra",
)
LINK_FLAGS: tuple[str, ...] = ("-Wl,-T," + str(LINK_SCRIPT), "-Wl,--build-id=none")

_BUILD_TIMEOUT = 120  # seconds
_version_cache: dict[tuple, str] = {}


class GuestBuildError(RuntimeError):
    """A guest program that could not be built: missing compiler, unknown program,
    or a compile/link failure (the message carries the compiler's stderr)."""


class GuestSourceError(GuestBuildError, ValueError):
    """The guest asked for is the problem — no such program or file, not a ``.c`` file,
    or a source of the user's that does not compile — not the machine: bad input (the
    command line exits with status 2, as for any bad input)."""


def guest_cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where built guests go: ``override``, else ``$SPPKIT_CACHE/guests``, else
    ``${XDG_CACHE_HOME:-~/.cache}/sppkit/guests``."""
    if override is not None:
        return Path(override)
    return cache_root() / "guests"


def list_programs() -> list[str]:
    """Names of the bundled guest programs (``programs/<name>.c``), sorted."""
    return sorted(p.stem for p in PROGRAMS_DIR.glob("*.c"))


def program_path(name_or_path: str | os.PathLike) -> Path:
    """The ``.c`` file for a bundled program name or a path to a ``.c`` file."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise GuestSourceError(f"a guest is a bundled program name or a path to a .c file, got "
                              f"{type(name_or_path).__name__} {name_or_path!r}")
    s = os.fspath(name_or_path)
    if not isinstance(s, str):
        s = os.fsdecode(s)
    if "\0" in s:
        raise GuestSourceError(f"guest {s!r}: a name or path cannot contain a NUL byte")
    looks_like_path = isinstance(name_or_path, os.PathLike) or s.endswith(".c") or os.sep in s or "/" in s
    if looks_like_path:
        p = Path(s).expanduser()
        if p.is_dir():
            raise GuestSourceError(f"guest source {p}: is a directory, not a .c file")
        if not p.is_file():
            what = "no such file" if not p.exists() else "not a regular file"
            raise GuestSourceError(f"guest source {p}: {what}")
        if p.suffix != ".c":
            raise GuestSourceError(f"guest source {p}: not a C source file (the name must end in .c)")
        return p.resolve()
    p = PROGRAMS_DIR / f"{s}.c"
    if not p.is_file():
        names = ", ".join(list_programs()) or "(none)"
        raise GuestSourceError(f"no bundled guest program {s!r}; bundled programs: {names} (or give a path to a .c file)")
    return p


def _find_compiler() -> str:
    gcc = shutil.which(COMPILER)
    if gcc is None:
        raise GuestBuildError(f"cannot build guest programs: {COMPILER!r} not found on PATH; {INSTALL_HINT}")
    return gcc


def _compiler_version(gcc: str) -> str:
    """``gcc --version`` plus the target triple, cached per compiler binary (path,
    mtime, size), so a cache hit costs no compiler run."""
    key: tuple[str, int | None, int | None]
    try:
        st = os.stat(gcc)
        key = (gcc, st.st_mtime_ns, st.st_size)
    except OSError:
        key = (gcc, None, None)
    if key not in _version_cache:
        try:
            out = subprocess.run(
                [gcc, "--version"], capture_output=True, text=True, timeout=30, check=True
            ).stdout
            machine = subprocess.run(
                [gcc, "-dumpmachine"], capture_output=True, text=True, timeout=30, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError) as e:
            raise GuestBuildError(f"cannot run {gcc} --version: {e}; {INSTALL_HINT}") from e
        _version_cache[key] = out.strip() + "\n" + machine.strip()
    return _version_cache[key]


def toolchain_status() -> tuple[bool, str]:
    """``(True, "gcc 12.2.0 (x86_64-linux-gnu) at /usr/bin/gcc")`` when guests can be
    built, else ``(False, reason)`` - for test skips and ``sppkit doctor``."""
    try:
        gcc = _find_compiler()
        version = _compiler_version(gcc)
    except GuestBuildError as e:
        return False, str(e)
    missing = [tool for tool in ("as", "ld") if shutil.which(tool) is None]
    if missing:
        return False, f"cannot build guest programs: {', '.join(missing)} not found on PATH; {INSTALL_HINT}"
    first, _, rest = version.partition("\n")
    machine = rest.strip().splitlines()[-1] if rest.strip() else "?"
    if not machine.startswith(("x86_64", "amd64")):
        return False, f"{gcc} targets {machine}, not x86_64; guests need an x86-64 gcc"
    number = first.split()[-1] if first.split() else first
    return True, f"gcc {number} ({machine}) at {gcc}"


def _source_files(src: Path) -> list[Path]:
    """Every file whose content determines the output: runtime + program + its headers
    (those beside it, and the bundled programs' ones every guest may include)."""
    files = sorted(RUNTIME_DIR.iterdir()) + [src]
    files += sorted(p for p in src.parent.glob("*.h") if p.is_file())
    files += sorted(p for p in PROGRAMS_DIR.glob("*.h") if p.is_file())
    out: list[Path] = []
    for f in files:
        if f.is_file() and f not in out:
            out.append(f)
    return out


def _build_key(src: Path, flags: list[str], version: str) -> str:
    h = hashlib.sha256()
    h.update(b"sppkit-guest-build-v1\0")
    for f in _source_files(src):
        h.update(f.name.encode() + b"\0")
        try:
            data = f.read_bytes()
        except OSError as e:
            raise GuestBuildError(f"building {src}: cannot read {f}: {e.strerror or e}") from e
        h.update(len(data).to_bytes(8, "little") + data)
    h.update("\0".join(flags).encode() + b"\0")
    h.update(version.encode())
    return h.hexdigest()[:20]


def build_guest(
    name_or_path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    cflags: tuple[str, ...] | list[str] = (),
) -> Path:
    """Build a guest program and return the path of its ELF (cached).

    ``name_or_path``: a bundled program name (see :func:`list_programs`) or a path to
    a ``.c`` file (it may ``#include "sppkit_rt.h"``).  ``cflags`` are appended to the
    base flags (e.g. ``("-DN=100",)``).  Raises :class:`GuestBuildError`.
    """
    src = program_path(name_or_path)
    try:
        flags_ok = not isinstance(cflags, (str, bytes)) and all(isinstance(f, str) for f in cflags)
    except TypeError:
        flags_ok = False
    if not flags_ok:
        raise GuestBuildError(f"building {src}: cflags must be a list or tuple of strings "
                              f"(e.g. ('-DN=100',)), got {cflags!r}")
    gcc = _find_compiler()
    version = _compiler_version(gcc)
    # (the bundled programs' headers — guardalloc.h, ckpt_signal.h — serve a guest of the
    # user's as they serve them)
    flags = [*BASE_CFLAGS, f"-I{RUNTIME_DIR}", f"-I{PROGRAMS_DIR}", *LINK_FLAGS, *cflags]
    key = _build_key(src, flags, version)

    out_dir = guest_cache_dir(cache_dir)
    out = out_dir / f"{src.stem}-{key}.elf"
    digest_file = out.with_name(out.name + ".sha256")
    if _cached_ok(out, digest_file):
        return out
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{src.stem}-", suffix=".elf.tmp", dir=out_dir)
    except OSError as e:
        raise GuestBuildError(f"cannot write to the guest cache directory {out_dir}: {e.strerror or e} "
                              "(set $SPPKIT_CACHE or pass cache_dir= to use another)") from e
    os.close(fd)
    tmp = Path(tmp_name)
    tmp_digest = tmp.with_name(tmp.name + ".sha256")
    cmd = [gcc, *flags, "-o", str(tmp), *map(str, RUNTIME_SOURCES), str(src)]
    try:
        try:
            # errors="replace": gcc quotes source lines, which need not be UTF-8
            proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=_BUILD_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            raise GuestBuildError(f"building {src}: {gcc} took longer than {_BUILD_TIMEOUT} s") from e
        except OSError as e:
            raise GuestBuildError(f"building {src}: cannot run {gcc}: {e}; {INSTALL_HINT}") from e
        if proc.returncode != 0:
            # the user's own source is bad input; a bundled program that fails is the machine's
            raise (GuestBuildError if Path(src).resolve().parent == PROGRAMS_DIR.resolve() else GuestSourceError)(
                f"building {src} failed (gcc exit status {proc.returncode}):\n"
                f"{proc.stderr.strip() or proc.stdout.strip() or '(no output)'}\n"
                f"command: {' '.join(cmd)}"
            )
        try:
            os.chmod(tmp, 0o644)
            tmp_digest.write_text(hashlib.sha256(tmp.read_bytes()).hexdigest() + "\n", encoding="ascii")
            # the digest first: a reader that sees the new ELF with an old digest rebuilds
            os.replace(tmp_digest, digest_file)
            os.replace(tmp, out)
        except OSError as e:
            raise GuestBuildError(f"building {src}: cannot store the result in the guest cache directory "
                                  f"{out_dir}: {e.strerror or e}") from e
    finally:
        for t in (tmp, tmp_digest):
            try:
                t.unlink()
            except OSError:
                pass
    return out


def _cached_ok(out: Path, digest_file: Path) -> bool:
    """``out`` is a complete cached build: its SHA-256 matches the digest written with
    it.  A truncated or damaged entry (or one without a digest) is rebuilt, not loaded."""
    try:
        want = digest_file.read_text(encoding="ascii").strip()
        data = out.read_bytes()
    except (OSError, UnicodeDecodeError):
        return False
    return hashlib.sha256(data).hexdigest() == want
