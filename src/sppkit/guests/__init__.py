"""Guest programs for sppkit's engines: freestanding C sources, their builder, ELF loading.

* :func:`build_guest` compiles ``programs/<name>.c`` (or any ``.c``) with the
  runtime in ``runtime/`` into a static x86-64 ELF at 0x400000 (cached).
* :func:`load_elf` turns an ELF into a :class:`GuestImage` (segments, entry,
  symbols); :func:`flat_image` does the same for a raw binary.

Guest conventions: port 0xE9 is the debug console (one byte per ``out``), port
0xF4 the isa-debug-exit (a 32-bit ``out`` of the exit code).  ``_start`` calls
``main()`` and exits with its return value.
"""

from .build import (
    BASE_CFLAGS,
    PROGRAMS_DIR,
    RUNTIME_DIR,
    GuestBuildError,
    GuestSourceError,
    build_guest,
    guest_cache_dir,
    list_programs,
    program_path,
    toolchain_status,
)
from .elf import GuestImage, GuestImageError, Segment, Symbol, SymbolNotFound, flat_image, load_elf

#: The I/O ports of the guest runtime (see runtime/sppkit_rt.h).
PORT_CONSOLE = 0xE9
PORT_EXIT = 0xF4
#: Where link.ld places the image (and ``_start``).
LOAD_ADDRESS = 0x400000

__all__ = [
    "BASE_CFLAGS", "LOAD_ADDRESS", "PORT_CONSOLE", "PORT_EXIT", "PROGRAMS_DIR", "RUNTIME_DIR",
    "GuestBuildError", "GuestImage", "GuestSourceError", "GuestImageError", "Segment", "Symbol", "SymbolNotFound",
    "build_guest", "flat_image", "guest_cache_dir", "list_programs", "load_elf", "program_path",
    "toolchain_status",
]
