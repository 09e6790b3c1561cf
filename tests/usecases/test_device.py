"""Device virtualization: the Device/DeviceBus framework on a bare Vm, then the
RingConsole with the devdriver guest end to end, on Unicorn always and on KVM where
usable."""

from __future__ import annotations

import json
import struct

import pytest
from click.testing import CliRunner

from sppkit.arch.sppt import FULL_ACCESS_MAP
from sppkit.guests import build_guest, load_elf
from sppkit.usecases.device import (
    Device,
    DeviceBus,
    DeviceError,
    Register,
    RingConsole,
    device_command,
    resolve_page,
    run_device,
)
from sppkit.vmm import Decision, Vm

from usecase_engines import ENGINES, GCC_OK, GCC_WHY, needs_gcc
DEV = 0x20000
TEXT = b"hello through the ring\n"


def u32(vm, gpa):
    return int.from_bytes(vm.read(gpa, 4), "little")


# ====================================================================== the framework, bare Vm
class TestRingConsoleOnABareVm:
    """Drive the device with Vm.write as a guest driver would."""

    def test_protocol(self, vm):
        bus = DeviceBus(vm)
        dev = bus.attach(RingConsole(), DEV)
        assert vm.get_subpage_access(DEV >> 12, 1)[0] == FULL_ACCESS_MAP & ~1  # only sub-page 0
        assert u32(vm, DEV) == RingConsole.MAGIC and u32(vm, DEV + 4) == 1  # RAM copies set on attach
        vm.write(DEV + 0x08, struct.pack("<I", 1))  # CONTROL = enable: kept (EMULATE), STATUS ready
        assert u32(vm, DEV + 0x08) == 1 and u32(vm, DEV + 0x0C) == RingConsole.READY
        assert not vm.write(DEV + 0x0C, b"\0\0\0\0").committed  # STATUS is read-only
        assert u32(vm, DEV + 0x0C) == RingConsole.READY
        before = vm.stats()["violations"]
        # the ring: buffer, descriptor, avail index — RAM, no violation
        buf = DEV + 0x200
        for i, b in enumerate(TEXT):
            vm.write(buf + i, bytes([b]))
        vm.write(DEV + 0x100, struct.pack("<QII", buf, len(TEXT), 0))
        vm.write(DEV + 0x80, struct.pack("<I", 1))
        assert vm.stats()["violations"] == before
        # the doorbell: consumed, not stored; completion posted
        r = vm.write(DEV + 0x10, struct.pack("<I", 1))
        assert not r.committed and r.decision is Decision.SKIP
        assert u32(vm, DEV + 0x10) == 0  # write-only register reads 0
        assert bytes(dev.output) == TEXT
        assert u32(vm, DEV + 0x14) == 1 and u32(vm, DEV + 0x84) == 1  # COMPLETED, used_idx
        h = 2166136261
        for b in TEXT:
            h = ((h ^ b) * 16777619) & 0xFFFFFFFF
        assert u32(vm, DEV + 0x18) == h and u32(vm, DEV + 0x1C) == len(TEXT)
        assert dev.writes == {"control": 1, "status": 1, "doorbell": 1}
        assert bus.exits_by_subpage(dev) == {0: 3}
        assert bus.page_writes(dev) == len(TEXT) + 2 + 3

    def test_doorbell_errors_set_status_error(self, vm):
        dev = DeviceBus(vm).attach(RingConsole(), DEV)
        vm.write(DEV + 0x10, struct.pack("<I", 1))  # not enabled
        assert u32(vm, DEV + 0x0C) & RingConsole.ERROR and "disabled" in dev.errors[0]
        vm.write(DEV + 0x08, struct.pack("<I", 1))
        vm.write(DEV + 0x100, struct.pack("<QII", 0x7FFFFFFF000, 16, 0))  # buffer outside RAM
        vm.write(DEV + 0x10, struct.pack("<I", 1))
        assert "outside guest RAM" in dev.errors[-1]
        vm.write(DEV + 0x10, struct.pack("<I", 100))  # more than the ring holds
        assert "ring holds 16" in dev.errors[-1]

    def test_misshapen_register_writes_are_discarded(self, vm):
        dev = DeviceBus(vm).attach(RingConsole(), DEV)
        assert not vm.write(DEV + 0x08, b"\1\0").committed  # 2 bytes of a 4-byte register
        assert not vm.write(DEV + 0x0C, b"\0" * 8).committed  # spans STATUS and DOORBELL
        assert dev.bad_writes == 2 and not dev.writes

    def test_page_granular_traps_the_ring_too(self, vm):
        bus = DeviceBus(vm, page_granular=True)
        dev = bus.attach(RingConsole(), DEV)
        assert vm.get_subpage_access(DEV >> 12, 1)[0] == 0
        assert vm.write(DEV + 0x200, b"x").committed  # ring write: exits, committed as RAM
        assert bus.exits_by_subpage(dev) == {4: 1} and not dev.writes

    def test_ram_beside_a_register_in_its_subpage_exits_but_is_ram(self, vm):
        """The 128-byte limit: a register block smaller than a sub-page drags its
        neighbours into the trap; the bus commits them as RAM, without the device."""
        calls = []

        class Tiny(Device):
            name = "tiny"
            registers = (Register("cmd", 0x00, 8, "wo"),)

            def on_cmd(self, value):
                calls.append(value)

        bus = DeviceBus(vm)
        bus.attach(Tiny(), DEV)
        r = vm.write(DEV + 0x40, b"scratch!")  # same sub-page as cmd, not a register
        assert r.committed and r.decision is Decision.EMULATE and calls == []
        assert vm.read(DEV + 0x40, 8) == b"scratch!" and bus.wm.transparent == 1
        assert not vm.write(DEV, struct.pack("<Q", 42)).committed and calls == [42]

    def test_detach_restores_the_page(self, vm):
        bus = DeviceBus(vm)
        dev = bus.attach(RingConsole(), DEV)
        bus.detach(dev)
        assert vm.get_subpage_access(DEV >> 12, 1)[0] == FULL_ACCESS_MAP
        assert vm.write(DEV + 0x10, b"\1\0\0\0").committed and dev.doorbells == 0
        bus.attach(dev, DEV)  # and it can come back


