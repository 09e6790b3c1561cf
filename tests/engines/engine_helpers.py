"""Shared constants and markers for the engine tests (imported by name: pytest puts
tests/engines on sys.path)."""

from __future__ import annotations

import os

import pytest

from sppkit.guests import toolchain_status

PAGE = 4096
SUB = 128
RAM = 16 << 20
MIXED_POLICY = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "mixed.toml")

_toolchain_ok, _toolchain_why = toolchain_status()
needs_gcc = pytest.mark.skipif(not _toolchain_ok, reason=f"guest programs cannot be built: {_toolchain_why}")
