"""Fixtures shared by the use-case tests."""

import pytest

from sppkit.vmm import Vm


@pytest.fixture
def vm():
    """A bare Vm: 4 MiB of RAM at GPA 0, SPP enabled."""
    v = Vm()
    v.add_memslot(0, 0, 4 << 20)
    v.enable_spp()
    return v