class TestBadInput:
    def test_overlapping_registers(self):
        with pytest.raises(DeviceError, match=r"registers 'a' \[0x0, 0x8\) and 'b' \[0x4, 0x8\) overlap"):
            Device("bad", [Register("a", 0, 8), Register("b", 4, 4)])

    @pytest.mark.parametrize(("reg", "msg"), [
        (Register("w", 0, 3), "width 3"), (Register("o", 4094, 4), "outside its 4-KiB page"),
        (Register("n", -4, 4), "outside its 4-KiB page"), (Register("x", 0, 4, "xx"), "access 'xx'"),
    ])
    def test_bad_register(self, reg, msg):
        with pytest.raises(DeviceError, match=msg):
            Device("bad", [reg])

    def test_duplicate_register_names(self):
        with pytest.raises(DeviceError, match="two registers named 'a'"):
            Device("bad", [Register("a", 0), Register("a", 8)])

    def test_two_devices_on_one_page(self, vm):
        bus = DeviceBus(vm)
        bus.attach(RingConsole("first"), DEV)
        with pytest.raises(DeviceError, match="already holds device 'first'"):
            bus.attach(RingConsole("second"), DEV)

    def test_outside_ram(self, vm):
        with pytest.raises(DeviceError, match=r"at 0x1000000: outside guest RAM \(\[0x0, 0x400000\)\)"):
            DeviceBus(vm).attach(RingConsole(), 16 << 20)

    def test_register_beyond_ram_end(self):
        v = Vm()
        v.add_memslot(0, 0, 2 << 20)
        v.add_memslot(1, 4 << 20, 2 << 20)
        v.enable_spp()
        with pytest.raises(DeviceError, match="outside guest RAM"):
            DeviceBus(v).attach(RingConsole(), 3 << 20)  # the hole between the slots

    def test_unaligned_page(self, vm):
        with pytest.raises(DeviceError, match="not 4-KiB aligned"):
            DeviceBus(vm).attach(RingConsole(), DEV + 0x80)

    def test_attached_twice(self, vm):
        bus = DeviceBus(vm)
        dev = bus.attach(RingConsole(), DEV)
        with pytest.raises(DeviceError, match="already attached"):
            bus.attach(dev, DEV + 0x1000)

    def test_nothing_half_attached_after_an_error(self, vm):
        bus = DeviceBus(vm)
        with pytest.raises(DeviceError):
            bus.attach(RingConsole(), 16 << 20)
        assert bus.wm.pushes == 0 and not bus.devices

    def test_errors_are_value_errors(self):
        assert issubclass(DeviceError, ValueError)

    @pytest.mark.parametrize(("regs", "msg"), [
        ([Register("a", 0, 4), Register("b", 8.0, 4)], r"register 'b' offset 8\.0: must be an integer"),
        ([Register("a", 0, 4), Register("b", 8, 4.0)], r"register 'b' width 4\.0: must be an integer"),
        ([Register("a", True, 1)], "register 'a' offset True: must be an integer"),
        ([Register("a", 0, True)], "register 'a' width True: must be an integer"),
        ([Register("a", "0", 4)], "register 'a' offset '0': must be an integer"),
        ([Register("a", None, 4)], "register 'a' offset None: must be an integer"),
        ([Register("a", 0, 4), Register("b", 8, 4, "rw", "x")], "register 'b' reset 'x': must be an integer"),
        ([Register("a", 0, 4), Register("b", 8, 4, "rw", 1.5)], r"register 'b' reset 1\.5: must be an integer"),
        ([Register("a", 0, 4, "rw", None)], "register 'a' reset None: must be an integer"),
        ([Register("a", 0, 4, "rw", 1 << 32)], "register 'a' reset 0x100000000 does not fit its 4 byte"),
        ([Register("a", 0, 4, ["rw"])], r"access \['rw'\]"),
        ([Register(5, 0, 4)], "register name 5: must be a non-empty string"),
        ([("a", 0, 4)], r"\('a', 0, 4\) is not a Register"),
        ([Register("a", 0, 4), "x"], "'x' is not a Register"),
        ("abc", "registers must be a sequence of Register, got 'abc'"),
        (5, "registers must be a sequence of Register, got 5"),
    ])
    def test_bad_register_types(self, regs, msg):
        with pytest.raises(DeviceError, match=msg):
            Device("d", regs)

    def test_negative_reset_is_all_ones(self, vm):
        dev = DeviceBus(vm).attach(Device("d", [Register("a", 0, 4, "rw", -1)]), DEV)
        assert dev.get_register("a") == 0xFFFFFFFF

    @staticmethod
    def _state(vm, bus):
        return (vm.get_subpage_access(DEV >> 12, 1)[0], vm.read(DEV, 4096), bus.wm.stats(), dict(bus.devices),
                bus.wm.pushes, vm.stats()["violations"])

    def test_registers_replaced_after_construction_are_checked_on_attach(self, vm):
        bus = DeviceBus(vm)
        vm.load(DEV, b"\xAA" * 4096)
        before = self._state(vm, bus)
        dev = Device("d", [Register("a", 0, 4)])
        dev.registers = (Register("a", 0, 4), Register("b", 8, 4, "rw", 1.5))
        with pytest.raises(DeviceError, match=r"register 'b' reset 1\.5"):
            bus.attach(dev, DEV)
        assert self._state(vm, bus) == before and dev.bus is None and dev.gpa is None

    def test_failing_reset_leaves_nothing_behind(self, vm):
        class Bad(Device):
            registers = (Register("a", 0, 4, "rw", 7), Register("b", 0x100, 4, "rw", 9))

            def reset(self):
                self.set_register("a", 7)  # the page is written, then the device fails
                raise RuntimeError("device broke")

        bus = DeviceBus(vm)
        vm.load(DEV, b"\x55" * 4096)
        before = self._state(vm, bus)
        dev = Bad()
        with pytest.raises(RuntimeError, match="device broke"):
            bus.attach(dev, DEV)
        assert self._state(vm, bus) == before and dev.bus is None
        assert vm.write(DEV, b"\1\0\0\0").committed and vm.stats()["violations"] == 0  # no watch left
        bus.attach(RingConsole(), DEV)  # the page is free

    def test_failing_watch_undoes_the_watches_made(self, vm, monkeypatch):
        from sppkit.usecases.monitor import WatchError

        bus = DeviceBus(vm)
        before = self._state(vm, bus)
        real = bus.wm.watch
        calls = []

        def watch(*a, **kw):
            calls.append(a)
            if len(calls) == 2:
                raise WatchError("no more watches")
            return real(*a, **kw)

        monkeypatch.setattr(bus.wm, "watch", watch)
        dev = Device("d", [Register("a", 0, 4), Register("b", 0x100, 4)])
        with pytest.raises(DeviceError, match="device 'd': no more watches"):
            bus.attach(dev, DEV)
        st = bus.wm.stats()
        assert st["watches"] == 0 and st["pages"] == 0 and not bus.devices and dev.bus is None
        assert vm.get_subpage_access(DEV >> 12, 1)[0] == before[0] and vm.read(DEV, 4096) == before[1]
        monkeypatch.undo()
        assert bus.attach(dev, DEV) is dev and bus.wm.stats()["watches"] == 2

    def test_a_detached_device_is_named_not_attached(self, vm):
        bus = DeviceBus(vm)
        dev = bus.attach(RingConsole(), DEV)
        bus.detach(dev)
        for call in (lambda: bus.exits_by_subpage(dev), lambda: bus.page_writes(dev),
                     lambda: dev.get_register("doorbell"), lambda: dev.read(0, 8)):
            with pytest.raises(DeviceError, match="'ringcon' is not attached"):
                call()


