"""Where sppkit caches what it builds (guest programs, C helpers)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$SPPKIT_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/sppkit``."""
    env = os.environ.get("SPPKIT_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sppkit"
