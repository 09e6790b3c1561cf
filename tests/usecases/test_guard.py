"""GuaNary-style overflow guards: sppkit.usecases.guard with guests/programs/guardalloc.h.

Runs on the Unicorn engine always and on KVM when /dev/kvm is usable; skips when no
gcc can build the guests.
"""

from __future__ import annotations

import struct

import pytest

from sppkit.engines.x86 import decode
from sppkit.guests import build_guest, load_elf
from sppkit.usecases import guard as G

from usecase_engines import ENGINES, KVM_OK, KVM_WHY, needs_gcc

pytestmark = needs_gcc

# guard_bufs: size of buffer i (sizes[(i * 17 + 3) % 40])
SIZES = [1, 7, 8, 13, 16, 24, 31, 32, 40, 48, 63, 64, 72, 96, 100, 127, 128, 129, 160, 200,
         255, 256, 257, 300, 384, 500, 511, 512, 640, 700, 1000, 1024, 1500, 2000, 2048, 3000,
         4000, 4096, 5000, 6000]


def size_of(i: int) -> int:
    return SIZES[(i * 17 + 3) % len(SIZES)]


def engine_class(name):
    if name == "kvm":
        from sppkit.engines.kvm.engine import KvmEngine

        return KvmEngine
    from sppkit.engines.unicorn import UnicornEngine

    return UnicornEngine


@pytest.fixture(scope="module")
def image():
    return load_elf(build_guest("guard_bufs"))


# ------------------------------------------------------------------ detection
@pytest.mark.parametrize("engine", ENGINES)
def test_overflow_detected_with_buffer_and_offset(engine):
    rep = G.guard_guest("guard_bufs", decision="stop", engine=engine)
    assert rep.result.stop_reason == "stop-decision"
    assert len(rep.hits) == 1
    h = rep.hits[0]
    b = h.buffer
    assert (b.index, b.size) == (22, 129) and b.size == size_of(22)
    assert b.end == b.guard  # the buffer ends exactly where its guard begins
    assert h.gpa == b.guard and h.offset == 0
    assert h.instruction and h.instruction.startswith("mov")
    assert rep.exact and len(rep.protected) == 64 and rep.signals == 2
    assert rep.overflow


@pytest.mark.parametrize("engine", ENGINES)
def test_skip_reports_every_byte_past_the_end_and_goes_on(engine):
    rep = G.guard_guest("guard_bufs", decision="skip", engine=engine, buffers=40, overflow_buffer=7, overflow_by=5)
    assert rep.result.stop_reason == "exit" and rep.result.exit_code == 0
    assert [h.offset for h in rep.hits] == [0, 1, 2, 3, 4]
    assert {h.buffer.index for h in rep.hits} == {7}
    assert rep.hits[0].buffer.size == size_of(7) == 8
    assert all(h.retired for h in rep.hits)
    assert "overflow bytes written" in rep.result.console


@pytest.mark.parametrize("engine", ENGINES)
def test_no_false_positives_without_overflow(engine, image):
    rep = G.guard_guest("guard_bufs", decision="stop", engine=engine, overflow_by=0)
    assert rep.hits == [] and not rep.overflow
    assert rep.result.stop_reason == "exit" and rep.result.exit_code == 0
    assert rep.result.stats["violations"] == 0
    assert rep.result.stats["writes"] > 5_000  # every buffer rewritten up to the byte before its guard
    # protection is transparent: same output as an unguarded run
    eng = engine_class(engine)(image)
    try:
        eng.vm.load(image.symbols["param_overflow_by"].addr, (0).to_bytes(8, "little"))
        plain = eng.run()
    finally:
        eng.close()
    assert rep.result.console == plain.console


def test_stop_under_unicorn_does_not_retire_the_instruction(image):
    from sppkit.engines.unicorn import UnicornEngine

    eng = UnicornEngine(image)
    try:
        s = G.GuardSession(eng, decision="stop")
        r = s.run()
        assert r.stop_reason == "stop-decision"
        (h,) = s.hits(r)
        assert not h.retired and h.rip_after is None
        assert r.rip_at == h.rip_at
        regs = eng.regs()
        assert regs["rip"] == h.rip_at  # RIP still at the overflowing instruction
        d = decode(eng.vm.read(h.rip_at, 15), h.rip_at, regs)
        assert d.writes_memory and d.address == h.gpa == h.buffer.guard
        assert eng.vm.read(h.buffer.guard, G.GUARD_SIZE) == bytes(G.GUARD_SIZE)  # nothing landed in the guard
        assert eng.vm.read(h.buffer.end - 1, 1) == bytes([ord("A") + 128 % 26])  # the last in-bounds byte did
    finally:
        eng.close()


