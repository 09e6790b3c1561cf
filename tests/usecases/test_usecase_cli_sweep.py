"""A sweep of the five use-case commands — `sppkit monitor`, `device`, `checkpoint`,
`restore` and `guard` — through the real `sppkit` group, as a user meets them:

* a bad value for any option is ONE line ``sppkit: error: ...`` on stderr naming the
  option and the problem, a non-zero exit status, nothing on stdout, no traceback;
* `restore` of a damaged set names the damaged file and changes nothing in the set;
  a checkpoint that fails leaves --out as it was;
* every option's --help says what it does and its default; every command has examples;
* --json prints one JSON object and nothing else on stdout.

Everything runs on the Unicorn engine.  Option checks need no guest; the rest build the
bundled guests with gcc (cached) and skip, with the reason, where gcc is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from sppkit.cli import main
from sppkit.usecases import checkpoint as C
from sppkit.usecases import guard as G
from sppkit.usecases import monitor as M

from usecase_engines import needs_gcc

U = ["--engine", "unicorn"]
COMMANDS = ["monitor", "device", "checkpoint", "restore", "guard"]
HUGE = str(2**64)


def invoke(args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def assert_one_line_error(r, *needles, code=2):
    """``r`` failed the way a user error must: one line, the needles in it, no traceback."""
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == code, (r.exit_code, r.output)
    assert r.stdout == "", r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sppkit: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def p(case_id, args, *needles):
    return pytest.param(args, needles, id=case_id)


# ====================================================================== option values (no guest needed)
# Checked before any guest is built or run.  "fix:" marks a case that was accepted, crashed or was
# misreported before this sweep; the other cases also pin wording that now names the option.
OPTION_CASES = [
    # --timeout, every command: finite, 0..a year (larger overflowed the engines' timers: a traceback)
    *[p(f"{c}-timeout-{name}", [c, *extra, *U, "--timeout", v], "'--timeout'", shown)
      for c, extra in (("monitor", []), ("device", []), ("guard", ["guard_bufs"]),
                       ("checkpoint", ["ckpt_log", "--at-port-signal", "--out", "{d}/out"]),
                       ("restore", ["{d}/none", "--resume"]))
      for name, v, shown in (("nan", "nan", "nan: must be a finite"), ("negative", "-1", "-1.0: must be"),
                             ("inf", "inf", "inf: must be a finite"),
                             ("fix:over-a-year", "1e300", "1e+300: must be a finite number of seconds from 0 "
                                                          "to 31536000"))],
    p("monitor-timeout-empty", ["monitor", *U, "--timeout", ""], "'--timeout'", "'' is not a valid float"),
    p("monitor-timeout-text", ["monitor", *U, "--timeout", "abc"], "'--timeout'", "'abc'"),
    # monitor
    p("monitor-ticks-zero", ["monitor", *U, "--ticks", "0"], "'--ticks'", "0 is not in the range 1<=x<=10000000"),
    p("monitor-ticks-negative", ["monitor", *U, "--ticks", "-1"], "'--ticks'", "-1 is not in the range"),
    p("monitor-ticks-huge", ["monitor", *U, "--ticks", HUGE], "'--ticks'", f"{HUGE} is not in the range"),
    p("monitor-ticks-text", ["monitor", *U, "--ticks", "abc"], "'--ticks'", "'abc'"),
    p("monitor-ticks-empty", ["monitor", *U, "--ticks", ""], "'--ticks'", "''"),
    p("monitor-engine", ["monitor", "--engine", "bogus"], "'--engine'", "'bogus' is not one of"),
    p("monitor-cpl", ["monitor", *U, "--cpl", "1"], "'--cpl'", "'1' is not one of '0', '3'"),
    p("monitor-decision", ["monitor", *U, "--decision", "unprotect"], "'--decision'", "'unprotect'"),
    p("monitor-policy-missing", ["monitor", *U, "--policy", "{d}/none.toml"], "'--policy'", "does not exist"),
    p("monitor-policy-directory", ["monitor", *U, "--policy", "{d}"], "'--policy'", "is a directory"),
    # device
    p("device-cpl", ["device", *U, "--cpl", "2"], "'--cpl'", "'2'"),
    p("device-engine", ["device", "--engine", "qemu"], "'--engine'", "'qemu'"),
    # checkpoint
    p("checkpoint-out-missing", ["checkpoint", "ckpt_log", *U, "--at-port-signal"], "Missing option '--out'"),
    p("checkpoint-no-trigger", ["checkpoint", "ckpt_log", *U, "--out", "{d}/out"],
      "give --every N (tracked writes) or --at-port-signal"),
    p("checkpoint-every-zero", ["checkpoint", "ckpt_log", *U, "--every", "0", "--out", "{d}/out"],
      "--every '0': must be a positive number of writes"),
    p("checkpoint-every-negative", ["checkpoint", "ckpt_log", *U, "--every", "-5", "--out", "{d}/out"],
      "--every '-5': must be a positive"),
    p("checkpoint-every-text", ["checkpoint", "ckpt_log", *U, "--every", "nan", "--out", "{d}/out"],
      "--every 'nan': expected a number of writes"),
    p("checkpoint-every-empty", ["checkpoint", "ckpt_log", *U, "--every", "", "--out", "{d}/out"],
      "--every '': expected a number of writes"),
    p("fix:checkpoint-port-without-at-port-signal",
      ["checkpoint", "ckpt_log", *U, "--every", "5", "--port", "0xf6", "--out", "{d}/out"],
      "--port applies to --at-port-signal"),
    p("fix:checkpoint-port-console-shown-in-hex",
      ["checkpoint", "ckpt_log", *U, "--at-port-signal", "--port", "0xe9", "--out", "{d}/out"],
      "--port 0xe9: must be 0x0..0xffff and not 0xe9/0xf4"),
    p("checkpoint-port-negative", ["checkpoint", "ckpt_log", *U, "--at-port-signal", "--port", "-1", "--out", "{d}/out"],
      "--port -0x1: must be 0x0..0xffff"),
    p("checkpoint-port-huge", ["checkpoint", "ckpt_log", *U, "--at-port-signal", "--port", "0x10000", "--out", "{d}/out"],
      "--port 0x10000: must be"),
    p("checkpoint-port-text", ["checkpoint", "ckpt_log", *U, "--at-port-signal", "--port", "xyz", "--out", "{d}/out"],
      "--port 'xyz': not an integer"),
    p("checkpoint-port-empty", ["checkpoint", "ckpt_log", *U, "--at-port-signal", "--port", "", "--out", "{d}/out"],
      "--port '': not an integer"),
    *[p(f"fix:checkpoint-memory-{name}", ["checkpoint", "ckpt_log", *U, "--at-port-signal", "--memory", v,
                                          "--out", "{d}/out"], "'--memory'", shown)
      for name, v, shown in (("zero", "0", "'0': must be positive"), ("negative", "-1", "'-1': must be positive"),
                             ("empty", "", "'': expected a number with an optional K/M/G suffix"),
                             ("text", "abc", "'abc': expected a number"), ("terabyte", "1T", "'1T': expected"),
                             ("kib", "1K", "must be a multiple of 2 MiB from 2 MiB to 512 GiB"),
                             ("odd-mib", "3M", "must be a multiple of 2 MiB"), ("huge", HUGE, "multiple of 2 MiB"))],
    *[p(f"fix:checkpoint-track-{name}", ["checkpoint", "ckpt_log", *U, "--at-port-signal", "--track", v,
                                         "--out", "{d}/out"], f"--track {v!r}", shown)
      for name, v, shown in (("empty", "", "expected START:LENGTH"), ("no-length", "5", "expected START:LENGTH"),
                             ("negative-start", "-1:5", "start -1 is negative"),
                             ("zero-length", "0x500000:0", "length 0 must be positive"),
                             ("negative-length", "0x500000:-1", "length -1 must be positive"),
                             ("text", "a:0x10", "START 'a' is not an integer"))],
    p("checkpoint-cpl", ["checkpoint", "ckpt_log", *U, "--at-port-signal", "--cpl", "1", "--out", "{d}/out"], "'--cpl'"),
    p("checkpoint-out-is-a-file", ["checkpoint", "ckpt_log", *U, "--at-port-signal", "--out", "{d}/afile"],
      "'--out'", "is a file"),
    p("fix:checkpoint-out-empty", ["checkpoint", "ckpt_log", *U, "--at-port-signal", "--out", ""],
      "--out '': an empty path"),
    p("fix:checkpoint-out-under-a-file", ["checkpoint", "ckpt_log", *U, "--at-port-signal", "--out",
                                          "{d}/afile/set"], "--out {d}/afile/set: {d}/afile is not a directory"),
    # restore
    p("restore-to-text", ["restore", "{d}/none", "--to", "abc"], "'--to'", "'abc' is not a valid integer"),
    p("restore-to-empty", ["restore", "{d}/none", "--to", ""], "'--to'"),
    p("fix:restore-timeout-checked-without-resume", ["restore", "{d}/none", "--timeout", "nan"],
      "'--timeout'", "nan: must be a finite number"),
    p("restore-no-directory", ["restore", "{d}/none"], "{d}/none: no such directory"),
    p("restore-a-file", ["restore", "{d}/afile"], "{d}/afile is not a directory"),
    p("fix:restore-empty-path", ["restore", ""], "DIRECTORY '': an empty path"),
    # guard
    p("guard-guest-missing", ["guard", *U], "Missing argument 'GUEST'"),
    p("guard-buffers-text", ["guard", "guard_bufs", *U, "--buffers", "abc"], "'--buffers'", "'abc'"),
    p("guard-buffers-empty", ["guard", "guard_bufs", *U, "--buffers", ""], "'--buffers'"),
    p("guard-decision", ["guard", "guard_bufs", *U, "--decision", "emulate"], "'--decision'", "'emulate'"),
    p("fix:guard-memory-zero", ["guard", "guard_bufs", *U, "--memory", "0"], "'--memory'", "'0': must be positive"),
    p("fix:guard-memory-odd", ["guard", "guard_bufs", *U, "--memory", "3M"], "'--memory'", "multiple of 2 MiB"),
]


@pytest.mark.parametrize("args, needles", OPTION_CASES)
def test_bad_option_is_one_line(tmp_path, args, needles):
    """{d}: a fresh directory holding only the file `afile`; nothing may be created in it."""
    (tmp_path / "afile").write_text("x")
    fill = [str(a).replace("{d}", str(tmp_path)) for a in args]
    assert_one_line_error(invoke(fill), *(n.replace("{d}", str(tmp_path)) for n in needles))
    assert [x.name for x in tmp_path.iterdir()] == ["afile"]


def test_restore_empty_directory_is_not_a_set(tmp_path):
    assert_one_line_error(invoke(["restore", tmp_path]), f"{tmp_path} is not an sppkit checkpoint set: "
                                                         "it has no manifest.json")


# ====================================================================== values that need the guest
@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep")
    (d / "garbage.toml").write_text("garbage\n")
    (d / "empty.toml").write_text("")
    (d / "outside.toml").write_text("[[protect]]\nstart = 0x10000000\nlength = 8\n")
    (d / "notelf.bin").write_bytes(b"not an ELF")
    (d / "adir").mkdir()
    (d / "nonempty").mkdir()
    (d / "nonempty" / "keep").write_text("x")
    return d


GUEST_CASES = [
    # monitor
    p("monitor-symbols-empty", ["monitor", *U, "--protect-symbols", ""], "--protect-symbols: no symbol given"),
    p("monitor-symbols-commas", ["monitor", *U, "--protect-symbols", ",,,"], "--protect-symbols: no symbol given"),
    p("monitor-symbols-unknown", ["monitor", *U, "--protect-symbols", "idtt"], "unknown symbol 'idtt'",
      "close matches: idt"),
    p("monitor-symbols-offset-past-end", ["monitor", *U, "--protect-symbols", "idt+0x99999999"],
      "'idt+0x99999999': offset 0x99999999 is past the end of symbol 'idt'"),
    p("monitor-symbols-zero-length", ["monitor", *U, "--protect-symbols", "idt:0"], "'idt:0': length 0 must be positive"),
    p("fix:monitor-symbols-huge-length", ["monitor", *U, "--protect-symbols", f"idt:{HUGE}"],
      "--protect-symbols: 'idt:18446744073709551616': 0x0+0x10000000000000000 runs past the end of symbol 'idt'"),
    p("monitor-symbols-and-policy", ["monitor", *U, "--protect-symbols", "idt", "--policy", "{d}/garbage.toml"],
      "give --protect-symbols or --policy, not both"),
    # --decision was accepted and ignored: the JSON said "stop", every watch skipped
    p("fix:monitor-policy-and-decision", ["monitor", *U, "--policy", "{d}/garbage.toml", "--decision", "stop"],
      "--decision applies to --protect-symbols (a --policy file states its own decisions)"),
    p("monitor-policy-syntax", ["monitor", *U, "--policy", "{d}/garbage.toml"], "garbage.toml: TOML syntax error"),
    p("monitor-policy-empty", ["monitor", *U, "--policy", "{d}/empty.toml"], "empty.toml: the policy protects nothing"),
    p("fix:monitor-policy-outside-ram", ["monitor", *U, "--policy", "{d}/outside.toml"],
      "--policy {d}/outside.toml: watch '0x10000000:0x8'", "lies outside guest RAM"),
    p("monitor-guest-missing", ["monitor", "{d}/none", *U], "guest '{d}/none' is neither a file nor"),
    p("monitor-guest-empty", ["monitor", "", *U], "guest '' is neither a file nor"),
    p("monitor-guest-directory", ["monitor", "{d}/adir", *U], "adir: is a directory, not an ELF file"),
    p("monitor-guest-not-elf", ["monitor", "{d}/notelf.bin", *U], "notelf.bin: not an ELF file"),
    p("monitor-guest-without-defaults", ["monitor", "mixed", *U], "say what to watch: --protect-symbols"),
    # device
    p("fix:device-page-empty", ["device", *U, "--page", ""], "--page '': an empty value"),
    p("fix:device-page-negative", ["device", *U, "--page", "-1"], "--page '-1': -0x1 is negative"),
    p("device-page-huge", ["device", *U, "--page", HUGE], f"--page '{HUGE}'", "outside guest RAM"),
    p("device-page-beyond-ram", ["device", *U, "--page", "0x4000000"], "outside guest RAM [0x0, 0x4000000)"),
    p("fix:device-page-unaligned", ["device", *U, "--page", "0x1001"], "--page: 0x1001 is not 4-KiB aligned",
      "0x1000 or 0x2000"),
    p("fix:device-page-unaligned-symbol", ["device", *U, "--page", "message"], "--page 'message': 0x",
      "is not 4-KiB aligned"),
    p("fix:device-page-on-page-tables", ["device", *U, "--page", "0x1000"],
      "--page: page 0x1000 holds the engine's page tables [0x1000, 0x4000)"),
    p("fix:device-page-on-code", ["device", *U, "--page", "0x400000"],
      "--page: page 0x400000 holds the guest's read-only segment [0x400000,"),
    p("device-page-unknown-symbol", ["device", *U, "--page", "devpg"], "--page: unknown symbol 'devpg'",
      "close matches: devpage"),
    p("device-guest-without-devpage", ["device", "minikernel", *U], "--page: unknown symbol 'devpage'"),
    p("device-guest-missing", ["device", "{d}/none", *U], "guest '{d}/none' is neither"),
    # checkpoint
    p("checkpoint-out-not-empty", ["checkpoint", "ckpt_log", *U, "--at-port-signal", "--out", "{d}/nonempty"],
      "--out {d}/nonempty: directory is not empty"),
    p("fix:checkpoint-every-huge", ["checkpoint", "ckpt_log", *U, "--every", HUGE, "--out", "{o}"],
      f"--every {HUGE}: more than the 992 tracked sub-pages", "give at most 992"),
    p("fix:checkpoint-every-one-too-many", ["checkpoint", "ckpt_log", *U, "--every", "993", "--out", "{o}"],
      "--every 993: more than the 992 tracked sub-pages"),
    p("checkpoint-track-page-tables", ["checkpoint", "ckpt_log", *U, "--at-port-signal", "--track", "0x1000:0x10",
                                       "--out", "{o}"], "--track 0x1000:0x10 overlaps the guest's page tables"),
    p("checkpoint-track-beyond-ram", ["checkpoint", "ckpt_log", *U, "--at-port-signal", "--track",
                                      "0x500000:0x100000000", "--out", "{o}"],
      "--track 0x500000:0x100000000 ends beyond guest RAM"),
    p("checkpoint-track-past-2**64", ["checkpoint", "ckpt_log", *U, "--at-port-signal", "--track",
                                      f"0x500000:{HUGE}", "--out", "{o}"],
      f"--track '0x500000:{HUGE}': range 0x500000+0x10000000000000000 runs past the 64-bit address space"),
    p("checkpoint-memory-too-small", ["checkpoint", "ckpt_log", *U, "--at-port-signal", "--memory", "2M",
                                      "--out", "{o}"], "lies beyond guest RAM (2 MiB)"),
    p("checkpoint-guest-directory", ["checkpoint", "{d}/adir", *U, "--at-port-signal", "--out", "{o}"],
      "adir' is neither a file"),
    # guard
    p("guard-buffers-zero", ["guard", "guard_bufs", *U, "--buffers", "0"], "--buffers 0: at least one buffer"),
    p("guard-buffers-negative", ["guard", "guard_bufs", *U, "--buffers", "-1"], "--buffers -1: must be a non-negative"),
    p("guard-buffers-over-capacity", ["guard", "guard_bufs", *U, "--buffers", "513"],
      "--buffers 513: the guest's guard table holds at most 512 buffers"),
    p("fix:guard-buffers-huge", ["guard", "guard_bufs", *U, "--buffers", HUGE],
      f"--buffers {HUGE}: the guest's guard table holds at most 512 buffers"),
    p("guard-overflow-buffer-negative", ["guard", "guard_bufs", *U, "--overflow-buffer", "-1"],
      "--overflow-buffer -1: must be a non-negative integer"),
    p("fix:guard-overflow-buffer-huge", ["guard", "guard_bufs", *U, "--overflow-buffer", HUGE],
      f"--overflow-buffer {HUGE}: there are only 64 buffers (0..63)"),
    p("guard-overflow-by-too-far", ["guard", "guard_bufs", *U, "--overflow-by", "4097"],
      "--overflow-by 4097: at most 4096 bytes"),
    p("fix:guard-overflow-by-huge", ["guard", "guard_bufs", *U, "--overflow-by", HUGE],
      f"--overflow-by {HUGE}: at most 4096 bytes"),
    p("guard-memory-too-small", ["guard", "guard_bufs", *U, "--memory", "4M"], "use --memory 6M or more"),
    p("guard-guest-without-table", ["guard", "ckpt_log", *U], "no 'guard_table' symbol"),
    p("guard-param-on-other-guest", ["guard", "ckpt_log", *U, "--buffers", "3"],
      "--buffers: ", "has no 'param_nbuffers' to set"),
    p("guard-guest-missing", ["guard", "{d}/none", *U], "guest '{d}/none' is neither"),
]


@needs_gcc
@pytest.mark.parametrize("args, needles", GUEST_CASES)
def test_bad_value_for_a_guest_is_one_line(sweep_dir, tmp_path, args, needles):
    """{d}: files shared by the cases (never written); {o}: this case's --out, which a
    refused checkpoint must not create."""
    out = tmp_path / "new"

    def fill(text):
        return str(text).replace("{d}", str(sweep_dir)).replace("{o}", str(out))

    assert_one_line_error(invoke([fill(a) for a in args]), *(fill(n) for n in needles))
    assert not out.exists()
    assert sorted(x.name for x in (sweep_dir / "nonempty").iterdir()) == ["keep"]


def test_guard_value_that_does_not_fit_a_narrow_guest_variable(monkeypatch):
    """The width check comes last: a value within every limit can still not fit a guest's
    narrower parameter variable (here param_overflow_by as a u8)."""
    from sppkit.guests import build_guest, load_elf

    from usecase_engines import GCC_OK, GCC_WHY

    if not GCC_OK:
        pytest.skip(GCC_WHY)
    image = load_elf(build_guest("guard_bufs"))
    image.symbols["param_overflow_by"] = dataclasses.replace(image.symbols["param_overflow_by"], size=1)
    with pytest.raises(G.GuardError, match=r"--overflow-by 300: does not fit .*1-byte variable, at most 255"):
        G._check_params(image, None, None, 300)
    G._check_params(image, None, None, 255)


# ====================================================================== checkpoints: what a failure leaves
@needs_gcc
@pytest.mark.parametrize("existing", [False, True], ids=["new-out", "empty-out"])
def test_failed_base_checkpoint_leaves_out_as_it_was(tmp_path, monkeypatch, existing):
    """fix: a write failing before the base checkpoint was complete left guest.elf behind:
    the set was unusable and a retry was refused (directory not empty)."""
    out = tmp_path / "set"
    if existing:
        out.mkdir()
    real = os.replace

    def full_disk(src, dst):
        if str(dst).endswith("ckpt-000000.spck"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    r = invoke(["checkpoint", "ckpt_log", *U, "--at-port-signal", "--out", out])
    line = assert_one_line_error(r, "cannot write", "ckpt-000000.spck: No space left on device")
    assert "[Errno" not in line
    assert (sorted(out.iterdir()) == []) if existing else not out.exists()
    monkeypatch.setattr(os, "replace", real)
    r = invoke(["checkpoint", "ckpt_log", *U, "--at-port-signal", "--out", out, "--json"])  # the retry works
    assert r.exit_code == 0, r.output


@needs_gcc
def test_a_failed_journal_append_leaves_a_usable_set(tmp_path, monkeypatch):
    """A full disk while checkpoint 3's line is appended: the command fails in one line
    naming the journal, the half-written line is cut off, and the set restores its
    checkpoints 0..2."""
    out = tmp_path / "set"
    real = os.write
    lines = [0]

    def full_disk(fd, data):
        if bytes(data[:2]) == b'{"':  # a journal line
            lines[0] += 1
            if lines[0] == 4:
                real(fd, bytes(data[:10]))
                raise OSError(28, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    r = invoke(["checkpoint", "ckpt_log", *U, "--at-port-signal", "--out", out])
    assert_one_line_error(r, "cannot append to", "checkpoints.jsonl: No space left on device")
    monkeypatch.setattr(os, "write", real)
    journal = (out / "checkpoints.jsonl").read_bytes()
    assert journal.endswith(b"\n") and journal.count(b"\n") == 3
    cs = C.open_checkpoint_set(out)
    assert len(cs) == 3 and cs.torn_line is None
    assert C.restore_checkpoint(out, 2).verified


@needs_gcc
def test_a_checkpoint_appends_one_journal_line(tmp_path, monkeypatch):
    """fix: the whole manifest (every checkpoint's entry) was rewritten at every
    checkpoint: about 8 MB per checkpoint at 25,000.  The manifest is now written once
    and each checkpoint appends one line to checkpoints.jsonl: what a checkpoint writes
    does not grow with the set."""
    writes: list[tuple[str, int]] = []
    real_atomic, real_append = C.atomic_write, C._append

    def atomic(path, data):
        writes.append((Path(path).name, len(data)))
        return real_atomic(path, data)

    def append(path, line):
        writes.append((Path(path).name + "+", len(line)))
        return real_append(path, line)

    monkeypatch.setattr(C, "atomic_write", atomic)
    monkeypatch.setattr(C, "_append", append)
    run = C.checkpoint_guest("ckpt_log", tmp_path / "set", at_port_signal=True, engine="unicorn")
    n = len(run.checkpoints)
    assert n == 7
    names = [w[0] for w in writes]
    assert names.count("manifest.json") == 1 and names.count("checkpoints.jsonl") == 1  # (created empty)
    appends = [size for name, size in writes if name == "checkpoints.jsonl+"]
    assert len(appends) == n + 1  # one line per checkpoint, one for the run's end
    assert max(appends) < 600  # one entry each, however many came before
    journal = (tmp_path / "set" / "checkpoints.jsonl").read_bytes()
    assert len(journal) == sum(appends) and journal.count(b"\n") == n + 1
    cs = C.open_checkpoint_set(tmp_path / "set")
    assert len(cs) == n and cs.manifest["final"]["stop_reason"] == "exit" and cs.torn_line is None


# ====================================================================== restore of damaged sets
@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Two checkpoint sets of ckpt_log (7 checkpoints each, two runs) and one of ckpt_kvstore."""
    from usecase_engines import GCC_OK, GCC_WHY

    if not GCC_OK:
        pytest.skip(GCC_WHY)
    d = tmp_path_factory.mktemp("sets")
    for name, guest in (("a", "ckpt_log"), ("b", "ckpt_log"), ("kv", "ckpt_kvstore")):
        C.checkpoint_guest(guest, d / name, at_port_signal=True, engine="unicorn")
    return d


def snapshot(d: Path) -> dict:
    """Every entry under ``d``: its kind, bytes and modification time."""
    out = {}
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            q = Path(root) / name
            st = os.lstat(q)
            out[str(q)] = (st.st_mode, st.st_mtime_ns, q.read_bytes() if q.is_file() else None)
    return out


def ck(i: int) -> str:
    return f"ckpt-{i:06d}.spck"


def _truncate(name, n):
    def damage(d, sets):
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[:n])
    return damage


