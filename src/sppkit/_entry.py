"""The ``sppkit`` console script: a Ctrl-C (or SIGTERM) while sppkit's modules are still
loading ends it with the same one line and status as one during a command, not a
traceback from the middle of an import."""

from __future__ import annotations

import sys


def main():
    try:
        from .cli import main as cli
    except KeyboardInterrupt:
        sys.stderr.write("sppkit: error: interrupted\n")
        raise SystemExit(130) from None
    return cli()
