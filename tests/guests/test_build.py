"""Guest programs: building (cache, errors), their layout, and running them under Unicorn.

The Unicorn harness here is a test helper only: it maps 64 MiB flat (UC_MODE_64 runs
64-bit code without page tables, i.e. identity-mapped), loads the segments, sets RSP
to the top of RAM and collects the console (port 0xE9) and the exit code (port 0xF4).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sppkit.guests import (
    LOAD_ADDRESS,
    GuestBuildError,
    build_guest,
    list_programs,
    load_elf,
    toolchain_status,
)
from sppkit.guests import build as build_mod

OK, REASON = toolchain_status()
needs_gcc = pytest.mark.skipif(not OK, reason=REASON)

PAGE = 4096
SUBPAGE = 128


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("guest-cache")


@pytest.fixture(scope="module")
def images(cache):
    if not OK:
        pytest.skip(REASON)
    return {name: load_elf(build_guest(name, cache_dir=cache)) for name in list_programs()}


def subpages(addr: int, size: int) -> set[int]:
    """Indices (gpa // 128) of the sub-pages [addr, addr+size) touches."""
    return set(range(addr // SUBPAGE, (addr + size - 1) // SUBPAGE + 1))


# -- Unicorn harness ------------------------------------------------------------

RAM = 64 << 20


class UcRun:
    def __init__(self, console: str, exit_code: int | None, dropped: list[tuple[int, int]]):
        self.console = console
        self.exit_code = exit_code
        self.dropped = dropped


def run_unicorn(image, *, readonly_pages=(), max_insns=50_000_000, stop_on_exit=True) -> UcRun:
    """Run ``image`` at CPL0-equivalent in Unicorn; ``readonly_pages`` are mapped read-only
    and guest writes to them are silently dropped (a WRITE_PROT hook returning True)."""
    unicorn = pytest.importorskip("unicorn")
    from unicorn import x86_const as x86

    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0, RAM)
    for seg in image.segments:
        uc.mem_write(seg.gpa, seg.image())
    for gpa in readonly_pages:
        uc.mem_protect(gpa, PAGE, unicorn.UC_PROT_READ)

    console = bytearray()
    exit_code: list[int] = []
    dropped: list[tuple[int, int]] = []

    def on_out(uc, port, size, value, _):
        if port == 0xE9:
            console.append(value & 0xFF)
        elif port == 0xF4:
            assert size == 4, f"exit port written with {size}-byte out"
            exit_code.append(value)
            if stop_on_exit:
                uc.emu_stop()

    def on_write_prot(uc, access, addr, size, value, _):
        dropped.append((addr, size))
        return True  # drop the write, continue

    uc.hook_add(unicorn.UC_HOOK_INSN, on_out, None, 1, 0, x86.UC_X86_INS_OUT)
    uc.hook_add(unicorn.UC_HOOK_MEM_WRITE_PROT, on_write_prot)
    uc.reg_write(x86.UC_X86_REG_RSP, RAM)
    uc.emu_start(image.entry, 0, count=max_insns)
    return UcRun(console.decode("ascii", "replace"), exit_code[0] if exit_code else None, dropped)


# -- toolchain / programs ---------------------------------------------------------


def test_list_programs_has_the_bundled_three():
    assert {"selftest", "mixed", "readback"} <= set(list_programs())
    assert list_programs() == sorted(list_programs())


def test_runtime_files_exist():
    for f in ("start.S", "sppkit_rt.h", "sppkit_rt.c", "link.ld"):
        assert (build_mod.RUNTIME_DIR / f).is_file(), f


def test_toolchain_status_shape():
    ok, reason = toolchain_status()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason
    if ok:
        assert "gcc" in reason


# -- build: each program ------------------------------------------------------------


@needs_gcc
@pytest.mark.parametrize("name", ["selftest", "mixed", "readback"])
def test_program_builds_to_static_elf_at_4mib(images, name):
    im = images[name]
    assert im.entry == LOAD_ADDRESS == im.symbol("_start").addr
    assert im.symbol("_start").kind == "func" and im.symbol("_start").binding == "global"
    assert im.symbol("main").kind == "func"
    # Every segment is page aligned; code is not writable, data not executable.
    for seg in im.segments:
        assert seg.gpa % PAGE == 0
        assert not (seg.writable and seg.executable), seg
    assert im.segments[0].flags == "r-x"
    assert any(seg.writable for seg in im.segments)
    # The linker-script section symbols bracket page-aligned sections.
    for sect in ("text", "rodata", "data", "bss"):
        assert im.symbol(f"__{sect}_start").addr % PAGE == 0
    assert im.symbol("__image_end").addr % PAGE == 0


@needs_gcc
@pytest.mark.parametrize("name", ["selftest", "mixed", "readback"])
def test_program_uses_general_purpose_registers_only(images, name):
    """KVM cannot emulate SSE/AVX/x87 stores, cmpxchg16b or fxsave on protected pages."""
    iced = pytest.importorskip("iced_x86")
    im = images[name]
    text = next(s for s in im.segments if s.executable)
    fmt = iced.Formatter(iced.FormatterSyntax.INTEL)
    bad = []
    for ins in iced.Decoder(64, text.data, ip=text.gpa):
        s = fmt.format(ins)
        if any(w in s for w in ("xmm", "ymm", "zmm", "st(", "fxsave", "xsave", "cmpxchg16b", "fld", "fst")):
            bad.append(f"{ins.ip:#x}: {s}")
    assert not bad, bad


@needs_gcc
def test_selftest_layout(images):
    im = images["selftest"]
    pp = im.symbol("protected_page")
    assert pp.addr % PAGE == 0 and pp.size == PAGE
    assert (pp.kind, pp.binding) == ("object", "global")
    # Nothing else shares its page.
    others = [s for s in im.all_symbols if s.size and s.name != "protected_page"
              and s.addr < pp.end and pp.addr < s.end]
    assert not others
    assert im.symbol("stuck").size == 4


@needs_gcc
def test_mixed_protected_objects_own_whole_subpages(images):
    im = images["mixed"]
    protected = ["secret", "config", "canary"]
    hot = ["hot", "stats", "ring", "scratch", "tail"]
    for n in protected + hot:
        s = im.symbol(n)
        assert (s.kind, s.binding) == ("object", "global"), s
        assert s.size > 0
    for p in protected:
        sp = subpages(im.symbol(p).addr, im.symbol(p).size)
        assert im.symbol(p).addr % SUBPAGE == 0, p
        for h in hot:
            assert not sp & subpages(im.symbol(h).addr, im.symbol(h).size), (p, h)
    # secret and hot live on the same page (the point of sub-page protection).
    assert im.symbol("secret").addr // PAGE == im.symbol("hot").addr // PAGE
    assert im.symbol("secret").size == 32
    for page in ("keys_page", "config_page", "canary_page"):
        s = im.symbol(page)
        assert s.addr % PAGE == 0 and s.size == PAGE, page
    for p in ("param_iterations", "param_secret_every", "writes_secret"):
        assert im.symbol(p).size == 8


@needs_gcc
def test_readback_layout(images):
    im = images["readback"]
    t = im.symbol("target")
    assert t.addr % PAGE == 0 and t.size == 4 * PAGE
    assert (t.kind, t.binding) == ("object", "global")
    assert im.symbol("probes").binding == "local"  # local symbols are kept too


# -- build: cache -------------------------------------------------------------------


@needs_gcc
def test_second_build_is_cached_and_does_not_run_gcc(tmp_path, monkeypatch):
    first = build_guest("selftest", cache_dir=tmp_path)
    mtime = first.stat().st_mtime_ns

    def no_gcc(*a, **k):
        raise AssertionError(f"compiler invoked on a cache hit: {a}")

    monkeypatch.setattr(subprocess, "run", no_gcc)
    monkeypatch.setattr(subprocess, "Popen", no_gcc)
    second = build_guest("selftest", cache_dir=tmp_path)
    assert second == first and second.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name, first.name + ".sha256"]  # no temp files left


@needs_gcc
def test_cache_key_depends_on_flags_and_source(tmp_path):
    a = build_guest("selftest", cache_dir=tmp_path)
    b = build_guest("selftest", cache_dir=tmp_path, cflags=("-DSPPKIT_TEST_FLAG=1",))
    assert a != b and a.is_file() and b.is_file()
    src = tmp_path / "prog.c"
    src.write_text('#include "sppkit_rt.h"\nint main(void) { return 3; }\n')
    c = build_guest(src, cache_dir=tmp_path)
    src.write_text('#include "sppkit_rt.h"\nint main(void) { return 4; }\n')
    d = build_guest(str(src), cache_dir=tmp_path)
    assert c != d and c.name.startswith("prog-")


@needs_gcc
def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPPKIT_CACHE", str(tmp_path))
    out = build_guest("selftest")
    assert out.parent == tmp_path / "guests"


@needs_gcc
def test_build_from_path_runs(tmp_path):
    src = tmp_path / "seven.c"
    src.write_text(
        '#include "sppkit_rt.h"\n'
        "int main(void) { rt_puts(\"hi \"); rt_put_dec(42); rt_putc(' '); rt_put_hex(0xbeef); return 7; }\n"
    )
    run = run_unicorn(load_elf(build_guest(src, cache_dir=tmp_path / "c")))
    assert run.console == "hi 42 0xbeef" and run.exit_code == 7


# -- build: errors ------------------------------------------------------------------


def test_missing_gcc_raises_with_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(build_mod.shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(GuestBuildError, match=r"'gcc' not found.*apt-get install gcc binutils"):
        build_guest("selftest", cache_dir=tmp_path)
    ok, reason = toolchain_status()
    assert not ok and "apt-get install gcc binutils" in reason


def test_unknown_program_lists_bundled_ones(tmp_path):
    with pytest.raises(GuestBuildError, match=r"no bundled guest program 'nosuch'.*selftest"):
        build_guest("nosuch", cache_dir=tmp_path)
    with pytest.raises(GuestBuildError, match=r"no such file"):
        build_guest(tmp_path / "missing.c", cache_dir=tmp_path)


@needs_gcc
def test_compile_error_carries_stderr_and_leaves_no_temp(tmp_path):
    src = tmp_path / "broken.c"
    src.write_text("int main(void) { return undeclared_thing; }\n")
    cache = tmp_path / "cache"
    with pytest.raises(GuestBuildError) as ei:
        build_guest(src, cache_dir=cache)
    msg = str(ei.value)
    assert str(src) in msg and "undeclared_thing" in msg and "failed" in msg
    assert list(cache.iterdir()) == []


# -- running under Unicorn ----------------------------------------------------------


@needs_gcc
def test_selftest_runs_all_writes_stick_unprotected(images):
    run = run_unicorn(images["selftest"])
    assert run.exit_code == 0
    assert "selftest: 32/32 writes stuck, 0 blocked" in run.console


@needs_gcc
def test_selftest_none_stick_when_page_dropped(images):
    im = images["selftest"]
    run = run_unicorn(im, readonly_pages=[im.symbol("protected_page").addr])
    assert run.exit_code == 0
    assert "selftest: 0/32 writes stuck, 32 blocked" in run.console
    assert sorted({a for a, _ in run.dropped}) == [im.symbol("protected_page").addr + i * SUBPAGE for i in range(32)]


@needs_gcc
def test_readback_returns_zero_unprotected(images):
    run = run_unicorn(images["readback"])
    assert run.exit_code == 0, run.console
    assert "readback: 1024 writes, 1024 stuck, 0 did not stick" in run.console


@needs_gcc
def test_readback_counts_dropped_writes(images):
    """Page 1 of target dropped: its 32 x 8 stores fail, plus the store from page 0
    that crosses into it (the one from page 1 into page 2 is counted in the 256)."""
    im = images["readback"]
    page1 = im.symbol("target").addr + PAGE
    run = run_unicorn(im, readonly_pages=[page1])
    assert run.exit_code == 257, run.console
    assert "did not stick: target+0xffc (8 bytes)" in run.console
    assert "readback: 1024 writes, 767 stuck, 257 did not stick" in run.console


@needs_gcc
def test_mixed_runs_and_prints_totals(images):
    run = run_unicorn(images["mixed"])
    assert run.exit_code == 0, run.console
    for line in ("2048 iterations", "hot writes = 10240", "secret writes = 32", "config writes = 8",
                 "canary writes = 4", "protected writes = 44"):
        assert line in run.console


@needs_gcc
def test_mixed_protected_write_count_matches_violations(images):
    """With the protected sub-pages' pages read-only, the dropped writes that land in
    protected sub-pages are exactly the guest's protected-write count."""
    im = images["mixed"]
    prot = [im.symbol(n) for n in ("secret", "config", "canary")]
    pages = sorted({s.addr & ~(PAGE - 1) for s in prot})
    run = run_unicorn(im, readonly_pages=pages)
    assert run.exit_code == 0
    in_protected = [a for a, _ in run.dropped
                    if any(s.addr // SUBPAGE <= a // SUBPAGE <= (s.end - 1) // SUBPAGE for s in prot)]
    assert len(in_protected) == 44


@needs_gcc
def test_start_traps_with_ud2_if_exit_port_is_ignored(images):
    """_start never spins on `out`: if the engine ignores port 0xF4, `ud2` follows."""
    unicorn = pytest.importorskip("unicorn")
    with pytest.raises(unicorn.UcError) as ei:
        run_unicorn(images["selftest"], stop_on_exit=False, max_insns=1_000_000)
    assert ei.value.errno == unicorn.UC_ERR_INSN_INVALID


# -- build: bad input and a damaged cache (fuzz/sweep findings) --------------------------


def test_directory_non_c_file_and_wrong_type_are_refused(tmp_path):
    (tmp_path / "dir.c").mkdir()
    (tmp_path / "prog.txt").write_text("int main(void) { return 0; }\n")
    with pytest.raises(GuestBuildError, match=r"dir\.c: is a directory, not a \.c file"):
        build_guest(tmp_path / "dir.c", cache_dir=tmp_path / "c")
    with pytest.raises(GuestBuildError, match=r"prog\.txt: not a C source file \(the name must end in \.c\)"):
        build_guest(tmp_path / "prog.txt", cache_dir=tmp_path / "c")
    with pytest.raises(GuestBuildError, match="a bundled program name or a path to a .c file, got int 5"):
        build_guest(5, cache_dir=tmp_path / "c")  # type: ignore[arg-type]
    assert not (tmp_path / "c").exists()


@needs_gcc
def test_cflags_must_be_a_sequence_of_strings(tmp_path):
    with pytest.raises(GuestBuildError, match=r"cflags must be a list or tuple of strings .* got '-DX=1'"):
        build_guest("selftest", cache_dir=tmp_path, cflags="-DX=1")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@needs_gcc
def test_compile_error_with_non_utf8_source_line_carries_diagnostics(tmp_path):
    src = tmp_path / "latin1.c"
    src.write_bytes(b"/* caf\xe9 */ int main(void) { return undeclared_thing; /* \xff */ }\n")
    with pytest.raises(GuestBuildError) as ei:
        build_guest(src, cache_dir=tmp_path / "cache")
    msg = str(ei.value)
    assert str(src) in msg and "undeclared_thing" in msg


@needs_gcc
def test_unwritable_cache_directory_is_a_build_error():
    # /proc exists and takes no new files, even for root (chmod would not stop root)
    with pytest.raises(GuestBuildError, match=r"cannot write to the guest cache directory /proc: .*SPPKIT_CACHE"):
        build_guest("selftest", cache_dir="/proc")


@needs_gcc
@pytest.mark.parametrize("damage", ["truncate", "flip", "no-digest"])
def test_damaged_cache_entry_is_rebuilt_not_loaded(tmp_path, damage):
    out = build_guest("mixed", cache_dir=tmp_path)
    good = out.read_bytes()
    if damage == "truncate":
        out.write_bytes(good[:100])
    elif damage == "flip":
        out.write_bytes(good[:200] + bytes([good[200] ^ 0xFF]) + good[201:])
    else:
        out.with_name(out.name + ".sha256").unlink()
    again = build_guest("mixed", cache_dir=tmp_path)
    assert again == out and again.read_bytes() == good
    load_elf(again)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, out.name + ".sha256"]


@needs_gcc
def test_concurrent_builds_of_one_guest_agree(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    src = tmp_path / "same.c"
    src.write_text('#include "sppkit_rt.h"\nint main(void) { return 7; }\n')
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(lambda _: build_guest(src, cache_dir=cache), range(6)))
    assert len(set(outs)) == 1
    load_elf(outs[0])
    assert sorted(p.name for p in cache.iterdir()) == [outs[0].name, outs[0].name + ".sha256"]
    # the stored digest matches: the next call is a cache hit
    assert build_mod._cached_ok(outs[0], outs[0].with_name(outs[0].name + ".sha256"))
