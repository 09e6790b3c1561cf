"""The Unicorn engine's two write-protect hook trampolines agree, and fail loudly.

Protected stores reach ``vm.write`` through a small C trampoline (built on first use
with the host C compiler against this Python's headers) or, where it cannot be built,
through a ctypes callback.  Neither decides anything; both call the engine's
``_on_store``, which calls ``vm.write``.  Checked here:

* every bundled guest program under a policy that sends every store to a data page
  or the top stack page through the hook (sub-page 31 of each, EMULATE) and under the policies of
  the differential tests gives the same final RAM (all of it), console, exit code,
  violation records, statistics and write-protect call count with either trampoline;
* an exception escaping the Python callback through the C trampoline is re-raised
  from ``run()``, not swallowed, and the store it was deciding never lands;
* ``native_hook=True`` where the trampoline cannot be built is an error naming why;
  ``native_hook=None`` then falls back to the ctypes callback; the builder reports a
  missing compiler, missing headers and a failing compile by name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from iced_x86 import Code, MemoryOperand, Register
from iced_x86 import Instruction as Ins

import sppkit._native as native
import sppkit.engines.unicorn as unicorn_engine
from sppkit.engines.base import EngineError
from sppkit.engines.unicorn import UnicornEngine, native_status
from sppkit.guests import GuestImage, Segment, build_guest, list_programs, load_elf
from sppkit.policy import Policy, load_policy
from engine_helpers import MIXED_POLICY, PAGE, RAM, SUB, needs_gcc


_native_ok, _native_why = native_status()
needs_native = pytest.mark.skipif(not _native_ok, reason=f"the C trampoline cannot be built here: {_native_why}")


def _outcome(image: GuestImage, policy: Policy | None, native_hook: bool) -> dict:
    eng = UnicornEngine(image, policy=policy, ram_size=RAM, timeout=60.0, native_hook=native_hook)
    assert eng.native_hook is native_hook
    try:
        r = eng.run()
        ram = hashlib.sha256(eng.vm.read(0, RAM)).hexdigest()
    finally:
        eng.close()
    return {
        "stop_reason": r.stop_reason, "exit_code": r.exit_code, "console": r.console, "rip_at": r.rip_at,
        "violations": [(v.gpa, v.size, v.decision, v.rip_at) for v in r.violations],
        "stats": r.stats, "write_prot": r.exits.get("WriteProt", 0), "ram": ram,
    }


def _data_pages(image: GuestImage) -> list[int]:
    return sorted({p for s in image.segments if "w" in s.flags
                   for p in range(s.gpa & ~(PAGE - 1), s.gpa + s.memsz, PAGE)})


def _policies(name: str, image: GuestImage) -> dict[str, Policy]:
    # the data pages and the top stack page (every program pushes there)
    pages = _data_pages(image) + [RAM - PAGE]
    out = {"subpage31-emulate": Policy.from_ranges([(p + 31 * SUB, SUB) for p in pages], "emulate")}
    if name == "mixed":
        out["mixed.toml"] = load_policy(MIXED_POLICY, image)
    if name == "selftest":
        for d in ("skip", "stop"):
            out[f"protected_page-{d}"] = Policy.from_ranges([(image.symbol("protected_page").addr, PAGE)], d)
    if name == "readback":
        t = image.symbol("target").addr
        out["ranges-skip"] = Policy.from_ranges([(t + 0x100, 0x80), (t + 0x1800, 0x100), (t + 0xF80, 0x100)])
    return out


@needs_native
@needs_gcc
@pytest.mark.parametrize("name", list_programs())
def test_trampolines_agree_on_bundled_programs(name):
    image = load_elf(build_guest(name))
    for label, policy in _policies(name, image).items():
        c = _outcome(image, policy, True)
        py = _outcome(image, policy, False)
        assert c == py, f"{name} under {label}: the trampolines disagree"
        assert c["write_prot"] > 0, f"{name} under {label}: no store went through the hook"


# ---------------------------------------------------------------- exceptions through C
CODE, DATA = 0x400000, 0x600000


def _store_guest() -> GuestImage:
    ins = [
        Ins.create_reg_u64(Code.MOV_R64_IMM64, Register.RAX, 0x1122334455667788),
        Ins.create_mem_reg(Code.MOV_RM64_R64, MemoryOperand(displ=DATA + 0x800, displ_size=8), Register.RAX),
        Ins.create_reg_u32(Code.MOV_R32_IMM32, Register.EAX, 0),
        Ins.create_u32_reg(Code.OUT_IMM8_EAX, 0xF4, Register.EAX),
    ]
    from iced_x86 import BlockEncoder

    enc = BlockEncoder(64)
    enc.add_many(ins)
    code = enc.encode(CODE)
    return GuestImage(segments=[Segment(CODE, code, len(code), "r-x"), Segment(DATA, b"\xAA" * PAGE, PAGE, "rw-")],
                      entry=CODE)


class Boom(Exception):
    pass


@needs_native
def test_exception_escaping_the_callback_is_reraised_through_c():
    eng = UnicornEngine(_store_guest(), policy=Policy.from_ranges([(DATA, SUB)]), ram_size=RAM, native_hook=True)

    def raiser(address, data, rip):  # not the engine's _on_store: this one lets the exception out
        raise Boom(f"store to {address:#x} of {data!r}")

    eng._on_store_ref = raiser  # kept alive
    eng._native[1].callback = id(raiser)
    with pytest.raises(Boom, match=f"store to {DATA + 0x800:#x}"):
        eng.run()
    assert eng.vm.read(DATA + 0x800, 8) == b"\xAA" * 8  # the undecided store never landed


@needs_native
def test_allowed_store_lands_and_is_counted_once_through_c():
    """The control case for the test above: the engine's own callback decides."""
    eng = UnicornEngine(_store_guest(), policy=Policy.from_ranges([(DATA, SUB)]), ram_size=RAM, native_hook=True)
    r = eng.run()
    assert r.stop_reason == "exit" and r.exit_code == 0
    assert eng.vm.read(DATA + 0x800, 8) == (0x1122334455667788).to_bytes(8, "little")
    assert r.exits["WriteProt"] == 1 and r.stats["writes"] == 1


