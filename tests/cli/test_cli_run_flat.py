"""`sppkit run` on a flat binary (--flat-at), on the engine that runs everywhere."""

import json

import pytest

from click.testing import CliRunner

from sppkit.cli import main

# mov al,'A'; out 0xe9,al; mov qword [0x401000], rax (48 89 04 25 disp32);
# mov eax,3; mov dx,0xf4; out dx,eax
CODE = bytes.fromhex("b041e6e9" "48890425 00104000".replace(" ", "") + "b803000000" "66baf400" "ef")


def _run(tmp_path, *args):
    path = tmp_path / "guest.bin"
    path.write_bytes(CODE)
    return CliRunner().invoke(main, ["run", str(path), "--flat-at", "0x400000", "--engine", "unicorn", *args])


def test_flat_binary_console_and_exit_status(tmp_path):
    r = _run(tmp_path, "--json")
    d = json.loads(r.stdout)
    assert (d["console"], d["exit_code"], d["stop_reason"]) == ("A", 3, "exit")
    assert r.exit_code == 3, "the exit status is the guest's exit code"


def test_flat_binary_store_stopped_before_it_retires(tmp_path):
    r = _run(tmp_path, "--protect", "0x401000:8", "--decision", "stop", "--json")
    d = json.loads(r.stdout)
    assert d["stop_reason"] == "stop-decision" and d["exit_code"] is None
    assert r.exit_code == 1
    (v,) = d["violations"]
    assert (v["gpa"], v["size"], v["decision"]) == (0x401000, 8, "stop")
    assert v["rip_at"] == 0x400004 == v["rip"], "Unicorn stops at the storing instruction"
    assert v["instruction"].startswith("mov")


def test_flat_at_needs_a_number(tmp_path):
    r = _run(tmp_path, "--entry", "nowhere")
    assert r.exit_code == 2 and "nowhere" in r.output and "Traceback" not in r.output


def test_an_endless_guest_is_stopped_by_the_timeout(tmp_path):
    path = tmp_path / "loop.bin"
    path.write_bytes(b"\xeb\xfe")  # jmp $
    r = CliRunner().invoke(main, ["run", str(path), "--flat-at", "0x400000", "--engine", "unicorn",
                                  "--timeout", "0.3", "--json"])
    assert json.loads(r.stdout)["stop_reason"] == "timeout"


@pytest.mark.parametrize("value", ["-1", "inf", "nan", "1e309"])
def test_timeout_must_be_finite_and_not_negative(tmp_path, value):
    """(-1 used to run forever; inf ended in a traceback from the timer thread.)"""
    r = _run(tmp_path, f"--timeout={value}")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "timeout" in r.output and "must be a finite number of seconds" in r.output


@pytest.mark.parametrize("memory, expect", [
    ("2000000000000000G", "must be a multiple of 2 MiB from 2 MiB to 512 GiB"),
    ("3M", "must be a multiple of 2 MiB"),
    ("1024G", "from 2 MiB to 512 GiB"),
])
def test_memory_size_is_checked_before_anything_is_allocated(tmp_path, memory, expect):
    r = _run(tmp_path, f"--memory={memory}")
    assert r.exit_code == 2 and "Traceback" not in r.output and expect in r.output


def test_flat_segment_beyond_ram_names_the_flat_image(tmp_path):
    path = tmp_path / "guest.bin"
    path.write_bytes(CODE)
    r = CliRunner().invoke(main, ["run", str(path), "--flat-at", "0x10000000000", "--engine", "unicorn"])
    assert r.exit_code == 2 and "None" not in r.output and "lies beyond guest RAM" in r.output


def test_a_flat_guest_at_gpa_0_runs(tmp_path):
    """(Unicorn used to stop before the first instruction: 0 was its stop address.)"""
    path = tmp_path / "at0.bin"
    path.write_bytes(bytes.fromhex("b805000000" "e7f4"))  # mov eax,5; out 0xf4,eax
    r = CliRunner().invoke(main, ["run", str(path), "--flat-at", "0", "--engine", "unicorn", "--json"])
    assert r.exit_code == 5 and json.loads(r.stdout)["stop_reason"] == "exit"


@pytest.mark.parametrize("args, expect", [
    (["--entry", "0x400000"], "--entry applies to a flat binary"),
    (["--flat-at", "0x400000", "--decision", "stop"], "--decision applies to --protect ranges"),
    (["--flat-at", "0x400000", "--record", ""], "--record"),
])
def test_options_that_would_be_ignored_are_refused(tmp_path, args, expect):
    path = tmp_path / "guest.bin"
    path.write_bytes(CODE)
    r = CliRunner().invoke(main, ["run", str(path), "--engine", "unicorn", *args])
    assert r.exit_code == 2 and expect in r.output and "Traceback" not in r.output


def test_demo_engine_reaches_every_guest_part(monkeypatch):
    """`sppkit demo --engine unicorn`: the four uses run on that engine too."""
    import sppkit.demo as demo
    from sppkit.usecases import checkpoint, device, guard, monitor

    seen = {}
    for mod, name in ((monitor, "demo_monitor"), (device, "demo_device"), (checkpoint, "demo_checkpoint"),
                      (guard, "demo_guard")):
        monkeypatch.setattr(mod, name, lambda console, engine="auto", _n=name: seen.__setitem__(_n, engine))
    for name in ("processor_demo", "vm_demo", "guest_demo"):
        monkeypatch.setattr(demo, name, lambda *a, **k: None)
    monkeypatch.setattr("sppkit.guests.toolchain_status", lambda: (True, "ok"))
    r = CliRunner().invoke(main, ["demo", "--engine", "unicorn"])
    assert r.exit_code == 0, r.output
    assert seen == dict.fromkeys(("demo_monitor", "demo_device", "demo_checkpoint", "demo_guard"), "unicorn")


def test_record_writes_the_trace_of_a_run(tmp_path):
    from sppkit.engines.replay import read_trace

    out = tmp_path / "w.npz"
    r = _run(tmp_path, "--protect", "0x401000:8", "--record", str(out))
    assert r.exit_code == 3, r.output
    recs = read_trace(out)
    assert [(int(g), int(s)) for g, s in zip(recs["gpa"], recs["size"])] == [(0x401000, 8)]


def test_record_of_a_failed_run_leaves_no_file(tmp_path, monkeypatch):
    """A run that raises (here: after its writes were recorded) used to close the
    recorder and leave a trace of part of a run; it is aborted: no file, no
    temporary directory."""
    from sppkit.engines.unicorn import UnicornEngine

    real_run = UnicornEngine.run

    def failing_run(self, *a, **kw):
        real_run(self, *a, **kw)
        raise RuntimeError("the engine failed")

    monkeypatch.setattr(UnicornEngine, "run", failing_run)
    out = tmp_path / "w.npz"
    r = _run(tmp_path, "--protect", "0x401000:8", "--record", str(out))
    assert r.exit_code != 0 and "the engine failed" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["guest.bin"]
