"""Tests of the thin KVM binding (sppkit.engines.kvm.binding).

Two parts:

* ABI and decoding tests that run everywhere: struct sizes and ioctl numbers against
  platform-notes.md Appendix A, exit decoding from hand-built ``kvm_run`` buffers, the
  error types.
* Tests against the real ``/dev/kvm``, skipped with the reason :func:`kvm_status` gives
  when KVM is not usable.  They run tiny real-mode guests (CS base = selector = 0),
  hand-assembled below; when GNU ``as`` is present, one test re-assembles every snippet
  and compares the bytes.

Guest-physical layout of the real-mode rig::

    0x0000-0x7fff  slot 0  RAM (code at 0x1000)
    0x8000-0x8fff  slot 1  MEM_READONLY (writes exit as MMIO; reads are native)
    0xa000-0xdfff  slot 2  MEM_LOG_DIRTY_PAGES, 4 pages
    0xf000         no slot (reads and writes exit as MMIO)
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import mmap
import pickle
import shutil
import signal
import struct
import subprocess
from collections.abc import Callable, Iterator

import pytest

from sppkit.engines import kvm as kvm_pkg
from sppkit.engines.kvm import binding as b
from sppkit.engines.kvm import (
    Debug,
    ExceptionExit,
    FailEntry,
    Hlt,
    Hypercall,
    InternalError,
    Intr,
    Io,
    Kvm,
    KvmError,
    KvmUnavailable,
    Mmio,
    Shutdown,
    Unknown,
    VcpuExit,
    buffer_address,
    decode_exit,
    dirty_page_indices,
    kvm_status,
)

KVM_OK, KVM_REASON = kvm_status()
requires_kvm = pytest.mark.skipif(not KVM_OK, reason=KVM_REASON)

# --------------------------------------------------------------------------------------
# Part 1: ABI, decoding and errors (no KVM needed)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("struct_type", "size"),
    [
        (b.kvm_regs, 144),
        (b.kvm_segment, 24),
        (b.kvm_dtable, 16),
        (b.kvm_sregs, 312),
        (b.kvm_userspace_memory_region, 32),
        (b.kvm_dirty_log, 16),
        (b.kvm_clear_dirty_log, 24),
        (b.kvm_guest_debug, 72),
        (b.kvm_cpuid_entry2, 40),
        (b.kvm_cpuid2, 8),
        (b.kvm_enable_cap, 104),
        (b.kvm_translation, 24),
    ],
)
def test_struct_size_matches_linux_abi(struct_type: type, size: int) -> None:
    """Every struct has the size <linux/kvm.h> gives it (Appendix A)."""
    assert ctypes.sizeof(struct_type) == size


def test_sregs_field_offsets() -> None:
    """kvm_sregs: 8 segments then gdt @192, idt @208, cr0 @224, efer @264, bitmap @280."""
    assert b.kvm_sregs.gdt.offset == 192
    assert b.kvm_sregs.idt.offset == 208
    assert b.kvm_sregs.cr0.offset == 224
    assert b.kvm_sregs.efer.offset == 264
    assert b.kvm_sregs.apic_base.offset == 272
    assert b.kvm_sregs.interrupt_bitmap.offset == 280


def test_variable_length_cpuid2() -> None:
    """make_kvm_cpuid2 gives the 8-byte header followed by nent 40-byte entries."""
    entry = b.kvm_cpuid_entry2(function=0, eax=0xD, ebx=0x756E6547)
    cpuid = b.make_kvm_cpuid2([entry, b.kvm_cpuid_entry2(function=1)])
    assert ctypes.sizeof(cpuid) == 8 + 2 * 40
    assert cpuid.nent == 2
    assert cpuid.entries[0] == entry
    assert bytes(cpuid)[8:12] == b"\0\0\0\0" and bytes(cpuid)[8 + 16 : 8 + 20] == struct.pack("<I", 0x756E6547)


def test_ioctl_numbers_match_appendix_a() -> None:
    """The numbers derived from _IO/_IOR/_IOW and the struct sizes equal the measured ones."""
    expected = {
        "KVM_GET_API_VERSION": 0xAE00,
        "KVM_CREATE_VM": 0xAE01,
        "KVM_CHECK_EXTENSION": 0xAE03,
        "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
        "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
        "KVM_CREATE_VCPU": 0xAE41,
        "KVM_GET_DIRTY_LOG": 0x4010AE42,
        "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
        "KVM_SET_TSS_ADDR": 0xAE47,
        "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
        "KVM_RUN": 0xAE80,
        "KVM_GET_REGS": 0x8090AE81,
        "KVM_SET_REGS": 0x4090AE82,
        "KVM_GET_SREGS": 0x8138AE83,
        "KVM_SET_SREGS": 0x4138AE84,
        "KVM_TRANSLATE": 0xC018AE85,
        "KVM_SET_CPUID2": 0x4008AE90,
        "KVM_SET_GUEST_DEBUG": 0x4048AE9B,
        "KVM_ENABLE_CAP": 0x4068AEA3,
        "KVM_CLEAR_DIRTY_LOG": 0xC018AEC0,
        "KVM_SET_SIGNAL_MASK": 0x4004AE8B,
    }
    assert {name: getattr(b, name) for name in expected} == expected
    assert {b.IOCTL_NAMES[number] for number in expected.values()} == set(expected)


def test_capability_and_exit_constants() -> None:
    assert (b.CAP_READONLY_MEM, b.CAP_SYNC_REGS, b.CAP_SET_GUEST_DEBUG) == (81, 74, 23)
    assert (b.CAP_MANUAL_DIRTY_LOG_PROTECT2, b.CAP_EXIT_ON_EMULATION_FAILURE) == (168, 204)
    assert b.CAP_NAMES[81] == "READONLY_MEM"
    assert (b.EXIT_IO, b.EXIT_MMIO, b.EXIT_SHUTDOWN, b.EXIT_INTERNAL_ERROR) == (2, 6, 8, 17)
    assert b.EXIT_NAMES[6] == "MMIO"
    assert (b.MEM_LOG_DIRTY_PAGES, b.MEM_READONLY) == (1, 2)


def test_package_reexports_the_binding() -> None:
    assert set(b.__all__) <= set(dir(kvm_pkg))
    assert kvm_pkg.CAP_READONLY_MEM == 81 and kvm_pkg.VmFd is b.VmFd


# -- exit decoding from hand-built kvm_run buffers -------------------------------------


def fake_run(reason: int, union: bytes = b"", size: int = 4096) -> bytearray:
    """A kvm_run image: exit_reason @8, the exit union @32."""
    run = bytearray(size)
    struct.pack_into("<I", run, 8, reason)
    run[32 : 32 + len(union)] = union
    return run


def test_decode_mmio_write() -> None:
    """mmio { u64 phys_addr @32; u8 data[8] @40; u32 len @48; u8 is_write @52 }: data[:len]."""
    run = fake_run(b.EXIT_MMIO, struct.pack("<Q8sIB", 0x100FFE, bytes.fromhex("ddccbbaa11111111"), 2, 1))
    assert decode_exit(run) == Mmio(0x100FFE, b"\xdd\xcc", 2, True)
    assert decode_exit(run).value == 0xCCDD


def test_decode_mmio_read_has_no_data() -> None:
    run = fake_run(b.EXIT_MMIO, struct.pack("<Q8sIB", 0xF000, b"garbage!", 4, 0))
    assert decode_exit(run) == Mmio(0xF000, b"", 4, False)


def test_decode_io_out_reads_data_at_data_offset() -> None:
    """io { u8 direction; u8 size; u16 port; u32 count; u64 data_offset } -- offset into kvm_run."""
    run = fake_run(b.EXIT_IO, struct.pack("<BBHIQ", b.EXIT_IO_OUT, 2, 0xE9, 3, 0x1000), size=0x2000)
    run[0x1000:0x1006] = b"abcdef"
    assert decode_exit(run) == Io("out", 2, 0xE9, 3, b"abcdef")


def test_decode_io_in() -> None:
    run = fake_run(b.EXIT_IO, struct.pack("<BBHIQ", b.EXIT_IO_IN, 4, 0x60, 1, 0x1000), size=0x2000)
    assert decode_exit(run) == Io(b.IO_IN, 4, 0x60, 1, b"")


def test_decode_io_out_outside_buffer_is_an_error() -> None:
    run = fake_run(b.EXIT_IO, struct.pack("<BBHIQ", b.EXIT_IO_OUT, 1, 0xE9, 1, 0x5000))
    with pytest.raises(ValueError, match="outside kvm_run"):
        decode_exit(run)


def test_decode_debug() -> None:
    run = fake_run(b.EXIT_DEBUG, struct.pack("<IIQQQ", 1, 0, 0x1001, 0xFFFF4FF0, 0x400))
    assert decode_exit(run) == Debug(1, 0x1001, 0xFFFF4FF0, 0x400)


def test_decode_emulation_failure_with_instruction_bytes() -> None:
    """emulation_failure: flags @40 (bit 0 = bytes valid), insn_size @48, insn_bytes @49."""
    union = struct.pack("<IIQB15s", 1, 3, 1, 4, bytes.fromhex("dd1e00f0") + bytes(11))
    exit_ = decode_exit(fake_run(b.EXIT_INTERNAL_ERROR, union))
    assert isinstance(exit_, InternalError)
    assert (exit_.suberror, exit_.ndata, exit_.data[0]) == (1, 3, 1)
    assert exit_.insn_bytes == bytes.fromhex("dd1e00f0")


def test_decode_internal_error_without_instruction_bytes() -> None:
    union = struct.pack("<II3Q", 3, 3, 0x80000b0e, 0x31, 0x12)
    assert decode_exit(fake_run(b.EXIT_INTERNAL_ERROR, union)) == InternalError(3, 3, (0x80000B0E, 0x31, 0x12), None)


def test_decode_other_kinds() -> None:
    assert decode_exit(fake_run(b.EXIT_HLT)) == Hlt()
    assert decode_exit(fake_run(b.EXIT_SHUTDOWN)) == Shutdown()
    assert decode_exit(fake_run(b.EXIT_INTR)) == Intr()
    assert decode_exit(fake_run(b.EXIT_FAIL_ENTRY, struct.pack("<QI", 0x21, 1))) == FailEntry(0x21, 1)
    assert decode_exit(fake_run(b.EXIT_EXCEPTION, struct.pack("<II", 13, 0x18))) == ExceptionExit(13, 0x18)
    hc = decode_exit(fake_run(b.EXIT_HYPERCALL, struct.pack("<Q6QQI", 12, 1, 2, 3, 4, 5, 6, 0, 1)))
    assert hc == Hypercall(12, (1, 2, 3, 4, 5, 6), 0, 1)
    assert decode_exit(fake_run(b.EXIT_UNKNOWN, struct.pack("<Q", 0x30))) == Unknown(0, 0x30)


def test_unmodelled_exit_reason_keeps_the_raw_union() -> None:
    run = fake_run(b.EXIT_X86_RDMSR, struct.pack("<BBBBIIQ", 0, 0, 0, 0, 0, 0xC0000080, 0))
    exit_ = decode_exit(run)
    assert isinstance(exit_, Unknown) and exit_.name == "X86_RDMSR"
    assert exit_.raw[8:12] == struct.pack("<I", 0xC0000080) and len(exit_.raw) == 256


EXAMPLE_EXITS: list[VcpuExit] = [
    Mmio(0x8000, b"\x01", 1, True),
    Io("out", 1, 0xE9, 1, b"A"),
    Debug(1, 0x1000, 0, 0),
    Hlt(),
    Shutdown(),
    Intr(),
    FailEntry(1, 0),
    InternalError(1, 0, (), None),
    ExceptionExit(6, 0),
    Hypercall(0, (0,) * 6, 0, 1),
    Unknown(99, 0),
]


@pytest.mark.parametrize("exit_", EXAMPLE_EXITS, ids=lambda e: type(e).__name__)
def test_exit_dataclasses_are_frozen(exit_: VcpuExit) -> None:
    """Exits are values: no field, existing or new, can be assigned."""
    assert dataclasses.is_dataclass(exit_) and isinstance(exit_, VcpuExit)
    names = [f.name for f in dataclasses.fields(exit_)] or ["anything"]
    with pytest.raises((dataclasses.FrozenInstanceError, AttributeError, TypeError)):
        setattr(exit_, names[0], 0)
    hash(exit_)  # frozen dataclasses are hashable


def test_exits_support_pattern_matching() -> None:
    match Io("out", 1, 0xE9, 1, b"A"):
        case Io(direction="out", port=0xE9, data=data):
            assert data == b"A"
        case _:
            pytest.fail("Io did not match")


# -- errors and availability -----------------------------------------------------------


def test_kvm_error_message_names_the_ioctl() -> None:
    err = KvmError(errno.EINVAL, "KVM_SET_USER_MEMORY_REGION")
    assert str(err) == "KVM_SET_USER_MEMORY_REGION failed: [Errno 22] Invalid argument"
    assert isinstance(err, OSError)
    assert (err.errno, err.ioctl, err.strerror) == (errno.EINVAL, "KVM_SET_USER_MEMORY_REGION", "Invalid argument")
    err.detail = "slot 1"
    assert str(err).endswith("Invalid argument (slot 1)")
    clone = pickle.loads(pickle.dumps(err))
    assert (type(clone), clone.errno, clone.ioctl, str(clone)) == (KvmError, err.errno, err.ioctl, str(err))


def test_kvm_status_when_the_device_is_missing() -> None:
    ok, reason = kvm_status("/nonexistent/kvm")
    assert not ok and reason == "/nonexistent/kvm does not exist"
    with pytest.raises(KvmUnavailable, match="does not exist"):
        Kvm("/nonexistent/kvm")


def test_a_device_that_is_not_kvm_is_unavailable() -> None:
    """KVM_GET_API_VERSION on /dev/null fails (ENOTTY): reported as KvmUnavailable naming the ioctl."""
    with pytest.raises(KvmUnavailable, match="not a KVM device.*KVM_GET_API_VERSION failed") as info:
        Kvm("/dev/null")
    assert isinstance(info.value.__cause__, KvmError)
    assert info.value.__cause__.errno == errno.ENOTTY


def test_dirty_page_indices() -> None:
    assert dirty_page_indices(b"\x05\x00\x80") == [0, 2, 23]
    assert dirty_page_indices(b"\x00") == []


# --------------------------------------------------------------------------------------
# Part 2: against /dev/kvm
# --------------------------------------------------------------------------------------

CODE_GPA = 0x1000
RAM_SIZE = 0x8000
RO_GPA, RO_SIZE = 0x8000, 0x1000
DIRTY_GPA, DIRTY_PAGES = 0xA000, 4
UNMAPPED_GPA = 0xF000
RO_SLOT, DIRTY_SLOT = 1, 2
RO_BYTE = 0x5A  # what the host puts at RO_GPA + 0x20 before the guest runs

# Hand-assembled 16-bit snippets: (Intel-syntax source, encoding).  Each program is a
# list of these; test_hand_assembly_matches_gnu_as re-assembles them with `as`.
Asm = tuple[str, str]

PROG_PORT_OUT: list[Asm] = [
    ("mov al, 0x48", "b048"),  # 'H'
    ("out 0xe9, al", "e6e9"),
    ("mov dx, 0xe9", "bae900"),
    ("mov ax, 0x2169", "b86921"),  # 'i', '!'
    ("out dx, ax", "ef"),  # a 2-byte out
    ("out 0xf4, al", "e6f4"),  # end marker
]
PROG_READONLY: list[Asm] = [
    ("mov dword ptr [0x8010], 0x11223344", "66c706108044332211"),  # write to the RO slot @0x1000
    ("mov al, byte ptr [0x8020]", "a02080"),  # read from the RO slot: native
    ("out 0xe9, al", "e6e9"),
    ("mov eax, dword ptr [0x8010]", "66a11080"),  # read back what the host committed (if it did)
    ("mov dx, 0xe9", "bae900"),
    ("out dx, eax", "66ef"),
    ("out 0xf4, al", "e6f4"),
]
PROG_COMPLETIONS: list[Asm] = [
    ("in al, 0x60", "e460"),
    ("out 0xe9, al", "e6e9"),
    ("mov ax, word ptr [0xf000]", "a100f0"),  # no memslot: MMIO read
    ("mov dx, 0xe9", "bae900"),
    ("out dx, ax", "ef"),
    ("hlt", "f4"),
]
PROG_DIRTY: list[Asm] = [
    ("mov byte ptr [0xa000], al", "a200a0"),  # page 0 of the dirty-logged slot
    ("mov byte ptr [0xc008], al", "a208c0"),  # page 2
    ("out 0xf4, al", "e6f4"),
    ("mov byte ptr [0xd000], al", "a200d0"),  # page 3
    ("out 0xf4, al", "e6f4"),
]
PROG_CPUID: list[Asm] = [
    ("xor eax, eax", "6631c0"),
    ("cpuid", "0fa2"),
    ("mov ax, bx", "89d8"),
    ("mov dx, 0xe9", "bae900"),
    ("out dx, ax", "ef"),
    ("out 0xf4, al", "e6f4"),
]
PROG_STEP: list[Asm] = [
    ("nop", "90"),
    ("inc ax", "40"),
    ("out 0xe9, al", "e6e9"),
    ("nop", "90"),
    ("nop", "90"),
]
PROG_SPIN: list[Asm] = [
    ("jmp .", "ebfe"),
]
PROG_X87_STORE_TO_MMIO: list[Asm] = [
    ("fstp qword ptr [0xf000]", "dd1e00f0"),  # DD /3: not in KVM's emulator
    ("out 0xf4, al", "e6f4"),
]
ALL_PROGRAMS = {
    name: prog for name, prog in globals().items() if name.startswith("PROG_") and isinstance(prog, list)
}


def assemble(prog: list[Asm]) -> bytes:
    return b"".join(bytes.fromhex(enc) for _, enc in prog)


def offset_after(prog: list[Asm], index: int) -> int:
    """Guest address just after instruction ``index`` of ``prog`` (loaded at CODE_GPA)."""
    return CODE_GPA + len(assemble(prog[: index + 1]))


@pytest.mark.skipif(shutil.which("as") is None or shutil.which("objcopy") is None, reason="GNU as/objcopy not installed")
@pytest.mark.parametrize("name", sorted(ALL_PROGRAMS))
def test_hand_assembly_matches_gnu_as(name: str, tmp_path) -> None:
    prog = ALL_PROGRAMS[name]
    source = ".intel_syntax noprefix\n.code16\n" + "".join(f"{text}\n" for text, _ in prog)
    (tmp_path / "g.s").write_text(source)
    subprocess.run(["as", "--32", "-o", str(tmp_path / "g.o"), str(tmp_path / "g.s")], check=True)
    subprocess.run(
        ["objcopy", "-O", "binary", "-j", ".text", str(tmp_path / "g.o"), str(tmp_path / "g.bin")], check=True
    )
    assert (tmp_path / "g.bin").read_bytes().hex() == assemble(prog).hex()


class RealModeRig:
    """A VM with the three memslots above and one vCPU in real mode at CODE_GPA."""

    def __init__(self, prog: list[Asm], *, manual_dirty_protect: bool = False) -> None:
        self.kvm = Kvm()
        self.vm = self.kvm.create_vm()
        self.vm.set_tss_addr(0xFFFBD000)  # above 2**31: the signed-int pitfall of fcntl.ioctl
        self.vm.set_identity_map_addr(0xFEFFC000)
        if manual_dirty_protect:
            self.vm.enable_cap(b.CAP_MANUAL_DIRTY_LOG_PROTECT2, b.DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        self.ram = mmap.mmap(-1, RAM_SIZE)
        self.ro = mmap.mmap(-1, RO_SIZE)
        self.dirty = mmap.mmap(-1, DIRTY_PAGES * b.PAGE_SIZE)
        self.vm.set_user_memory_region(0, 0, RAM_SIZE, buffer_address(self.ram))
        self.vm.set_user_memory_region(RO_SLOT, RO_GPA, RO_SIZE, buffer_address(self.ro), b.MEM_READONLY)
        self.vm.set_user_memory_region(
            DIRTY_SLOT, DIRTY_GPA, len(self.dirty), buffer_address(self.dirty), b.MEM_LOG_DIRTY_PAGES
        )
        code = assemble(prog)
        self.ram[CODE_GPA : CODE_GPA + len(code)] = code
        self.ro[0x20] = RO_BYTE
        self.vcpu = self.vm.create_vcpu(0)
        sregs = self.vcpu.get_sregs()
        sregs.cs.base = 0
        sregs.cs.selector = 0
        self.vcpu.set_sregs(sregs)
        regs = self.vcpu.get_regs()
        regs.rip = CODE_GPA
        regs.rflags = 0x2
        self.vcpu.set_regs(regs)

    def close(self) -> None:
        self.vcpu.close()
        self.vm.close()
        self.kvm.close()
        for m in (self.ram, self.ro, self.dirty):
            m.close()


@pytest.fixture
def rig() -> Iterator[Callable[..., RealModeRig]]:
    made: list[RealModeRig] = []

    def make(prog: list[Asm], **kwargs: bool) -> RealModeRig:
        made.append(RealModeRig(prog, **kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


@requires_kvm
class TestKvm:
    def test_capabilities_and_require(self) -> None:
        with Kvm() as kvm:
            assert kvm.api_version() == 12
            assert kvm.vcpu_mmap_size() >= b.RUN_MIN_SIZE
            (readonly, memslots) = kvm.require(b.CAP_READONLY_MEM, b.CAP_NR_MEMSLOTS)
            assert readonly >= 1 and memslots >= 32
            with pytest.raises(KvmUnavailable, match=r"capability #65535 missing"):
                kvm.require(0xFFFF)
        assert kvm.closed
        with pytest.raises(ValueError, match="closed"):
            kvm.check_extension(b.CAP_READONLY_MEM)

    def test_out_to_port_e9(self, rig) -> None:
        """Each ``out`` is one Io exit with the bytes written; ``out dx, ax`` carries 2 bytes."""
        vcpu = rig(PROG_PORT_OUT).vcpu
        assert vcpu.run() == Io("out", 1, 0xE9, 1, b"H")
        assert vcpu.run() == Io("out", 2, 0xE9, 1, b"i!")
        assert vcpu.run() == Io(b.IO_OUT, 1, 0xF4, 1, b"i")

    def test_write_to_readonly_slot_is_mmio_and_read_is_native(self, rig) -> None:
        """A write to a MEM_READONLY slot exits as MMIO and does not reach the backing memory;
        a read is served from the backing memory without an exit."""
        r = rig(PROG_READONLY)
        exit_ = r.vcpu.run()
        assert exit_ == Mmio(phys_addr=0x8010, data=bytes.fromhex("44332211"), length=4, is_write=True)
        assert r.ro[0x10:0x14] == b"\0\0\0\0"
        assert r.vcpu.run() == Io("out", 1, 0xE9, 1, bytes([RO_BYTE]))
        assert r.vcpu.run() == Io("out", 4, 0xE9, 1, b"\0\0\0\0")  # the write was dropped
        assert r.vcpu.run() == Io("out", 1, 0xF4, 1, b"\0")

    def test_committing_an_mmio_write_makes_it_visible_to_the_guest(self, rig) -> None:
        r = rig(PROG_READONLY)
        exit_ = r.vcpu.run()
        assert isinstance(exit_, Mmio) and exit_.is_write
        offset = exit_.phys_addr - RO_GPA
        r.ro[offset : offset + exit_.length] = exit_.data  # the handler allows the write
        assert r.vcpu.run() == Io("out", 1, 0xE9, 1, bytes([RO_BYTE]))
        assert r.vcpu.run() == Io("out", 4, 0xE9, 1, bytes.fromhex("44332211"))

    def test_rip_is_past_the_instruction_at_an_mmio_write_exit(self, rig) -> None:
        """RIP has moved past the writing instruction, both via KVM_GET_REGS and via sync regs."""
        r = rig(PROG_READONLY)
        r.vcpu.enable_sync_regs(b.SYNC_X86_REGS | b.SYNC_X86_SREGS)
        assert isinstance(r.vcpu.run(), Mmio)
        after_write = offset_after(PROG_READONLY, 0)
        assert after_write == 0x1009
        assert r.vcpu.get_regs().rip == after_write
        assert r.vcpu.sync_rip() == after_write
        assert r.vcpu.sync_regs() == r.vcpu.get_regs()
        assert r.vcpu.sync_sregs().cs.base == 0

    def test_sync_regs_written_by_userspace_are_loaded_on_entry(self, rig) -> None:
        r = rig(PROG_PORT_OUT)
        with pytest.raises(RuntimeError, match="not synced"):
            r.vcpu.sync_rip()
        r.vcpu.enable_sync_regs(b.SYNC_X86_REGS)
        assert r.vcpu.run().data == b"H"
        regs = r.vcpu.sync_regs()
        regs.rip = offset_after(PROG_PORT_OUT, 4)  # skip to `out 0xf4, al`
        regs.rax = 0x51
        r.vcpu.set_sync_regs(regs)
        assert r.vcpu.run() == Io("out", 1, 0xF4, 1, b"Q")

    def test_io_in_and_mmio_read_completions(self, rig) -> None:
        """The host answers an ``in`` and an MMIO read; the guest echoes what it got."""
        vcpu = rig(PROG_COMPLETIONS).vcpu
        vcpu.enable_sync_regs()
        assert vcpu.run() == Io("in", 1, 0x60, 1, b"")
        with pytest.raises(ValueError):
            vcpu.complete_io_in(b"\x77\x77")
        with pytest.raises(RuntimeError):
            vcpu.complete_mmio_read(b"\x77")
        vcpu.complete_io_in(b"\x77")
        assert vcpu.run() == Io("out", 1, 0xE9, 1, b"\x77")
        assert vcpu.run() == Mmio(UNMAPPED_GPA, b"", 2, False)
        assert vcpu.sync_rip() == offset_after(PROG_COMPLETIONS, 1)  # a read completes on re-entry
        vcpu.complete_mmio_read(b"\x34\x12")
        assert vcpu.run() == Io("out", 2, 0xE9, 1, b"\x34\x12")
        assert vcpu.run() == Hlt()

    def test_dirty_log(self, rig) -> None:
        """Writes to pages 0 and 2 of a MEM_LOG_DIRTY_PAGES slot show in the bitmap, which
        KVM_GET_DIRTY_LOG then clears."""
        r = rig(PROG_DIRTY)
        assert r.vm.get_dirty_log(DIRTY_SLOT) == b"\x00"
        assert r.vcpu.run().port == 0xF4
        assert r.vm.get_dirty_log(DIRTY_SLOT) == b"\x05"
        assert r.vm.get_dirty_log(DIRTY_SLOT) == b"\x00"
        assert r.vcpu.run().port == 0xF4
        assert dirty_page_indices(r.vm.get_dirty_log(DIRTY_SLOT, DIRTY_PAGES)) == [3]
        with pytest.raises(ValueError, match="overflow"):
            r.vm.get_dirty_log(DIRTY_SLOT, 1)
        with pytest.raises(KvmError) as info:
            r.vm.get_dirty_log(RO_SLOT)  # no dirty logging on that slot
        assert info.value.ioctl == "KVM_GET_DIRTY_LOG"

    def test_manual_dirty_log_protect_and_clear(self, rig) -> None:
        """With MANUAL_DIRTY_LOG_PROTECT2, KVM_GET_DIRTY_LOG no longer clears; KVM_CLEAR_DIRTY_LOG does."""
        r = rig(PROG_DIRTY, manual_dirty_protect=True)
        r.vcpu.run()
        assert r.vm.get_dirty_log(DIRTY_SLOT) == b"\x05"
        assert r.vm.get_dirty_log(DIRTY_SLOT) == b"\x05"
        r.vm.clear_dirty_log(DIRTY_SLOT, 0, DIRTY_PAGES, b"\x01")
        assert r.vm.get_dirty_log(DIRTY_SLOT) == b"\x04"
        r.vm.clear_dirty_log(DIRTY_SLOT, 0, DIRTY_PAGES, b"\x04")
        assert r.vm.get_dirty_log(DIRTY_SLOT) == b"\x00"

    def test_overlapping_memslot_raises_kvm_error(self, rig) -> None:
        r = rig(PROG_PORT_OUT)
        spare = mmap.mmap(-1, 0x2000)
        try:
            with pytest.raises(KvmError) as info:
                r.vm.set_user_memory_region(7, RO_GPA - 0x1000, len(spare), buffer_address(spare))
            assert info.value.errno in (errno.EEXIST, errno.EINVAL)
            assert info.value.ioctl == "KVM_SET_USER_MEMORY_REGION"
            assert str(info.value).startswith("KVM_SET_USER_MEMORY_REGION failed: [Errno ")
            assert "slot 7" in str(info.value)
        finally:
            spare.close()

    def test_readonly_flag_cannot_be_toggled_in_place_but_slot_can_be_recreated(self, rig) -> None:
        r = rig(PROG_READONLY)
        hva = buffer_address(r.ro)
        with pytest.raises(KvmError) as info:
            r.vm.set_user_memory_region(RO_SLOT, RO_GPA, RO_SIZE, hva, 0)
        assert info.value.errno == errno.EINVAL
        r.vm.delete_memory_region(RO_SLOT)
        r.vm.set_user_memory_region(RO_SLOT, RO_GPA, RO_SIZE, hva, 0)  # now ordinary RAM
        assert isinstance(r.vcpu.run(), Io)  # the write went straight to memory
        assert r.ro[0x10:0x14] == bytes.fromhex("44332211")

    def test_enable_cap(self, rig) -> None:
        r = rig(PROG_PORT_OUT)
        r.vm.enable_cap(b.CAP_EXIT_ON_EMULATION_FAILURE, 1)
        with pytest.raises(KvmError) as info:
            r.vm.enable_cap(0xFFFF)
        assert info.value.errno == errno.EINVAL and info.value.ioctl == "KVM_ENABLE_CAP"
        with pytest.raises(ValueError):
            r.vm.enable_cap(b.CAP_EXIT_ON_EMULATION_FAILURE, 1, 2, 3, 4, 5)

    def test_set_cpuid2(self, rig) -> None:
        """The guest's CPUID leaf 0 returns the EBX the host set."""
        r = rig(PROG_CPUID)
        entries = r.kvm.get_supported_cpuid()
        leaf0 = next(e for e in entries if e.function == 0)
        leaf0.ebx = 0x6B707073  # "sppk"
        r.vcpu.set_cpuid2(entries)
        assert r.vcpu.run() == Io("out", 2, 0xE9, 1, b"sp")

    def test_single_step(self, rig) -> None:
        """Each step exits as Debug(#DB) with pc after the instruction and DR6.BS set."""
        r = rig(PROG_STEP)
        r.vcpu.set_guest_debug(b.GUESTDBG_ENABLE | b.GUESTDBG_SINGLESTEP)
        first = r.vcpu.run()
        assert isinstance(first, Debug)
        assert (first.exception, first.pc) == (1, offset_after(PROG_STEP, 0))
        assert first.dr6 & (1 << 14)
        assert r.vcpu.run().pc == offset_after(PROG_STEP, 1)
        r.vcpu.set_guest_debug(0)
        assert r.vcpu.run() == Io("out", 1, 0xE9, 1, b"\x01")

    def test_emulation_failure_reports_instruction_bytes(self, rig) -> None:
        """An x87 store to an address without memslot needs the emulator, which lacks it."""
        exit_ = rig(PROG_X87_STORE_TO_MMIO).vcpu.run()
        assert isinstance(exit_, InternalError)
        assert exit_.suberror == b.INTERNAL_ERROR_EMULATION
        assert exit_.insn_bytes is not None and exit_.insn_bytes.startswith(bytes.fromhex("dd1e00f0"))

    def test_immediate_exit(self, rig) -> None:
        vcpu = rig(PROG_PORT_OUT).vcpu
        vcpu.immediate_exit = True
        assert vcpu.run() == Intr()
        vcpu.immediate_exit = False
        assert vcpu.run().data == b"H"

    def test_signals_interrupt_run(self, rig) -> None:
        """KVM_RUN returns EINTR for a signal: run() runs the Python handler and retries,
        unless the handler set immediate_exit (-> Intr) or raised (-> propagates)."""
        vcpu = rig(PROG_SPIN).vcpu
        calls = []

        def handler(signum: int, frame: object) -> None:
            calls.append(signum)
            if len(calls) == 2:  # the first signal only interrupts; run() must re-enter
                vcpu.immediate_exit = True
            if len(calls) == 3:
                raise TimeoutError("guest ran too long")

        old = signal.signal(signal.SIGALRM, handler)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)
            assert vcpu.run() == Intr()
            assert len(calls) == 2
            vcpu.immediate_exit = False
            with pytest.raises(TimeoutError):
                vcpu.run()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        assert vcpu.get_regs().rip == CODE_GPA  # still spinning

    def test_translate_in_real_mode_is_identity(self, rig) -> None:
        t = rig(PROG_PORT_OUT).vcpu.translate(0x1234)
        assert (t.valid, t.physical_address) == (1, 0x1234)

    def test_closed_vcpu(self, rig) -> None:
        vcpu = rig(PROG_PORT_OUT).vcpu
        vcpu.close()
        vcpu.close()
        with pytest.raises(ValueError, match="closed"):
            vcpu.run()
