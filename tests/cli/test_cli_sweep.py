"""A sweep of the commands `sppkit run`, `doctor`, `demo`, `replay`, `trace convert` and
the top-level group with bad input: every case must end in ONE line on stderr,
``sppkit: error: ...``, naming the option (or argument) and the problem, a non-zero
exit status, nothing on stdout and no traceback.  Then --help (every option
described, defaults stated), --json (valid JSON and nothing else on stdout) and the
warnings and checks added by the sweep.

Nothing here runs a bundled guest (no gcc needed): the runs that get going use a
22-byte flat binary under Unicorn; replays use a few-line lackey trace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from sppkit.cli import main
from sppkit.guests.elf import GuestImage, Segment, Symbol

# mov al,'A'; out 0xe9,al; mov qword [0x401000], rax; mov eax,3; mov dx,0xf4; out dx,eax
CODE = bytes.fromhex("b041e6e9" "4889042500104000" "b803000000" "66baf400" "ef")
FLAT = ("--flat-at", "0x400000", "--engine", "unicorn")

LACKEY = """\
==7== Lackey, an example Valgrind tool
I  00401000,4
 S 00601000,8
 S 00601080,8
I  00401004,4
 M 00601100,4
"""

BIG = str(1 << 64)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Inputs, good and bad, by name (the cases below refer to them as {name})."""
    d = tmp_path_factory.mktemp("sweep")
    paths = {
        "bin": ("guest.bin", CODE),
        "npzbin": ("guest.npz", CODE),  # a flat binary whose name a --record could clash with
        "empty": ("empty.bin", b""),
        "text": ("notes.txt", b"hello\n"),
        "latin1": ("latin1.toml", b"\xff\xfe\x00 not utf-8"),
        "lackey": ("t.lackey", LACKEY.encode()),
        "fakenpz": ("fake.npz", LACKEY.encode()),
        "badsyntax": ("syntax.toml", b'[[protect]]\nstart =\n'),
        "badlen": ("badlen.toml", b'[[protect]]\nname = "x"\nstart = 0x401000\nlength = -5\n'),
        "symbol": ("symbol.toml", b'[[protect]]\nsymbol = "secret"\n'),
        "baddecision": ("decision.toml", b'[[protect]]\nstart = 0x401000\nlength = 8\ndecision = "boom"\n'),
        "toplevel": ("toplevel.toml", b"foo = 1\n"),
        "nothing": ("nothing.toml", b""),
        "policy": ("ok.toml", b'[[protect]]\nname = "a"\nstart = 0x601000\nlength = 0x80\n'),
    }
    out = {}
    for key, (name, data) in paths.items():
        (d / name).write_bytes(data)
        out[key] = str(d / name)
    with open(d / "big.bin", "wb") as f:  # larger than --memory 2M (sparse)
        f.truncate((2 << 20) + 1)
    out["bigbin"] = str(d / "big.bin")
    (d / "adir").mkdir()
    (d / "adir" / "sub.c").mkdir()
    (d / "shards").mkdir()
    (d / "shards" / "part-00000.npz").write_bytes(b"stale")
    out.update(dir=str(d / "adir"), nofile=str(d / "missing.bin"), nodir=str(d / "nodir" / "x.npz"),
               nodirpng=str(d / "nodir" / "x.png"), out=str(d / "out.npz"), shards=str(d / "shards"),
               tmp=str(d))
    return out


