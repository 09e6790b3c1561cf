"""sppkit.usecases — what SPP is for, each a library API, a CLI command and a demo part."""

from .checkpoint import checkpoint_guest, open_checkpoint_set, restore_checkpoint  # noqa: F401
from .guard import GuardError, GuardReport, guard_guest, read_guard_table  # noqa: F401
from .device import Device, DeviceBus, DeviceError, DeviceReport, Register, RingConsole, run_device  # noqa: F401
from .monitor import (  # noqa: F401
    MonitorError, MonitorReport, UnknownSymbolError, Watch, WatchError, WatchEvent, WatchManager, run_monitor,
)

__all__ = [
    "Device", "DeviceBus", "DeviceError", "DeviceReport", "GuardError", "GuardReport", "MonitorError", "MonitorReport",
    "Register", "RingConsole", "UnknownSymbolError", "Watch", "WatchError", "WatchEvent", "WatchManager",
    "checkpoint_guest", "guard_guest", "open_checkpoint_set", "read_guard_table", "restore_checkpoint", "run_device",
    "run_monitor",
]
