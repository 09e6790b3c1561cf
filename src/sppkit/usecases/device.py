"""Device virtualization at 128 bytes: a device's registers share a 4-KiB page with
ordinary RAM; SPP traps only the register sub-pages (the XPDDS18 "device
virtualization" use case of Intel's Xen SPP talk).

* :class:`Device` — declare registers (offset, width, access, reset value) in one
  page and receive guest writes to them as ``write(offset, size, value)``, returning
  the decision: ``EMULATE`` (the value lands in the RAM copy, so the guest reads it
  back) or ``SKIP`` (discarded: read-only and write-only registers).  The device
  keeps the RAM copy of its registers current with :meth:`Device.set_register`
  (``vm.load``): that is what guest reads return, on both engines — SPP traps
  writes only.
* :class:`DeviceBus` — attaches devices to pages of a :class:`~sppkit.vmm.Vm` through
  a :class:`~sppkit.usecases.monitor.WatchManager`: one watch per register; writes
  to the page's other bytes are RAM (no exit under SPP; committed transparently if
  they share a register's sub-page or the page is protected whole).
* :class:`RingConsole` — a toy device that does real work: a descriptor ring in the
  RAM part of its page, DOORBELL and CONTROL in the register sub-page; on a doorbell
  it consumes the ring, collects the text and posts a completion the driver polls.
* :func:`run_device` / ``sppkit device`` — the bundled ``devdriver`` guest against a
  RingConsole, with the exits counted per sub-page; :func:`demo_device`.

Limits (docs/usecases-monitor-device.md): 128 bytes can be coarser than a
device's register block (Xen chose 8-byte software emulation for MMIO); register
reads return the RAM copy (no read side effects, no value computed at read time).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import click

from ..guests.elf import SymbolNotFound
from ..engines.base import MAX_TIMEOUT
from ..vmm import Decision, GpaNotMapped, Vm
from .monitor import (
    JSON_HELP,
    Progress,
    WatchError,
    WatchEvent,
    WatchManager,
    _as_decision,
    check_run_args,
    cpl_option,
    engine_option,
    load_guest_image,
    progress_option,
    timeout_option,
)

__all__ = [
    "Device", "DeviceBus", "DeviceError", "DeviceReport", "Register", "RingConsole", "demo_device", "device_command",
    "print_device", "run_device",
]

PAGE = 4096
SUBPAGE = 128
DEFAULT_GUEST = "devdriver"
DEFAULT_PAGE = "devpage"


class DeviceError(ValueError):
    """A device that cannot be attached: bad or overlapping registers, a page outside
    RAM, a page that already holds a device, an unknown page symbol."""


@dataclass(frozen=True)
class Register:
    """A device register: ``width`` bytes at ``offset`` in the device's page.
    ``access``: ``rw`` (writes land in RAM), ``ro`` (writes discarded), ``wo``
    (write-only: the device consumes the value; it is not stored)."""

    name: str
    offset: int
    width: int = 4
    access: str = "rw"
    reset: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.width

    @property
    def subpage(self) -> int:
        return self.offset // SUBPAGE


class Device:
    """Base of a device model.  Subclasses set :attr:`registers` (or pass them) and
    override :meth:`write` or define ``on_<register>(value) -> decision | None``."""

    name = "device"
    registers: tuple[Register, ...] = ()

    def __init__(self, name: str | None = None, registers=None) -> None:
        if name is not None:
            if not isinstance(name, str) or not name:
                raise DeviceError(f"device name {name!r}: must be a non-empty string")
            self.name = name
        if registers is not None:
            if isinstance(registers, (str, bytes, Register)):
                raise DeviceError(f"device {self.name!r}: registers must be a sequence of Register, "
                                  f"got {registers!r}")
            try:
                self.registers = tuple(registers)
            except TypeError:
                raise DeviceError(f"device {self.name!r}: registers must be a sequence of Register, "
                                  f"got {registers!r}") from None
        self.bus: DeviceBus | None = None
        self.gpa: int | None = None
        self.writes: Counter = Counter()  #: register name -> trapped writes
        self.bad_writes = 0  #: writes that did not match one register exactly
        self._validate()

    # -- declaration ------------------------------------------------------------
    def _validate(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise DeviceError(f"device name {self.name!r}: must be a non-empty string")
        seen: dict[str, Register] = {}
        for r in self.registers:  # types first: the checks below (and sorting) compare numbers
            if not isinstance(r, Register):
                raise DeviceError(f"device {self.name!r}: {r!r} is not a Register")
            if not isinstance(r.name, str) or not r.name:
                raise DeviceError(f"device {self.name!r}: register name {r.name!r}: must be a non-empty string")
            for field in ("offset", "width", "reset"):
                v = getattr(r, field)
                if isinstance(v, bool) or not isinstance(v, int):
                    raise DeviceError(f"device {self.name!r}: register {r.name!r} {field} {v!r}: "
                                      "must be an integer")
            if not isinstance(r.access, str):
                raise DeviceError(f"device {self.name!r}: register {r.name!r} access {r.access!r}: rw, ro or wo")
        regs = sorted(self.registers, key=lambda r: r.offset)
        for r in regs:
            if r.name in seen:
                raise DeviceError(f"device {self.name!r}: two registers named {r.name!r}")
            seen[r.name] = r
            if r.width not in (1, 2, 4, 8):
                raise DeviceError(f"device {self.name!r}: register {r.name!r} width {r.width}: must be 1, 2, 4 or 8")
            if r.offset < 0 or r.end > PAGE:
                raise DeviceError(f"device {self.name!r}: register {r.name!r} [{r.offset:#x}, {r.end:#x}) "
                                  f"lies outside its 4-KiB page")
            if r.access not in ("rw", "ro", "wo"):
                raise DeviceError(f"device {self.name!r}: register {r.name!r} access {r.access!r}: rw, ro or wo")
            bits = 8 * r.width
            if not -(1 << (bits - 1)) <= r.reset < 1 << bits:
                raise DeviceError(f"device {self.name!r}: register {r.name!r} reset {r.reset:#x} does not fit "
                                  f"its {r.width} byte(s)")
        for a, b in zip(regs, regs[1:]):
            if b.offset < a.end:
                raise DeviceError(f"device {self.name!r}: registers {a.name!r} [{a.offset:#x}, {a.end:#x}) and "
                                  f"{b.name!r} [{b.offset:#x}, {b.end:#x}) overlap")

    def register(self, name: str) -> Register:
        for r in self.registers:
            if r.name == name:
                return r
        raise DeviceError(f"device {self.name!r} has no register {name!r} "
                          f"(registers: {', '.join(r.name for r in self.registers)})")

    def register_at(self, offset: int, size: int = 1) -> list[Register]:
        """The registers overlapping ``[offset, offset + size)`` of the device's page."""
        for what, v in (("offset", offset), ("size", size)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise DeviceError(f"device {self.name!r}: register_at {what} {v!r}: must be an integer")
        return [r for r in self.registers if r.offset < offset + size and offset < r.end]

    @property
    def register_subpages(self) -> list[int]:
        return sorted({i for r in self.registers for i in range(r.offset // SUBPAGE, (r.end - 1) // SUBPAGE + 1)})

    # -- guest memory, from the device's side -------------------------------------
    @property
    def vm(self) -> Vm:
        return self._attached()[0]

    def _attached(self) -> tuple[Vm, int]:
        """``(vm, gpa)`` of the attached device; DeviceError when it is not attached."""
        if self.bus is None or self.gpa is None:  # attach() and detach() set and clear both
            raise DeviceError(f"device {self.name!r} is not attached")
        return self.bus.vm, self.gpa

    def set_register(self, name: str, value: int) -> None:
        """Update the RAM copy of a register: what the guest's next read returns.
        ``value`` must fit the register's width (a negative value is stored in two's
        complement, as a reset value is)."""
        r = self.register(name)
        bits = 8 * r.width
        if isinstance(value, bool) or not isinstance(value, int) or not -(1 << (bits - 1)) <= value < 1 << bits:
            shown = f"{value:#x}" if isinstance(value, int) and not isinstance(value, bool) else repr(value)
            raise DeviceError(f"device {self.name!r}: register {r.name!r} value {shown}: must be an integer "
                              f"from {-(1 << (bits - 1))} to {(1 << bits) - 1:#x} ({r.width} byte(s))")
        vm, gpa = self._attached()
        vm.load(gpa + r.offset, (value & ((1 << bits) - 1)).to_bytes(r.width, "little"))

    def get_register(self, name: str) -> int:
        r = self.register(name)
        vm, gpa = self._attached()
        return int.from_bytes(vm.read(gpa + r.offset, r.width), "little")

    def _in_page(self, what: str, offset, n) -> None:
        """DeviceError unless ``[offset, offset + n)`` lies inside the device's 4-KiB page."""
        for field, v in (("offset", offset), ("length", n)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise DeviceError(f"device {self.name!r}: {what} {field} {v!r}: must be an integer")
        if n < 0:
            raise DeviceError(f"device {self.name!r}: {what} length {n}: must be 0 or more")
        if offset < 0 or offset + n > PAGE:
            raise DeviceError(f"device {self.name!r}: {what} [{offset:#x}, {offset + n:#x}) lies outside its page "
                              f"[0x0, {PAGE:#x}): a device reads and loads its own page only")

    def read(self, offset: int, n: int) -> bytes:
        """Bytes of the device's page (its RAM part: rings, buffers)."""
        self._in_page("read", offset, n)
        vm, gpa = self._attached()
        return vm.read(gpa + offset, n)

    def load(self, offset: int, data: bytes) -> None:
        """Put ``data`` at ``offset`` of the device's page (VMM side: no trap)."""
        try:
            n = memoryview(data).nbytes
        except TypeError:
            raise DeviceError(f"device {self.name!r}: load data {data!r:.40}: must be bytes-like") from None
        self._in_page("load", offset, n)
        vm, gpa = self._attached()
        vm.load(gpa + offset, data)

    # -- the write path -------------------------------------------------------------
    def reset(self) -> None:
        """Put every register's reset value in RAM (called on attach)."""
        for r in self.registers:
            self.set_register(r.name, r.reset)

    def write(self, offset: int, size: int, value: int) -> Decision | str | bool | None:
        """A guest write of ``size`` bytes of ``value`` at ``offset`` (from the page
        start) touching a register.  Default: an exact write to one register calls
        ``on_<name>(value)`` if defined; ``rw`` registers then keep the value
        (EMULATE), ``ro``/``wo`` ones do not (SKIP); any other shape is discarded."""
        regs = self.register_at(offset, size)
        if len(regs) != 1 or regs[0].offset != offset or regs[0].width != size:
            self.bad_writes += 1
            return Decision.SKIP
        r = regs[0]
        handler = getattr(self, f"on_{r.name}", None)
        answer = handler(value) if handler is not None else None  # (a handler that raises: not counted)
        self.writes[r.name] += 1
        if answer is not None:
            return answer
        return Decision.EMULATE if r.access == "rw" else Decision.SKIP


class DeviceBus:
    """Devices on pages of a Vm, each register a watched byte range.

    ``chain``: the engine's violation handler (records).  ``page_granular``: trap the
    whole page of each device (the baseline: every ring write exits).
    """

    def __init__(self, vm: Vm, *, chain=None, page_granular: bool = False,
                 manager: WatchManager | None = None) -> None:
        if not isinstance(page_granular, bool):
            raise DeviceError(f"page_granular={page_granular!r}: must be True or False")
        if manager is not None:
            if not isinstance(manager, WatchManager):
                raise DeviceError(f"manager={manager!r}: must be a WatchManager (or None: the bus makes one)")
            if manager.vm is not vm:
                raise DeviceError("manager: that WatchManager watches another Vm than this bus's")
            if chain is not None or page_granular:
                raise DeviceError("give chain and page_granular to the WatchManager passed as manager= (the bus "
                                  "uses that manager as it is)")
        self.vm = vm
        self.wm = manager if manager is not None else WatchManager(vm, chain=chain, page_granular=page_granular)
        self.devices: dict[int, Device] = {}  # gfn -> device
        self._watches: dict[int, list] = {}
        self.decisions: Counter = Counter()

    def attach(self, device: Device, gpa: int) -> Device:
        if not isinstance(device, Device):
            raise DeviceError(f"attach: {device!r} is not a Device")
        if isinstance(gpa, bool) or not isinstance(gpa, int) or gpa < 0:
            raise DeviceError(f"device {device.name!r}: page address {gpa!r} must be a non-negative integer")
        if gpa & (PAGE - 1):
            raise DeviceError(f"device {device.name!r}: page address {gpa:#x} is not 4-KiB aligned")
        if device.bus is not None:
            raise DeviceError(f"device {device.name!r} is already attached at {device.gpa:#x}")
        if not device.registers:
            raise DeviceError(f"device {device.name!r} declares no registers")
        other = self.devices.get(gpa >> 12)
        if other is not None:
            raise DeviceError(f"device {device.name!r} at {gpa:#x}: that page already holds device {other.name!r}; "
                              "devices on one page would share its register sub-pages")
        slots = sorted(self.vm.memslots(), key=lambda m: m.gpa)
        m = next((m for m in slots if m.gpa <= gpa < m.end), None)
        if m is None:
            ram = ", ".join(f"[{s.gpa:#x}, {s.end:#x})" for s in slots) or "none"
            raise DeviceError(f"device {device.name!r} at {gpa:#x}: outside guest RAM ({ram}); the device's page "
                              "must be guest RAM (its ring and its register copies live there)")
        if m.readonly:
            raise DeviceError(f"device {device.name!r} at {gpa:#x}: read-only memslot {m.slot}")
        device._validate()  # its registers may have been replaced since it was made
        # Nothing changes unless it all succeeds: reset values go into the page (its
        # previous bytes kept), then one watch per register; on any error the watches
        # made so far are removed and the page and the device are put back.
        saved = self.vm.read(gpa, PAGE)
        ws: list = []
        device.bus, device.gpa = self, gpa
        try:
            device.reset()
            cb = self._callback(device)
            for r in device.registers:
                ws.append(self.wm.watch(gpa + r.offset, r.width, cb, name=f"{device.name}.{r.name}"))
        except BaseException as e:
            for w in reversed(ws):
                self.wm.unwatch(w)
            self.vm.load(gpa, saved)
            device.bus = device.gpa = None
            if isinstance(e, WatchError):
                raise DeviceError(f"device {device.name!r}: {e}") from None
            raise
        self.devices[gpa >> 12] = device
        self._watches[gpa >> 12] = ws
        return device

    def _mine(self, device: Device) -> int:
        """The gfn of ``device``'s page; DeviceError unless it is attached to this bus."""
        if not isinstance(device, Device):
            raise DeviceError(f"{device!r} is not a Device")
        gfn = (device.gpa or 0) >> 12
        if device.gpa is None or self.devices.get(gfn) is not device:
            raise DeviceError(f"device {device.name!r} is not attached to this bus")
        return gfn

    def detach(self, device: Device) -> None:
        gfn = self._mine(device)
        for w in self._watches.pop(gfn):
            self.wm.unwatch(w)
        del self.devices[gfn]
        device.bus = device.gpa = None

    def _callback(self, device: Device):
        def on_write(ev: WatchEvent):
            gpa = device.gpa
            assert gpa is not None  # the watches live only while the device is attached (detach unwatches first)
            off = ev.gpa - gpa
            answer = device.write(off, ev.size, int.from_bytes(ev.new, "little"))
            d = Decision.SKIP if answer is None else _as_decision(answer, f"{device.name}.write")
            self.decisions[d.value] += 1
            return d

        return on_write

    def exits_by_subpage(self, device: Device) -> dict[int, int]:
        """SPP exits (violations) per sub-page of ``device``'s page, from the Vm's counters."""
        gfn = self._mine(device)
        st = self.vm.stats(top=1 << 16)
        return {d["subpage"]: d["violations"] for d in st["top_subpages"] if d["gfn"] == gfn}

    def page_writes(self, device: Device) -> int:
        """Guest writes to ``device``'s page = the exits of page-granular trapping."""
        gfn = self._mine(device)
        st = self.vm.stats(top=1 << 16)
        return next((d["writes"] for d in st["top_page_granular"] if d["gfn"] == gfn), 0)


# ====================================================================== the toy device
FNV_OFFSET, FNV_PRIME = 2166136261, 16777619


class RingConsole(Device):
    """A console with a descriptor ring (the layout of the ``devdriver`` guest).

    Registers (sub-page 0): MAGIC ro, VERSION ro, CONTROL rw (bit 0 enable, bit 1
    reset), STATUS ro (bit 0 ready, bit 1 error), DOORBELL wo (the driver's new
    avail index), COMPLETED ro (descriptors consumed), CHECKSUM ro (FNV-1a of the
    text), BYTES ro.  RAM: ``avail_idx`` at 0x80, ``used_idx`` at 0x84 (written by the
    device), 16 descriptors ``{u64 addr; u32 len; u32 flags}`` at 0x100.
    """

    name = "ringcon"
    MAGIC = 0x43505053  # "SPPC"
    VERSION = 1
    AVAIL, USED, DESC, RING, DESC_SIZE = 0x80, 0x84, 0x100, 16, 16
    CTRL_ENABLE, CTRL_RESET = 1, 2
    READY, ERROR = 1, 2
    registers = (
        Register("magic", 0x00, 4, "ro", MAGIC),
        Register("version", 0x04, 4, "ro", VERSION),
        Register("control", 0x08, 4, "rw"),
        Register("status", 0x0C, 4, "ro"),
        Register("doorbell", 0x10, 4, "wo"),
        Register("completed", 0x14, 4, "ro"),
        Register("checksum", 0x18, 4, "ro"),
        Register("bytes", 0x1C, 4, "ro"),
    )

    def __init__(self, name: str | None = None) -> None:
        super().__init__(name)
        self.output = bytearray()
        self.consumed = 0
        self.checksum = FNV_OFFSET
        self.doorbells = 0
        self.descriptors = 0
        self.errors: list[str] = []
        self.enabled = False

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def on_control(self, value: int):
        if value & self.CTRL_RESET:
            self.consumed, self.checksum, self.enabled = 0, FNV_OFFSET, False
            for r in ("completed", "checksum", "bytes", "status"):
                self.set_register(r, 0)
            self.load(self.USED, b"\0\0\0\0")
            self.checksum = FNV_OFFSET
        self.enabled = bool(value & self.CTRL_ENABLE)
        status = self.get_register("status")
        self.set_register("status", (status | self.READY) if self.enabled else (status & ~self.READY))
        return Decision.EMULATE  # the guest reads back what it wrote

    def _fail(self, why: str) -> Decision:
        self.errors.append(why)
        self.set_register("status", self.get_register("status") | self.ERROR)
        return Decision.SKIP

    def on_doorbell(self, avail: int):
        self.doorbells += 1
        if not self.enabled:
            return self._fail(f"doorbell {avail} while disabled")
        pending = (avail - self.consumed) & 0xFFFFFFFF
        if pending > self.RING:
            return self._fail(f"doorbell {avail}: {pending} descriptors pending, ring holds {self.RING}")
        for _ in range(pending):
            slot = self.consumed % self.RING
            raw = self.read(self.DESC + slot * self.DESC_SIZE, self.DESC_SIZE)
            addr, length = int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:12], "little")
            if length > PAGE:
                return self._fail(f"descriptor {slot}: length {length} > 4096")
            try:
                data = self.vm.read(addr, length)
            except (GpaNotMapped, ValueError):
                return self._fail(f"descriptor {slot}: buffer {addr:#x}+{length} outside guest RAM")
            self.output += data
            h = self.checksum
            for b in data:
                h = ((h ^ b) * FNV_PRIME) & 0xFFFFFFFF
            self.checksum = h
            self.consumed = (self.consumed + 1) & 0xFFFFFFFF
            self.descriptors += 1
        # the completion: used index in the ring, COMPLETED/CHECKSUM/BYTES in the registers
        self.load(self.USED, self.consumed.to_bytes(4, "little"))
        self.set_register("completed", self.consumed)
        self.set_register("checksum", self.checksum)
        self.set_register("bytes", len(self.output))
        return Decision.SKIP  # write-only: the value was consumed, the RAM copy stays 0


# ====================================================================== the run
@dataclass
class DeviceReport:
    engine: str
    engine_reason: str
    guest: str
    page_gpa: int
    page_granular: bool
    result: Any
    output: str
    expected: str | None
    intact: bool | None
    registers: list[dict]
    exits_by_subpage: dict[int, int]
    page_writes: int
    register_exits: int
    ring_exits: int
    ring_writes: int | None
    doorbells_guest: int | None
    doorbells_device: int
    doorbell_exits: int
    device_errors: list[str]
    stats: dict
    seconds: float
    guest_counts: dict

    @property
    def exit_code(self) -> int | None:
        return self.result.exit_code

    def to_dict(self) -> dict:
        res = self.result.to_dict(max_violations=0)
        res.pop("violations", None)
        res.pop("violations_total", None)
        return {
            "engine": self.engine, "engine_reason": self.engine_reason, "guest": self.guest,
            "page_gpa": self.page_gpa, "page_granular": self.page_granular, "run": res, "output": self.output,
            "intact": self.intact, "registers": self.registers,
            "exits_by_subpage": {str(k): v for k, v in sorted(self.exits_by_subpage.items())},
            "exits": {"this_run": sum(self.exits_by_subpage.values()), "page_granular": self.page_writes,
                      "register": self.register_exits, "ring": self.ring_exits},
            "ring_writes": self.ring_writes, "doorbells": {"guest": self.doorbells_guest,
                                                           "device": self.doorbells_device,
                                                           "exits": self.doorbell_exits},
            "device_errors": self.device_errors, "stats": self.stats, "guest_counts": self.guest_counts,
            "seconds": round(self.seconds, 3),
        }


def resolve_page(image, page: str | int) -> int:
    """A device page given as a symbol of the guest or an address."""
    if isinstance(page, int):
        return page
    if not isinstance(page, str):
        raise DeviceError(f"--page {page!r}: must be a symbol of the guest (e.g. devpage) or an integer "
                          "guest-physical address (e.g. 0x404000)")
    text = page.strip()
    if not text:
        raise DeviceError("--page '': an empty value; give a symbol of the guest (e.g. devpage) or a "
                          "page-aligned guest-physical address (e.g. 0x404000)")
    try:
        return int(text, 0)
    except ValueError:
        pass
    try:
        return image.symbol(text).addr
    except SymbolNotFound as e:
        raise DeviceError(f"--page: unknown symbol {text!r} in {image.where}{e.hint}") from None


def _u64(image, vm, name: str) -> int | None:
    sym = image.symbols.get(name)
    return None if sym is None else int.from_bytes(vm.read(sym.addr, 8), "little")


def _check_device_page(eng, gpa: int, where: str) -> None:
    """Refuse a device page whose bytes the guest cannot do without: attaching writes
    the registers' reset values into the page, which would corrupt the engine's page
    tables (the guest triple-faults) or the guest's code and constants."""
    lo, hi = eng.layout.table_range
    if lo < gpa + PAGE and gpa < hi:
        raise DeviceError(f"{where}: page {gpa:#x} holds the engine's page tables [{lo:#x}, {hi:#x}); the "
                          "device's register values would overwrite them; choose a page of guest data")
    for seg in eng.image.segments:
        if not seg.writable and seg.gpa < gpa + PAGE and gpa < seg.gpa + seg.memsz:
            raise DeviceError(f"{where}: page {gpa:#x} holds the guest's read-only segment [{seg.gpa:#x}, "
                              f"{seg.gpa + seg.memsz:#x}) (code or constants), which the device's register "
                              "values would overwrite; choose a page of guest data")


def run_device(guest: str | os.PathLike = DEFAULT_GUEST, *, engine: str = "auto", page_granular: bool = False,
               page: str | int = DEFAULT_PAGE, cpl: int = 3, timeout: float = 60.0,
               memory: int | None = None) -> DeviceReport:
    """Run ``guest`` (default: the bundled ``devdriver``) against a :class:`RingConsole`
    at ``page`` (a symbol of the guest or a GPA)."""
    from ..engines import DEFAULT_RAM, choose_engine

    check_run_args(engine, timeout, cpl=cpl, page_granular=page_granular, memory=memory, error=DeviceError)
    if not isinstance(page, (str, int)):
        resolve_page(None, page)  # names the bad value before the guest is built
    image = load_guest_image(guest)
    gpa = resolve_page(image, page)
    ram = DEFAULT_RAM if memory is None else memory
    where = f"--page {page!r}" if isinstance(page, str) and page.strip() != f"{gpa:#x}" else "--page"
    if isinstance(gpa, bool) or not isinstance(gpa, int):
        raise DeviceError(f"{where}: {gpa!r} is not an address (a symbol of the guest or an integer GPA)")
    if gpa < 0:
        raise DeviceError(f"{where}: {gpa:#x} is negative; a device page is a guest-physical address in "
                          f"guest RAM [0x0, {ram:#x})")
    if gpa >= ram:
        raise DeviceError(f"{where}: device page {gpa:#x} lies outside guest RAM [0x0, {ram:#x})")
    if gpa & (PAGE - 1):
        raise DeviceError(f"{where}: {gpa:#x} is not 4-KiB aligned; the device takes a whole page "
                          f"(e.g. {gpa & ~(PAGE - 1):#x} or {(gpa | (PAGE - 1)) + 1:#x})")
    cls, why = choose_engine(engine)
    eng = cls(image, policy=None, ram_size=ram, cpl=int(cpl), timeout=timeout)
    dev = RingConsole()
    t0 = time.perf_counter()
    try:
        vm = eng.vm
        _check_device_page(eng, gpa, where)
        bus = DeviceBus(vm, chain=eng.handle_violation, page_granular=page_granular)
        bus.attach(dev, gpa)
        result = eng.run()
        while result.stop_reason == "paused":
            result = eng.run()
    finally:
        eng.close()
    seconds = time.perf_counter() - t0

    by_sub = bus.exits_by_subpage(dev)
    reg_subs = set(dev.register_subpages)
    register_exits = sum(v for s, v in by_sub.items() if s in reg_subs)
    ring_exits = sum(v for s, v in by_sub.items() if s not in reg_subs)
    page_writes = bus.page_writes(dev)
    counts = {n: _u64(image, vm, f"drv_{n}") for n in ("ring_writes", "reg_writes", "doorbells", "descriptors",
                                                        "bytes", "polls")}
    msg = image.symbols.get("message")
    expected = vm.read(msg.addr, msg.size).rstrip(b"\0").decode("utf-8", "replace") if msg and msg.size else None
    regs = []
    for r in dev.registers:
        regs.append({"name": r.name, "offset": r.offset, "width": r.width, "access": r.access,
                     "writes": dev.writes.get(r.name, 0), "value": dev.get_register(r.name)})
    doorbell_exits = sum(1 for rec in eng.records
                         if rec.gpa <= gpa + 0x10 < rec.gpa + rec.size)
    return DeviceReport(
        engine=eng.name, engine_reason=why, guest=image.where, page_gpa=gpa, page_granular=page_granular,
        result=result, output=dev.text, expected=expected,
        intact=(dev.text == expected) if expected is not None else None, registers=regs, exits_by_subpage=by_sub,
        page_writes=page_writes, register_exits=register_exits, ring_exits=ring_exits,
        ring_writes=counts["ring_writes"], doorbells_guest=counts["doorbells"], doorbells_device=dev.doorbells,
        doorbell_exits=doorbell_exits, device_errors=list(dev.errors), stats=vm.stats(), seconds=seconds,
        guest_counts=counts,
    )


def print_device(rep: DeviceReport, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    res = rep.result
    if res.console:
        console.rule(f"guest console ({rep.engine})")
        console.out(res.console.rstrip("\n"), highlight=False)
    console.rule(f"device output (ringcon at {rep.page_gpa:#x})")
    console.out(rep.output.rstrip("\n") or "(nothing)", highlight=False)
    if rep.intact is not None:
        console.print("[green]the text arrived intact[/]" if rep.intact else "[red]the text differs from the "
                                                                              "guest's message[/]")
    t = Table(title="registers (sub-page 0, trapped)")
    for col in ("register", "offset", "access", "trapped writes", "value now"):
        t.add_column(col)
    for r in rep.registers:
        t.add_row(r["name"], f"{r['offset']:#04x}", r["access"], str(r["writes"]), f"{r['value']:#x}")
    console.print(t)
    mode = "whole page trapped (page-granular)" if rep.page_granular else "SPP: register sub-page trapped"
    t = Table(title=f"exits for this run — {mode}")
    for col in ("", "count"):
        t.add_column(col)
    t.add_row("guest writes to the ring/buffers (RAM sub-pages)", str(rep.ring_writes if rep.ring_writes is not None
                                                                       else "?"))
    t.add_row("exits on RAM sub-pages", str(rep.ring_exits))
    t.add_row("doorbell writes (guest) / seen by the device / exits",
              f"{rep.doorbells_guest} / {rep.doorbells_device} / {rep.doorbell_exits}")
    t.add_row("exits on the register sub-page", str(rep.register_exits))
    t.add_row("exits in total under this mode", str(rep.register_exits + rep.ring_exits))
    t.add_row("exits page-granular trapping takes (every write to the page)", str(rep.page_writes))
    console.print(t)
    if rep.device_errors:
        console.print("[red]device errors:[/] " + escape("; ".join(rep.device_errors)))
    console.print(f"[dim]{rep.engine} engine exits {sum(res.exits.values())}: no CPU here has SPP, so the engine "
                  "traps every write to the device page and the Vm decides which SPP would have exited on. Register "
                  "reads return the RAM copy the device keeps current (SPP never traps reads).[/]")
    code = "—" if res.exit_code is None else str(res.exit_code)
    console.print(f"stop: {res.stop_reason}, guest exit code {code}; {rep.seconds:.2f} s")


@click.command("device", short_help="Device virtualization: trap a device's registers, not the RAM beside them.")
@click.argument("guest", default=DEFAULT_GUEST)
@engine_option
@click.option("--page-granular", is_flag=True,
              help="Trap the device's whole page (the baseline SPP improves on): every ring write exits too.")
@click.option("--page", "page", default=DEFAULT_PAGE, show_default=True, metavar="SYMBOL|GPA",
              help="Where the device's 4-KiB page is: a page-aligned symbol of the guest or guest-physical "
                   "address (decimal or 0x hex) in guest RAM, not on the guest's code or the engine's page "
                   "tables (its register reset values are written there).")
@cpl_option
@click.option("--timeout", metavar="SECONDS", type=float, default=60.0, show_default=True, callback=timeout_option,
              help=f"Seconds before the guest is stopped (exit status 1), from 0 to {MAX_TIMEOUT}; 0: no limit.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
@progress_option
def device_command(guest, engine, page_granular, page, cpl, timeout, as_json, progress):
    """Run GUEST (default: the bundled devdriver) against a toy ring-console device
    whose registers share one page with its descriptor ring: SPP traps only the
    register sub-page, so ring writes never exit and every doorbell does.  The
    device's output (the text the driver sent) is shown, with the exits per sub-page
    and what trapping the whole page would have cost.

    GUEST is a bundled program, a .c file (built with gcc) or an x86-64 ELF; a guest
    other than devdriver needs --page.

    Exit status: the guest's exit code (devdriver: 0 = the device's checksum
    matched), 1 when the run ends otherwise (fault, timeout), 2 on bad input.

    \b
    Examples:
      sppkit device                          # devdriver, register sub-page trapped
      sppkit device --page-granular          # the same run, the whole page trapped
      sppkit device --engine unicorn --json
    """
    from ..report import emit_report

    with Progress(f"device: running {guest} ({engine} engine)…", progress):
        rep = run_device(guest, engine=engine, page_granular=page_granular, page=page, cpl=int(cpl),
                         timeout=timeout)
    emit_report(rep, as_json, print_device)


def demo_device(console, engine: str = "auto") -> DeviceReport | None:
    """`sppkit demo` part: the ring console and its driver, registers trapped at 128 bytes."""
    from ..guests import toolchain_status

    ok, why = toolchain_status()
    if not ok:
        console.print(f"[yellow]device demo skipped: {why}[/]")
        return None
    console.rule("[bold]device virtualization: registers and a ring in one page")
    rep = run_device(DEFAULT_GUEST, engine=engine)
    console.print(f"[dim]engine: {rep.engine_reason}[/]")
    first = rep.output.splitlines()[:2]
    console.out("device output: " + " / ".join(first) + " …", highlight=False)
    console.print(
        f"{len(rep.output)} bytes through the ring ({'intact' if rep.intact else 'CORRUPTED'}); "
        f"{rep.ring_writes} ring writes → {rep.ring_exits} exits; {rep.doorbells_guest} doorbells → "
        f"{rep.doorbell_exits} exits; exits in all {rep.register_exits + rep.ring_exits} with SPP vs "
        f"{rep.page_writes} trapping the whole page"
    )
    return rep
