"""`sppkit run` on a C file: built with gcc against the guest runtime, as the use-case
commands build theirs.  Skipped, with the reason, where no gcc can build guests."""

import json

import pytest
from click.testing import CliRunner

from sppkit.cli import main
from sppkit.guests import toolchain_status

_ok, _why = toolchain_status()
pytestmark = pytest.mark.skipif(not _ok, reason=f"guest programs cannot be built: {_why}")

HELLO = """\
#include "sppkit_rt.h"
u64 counter;
int main(void) { rt_puts("hello"); counter = 5; return (int)counter + 2; }
"""


def _c(tmp_path, text=HELLO):
    p = tmp_path / "hello.c"
    p.write_text(text)
    return str(p)


def test_a_c_file_is_built_and_run(tmp_path):
    r = CliRunner().invoke(main, ["run", _c(tmp_path), "--engine", "unicorn", "--json"])
    d = json.loads(r.stdout)
    assert (d["console"], d["exit_code"], d["stop_reason"], r.exit_code) == ("hello", 7, "exit", 7)


def test_its_symbols_serve_a_policy(tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text('decision = "stop"\n[[protect]]\nsymbol = "counter"\n')
    r = CliRunner().invoke(main, ["run", _c(tmp_path), "--engine", "unicorn", "--policy", str(policy), "--json"])
    d = json.loads(r.stdout)
    assert d["stop_reason"] == "stop-decision" and r.exit_code == 1
    (v,) = d["violations"]
    assert v["size"] == 8 and v["symbol"].startswith("counter")


def test_a_c_file_that_does_not_compile_is_an_error_with_gcc_s_words(tmp_path):
    r = CliRunner().invoke(main, ["run", _c(tmp_path, "int main(void) { return x; }\n"), "--engine", "unicorn"])
    assert "failed (gcc exit status" in r.output and "undeclared" in r.output
    assert "Traceback" not in r.output
    # the user's source is bad input: status 2, as --help says (it was 1, "the run ended otherwise")
    assert r.exit_code == 2, r.output