@pytest.mark.skipif(not KVM_OK, reason=f"KVM not usable: {KVM_WHY}")
def test_stop_under_kvm_reports_the_retired_instruction(image):
    from sppkit.engines.kvm.engine import KvmEngine

    eng = KvmEngine(image)
    try:
        s = G.GuardSession(eng, decision="stop")
        r = s.run()
        (h,) = s.hits(r)
        assert h.retired and h.rip_after is not None
        d = decode(eng.vm.read(h.rip_at, 15), h.rip_at, None)
        assert h.rip_at + d.length == h.rip_after
        assert eng.vm.read(h.buffer.guard, G.GUARD_SIZE) == bytes(G.GUARD_SIZE)  # the write was not committed
    finally:
        eng.close()


def test_exactly_the_guards_are_protected(image):
    from sppkit.engines.unicorn import UnicornEngine

    eng = UnicornEngine(image)
    try:
        s = G.GuardSession(eng, decision="stop")
        r = eng.run()
        assert r.stop_reason == "paused"
        table = s.protect()
        assert s.exact
        guards = table.guards
        assert len(guards) == 64 and all(g % 128 == 0 for g in guards)
        for b in table.buffers:
            gfn, sub = b.guard >> 12, (b.guard & 0xFFF) >> 7
            amap = eng.vm.get_subpage_access(gfn, 1)[0]
            assert not amap >> sub & 1
            # the sub-page holding the buffer's last byte is writable
            last = b.end - 1
            assert eng.vm.get_subpage_access(last >> 12, 1)[0] >> ((last & 0xFFF) >> 7) & 1
        protected = sum(bin(~m & 0xFFFFFFFF).count("1") for m in eng.vm.memslots()[0].maps.values())
        assert protected == 64
    finally:
        eng.close()


# ------------------------------------------------------------------ numbers
def test_guard_numbers():
    n = G.guard_numbers([1])
    assert n["subpage_footprint_bytes"] == 256 and n["page_footprint_bytes"] == 8192
    assert n["guard_bytes_ratio"] == 32 and n["footprint_ratio"] == 32
    n = G.guard_numbers([129, 4096])
    assert n["subpage_footprint_bytes"] == (256 + 128) + (4096 + 128)
    assert n["page_footprint_bytes"] == (4096 + 4096) + (4096 + 4096)
    assert n["buffers_per_mib_ratio"] == pytest.approx(n["footprint_ratio"])
    assert G.guard_numbers([]) == {"buffers": 0}


def test_report_numbers_match_the_table():
    rep = G.guard_guest("guard_bufs", decision="stop", engine="unicorn", overflow_by=0)
    sizes = [b.size for b in rep.table.buffers if b.live]
    assert sorted(sizes) == sorted(
        [size_of(i) for i in range(64) if i not in (5, 18, 31, 44)] + [max(1, size_of(j) - 1) for j in (5, 18, 31, 44)])
    n = rep.numbers
    assert n["buffers"] == 64 and n["subpage_guard_bytes"] == 64 * 128 and n["page_guard_bytes"] == 64 * 4096
    assert n["subpage_footprint_bytes"] == sum(b.slot_size for b in rep.table.buffers)
    assert n["arena_used_bytes"] == rep.table.arena_used >= n["subpage_footprint_bytes"]
    assert n["footprint_ratio"] > 4


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kw, match", [
    (dict(buffers=513), "at most 512 buffers"),
    (dict(buffers=0), "at least one buffer"),
    (dict(buffers=10, overflow_buffer=10), "only 10 buffers"),
    (dict(overflow_by=-1), "non-negative"),
    (dict(overflow_by=5000), "at most 4096"),
    (dict(decision="emulate"), "stop or skip"),
    # values beyond a u64 are refused with the real limit (table capacity, buffer count, a
    # page), not overflow while patching; a narrower guest variable: test_usecase_cli_sweep.py
    (dict(overflow_buffer=2**70), r"--overflow-buffer 1180591620717411303424: there are only 64 buffers"),
    (dict(overflow_buffer=2**64), r"--overflow-buffer 18446744073709551616: there are only 64 buffers"),
    (dict(buffers=2**64), r"--buffers 18446744073709551616: the guest's guard table holds at most 512 buffers"),
    (dict(overflow_by=2**64), "--overflow-by 18446744073709551616: at most 4096 bytes"),
    # without --buffers the range check uses the guest's default (param_nbuffers = 64)
    (dict(overflow_buffer=64), r"--overflow-buffer 64: there are only 64 buffers \(0\.\.63\)"),
    (dict(overflow_buffer=99999), r"there are only 64 buffers \(0\.\.63\)"),
    (dict(buffers=512, overflow_buffer=512), r"there are only 512 buffers \(0\.\.511\)"),
])
def test_bad_guard_input(kw, match):
    with pytest.raises(G.GuardError, match=match):
        G.guard_guest("guard_bufs", engine="unicorn", **kw)


