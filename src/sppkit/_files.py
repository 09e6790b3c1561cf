"""Reading a user's input file whole: one rule for guest ELFs and policies."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import threading


#: os.open flags to read a file whole: non-blocking (a FIFO must not wait for a writer)
#: and binary (no newline translation), where the platform has them
READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM blocked for this thread while the block runs (where the
    platform can): a Ctrl-C or SIGTERM arriving meanwhile raises its KeyboardInterrupt
    once the block is over, so a file the block creates is known to whoever cleans up."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = mask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, old)


class FileProblem(ValueError):
    """Why a file cannot be read whole; the message does not name the path (the caller
    puts it in its own error)."""


class NotRegularFile(OSError):
    """A device, FIFO or socket where a regular file was expected."""


class FileTooLarge(OSError):
    """A regular file larger than the caller reads."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(errno.EFBIG, f"{size:,} bytes, more than {limit:,}")
        self.size, self.limit = size, limit


def read_regular(path, limit: int | None = None, head=None) -> bytes:
    """The bytes of the regular file ``path`` (at most ``limit`` of them), as
    ``Path.read_bytes()`` gives them, but a directory (IsADirectoryError), a device, FIFO
    or socket (:class:`NotRegularFile`) or a file over ``limit`` (:class:`FileTooLarge`)
    is refused before a byte is read: ``/dev/zero`` would never end, a FIFO would wait for
    a writer (the file is opened non-blocking).  Every failure is an OSError.
    ``head``: called with the file's first bytes (up to 64) before the rest is read,
    to refuse a file of the wrong kind without reading all of it (what it raises
    propagates)."""
    fd = os.open(path, READ_FLAGS)
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file (a device, FIFO or socket)", str(path))
        if limit is not None and info.st_size > limit:
            raise FileTooLarge(info.st_size, limit)
        with open(fd, "rb", closefd=False) as f:
            first = b""
            if head is not None:
                first = f.read(64)
                head(first)
            if limit is None:
                return first + f.read()
            # Ask for what fstat promised (never ``limit`` bytes at once: a buffer of
            # --memory 512G would be allocated whole), then read on to the end in case
            # the file grew meanwhile.
            data = first + f.read(max(0, info.st_size + 1 - len(first)))
            while len(data) <= limit:
                more = f.read(min(1 << 20, limit + 1 - len(data)))
                if not more:
                    break
                data += more
        if len(data) > limit:  # (it grew while read: its size now, at least what was read)
            raise FileTooLarge(max(len(data), os.fstat(fd).st_size), limit)
        return data
    finally:
        os.close(fd)


def read_regular_file(path, limit: int, what: str, head=None) -> bytes:
    """:func:`read_regular` for a user's input file; ``what`` names what the file should
    be ("a policy file").  Every refusal is a :class:`FileProblem` (``head``'s own
    errors propagate as they are)."""
    try:
        return read_regular(path, limit, head)
    except IsADirectoryError:
        raise FileProblem(f"is a directory, not {what}") from None
    except NotRegularFile:
        raise FileProblem(f"not a regular file (a device, FIFO or socket), not {what}") from None
    except FileTooLarge as e:
        raise FileProblem(f"{e.size:,} bytes: more than sppkit reads for {what} (at most {limit:,} bytes)") from None
    except OSError as e:
        raise FileProblem(f"cannot read {what}: {e.strerror or e}") from None
    except (ValueError, TypeError) as e:  # an embedded NUL byte, not a path
        raise FileProblem(f"not a usable path for {what}: {e}") from None
