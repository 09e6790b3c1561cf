"""Engines: where guest writes come from.  Each hands every write to ``vm.write``.

* ``kvm`` — real x86-64 guests on the real CPU (Linux KVM, read-only memslots);
* ``unicorn`` — the same guests anywhere, a denied write faults before it retires;
* replay — recorded traces (``sppkit replay``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .base import DEFAULT_RAM, EngineBase, EngineError, parse_size
from .result import RunResult, ViolationRecord

if TYPE_CHECKING:
    from ..guests.elf import GuestImage
    from ..policy import Policy

ENGINES = ("kvm", "unicorn")


class EngineClass(Protocol):
    """An engine class as :func:`choose_engine` returns it (``KvmEngine`` or
    ``UnicornEngine``): its name, and the constructor arguments both engines take."""

    name: str

    def __call__(self, image: GuestImage, *, policy: Policy | None = None, ram_size: int = DEFAULT_RAM,
                 cpl: int = 3, timeout: float = 60.0, spp_mode: str = "lazy") -> EngineBase: ...


def kvm_usable() -> tuple[bool, str]:
    from .kvm.binding import kvm_status

    return kvm_status()


def choose_engine(name: str) -> tuple[EngineClass, str]:
    """The engine class for ``name`` (kvm, unicorn or auto) and why it was chosen."""
    if name == "auto":
        ok, why = kvm_usable()
        if ok:
            from .kvm.engine import KvmEngine

            return KvmEngine, "auto: KVM is usable here"
        from .unicorn import UnicornEngine

        return UnicornEngine, f"auto: KVM not usable ({why}); using Unicorn"
    if name == "kvm":
        ok, why = kvm_usable()
        if not ok:
            raise EngineError(f"--engine kvm: KVM is not usable here: {why} (try --engine unicorn)")
        from .kvm.engine import KvmEngine

        return KvmEngine, "kvm"
    if name == "unicorn":
        from .unicorn import UnicornEngine

        return UnicornEngine, "unicorn"
    raise ValueError(f"engine {name!r}: must be kvm, unicorn or auto")


__all__ = ["DEFAULT_RAM", "ENGINES", "EngineError", "RunResult", "ViolationRecord", "choose_engine", "kvm_usable",
           "parse_size"]
