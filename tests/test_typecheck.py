"""sppkit type-checks clean under mypy, with the settings in pyproject.toml
``[tool.mypy]``: an Optional used unchecked, a walk returning a value of the wrong
kind, an engine constructed with arguments it does not take — each fails here before
it can surface as a wrong decision or a traceback elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "sppkit"


def test_sppkit_type_checks_clean(tmp_path):
    api = pytest.importorskip("mypy.api", reason="mypy is a test dependency: make test installs it")
    out, err, status = api.run([
        "--config-file", str(ROOT / "pyproject.toml"),
        "--cache-dir", str(tmp_path / "mypy-cache"),
        "--no-error-summary",
        str(SRC),
    ])
    assert status == 0, f"mypy found type errors:\n{out}{err}"
