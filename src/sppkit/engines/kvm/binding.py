"""A thin, typed binding to the Linux KVM API (x86-64), in ctypes + mmap.

Shaped like rust-vmm's ``kvm-ioctls``: :class:`Kvm` (the ``/dev/kvm`` system fd) creates
a :class:`VmFd`, which creates :class:`VcpuFd` objects, whose :meth:`VcpuFd.run` returns one
frozen dataclass per exit kind (:class:`Mmio`, :class:`Io`, :class:`Debug`, ...).  Struct
layouts and ioctl numbers are the stable ABI of ``<linux/kvm.h>`` (spec:
platform-notes.md, Appendix A); every struct size is asserted at import time.

Every ioctl goes through libc's ``ioctl`` via ctypes with an ``unsigned long`` argument:
``fcntl.ioctl`` parses an integer argument as a signed C ``int``, so for instance
``KVM_SET_TSS_ADDR(0xfffbd000)`` would raise ``OverflowError`` there.  ctypes also
releases the GIL during ``KVM_RUN``.

This module knows nothing about what the guest is for; it only speaks KVM.

Example::

    with Kvm() as kvm, kvm.create_vm() as vm:
        mem = mmap.mmap(-1, 0x10000)
        vm.set_user_memory_region(0, 0x0, len(mem), buffer_address(mem))
        with vm.create_vcpu(0) as vcpu:
            ...
            match vcpu.run():
                case Io(direction="out", port=0xE9, data=data):
                    print(data)
                case Mmio(phys_addr=gpa, data=data, is_write=True):
                    ...
"""

from __future__ import annotations

import ctypes
import errno as _errno
import functools
import mmap
import os
import signal
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Self

__all__ = [
    # errors and availability
    "KvmError",
    "KvmUnavailable",
    "kvm_status",
    # fd wrappers
    "Kvm",
    "VmFd",
    "VcpuFd",
    # exits
    "VcpuExit",
    "Mmio",
    "Io",
    "Debug",
    "Hlt",
    "Shutdown",
    "Intr",
    "FailEntry",
    "InternalError",
    "ExceptionExit",
    "Hypercall",
    "Unknown",
    "decode_exit",
    # structures
    "kvm_regs",
    "kvm_segment",
    "kvm_dtable",
    "kvm_sregs",
    "kvm_userspace_memory_region",
    "kvm_dirty_log",
    "kvm_clear_dirty_log",
    "kvm_guest_debug",
    "kvm_cpuid_entry2",
    "kvm_cpuid2",
    "kvm_enable_cap",
    "kvm_translation",
    "make_kvm_cpuid2",
    # helpers
    "buffer_address",
    "dirty_page_indices",
    # constants
    "KVM_DEVICE",
    "KVM_API_VERSION",
    "PAGE_SIZE",
    "DEFAULT_REQUIRED_CAPS",
    "CAP_NAMES",
    "EXIT_NAMES",
    "IOCTL_NAMES",
    "IO_IN",
    "IO_OUT",
]

# --------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------

KVM_DEVICE: Final = "/dev/kvm"
KVM_API_VERSION: Final = 12
PAGE_SIZE: Final = 4096  # the granule of memslots and of the dirty bitmap on x86

# Capabilities (KVM_CHECK_EXTENSION arguments).
CAP_USER_MEMORY: Final = 3
CAP_SET_TSS_ADDR: Final = 4
CAP_EXT_CPUID: Final = 7
CAP_NR_VCPUS: Final = 9
CAP_NR_MEMSLOTS: Final = 10
CAP_COALESCED_MMIO: Final = 15
CAP_SYNC_MMU: Final = 16
CAP_SET_GUEST_DEBUG: Final = 23
CAP_SET_IDENTITY_MAP_ADDR: Final = 37
CAP_MAX_VCPUS: Final = 66
CAP_SYNC_REGS: Final = 74
CAP_READONLY_MEM: Final = 81
CAP_IMMEDIATE_EXIT: Final = 136
CAP_MANUAL_DIRTY_LOG_PROTECT2: Final = 168
CAP_X86_USER_SPACE_MSR: Final = 188
CAP_DIRTY_LOG_RING: Final = 192
CAP_EXIT_ON_EMULATION_FAILURE: Final = 204

#: Capability number -> name without the ``KVM_CAP_`` prefix (for messages).
CAP_NAMES: Final[dict[int, str]] = {
    value: name[4:] for name, value in globals().items() if name.startswith("CAP_") and isinstance(value, int)
}

#: What :func:`kvm_status` requires by default: user memory and read-only memslots.
DEFAULT_REQUIRED_CAPS: Final[tuple[int, ...]] = (CAP_USER_MEMORY, CAP_READONLY_MEM)

# KVM_SET_USER_MEMORY_REGION flags.
MEM_LOG_DIRTY_PAGES: Final = 1 << 0
MEM_READONLY: Final = 1 << 1

# KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) argument bits.
DIRTY_LOG_MANUAL_PROTECT_ENABLE: Final = 1 << 0
DIRTY_LOG_INITIALLY_SET: Final = 1 << 1

# KVM_SET_GUEST_DEBUG control bits.
GUESTDBG_ENABLE: Final = 0x00000001
GUESTDBG_SINGLESTEP: Final = 0x00000002
GUESTDBG_USE_SW_BP: Final = 0x00010000
GUESTDBG_USE_HW_BP: Final = 0x00020000
GUESTDBG_INJECT_DB: Final = 0x00040000
GUESTDBG_INJECT_BP: Final = 0x00080000

# kvm_run.kvm_valid_regs / kvm_dirty_regs bits.
SYNC_X86_REGS: Final = 1 << 0
SYNC_X86_SREGS: Final = 1 << 1
SYNC_X86_EVENTS: Final = 1 << 2

# Exit reasons (kvm_run.exit_reason).
EXIT_UNKNOWN: Final = 0
EXIT_EXCEPTION: Final = 1
EXIT_IO: Final = 2
EXIT_HYPERCALL: Final = 3
EXIT_DEBUG: Final = 4
EXIT_HLT: Final = 5
EXIT_MMIO: Final = 6
EXIT_IRQ_WINDOW_OPEN: Final = 7
EXIT_SHUTDOWN: Final = 8
EXIT_FAIL_ENTRY: Final = 9
EXIT_INTR: Final = 10
EXIT_SET_TPR: Final = 11
EXIT_TPR_ACCESS: Final = 12
EXIT_NMI: Final = 16
EXIT_INTERNAL_ERROR: Final = 17
EXIT_SYSTEM_EVENT: Final = 24
EXIT_IOAPIC_EOI: Final = 26
EXIT_HYPERV: Final = 27
EXIT_X86_RDMSR: Final = 29
EXIT_X86_WRMSR: Final = 30
EXIT_DIRTY_RING_FULL: Final = 31
EXIT_X86_BUS_LOCK: Final = 33
EXIT_NOTIFY: Final = 37

#: Exit reason -> name without the ``KVM_EXIT_`` prefix.
EXIT_NAMES: Final[dict[int, str]] = {
    value: name[5:] for name, value in globals().items() if name.startswith("EXIT_") and isinstance(value, int)
}

