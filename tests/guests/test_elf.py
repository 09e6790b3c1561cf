"""load_elf / flat_image / GuestImage: hand-crafted ELF files for every refusal, and the
symbol table of real builds (local and global, symbol lookups, symbol+offset)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from sppkit.guests import (
    GuestImage,
    GuestImageError,
    Segment,
    Symbol,
    SymbolNotFound,
    build_guest,
    flat_image,
    load_elf,
    toolchain_status,
)

OK, REASON = toolchain_status()
needs_gcc = pytest.mark.skipif(not OK, reason=REASON)

ET_REL, ET_EXEC, ET_DYN = 1, 2, 3
EM_386, EM_X86_64, EM_AARCH64 = 3, 62, 183
PT_LOAD, PT_NOTE = 1, 4
PF_X, PF_W, PF_R = 1, 2, 4


def make_elf(
    segments=((0x400000, b"\x90\x90\xf4", 3, PF_R | PF_X),),
    *,
    entry=0x400000,
    ei_class=2,
    machine=EM_X86_64,
    etype=ET_EXEC,
    extra_phdrs=(),
) -> bytes:
    """A minimal ELF64 executable: header, program headers, then each segment's data.
    ``segments``: (vaddr, data, memsz, flags); ``extra_phdrs``: (p_type, ...) non-LOAD."""
    phnum = len(segments) + len(extra_phdrs)
    off = 64 + 56 * phnum
    ident = b"\x7fELF" + bytes([ei_class, 1, 1, 0]) + bytes(8)
    hdr = ident + struct.pack("<HHIQQQIHHHHHH", etype, machine, 1, entry, 64, 0, 0, 64, 56, phnum, 64, 0, 0)
    phdrs, blobs = b"", b""
    for vaddr, data, memsz, flags in segments:
        phdrs += struct.pack("<IIQQQQQQ", PT_LOAD, flags, off, vaddr, vaddr, len(data), memsz, 0x1000)
        blobs += data
        off += len(data)
    for p_type in extra_phdrs:
        phdrs += struct.pack("<IIQQQQQQ", p_type, PF_R, 0, 0, 0, 0, 0, 4)
    return hdr + phdrs + blobs


def patched(data: bytes, off: int, fmt: str, value: int) -> bytes:
    """``data`` with ``struct.pack(fmt, value)`` written at ``off``."""
    out = bytearray(data)
    struct.pack_into(fmt, out, off, value)
    return bytes(out)


def write(tmp_path: Path, data: bytes, name="guest.elf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


# -- accepted --------------------------------------------------------------------


def test_minimal_handmade_elf_loads(tmp_path):
    p = write(tmp_path, make_elf(segments=(
        (0x400000, b"\x90\xf4", 2, PF_R | PF_X),
        (0x401000, b"\x01\x02", 0x1000, PF_R | PF_W),
    )))
    im = load_elf(p)
    assert im.entry == 0x400000 and im.path == p
    assert im.segments == [
        Segment(0x400000, b"\x90\xf4", 2, "r-x"),
        Segment(0x401000, b"\x01\x02", 0x1000, "rw-"),
    ]
    assert im.segments[1].image() == b"\x01\x02" + bytes(0x1000 - 2)
    assert im.symbols == {} and im.low == 0x400000 and im.high == 0x402000


def test_non_load_segments_are_ignored(tmp_path):
    im = load_elf(write(tmp_path, make_elf(extra_phdrs=(PT_NOTE,))))
    assert len(im.segments) == 1


# -- refused -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"MZ\x90\x00" + bytes(100), "not an ELF file"),
        (b"", "not an ELF file"),
        (b"#!/bin/sh\necho hi\n", "not an ELF file"),
        (make_elf(ei_class=1), "not a 64-bit ELF (ELFCLASS32)"),
        (make_elf(machine=EM_386), "EM_386, not EM_X86_64"),
        (make_elf(machine=EM_AARCH64), "not EM_X86_64"),
        (make_elf(etype=ET_DYN), "PIE or shared object (ET_DYN)"),
        (make_elf(etype=ET_REL), "relocatable object (ET_REL)"),
        (make_elf(segments=(), extra_phdrs=(PT_NOTE,)), "no PT_LOAD segment"),
        (make_elf(segments=((0x400000, b"\x90" * 16, 8, PF_R),)), "filesz 0x10 > memsz 0x8"),
        (make_elf(segments=((0x400000, b"\x90", 0x2000, PF_R), (0x401000, b"\x90", 1, PF_R | PF_W))),
         "segments overlap: 0x400000-0x402000 (r--) and 0x401000-0x401001 (rw-)"),
        (make_elf()[:40], "truncated"),
        (make_elf()[:100], "truncated"),
        (make_elf(segments=((0x400000, b"\x90" * 64, 64, PF_R),))[:-10], "truncated: PT_LOAD #0"),
        (patched(make_elf(), 5, "<B", 2),
         "big-endian (ELFDATA2MSB); x86-64 guests are little-endian (ELFDATA2LSB)"),
        (patched(make_elf(), 5, "<B", 0), "invalid data encoding EI_DATA 0"),
        (make_elf(entry=0x400003), "entry point 0x400003 is outside every loadable segment: 0x400000-0x400003 (r-x)"),
        (make_elf(entry=0xDEADBEEF, segments=((0x400000, b"\x90\xf4", 2, PF_R | PF_X),
                                               (0x401000, b"\x01", 0x1000, PF_R | PF_W))),
         "entry point 0xdeadbeef is outside every loadable segment: 0x400000-0x400002 (r-x), "
         "0x401000-0x402000 (rw-)"),
        (make_elf(segments=((2**64 - 0x1000, b"\x90", 0x2000, PF_R | PF_X),), entry=2**64 - 0x1000),
         "PT_LOAD #0: p_vaddr 0xfffffffffffff000 + memsz 0x2000 ends past 2**64"),
        (patched(make_elf(), 64 + 24, "<Q", 2**64 - 1),  # p_paddr of the one PT_LOAD
         "PT_LOAD #0: p_paddr 0xffffffffffffffff + memsz 0x3 ends past 2**64"),
    ],
    ids=["mz", "empty", "script", "class32", "i386", "aarch64", "pie", "rel", "no-load", "filesz",
         "overlap", "trunc-header", "trunc-phdrs", "trunc-data", "big-endian", "ei-data-0", "entry-at-end",
         "entry-outside", "vaddr-wraps", "paddr-wraps"],
)
def test_bad_files_are_refused_naming_file_and_problem(tmp_path, data, problem):
    p = write(tmp_path, data, "bad.elf")
    with pytest.raises(GuestImageError) as ei:
        load_elf(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: "), msg
    assert problem in msg, msg
    assert isinstance(ei.value, ValueError)


def test_pie_refusal_explains_why(tmp_path):
    with pytest.raises(GuestImageError, match=r"needs relocation.*-no-pie"):
        load_elf(write(tmp_path, make_elf(etype=ET_DYN)))


def test_missing_file(tmp_path):
    with pytest.raises(GuestImageError, match=r"nope\.elf: cannot read"):
        load_elf(tmp_path / "nope.elf")


def test_a_device_is_refused_before_reading(tmp_path):
    """/dev/zero used to be read until memory ran out (a MemoryError); a FIFO would
    block for ever.  Only regular files are read."""
    with pytest.raises(GuestImageError, match=r"/dev/zero: not a regular file"):
        load_elf("/dev/zero")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(GuestImageError, match=r"pipe: not a regular file"):
        load_elf(fifo)  # (opening it must not wait for a writer)


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(GuestImageError, match=r"is a directory, not an ELF file"):
        load_elf(tmp_path)


def test_a_file_larger_than_the_limit_is_refused_unread(tmp_path, monkeypatch):
    import sppkit.guests.elf as elf

    p = write(tmp_path, make_elf())
    monkeypatch.setattr(elf, "MAX_ELF_SIZE", p.stat().st_size - 1)
    with pytest.raises(GuestImageError, match=rf"{p.stat().st_size:,} bytes: more than sppkit reads for an ELF file"):
        load_elf(p)
    monkeypatch.setattr(elf, "MAX_ELF_SIZE", p.stat().st_size)
    assert load_elf(p).entry == 0x400000


@needs_gcc
def test_real_pie_from_gcc_is_refused(tmp_path):
    import subprocess

    src = tmp_path / "pie.c"
    src.write_text("int main(void) { return 0; }\n")
    out = tmp_path / "pie.elf"
    r = subprocess.run(["gcc", "-fPIE", "-pie", "-nostdlib", "-o", str(out), str(src)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot link a PIE here: {r.stderr.decode()[:200]}")
    with pytest.raises(GuestImageError, match="ET_DYN"):
        load_elf(out)


@needs_gcc
def test_truncated_real_build(tmp_path):
    good = build_guest("selftest", cache_dir=tmp_path).read_bytes()
    for cut in (64, 300, 0x1100, len(good) - 100):
        p = write(tmp_path, good[:cut], f"cut{cut}.elf")
        with pytest.raises(GuestImageError, match=rf"{p.name}: .*(truncated|malformed)"):
            load_elf(p)


# -- malformed section tables and symbol tables of a real build ---------------------

# Field offsets in an Elf64_Shdr and in the ELF64 header.
SH_NAME, SH_TYPE, SH_OFFSET, SH_SIZE, SH_LINK, SH_ENTSIZE = 0, 4, 24, 32, 40, 56
E_ENTRY, E_SHENTSIZE, E_SHSTRNDX = 24, 58, 62


@pytest.fixture(scope="module")
def mixed_raw(tmp_path_factory) -> bytes:
    if not OK:
        pytest.skip(REASON)
    return build_guest("mixed", cache_dir=tmp_path_factory.mktemp("mixed")).read_bytes()


def _sections(raw: bytes) -> tuple[int, dict[str, int]]:
    """``(e_shoff, {section name: index})`` of a well-formed ELF64."""
    shoff, shnum, shstrndx = struct.unpack_from("<Q", raw, 40)[0], *struct.unpack_from("<HH", raw, 60)
    headers = [struct.unpack_from("<IIQQQQIIQQ", raw, shoff + 64 * i) for i in range(shnum)]
    base = headers[shstrndx][4]
    names = {raw[base + h[0]:raw.index(b"\0", base + h[0])].decode(): i for i, h in enumerate(headers)}
    return shoff, names


def with_section_field(raw: bytes, section: str, field_off: int, value: int) -> bytes:
    shoff, names = _sections(raw)
    fmt = "<I" if field_off in (SH_NAME, SH_TYPE, SH_LINK) else "<Q"
    return patched(raw, shoff + 64 * names[section] + field_off, fmt, value)


def section_index(raw: bytes, section: str) -> int:
    return _sections(raw)[1][section]


@pytest.mark.parametrize(
    "mutate, problems",
    [
        (lambda r: with_section_field(r, ".strtab", SH_OFFSET, 2**64 - 1),
         ["section .strtab (#", "offset 0xffffffffffffffff", "lies beyond the end of the file"]),
        (lambda r: with_section_field(r, ".shstrtab", SH_OFFSET, 2**64 - 1),
         ["section-name string table (section #", "offset 0xffffffffffffffff", "lies beyond the end of the file"]),
        (lambda r: with_section_field(r, ".strtab", SH_OFFSET, len(r) + 100),
         ["section .strtab (#", "lies beyond the end of the file"]),
        (lambda r: with_section_field(r, ".symtab", SH_SIZE, 2**40),
         ["section .symtab (#", "size 0x10000000000 lies beyond the end of the file"]),
        (lambda r: patched(r, E_SHSTRNDX, "<H", 0xFFFF),
         ["e_shstrndx SHN_XINDEX (0xffff) with section #0's sh_link 0: no section-name string table"]),
        (lambda r: patched(r, E_SHSTRNDX, "<H", 99), ["e_shstrndx 99: no such section"]),
        (lambda r: patched(r, E_SHSTRNDX, "<H", section_index(r, ".text")),
         ["e_shstrndx ", ": section #", "is not a string table (sh_type 1)"]),
        (lambda r: patched(r, E_SHENTSIZE, "<H", 0), ["e_shentsize is 0, not 64"]),
        (lambda r: with_section_field(r, ".text", SH_NAME, 0x10000),
         ["section #", ": name offset 0x10000 is past the end of the section-name string table"]),
        (lambda r: with_section_field(r, ".symtab", SH_ENTSIZE, 1),
         ["section .symtab (#", "sh_entsize is 1, not 24"]),
        (lambda r: with_section_field(r, ".symtab", SH_ENTSIZE, 0),
         ["section .symtab (#", "sh_entsize is 0, not 24"]),
        (lambda r: with_section_field(r, ".symtab", SH_SIZE, 24 * 10 + 5),
         ["section .symtab (#", "sh_size 0xf5 is not a multiple of 24"]),
        (lambda r: with_section_field(r, ".symtab", SH_LINK, section_index(r, ".text")),
         ["section .symtab (#", "sh_link ", " is not a string table"]),
        (lambda r: with_section_field(r, ".symtab", SH_TYPE, 1),
         ["section .symtab (#", "has sh_type 1, not SHT_SYMTAB"]),
        (lambda r: with_section_field(r, ".strtab", SH_SIZE, 1),
         ["section .symtab (#", "past the end of its string table section .strtab"]),
    ],
    ids=["strtab-offset-huge", "shstrtab-offset-huge", "strtab-past-eof", "symtab-past-eof",
         "shstrndx-xindex", "shstrndx-out-of-range", "shstrndx-not-strtab", "shentsize-0",
         "section-name-past-table", "symtab-entsize-1", "symtab-entsize-0", "symtab-size-ragged",
         "symtab-link-not-strtab", "symtab-type-changed", "symbol-name-past-strtab"],
)
def test_malformed_sections_of_real_build_are_refused(tmp_path, mixed_raw, mutate, problems):
    assert load_elf(write(tmp_path, mixed_raw, "good.elf")).symbols  # the unmutated build loads, with symbols
    p = write(tmp_path, mutate(mixed_raw), "bad.elf")
    with pytest.raises(GuestImageError) as ei:
        load_elf(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: "), msg
    for problem in problems:
        assert problem in msg, msg
    assert "OverflowError" not in msg and "malformed or truncated ELF" not in msg, msg


def test_real_build_entry_outside_segments_is_refused(tmp_path, mixed_raw):
    good = load_elf(write(tmp_path, mixed_raw, "good.elf"))
    with pytest.raises(GuestImageError) as ei:
        load_elf(write(tmp_path, patched(mixed_raw, E_ENTRY, "<Q", 0xDEADBEEF), "bad.elf"))
    msg = str(ei.value)
    assert "entry point 0xdeadbeef is outside every loadable segment" in msg, msg
    for seg in good.segments:
        assert f"{seg.gpa:#x}-{seg.end:#x} ({seg.flags})" in msg, msg


def test_real_build_big_endian_is_refused_before_machine(tmp_path, mixed_raw):
    with pytest.raises(GuestImageError, match=r"big-endian \(ELFDATA2MSB\)") as ei:
        load_elf(write(tmp_path, patched(mixed_raw, 5, "<B", 2)))
    assert "machine" not in str(ei.value)


def test_real_build_without_section_names_keeps_its_symbols(tmp_path, mixed_raw):
    """e_shstrndx = SHN_UNDEF (no section-name table) is legal: the symbol table is found by type."""
    good = load_elf(write(tmp_path, mixed_raw, "good.elf"))
    im = load_elf(write(tmp_path, patched(mixed_raw, E_SHSTRNDX, "<H", 0), "nonames.elf"))
    assert im.all_symbols == good.all_symbols and im.symbol("secret") == good.symbol("secret")


@needs_gcc
def test_stripped_real_build_loads_without_symbols(tmp_path, mixed_raw):
    import shutil
    import subprocess

    if shutil.which("strip") is None:
        pytest.skip("no strip")
    p = write(tmp_path, mixed_raw, "stripped.elf")
    subprocess.run(["strip", "--strip-all", str(p)], check=True)
    im = load_elf(p)
    assert im.symbols == {} and im.all_symbols == []
    assert [s.gpa for s in im.segments] == [s.gpa for s in load_elf(write(tmp_path, mixed_raw)).segments]


# -- flat images ------------------------------------------------------------------


def test_flat_image():
    im = flat_image(b"\x90\xf4", 0x10000)
    assert im.entry == 0x10000 and im.symbols == {} and im.path is None
    assert im.segments == [Segment(0x10000, b"\x90\xf4", 2, "rwx")]
    assert flat_image(b"\x90\x90\xf4", 0x10000, entry=0x10001).entry == 0x10001
    with pytest.raises(GuestImageError, match="entry 0x20000 outside"):
        flat_image(b"\x90", 0x10000, entry=0x20000)
    with pytest.raises(GuestImageError, match="empty"):
        flat_image(b"", 0x10000)
    assert im.symbol_at(0x10000) is None


# -- symbols ----------------------------------------------------------------------


def _image_with(symbols, segments=None) -> GuestImage:
    segments = segments or [Segment(0x400000, bytes(0x3000), 0x3000, "rw-")]
    return GuestImage(segments=segments, entry=0x400000, symbols={s.name: s for s in symbols}, path=Path("t.elf"))


def test_symbol_lookup_and_close_matches():
    im = _image_with([Symbol("secret", 0x401000, 32, "object", "global"),
                      Symbol("secrets_table", 0x401100, 64, "object", "local")])
    assert im.symbol("secret").addr == 0x401000
    with pytest.raises(KeyError) as ei:
        im.symbol("secert")
    assert isinstance(ei.value, SymbolNotFound)
    assert str(ei.value) == "t.elf: no symbol 'secert'; close matches: secret"
    assert ei.value.matches == ["secret"]
    with pytest.raises(SymbolNotFound, match=r"no symbol 'zzz'$"):
        im.symbol("zzz")


def test_symbol_at_prefers_smallest_object_then_labels():
    im = _image_with([
        Symbol("page", 0x401000, 0x1000, "object", "global"),
        Symbol("field", 0x401100, 0x20, "object", "global"),
        Symbol("fn", 0x400000, 0x40, "func", "global"),
        Symbol("__data_start", 0x402000, 0, "notype", "global"),
        Symbol("blob", 0x402800, 0x10, "notype", "local"),
    ])
    assert im.symbol_at(0x401108) == (im.symbol("field"), 8)
    assert im.symbol_at(0x401120) == (im.symbol("page"), 0x120)
    assert im.symbol_at(0x400010) == (im.symbol("fn"), 0x10)
    assert im.symbol_at(0x402804) == (im.symbol("blob"), 4)
    assert im.symbol_at(0x402010) == (im.symbol("__data_start"), 0x10)  # nearest label
    assert im.symbol_at(0x400040) is None  # past fn, no label below in the segment
    assert im.symbol_at(0x900000) is None  # outside every segment
    assert im.describe(0x401108) == "field+0x8"
    assert im.describe(0x401100) == "field"
    assert im.describe(0x900000) == "0x900000"


@needs_gcc
def test_real_symbol_table_has_locals_and_globals(tmp_path):
    im = load_elf(build_guest("readback", cache_dir=tmp_path))
    kinds = {(s.kind, s.binding) for s in im.all_symbols}
    assert ("object", "global") in kinds and ("object", "local") in kinds and ("func", "global") in kinds
    assert im.symbol("failed_by_size").binding == "local"  # a static variable
    assert im.symbol("memset").kind == "func"
    assert not any(s.kind in ("file", "section") for s in im.all_symbols)
    t = im.symbol("target")
    assert im.symbol_at(t.addr + 0x1234) == (t, 0x1234)
    assert im.describe(im.symbol("main").addr + 3) == "main+0x3"


@needs_gcc
def test_real_field_aliases_win_in_symbol_at(tmp_path):
    im = load_elf(build_guest("mixed", cache_dir=tmp_path))
    s = im.symbol("secret")
    assert im.symbol_at(s.addr + 8) == (s, 8)
    # Past the 32-byte secret but in its padding: the enclosing page structure.
    assert im.symbol_at(s.addr + 0x40) == (im.symbol("keys_page"), 0x140)


# -- fuzz/sweep findings ------------------------------------------------------------------


@pytest.mark.parametrize("args, kwargs, problem", [
    ((5, 0x1000), {}, "data must be bytes, got int"),  # bytes(5) would be 5 zero bytes
    (("\x90\xf4", 0x1000), {}, "data must be bytes, got str"),
    ((b"\x90", 4096.0), {}, "gpa must be an integer, got float"),
    ((b"\x90", True), {}, "gpa must be an integer, got bool"),
    ((b"\x90", "0x1000"), {}, "gpa must be an integer, got str"),
    ((b"\x90", 0x1000, 4096.0), {}, "entry must be an integer, got float"),
    ((b"\x90\x90", (1 << 64) - 1), {}, "ends past 2**64"),
    ((b"\x90", 0x1000), {"flags": "rw"}, "flags must be 'rwx'-style"),
    ((b"\x90", 0x1000), {"flags": "xwr"}, "flags must be 'rwx'-style"),
    ((b"\x90", 0x1000), {"flags": 7}, "flags must be 'rwx'-style"),
])
def test_flat_image_argument_errors(args, kwargs, problem):
    with pytest.raises(GuestImageError, match=r"^<flat image>: ") as ei:
        flat_image(*args, **kwargs)
    assert problem in str(ei.value)


def test_flat_image_accepts_bytes_like_and_flag_forms():
    im = flat_image(bytearray(b"\x90\xf4"), (1 << 64) - 2, flags="r-x")
    assert im.segments[0].data == b"\x90\xf4" and im.segments[0].flags == "r-x"
    assert flat_image(memoryview(b"\xf4"), 0, flags="---").entry == 0


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_real_build_loads_or_is_refused(tmp_path_factory, mixed_raw, data):
    """Byte mutations and truncations of a real guest: a GuestImage or a GuestImageError
    naming the file, never another exception (IndexError, struct.error, ELFError...)."""
    raw = bytearray(mixed_raw)
    shoff = struct.unpack_from("<Q", raw, 0x28)[0]
    region = data.draw(st.sampled_from([(0, 64), (64, 64 + 56 * 8), (shoff, len(raw)), (0, len(raw))]))
    for pos, kind, v in data.draw(st.lists(st.tuples(
            st.integers(*region).map(lambda p: min(p, len(raw) - 8)), st.booleans(),
            st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, 24, 64, 0xFFFF, 2**32, 2**63, 2**64 - 1])),
            min_size=1, max_size=6)):
        if kind:
            struct.pack_into("<Q", raw, pos, v)
        else:
            raw[pos] = v & 0xFF
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    path = tmp_path_factory.mktemp("fuzz") / "g.elf"
    path.write_bytes(bytes(raw))
    try:
        img = load_elf(path)
    except GuestImageError as e:
        assert str(e).startswith(f"{path}: ")
    else:
        assert isinstance(img, GuestImage) and img.segments
        img.describe(img.entry)
