"""Shared helpers for the sppkit.arch bad-input tests (imported by name: pytest puts
tests/arch on sys.path)."""

from __future__ import annotations

import re
import signal
from contextlib import contextmanager


def shown(v) -> str:
    """How an error message names a bad value: an int in hex, anything else by repr."""
    return f"{v:#x}" if type(v) is int else repr(v)


def named(name: str, v) -> str:
    """A ``match=`` pattern: the message names ``name=<value>``."""
    return re.escape(f"{name}={shown(v)}")


@contextmanager
def deadline(seconds: float):
    """Fail (TimeoutError) a pure-Python loop still running after ``seconds``."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
