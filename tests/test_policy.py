"""TOML protection policies: parsing, symbol resolution, sub-page rounding, access maps,
and errors that name the file, the entry and the problem."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sppkit.guests import GuestImage, Segment, Symbol, build_guest, load_elf, toolchain_status
from sppkit import policy as policy_mod
from sppkit.policy import (
    MAX_PROTECTED_PAGES,
    Policy,
    PolicyError,
    ProtectEntry,
    load_policy,
    parse_policy,
    parse_protect_arg,
)
from sppkit.vmm.events import Decision

FULL = 0xFFFFFFFF


def fake_image() -> GuestImage:
    syms = [
        Symbol("secret", 0x404100, 32, "object", "global"),
        Symbol("secret_backup", 0x405000, 64, "object", "local"),
        Symbol("hot", 0x404000, 256, "object", "global"),
        Symbol("label", 0x406000, 0, "notype", "global"),
        Symbol("big", 0x410000, 3 * 4096, "object", "global"),
    ]
    return GuestImage(segments=[Segment(0x400000, b"", 0x20000, "rw-")], entry=0x400000,
                      symbols={s.name: s for s in syms}, path=Path("guest.elf"))


def bits(*subpages: int) -> int:
    """The access map with exactly ``subpages`` cleared."""
    m = FULL
    for i in subpages:
        m &= ~(1 << i)
    return m


# -- parsing ---------------------------------------------------------------------


def test_start_length_entry_and_default_decision():
    p = parse_policy("""
        [[protect]]
        start = 0x401000
        length = 256
    """)
    assert p.entries == (ProtectEntry("0x401000:0x100", 0x401000, 256, Decision.SKIP),)
    assert p.default_decision is Decision.SKIP
    assert p.access_maps() == {0x401: bits(0, 1)}


def test_empty_policy():
    p = parse_policy("")
    assert len(p) == 0 and not p and p.access_maps() == {}
    assert p.entry_at(0x1000) is None and p.decision_at(0x1000) is None


def test_top_level_and_per_entry_decisions():
    p = parse_policy("""
        decision = "emulate"
        [[protect]]
        name = "a"
        start = 0x1000
        length = 8
        [[protect]]
        name = "b"
        start = 0x2000
        length = 8
        decision = "STOP"
    """)
    assert p.default_decision is Decision.EMULATE
    assert [(e.name, e.decision) for e in p] == [("a", Decision.EMULATE), ("b", Decision.STOP)]


def test_symbol_entries_resolve_against_image():
    p = parse_policy("""
        [[protect]]
        name = "secret key"
        symbol = "secret"
        decision = "stop"
        [[protect]]
        symbol = "secret_backup"       # a local symbol
        offset = 16
        [[protect]]
        symbol = "label"
        length = 0x80
        [[protect]]
        symbol = "big"
        offset = 8
        length = 4
    """, image=fake_image())
    e = p.entries
    assert e[0] == ProtectEntry("secret key", 0x404100, 32, Decision.STOP)
    assert e[1] == ProtectEntry("secret_backup+0x10", 0x405010, 48, Decision.SKIP)
    assert e[2] == ProtectEntry("label", 0x406000, 0x80, Decision.SKIP)
    assert e[3] == ProtectEntry("big+0x8", 0x410008, 4, Decision.SKIP)


def test_load_policy_from_file(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('[[protect]]\nsymbol = "secret"\n')
    p = load_policy(f, image=fake_image())
    assert p.source == str(f) and p.entries[0].start == 0x404100


# -- rounding and access maps ------------------------------------------------------


@pytest.mark.parametrize(
    "start, length, maps",
    [
        (0x1000, 1, {1: bits(0)}),
        (0x1010, 8, {1: bits(0)}),              # inside sub-page 0
        (0x107E, 4, {1: bits(0, 1)}),            # crosses a sub-page boundary
        (0x1080, 128, {1: bits(1)}),             # exactly one sub-page
        (0x1080, 129, {1: bits(1, 2)}),
        (0x1F80, 128, {1: bits(31)}),
        (0x1FF0, 0x20, {1: bits(31), 2: bits(0)}),   # crosses a page boundary
        (0x1000, 0x1000, {1: 0}),
        (0x1F00, 0x1200, {1: bits(30, 31), 2: 0, 3: bits(0, 1)}),
    ],
)
def test_ranges_round_out_to_subpages(start, length, maps):
    assert Policy.from_ranges([(start, length)]).access_maps() == maps


def test_access_maps_combine_entries_on_one_page():
    p = Policy.from_ranges([(0x1000, 8), (0x1800, 8), (0x1F80, 1)])
    assert p.access_maps() == {1: bits(0, 16, 31)}
    assert p.gfns() == [1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4 * 4096), st.integers(1, 3 * 4096)), min_size=1, max_size=6))
def test_access_maps_match_byte_by_byte_model(ranges):
    """Every sub-page containing at least one protected byte is cleared; nothing else."""
    expected: dict[int, int] = {}
    for start, length in ranges:
        for sub in range(start // 128, (start + length - 1) // 128 + 1):
            gfn, i = divmod(sub, 32)
            expected[gfn] = expected.get(gfn, FULL) & ~(1 << i)
    assert Policy.from_ranges(ranges).access_maps() == expected


# -- entry_at / decision_at --------------------------------------------------------


def test_entry_at_uses_rounded_subpages_and_prefers_exact_bytes():
    p = parse_policy("""
        [[protect]]
        name = "a"
        start = 0x1010
        length = 8
        decision = "stop"
        [[protect]]
        name = "b"
        start = 0x1020
        length = 8
        decision = "stop"
    """)
    assert p.entry_at(0x1010).name == "a"
    assert p.entry_at(0x1024).name == "b"          # exact bytes beat rounding
    assert p.entry_at(0x1000).name == "a"          # same sub-page, rounded out
    assert p.entry_at(0x107F).name == "a"
    assert p.entry_at(0x1080) is None              # next sub-page
    assert p.entry_at(0x0FFF) is None
    assert p.decision_at(0x1050) is Decision.STOP
    assert p.decision_at(0x5000) is None


# -- --protect ----------------------------------------------------------------------


def test_parse_protect_arg():
    assert parse_protect_arg("0x1000:256") == (0x1000, 256)
    assert parse_protect_arg(" 4096:0x80 ") == (4096, 128)
    for bad, msg in [("0x1000", "expected START:LENGTH"), ("0x1000:", "expected START:LENGTH"),
                     ("zz:10", "START 'zz' is not an integer"), ("0x1000:ten", "LENGTH 'ten'"),
                     ("0x1000:0", "length 0 must be positive"), ("0x1000:-5", "length -5 must be positive")]:
        with pytest.raises(PolicyError, match=msg) as ei:
            parse_protect_arg(bad)
        assert repr(bad) in str(ei.value)


def test_from_ranges():
    p = Policy.from_ranges([(0x1000, 256), (0x3000, 1)], decision="stop")
    assert [e.decision for e in p] == [Decision.STOP, Decision.STOP]
    assert p.access_maps() == {1: bits(0, 1), 3: bits(0)}
    with pytest.raises(PolicyError, match="range 2: length 0 must be positive"):
        Policy.from_ranges([(0x1000, 1), (0x2000, 0)])
    with pytest.raises(PolicyError, match="unknown decision 'unprotect'; valid decisions: skip, emulate, stop"):
        Policy.from_ranges([(0x1000, 1)], decision="unprotect")


# -- errors -------------------------------------------------------------------------

SRC = "policies/demo.toml"


def error(text: str, image=None) -> str:
    with pytest.raises(PolicyError) as ei:
        parse_policy(text, source=SRC, image=image)
    assert isinstance(ei.value, ValueError)
    msg = str(ei.value)
    assert msg.startswith(SRC + ":"), msg
    return msg


def test_error_unknown_key_names_file_entry_and_key():
    msg = error("""
        [[protect]]
        start = 0x1000
        length = 8
        [[protect]]
        name = "secret key"
        symbol = "secret"
        lenght = 32
    """, image=fake_image())
    assert "[[protect]] entry 2 ('secret key')" in msg
    assert "unknown key 'lenght' (did you mean 'length'?)" in msg


def test_error_unknown_top_level_key():
    msg = error('decison = "skip"\n')
    assert "unknown top-level key 'decison'" in msg
    msg = error('start = 0x1000\nlength = 8\n')
    assert "[[protect]] table" in msg


@pytest.mark.parametrize(
    "body, problem",
    [
        ("length = 8", "missing symbol or start;"),
        ("name = 'x'", "missing symbol or start (with length)"),
        ("start = 0x1000", "missing length (start = 0x1000 given)"),
        ("symbol = 'secret'\nstart = 0x1000", "both symbol ('secret') and start given"),
        ("start = 0x1000\nlength = 0", "length 0 must be positive"),
        ("start = 0x1000\nlength = -8", "length -8 must be positive"),
        ("start = -1\nlength = 8", "start -1 is negative"),
        ("start = '0x1000'\nlength = 8", "start must be an integer"),
        ("start = 0x1000\nlength = true", "length must be an integer"),
        ("start = 0x1000\nlength = 8\noffset = 4", "offset applies only with symbol"),
        ("symbol = 'secret'\noffset = -1", "offset -1 is negative"),
        ("symbol = 'secret'\noffset = 32", "offset 0x20 is past the end of symbol 'secret'"),
        ("symbol = 'label'", "symbol 'label' has size 0; give a length"),
        ("symbol = 'secert'", "unknown symbol 'secert' in guest.elf; close matches: secret"),
        ("symbol = ''", "symbol must be a non-empty string"),
        ("start = 0x1000\nlength = 8\ndecision = 'allow'", "unknown decision 'allow'; valid decisions: skip, emulate, stop"),
        ("start = 0x1000\nlength = 8\ndecision = 'unprotect'", "valid decisions: skip, emulate, stop"),
        ("start = 0x1000\nlength = 8\ndecision = 1", "decision must be a string"),
        ("start = 0xFFFFFFFFFFFFFFFF\nlength = 8", "runs past the 64-bit address space"),
    ],
)
def test_entry_errors(body, problem):
    msg = error(f"[[protect]]\n{body}\n", image=fake_image())
    assert "[[protect]] entry 1" in msg
    assert problem in msg, msg


def test_error_entry_name_is_reported():
    msg = error("[[protect]]\nname = 'my range'\nstart = 1\n")
    assert "[[protect]] entry 1 ('my range'): missing length" in msg


def test_error_symbol_without_image():
    msg = error("[[protect]]\nsymbol = 'secret'\n")
    assert "symbol 'secret' given but no guest ELF" in msg


def test_error_bad_top_level_decision():
    msg = error('decision = "deny"\n')
    assert "unknown decision 'deny'; valid decisions: skip, emulate, stop" in msg


def test_error_toml_syntax_has_line():
    msg = error('[[protect]]\nstart = 0x1000\nlength = = 8\n')
    assert "TOML syntax error" in msg and "line 3" in msg


def test_error_protect_not_a_table_array():
    msg = error('protect = 5\n')
    assert "protect must be an array of tables" in msg


def test_overlap_with_different_decisions_is_an_error():
    msg = error("""
        [[protect]]
        name = "a"
        start = 0x1000
        length = 8
        decision = "stop"
        [[protect]]
        name = "b"
        start = 0x1040
        length = 8
        decision = "skip"
    """)
    # Byte ranges are disjoint but share sub-page 0x1000-0x1080.
    assert "[[protect]] entry 1 ('a') and entry 2 ('b') overlap with different decisions" in msg
    assert "(stop vs skip)" in msg and "[0x1000, 0x1080)" in msg


def test_overlap_with_same_decision_is_fine_and_neighbours_may_differ():
    p = parse_policy("""
        [[protect]]
        start = 0x1000
        length = 0x100
        [[protect]]
        start = 0x1080
        length = 8
        [[protect]]
        start = 0x1100
        length = 8
        decision = "stop"
    """)
    assert p.access_maps() == {1: bits(0, 1, 2)}
    assert p.decision_at(0x1100) is Decision.STOP and p.decision_at(0x10FF) is Decision.SKIP


def test_load_policy_errors_name_the_path(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[[protect]]\nstart = 0x1000\n')
    with pytest.raises(PolicyError, match=rf"^{f}: \[\[protect\]\] entry 1: missing length"):
        load_policy(f)
    with pytest.raises(PolicyError, match=rf"{tmp_path / 'none.toml'}: cannot read a policy file"):
        load_policy(tmp_path / "none.toml")


# -- the page limit ---------------------------------------------------------------------

LIMIT = "a policy protects at most 4,194,304 pages (16,384 MiB)"
OVER = (MAX_PROTECTED_PAGES + 1) << 12   # one page more than the limit
HALF = (MAX_PROTECTED_PAGES // 2) << 12


def test_error_huge_entry_names_entry_and_limit():
    msg = error(f"[[protect]]\nstart = 0x1000\nlength = 8\n[[protect]]\nname = 'all'\nstart = 0\nlength = {OVER:#x}\n")
    assert "[[protect]] entry 2 ('all'): range 0x0+0x400001000 covers 4,194,305 pages; " + LIMIT in msg, msg
    msg = error("[[protect]]\nstart = 0\nlength = 0x10000000000\n")          # 1 TiB
    assert "entry 1 ('0x0:0x10000000000'): range 0x0+0x10000000000 covers 268,435,456 pages; " + LIMIT in msg, msg
    msg = error("[[protect]]\nstart = 0\nlength = 0x10000000000000000\n")    # the whole 64-bit space
    assert "entry 1 ('0x0:0x10000000000000000'): range 0x0+0x10000000000000000 covers" in msg and LIMIT in msg, msg


def test_error_huge_symbol_entry_names_the_symbol():
    msg = error(f"[[protect]]\nsymbol = 'label'\nlength = {OVER:#x}\n", image=fake_image())
    assert "[[protect]] entry 1 ('label'): range 0x406000+0x400001000 covers 4,194,305 pages; " + LIMIT in msg, msg


@pytest.mark.parametrize("entry, problem", [
    ("symbol = 'big'\nlength = 0x3001", "0x0+0x3001 runs past the end of symbol 'big' (size 0x3000)"),
    ("symbol = 'secret'\noffset = 100000\nlength = 8", "0x186a0+0x8 runs past the end of symbol 'secret' (size 0x20)"),
    ("symbol = 'secret'\noffset = 0x20", "offset 0x20 is past the end of symbol 'secret' (size 0x20)"),
])
def test_a_symbol_entry_stays_inside_its_symbol(entry, problem):
    """SYMBOL[+OFFSET][:LENGTH] protects bytes of that symbol: bytes past its end were
    accepted silently and protected whatever lay after it (one rule, policy.symbol_span,
    for policies, monitor --protect-symbols and replay --protect).  A size-0 symbol (a
    label) is not bounded."""
    msg = error(f"[[protect]]\n{entry}\n", image=fake_image())
    assert problem in msg, msg
    (e,) = parse_policy("[[protect]]\nsymbol = 'label'\nlength = 0x100\n", image=fake_image()).entries
    assert (e.start, e.length) == (0x406000, 0x100)


def test_error_entries_over_the_limit_in_total():
    msg = error(f"""
        [[protect]]
        name = "a"
        start = 0
        length = {HALF:#x}
        [[protect]]
        name = "b"
        start = {HALF:#x}
        length = {HALF:#x}
        [[protect]]
        name = "c"
        start = 0x10000000000
        length = 1
    """)
    assert ("[[protect]] entry 3 ('c'): range 0x10000000000+0x1 (1 page) brings the entries so far to "
            "4,194,305 pages (overlaps count once per entry); " + LIMIT) in msg, msg


def test_load_policy_huge_entry_names_the_path(tmp_path):
    f = tmp_path / "huge.toml"
    f.write_text("[[protect]]\nstart = 0\nlength = 0x10000000000\n")
    with pytest.raises(PolicyError, match=rf"^{f}: \[\[protect\]\] entry 1 .*covers 268,435,456 pages; a policy "
                                          r"protects at most 4,194,304 pages"):
        load_policy(f)


def test_from_ranges_huge_range_names_range_and_limit():
    with pytest.raises(PolicyError) as ei:
        Policy.from_ranges([(0x1000, 8), (0, 0x10000000000)])
    assert str(ei.value) == "--protect: range 2: range 0x0+0x10000000000 covers 268,435,456 pages; " + LIMIT
    with pytest.raises(PolicyError) as ei:
        Policy.from_ranges([(0, HALF), (0x1000, HALF + 1)], source="guards")   # overlaps count per entry
    assert str(ei.value).startswith("guards: range 2: range 0x1000+0x200000001 (2,097,153 pages) brings the "
                                     "entries so far to 4,194,305 pages")
    assert LIMIT in str(ei.value)


def test_direct_construction_checks_the_limit():
    with pytest.raises(PolicyError, match=r"^s: \[\[protect\]\] entry 1 \('x'\): range 0x0\+0x400001000 covers"):
        Policy([ProtectEntry("x", 0, OVER, Decision.SKIP)], source="s")


def test_page_limit_boundary(monkeypatch):
    monkeypatch.setattr(policy_mod, "MAX_PROTECTED_PAGES", 4)
    assert Policy.from_ranges([(0, 4 << 12)]).gfns() == [0, 1, 2, 3]              # exactly the limit
    assert len(Policy.from_ranges([(0, 2 << 12), (0x10000, 2 << 12)]).gfns()) == 4
    with pytest.raises(PolicyError, match="range 1: range 0x80\\+0x4000 covers 5 pages; a policy protects at most 4 "):
        Policy.from_ranges([(0x80, 4 << 12)])                                       # rounded out: 5 pages
    with pytest.raises(PolicyError, match="range 2: .* brings the entries so far to 6 pages"):
        Policy.from_ranges([(0, 3 << 12), (0, 3 << 12)])


def test_huge_ranges_fail_fast_in_bounded_memory(tmp_path):
    """The fuzzer's cases, in a child with a timeout and an address-space cap: refused
    before any per-page work (a per-page index of 1 TiB took minutes and tens of GB)."""
    resource = pytest.importorskip("resource")
    f = tmp_path / "huge.toml"
    f.write_text("[[protect]]\nstart = 0\nlength = 0x10000000000\n")
    code = textwrap.dedent(f"""
        from sppkit.policy import Policy, PolicyError, load_policy, parse_policy
        for make in (lambda: load_policy({str(f)!r}),
                     lambda: parse_policy("[[protect]]\\nstart = 0\\nlength = 0x10000000000000000\\n"),
                     lambda: Policy.from_ranges([(0, 1 << 64)]),
                     lambda: Policy.from_ranges([(i << 34, 1 << 34) for i in range(1000)])):
            try:
                make()
            except PolicyError as e:
                assert "a policy protects at most 4,194,304 pages" in str(e), e
            else:
                raise AssertionError("no PolicyError")
        print("ok")
    """)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, preexec_fn=cap)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# -- with a real guest ---------------------------------------------------------------

OK, REASON = toolchain_status()


@pytest.mark.skipif(not OK, reason=REASON)
def test_policy_for_mixed_guest_protects_only_the_secret_subpages(tmp_path):
    elf = build_guest("mixed", cache_dir=tmp_path)
    f = tmp_path / "mixed.toml"
    f.write_text("""
        decision = "skip"
        [[protect]]
        name = "secret key"
        symbol = "secret"
        decision = "stop"
        [[protect]]
        symbol = "config"
        [[protect]]
        symbol = "canary"
    """)
    p = load_policy(f, image=elf)   # an ELF path is loaded for you
    im = load_elf(elf)
    maps = p.access_maps()
    assert set(maps) == {im.symbol(n).addr >> 12 for n in ("secret", "config", "canary")}
    assert maps[im.symbol("secret").addr >> 12] == bits(2)      # keys_page sub-page 2
    assert maps[im.symbol("config").addr >> 12] == bits(0)
    assert maps[im.symbol("canary").addr >> 12] == bits(16)
    for hot in ("hot", "stats", "ring", "scratch", "tail"):
        s = im.symbol(hot)
        assert p.entry_at(s.addr) is None and p.entry_at(s.end - 1) is None, hot
    assert p.decision_at(im.symbol("secret").addr + 0x7F) is Decision.STOP
    assert p.entry_at(im.symbol("secret").addr).name == "secret key"


# -- fuzz-found input errors ---------------------------------------------------------


@pytest.mark.parametrize("text", [
    "a = " + "[" * 5000 + "]" * 5000,
    "a = " + "{b = " * 3000 + "1" + "}" * 3000,
])
def test_deeply_nested_toml_is_a_policy_error(text):
    msg = error(text)
    assert "nested too deeply" in msg


def test_integer_with_thousands_of_digits_is_a_policy_error():
    msg = error("[[protect]]\nstart = " + "9" * 5000 + "\nlength = 1\n")
    assert "thousands of digits" in msg


def test_parse_policy_takes_utf8_bytes_and_refuses_other_types():
    assert parse_policy(b"[[protect]]\nstart = 0x1000\nlength = 8\n").entries[0].start == 0x1000
    with pytest.raises(PolicyError, match=r"f.toml: not UTF-8 text: byte 10 is b.\\xff."):
        parse_policy(b"# comment \xff\n", source="f.toml")
    with pytest.raises(PolicyError, match="a policy is TOML text .* got NoneType"):
        parse_policy(None)  # type: ignore[arg-type]


def test_load_policy_refuses_devices_without_reading():
    # /dev/null stands for every non-regular file: /dev/zero or a FIFO without a writer
    # would never finish reading, so none is opened for a blocking read.
    with pytest.raises(PolicyError, match="/dev/null: not a regular file"):
        load_policy("/dev/null")


def test_load_policy_directory_and_bad_paths(tmp_path):
    with pytest.raises(PolicyError, match=rf"{tmp_path}: is a directory"):
        load_policy(tmp_path)
    with pytest.raises(PolicyError, match="embedded null byte"):
        load_policy("a\0b.toml")
    with pytest.raises(PolicyError, match="policy path must be a file path .* got NoneType"):
        load_policy(None)  # type: ignore[arg-type]


def test_load_policy_non_utf8_names_the_line(tmp_path):
    p = tmp_path / "p.toml"
    p.write_bytes(b"[[protect]]\nname = 'caf\xe9'\n")
    with pytest.raises(PolicyError, match=rf"{p}: not UTF-8 text: line 2"):
        load_policy(p)


def test_load_policy_oversized_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(policy_mod, "MAX_POLICY_SIZE", 16)
    p = tmp_path / "p.toml"
    p.write_text("[[protect]]\nstart = 0x1000\nlength = 8\n")
    with pytest.raises(PolicyError, match=rf"{p}: .* more than sppkit reads for a policy file"):
        load_policy(p)


def test_load_policy_unloadable_image_path_is_a_policy_error(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text("[[protect]]\nsymbol = 'secret'\n")
    with pytest.raises(PolicyError, match=rf"{p}: cannot load the guest image .*missing.elf: cannot read"):
        load_policy(p, image=tmp_path / "missing.elf")


def test_range_arg_and_from_ranges_refuse_wrong_types():
    with pytest.raises(PolicyError, match="--protect: expected START:LENGTH text.*got NoneType"):
        parse_protect_arg(None)  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="--protect: ranges must be an iterable of .*got int 5"):
        Policy.from_ranges(5)  # type: ignore[arg-type]


def test_many_entries_on_one_page_parse_in_linear_time():
    # The overlap check compared each entry with every earlier overlapping one:
    # 20,000 entries on one sub-page took over a minute.  Counted, not timed.
    n = 3_000
    text = "[[protect]]\nstart = 0x1000\nlength = 1\n" * n
    calls = 0
    real = ProtectEntry.sub_end.fget

    def counting(self):
        nonlocal calls
        calls += 1
        return real(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ProtectEntry, "sub_end", property(counting))
        p = parse_policy(text)
    assert len(p) == n
    assert calls < 40 * n, calls


def test_overlap_found_among_many_same_decision_entries():
    text = "[[protect]]\nstart = 0x1000\nlength = 0x80\n" * 50
    text += "[[protect]]\nstart = 0x2000\nlength = 0x80\n[[protect]]\nname = 'late'\nstart = 0x1040\nlength = 4\ndecision = 'stop'\n"
    msg = error(text)
    assert "[[protect]] entry 1 ('0x1000:0x80') and entry 52 ('late') overlap with different decisions (skip vs stop)" in msg
    assert "[0x1000, 0x1080)" in msg


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(
    st.sampled_from(["name", "symbol", "start", "offset", "length", "decision", "strat"]),
    st.one_of(st.booleans(), st.integers(-2**65, 2**65), st.floats(allow_nan=False, allow_infinity=False),
              st.sampled_from(["secret", "label", "big", "nosuch", "skip", "stop", "Emulate", "deny", ""])),
    max_size=6), max_size=4))
def test_fuzzed_entries_give_a_policy_or_a_policy_error(entries):
    def lit(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f'"{v}"'
        return repr(v)
    text = "".join("[[protect]]\n" + "".join(f"{k} = {lit(v)}\n" for k, v in e.items()) for e in entries)
    try:
        parse_policy(text, source="f.toml", image=fake_image()).access_maps()
    except PolicyError as e:
        assert str(e).startswith("f.toml: ") and "Traceback" not in str(e)


def test_a_symbol_of_a_stripped_image_says_it_has_no_symbol_table():
    """A stripped ELF used to give only "unknown symbol 'secret'"."""
    bare = GuestImage(segments=[Segment(0x400000, b"", 0x20000, "rw-")], entry=0x400000, symbols={},
                      path=Path("guest.elf"))
    msg = error("[[protect]]\nsymbol = 'secret'\n", image=bare)
    assert "unknown symbol 'secret' in guest.elf; it has no symbol table (stripped?)" in msg, msg


def test_a_byte_order_mark_is_ignored():
    """Some editors start UTF-8 files with a byte-order mark: it was "TOML syntax error:
    Invalid statement (at line 1, column 1)", which does not say why."""
    text = "[[protect]]\nstart = 0x1000\nlength = 8\n"
    for doc in ("\ufeff" + text, ("\ufeff" + text).encode()):
        (e,) = parse_policy(doc, source=SRC).entries
        assert (e.start, e.length) == (0x1000, 8)