def test_last_default_buffer_can_overflow():
    rep = G.guard_guest("guard_bufs", engine="unicorn", overflow_buffer=63)
    assert [h.buffer.index for h in rep.hits] == [63]


@pytest.mark.parametrize("args, match", [
    (["--overflow-buffer", "18446744073709551616"],
     r"--overflow-buffer 18446744073709551616: there are only 64 buffers"),
    (["--overflow-buffer", "64"], r"--overflow-buffer 64: there are only 64 buffers \(0\.\.63\)"),
])
def test_cli_bad_params_are_one_line_errors(args, match):
    import re

    from click.testing import CliRunner

    from sppkit.cli import main

    r = CliRunner().invoke(main, ["guard", "guard_bufs", "--engine", "unicorn", *args])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    (line,) = [ln for ln in r.output.splitlines() if ln.startswith("sppkit: error:")]
    assert re.search(match, line)


def test_guest_without_guard_table():
    with pytest.raises(G.GuardError, match="guardalloc.h"):
        G.guard_guest("ckpt_log", engine="unicorn")
    with pytest.raises(G.GuardError, match="param_overflow_by"):
        G.guard_guest("ckpt_log", engine="unicorn", overflow_by=1)


def test_guard_arena_larger_than_ram():
    # guard_bufs' 1-MiB arena and 16-KiB table lie above 4 MiB: a 4-MiB guest cannot hold them
    with pytest.raises(G.GuardError, match=r"guard arena \[0x409000, 0x509000\) lies beyond guest RAM \(4 MiB\): "
                                           r"use --memory 6M"):
        G.guard_guest("guard_bufs", engine="unicorn", ram_size=4 << 20)
    rep = G.guard_guest("guard_bufs", engine="unicorn", ram_size=6 << 20, overflow_by=0)
    assert rep.result.exit_code == 0 and not rep.hits


def _table(entries, *, magic=G.TABLE_MAGIC, version=1, cap=8, gsize=128, arena=0x10000, asize=0x10000, used=0x1000):
    hdr = struct.pack("<QIIIIQQQ", magic, version, cap, len(entries), gsize, arena, asize, used)
    return hdr + b"".join(struct.pack("<QQQII", *e) for e in entries)


class _FakeImage:
    where = "fake.elf"

    def __init__(self, size=48 + 8 * 32):
        from sppkit.guests.elf import Symbol

        self.symbols = {"guard_table": Symbol("guard_table", 0x1000, size, "object", "global")}


@pytest.mark.parametrize("entries, kw, match", [
    ([(0x10080 - 8, 8, 0x10080, 256, 1)], dict(), None),
    ([(0x10080 - 8, 8, 0x10080, 256, 1)], dict(magic=1), "bad magic"),
    ([(0x10080 - 8, 8, 0x10080, 256, 1)], dict(version=2), "table version 2"),
    ([(0x10080 - 8, 8, 0x10080, 256, 1)], dict(gsize=4096), "exactly one 128-byte sub-page"),
    ([(0x10080 - 8, 8, 0x10088, 256, 1)], dict(), "not 128-byte aligned"),
    ([(0x10080 - 8, 8, 0x10080, 256, 1)], dict(asize=1 << 30), "beyond guest RAM"),
    ([(0x40 - 8, 8, 0x4000080, 256, 1)], dict(arena=0x4000000), "beyond guest RAM"),
    ([(0x2_0000, 8, 0x2_0080, 256, 1)], dict(), "outside the arena"),
    ([(0x10080 - 8, 9, 0x10080, 256, 1)], dict(), "does not end at or before its guard"),
    ([(0x10080 - 8, 8, 0x10080, 256, 1), (0x10080 - 4, 4, 0x10080, 256, 1)], dict(), "already belongs to entry 0"),
    ([(0x10080 - 8, 8, 0x10080, 256, 1)] * 9, dict(), "capacity 8"),
])
def test_guard_table_validation(entries, kw, match):
    data = _table(entries, **kw)
    ram = 64 << 20

    def read(gpa, n):
        return (data[gpa - 0x1000 :] + bytes(n))[:n]

    if match is None:
        t = G.read_guard_table(read, _FakeImage(), ram)
        assert t.guards == [0x10080] and t.buffer_at_guard(0x100FF).index == 0
    else:
        with pytest.raises(G.GuardTableError, match=match):
            G.read_guard_table(read, _FakeImage(), ram)


