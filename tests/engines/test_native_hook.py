"""The Unicorn engine's C write-protect hook and its fallback: built with the host C
compiler, reported when it cannot be, and never a different answer from the Python
hook (the differential tests compare whole runs; these check the edges)."""

from __future__ import annotations

from pathlib import Path

import pytest
from iced_x86 import Code, MemoryOperand, Register
from iced_x86 import Instruction as Ins

from sppkit import _native
from sppkit.engines.unicorn import UnicornEngine, native_status
from sppkit.guests import flat_image
from sppkit.policy import Policy

from test_differential import exit_ins, mov_imm

NATIVE_OK, NATIVE_WHY = native_status()
needs_native = pytest.mark.skipif(not NATIVE_OK, reason=f"the native hook cannot be built here: {NATIVE_WHY}")

PAGE = 0x1000
DATA = 0x200000  # a data page of the flat guests
RAM = 4 << 20


def _loop_image(n: int, addr: int):
    import iced_x86

    c = [mov_imm(Register.RCX, n), mov_imm(Register.RDX, addr)]
    top = Ins.create_mem_reg(Code.MOV_RM64_R64, MemoryOperand(Register.RDX), Register.RCX)
    top.ip = 100
    c.append(top)
    c.append(Ins.create_reg_i32(Code.SUB_RM64_IMM8, Register.RCX, 1))
    c.append(Ins.create_branch(Code.JNE_REL32_64, 100))
    c += exit_ins(0x5A)
    for i, x in enumerate(c):
        if x.ip == 0:
            x.ip = 1000 + i
    enc = iced_x86.BlockEncoder(64)
    enc.add_many(c)
    return flat_image(enc.encode(0x100000), 0x100000)


def test_a_source_that_does_not_compile_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("SPPKIT_CACHE", str(tmp_path))
    bad = tmp_path / "broken_helper.c"
    bad.write_text("int f(void) { return }\n")
    if _native.compiler() is None:
        pytest.skip("no C compiler here: nothing to fail")
    lib, why = _native._load(bad)
    assert lib is None and "failed on broken_helper.c" in why


def test_sppkit_native_0_disables(monkeypatch):
    monkeypatch.setenv("SPPKIT_NATIVE", "0")
    lib, why = _native._load(Path(__file__))
    assert lib is None and why == "disabled by SPPKIT_NATIVE=0"


def test_native_false_keeps_the_python_hook():
    eng = UnicornEngine(_loop_image(10, DATA + 0x800), policy=Policy.from_ranges([(DATA, 0x80)], "skip"),
                        ram_size=RAM, native=False)
    assert eng.native is None and eng.native_status.startswith("off")
    r = eng.run()
    assert r.exit_code == 0x5A and r.stats["writes"] == 10 and r.exits["WriteProt"] == 10


@needs_native
def test_allowed_stores_go_through_the_lane_and_are_counted():
    eng = UnicornEngine(_loop_image(1000, DATA + 0x800), policy=Policy.from_ranges([(DATA, 0x80)], "skip"),
                        ram_size=RAM)
    assert eng.native is not None and eng.native_status.startswith("on")
    r = eng.run()
    assert r.exit_code == 0x5A
    assert r.stats["writes"] == 1000 and r.stats["page_granular"] == 1000
    assert r.exits["WriteProt"] == 1000
    assert eng.native.state.fast >= 990  # all but the first few went through the lane
    assert eng.vm.read(DATA + 0x800, 8) == (1).to_bytes(8, "little")  # the last store (rcx = 1)


@needs_native
def test_denied_stores_never_take_the_lane():
    eng = UnicornEngine(_loop_image(50, DATA + 0x10), policy=Policy.from_ranges([(DATA, 0x80)], "skip"),
                        ram_size=RAM)
    r = eng.run()
    assert r.exit_code == 0x5A and len(r.violations) == 50 and eng.native.state.fast == 0
    assert eng.vm.read(DATA + 0x10, 8) == bytes(8)


@needs_native
def test_a_write_observer_sees_every_store():
    eng = UnicornEngine(_loop_image(200, DATA + 0x800), policy=Policy.from_ranges([(DATA, 0x80)], "skip"),
                        ram_size=RAM)
    seen = []
    eng.vm.on_write(lambda gpa, size, rip: seen.append((gpa, size)))
    r = eng.run()
    assert r.exit_code == 0x5A and seen == [(DATA + 0x800, 8)] * 200 and eng.native.state.fast == 0


@needs_native
def test_a_policy_change_mid_run_is_seen_by_the_lane():
    """The run pauses after 100 stores to an allowed sub-page (by instruction count);
    the host then protects that sub-page: the INVEPT empties the lane's copy, so the
    remaining 200 stores are denied."""
    eng = UnicornEngine(_loop_image(300, DATA + 0x800), policy=Policy.from_ranges([(DATA, 0x80)], "skip"),
                        ram_size=RAM)
    eng.max_instructions = 2 + 100 * 3  # two movs, then 100 x (store, sub, jne)
    r = eng.run()
    assert r.stop_reason == "halt" and eng.vm.stats()["writes"] == 100 and eng.native.state.fast >= 90
    eng.vm.set_subpage_access(DATA >> 12, [0xFFFEFFFE])  # sub-pages 0 and 16 protected
    eng.max_instructions = 0
    r = eng.run()
    assert r.exit_code == 0x5A and len(r.violations) == 200 and eng.vm.stats()["writes"] == 300
    assert eng.vm.read(DATA + 0x800, 8) == (201).to_bytes(8, "little")  # store 100 (rcx = 201) was the last
