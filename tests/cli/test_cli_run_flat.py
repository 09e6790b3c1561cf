"""`sppkit run` on a flat binary (--flat-at), on the engine that runs everywhere."""

import json

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
