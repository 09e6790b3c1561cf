"""The Unicorn engine's native write-protect hook (a software TLB in C) decides exactly
as the Python hook alone: same memory, console, exit, violations, statistics and exit
counts, for every bundled guest under every policy the differential tests use and for
generated guests; it forgets what it knows when the Vm's translation epoch moves; and
its absence is reported, never silent."""

from __future__ import annotations

import iced_x86
import pytest
from hypothesis import HealthCheck, given, settings
from iced_x86 import Code, MemoryOperand, Register
from iced_x86 import Instruction as Ins
from test_differential import (
    DATA,
    NPAGES,
    RAM,
    TIMEOUT,
    _data_regions,
    _policy,
    _scenarios,
    flat,
    generated,
    guest,
    needs_gcc,
)

from sppkit.engines import native
from sppkit.engines.base import EngineError
from sppkit.engines.unicorn import UnicornEngine
from sppkit.guests import flat_image
from sppkit.policy import Policy
from sppkit.vmm import Decision

NATIVE_OK, NATIVE_WHY = native.native_status()
needs_native = pytest.mark.skipif(not NATIVE_OK, reason=f"the native hook is unavailable: {NATIVE_WHY}")


def outcome(image, policy, regions, use_native: bool, setup=None):
    eng = UnicornEngine(image, policy=policy, ram_size=RAM, timeout=TIMEOUT, native=use_native)
    try:
        assert (eng._native is not None) == use_native
        if setup is not None:
            setup(eng)
        r = eng.run()
        fast = eng._native.state.fast if eng._native is not None else 0
        return {
            "stop": (r.stop_reason, r.exit_code, r.console, r.rip_at, r.rip_after),
            "violations": [tuple(v) if isinstance(v, tuple) else vars(v) for v in r.violations],
            "memory": {g: eng.vm.read(g, n) for g, n in regions},
            "stats": r.stats,
            "exits": dict(r.exits),
        }, fast
    finally:
        eng.close()


def assert_same(a: dict, b: dict) -> None:
    for key in ("stop", "violations", "memory", "stats", "exits"):
        assert a[key] == b[key], f"{key} differs between the native hook and the Python hook"


@needs_gcc
@needs_native
@pytest.mark.parametrize(("program", "label", "make_policy"), list(_scenarios()))
def test_bundled_program_native_equals_python(program, label, make_policy):
    image = guest(program)
    policy = make_policy(image) if make_policy else None
    regions = _data_regions(image)
    with_native, fast = outcome(image, policy, regions, True)
    without, _ = outcome(image, policy, regions, False)
    assert_same(with_native, without)
    if label == "subpage31-emulate" and with_native["stats"]["page_granular"] > 100:
        # sub-pages 0..30 of every data page are writable: most stores are native
        assert fast > with_native["stats"]["page_granular"] // 2


@needs_native
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=generated())
def test_generated_guest_native_equals_python(case):
    decision, maps, prog = case
    image, _ = flat(prog.ins)
    policy = _policy(maps, decision)
    regions = [(DATA, NPAGES * 4096)]
    with_native, _ = outcome(image, policy, regions, True)
    without, _ = outcome(image, policy, regions, False)
    assert_same(with_native, without)


# ---------------------------------------------------------------- epoch
CODE = 0x10000
PAGE_GPA = 0x40000
PORT = 0x80


def _loop_then_port_then_store(n: int) -> bytes:
    """``n`` 8-byte stores to PAGE_GPA+0x100 (sub-page 2), an OUT to PORT, one more store
    there, exit."""
    ins = [Ins.create_reg_u64(Code.MOV_R64_IMM64, Register.RCX, n),
           Ins.create_reg_u64(Code.MOV_R64_IMM64, Register.RDX, PAGE_GPA + 0x100)]
    top = Ins.create_mem_reg(Code.MOV_RM64_R64, MemoryOperand(Register.RDX), Register.RCX)
    ins += [top, Ins.create_reg_i32(Code.SUB_RM64_IMM8, Register.RCX, 1), Ins.create_branch(Code.JNE_REL32_64, 3),
            Ins.create_reg_u64(Code.MOV_R64_IMM64, Register.RAX, 7),
            Ins.create_u32_reg(Code.OUT_IMM8_EAX, PORT, Register.EAX),
            Ins.create_mem_reg(Code.MOV_RM64_R64, MemoryOperand(Register.RDX), Register.RAX),
            Ins.create_reg_u64(Code.MOV_R64_IMM64, Register.RAX, 0),
            Ins.create_u32_reg(Code.OUT_IMM8_EAX, 0xF4, Register.EAX)]
    for i, x in enumerate(ins):
        x.ip = i + 1
    enc = iced_x86.BlockEncoder(64)
    enc.add_many(ins)
    return enc.encode(CODE)


