"""``sppkit run`` on the KVM engine: the human report, ``--json``, exit statuses, and
one-line errors for bad input (never a traceback)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from kvm_engine_helpers import GCC_OK, GCC_REASON, UNEMULATABLE_C, build_source, bundled, requires_gcc, requires_kvm

from sppkit.cli import main

REPO = Path(__file__).resolve().parents[3]
MIXED_POLICY = REPO / "examples" / "mixed.toml"


def invoke(*args: str):
    result = CliRunner().invoke(main, list(args), catch_exceptions=True)
    # an exception other than SystemExit would be a traceback for the user
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def assert_one_line_error(text: str, *needles: str) -> None:
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if re.match(r"^(sppkit: error: |Error: )", line)]
    assert len(errors) == 1, text
    for needle in needles:
        assert needle in errors[0], errors[0]


@requires_kvm
@requires_gcc
class TestRunKvm:
    def test_human_report_has_console_and_violation_table(self):
        page = bundled("selftest").symbol("protected_page").addr
        r = invoke("run", "selftest", "--engine", "kvm", "--protect", f"{page:#x}:4096")
        assert r.exit_code == 0, r.output
        out = r.stdout
        assert "selftest: 0/32 writes stuck, 32 blocked" in out
        assert "violations (32)" in out
        for col in ("gpa", "symbol", "instruction", "decision"):
            assert col in out
        assert f"{page:#x}" in out and "protected_page" in out and "mov" in out
        assert "stop: exit, guest exit code 0" in out
        assert "engine: kvm" in r.stderr

    def test_json_has_the_run_and_every_violation(self):
        img = bundled("mixed")
        r = invoke("run", "mixed", "--engine", "kvm", "--policy", str(MIXED_POLICY), "--json")
        assert r.exit_code == 0, r.output
        doc = json.loads(r.stdout)
        assert doc["engine"] == "kvm" and doc["exit_code"] == 0 and doc["stop_reason"] == "exit"
        reported = int(re.search(r"protected writes = (\d+)", doc["console"]).group(1))
        assert reported == 44
        assert doc["violations_total"] == len(doc["violations"]) == reported
        assert doc["stats"]["violations"] == reported
        assert doc["stats"]["writes"] >= reported
        secret = img.symbol("secret")
        for v in doc["violations"]:
            for key in ("gpa", "size", "rip_at", "rip_after", "decision", "instruction", "symbol", "data"):
                assert key in v, key
            assert v["decision"] == "skip"
            assert "mov" in v["instruction"]
            assert v["rip_at"] < v["rip_after"] <= v["rip_at"] + 15
            assert re.match(r"^(secret|config|canary)", v["symbol"])
        assert any(secret.addr <= v["gpa"] < secret.end for v in doc["violations"])

    def test_exit_status_is_the_guest_exit_code(self):
        """readback returns its count of stores that did not stick."""
        target = bundled("readback").symbol("target").addr
        r = invoke("run", "readback", "--engine", "kvm", "--protect", f"{target + 0x1000:#x}:128", "--json")
        doc = json.loads(r.stdout)
        # sub-page 0 of page 1: 8 probes of its own + the page-crossing probe of page 0
        assert doc["exit_code"] == 9
        assert r.exit_code == 9

    def test_stop_decision_exit_status_1(self):
        page = bundled("selftest").symbol("protected_page").addr
        r = invoke("run", "selftest", "--engine", "kvm", "--protect", f"{page + 0x80:#x}:1", "--decision", "stop",
                   "--json")
        assert r.exit_code == 1
        doc = json.loads(r.stdout)
        assert doc["stop_reason"] == "stop-decision" and doc["exit_code"] is None
        assert doc["rip_after"] is not None
        assert [v["gpa"] for v in doc["violations"]] == [page + 0x80]

    def test_cpl0(self):
        page = bundled("selftest").symbol("protected_page").addr
        r = invoke("run", "selftest", "--engine", "kvm", "--cpl", "0", "--protect", f"{page:#x}:256", "--json")
        doc = json.loads(r.stdout)
        assert r.exit_code == 0 and len(doc["violations"]) == 2
        assert "2 blocked" in doc["console"]

    def test_unemulatable_store_is_one_line_error_exit_1(self, tmp_path):
        img = build_source(UNEMULATABLE_C, "unemulatable", tmp_path, ("-DMODE=1",))
        area = img.symbol("area").addr
        r = invoke("run", str(img.path), "--engine", "kvm", "--protect", f"{area:#x}:4096")
        assert r.exit_code == 1
        assert_one_line_error(r.stderr, "fxsave64", f"gpa={area + 0x100:#x}")


@requires_gcc
class TestBadInput:
    def test_unknown_symbol_in_policy(self, tmp_path):
        bad = tmp_path / "bad.toml"
        bad.write_text('[[protect]]\nsymbol = "no_such_symbol"\n')
        r = invoke("run", "mixed", "--engine", "auto", "--policy", str(bad))
        assert r.exit_code == 2
        assert_one_line_error(r.stderr, str(bad), "no_such_symbol")

    def test_bad_decision_in_policy(self, tmp_path):
        bad = tmp_path / "bad.toml"
        bad.write_text('decision = "explode"\n[[protect]]\nsymbol = "secret"\n')
        r = invoke("run", "mixed", "--policy", str(bad))
        assert r.exit_code == 2
        assert_one_line_error(r.stderr, "explode")

    def test_toml_syntax_error(self, tmp_path):
        bad = tmp_path / "bad.toml"
        bad.write_text("[[protect]\n")
        r = invoke("run", "mixed", "--policy", str(bad))
        assert r.exit_code == 2
        assert_one_line_error(r.stderr, "TOML")


def test_unknown_guest_exit_2():
    r = invoke("run", "no-such-guest")
    assert r.exit_code == 2
    assert_one_line_error(r.stderr, "no-such-guest")


@pytest.mark.skipif(not GCC_OK, reason=f"guest toolchain missing: {GCC_REASON}")
def test_real_process_bad_policy_no_traceback(tmp_path):
    """The installed entry point as a subprocess: status 2, one line on stderr."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[[protect]]\nsymbol = "no_such_symbol"\n')
    p = subprocess.run([sys.executable, "-m", "sppkit.cli", "run", "mixed", "--policy", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("sppkit: error: ")
    assert "no_such_symbol" in p.stderr