@pytest.mark.parametrize("count", [0xFFFFFFFF, 3_000_000])
def test_guard_table_count_past_ram_without_symbol_size(count):
    # a table symbol without a size (an assembler label) and a corrupt count: named, before any read past RAM
    hdr = struct.pack("<QIIIIQQQ", G.TABLE_MAGIC, 1, 0xFFFFFFFF, count, 128, 0, 0x4000000, 0)
    reads = []

    def read(gpa, n):
        reads.append((gpa, n))
        if gpa + n > 64 << 20:
            raise AssertionError(f"read past RAM at {gpa:#x}+{n:#x}")
        return (hdr[gpa - 0x1000 :] + bytes(n))[:n] if gpa >= 0x1000 else bytes(n)

    with pytest.raises(G.GuardTableError, match=rf"guard_table at 0x1000: count {count} .*past the end of guest RAM"):
        G.read_guard_table(read, _FakeImage(size=0), 64 << 20)
    assert reads == [(0x1000, 48)]


# ------------------------------------------------------------------ CLI and demo
def test_cli_guard():
    from click.testing import CliRunner

    runner = CliRunner()
    r = runner.invoke(G.guard_command, ["guard_bufs", "--engine", "unicorn"])
    assert r.exit_code == 1, r.output
    assert "buffer #22" in r.output and "not retired" in r.output and "GuaNary" in r.output
    r = runner.invoke(G.guard_command, ["guard_bufs", "--engine", "unicorn", "--overflow-by", "0", "--json"])
    assert r.exit_code == 0, r.output
    assert '"overflow": false' in r.output
    r = runner.invoke(G.guard_command, ["guard_bufs", "--engine", "unicorn", "--buffers", "9999"])
    assert isinstance(r.exception, G.GuardError)


def test_demo_guard_runs():
    import io

    from rich.console import Console

    buf = io.StringIO()
    rep = G.demo_guard(Console(file=buf, width=160))
    assert rep is not None and rep.hits and rep.hits[0].buffer.index == 22
    assert "128-B guards" in buf.getvalue() and "#22" in buf.getvalue()


STRADDLE = r"""
#include "sppkit_rt.h"
#include "guardalloc.h"
int main(void)
{
    u8 *a = ga_alloc(1), *b = ga_alloc(13);
    if (!a || !b) return 2;
    ga_guards_ready();
    rt_write64(b + 8, 0x2222222222222222ull);  /* bytes 8..15 of a 13-byte buffer: 3 past its end */
    return 0;
}
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_a_store_straddling_the_end_names_its_buffer(engine, tmp_path):
    """An 8-byte store starting inside a 13-byte buffer and ending 3 bytes into its
    guard: it was "an unknown buffer, ? past its end" (the buffer was looked up from
    the store's first byte, inside the buffer).  Also: a guest of the user's can
    include guardalloc.h."""
    src = tmp_path / "straddle.c"
    src.write_text(STRADDLE)
    rep = G.guard_guest(str(src), decision="skip", engine=engine)
    assert rep.result.exit_code == 0, rep.result
    (h,) = rep.hits
    assert (h.buffer.index, h.buffer.size, h.offset, h.size) == (1, 13, 0, 8)
    assert h.gpa == h.buffer.start + 8
    from rich.console import Console

    console = Console(record=True, width=200)
    G.print_guard_report(rep, console)
    text = console.export_text()
    assert "overflow of buffer #1" in text and "+0..+2 past its end" in text, text