# ---------------------------------------------------------------- unavailable / build errors
@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """An empty build cache and no library loaded yet."""
    monkeypatch.setenv("SPPKIT_CACHE", str(tmp_path))
    monkeypatch.delenv("SPPKIT_NATIVE", raising=False)
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(unicorn_engine, "_lib_cache", [])
    return tmp_path


def test_no_compiler_is_reported_and_the_engine_falls_back(fresh_native, monkeypatch):
    monkeypatch.setattr(native, "compiler", lambda: None)
    ok, why = native_status()
    assert not ok and "no C compiler found" in why
    with pytest.raises(EngineError, match="native write-protect hook unavailable: .*no C compiler"):
        UnicornEngine(_store_guest(), ram_size=RAM, native_hook=True)
    eng = UnicornEngine(_store_guest(), policy=Policy.from_ranges([(DATA, SUB)]), ram_size=RAM)
    assert not eng.native_hook
    r = eng.run()
    assert r.exit_code == 0 and r.exits["WriteProt"] == 1
    assert eng.vm.read(DATA + 0x800, 8) == (0x1122334455667788).to_bytes(8, "little")


def test_missing_python_headers_are_reported(fresh_native, monkeypatch):
    if native.compiler() is None:
        pytest.skip("no C compiler here: the headers are never looked for")
    monkeypatch.setattr(native, "python_include", lambda: None)
    ok, why = native_status()
    assert not ok and "Python.h not found" in why


def test_failing_compile_is_reported_with_the_compiler_output(fresh_native, monkeypatch, tmp_path):
    if native.compiler() is None:
        pytest.skip("no C compiler here")
    bad = tmp_path / "broken_helper.c"
    bad.write_text("this is not C;\n")
    lib = native.load(bad)
    ok, why = native.status(bad)
    assert lib is None and not ok
    assert "failed on broken_helper.c" in why
    assert not list(Path(tmp_path).glob("native/broken_helper-*.so"))  # nothing half-written is kept


def test_disabled_by_environment(fresh_native, monkeypatch):
    monkeypatch.setenv("SPPKIT_NATIVE", "0")
    assert native_status() == (False, "disabled by SPPKIT_NATIVE=0")
    assert not UnicornEngine(_store_guest(), ram_size=RAM).native_hook


@needs_native
def test_built_library_is_cached_and_reused(fresh_native):
    assert native_status()[0]
    built = list(Path(fresh_native).glob("native/uc_write_hook-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    native._loaded.clear()
    assert native.load(unicorn_engine._HOOK_SOURCE) is not None
    assert built[0].stat().st_mtime_ns == mtime  # loaded from the cache, not rebuilt