# kvm_run.io.direction values.
EXIT_IO_IN: Final = 0
EXIT_IO_OUT: Final = 1
#: The values of :attr:`Io.direction`.
IO_IN: Final = "in"
IO_OUT: Final = "out"

# kvm_run.internal.suberror values.
INTERNAL_ERROR_EMULATION: Final = 1
INTERNAL_ERROR_SIMUL_EX: Final = 2
INTERNAL_ERROR_DELIVERY_EV: Final = 3
INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: Final = 4
INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: Final = 1 << 0

# kvm_run layout (offsets into the vCPU mmap).
RUN_IMMEDIATE_EXIT: Final = 1
RUN_EXIT_REASON: Final = 8
RUN_UNION: Final = 32  # the exit-specific union, 256 bytes
RUN_UNION_SIZE: Final = 256
RUN_VALID_REGS: Final = 288
RUN_DIRTY_REGS: Final = 296
RUN_SYNC_REGS: Final = 304  # s.regs.regs (struct kvm_regs)
RUN_SYNC_SREGS: Final = 448  # s.regs.sregs (struct kvm_sregs)
RUN_SYNC_RIP: Final = RUN_SYNC_REGS + 16 * 8
RUN_MIN_SIZE: Final = 2352  # sizeof(struct kvm_run); the mapping is larger (pio data page)

# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


class KvmError(OSError):
    """A KVM ioctl (or the vCPU mmap) failed.

    Attributes:
        errno: the ``errno`` value the kernel returned.
        strerror: its text.
        ioctl: the name of the failed operation, e.g. ``"KVM_SET_USER_MEMORY_REGION"``.
        detail: optional extra context (the arguments), or None.
    """

    def __init__(self, errno: int, ioctl: str, detail: str | None = None) -> None:
        super().__init__(errno, os.strerror(errno))
        self.ioctl = ioctl
        self.detail = detail

    def __str__(self) -> str:
        text = f"{self.ioctl} failed: [Errno {self.errno}] {self.strerror}"
        return f"{text} ({self.detail})" if self.detail else text

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errno, self.ioctl, self.detail))


class KvmUnavailable(RuntimeError):
    """KVM cannot be used here; the message (and :attr:`reason`) says why.

    Typical reasons: ``"/dev/kvm does not exist"``, ``"permission denied opening /dev/kvm"``,
    ``"KVM API version 11, need 12"``, ``"capability READONLY_MEM missing: ..."``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------
# ioctl plumbing
# --------------------------------------------------------------------------------------

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO: Final = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, ctype: Any) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(ctype))


def _iow(nr: int, ctype: Any) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(ctype))


def _iowr(nr: int, ctype: Any) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(ctype))


_libc = ctypes.CDLL(None, use_errno=True)
_libc_ioctl = _libc.ioctl
_libc_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
_libc_ioctl.restype = ctypes.c_int

# Runs pending Python signal handlers now (and raises what they raise): KVM_RUN returns
# EINTR for a pending signal, and the handler may set immediate_exit or raise.
_check_signals = ctypes.pythonapi.PyErr_CheckSignals
_check_signals.argtypes = ()
_check_signals.restype = ctypes.c_int


def _ioctl(fd: int, request: int, arg: int = 0) -> int:
    """Issue one ioctl with an unsigned long argument; raise KvmError on failure."""
    ret = _libc_ioctl(fd, request, arg)
    if ret < 0:
        raise KvmError(ctypes.get_errno(), IOCTL_NAMES.get(request, f"ioctl {request:#x}"))
    return ret


# --------------------------------------------------------------------------------------
# Structures
# --------------------------------------------------------------------------------------


class _Struct(ctypes.Structure):
    """A ctypes Structure with a readable repr and field-wise equality."""

    def _items(self) -> Iterable[tuple[str, Any]]:
        for name, *_ in self._fields_:
            value = getattr(self, name)
            if isinstance(value, ctypes.Array):
                value = list(value)
            yield name, value

    def __repr__(self) -> str:
        def fmt(v: Any) -> str:
            if isinstance(v, int) and not isinstance(v, bool):
                return hex(v)
            if isinstance(v, list):
                return "[" + ", ".join(fmt(x) for x in v) + "]"
            return repr(v)

        body = ", ".join(f"{n}={fmt(v)}" for n, v in self._items())
        return f"{type(self).__name__}({body})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return bytes(self) == bytes(other)  # type: ignore[arg-type]

    __hash__ = None  # type: ignore[assignment]  # mutable


_u8, _u16, _u32, _u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class kvm_regs(_Struct):
    """General-purpose registers (``struct kvm_regs``, 144 bytes)."""

    _fields_ = [
        (name, _u64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]  # fmt: skip


class kvm_segment(_Struct):
    """A segment register's hidden state (``struct kvm_segment``, 24 bytes)."""

    _fields_ = [
        ("base", _u64),
        ("limit", _u32),
        ("selector", _u16),
        ("type", _u8),
        ("present", _u8),
        ("dpl", _u8),
        ("db", _u8),
        ("s", _u8),
        ("l", _u8),
        ("g", _u8),
        ("avl", _u8),
        ("unusable", _u8),
        ("padding", _u8),
    ]


class kvm_dtable(_Struct):
    """A descriptor-table register, GDTR or IDTR (``struct kvm_dtable``, 16 bytes)."""

    _fields_ = [("base", _u64), ("limit", _u16), ("padding", _u16 * 3)]


class kvm_sregs(_Struct):
    """Special registers (``struct kvm_sregs``, 312 bytes)."""

    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", _u64),
        ("cr2", _u64),
        ("cr3", _u64),
        ("cr4", _u64),
        ("cr8", _u64),
        ("efer", _u64),
        ("apic_base", _u64),
        ("interrupt_bitmap", _u64 * 4),
    ]


class kvm_userspace_memory_region(_Struct):
    """Argument of KVM_SET_USER_MEMORY_REGION (32 bytes)."""

    _fields_ = [
        ("slot", _u32),
        ("flags", _u32),
        ("guest_phys_addr", _u64),
        ("memory_size", _u64),
        ("userspace_addr", _u64),
    ]


class kvm_dirty_log(_Struct):
    """Argument of KVM_GET_DIRTY_LOG (16 bytes); ``dirty_bitmap`` is a pointer."""

    _fields_ = [("slot", _u32), ("padding1", _u32), ("dirty_bitmap", _u64)]


class kvm_clear_dirty_log(_Struct):
    """Argument of KVM_CLEAR_DIRTY_LOG (24 bytes); ``dirty_bitmap`` is a pointer."""

    _fields_ = [("slot", _u32), ("num_pages", _u32), ("first_page", _u64), ("dirty_bitmap", _u64)]


class kvm_guest_debug(_Struct):
    """Argument of KVM_SET_GUEST_DEBUG (72 bytes); ``debugreg`` is x86's ``arch`` part."""

    _fields_ = [("control", _u32), ("pad", _u32), ("debugreg", _u64 * 8)]


class kvm_cpuid_entry2(_Struct):
    """One CPUID leaf/subleaf (``struct kvm_cpuid_entry2``, 40 bytes)."""

    _fields_ = [
        ("function", _u32),
        ("index", _u32),
        ("flags", _u32),
        ("eax", _u32),
        ("ebx", _u32),
        ("ecx", _u32),
        ("edx", _u32),
        ("padding", _u32 * 3),
    ]