@needs_native
@pytest.mark.parametrize("use_native", [True, False])
def test_access_change_mid_run_is_seen(use_native):
    """A port handler protects the sub-page the guest has been writing natively: the
    next store to it is a violation (the native hook forgot the page), and statistics
    count every store once."""
    n = 500
    image = flat_image(_loop_then_port_then_store(n), CODE)
    policy = Policy.from_ranges([(PAGE_GPA, 0x80)], "skip")  # sub-page 0 protected, 2 writable

    def protect_subpage_2(engine, value):
        engine.vm.set_subpage_access(PAGE_GPA >> 12, [0xFFFFFFFF & ~0b101])

    eng = UnicornEngine(image, policy=policy, ram_size=RAM, timeout=TIMEOUT, native=use_native)
    try:
        eng.add_port_handler(PORT, protect_subpage_2)
        r = eng.run()
        assert (r.stop_reason, r.exit_code) == ("exit", 0)
        assert [(v.gpa, v.size, v.decision) for v in r.violations] == [(PAGE_GPA + 0x100, 8, "skip")]
        assert eng.vm.read(PAGE_GPA + 0x100, 8) == (1).to_bytes(8, "little")  # the last allowed store
        assert r.stats["writes"] == n + 1 and r.stats["page_granular"] == n + 1 and r.stats["violations"] == 1
        if use_native:
            assert eng._native.state.fast >= n - 2  # all but the first few went native
    finally:
        eng.close()


@needs_native
def test_stats_are_current_inside_a_violation_handler():
    """Writes committed natively are in vm.stats() by the time a handler runs."""
    image = flat_image(_loop_then_port_then_store(300), CODE)
    seen = []
    eng = UnicornEngine(image, policy=Policy.from_ranges([(PAGE_GPA, 0x80)], "skip"), ram_size=RAM,
                        timeout=TIMEOUT, native=True)
    try:
        eng.add_port_handler(PORT, lambda e, v: e.vm.set_subpage_access(PAGE_GPA >> 12, [0xFFFFFFFA]))

        def handler(ev):
            seen.append(eng.vm.stats()["writes"])
            return Decision.SKIP

        eng.vm.on_violation(handler)
        assert eng.run().stop_reason == "exit"
        assert seen == [301]
    finally:
        eng.close()


# ---------------------------------------------------------------- availability
def test_unavailable_native_hook_is_reported(monkeypatch):
    monkeypatch.setattr(native, "_status", (False, "not built: no C compiler found ($CC, cc, gcc or clang)"))
    monkeypatch.setattr(native, "_lib", None)
    image = flat_image(_loop_then_port_then_store(3), CODE)
    with pytest.raises(EngineError, match="native write-protect hook is unavailable: not built: no C compiler"):
        UnicornEngine(image, ram_size=RAM, native=True)
    eng = UnicornEngine(image, policy=Policy.from_ranges([(PAGE_GPA, 0x80)], "skip"), ram_size=RAM)
    try:
        assert eng._native is None  # auto: the Python hook alone, same results
        eng.add_port_handler(PORT, lambda e, v: None)
        r = eng.run()
        assert r.stop_reason == "exit" and r.stats["writes"] == 4
    finally:
        eng.close()


def test_native_can_be_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("SPPKIT_NATIVE", "0")
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setattr(native, "_lib", None)
    assert native.native_status() == (False, "disabled by SPPKIT_NATIVE=0")


def test_build_failure_names_the_compiler_error(monkeypatch, tmp_path):
    bad = tmp_path / "writeprot.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE", bad)
    monkeypatch.setenv("SPPKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setattr(native, "_lib", None)
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine: the build-failure message cannot be produced")
    ok, why = native.native_status()
    assert not ok and "failed on writeprot.c" in why and "error" in why


def test_doctor_says_why_the_native_hook_is_missing(monkeypatch):
    from click.testing import CliRunner

    from sppkit.cli import main as cli_main

    monkeypatch.setattr(native, "_status", (False, "not built: no C compiler found ($CC, cc, gcc or clang)"))
    monkeypatch.setattr(native, "_lib", None)
    r = CliRunner().invoke(cli_main, ["doctor"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    assert "native write hook" in r.stdout and "no C compiler found" in r.stdout
    assert "the Python hook decides alone" in r.stdout


@needs_gcc
def test_run_says_whether_the_native_hook_is_on(monkeypatch):
    from click.testing import CliRunner

    from sppkit.cli import main as cli_main

    monkeypatch.setenv("SPPKIT_NATIVE", "0")
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setattr(native, "_lib", None)
    r = CliRunner().invoke(cli_main, ["run", "selftest", "--engine", "unicorn"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "engine: unicorn; native write hook off (disabled by SPPKIT_NATIVE=0)" in r.output
