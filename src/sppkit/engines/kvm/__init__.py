"""sppkit.engines.kvm — Linux KVM support.

:mod:`.binding` is a thin, typed binding to the KVM ioctl API (``Kvm`` -> ``VmFd`` ->
``VcpuFd``, one frozen dataclass per exit kind); its public names are re-exported here.
"""

from . import binding
from .binding import *  # noqa: F403

__all__ = list(binding.__all__)