class kvm_cpuid2(_Struct):
    """The 8-byte header of ``struct kvm_cpuid2``; see :func:`make_kvm_cpuid2` for a full one."""

    _fields_ = [("nent", _u32), ("padding", _u32), ("entries", kvm_cpuid_entry2 * 0)]


@functools.lru_cache(maxsize=16)
def _kvm_cpuid2_type(nent: int) -> type[_Struct]:
    return type(
        f"kvm_cpuid2_{nent}",
        (_Struct,),
        {"_fields_": [("nent", _u32), ("padding", _u32), ("entries", kvm_cpuid_entry2 * nent)]},
    )


def make_kvm_cpuid2(entries: Sequence[kvm_cpuid_entry2] | int) -> ctypes.Structure:
    """Build a variable-length ``struct kvm_cpuid2``.

    Args:
        entries: the entries to copy in, or a capacity (number of zeroed entries).

    Returns:
        A ctypes structure with fields ``nent``, ``padding`` and ``entries[nent]``.
    """
    if isinstance(entries, int):
        obj = _kvm_cpuid2_type(entries)()
        obj.nent = entries  # type: ignore[attr-defined]
        return obj
    obj = _kvm_cpuid2_type(len(entries))()
    obj.nent = len(entries)  # type: ignore[attr-defined]
    for i, entry in enumerate(entries):
        obj.entries[i] = entry  # type: ignore[attr-defined]
    return obj


class kvm_enable_cap(_Struct):
    """Argument of KVM_ENABLE_CAP (104 bytes)."""

    _fields_ = [("cap", _u32), ("flags", _u32), ("args", _u64 * 4), ("pad", _u8 * 64)]


class kvm_signal_mask(_Struct):
    """Header of KVM_SET_SIGNAL_MASK's argument (4 bytes): ``len`` bytes of sigset follow."""

    _fields_ = [("len", _u32)]


class kvm_translation(_Struct):
    """Argument and result of KVM_TRANSLATE (24 bytes)."""

    _fields_ = [
        ("linear_address", _u64),
        ("physical_address", _u64),
        ("valid", _u8),
        ("writeable", _u8),
        ("usermode", _u8),
        ("pad", _u8 * 5),
    ]


assert ctypes.sizeof(kvm_regs) == 144
assert ctypes.sizeof(kvm_segment) == 24
assert ctypes.sizeof(kvm_dtable) == 16
assert ctypes.sizeof(kvm_sregs) == 312
assert kvm_sregs.efer.offset == 264 and kvm_sregs.interrupt_bitmap.offset == 280
assert ctypes.sizeof(kvm_userspace_memory_region) == 32
assert ctypes.sizeof(kvm_dirty_log) == 16
assert ctypes.sizeof(kvm_clear_dirty_log) == 24
assert ctypes.sizeof(kvm_guest_debug) == 72
assert ctypes.sizeof(kvm_cpuid_entry2) == 40
assert ctypes.sizeof(kvm_cpuid2) == 8
assert ctypes.sizeof(kvm_enable_cap) == 104
assert ctypes.sizeof(kvm_translation) == 24
assert RUN_SYNC_SREGS == RUN_SYNC_REGS + ctypes.sizeof(kvm_regs)

