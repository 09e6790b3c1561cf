"""The ``sppkit`` console script: a Ctrl-C (or SIGTERM) while sppkit's modules are still
loading ends it with the same one line and status as one during a command, not a
traceback from the middle of an import."""

from __future__ import annotations

import signal
import sys


def main():
    if hasattr(signal, "SIGTERM") and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # SIGTERM as Ctrl-C from the start (sppkit.cli's main does the same for callers
        # that invoke it directly)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        from .cli import main as cli
    except KeyboardInterrupt:
        sys.stderr.write("sppkit: error: interrupted\n")
        raise SystemExit(130) from None
    return cli()
