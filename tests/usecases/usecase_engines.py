"""What every use-case test needs: skip reasons for gcc and KVM, and the engines to run."""

import pytest

from sppkit.engines.kvm.binding import kvm_status
from sppkit.guests import toolchain_status

GCC_OK, GCC_WHY = toolchain_status()
KVM_OK, KVM_WHY = kvm_status()

needs_gcc = pytest.mark.skipif(not GCC_OK, reason=GCC_WHY)
#: both engines; the KVM one skipped, with the reason, where /dev/kvm is not usable
ENGINES = [
    pytest.param("unicorn", id="unicorn"),
    pytest.param("kvm", id="kvm", marks=pytest.mark.skipif(not KVM_OK, reason=f"KVM not usable: {KVM_WHY}")),
]
