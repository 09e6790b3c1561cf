"""Engines: where guest writes come from.  Each hands every write to ``vm.write``.

* ``kvm`` — real x86-64 guests on the real CPU (Linux KVM, read-only memslots);
* ``unicorn`` — the same guests anywhere, a denied write faults before it retires;
* replay — recorded traces (``sppkit replay``).
"""

from __future__ import annotations

from .base import DEFAULT_RAM, EngineBase, EngineError, parse_size
from .result import RunResult, ViolationRecord

ENGINES = ("kvm", "unicorn")


def kvm_usable() -> tuple[bool, str]:
    from .kvm.binding import kvm_status

    return kvm_status()


def choose_engine(name: str) -> tuple[type[EngineBase], str]:
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
