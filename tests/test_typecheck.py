"""The processor model (``sppkit.arch``) and the hypervisor layer (``sppkit.vmm``)
type-check clean under mypy, with the settings in pyproject.toml ``[tool.mypy]``.

Every engine and use case stands on these two packages; a type error in them (an
Optional used unchecked, a value of the wrong kind returned by a walk) fails here
before it can surface as a wrong decision elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("arch", "vmm")


@pytest.mark.parametrize("package", PACKAGES)
def test_package_type_checks_clean(package, tmp_path):
    api = pytest.importorskip("mypy.api", reason="mypy is a test dependency: make test installs it")
    out, err, status = api.run([
        "--config-file", str(ROOT / "pyproject.toml"),
        "--cache-dir", str(tmp_path / "mypy-cache"),
        "--no-error-summary",
        str(ROOT / "src" / "sppkit" / package),
    ])
    assert status == 0, f"mypy found type errors in sppkit.{package}:\n{out}{err}"
