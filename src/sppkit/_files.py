"""Reading a user's input file whole: one rule for guest ELFs and policies."""

from __future__ import annotations

import os
import stat


#: os.open flags to read a file whole: non-blocking (a FIFO must not wait for a writer)
#: and binary (no newline translation), where the platform has them
READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


class FileProblem(ValueError):
    """Why a file cannot be read whole; the message does not name the path (the caller
    puts it in its own error)."""


def read_regular_file(path, limit: int, what: str) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them.

    A directory, device, FIFO or socket is refused before a byte is read (``/dev/zero``
    would never end, a FIFO would wait for a writer: the file is opened with
    O_NONBLOCK), and so is a file larger than ``limit``; ``what`` names what the file
    should be ("a policy file").  Every refusal is a :class:`FileProblem`."""
    try:
        fd = os.open(path, READ_FLAGS)
    except OSError as e:
        raise FileProblem(f"cannot read {what}: {e.strerror or e}") from None
    except (ValueError, TypeError) as e:  # an embedded NUL byte, not a path
        raise FileProblem(f"not a usable path for {what}: {e}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise FileProblem(f"is a directory, not {what}")
        if not stat.S_ISREG(info.st_mode):
            raise FileProblem(f"not a regular file (a device, FIFO or socket), not {what}")
        if info.st_size > limit:
            raise FileProblem(f"{info.st_size:,} bytes: more than sppkit reads for {what} "
                              f"(at most {limit:,} bytes)")
        with open(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)
    except OSError as e:
        raise FileProblem(f"cannot read {what}: {e.strerror or e}") from None
    finally:
        os.close(fd)