def _swap(a, b):
    def damage(d, sets):
        (d / a).rename(d / "tmp")
        (d / b).rename(d / a)
        (d / "tmp").rename(d / b)
    return damage


def _replace_by_dir(name):
    def damage(d, sets):
        (d / name).unlink()
        (d / name).mkdir()
    return damage


def _lines(d):
    return (d / "checkpoints.jsonl").read_bytes().split(b"\n")[:-1]


def _put_lines(d, lines):
    (d / "checkpoints.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))


def _drop_line(n):
    def damage(d, sets):
        lines = _lines(d)
        _put_lines(d, lines[: n - 1] + lines[n:])
    return damage


def _swap_lines(a, b):
    def damage(d, sets):
        lines = _lines(d)
        lines[a - 1], lines[b - 1] = lines[b - 1], lines[a - 1]
        _put_lines(d, lines)
    return damage


def _edit_line(n, old, new):
    def damage(d, sets):
        lines = _lines(d)
        assert old in lines[n - 1]
        lines[n - 1] = lines[n - 1].replace(old, new, 1)
        _put_lines(d, lines)
    return damage


def _replace_by_fifo(name):
    def damage(d, sets):
        (d / name).unlink()
        os.mkfifo(d / name)
    return damage


def _copy_from(other, name):
    def damage(d, sets):
        shutil.copy(sets / other / name, d / name)
    return damage


DAMAGE = [
    pytest.param(lambda d, s: (d / ck(3)).unlink(), ck(3), "checkpoint 3 is listed in checkpoints.jsonl but the file "
                 "is missing", id="missing-ckpt3"),
    pytest.param(lambda d, s: (d / ck(0)).unlink(), ck(0), "is missing", id="missing-base"),
    pytest.param(lambda d, s: (d / "manifest.json").unlink(), "", "is not an sppkit checkpoint set: it has no "
                 "manifest.json", id="missing-manifest"),
    pytest.param(_truncate(ck(3), 0), ck(3), "file is 0 bytes, shorter than the 64-byte header", id="ckpt3-empty"),
    pytest.param(_truncate(ck(3), 63), ck(3), "file is 63 bytes, shorter than the 64-byte header",
                 id="ckpt3-truncated-in-header"),
    pytest.param(_truncate(ck(3), 100), ck(3), "file is 100 bytes, its header says", id="ckpt3-truncated-in-records"),
    pytest.param(_truncate(ck(3), -1), ck(3), "its header says", id="ckpt3-last-byte-missing"),
    pytest.param(_truncate("manifest.json", 100), "manifest.json", "not valid JSON", id="manifest-truncated"),
    pytest.param(_truncate("manifest.json", 0), "manifest.json", "not valid JSON", id="manifest-empty"),
    pytest.param(_swap(ck(2), ck(3)), ck(2), "holds checkpoint 3 (kind 1), expected 2", id="swapped-2-3"),
    pytest.param(_swap(ck(0), ck(1)), ck(0), "holds checkpoint 1 (kind 1), expected 0", id="swapped-base-1"),
    pytest.param(_copy_from("b", ck(3)), ck(3), "belongs to another checkpoint set", id="ckpt3-from-another-run"),
    pytest.param(_copy_from("b", "manifest.json"), "checkpoints.jsonl", "line 1: chain checksum (SHA-256) "
                 "mismatch", id="fix:manifest-from-another-run"),
    pytest.param(_copy_from("kv", "manifest.json"), "checkpoints.jsonl", "it and manifest.json come from different "
                 "runs", id="fix:manifest-from-another-guest"),
    pytest.param(_copy_from("b", "checkpoints.jsonl"), "checkpoints.jsonl", "line 1: chain checksum",
                 id="journal-from-another-run"),
    pytest.param(lambda d, s: (d / "checkpoints.jsonl").unlink(), "checkpoints.jsonl",
                 "the set's list of checkpoints is missing", id="missing-journal"),
    pytest.param(_replace_by_dir("checkpoints.jsonl"), "checkpoints.jsonl", "is a directory", id="journal-a-directory"),
    pytest.param(_drop_line(3), "checkpoints.jsonl", "line 3: chain checksum", id="journal-line-removed"),
    pytest.param(_swap_lines(2, 3), "checkpoints.jsonl", "line 2: chain checksum", id="journal-lines-swapped"),
    pytest.param(_edit_line(4, b'"reason":"port', b'"reason":"Port'), "checkpoints.jsonl", "line 4: chain checksum",
                 id="journal-line-edited"),
    pytest.param(_edit_line(4, b'{"chain"', b'{"chain'), "checkpoints.jsonl", "line 4: not valid JSON",
                 id="journal-line-not-json"),
    pytest.param(_edit_line(4, b'"reason":"port', b'"reason":"\xff'), "checkpoints.jsonl", "line 4: not UTF-8",
                 id="journal-line-not-utf8"),
    pytest.param(_edit_line(2, b'"checkpoint":', b'"checkpoints":'), "checkpoints.jsonl",
                 'line 2: must be {"checkpoint": ..., "chain": ...}', id="journal-line-bad-shape"),
    pytest.param(_replace_by_dir(ck(2)), ck(2), "checkpoint 2 cannot be read: Is a directory", id="ckpt2-a-directory"),
    pytest.param(_replace_by_dir("manifest.json"), "manifest.json", "is a directory, not the set's manifest file",
                 id="fix:manifest-a-directory"),
    pytest.param(_replace_by_fifo("manifest.json"), "manifest.json", "cannot be read: not a regular file (a device, "
                 "FIFO or socket)", id="fix:manifest-a-fifo"),
    pytest.param(_replace_by_fifo("checkpoints.jsonl"), "checkpoints.jsonl", "cannot be read: not a regular file",
                 id="fix:journal-a-fifo"),
    pytest.param(_replace_by_fifo(ck(2)), ck(2), "checkpoint 2 cannot be read: not a regular file",
                 id="fix:ckpt2-a-fifo"),
]


@pytest.mark.parametrize("resume", [False, True], ids=["verify", "resume"])
@pytest.mark.parametrize("damage, file, problem", DAMAGE)
def test_restore_of_a_damaged_set(sets, tmp_path, damage, file, problem, resume):
    d = tmp_path / "set"
    shutil.copytree(sets / "a", d)
    damage(d, sets)
    before = snapshot(d)
    r = invoke(["restore", d, *(["--resume", *U] if resume else [])])
    assert_one_line_error(r, f"{d / file}" if file else str(d), problem)
    assert snapshot(d) == before


def test_restore_list(sets, tmp_path):
    """`restore --list`: the set's checkpoints and its end, from the verified index,
    without reading the checkpoint files (a missing one does not stop the listing)."""
    d = tmp_path / "set"
    shutil.copytree(sets / "a", d)
    (d / ck(3)).unlink()
    r = invoke(["restore", d, "--list", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    cs = C.open_checkpoint_set(d)
    assert got["checkpoints"] == cs.entries and len(got["checkpoints"]) == 7
    assert got["final"]["stop_reason"] == "exit" and got["torn_line"] is None and got["version"] == 2
    r = invoke(["restore", d, "--list"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())  # (rich wraps the title on a narrow terminal)
    assert "7 checkpoint(s) of ckpt_log" in text and "run end: exit, exit code 0" in text
    assert "port 0xf5 <- 6" in text
    journal = d / "checkpoints.jsonl"
    journal.write_bytes(b"".join(journal.read_bytes().splitlines(keepends=True)[:3]))
    r = invoke(["restore", d, "--list"])
    text = " ".join(r.stdout.split())
    assert "3 checkpoint(s)" in text and "run end: not recorded" in text


@pytest.mark.parametrize("extra, named", [(["--to", "2"], "--to"), (["--resume"], "--resume"),
                                          (["--to", "1", "--resume"], "--to nor --resume")])
def test_restore_list_takes_no_to_or_resume(sets, extra, named):
    r = invoke(["restore", sets / "a", "--list", *extra])
    assert_one_line_error(r, "--list lists the set; it takes neither", named)


@pytest.mark.parametrize("name, problem", [
    ("manifest.json", "manifest.json: cannot be read: Permission denied"),  # fix: was a bare OSError text
    ("checkpoints.jsonl", "checkpoints.jsonl: cannot be read: Permission denied"),
    (ck(4), "ckpt-000004.spck: checkpoint 4 cannot be read: Permission denied"),
], ids=["fix:manifest", "journal", "ckpt4"])
def test_restore_of_an_unreadable_file(sets, tmp_path, monkeypatch, name, problem):
    """Unreadable files, simulated (tests may run as root, which chmod does not stop)."""
    d = tmp_path / "set"
    shutil.copytree(sets / "a", d)
    before = snapshot(d)
    real = os.open

    def os_open(path, flags, *args, **kw):
        if os.path.basename(os.fspath(path)) == name:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", os_open)
    r = invoke(["restore", d])
    monkeypatch.setattr(os, "open", real)
    assert_one_line_error(r, f"{d}/{problem}")
    assert snapshot(d) == before


GUEST_DAMAGE = [
    pytest.param(lambda g: g.unlink(), "the set's copy of the guest is missing", id="missing"),
    pytest.param(lambda g: g.write_bytes(g.read_bytes()[:100]), "the guest copy differs from the one the checkpoints",
                 id="truncated"),
    pytest.param(lambda g: (g.unlink(), g.mkdir()), "cannot be read: Is a directory", id="a-directory"),
    pytest.param(lambda g: (g.unlink(), os.mkfifo(g)), "cannot be read: not a regular file (a device, FIFO or "
                 "socket)", id="fix:a-fifo"),
]


@pytest.mark.parametrize("damage, problem", GUEST_DAMAGE)
def test_restore_names_a_damaged_guest_copy(sets, tmp_path, damage, problem):
    """fix: without --resume a set whose guest copy was missing or damaged restored with
    exit status 0 and "every file verified"; it cannot be resumed: exit status 1, named."""
    d = tmp_path / "set"
    shutil.copytree(sets / "a", d)
    damage(d / "guest.elf")
    before = snapshot(d)
    r = invoke(["restore", d])
    assert r.exit_code == 1, r.output
    (report,) = [ln for ln in " ".join(r.stdout.split()).split("guest copy: ")[1:]]
    assert report.startswith(f"{d / 'guest.elf'}: ") and problem in report
    assert report.endswith("the set cannot be resumed")
    r = invoke(["restore", d, "--json"])
    assert r.exit_code == 1
    doc = json.loads(r.stdout)
    assert doc["verified"] is True and doc["guest_verified"] is False and problem in doc["guest_problem"]
    assert_one_line_error(invoke(["restore", d, "--resume", *U]), str(d / "guest.elf"), problem)
    assert snapshot(d) == before


def test_restore_takes_engine_and_timeout_without_resume(sets):
    """Checked, and ignored without --resume: scripts may pass one --engine to every command."""
    r = invoke(["restore", sets / "a", "--engine", "unicorn", "--timeout", "5", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["engine"] is None


def test_restore_to_names_the_option(sets):
    """fix: the message names --to."""
    assert_one_line_error(invoke(["restore", sets / "a", "--to", "7"]),
                          f"--to 7: {sets / 'a'} has no checkpoint 7: it holds checkpoints 0..6")
    assert_one_line_error(invoke(["restore", sets / "a", "--to", "-1"]), "--to -1: ")


# ====================================================================== --json
def _json_only(r, code=0):
    assert r.exit_code == code, r.output
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout[:500]
    doc = json.loads(lines[0])
    assert isinstance(doc, dict)
    return doc


@needs_gcc
@pytest.mark.parametrize("args, code, key", [
    pytest.param(["monitor", *U, "--ticks", "5"], 0, "verdict", id="monitor"),
    pytest.param(["device", *U], 0, "registers", id="device"),
    pytest.param(["guard", "guard_bufs", *U, "--buffers", "4", "--overflow-buffer", "1"], 1, "hits", id="guard"),
])
def test_json_is_one_object_alone_on_stdout(args, code, key):
    doc = _json_only(invoke([*args, "--json"]), code)
    assert key in doc


def test_json_checkpoint_and_restore(sets, tmp_path):
    doc = _json_only(invoke(["checkpoint", "ckpt_log", *U, "--at-port-signal", "--out", tmp_path / "s", "--json"]))
    assert doc["totals"]["checkpoints"] == 7
    doc = _json_only(invoke(["restore", tmp_path / "s", "--to", "2", "--json"]))
    assert doc["verified"] and doc["guest_verified"] and doc["result"] is None
    doc = _json_only(invoke(["restore", tmp_path / "s", "--to", "2", "--resume", *U, "--json"]))
    assert doc["matches_recorded_run"] is True


# ====================================================================== progress
@needs_gcc
def test_checkpoint_progress_on_a_terminal(tmp_path, monkeypatch):
    """Long work shows progress: each checkpoint as it is taken, on stderr, only when
    stderr is a terminal (forced here); stdout keeps the JSON alone."""
    monkeypatch.setattr(M, "stderr_is_terminal", lambda: True)
    r = invoke(["checkpoint", "ckpt_log", *U, "--at-port-signal", "--out", tmp_path / "s", "--json"])
    doc = _json_only(r)
    assert doc["totals"]["checkpoints"] == 7
    assert "checkpoint 0 taken (base); 1 checkpoint file(s)" in r.stderr
    r = invoke(["checkpoint", "ckpt_log", *U, "--at-port-signal", "--out", tmp_path / "t", "--json",
                "--no-progress"])
    _json_only(r)
    assert r.stderr == ""


def test_progress_is_silent_off_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(M, "stderr_is_terminal", lambda: False)
    with M.Progress("working") as prog:
        prog.update("still working")
    assert capsys.readouterr() == ("", "")


# ====================================================================== --help
try:  # click >= 8.3 marks "no default" with a sentinel
    from click._utils import UNSET
except ImportError:  # pragma: no cover - older click: None
    UNSET = None


def _command(name):
    return main.commands[name]


@pytest.mark.parametrize("name", COMMANDS)
def test_help_renders_with_examples(name):
    r = invoke([name, "--help"])
    assert r.exit_code == 0 and r.stderr == ""
    assert f"Usage: sppkit {name}" in r.stdout or f"Usage: main {name}" in r.stdout
    assert "Exit status:" in r.stdout and "Examples:" in r.stdout  # fix: no command had examples


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_says_what_it_does_and_its_default(name):
    """fix: --engine, --cpl and --timeout of monitor and device had no help at all."""
    for param in _command(name).params:
        if not isinstance(param, click.Option) or param.name == "help":
            continue
        assert param.help and len(param.help) >= 25, (name, param.name, param.help)
        if param.is_flag or param.required or param.multiple or param.default in (None, UNSET):
            continue  # nothing to show (an option without a default says what its absence means)
        assert param.show_default or "[default" in param.help, (name, param.name)


def test_root_help_lists_the_use_cases_untruncated():
    """fix: the root listing cut the five commands' descriptions off with "..."."""
    r = invoke(["--help"])
    listing = r.stdout.split("Commands:")[1]
    for name in COMMANDS:
        (line,) = [ln for ln in listing.splitlines() if ln.strip().startswith(name + " ")]
        assert "..." not in line, line


# ====================================================================== the console script
def _script() -> Path:
    s = Path(sys.executable).parent / "sppkit"
    if not s.exists():
        pytest.skip(f"no console script at {s} (sppkit not installed in this environment)")
    return s


def test_console_script_one_line_error():
    r = subprocess.run([_script(), "monitor", *U, "--timeout", "1e300"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "sppkit: error: Invalid value for '--timeout': 1e+300: must be a finite number of seconds from 0 to "
        "31536000 (a year; 0: no limit) (see 'sppkit monitor --help')"]


@needs_gcc
def test_console_script_damaged_set_and_json(sets, tmp_path):
    d = tmp_path / "set"
    shutil.copytree(sets / "a", d)
    (d / ck(5)).write_bytes((d / ck(5)).read_bytes()[:-7])
    r = subprocess.run([_script(), "restore", d, "--to", "6"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith(f"sppkit: error: {d / ck(5)}: file is ") and "nothing was restored from it" in line
    r = subprocess.run([_script(), "restore", d, "--to", "4", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["verified"] is True