# ====================================================================== end to end
@pytest.fixture(scope="module")
def driver():
    if not GCC_OK:
        pytest.skip(GCC_WHY)
    return load_elf(build_guest("devdriver"))


def test_driver_layout(driver):
    s = driver.symbols
    assert s["devpage"].addr % 4096 == 0 and s["devpage"].size == 4096
    assert s["dev_registers"].size == 128 and s["dev_buffers"].addr == s["devpage"].addr + 0x200
    assert resolve_page(driver, "devpage") == s["devpage"].addr == resolve_page(driver, hex(s["devpage"].addr))
    with pytest.raises(DeviceError, match="close matches: devpage"):
        resolve_page(driver, "devpag")


@needs_gcc
@pytest.mark.parametrize("engine", ENGINES)
class TestDevdriverEndToEnd:
    def test_spp_ring_writes_never_exit_doorbells_always_do(self, engine):
        rep = run_device(engine=engine)
        res = rep.result
        assert (res.stop_reason, res.exit_code) == ("exit", 0), res.console
        assert "checksum: driver" in res.console and "- match" in res.console
        assert "status is read-only: still READY" in res.console
        # the guest's data arrived intact
        assert rep.intact and rep.output == rep.expected and len(rep.output) == rep.guest_counts["bytes"] > 300
        assert not rep.device_errors
        # exits: only on the register sub-page; one per register write, one per doorbell
        g = rep.guest_counts
        assert rep.exits_by_subpage == {0: g["reg_writes"]}
        assert rep.ring_exits == 0 and rep.ring_writes == g["ring_writes"] > 400
        assert rep.doorbells_guest == rep.doorbells_device == rep.doorbell_exits == 3
        assert rep.register_exits == g["reg_writes"] == 7
        # page-granular trapping: every write to the page would have exited
        assert rep.page_writes == g["ring_writes"] + g["reg_writes"]
        regs = {r["name"]: r for r in rep.registers}
        assert regs["doorbell"]["writes"] == 3 and regs["doorbell"]["value"] == 0
        assert regs["completed"]["value"] == g["descriptors"] == 7
        assert regs["magic"]["writes"] == 0 and regs["status"]["writes"] == 1

    def test_page_granular_every_ring_write_exits(self, engine):
        rep = run_device(engine=engine, page_granular=True)
        assert rep.exit_code == 0 and rep.intact
        assert rep.ring_exits == rep.ring_writes == rep.guest_counts["ring_writes"]
        assert rep.register_exits + rep.ring_exits == rep.page_writes