# ioctl numbers, derived from the struct sizes (the test suite checks them against
# the literal values of Appendix A).
KVM_GET_API_VERSION: Final = _io(0x00)
KVM_CREATE_VM: Final = _io(0x01)
KVM_CHECK_EXTENSION: Final = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE: Final = _io(0x04)
KVM_GET_SUPPORTED_CPUID: Final = _iowr(0x05, kvm_cpuid2)
KVM_CREATE_VCPU: Final = _io(0x41)
KVM_GET_DIRTY_LOG: Final = _iow(0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION: Final = _iow(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR: Final = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR: Final = _iow(0x48, _u64)
KVM_RUN: Final = _io(0x80)
KVM_SET_SIGNAL_MASK: Final = _iow(0x8B, kvm_signal_mask)
KVM_GET_REGS: Final = _ior(0x81, kvm_regs)
KVM_SET_REGS: Final = _iow(0x82, kvm_regs)
KVM_GET_SREGS: Final = _ior(0x83, kvm_sregs)
KVM_SET_SREGS: Final = _iow(0x84, kvm_sregs)
KVM_TRANSLATE: Final = _iowr(0x85, kvm_translation)
KVM_SET_CPUID2: Final = _iow(0x90, kvm_cpuid2)
KVM_SET_GUEST_DEBUG: Final = _iow(0x9B, kvm_guest_debug)
KVM_ENABLE_CAP: Final = _iow(0xA3, kvm_enable_cap)
KVM_CLEAR_DIRTY_LOG: Final = _iowr(0xC0, kvm_clear_dirty_log)

#: ioctl number -> name, for error messages.
IOCTL_NAMES: Final[dict[int, str]] = {
    globals()[name]: name
    for name in (
        "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE",
        "KVM_GET_SUPPORTED_CPUID", "KVM_CREATE_VCPU", "KVM_GET_DIRTY_LOG", "KVM_SET_USER_MEMORY_REGION",
        "KVM_SET_TSS_ADDR", "KVM_SET_IDENTITY_MAP_ADDR", "KVM_RUN", "KVM_GET_REGS", "KVM_SET_REGS",
        "KVM_GET_SREGS", "KVM_SET_SREGS", "KVM_TRANSLATE", "KVM_SET_CPUID2", "KVM_SET_GUEST_DEBUG",
        "KVM_ENABLE_CAP", "KVM_CLEAR_DIRTY_LOG", "KVM_SET_SIGNAL_MASK",
    )
}  # fmt: skip


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def buffer_address(buffer: Any) -> int:
    """Return the address of a writable buffer (an ``mmap``, ``bytearray``, ctypes array...).

    The buffer is not pinned: keep it alive (and mapped) for as long as KVM uses it.

    Args:
        buffer: any object supporting the writable buffer protocol.

    Returns:
        The address of its first byte, suitable as ``userspace_addr``.

    Raises:
        TypeError: the buffer is read-only or not a buffer.
    """
    view = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def dirty_page_indices(bitmap: bytes) -> list[int]:
    """Decode a dirty bitmap (bit *i* = page *i* of the slot) into page indices.

    Args:
        bitmap: as returned by :meth:`VmFd.get_dirty_log`.

    Returns:
        The indices of the set bits, ascending.
    """
    value = int.from_bytes(bitmap, "little")
    pages = []
    while value:
        low = value & -value
        pages.append(low.bit_length() - 1)
        value ^= low
    return pages


def _cap_name(cap: int) -> str:
    return CAP_NAMES.get(cap, f"#{cap}")


# --------------------------------------------------------------------------------------
# Exits
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VcpuExit:
    """Base class of the values :meth:`VcpuFd.run` returns, one subclass per exit kind."""


@dataclass(frozen=True, slots=True)
class Mmio(VcpuExit):
    """KVM_EXIT_MMIO: an access to guest-physical memory no writable memslot backs.

    Writes to a ``MEM_READONLY`` slot arrive here; reads from it do not (they are served
    from the backing memory).  For a write, the instruction has already retired.

    Attributes:
        phys_addr: guest-physical address of the access.
        data: for a write, the ``length`` bytes written (little-endian, as stored);
            for a read, ``b""`` -- answer with :meth:`VcpuFd.complete_mmio_read`.
        length: access size in bytes (1..8).
        is_write: True for a write.
    """

    phys_addr: int
    data: bytes
    length: int
    is_write: bool

    @property
    def value(self) -> int:
        """The written data as a little-endian integer (0 for a read)."""
        return int.from_bytes(self.data, "little")


@dataclass(frozen=True, slots=True)
class Io(VcpuExit):
    """KVM_EXIT_IO: a port I/O instruction (``in``/``out``/``ins``/``outs``).

    Attributes:
        direction: ``"in"`` or ``"out"`` (:data:`IO_IN` / :data:`IO_OUT`).
        size: bytes per element (1, 2 or 4).
        port: the I/O port.
        count: number of elements (more than 1 for ``rep ins``/``rep outs``).
        data: for ``out``, the ``size * count`` bytes written; for ``in``, ``b""`` --
            answer with :meth:`VcpuFd.complete_io_in`.
    """

    direction: Literal["in", "out"]
    size: int
    port: int
    count: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Debug(VcpuExit):
    """KVM_EXIT_DEBUG: single-step or breakpoint (see :meth:`VcpuFd.set_guest_debug`).

    Attributes:
        exception: the vector (1 = #DB, 3 = #BP).
        pc: guest linear RIP.
        dr6: DR6 (bit 14, BS, set for a single step).
        dr7: DR7.
    """

    exception: int
    pc: int
    dr6: int
    dr7: int


@dataclass(frozen=True, slots=True)
class Hlt(VcpuExit):
    """KVM_EXIT_HLT: the guest executed ``hlt`` (without an in-kernel irqchip)."""


@dataclass(frozen=True, slots=True)
class Shutdown(VcpuExit):
    """KVM_EXIT_SHUTDOWN: triple fault (e.g. an exception with no usable IDT)."""


@dataclass(frozen=True, slots=True)
class Intr(VcpuExit):
    """KVM_EXIT_INTR: KVM_RUN was interrupted and ``immediate_exit`` is set."""


@dataclass(frozen=True, slots=True)
class FailEntry(VcpuExit):
    """KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest (bad guest state).

    Attributes:
        hardware_entry_failure_reason: vendor-specific reason.
        cpu: host CPU on which the entry failed.
    """

    hardware_entry_failure_reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class InternalError(VcpuExit):
    """KVM_EXIT_INTERNAL_ERROR, e.g. an instruction KVM's emulator cannot emulate.

    Attributes:
        suberror: 1 = emulation failure, 2 = exception during exception delivery,
            3 = delivery event, 4 = unexpected exit reason.
        ndata: number of valid words in ``data``.
        data: ``internal.data[:ndata]`` (at most 16 words).
        insn_bytes: for an emulation failure that carries them (flags bit 0), the bytes
            of the failing instruction (``insn_size`` of them); otherwise None.
    """

    suberror: int
    ndata: int
    data: tuple[int, ...]
    insn_bytes: bytes | None


@dataclass(frozen=True, slots=True)
class ExceptionExit(VcpuExit):
    """KVM_EXIT_EXCEPTION: a guest exception reported to userspace.

    Attributes:
        exception: the vector.
        error_code: the error code (0 when the vector has none).
    """

    exception: int
    error_code: int


@dataclass(frozen=True, slots=True)
class Hypercall(VcpuExit):
    """KVM_EXIT_HYPERCALL (only with KVM_CAP_EXIT_HYPERCALL enabled).

    Attributes:
        nr: the hypercall number.
        args: its six arguments.
        ret: the return value field (as currently set).
        longmode: nonzero when the guest was in 64-bit mode.
    """

    nr: int
    args: tuple[int, ...]
    ret: int
    longmode: int


@dataclass(frozen=True, slots=True)
class Unknown(VcpuExit):
    """KVM_EXIT_UNKNOWN, or any exit reason this binding does not decode.

    Attributes:
        exit_reason: ``kvm_run.exit_reason`` (0 for KVM_EXIT_UNKNOWN).
        hardware_exit_reason: the first union word (``hw.hardware_exit_reason``).
        raw: the 256 bytes of the exit union, to decode other exit kinds.
    """

    exit_reason: int
    hardware_exit_reason: int
    raw: bytes = field(default=b"", repr=False, compare=False)

    @property
    def name(self) -> str:
        """The exit reason's name, e.g. ``"X86_RDMSR"``."""
        return EXIT_NAMES.get(self.exit_reason, f"#{self.exit_reason}")


_MMIO = struct.Struct("<Q8sIB")
_IO = struct.Struct("<BBHIQ")
_DEBUG = struct.Struct("<IIQQQ")
_INTERNAL_HEAD = struct.Struct("<II")
_FAIL_ENTRY = struct.Struct("<QI")
_EXCEPTION = struct.Struct("<II")
_HYPERCALL = struct.Struct("<Q6QQI")
_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

_HLT: Final = Hlt()
_SHUTDOWN: Final = Shutdown()
_INTR: Final = Intr()


def decode_exit(run: Any) -> VcpuExit:
    """Decode the exit recorded in a ``struct kvm_run`` buffer.

    :meth:`VcpuFd.run` calls this on its mapping; it also accepts any bytes-like copy,
    so exit handling can be tested without KVM.

    Args:
        run: the ``kvm_run`` bytes (at least up to the end of the exit union, and up to
            ``io.data_offset + size * count`` for an ``out``).

    Returns:
        The matching :class:`VcpuExit` subclass instance.

    Raises:
        ValueError: an I/O exit's data lies outside the buffer.
    """
    (reason,) = _U32.unpack_from(run, RUN_EXIT_REASON)
    if reason == EXIT_MMIO:
        phys_addr, data, length, is_write = _MMIO.unpack_from(run, RUN_UNION)
        length = min(length, 8)
        return Mmio(phys_addr, data[:length] if is_write else b"", length, bool(is_write))
    if reason == EXIT_IO:
        direction, size, port, count, offset = _IO.unpack_from(run, RUN_UNION)
        if direction == EXIT_IO_OUT:
            end = offset + size * count
            if end > len(run):
                raise ValueError(f"KVM_EXIT_IO data [{offset:#x}, {end:#x}) outside kvm_run ({len(run):#x} bytes)")
            return Io(IO_OUT, size, port, count, bytes(run[offset:end]))
        return Io(IO_IN, size, port, count, b"")
    if reason == EXIT_DEBUG:
        exception, _pad, pc, dr6, dr7 = _DEBUG.unpack_from(run, RUN_UNION)
        return Debug(exception, pc, dr6, dr7)
    if reason == EXIT_HLT:
        return _HLT
    if reason == EXIT_SHUTDOWN:
        return _SHUTDOWN
    if reason == EXIT_INTR:
        return _INTR
    if reason == EXIT_INTERNAL_ERROR:
        suberror, ndata = _INTERNAL_HEAD.unpack_from(run, RUN_UNION)
        n = min(ndata, 16)
        data = struct.unpack_from(f"<{n}Q", run, RUN_UNION + 8)
        insn: bytes | None = None
        if suberror == INTERNAL_ERROR_EMULATION and ndata >= 1 and data[0] & INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
            (size,) = _U8.unpack_from(run, RUN_UNION + 16)
            start = RUN_UNION + 17
            insn = bytes(run[start : start + min(size, 15)])
        return InternalError(suberror, ndata, data, insn)
    if reason == EXIT_FAIL_ENTRY:
        failure, cpu = _FAIL_ENTRY.unpack_from(run, RUN_UNION)
        return FailEntry(failure, cpu)
    if reason == EXIT_EXCEPTION:
        exception, error_code = _EXCEPTION.unpack_from(run, RUN_UNION)
        return ExceptionExit(exception, error_code)
    if reason == EXIT_HYPERCALL:
        nr, *args, ret, longmode = _HYPERCALL.unpack_from(run, RUN_UNION)
        return Hypercall(nr, tuple(args), ret, longmode)
    (hw,) = _U64.unpack_from(run, RUN_UNION)
    return Unknown(reason, hw, bytes(run[RUN_UNION : RUN_UNION + RUN_UNION_SIZE]))


# --------------------------------------------------------------------------------------
# File-descriptor wrappers
# --------------------------------------------------------------------------------------


class _Fd:
    """An owned file descriptor with close() and context-manager support."""

    _fd: int

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        """Return the underlying file descriptor.

        Returns:
            The fd number.

        Raises:
            ValueError: the object was closed.
        """
        if self._fd < 0:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._fd < 0

    def close(self) -> None:
        """Close the file descriptor (idempotent)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Kvm(_Fd):
    """The KVM system file descriptor (``/dev/kvm``).

    Opening checks that the API version is 12.  Use as a context manager or call
    :meth:`close`.
    """

    def __init__(self, path: str = KVM_DEVICE) -> None:
        """Open ``/dev/kvm`` (``O_RDWR | O_CLOEXEC``) and check the API version.

        Args:
            path: the KVM device node.

        Raises:
            KvmUnavailable: the device is missing, not accessible, not a KVM device,
                or speaks another API version.
        """
        super().__init__(-1)
        self.path = path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as e:
            raise KvmUnavailable(f"{path} does not exist") from e
        except PermissionError as e:
            raise KvmUnavailable(f"permission denied opening {path} (need rw access, e.g. the kvm group)") from e
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e}") from e
        self._fd = fd
        try:
            version = self.api_version()
        except KvmError as e:
            self.close()
            raise KvmUnavailable(f"{path} is not a KVM device: {e}") from e
        if version != KVM_API_VERSION:
            self.close()
            raise KvmUnavailable(f"KVM API version {version}, need {KVM_API_VERSION}")
        self._mmap_size: int | None = None

    def api_version(self) -> int:
        """Return the KVM API version (KVM_GET_API_VERSION).

        Returns:
            The version; always 12 on any kernel since 2.6.22.

        Raises:
            KvmError: the ioctl failed.
        """
        return _ioctl(self.fileno(), KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """Query a capability on the system fd (KVM_CHECK_EXTENSION).

        Args:
            cap: a ``CAP_*`` constant.

        Returns:
            0 when unsupported; otherwise 1 or a capability-specific value.

        Raises:
            KvmError: the ioctl failed.
        """
        return _ioctl(self.fileno(), KVM_CHECK_EXTENSION, cap)

    def require(self, *caps: int) -> tuple[int, ...]:
        """Check that capabilities are present.

        Args:
            *caps: ``CAP_*`` constants.

        Returns:
            The KVM_CHECK_EXTENSION value of each, in order.

        Raises:
            KvmUnavailable: one is missing; the message names it.
        """
        values = []
        for cap in caps:
            value = self.check_extension(cap)
            if value <= 0:
                raise KvmUnavailable(
                    f"capability {_cap_name(cap)} missing: KVM_CHECK_EXTENSION({cap}) returned {value} on {self.path}"
                )
            values.append(value)
        return tuple(values)

    def vcpu_mmap_size(self) -> int:
        """Return the size of a vCPU's ``kvm_run`` mapping (KVM_GET_VCPU_MMAP_SIZE).

        Returns:
            Bytes (12288 on the development machines).

        Raises:
            KvmError: the ioctl failed.
        """
        if self._mmap_size is None:
            self._mmap_size = _ioctl(self.fileno(), KVM_GET_VCPU_MMAP_SIZE)
        return self._mmap_size

    def get_supported_cpuid(self, max_entries: int = 256) -> list[kvm_cpuid_entry2]:
        """Return the CPUID entries KVM can expose (KVM_GET_SUPPORTED_CPUID).

        Args:
            max_entries: capacity of the buffer handed to the kernel.

        Returns:
            Copies of the entries; pass (possibly edited) to :meth:`VcpuFd.set_cpuid2`.

        Raises:
            KvmError: the ioctl failed (E2BIG: ``max_entries`` too small).
        """
        buf = make_kvm_cpuid2(max_entries)
        _ioctl(self.fileno(), KVM_GET_SUPPORTED_CPUID, ctypes.addressof(buf))
        return [kvm_cpuid_entry2.from_buffer_copy(buf.entries[i]) for i in range(buf.nent)]  # type: ignore[attr-defined]

    def create_vm(self, machine_type: int = 0) -> VmFd:
        """Create a virtual machine (KVM_CREATE_VM).

        Args:
            machine_type: 0 on x86.

        Returns:
            The new VM's :class:`VmFd`.

        Raises:
            KvmError: the ioctl failed.
        """
        fd = _ioctl(self.fileno(), KVM_CREATE_VM, machine_type)
        return VmFd(fd, self.vcpu_mmap_size())


class VmFd(_Fd):
    """A virtual machine; create it with :meth:`Kvm.create_vm`."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        """Wrap a VM fd (normally done by :meth:`Kvm.create_vm`).

        Args:
            fd: the fd KVM_CREATE_VM returned; this object owns it.
            vcpu_mmap_size: size of each vCPU's ``kvm_run`` mapping.
        """
        super().__init__(fd)
        self.vcpu_mmap_size = vcpu_mmap_size
        # slot -> (guest_phys_addr, memory_size, flags), as set through this object;
        # used to size dirty bitmaps safely.
        self._slots: dict[int, tuple[int, int, int]] = {}
        self._sync_regs_supported: int | None = None

    def check_extension(self, cap: int) -> int:
        """Query a capability for this VM (KVM_CHECK_EXTENSION on the VM fd).

        Args:
            cap: a ``CAP_*`` constant.

        Returns:
            0 when unsupported; otherwise 1 or a capability-specific value.

        Raises:
            KvmError: the ioctl failed.
        """
        return _ioctl(self.fileno(), KVM_CHECK_EXTENSION, cap)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """Enable a VM capability (KVM_ENABLE_CAP).

        Args:
            cap: a ``CAP_*`` constant, e.g. ``CAP_MANUAL_DIRTY_LOG_PROTECT2``.
            *args: up to four capability-specific arguments.
            flags: the ``flags`` field (0 for every current capability).

        Raises:
            ValueError: more than four arguments.
            KvmError: the ioctl failed (EINVAL: unknown capability or bad arguments).
        """
        if len(args) > 4:
            raise ValueError(f"KVM_ENABLE_CAP takes at most 4 args, got {len(args)}")
        arg = kvm_enable_cap(cap=cap, flags=flags)
        for i, value in enumerate(args):
            arg.args[i] = value
        try:
            _ioctl(self.fileno(), KVM_ENABLE_CAP, ctypes.addressof(arg))
        except KvmError as e:
            e.detail = f"cap {_cap_name(cap)}, args {tuple(hex(a) for a in args)}"
            raise

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        """Create, move or delete a memslot (KVM_SET_USER_MEMORY_REGION).

        Args:
            slot: slot number (bits 16+ select the address space).
            guest_phys_addr: guest-physical base, page-aligned.
            memory_size: bytes, a multiple of the page size; 0 deletes the slot.
            userspace_addr: host address of the backing memory (see :func:`buffer_address`).
            flags: ``MEM_LOG_DIRTY_PAGES`` and/or ``MEM_READONLY``.

        Raises:
            KvmError: the ioctl failed (EEXIST: overlaps another slot; EINVAL: bad
                alignment, resize, or toggling ``MEM_READONLY`` on an existing slot).
        """
        region = kvm_userspace_memory_region(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        try:
            _ioctl(self.fileno(), KVM_SET_USER_MEMORY_REGION, ctypes.addressof(region))
        except KvmError as e:
            e.detail = (
                f"slot {slot}, gpa {guest_phys_addr:#x}, size {memory_size:#x}, "
                f"hva {userspace_addr:#x}, flags {flags:#x}"
            )
            raise
        if memory_size:
            self._slots[slot] = (guest_phys_addr, memory_size, flags)
        else:
            self._slots.pop(slot, None)

    def delete_memory_region(self, slot: int) -> None:
        """Delete a memslot (KVM_SET_USER_MEMORY_REGION with size 0).

        Args:
            slot: the slot number.

        Raises:
            KvmError: the ioctl failed.
        """
        self.set_user_memory_region(slot, 0, 0, 0, 0)

    def set_tss_addr(self, addr: int) -> None:
        """Set the guest-physical address of the 3-page TSS region (KVM_SET_TSS_ADDR).

        Required on Intel hosts before running real-mode code; typical value 0xfffbd000.

        Args:
            addr: guest-physical address (passed as an unsigned long immediate).

        Raises:
            KvmError: the ioctl failed.
        """
        _ioctl(self.fileno(), KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """Set the guest-physical address of the EPT identity-map page (KVM_SET_IDENTITY_MAP_ADDR).

        Must be called before any vCPU is created; typical value 0xfeffc000.

        Args:
            addr: guest-physical address.

        Raises:
            KvmError: the ioctl failed (EEXIST/EINVAL once vCPUs exist).
        """
        value = _u64(addr)
        _ioctl(self.fileno(), KVM_SET_IDENTITY_MAP_ADDR, ctypes.addressof(value))

    def _bitmap_pages(self, slot: int, npages: int | None) -> int:
        known = self._slots.get(slot)
        slot_pages = None if known is None else -(-known[1] // PAGE_SIZE)
        if npages is None:
            if slot_pages is None:
                raise ValueError(f"slot {slot} was not set through this VmFd: pass npages")
            return slot_pages
        if slot_pages is not None and npages < slot_pages:
            # The kernel writes a bitmap sized for the whole slot.
            raise ValueError(f"slot {slot} has {slot_pages} pages; a bitmap for {npages} would overflow")
        return npages

    def get_dirty_log(self, slot: int, npages: int | None = None) -> bytes:
        """Fetch (and, unless manual protect is on, clear) a slot's dirty bitmap (KVM_GET_DIRTY_LOG).

        Args:
            slot: a slot created with ``MEM_LOG_DIRTY_PAGES``.
            npages: the slot's size in pages; inferred when the slot was set through
                this object.  Never smaller than the slot (the kernel writes it all).

        Returns:
            ``ceil(npages / 8)`` bytes; bit *i* (LSB first) is page *i* of the slot.
            :func:`dirty_page_indices` decodes it.

        Raises:
            ValueError: ``npages`` missing or smaller than the slot.
            KvmError: the ioctl failed (ENOENT: no dirty logging on that slot).
        """
        npages = self._bitmap_pages(slot, npages)
        bitmap = (_u64 * max(1, -(-npages // 64)))()
        arg = kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(bitmap))
        try:
            _ioctl(self.fileno(), KVM_GET_DIRTY_LOG, ctypes.addressof(arg))
        except KvmError as e:
            e.detail = f"slot {slot}"
            raise
        return bytes(bitmap)[: (npages + 7) // 8]

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: bytes) -> None:
        """Re-protect pages for dirty tracking (KVM_CLEAR_DIRTY_LOG).

        Only with ``CAP_MANUAL_DIRTY_LOG_PROTECT2`` enabled on the VM.

        Args:
            slot: the slot.
            first_page: first page (a multiple of 64).
            num_pages: pages covered (a multiple of 64, unless the range ends the slot).
            bitmap: bit *i* set = clear the dirty state of page ``first_page + i``.

        Raises:
            ValueError: ``bitmap`` shorter than ``num_pages`` bits.
            KvmError: the ioctl failed.
        """
        if len(bitmap) * 8 < num_pages:
            raise ValueError(f"bitmap has {len(bitmap) * 8} bits, need {num_pages}")
        buf = (_u8 * (max(1, -(-num_pages // 64)) * 8))()
        ctypes.memmove(buf, bitmap, min(len(bitmap), len(buf)))
        arg = kvm_clear_dirty_log(slot, num_pages, first_page, ctypes.addressof(buf))
        try:
            _ioctl(self.fileno(), KVM_CLEAR_DIRTY_LOG, ctypes.addressof(arg))
        except KvmError as e:
            e.detail = f"slot {slot}, pages {first_page}+{num_pages}"
            raise

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        """Create a vCPU and map its ``kvm_run`` area (KVM_CREATE_VCPU + mmap).

        Args:
            vcpu_id: the vCPU (APIC) id.

        Returns:
            The new :class:`VcpuFd`.

        Raises:
            KvmError: the ioctl or the mmap failed.
        """
        fd = _ioctl(self.fileno(), KVM_CREATE_VCPU, vcpu_id)
        try:
            return VcpuFd(fd, self, vcpu_id)
        except BaseException:
            os.close(fd)
            raise

    def _supported_sync_regs(self) -> int:
        if self._sync_regs_supported is None:
            self._sync_regs_supported = self.check_extension(CAP_SYNC_REGS)
        return self._sync_regs_supported


class VcpuFd(_Fd):
    """A virtual CPU; create it with :meth:`VmFd.create_vcpu`.

    Holds the shared ``kvm_run`` mapping, read with ``struct.unpack_from`` after each exit.
    """

    def __init__(self, fd: int, vm: VmFd, vcpu_id: int) -> None:
        """Wrap a vCPU fd and mmap its ``kvm_run`` (normally done by :meth:`VmFd.create_vcpu`).

        Args:
            fd: the fd KVM_CREATE_VCPU returned; this object owns it on success.
            vm: the VM it belongs to.
            vcpu_id: its id.

        Raises:
            KvmError: the mmap failed.
        """
        super().__init__(-1)
        self.vm = vm
        self.vcpu_id = vcpu_id
        #: signals that kick this vCPU out of KVM_RUN (see :meth:`set_signal_mask`):
        #: :meth:`run` consumes them when KVM_RUN returns EINTR
        self.kick_signals: frozenset[int] = frozenset()
        try:
            self._run = mmap.mmap(fd, vm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise KvmError(e.errno or _errno.EIO, "mmap(kvm_run)") from e
        self._fd = fd

    def close(self) -> None:
        """Unmap ``kvm_run`` and close the vCPU fd (idempotent)."""
        run = getattr(self, "_run", None)
        if run is not None and not run.closed:
            run.close()
        super().close()

    @property
    def kvm_run(self) -> mmap.mmap:
        """The raw ``kvm_run`` mapping (do not keep views of it past :meth:`close`)."""
        return self._run

    # -- registers ---------------------------------------------------------------------

    def get_regs(self) -> kvm_regs:
        """Read the general-purpose registers (KVM_GET_REGS).

        Returns:
            A fresh :class:`kvm_regs`.

        Raises:
            KvmError: the ioctl failed.
        """
        regs = kvm_regs()
        _ioctl(self.fileno(), KVM_GET_REGS, ctypes.addressof(regs))
        return regs

    def set_regs(self, regs: kvm_regs) -> None:
        """Write the general-purpose registers (KVM_SET_REGS).

        Args:
            regs: all of them (read-modify-write via :meth:`get_regs`).

        Raises:
            KvmError: the ioctl failed.
        """
        _ioctl(self.fileno(), KVM_SET_REGS, ctypes.addressof(regs))

    def get_sregs(self) -> kvm_sregs:
        """Read the special registers: segments, descriptor tables, CRs, EFER (KVM_GET_SREGS).

        Returns:
            A fresh :class:`kvm_sregs`.

        Raises:
            KvmError: the ioctl failed.
        """
        sregs = kvm_sregs()
        _ioctl(self.fileno(), KVM_GET_SREGS, ctypes.addressof(sregs))
        return sregs

    def set_sregs(self, sregs: kvm_sregs) -> None:
        """Write the special registers (KVM_SET_SREGS).

        Args:
            sregs: all of them (read-modify-write via :meth:`get_sregs`).

        Raises:
            KvmError: the ioctl failed (EINVAL: inconsistent state, e.g. bad CR/EFER mix).
        """
        _ioctl(self.fileno(), KVM_SET_SREGS, ctypes.addressof(sregs))

    def set_cpuid2(self, entries: Sequence[kvm_cpuid_entry2]) -> None:
        """Set the CPUID the guest sees (KVM_SET_CPUID2); call before the first :meth:`run`.

        Args:
            entries: e.g. :meth:`Kvm.get_supported_cpuid`, possibly edited.

        Raises:
            KvmError: the ioctl failed.
        """
        arg = make_kvm_cpuid2(entries)
        _ioctl(self.fileno(), KVM_SET_CPUID2, ctypes.addressof(arg))

    def set_guest_debug(self, control: int, debugreg: Sequence[int] | None = None) -> None:
        """Configure single-step / breakpoints (KVM_SET_GUEST_DEBUG).

        Args:
            control: ``GUESTDBG_*`` bits, e.g. ``GUESTDBG_ENABLE | GUESTDBG_SINGLESTEP``;
                0 turns debugging off.
            debugreg: up to 8 values for DR0-DR7 (used with ``GUESTDBG_USE_HW_BP``).

        Raises:
            ValueError: more than 8 debug registers.
            KvmError: the ioctl failed.
        """
        arg = kvm_guest_debug(control=control)
        if debugreg is not None:
            if len(debugreg) > 8:
                raise ValueError(f"at most 8 debug registers, got {len(debugreg)}")
            for i, value in enumerate(debugreg):
                arg.debugreg[i] = value
        _ioctl(self.fileno(), KVM_SET_GUEST_DEBUG, ctypes.addressof(arg))

    def translate(self, linear_address: int) -> kvm_translation:
        """Translate a guest linear address with the guest's current paging (KVM_TRANSLATE).

        Args:
            linear_address: the guest linear address.

        Returns:
            The :class:`kvm_translation` (``physical_address``, ``valid``, ``writeable``,
            ``usermode``).

        Raises:
            KvmError: the ioctl failed.
        """
        arg = kvm_translation(linear_address=linear_address)
        _ioctl(self.fileno(), KVM_TRANSLATE, ctypes.addressof(arg))
        return arg

    # -- sync regs (register state in kvm_run, no ioctl) ----------------------------------

    def enable_sync_regs(self, mask: int = SYNC_X86_REGS) -> None:
        """Ask KVM to copy register state into ``kvm_run`` on every exit (``kvm_valid_regs``).

        Then :meth:`sync_regs` / :meth:`sync_rip` read it without an ioctl.

        Args:
            mask: ``SYNC_X86_*`` bits; 0 turns syncing off.

        Raises:
            KvmUnavailable: the VM's ``CAP_SYNC_REGS`` lacks some of the bits.
        """
        supported = self.vm._supported_sync_regs()
        if mask & ~supported:
            raise KvmUnavailable(
                f"capability SYNC_REGS missing bits {mask & ~supported:#x}: KVM supports {supported:#x}"
            )
        _U64.pack_into(self._run, RUN_VALID_REGS, mask)

    def set_signal_mask(self, signals: Iterable[int] | None) -> None:
        """KVM_SET_SIGNAL_MASK: the signals blocked while this vCPU runs in KVM_RUN,
        whatever the calling thread blocks otherwise (None: the thread's own mask).

        A signal the thread blocks but this mask does not, sent to the thread, makes
        KVM_RUN return EINTR and then stays pending (blocked again on return): the way
        to kick a vCPU thread out of KVM_RUN without a signal handler.  Name such
        signals in :attr:`kick_signals`, so :meth:`run` consumes them on EINTR.

        Raises:
            ValueError: a signal number outside 1..64.
        """
        fd = self.fileno()
        if signals is None:
            _ioctl(fd, KVM_SET_SIGNAL_MASK, 0)
            return
        bits = 0
        for sig in signals:
            n = int(sig)
            if not 1 <= n <= 64:
                raise ValueError(f"signal {sig!r}: must be a signal number from 1 to 64")
            bits |= 1 << (n - 1)
        arg = ctypes.create_string_buffer(struct.pack("<IQ", 8, bits))  # the kernel's sigset: 8 bytes
        _ioctl(fd, KVM_SET_SIGNAL_MASK, ctypes.addressof(arg))

    def drain_kicks(self) -> None:
        """Consume the :attr:`kick_signals` pending for the calling thread (it blocks them)."""
        kicks = self.kick_signals
        if kicks:
            while signal.sigtimedwait(kicks, 0) is not None:
                pass

    @property
    def sync_regs_mask(self) -> int:
        """The ``kvm_valid_regs`` mask currently requested."""
        return _U64.unpack_from(self._run, RUN_VALID_REGS)[0]

    def _require_sync(self, bit: int, what: str) -> None:
        if not self.sync_regs_mask & bit:
            raise RuntimeError(f"{what} are not synced: call enable_sync_regs({bit}) before run()")

    def sync_regs(self) -> kvm_regs:
        """Return the general-purpose registers KVM stored in ``kvm_run`` at the last exit.

        Returns:
            A copy, as :class:`kvm_regs`.

        Raises:
            RuntimeError: ``SYNC_X86_REGS`` is not enabled.
        """
        self._require_sync(SYNC_X86_REGS, "registers")
        return kvm_regs.from_buffer_copy(self._run, RUN_SYNC_REGS)

    def sync_rip(self) -> int:
        """Return RIP as KVM stored it in ``kvm_run`` at the last exit (no ioctl).

        Returns:
            The guest RIP (after an MMIO-write exit: the next instruction).

        Raises:
            RuntimeError: ``SYNC_X86_REGS`` is not enabled.
        """
        self._require_sync(SYNC_X86_REGS, "registers")
        return _U64.unpack_from(self._run, RUN_SYNC_RIP)[0]

    def set_sync_regs(self, regs: kvm_regs) -> None:
        """Store registers in ``kvm_run`` for KVM to load on the next :meth:`run` (no ioctl).

        Args:
            regs: all general-purpose registers.

        Raises:
            RuntimeError: ``SYNC_X86_REGS`` is not enabled.
        """
        self._require_sync(SYNC_X86_REGS, "registers")
        self._run[RUN_SYNC_REGS : RUN_SYNC_REGS + ctypes.sizeof(kvm_regs)] = bytes(regs)
        self._mark_dirty(SYNC_X86_REGS)

    def sync_sregs(self) -> kvm_sregs:
        """Return the special registers KVM stored in ``kvm_run`` at the last exit.

        Returns:
            A copy, as :class:`kvm_sregs`.

        Raises:
            RuntimeError: ``SYNC_X86_SREGS`` is not enabled.
        """
        self._require_sync(SYNC_X86_SREGS, "special registers")
        return kvm_sregs.from_buffer_copy(self._run, RUN_SYNC_SREGS)

    def set_sync_sregs(self, sregs: kvm_sregs) -> None:
        """Store special registers in ``kvm_run`` for KVM to load on the next :meth:`run`.

        Args:
            sregs: all special registers.

        Raises:
            RuntimeError: ``SYNC_X86_SREGS`` is not enabled.
        """
        self._require_sync(SYNC_X86_SREGS, "special registers")
        self._run[RUN_SYNC_SREGS : RUN_SYNC_SREGS + ctypes.sizeof(kvm_sregs)] = bytes(sregs)
        self._mark_dirty(SYNC_X86_SREGS)

    def _mark_dirty(self, bit: int) -> None:
        (dirty,) = _U64.unpack_from(self._run, RUN_DIRTY_REGS)
        _U64.pack_into(self._run, RUN_DIRTY_REGS, dirty | bit)

    # -- running -----------------------------------------------------------------------

    @property
    def immediate_exit(self) -> bool:
        """``kvm_run.immediate_exit``: when set, KVM_RUN returns at once (:class:`Intr`).

        Set it (e.g. from a signal handler) to stop a vCPU; clear it before running again.
        """
        return bool(self._run[RUN_IMMEDIATE_EXIT])

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self._run[RUN_IMMEDIATE_EXIT] = 1 if value else 0

    def run(self) -> VcpuExit:
        """Run the vCPU until the next exit to userspace (KVM_RUN).

        EINTR is retried after running Python signal handlers, unless ``immediate_exit``
        is set, in which case :class:`Intr` is returned.

        Returns:
            One frozen :class:`VcpuExit` subclass instance describing the exit.

        Raises:
            KvmError: KVM_RUN failed (e.g. EFAULT: a memslot's backing memory is gone).
            Exception: whatever a Python signal handler raised during the run.
        """
        fd = self.fileno()
        while _libc_ioctl(fd, KVM_RUN, 0) < 0:
            err = ctypes.get_errno()
            if err != _errno.EINTR:
                raise KvmError(err, "KVM_RUN")
            self.drain_kicks()  # (else KVM_RUN would return EINTR again at once)
            _check_signals()
            if self._run[RUN_IMMEDIATE_EXIT]:
                return _INTR
        return decode_exit(self._run)

    def complete_mmio_read(self, data: bytes) -> None:
        """Supply the value of the MMIO read the last exit reported; the next :meth:`run` delivers it.

        Args:
            data: exactly ``Mmio.length`` bytes, little-endian.

        Raises:
            RuntimeError: the last exit was not an MMIO read.
            ValueError: wrong length.
        """
        (reason,) = _U32.unpack_from(self._run, RUN_EXIT_REASON)
        _addr, _data, length, is_write = _MMIO.unpack_from(self._run, RUN_UNION)
        if reason != EXIT_MMIO or is_write:
            raise RuntimeError("complete_mmio_read: the last exit was not an MMIO read")
        if len(data) != length:
            raise ValueError(f"complete_mmio_read: the read is {length} bytes, got {len(data)}")
        self._run[RUN_UNION + 8 : RUN_UNION + 8 + length] = bytes(data)

    def complete_io_in(self, data: bytes) -> None:
        """Supply the value of the ``in`` the last exit reported; the next :meth:`run` delivers it.

        Args:
            data: exactly ``Io.size * Io.count`` bytes.

        Raises:
            RuntimeError: the last exit was not an ``in``.
            ValueError: wrong length.
        """
        (reason,) = _U32.unpack_from(self._run, RUN_EXIT_REASON)
        direction, size, _port, count, offset = _IO.unpack_from(self._run, RUN_UNION)
        if reason != EXIT_IO or direction != EXIT_IO_IN:
            raise RuntimeError("complete_io_in: the last exit was not a port input")
        if len(data) != size * count:
            raise ValueError(f"complete_io_in: the input is {size}x{count} bytes, got {len(data)}")
        self._run[offset : offset + len(data)] = bytes(data)


# --------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------


def kvm_status(
    path: str = KVM_DEVICE, required: Sequence[int] = DEFAULT_REQUIRED_CAPS, probe_vm: bool = True
) -> tuple[bool, str]:
    """Say whether KVM is usable here, and why not.

    Opens the device, checks the API version and the required capabilities and, with
    ``probe_vm``, creates (and destroys) a VM with one vCPU.

    Args:
        path: the KVM device node.
        required: ``CAP_*`` constants that must be present.
        probe_vm: also create a VM and a vCPU.

    Returns:
        ``(True, summary)`` or ``(False, reason)``; the reason suits ``pytest.skip``.
    """
    try:
        with Kvm(path) as kvm:
            kvm.require(*required)
            if probe_vm:
                with kvm.create_vm() as vm, vm.create_vcpu(0):
                    pass
            return True, (
                f"{path}: KVM API version {kvm.api_version()}, vCPU mmap size {kvm.vcpu_mmap_size()}, "
                f"capabilities {', '.join(_cap_name(c) for c in required)} present"
            )
    except KvmUnavailable as e:
        return False, e.reason
    except KvmError as e:
        return False, f"{path}: {e}"


# The constants are public too.
__all__ += sorted(
    name
    for name in list(globals())
    if name.startswith(
        ("CAP_", "MEM_", "EXIT_", "GUESTDBG_", "SYNC_X86_", "KVM_", "RUN_", "INTERNAL_ERROR_", "DIRTY_LOG_")
    )
    and name not in __all__
)