def invoke(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def assert_one_line_error(r, *needles, code=2):
    assert r.exit_code == code, (r.exit_code, r.output)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output
    assert r.stdout == "", r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sppkit: error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def strict_json(text: str):
    """json.loads, refusing NaN and Infinity (Python's json writes and reads them;
    JSON has neither)."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def case(id_, args, *needles, code=2):
    return pytest.param(args, needles, code, id=id_)


RUN = [
    # GUEST
    case("no-guest", [], "Missing argument 'GUEST'"),
    case("guest-empty", [""], "'GUEST'", "an empty name"),
    case("guest-unknown-name", ["nosuchguest"], "'GUEST'", "neither a file nor a bundled program", "mixed"),
    case("guest-directory", ["{dir}"], "adir", "is a directory, not an ELF file"),
    # "neither a file nor a bundled program"
    case("guest-c-directory", ["{dir}/sub.c"], "sub.c: is a directory, not a .c file"),
    case("guest-c-missing", ["{dir}/missing.c"], "missing.c: no such file"),
    case("guest-text-file", ["{text}"], "notes.txt", "not an ELF file"),
    # read until memory ran out (a MemoryError traceback)
    case("guest-device", ["/dev/zero"], "/dev/zero: not a regular file"),
    case("flat-guest-directory", ["{dir}", "--flat-at", "0x400000"], "'GUEST'", "cannot read the flat binary"),
    case("flat-guest-missing", ["{nofile}", "--flat-at", "0x400000"], "'GUEST'", "No such file"),
    case("flat-guest-empty", ["{empty}", "--flat-at", "0x400000"], "'GUEST'", "is empty"),
    # /dev/zero was read up to --memory bytes (a MemoryError for a large --memory)
    case("flat-guest-device", ["/dev/zero", "--flat-at", "0x400000", "--memory", "512G"], "'GUEST'",
         "/dev/zero: not a regular file"),
    # read whole before anything was checked (/dev/zero never ended), then an engine error after a status line
    case("flat-guest-larger-than-ram", ["{bigbin}", *FLAT, "--memory", "2M"], "'GUEST'",
         "larger than guest RAM (2 MiB, --memory)"),
    # --flat-at / --entry
    case("flat-at-negative", ["{bin}", "--flat-at", "-1"], "'--flat-at'", "negative"),
    case("flat-at-empty", ["{bin}", "--flat-at", ""], "'--flat-at'", "not an address"),
    case("flat-at-nan", ["{bin}", "--flat-at", "nan"], "'--flat-at'", "not an address"),
    case("flat-at-2**64", ["{bin}", "--flat-at", BIG], "'--flat-at'", "beyond the 64-bit address space"),
    case("flat-at-beyond-ram", ["{bin}", "--flat-at", "0xffffffffffffffff"], "'--flat-at'",
         "lies beyond guest RAM", "--memory"),
    case("entry-empty", ["{bin}", *FLAT, "--entry", ""], "'--entry'", "not an address"),
    case("entry-negative", ["{bin}", *FLAT, "--entry", "-5"], "'--entry'", "negative"),
    case("entry-2**64", ["{bin}", *FLAT, "--entry", BIG], "'--entry'", "beyond the 64-bit address space"),
    case("entry-outside-binary", ["{bin}", *FLAT, "--entry", "0x500000"], "'--entry'",
         "outside the flat binary", "0x400000-0x400016"),
    case("entry-without-flat-at", ["{bin}", "--entry", "0x400000"], "--entry applies to a flat binary"),
    # --memory
    case("memory-empty", ["{bin}", *FLAT, "--memory", ""], "'--memory'", "expected a number"),
    case("memory-negative", ["{bin}", *FLAT, "--memory", "-1"], "'--memory'", "must be positive"),
    case("memory-zero", ["{bin}", *FLAT, "--memory", "0"], "'--memory'", "must be positive"),
    case("memory-word", ["{bin}", *FLAT, "--memory", "abc"], "'--memory'", "expected a number"),
    case("memory-nan", ["{bin}", *FLAT, "--memory", "nan"], "'--memory'", "expected a number"),
    case("memory-fraction", ["{bin}", *FLAT, "--memory", "1.5G"], "'--memory'", "expected a number"),
    case("memory-2**64", ["{bin}", *FLAT, "--memory", BIG], "'--memory'", "from 2 MiB to 512 GiB"),
    case("memory-not-2MiB-multiple", ["{bin}", *FLAT, "--memory", "3M"], "'--memory'", "multiple of 2 MiB"),
    # --timeout
    case("timeout-empty", ["{bin}", *FLAT, "--timeout", ""], "'--timeout'", "not a valid float"),
    case("timeout-word", ["{bin}", *FLAT, "--timeout", "abc"], "'--timeout'", "not a valid float"),
    case("timeout-negative", ["{bin}", *FLAT, "--timeout", "-1"], "'--timeout'", "finite number of seconds"),
    case("timeout-nan", ["{bin}", *FLAT, "--timeout", "nan"], "'--timeout'", "finite number of seconds"),
    case("timeout-inf", ["{bin}", *FLAT, "--timeout", "inf"], "'--timeout'", "finite number of seconds"),
    # 2**64 s passed the finite check and overflowed the engines' timers: a traceback
    # from Unicorn's timer thread, an OverflowError from KVM's setitimer
    case("timeout-2**64", ["{bin}", *FLAT, "--timeout", BIG], "'--timeout'", "from 0 to 31536000"),
    # choices
    case("cpl-1", ["{bin}", *FLAT, "--cpl", "1"], "'--cpl'", "'0', '3'"),
    case("engine-unknown", ["{bin}", "--engine", "foo"], "'--engine'", "'auto', 'kvm', 'unicorn'"),
    case("spp-mode-unknown", ["{bin}", *FLAT, "--spp-mode", "x"], "'--spp-mode'", "'lazy', 'eager'"),
    case("decision-unknown", ["{bin}", *FLAT, "--protect", "0x401000:8", "--decision", "x"], "'--decision'"),
    # --protect / --decision / --policy
    case("protect-empty", ["{bin}", *FLAT, "--protect", ""], "--protect", "expected START:LENGTH"),
    case("protect-word", ["{bin}", *FLAT, "--protect", "abc"], "--protect", "expected START:LENGTH"),
    case("protect-length-0", ["{bin}", *FLAT, "--protect", "0x401000:0"], "--protect", "must be positive"),
    case("protect-start-negative", ["{bin}", *FLAT, "--protect", "-1:8"], "--protect", "negative"),
    case("protect-past-2**64", ["{bin}", *FLAT, "--protect", f"0x401000:{BIG}"], "--protect",
         "runs past the 64-bit address space"),
    case("protect-beyond-ram", ["{bin}", *FLAT, "--protect", "0x10000000000:8"], "'--protect'",
         "beyond guest RAM", "--memory"),
    case("protect-and-policy", ["{bin}", *FLAT, "--protect", "0:8", "--policy", "{policy}"], "not both"),
    case("decision-without-protect", ["{bin}", *FLAT, "--decision", "stop"], "--decision applies to --protect"),
    case("policy-missing", ["{bin}", *FLAT, "--policy", "{nofile}"], "'--policy'", "does not exist"),
    case("policy-empty-path", ["{bin}", *FLAT, "--policy", ""], "'--policy'", "does not exist"),
    case("policy-directory", ["{bin}", *FLAT, "--policy", "{dir}"], "'--policy'", "is a directory"),
    case("policy-toml-syntax", ["{bin}", *FLAT, "--policy", "{badsyntax}"], "syntax.toml", "TOML syntax error"),
    case("policy-negative-length", ["{bin}", *FLAT, "--policy", "{badlen}"], "badlen.toml", "length -5"),
    case("policy-symbol-in-flat-binary", ["{bin}", *FLAT, "--policy", "{symbol}"], "unknown symbol 'secret'"),
    case("policy-bad-decision", ["{bin}", *FLAT, "--policy", "{baddecision}"], "unknown decision 'boom'"),
    case("policy-unknown-key", ["{bin}", *FLAT, "--policy", "{toplevel}"], "unknown top-level key 'foo'"),
    case("policy-not-utf8", ["{bin}", *FLAT, "--policy", "{latin1}"], "latin1.toml", "not UTF-8"),
    case("policy-is-a-binary", ["{bin}", *FLAT, "--policy", "{bin}"], "guest.bin", "not UTF-8"),
    # --record
    case("record-empty", ["{bin}", *FLAT, "--record", ""], "'--record'", "an empty path"),
    case("record-directory", ["{bin}", *FLAT, "--record", "{dir}"], "'--record'", "is a directory"),
    case("record-wrong-suffix", ["{bin}", *FLAT, "--record", "{text}"], "'--record'", ".npz or .parquet"),
    case("record-missing-directory", ["{bin}", *FLAT, "--record", "{nodir}"], "'--record'",
         "directory", "does not exist"),
    case("record-onto-guest", ["{npzbin}", *FLAT, "--record", "{npzbin}"], "'--record'", "is the GUEST file"),
    case("unknown-option", ["{bin}", *FLAT, "--bogus"], "No such option '--bogus'"),
]


@pytest.mark.parametrize("args, needles, code", RUN)
def test_run_bad_input(files, args, needles, code):
    r = invoke("run", *(a.format(**files) for a in args))
    assert_one_line_error(r, *needles, code=code)


@pytest.mark.parametrize("args, needle", [
    pytest.param(["--protect", "0:8", "--policy", "{policy}"], "not both", id="protect-and-policy"),
    pytest.param(["--decision", "stop"], "--decision applies to --protect", id="decision-without-protect"),
    pytest.param(["--memory", "3M"], "'--memory'", id="memory"),
    pytest.param(["--record", "{text}"], "'--record'", id="record"),
])
def test_run_checks_options_before_building_a_bundled_guest(files, monkeypatch, args, needle):
    """Building a bundled guest takes seconds (gcc); a conflict found afterwards wasted them."""
    def build_guest(name, **kw):
        raise AssertionError(f"built {name} before checking the options")
    monkeypatch.setattr("sppkit.guests.build_guest", build_guest)
    r = invoke("run", "mixed", *(a.format(**files) for a in args))
    assert_one_line_error(r, needle)


def test_run_bad_input_leaves_the_guest_file_alone(files):
    assert Path(files["npzbin"]).read_bytes() == CODE


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
@pytest.mark.parametrize("args, needles", [
    pytest.param(["run", "{f}"], ["Permission denied"], id="run-elf"),
    pytest.param(["run", "{f}", *FLAT], ["'GUEST'", "Permission denied"], id="run-flat"),
    pytest.param(["run", "{bin}", *FLAT, "--policy", "{f}"], ["cannot read a policy file", "Permission denied"],
                 id="run-policy"),
    pytest.param(["replay", "{f}", "--protect", "0:1"], ["Permission denied"], id="replay-trace"),
    pytest.param(["replay", "{f}", "--format", "lackey", "--protect", "0:1"], ["Permission denied"],
                 id="replay-trace-lackey"),
    pytest.param(["trace", "convert", "{f}", "{out}", "--format", "csv"], ["Permission denied"], id="convert"),
])
def test_unreadable_files(files, tmp_path, args, needles):
    f = tmp_path / "locked"
    f.write_bytes(CODE)
    f.chmod(0)
    r = invoke(*(a.format(f=f, **files) for a in args))
    assert_one_line_error(r, *needles, code=2)


def _fake_elf(monkeypatch):
    """`--elf FILE` loads this image (symbols secret, config, empty) whatever FILE is:
    symbol handling without gcc."""
    image = GuestImage(segments=[Segment(0x600000, bytes(0x3000), 0x3000, "rw-")], entry=0x600000,
                       symbols={s.name: s for s in (Symbol("secret", 0x601000, 32, "object", "global"),
                                                    Symbol("config", 0x601100, 64, "object", "global"),
                                                    Symbol("empty", 0x602000, 0, "object", "global"))},
                       path=Path("fake.elf"))
    monkeypatch.setattr("sppkit.guests.elf.load_elf", lambda path: image)


R = ["{lackey}", "--protect", "0x601000:0x80"]

REPLAY = [
    case("no-trace", [], "Missing argument 'TRACE'"),
    case("trace-missing", ["{nofile}", "--protect", "0:1"], "'TRACE'", "does not exist"),
    case("trace-empty-path", ["", "--protect", "0:1"], "'TRACE'", "does not exist"),
    case("trace-empty-directory", ["{dir}", "--protect", "0:1"], "adir", "no trace shards"),
    case("trace-text-file", ["{text}", "--protect", "0:1"], "notes.txt", "cannot tell the trace format"),
    case("trace-fake-npz", ["{fakenpz}", "--protect", "0:1"], "fake.npz", "not a native trace"),
    case("trace-lackey-as-native", ["{lackey}", "--format", "native", "--protect", "0:1"], "not a native trace"),
    case("format-unknown", [*R, "--format", "bogus"], "'--format'"),
    case("nothing-to-protect", ["{lackey}"], "nothing to protect"),
    case("size-0", [*R, "--size", "0"], "'--size'", "1<=x<=65535"),
    case("size-65536", [*R, "--size", "65536"], "'--size'", "1<=x<=65535"),
    case("size-empty", [*R, "--size", ""], "'--size'"),
    case("top-negative", [*R, "--top", "-1"], "'--top'"),
    case("top-word", [*R, "--top", "abc"], "'--top'"),
    case("chunk-records-0", [*R, "--chunk-records", "0"], "'--chunk-records'"),
    # 2**64 was accepted; reading a Parquet trace then failed as "unreadable Parquet trace"
    case("chunk-records-2**64", [*R, "--chunk-records", BIG], "'--chunk-records'", "1<=x<=1073741824"),
    case("exit-cycles-nan", [*R, "--exit-cycles", "nan"], "'--exit-cycles'", "finite"),
    case("exit-cycles-negative", [*R, "--exit-cycles", "-1"], "'--exit-cycles'"),
    case("exit-cycles-empty", [*R, "--exit-cycles", ""], "'--exit-cycles'"),
    # 1e308 cycles made the totals inf: `--json` printed Infinity, which is not JSON
    case("exit-cycles-1e308", [*R, "--exit-cycles", "1e308", "--json"], "'--exit-cycles'", "1000000000000"),
    case("user-exit-cycles-inf", [*R, "--user-exit-cycles", "inf"], "'--user-exit-cycles'"),
    case("miss-cycles-nan", [*R, "--miss-cycles", "nan"], "'--miss-cycles'", "finite"),
    case("workers-0", [*R, "--dask", "--workers", "0"], "'--workers'"),
    # options that would have been ignored
    case("workers-without-dask", [*R, "--workers", "2"], "--workers needs --dask"),
    case("workers-with-scheduler", [*R, "--dask", "--scheduler", "tcp://127.0.0.1:1", "--workers", "2"],
         "--workers", "--scheduler"),
    case("scheduler-without-dask", [*R, "--scheduler", "tcp://127.0.0.1:1"], "--scheduler needs --dask"),
    case("scheduler-empty", [*R, "--dask", "--scheduler", ""], "'--scheduler'", "an empty value"),
    case("sort-without-sweep", [*R, "--sort", "name"], "--sort", "--sweep"),
    case("plot-empty", [*R, "--plot", ""], "'--plot'", "an empty path"),
    case("plot-directory", [*R, "--plot", "{dir}"], "'--plot'", "is a directory"),
    case("plot-missing-directory", [*R, "--plot", "{nodirpng}"], "'--plot'", "does not exist"),
    case("plot-unknown-type", [*R, "--plot", "{text}"], "'--plot'", "cannot write .txt"),
    case("plot-with-sweep", [*R, "--sweep", "--plot", "{tmp}/x.png"], "--plot is not available with --sweep"),
    # --policy / --protect / --elf
    case("protect-and-policy", [*R, "--policy", "{policy}"], "not both"),
    case("protect-empty", ["{lackey}", "--protect", ""], "--protect", "expected START:LENGTH"),
    case("protect-symbol-without-elf", ["{lackey}", "--protect", "secret"], "--protect 'secret'", "--elf"),
    case("protect-length-0", ["{lackey}", "--protect", "0:0"], "--protect", "must be positive"),
    case("protect-past-2**64", ["{lackey}", "--protect", "18446744073709551615:2"], "--protect",
         "runs past the 64-bit address space"),
    case("protect-too-many-pages", ["{lackey}", "--protect", "0:0x100000000000"], "'--protect'",
         "4,194,304 pages"),
    case("policy-missing", ["{lackey}", "--policy", "{nofile}"], "'--policy'", "does not exist"),
    case("policy-directory", ["{lackey}", "--policy", "{dir}"], "'--policy'", "is a directory"),
    case("policy-toml-syntax", ["{lackey}", "--policy", "{badsyntax}"], "TOML syntax error"),
    case("policy-symbol-without-elf", ["{lackey}", "--policy", "{symbol}"], "symbol 'secret'", "--elf FILE"),
    case("policy-not-utf8", ["{lackey}", "--policy", "{latin1}"], "not UTF-8"),
    # an empty policy used to give "None: no sized object symbols to sweep"
    case("sweep-empty-policy", ["{lackey}", "--policy", "{nothing}", "--sweep"], "--policy",
         "protects nothing"),
    case("sweep-nothing", ["{lackey}", "--sweep"], "nothing to protect"),
    case("elf-text-file", [*R, "--elf", "{text}"], "notes.txt", "not an ELF file"),
    case("elf-directory", [*R, "--elf", "{dir}"], "'--elf'", "is a directory"),
    case("strict-malformed", ["{lackey}", "--format", "csv", "--protect", "0:1", "--strict"],
         "malformed record", "t.lackey:1"),
]


@pytest.mark.parametrize("args, needles, code", REPLAY)
def test_replay_bad_input(files, args, needles, code):
    r = invoke("replay", *(a.format(**files) for a in args))
    assert_one_line_error(r, *needles, code=code)


SYMBOL_PROTECT = [
    # the length given was 0; the error said "symbol 'secret' has size 32; give a length"
    case("length-0", ["secret:0"], "'secret:0'", "length 0 must be positive"),
    # a negative offset protected bytes before the symbol
    case("offset-negative", ["secret+-5"], "'secret+-5'", "offset -5 is negative"),
    # 2**64 as offset: "has size 32; give a length"
    case("offset-2**64", [f"secret+{BIG}"], "offset 0x10000000000000000 is past the end of symbol 'secret'"),
    case("offset-at-end", ["secret+32"], "offset 0x20 is past the end of symbol 'secret' (size 0x20)"),
    # did not name --protect
    case("length-2**64", [f"secret:{BIG}"], "'--protect'", "runs past the end of symbol 'secret' (size 0x20)"),
    # bytes past a symbol's end were protected silently
    case("past-the-symbol", ["secret+0x100000:8"], "'--protect'", "0x100000+0x8 runs past the end of symbol 'secret'"),
    case("size-0-symbol", ["empty"], "symbol 'empty' has size 0; give a length"),
    case("unknown-symbol", ["sekret"], "'--protect'", "no symbol 'sekret'", "secret"),
    case("bad-length", ["secret:abc"], "'--protect'", "expected SYMBOL[+OFF][:LENGTH]"),
]


@pytest.mark.parametrize("args, needles, code", SYMBOL_PROTECT)
def test_replay_protect_symbol_bad_input(files, monkeypatch, args, needles, code):
    _fake_elf(monkeypatch)
    r = invoke("replay", files["lackey"], "--elf", files["text"], "--protect", *args)
    assert_one_line_error(r, *needles, code=code)


@pytest.mark.parametrize("spec, start, length", [
    pytest.param("secret", 0x601000, 32, id="whole-symbol"),
    pytest.param("secret+8", 0x601008, 24, id="offset-rest-of-symbol"),
    pytest.param("secret+8:4", 0x601008, 4, id="offset-and-length"),
    pytest.param("empty:16", 0x602000, 16, id="size-0-symbol-with-length"),
])
def test_replay_protect_symbol_ranges(files, monkeypatch, spec, start, length):
    _fake_elf(monkeypatch)
    r = invoke("replay", files["lackey"], "--elf", files["text"], "--protect", spec, "--sweep", "--json")
    assert r.exit_code == 0, r.output
    (row,) = strict_json(r.stdout)["sweep"]
    assert (row["start"], row["length"]) == (start, length)


CONVERT = [
    case("no-arguments", [], "Missing argument 'IN'"),
    case("no-out", ["{lackey}"], "Missing argument 'OUT'"),
    case("in-missing", ["{nofile}", "{out}"], "'IN'", "does not exist"),
    case("in-empty-directory", ["{dir}", "{out}"], "no trace shards"),
    case("in-text-file", ["{text}", "{out}"], "cannot tell the trace format"),
    # an empty OUT said ".: a native trace is written as .npz or .parquet"
    case("out-empty", ["{lackey}", ""], "an empty path"),
    case("out-wrong-suffix", ["{lackey}", "{text}"], "notes.txt", ".npz or .parquet"),
    case("out-directory", ["{lackey}", "{dir}"], "is a directory", "--shard-records"),
    # a missing directory leaked a temporary name: "No such file or directory: '.../.sppkit-trace-xxxx'"
    case("out-missing-directory", ["{lackey}", "{nodir}"], "nodir does not exist"),
    case("out-is-in", ["{fakenpz}", "{fakenpz}", "--format", "lackey"], "would overwrite the input"),
    # shards left from an earlier conversion were replayed with the new ones
    case("out-has-old-shards", ["{lackey}", "{shards}", "--shard-records", "2"], "already holds 1 shard"),
    case("out-shards-onto-file", ["{lackey}", "{lackey}.npz", "--shard-records", "2"],
         "is not a directory", "--shard-records"),
    case("format-unknown", ["{lackey}", "{out}", "--format", "x"], "'--format'"),
    case("size-0", ["{lackey}", "{out}", "--size", "0"], "'--size'"),
    case("shard-records-0", ["{lackey}", "{out}", "--shard-records", "0"], "'--shard-records'"),
    case("chunk-records-0", ["{lackey}", "{out}", "--chunk-records", "0"], "'--chunk-records'"),
    case("chunk-records-2**64", ["{lackey}", "{out}", "--chunk-records", BIG], "'--chunk-records'"),
    case("strict-malformed", ["{lackey}", "{out}", "--format", "csv", "--strict"], "malformed record"),
]


@pytest.mark.parametrize("args, needles, code", CONVERT)
def test_trace_convert_bad_input(files, args, needles, code):
    if "{lackey}.npz" in args:
        Path(files["lackey"] + ".npz").write_bytes(b"a file, not a directory")
    r = invoke("trace", "convert", *(a.format(**files) for a in args))
    assert_one_line_error(r, *needles, code=code)
    assert not os.path.exists(files["out"])


GROUP = [
    case("unknown-option", ["--bogus"], "No such option '--bogus'", "'sppkit --help'"),
    case("unknown-command", ["bogus"], "No such command 'bogus'"),
    case("trace-unknown-command", ["trace", "bogus"], "No such command 'bogus'", "'sppkit trace --help'"),
    case("doctor-extra-argument", ["doctor", "extra"], "unexpected extra argument", "'sppkit doctor --help'"),
    case("doctor-unknown-option", ["doctor", "--json"], "No such option '--json'"),
    case("demo-engine-unknown", ["demo", "--engine", "bogus"], "'--engine'", "'auto', 'kvm', 'unicorn'"),
    case("demo-extra-argument", ["demo", "extra"], "unexpected extra argument"),
]


@pytest.mark.parametrize("args, needles, code", GROUP)
def test_group_doctor_demo_bad_input(args, needles, code):
    assert_one_line_error(invoke(*args), *needles, code=code)


@pytest.mark.parametrize("command", ["demo", "run"])
def test_engine_kvm_without_kvm_is_one_line_before_anything_runs(files, monkeypatch, command):
    """`demo --engine kvm` printed the processor and hypervisor parts, then failed."""
    monkeypatch.setattr("sppkit.engines.kvm_usable", lambda: (False, "/dev/kvm: no such device"))
    args = ["demo", "--engine", "kvm"] if command == "demo" else ["run", files["bin"], "--flat-at", "0x400000",
                                                                   "--engine", "kvm"]
    r = invoke(*args)
    assert_one_line_error(r, "--engine kvm", "/dev/kvm: no such device", "--engine unicorn", code=1)


def test_no_arguments_still_prints_the_help():
    for args in ([], ["trace"]):
        r = invoke(*args)
        assert r.output.startswith("Usage: ") and "Commands:" in r.output


# ------------------------------------------------------------------------------------------ --help
def _commands():
    """(path, command) of the commands this sweep covers."""
    trace = main.commands["trace"]
    return [((), main), (("run",), main.commands["run"]), (("doctor",), main.commands["doctor"]),
            (("demo",), main.commands["demo"]), (("replay",), main.commands["replay"]), (("trace",), trace),
            (("trace", "convert"), trace.commands["convert"])]


@pytest.mark.parametrize("path, command", [pytest.param(p, c, id=" ".join(("sppkit",) + p)) for p, c in _commands()])
def test_help_describes_every_option_and_its_default(path, command):
    r = invoke(*path, "--help")
    assert r.exit_code == 0 and r.stderr == "", r.output
    assert r.stdout.startswith(f"Usage: {' '.join(('main',) + path)}")
    assert len((command.help or "").split()) >= 10, "say what the command does"
    for p in command.params:
        if not isinstance(p, click.Option) or p.hidden or p.name in ("help", "version"):
            continue
        name = "/".join(p.opts)
        assert p.help and len(p.help.split()) >= 3, f"{name}: no help text"
        assert name.split("/")[0] in r.stdout
        no_default = p.default is None or p.default is getattr(click.core, "UNSET", None)
        if not p.is_flag and not p.multiple and not no_default:
            assert p.show_default, f"{name}: default {p.default!r} not shown"
        if not p.is_flag and not p.multiple and no_default:
            # an option without a default says what leaving it out means, or is plainly optional
            assert "default" in p.help.lower() or p.name in ("policy_file", "elf_file", "flat_at", "record_file",
                                                             "plot_file"), f"{name}: what if it is left out?"


@pytest.mark.parametrize("path", [("run",), ("replay",), ("trace", "convert")], ids=" ".join)
def test_help_has_examples(path):
    r = invoke(*path, "--help")
    assert "Examples:" in r.stdout and f"sppkit {' '.join(path)} " in r.stdout


def test_group_listing_shows_whole_summaries():
    """The command list used to cut the docstrings: "Run GUEST (an x86-64 ELF, a flat
    binary, or a bundled..."."""
    r = invoke("--help")
    for name in ("run", "doctor", "demo", "replay", "trace"):
        (line,) = [ln for ln in r.stdout.splitlines() if ln.strip().startswith(name + " ")]
        assert not line.rstrip().endswith("..."), line


def test_dash_h_is_help_everywhere():
    for path, _ in _commands():
        assert invoke(*path, "-h").stdout == invoke(*path, "--help").stdout


# ------------------------------------------------------------------------------------------ --json
def test_run_json_is_the_only_thing_on_stdout(files, tmp_path):
    rec = tmp_path / "w.npz"
    r = invoke("run", files["bin"], *FLAT, "--protect", "0x401000:8", "--record", rec, "--json")
    assert r.exit_code == 3, r.output
    d = strict_json(r.stdout)
    assert d["console"] == "A" and d["stats"]["violations"] == 1
    assert rec.is_file()


def test_replay_json_with_warnings_is_the_only_thing_on_stdout(files, tmp_path):
    p = tmp_path / "t.lackey"
    p.write_text(LACKEY + "garbage\n")
    r = invoke("replay", p, "--protect", "0x601000:0x80", "--json", "--exit-cycles", "1e12",
               "--user-exit-cycles", "1e12")
    assert r.exit_code == 0, r.output
    d = strict_json(r.stdout)
    assert d["skipped_records"] == 1 and d["violations"] == 1
    assert "sppkit: warning:" in r.stderr


def test_sweep_and_convert_json_are_the_only_thing_on_stdout(files, tmp_path):
    r = invoke("replay", files["lackey"], "--policy", files["policy"], "--sweep", "--json")
    assert r.exit_code == 0, r.output
    assert strict_json(r.stdout)["sweep"][0]["name"] == "a"
    r = invoke("trace", "convert", files["lackey"], tmp_path / "t.npz", "--json")
    assert r.exit_code == 0, r.output
    assert strict_json(r.stdout)["records"] == 3


# ------------------------------------------------------------------------------- warnings and checks
@pytest.mark.parametrize("command", ["replay", "convert"])
def test_a_trace_with_no_readable_record_is_an_error(files, tmp_path, command):
    """Every record malformed (most likely the wrong --format): the per-record
    warnings, then an error saying so — exit status 2, no report and nothing written.
    It used to be a warning, exit status 0, an all-zero report and a 0-record .npz."""
    out = tmp_path / "x.npz"
    args = (["replay", files["lackey"], "--protect", "0:1", "--json", "--plot", tmp_path / "p.png"]
            if command == "replay" else ["trace", "convert", files["lackey"], out])
    r = invoke(*args, "--format", "csv")
    assert r.exit_code == 2 and r.stdout == "", r.output
    assert "none of its 6 record(s) could be read as csv" in r.stderr and "is the format right (--format)?" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_good_traces_get_no_format_hint(files):
    r = invoke("replay", files["lackey"], "--protect", "0:1")
    assert r.exit_code == 0 and "--format" not in r.stderr


@pytest.mark.parametrize("command", ["run", "replay"])
def test_a_policy_that_protects_nothing_is_a_warning(files, command):
    args = (["run", files["bin"], *FLAT] if command == "run" else ["replay", files["lackey"]])
    r = invoke(*args, "--policy", files["nothing"], "--json")
    assert r.exit_code == (3 if command == "run" else 0), r.output
    strict_json(r.stdout)
    assert "sppkit: warning: --policy" in r.stderr and "protects nothing" in r.stderr


def test_convert_into_shards_names_the_directory(files, tmp_path):
    """With --shard-records the report said "3 records written to OUT.npz", a file
    that was never written (the shards are in the directory OUT)."""
    r = invoke("trace", "convert", files["lackey"], tmp_path / "parts.npz", "--shard-records", "2")
    assert r.exit_code == 0, r.output
    assert f"3 records written to {tmp_path / 'parts'} (2 shards)" in r.stdout
    assert sorted(os.listdir(tmp_path / "parts")) == ["part-00000.npz", "part-00001.npz"]
    assert not (tmp_path / "parts.npz").exists()


def test_convert_reports_progress(files, tmp_path, monkeypatch):
    """A progress bar (bytes read) when stderr is a terminal; the bar is faked here."""
    import importlib

    rp = importlib.import_module("sppkit.engines.replay.replay")  # the package exports a function `replay`

    updates = []

    class Bar:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def add_task(self, what, total=None):
            return what

        def update(self, task, **kw):
            updates.append(kw)

    monkeypatch.setattr(rp, "_want_progress", lambda enabled: enabled)
    monkeypatch.setattr(rp, "_progress_bar", lambda total, what: Bar())
    big = tmp_path / "big.lackey"
    big.write_text("".join(f" S {0x601000 + 8 * i:x},8\n" for i in range(5000)))
    r = invoke("trace", "convert", big, tmp_path / "big.npz", "--chunk-records", "1000")
    assert r.exit_code == 0, r.output
    done = [u["completed"] for u in updates if "completed" in u]
    assert done and done == sorted(done) and done[-1] == big.stat().st_size
    assert {u["total"] for u in updates if "total" in u} == {big.stat().st_size}
    updates.clear()
    r = invoke("trace", "convert", big, tmp_path / "big2.npz", "--no-progress")
    assert r.exit_code == 0 and updates == []


# ------------------------------------------------------------------------------- the console script
SPPKIT = Path(sys.executable).with_name("sppkit")


@pytest.mark.skipif(not SPPKIT.exists(), reason=f"no console script at {SPPKIT} (sppkit is not installed)")
@pytest.mark.parametrize("args, needles", [
    pytest.param(["run", "{bin}", *FLAT, "--timeout", BIG], ["'--timeout'"], id="run-timeout-2**64"),
    pytest.param(["replay", "{lackey}", "--protect", "0:1", "--exit-cycles", "1e308", "--json"],
                 ["'--exit-cycles'"], id="replay-exit-cycles-1e308"),
    pytest.param(["trace", "convert", "{lackey}", ""], ["an empty path"], id="convert-out-empty"),
    pytest.param(["bogus"], ["No such command", "'sppkit --help'"], id="unknown-command"),
])
def test_console_script_one_line_errors(files, args, needles):
    p = subprocess.run([str(SPPKIT), *(a.format(**files) for a in args)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr, p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("sppkit: error: ") and all(n in line for n in needles), line


@pytest.mark.skipif(not SPPKIT.exists(), reason=f"no console script at {SPPKIT} (sppkit is not installed)")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_terminated_recording_run_leaves_nothing_behind(tmp_path, sig):
    """SIGTERM (timeout, kill, systemd) stops a command as Ctrl-C does: the guest at
    once, the partial --record spool removed, exit status 130.  A SIGTERM used to kill
    the process outright, leaving a hidden spool directory of any size beside the
    output."""
    import signal
    import time

    code = tmp_path / "loop.bin"
    code.write_bytes(bytes.fromhex("48890beb fb".replace(" ", "")))  # 1: mov [rbx], rcx; jmp 1b
    out = tmp_path / "out" / "rec.npz"
    out.parent.mkdir()
    p = subprocess.Popen([str(SPPKIT), "run", str(code), *FLAT, "--timeout", "0",
                          "--record", str(out), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not any(out.parent.iterdir()) and time.monotonic() < deadline:  # the spool is being written
        time.sleep(0.05)
    assert any(out.parent.iterdir()), "the run never started writing its recording"
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err.decode().strip().splitlines()[-1] == "sppkit: error: interrupted"
    # (a KeyboardInterrupt raised inside a binding callback used to add ctypes' "Exception
    # ignored ... Traceback" report)
    assert b"Traceback" not in err and b"Exception ignored" not in err, err
    assert list(out.parent.iterdir()) == []


def test_ctrl_c_while_sppkit_loads_is_one_line(monkeypatch, capsys):
    """The console script: a Ctrl-C while the command line's modules load used to print
    a traceback from the middle of an import."""
    import importlib.abc
    import sys

    from sppkit import _entry

    class Interrupting(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "sppkit.cli":
                raise KeyboardInterrupt
            return None

    import signal

    installed = {}
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_DFL)
    monkeypatch.setattr(signal, "signal", lambda sig, handler: installed.setdefault(sig, handler))
    monkeypatch.delitem(sys.modules, "sppkit.cli")
    monkeypatch.setattr(sys, "meta_path", [Interrupting(), *sys.meta_path])
    with pytest.raises(SystemExit) as e:
        _entry.main()
    assert e.value.code == 130 and capsys.readouterr().err == "sppkit: error: interrupted\n"
    # SIGTERM is Ctrl-C from the start too (it killed a loading sppkit with status 143)
    assert installed == {signal.SIGTERM: signal.default_int_handler}


@pytest.mark.skipif(not SPPKIT.exists(), reason=f"no console script at {SPPKIT} (sppkit is not installed)")
def test_console_script_run_json(files):
    p = subprocess.run([str(SPPKIT), "run", files["bin"], *FLAT, "--json", "--timeout", "30"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stderr
    assert strict_json(p.stdout)["console"] == "A"


def test_record_then_replay(files, tmp_path):
    """--record, checked up front, still writes a trace `sppkit replay` reads."""
    rec = tmp_path / "w.npz"
    r = invoke("run", files["bin"], *FLAT, "--record", rec, "--json")
    assert r.exit_code == 3, r.output
    from sppkit.engines.replay import read_trace

    t = read_trace(rec)
    assert t["gpa"].tolist() == [0x401000] and np.all(t["size"] == 8)


def test_run_shows_progress_on_a_terminal(monkeypatch):
    """fix: `sppkit run` showed nothing while a long guest ran (the use-case commands had
    a spinner).  Now a status line on stderr, only when stderr is a terminal (forced
    here), and never with --no-progress; stdout keeps the JSON alone."""
    import sppkit.usecases.monitor as M
    from sppkit.cli import main
    from sppkit.guests import toolchain_status

    ok, why = toolchain_status()
    if not ok:
        pytest.skip(f"the bundled guest cannot be built: {why}")
    monkeypatch.setattr(M, "stderr_is_terminal", lambda: True)
    r = CliRunner().invoke(main, ["run", "selftest", "--engine", "unicorn", "--json"])
    assert r.exit_code == 0, r.output
    json.loads(r.stdout)
    assert "run: selftest on the unicorn engine (Ctrl-C stops it)" in r.stderr
    import re

    assert re.search(r"Ctrl-C stops it\)…(\x1b\[[0-9;]*m)*\s+\d+ s", r.stderr), r.stderr  # the seconds so far
    r = CliRunner().invoke(main, ["run", "selftest", "--engine", "unicorn", "--json", "--no-progress"])
    assert r.exit_code == 0 and "Ctrl-C stops it" not in r.stderr


@pytest.mark.parametrize("args", [
    ["trace", "convert", "{lackey}", "{out}"],
    ["replay", "{lackey}", "--protect", "0:1", "--plot", "{out}"],
    ["run", "{bin}", *FLAT, "--record", "{out}"],
], ids=["convert", "plot", "record"])
def test_an_output_that_is_a_fifo_is_refused_not_replaced(files, tmp_path, args):
    """Outputs are written beside the target and renamed over it: a device node or FIFO
    given as the output (as root, --plot /dev/full) was replaced by a regular file."""
    import os
    import stat

    fifo = tmp_path / "out.npz"
    os.mkfifo(fifo)
    r = invoke(*(a.format(**{**files, "out": fifo}) for a in args))
    assert r.exit_code == 2, r.output
    assert f"{fifo} is a device, FIFO or socket, not a file sppkit can replace" in " ".join(r.output.split())
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


# ------------------------------------------------------------------- review fixes: replay inputs and outputs
def test_unicorn_record_holds_writes_to_unprotected_pages(files, tmp_path):
    """docs/replay.md said a --record file holds only the writes to pages the run's
    policy protected.  Under Unicorn it holds every guest write (a memory hook on all
    of RAM): here the one write of the guest, to a page the run did not protect, is
    recorded, and a replay with another policy sees it."""
    rec = tmp_path / "w.npz"
    r = invoke("run", files["bin"], *FLAT, "--protect", "0x402000:8", "--record", rec, "--json")
    assert r.exit_code == 3, r.output
    assert strict_json(r.stdout)["stats"]["page_granular"] == 0
    from sppkit.engines.replay import read_trace

    assert read_trace(rec)["gpa"].tolist() == [0x401000]
    d = strict_json(invoke("replay", rec, "--protect", "0x401000:8", "--json").stdout)
    assert (d["page_granular_exits"], d["violations"]) == (1, 1)


REPLAY_OUTPUTS = [
    # the plot replaced the input trace
    case("plot-onto-the-input", ["replay", "{trace}", "--format", "csv", "--protect", "0x1080:8", "--plot", "{trace}"],
         "'--plot'", "would overwrite the input"),
    # a later replay of the directory read the plot as a shard
    case("plot-into-the-input-shards", ["replay", "{shards}", "--protect", "0x1080:8", "--plot", "{shards}/p.png"],
         "'--plot'", "would write into the input shard directory"),
    # a file named "-" was written
    case("plot-dash", ["replay", "{trace}", "--format", "csv", "--protect", "0x1080:8", "--plot", "-"],
         "'--plot'", "'-': standard output is not supported"),
    # the new file was read as a shard by a later replay of the directory
    case("convert-into-the-input-shards", ["trace", "convert", "{shards}", "{shards}/x.npz"],
         "would write into the input shard directory"),
    case("convert-shards-into-the-input-shards", ["trace", "convert", "{shards}", "{shards}", "--shard-records", "1"],
         "would write into the input shard directory"),
    # "File 'nosuchguest' does not exist": bundled programs were not taken at all
    case("elf-unknown-name", ["replay", "{trace}", "--format", "csv", "--protect", "0:1", "--elf", "nosuchguest"],
         "'--elf'", "neither a file nor a bundled guest program", "mixed"),
]


@pytest.mark.parametrize("args, needles, code", REPLAY_OUTPUTS)
def test_replay_and_convert_refuse_outputs_over_or_into_the_input(tmp_path, monkeypatch, args, needles, code):
    """An output that is the input trace, or lies in its shard directory, is refused in
    one line before anything is read or written; so is `--plot -`."""
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    monkeypatch.chdir(tmp_path)
    trace = tmp_path / "t.png"
    trace.write_text("0x1080,8\n")
    shards = tmp_path / "in"
    shards.mkdir()
    (shards / "a.csv").write_text("0x1080,8\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    r = invoke(*(a.format(trace=trace, shards=shards) for a in args))
    assert_one_line_error(r, *needles, code=code)
    assert trace.read_text() == "0x1080,8\n"
    assert os.listdir(shards) == ["a.csv"] and sorted(p.name for p in tmp_path.iterdir()) == before