@needs_gcc
class TestCli:
    def test_json(self):
        r = CliRunner().invoke(device_command, ["--engine", "unicorn", "--json"])
        assert r.exit_code == 0, r.output
        d = json.loads(r.output)
        assert d["intact"] and d["exits"]["ring"] == 0 and d["exits"]["page_granular"] > 400
        assert d["exits"]["this_run"] == d["exits"]["register"] == 7
        assert d["doorbells"] == {"guest": 3, "device": 3, "exits": 3}
        assert d["output"].startswith("Sub-page write protection")

    def test_tables(self):
        r = CliRunner().invoke(device_command, ["devdriver", "--engine", "unicorn", "--page-granular"])
        assert r.exit_code == 0, r.output
        assert "the text arrived intact" in r.output and "Page-granular trapping would have" in r.output
        assert "whole page trapped" in r.output

    def test_unknown_page_symbol(self):
        r = CliRunner().invoke(device_command, ["--engine", "unicorn", "--page", "devpg"])
        assert isinstance(r.exception, DeviceError) and "close matches: devpage" in str(r.exception)

    def test_page_outside_ram(self):
        r = CliRunner().invoke(device_command, ["--engine", "unicorn", "--page", "0x40000000"])
        assert isinstance(r.exception, DeviceError) and "outside guest RAM" in str(r.exception)

    def test_guest_that_never_drives_the_device(self):
        """mixed has no driver for the device put in its keys_page: no output, nothing to compare."""
        r = CliRunner().invoke(device_command, ["mixed", "--engine", "unicorn", "--page", "keys_page", "--json"])
        assert r.exit_code == 0, r.output
        d = json.loads(r.output)
        assert d["output"] == "" and d["intact"] is None
