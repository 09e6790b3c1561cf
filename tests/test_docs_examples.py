"""Every example in the user documentation (README.md and docs/*.md) works.

What is checked, one test id per example, named ``FILE:LINE``:

* ``test_python_example`` — every ```python block runs, in a fresh namespace (each
  block of the current docs is self-contained; none builds on an earlier one).  A
  trailing comment that states a value is checked against the real value: on an
  expression statement (``r.committed, r.event.denied   # (False, (3,))``, ``vm.stats()
  ["page_granular"], vm.stats()["violations"]   # 2 1``, ``... # True: another sub-page``)
  the expression's value is compared structurally, on a ``print(...)`` the printed text
  (``# 48 0x1aa — no SPP bit``).  A comment states a value when, after an optional
  ``->`` or lower-case label (``allowed:``), the text up to an explanation (``—``,
  ``: ``, ``, ``, ``; ``) is a Python literal, a space-separated sequence of them
  (a tuple), or a repr such as ``HostRange(hpa=..., size=8)``; ``...`` matches
  anything.  Prose comments (``# 2-MiB EPT leaves``) are not values.  Every value
  check must actually run (one inside an ``except`` block that is never entered fails).
  Paths under ``/tmp/`` in string literals are redirected to the test's tmp_path.
* ``test_comment_values_*`` — that parser and matcher, on the docs' own comment forms,
  including mismatches, so the value checks above can fail.
* ``test_toml_example`` — every ```toml block parses with tomllib and, being a policy,
  with :func:`sppkit.policy.parse_policy` (its ``symbol`` entries resolved against the
  bundled guest the README runs it with, ``mixed``).
* ``test_sh_command_line`` — every ``sppkit ...`` command in a ```sh block parses
  against the real click CLI (:data:`sppkit.cli.main`): the subcommand exists, every
  option exists, and click accepts every value (choices, ranges, ints; a
  ``click.Path(exists=True)`` value that is a placeholder such as ``trace.txt`` or
  ``<the guest ELF>`` is replaced by an existing scratch file, and the test says so).
  Values the commands parse themselves (``--protect``, ``--memory``, ``--every``,
  ``--port``, ``--track``) go through the project's own parsers.  Nothing is run.
  Lines running other tools (make, valgrind) are skipped, the tool named in the id.
* ``test_documented_command_runs`` — a selection of the documented command lines run
  end to end in a shell (``sppkit`` = this interpreter's), in a scratch directory
  that has ``examples/``; ``--engine unicorn`` is added where a line leaves the
  engine to ``auto``, so the runs are the same on every host.  Their exit status and
  the documented shape or numbers of their output are checked.
* ``test_relative_link`` / ``test_mentioned_path`` — every relative Markdown link
  points to an existing file, and every ``benchmarks/``, ``examples/``, ``src/``,
  ``tests/`` or ``docs/`` path the prose names exists.

Guests are built with gcc: tests that need one skip, with the reason, where the
toolchain is missing.  No test needs KVM (``engine="auto"`` falls back to Unicorn).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tokenize
import tomllib
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from click.core import ParameterSource

from sppkit.guests import list_programs, toolchain_status

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

GCC_OK, GCC_WHY = toolchain_status()
NEEDS_GCC = pytest.mark.skipif(not GCC_OK, reason=f"bundled guests cannot be built: {GCC_WHY}")
BUNDLED = set(list_programs())

#: Examples that fail because of a bug in the code (not the doc), ``"FILE:LINE": reason``.
#: Each gets ``xfail(strict=True)``: the mark must be removed when the bug is fixed.
KNOWN_CODE_BUGS: dict[str, str] = {}


# =============================================================================== docs
@dataclasses.dataclass(frozen=True)
class Block:
    """A fenced code block: ``fence`` is the 1-based line of its opening fence."""

    rel: str
    fence: int
    lang: str
    lines: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.rel}:{self.fence}"

    @property
    def code(self) -> str:
        return "".join(line + "\n" for line in self.lines)


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _blocks(path: Path) -> list[Block]:
    out: list[Block] = []
    lang = None
    start = 0
    body: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            if lang is None:
                lang, start, body = line.strip()[3:].strip().lower(), n, []
            else:
                out.append(Block(_rel(path), start, lang, tuple(body)))
                lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"{_rel(path)}:{start}: code block never closed"
    return out


ALL_BLOCKS = [b for p in DOC_FILES for b in _blocks(p)]


def _known_bug(example_id: str) -> list:
    reason = KNOWN_CODE_BUGS.get(example_id)
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


# ====================================================================== comment values
@dataclasses.dataclass(frozen=True)
class Expected:
    """The value a comment states: ``text`` as written, ``nodes`` one AST per item
    (several items = the space-separated elements of a tuple)."""

    text: str
    nodes: tuple[ast.expr, ...]


_LABEL = re.compile(r"^(?:->|→|[a-z][a-z -]*:)\s*")
_EXPLANATION = re.compile(r"\s+[—–]\s|:\s|,\s|;\s")


def _is_value(node: ast.AST) -> bool:
    """A literal, or a repr like ``HostRange(hpa=..., size=8)``: no names, no operators."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return all(_is_value(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(k is not None and _is_value(k) for k in node.keys) and all(_is_value(v) for v in node.values)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float))
    if isinstance(node, ast.Call):
        return (isinstance(node.func, ast.Name) and node.func.id[:1].isupper()
                and all(_is_value(a) for a in node.args) and all(k.arg and _is_value(k.value) for k in node.keywords))
    return False


def _split_items(text: str) -> list[str]:
    """``"22 129 0 'mov [rdx],al' False"`` -> its five items (whitespace at bracket depth 0)."""
    items: list[str] = []
    depth = 0
    begin = end = None
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.INDENT, tokenize.DEDENT):
                continue
            if tok.type == tokenize.ERRORTOKEN:
                return []
            if begin is None:
                begin = tok.start[1]
            elif depth == 0 and end is not None and tok.start[1] > end:
                items.append(text[begin:end])
                begin = tok.start[1]
            if tok.string in "([{" and tok.type == tokenize.OP:
                depth += 1
            elif tok.string in ")]}" and tok.type == tokenize.OP:
                depth -= 1
            end = tok.end[1]
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return []
    if begin is not None and end is not None:
        items.append(text[begin:end])
    return items


def _parse_value(text: str) -> tuple[ast.expr, ...] | None:
    if not text:
        return None
    try:
        node = ast.parse(text, mode="eval").body
        if _is_value(node):
            return (node,)
    except SyntaxError:
        pass
    items = _split_items(text)
    if len(items) < 2:
        return None
    nodes = []
    for item in items:
        try:
            node = ast.parse(item, mode="eval").body
        except SyntaxError:
            return None
        if not _is_value(node):
            return None
        nodes.append(node)
    return tuple(nodes)


def parse_expected(comment: str) -> Expected | None:
    """The value a trailing comment states, or None for prose."""
    text = _LABEL.sub("", comment.lstrip("#").strip(), count=1)
    cuts = sorted({len(text), *(m.start() for m in _EXPLANATION.finditer(text))}, reverse=True)
    for cut in cuts:
        candidate = text[:cut].strip()
        nodes = _parse_value(candidate)
        if nodes is not None:
            return Expected(candidate, nodes)
    return None


def _match(node: ast.expr, actual) -> bool:
    if isinstance(node, ast.Constant):
        if node.value is Ellipsis:
            return True
        if isinstance(node.value, bool) or isinstance(actual, bool):
            return actual is node.value
        return type(actual) is not bool and actual == node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        kind = tuple if isinstance(node, ast.Tuple) else list
        return (isinstance(actual, kind) and len(actual) == len(node.elts)
                and all(_match(e, a) for e, a in zip(node.elts, actual)))
    if isinstance(node, ast.Call):
        assert isinstance(node.func, ast.Name)
        if type(actual).__name__ != node.func.id:
            return False
        if dataclasses.is_dataclass(actual):
            names = [f.name for f in dataclasses.fields(actual)]
        else:
            names = list(getattr(actual, "_fields", ()))
        if len(node.args) > len(names):
            return False
        pairs = [(getattr(actual, n), a) for n, a in zip(names, node.args)]
        for k in node.keywords:
            if not hasattr(actual, k.arg):
                return False
            pairs.append((getattr(actual, k.arg), k.value))
        return all(_match(e, a) for a, e in pairs)
    return actual == ast.literal_eval(node)  # sets, dicts, -1


def matches_value(exp: Expected, actual) -> bool:
    """An expression's value against the comment: one item, or a tuple of the items."""
    if len(exp.nodes) == 1:
        return _match(exp.nodes[0], actual)
    return _match(ast.Tuple(elts=list(exp.nodes), ctx=ast.Load()), actual)


def matches_output(exp: Expected, printed: str) -> bool:
    """Printed text against the comment's text; whitespace-insensitive, ``...`` = anything."""
    pattern = r".*?".join(re.escape(" ".join(part.split())) for part in exp.text.split("..."))
    return re.fullmatch(pattern, " ".join(printed.split()), re.S) is not None


@pytest.mark.parametrize(("comment", "text"), [
    ("# allowed: (HostRange(hpa=..., size=8),)", "(HostRange(hpa=..., size=8),)"),
    ("# 48 0x1aa — no SPP bit, as on hardware", "48 0x1aa"),
    ("# -> 512, the batch limit", "512"),
    ("# True: another sub-page of the same page", "True"),
    ("# (False, (3,))", "(False, (3,))"),
    ("# 2 1", "2 1"),
    ("# 22 129 0 'mov [rdx],al' False", "22 129 0 'mov [rdx],al' False"),
    ("# [0xFFFFFFFF]: every sub-page writable", "[0xFFFFFFFF]"),
    ("# 2-MiB EPT leaves", None),
    ("# read-only, bit 61", None),
    ("# only sub-page 0 writable", None),
    ("# or EMULATE, UNPROTECT, STOP", None),
    ("# sub-page 3", None),
    ("# the page's previous map comes back", None),
])
def test_comment_values_parse(comment, text):
    """The docs' comment forms: which state a value, and which part of them is it."""
    exp = parse_expected(comment)
    assert (exp.text if exp else None) == text


@pytest.mark.parametrize(("comment", "actual", "ok"), [
    ("# 2 1", (2, 1), True),
    ("# 2 1", (2, 2), False),
    ("# 2 1", [2, 1], False),
    ("# True: x", True, True),
    ("# True: x", 1, False),
    ("# 0", False, False),
    ("# (False, (3,))", (False, (3,)), True),
    ("# (False, (3,))", (False, (3, 4)), False),
    ("# 22 129 0 'mov [rdx],al' False", (22, 129, 0, "mov [rdx],al", False), True),
    ("# 22 129 0 'mov [rdx],al' False", (22, 129, 0, "mov [rdx],al", True), False),
    ("# [0xFFFFFFFF]: every sub-page writable", [0xFFFFFFFF], True),
    ("# [0xFFFFFFFF]: every sub-page writable", [0xFFFFFFFE], False),
])
def test_comment_values_match(comment, actual, ok):
    """The matcher is strict (bool is not int, tuple is not list) and can fail."""
    exp = parse_expected(comment)
    assert exp is not None and matches_value(exp, actual) is ok


def test_comment_values_match_reprs_and_output():
    """``...`` in a repr or in printed text matches anything, the rest must be equal."""
    from sppkit.arch import HostRange

    exp = parse_expected("# allowed: (HostRange(hpa=..., size=8),)")
    assert exp is not None
    assert matches_value(exp, (HostRange(hpa=0x101010, size=8),))
    assert not matches_value(exp, (HostRange(hpa=0x101010, size=4),))
    assert not matches_value(exp, HostRange(hpa=0x101010, size=8))
    printed = parse_expected("# 48 0x1aa — no SPP bit")
    assert printed is not None
    assert matches_output(printed, "48 0x1aa\n")
    assert not matches_output(printed, "48 0x1ab\n")
    assert not matches_output(printed, "48 0x1aa 7\n")


# ===================================================================== python blocks
def _comments(code: str, offset: int) -> dict[int, str]:
    """``{doc line: comment}`` of a block whose first line is doc line ``offset + 1``."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0] + offset] = tok.string
    return out


class _Instrument(ast.NodeTransformer):
    """Wraps every expression statement whose comment states a value in a check, and
    points ``/tmp/...`` string literals into ``tmp``."""

    def __init__(self, comments: dict[int, str], tmp: Path) -> None:
        self.comments = comments
        self.tmp = tmp
        self.checks: dict[int, tuple[str, Expected]] = {}

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if isinstance(node.value, str) and node.value.startswith("/tmp/"):
            return ast.copy_location(ast.Constant(str(self.tmp / node.value[len("/tmp/"):])), node)
        return node

    def visit_Expr(self, node: ast.Expr) -> ast.AST:
        self.generic_visit(node)
        line = node.end_lineno
        comment = self.comments.get(line) if line is not None else None
        exp = parse_expected(comment) if comment else None
        if exp is None or line is None:
            return node
        assert comment is not None
        self.checks[line] = (comment, exp)
        call = node.value
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "print":
            ctx = ast.Call(ast.Name("__doc_print__", ast.Load()), [ast.Constant(line)], [])
            new: ast.stmt = ast.With(items=[ast.withitem(context_expr=ctx)], body=[node])
        else:
            new = ast.Expr(ast.Call(ast.Name("__doc_value__", ast.Load()), [ast.Constant(line), node.value], []))
        return ast.fix_missing_locations(ast.copy_location(new, node))


#: Fewest value comments each block must have recognised (a guard against a parser
#: that silently stops recognising them, and against examples losing their results).
MIN_CHECKS = {
    "README.md:49": 2,
    "README.md:70": 4,
    "docs/usecases-checkpoint-guard.md:27": 2,
    "docs/usecases-checkpoint-guard.md:168": 1,
    "docs/usecases-monitor-device.md:100": 5,
}


def _python_params():
    for b in ALL_BLOCKS:
        if b.lang not in ("python", "py", "python3"):
            continue
        marks = _known_bug(b.id)
        strings = {n.value for n in ast.walk(ast.parse(b.code)) if isinstance(n, ast.Constant)}
        if strings & BUNDLED:
            marks.append(NEEDS_GCC)
        yield pytest.param(b, id=b.id, marks=marks)


PYTHON_BLOCKS = list(_python_params())


def test_python_blocks_are_all_known():
    """MIN_CHECKS names exactly the python blocks of the docs (update it with them)."""
    assert {p.id for p in PYTHON_BLOCKS} == set(MIN_CHECKS)


@pytest.mark.parametrize("block", PYTHON_BLOCKS)
def test_python_example(block: Block, tmp_path):
    """Run the block; every value its comments state is the real value."""
    tree = ast.parse(block.code, filename=block.rel)
    ast.increment_lineno(tree, block.fence)
    inst = _Instrument(_comments(block.code, block.fence), tmp_path)
    tree = ast.fix_missing_locations(inst.visit(tree))
    got: dict[int, str] = {}
    failures: list[str] = []

    def value(line: int, actual):
        comment, exp = inst.checks[line]
        got[line] = repr(actual)
        if not matches_value(exp, actual):
            failures.append(f"{block.rel}:{line}: the comment says {exp.text}, the value is {actual!r}")
        return actual

    @contextlib.contextmanager
    def printed(line: int):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            yield
        comment, exp = inst.checks[line]
        got[line] = buf.getvalue()
        if not matches_output(exp, buf.getvalue()):
            failures.append(f"{block.rel}:{line}: the comment says {exp.text!r}, printed {buf.getvalue()!r}")

    ns = {"__name__": "__doc_example__", "__doc_value__": value, "__doc_print__": printed}
    exec(compile(tree, block.rel, "exec"), ns)  # noqa: S102 - the documented example
    for line, (comment, _) in sorted(inst.checks.items()):
        if line not in got:
            failures.append(f"{block.rel}:{line}: never reached, so {comment!r} is not shown")
    assert not failures, "\n".join(failures)
    assert len(inst.checks) >= MIN_CHECKS[block.id], (
        f"{block.id}: only {len(inst.checks)} result comments recognised: {sorted(inst.checks)}")


# ======================================================================= toml blocks
TOML_BLOCKS = [pytest.param(b, id=b.id, marks=_known_bug(b.id)) for b in ALL_BLOCKS if b.lang == "toml"]


@pytest.mark.parametrize("block", TOML_BLOCKS)
def test_toml_example(block: Block):
    """The block is TOML; a policy (only ``decision``/``protect`` at the top) loads with
    the project's policy parser, symbols resolved against the bundled ``mixed`` guest."""
    from sppkit.policy import parse_policy

    doc = tomllib.loads(block.code)
    if not doc or not set(doc) <= {"decision", "protect"}:
        return  # plain TOML: parsing it was the check
    image = None
    if any("symbol" in e for e in doc.get("protect", [])):
        if not GCC_OK:
            pytest.skip(f"the policy names symbols of the bundled `mixed` guest, which cannot be built: {GCC_WHY}")
        from sppkit.guests import build_guest, load_elf

        image = load_elf(build_guest("mixed"))
    pol = parse_policy(block.code, source=block.id, image=image)
    assert len(pol) == len(doc.get("protect", []))
    for entry, raw in zip(pol, doc.get("protect", [])):
        assert entry.decision.value == raw.get("decision", doc.get("decision", "skip"))
        if "start" in raw:
            assert (entry.start, entry.length) == (raw["start"], raw["length"])


def test_example_policy_files_load():
    """Every ``examples/*.toml`` is a policy that loads against the bundled guest named
    after it (``examples/mixed.toml`` -> ``mixed``)."""
    from sppkit.policy import load_policy

    from sppkit.guests import build_guest, load_elf

    files = sorted((REPO / "examples").glob("*.toml"))
    assert files
    docs = {f: tomllib.loads(f.read_text()) for f in files}
    if not GCC_OK:
        pytest.skip(f"the policies name symbols of bundled guests, which cannot be built: {GCC_WHY}")
    for f, doc in docs.items():
        assert f.stem in BUNDLED, f"{f.name}: no bundled guest of that name to load it with"
        pol = load_policy(f, load_elf(build_guest(f.stem)))
        assert len(pol) == len(doc["protect"])


# ========================================================================= sh blocks
_PLACEHOLDER = re.compile(r"<([A-Za-z][^<>]*)>")
_OPERATORS = {"&&", "||", ";", "|"}


@dataclasses.dataclass(frozen=True)
class ShLine:
    """One line of a ```sh block (continuations joined): its commands, operators dropped."""

    rel: str
    line: int
    text: str

    @property
    def id(self) -> str:
        return f"{self.rel}:{self.line}"

    def commands(self, placeholders: dict[str, str] | None = None) -> list[list[str]]:
        text = _PLACEHOLDER.sub(lambda m: (placeholders or {}).get(m.group(1), f"PLACEHOLDER_{m.group(1)}")
                                .replace(" ", "_"), self.text)
        tokens = shlex.split(text, comments=True)
        cmds: list[list[str]] = [[]]
        for t in tokens:
            if t in _OPERATORS:
                cmds.append([])
            else:
                cmds[-1].append(t)
        return [c for c in cmds if c]

    @property
    def command_text(self) -> str:
        """The line without its comment, whitespace normalised (how E2E specs name it)."""
        return " && ".join(" ".join(c) for c in self.commands())


def _sh_lines() -> list[ShLine]:
    out = []
    for b in ALL_BLOCKS:
        if b.lang not in ("sh", "bash", "shell", "console"):
            continue
        pending, first = "", 0
        for i, raw in enumerate(b.lines, b.fence + 1):
            if not pending:
                first = i
            if raw.rstrip().endswith("\\"):
                pending += raw.rstrip()[:-1] + " "
                continue
            text = (pending + raw).strip()
            pending = ""
            if text and not text.startswith("#"):
                out.append(ShLine(b.rel, first, text))
    return out


SH_LINES = _sh_lines()


def _sh_params():
    for sl in SH_LINES:
        tools = [c[0] for c in sl.commands()]
        if "sppkit" in tools:
            yield pytest.param(sl, id=sl.id, marks=_known_bug(sl.id))
        else:
            tool = tools[0] if tools else "nothing"
            yield pytest.param(sl, id=f"{sl.id}:{tool}-not-sppkit",
                               marks=pytest.mark.skip(reason=f"runs {tool}, not sppkit: nothing to check here"))


def _validators() -> dict[str, Callable[[str], object]]:
    """Values the commands parse in their bodies, through the project's own parsers."""
    from sppkit.engines import parse_size
    from sppkit.policy import parse_protect_arg, parse_range_arg
    from sppkit.usecases.checkpoint import _parse_every

    return {"protect": parse_protect_arg, "memory": parse_size, "every": _parse_every,
            "port": lambda v: int(v, 0), "track": lambda v: parse_range_arg(v, "--track")}


def check_cli(argv: list[str], scratch: Path) -> list[str]:
    """Parse ``argv`` (``["sppkit", ...]``) with the real CLI, values converted and
    checked by click; nothing runs.  Returns notes on substituted placeholders."""
    from sppkit.cli import main

    assert argv[0] == "sppkit", argv
    # (with each command's context_settings, as click's own make_context: a bare Context
    # would give the commands another help option, which click caches on them)
    parent = click.Context(main, info_name="sppkit", **main.context_settings)
    cmd: click.Command = main
    name, rest = "sppkit", list(argv[1:])
    while isinstance(cmd, click.Group):
        if not rest:
            raise click.UsageError(f"`{' '.join(argv)}`: a subcommand of {name!r} is missing")
        sub_name, sub, rest = cmd.resolve_command(parent, rest)
        assert sub is not None and sub_name is not None
        if isinstance(sub, click.Group):
            parent = click.Context(sub, info_name=sub_name, parent=parent, **sub.context_settings)
        cmd, name = sub, sub_name

    notes = []
    raw, _, _ = cmd.make_parser(click.Context(cmd, info_name=name, parent=parent, **cmd.context_settings)).parse_args(
        args=list(rest))
    for p in cmd.params:
        if not (isinstance(p.type, click.Path) and p.type.exists) or raw.get(p.name) is None:
            continue
        values = raw[p.name] if isinstance(raw[p.name], (list, tuple)) else [raw[p.name]]
        for v in values:
            if os.path.exists(v):
                continue
            stand_in = scratch / re.sub(r"[^\w.-]", "_", os.path.basename(v.rstrip("/")) or "x")
            if p.type.file_okay:
                stand_in.write_bytes(b"")
            else:
                stand_in.mkdir(exist_ok=True)
            rest = [str(stand_in) if t == v else t for t in rest]
            notes.append(f"{p.name}: {v!r} does not exist here; parsed with an existing stand-in")

    ctx = cmd.make_context(name, list(rest), parent=parent)
    with ctx:
        validators = _validators()
        for pname, check in validators.items():
            if pname not in ctx.params or ctx.get_parameter_source(pname) is not ParameterSource.COMMANDLINE:
                continue
            value = ctx.params[pname]
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if pname == "protect" and name == "replay" and not v.strip()[:1].isdigit():
                    continue  # SYMBOL[+OFF][:LEN]: resolved against --elf when it runs
                check(v)
    return notes


@pytest.mark.parametrize("sh", list(_sh_params()))
def test_sh_command_line(sh: ShLine, tmp_path, monkeypatch):
    """Every sppkit command of the line exists, with these options and values."""
    monkeypatch.chdir(REPO)  # examples/mixed.toml etc. are relative to the repository
    notes = []
    for argv in sh.commands():
        if argv[0] == "sppkit":
            notes += check_cli(argv, tmp_path)
    for n in notes:
        print(f"{sh.id}: {n}")


@pytest.mark.parametrize(("argv", "message"), [
    (["sppkit", "rum", "mixed"], "No such command"),
    (["sppkit", "run", "mixed", "--engin", "unicorn"], "No such option"),
    (["sppkit", "run", "mixed", "--engine", "qemu"], "qemu"),
    (["sppkit", "replay", "t.txt", "--format", "strace"], "strace"),
    (["sppkit", "replay", "t.txt", "--top", "-1"], "-1"),
    (["sppkit", "run", "mixed", "--protect", "0x1000"], "START:LENGTH"),
    (["sppkit", "checkpoint", "g", "--every", "lots", "--out", "d"], "--every"),
    (["sppkit", "trace", "convert", "a.txt"], "Missing parameter: out"),
])
def test_check_cli_refuses(argv, message, tmp_path, monkeypatch):
    """check_cli fails on a wrong subcommand, option or value (so the test above can)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises((click.ClickException, ValueError), match=re.escape(message)):
        check_cli(argv, tmp_path)


# ================================================================ end-to-end command runs
ENGINE_COMMANDS = {"run", "monitor", "device", "checkpoint", "restore", "guard", "demo"}


@dataclasses.dataclass
class Run:
    """The documented ``lines`` of ``rel``, run in order; ``checks[i](proc, scratch)``
    after line i (default: exit status 0)."""

    rel: str
    lines: list[str]
    checks: list[Callable | int] = dataclasses.field(default_factory=list)
    setup: Callable[[Path], None] | None = None
    needs_gcc: bool = True


def _rc(expected: int) -> Callable:
    def check(proc, scratch):
        assert proc.returncode == expected, f"exit status {proc.returncode}, documented {expected}\n{proc.stderr}"
    return check


def _json_out(proc) -> dict:
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout)


def _check_run_json(proc, scratch):
    d = _json_out(proc)
    assert proc.returncode == 0 and d["engine"] == "unicorn" and d["stop_reason"] == "exit" and d["exit_code"] == 0
    protected = int(re.search(r"protected writes = (\d+)", d["console"]).group(1))
    st = d["stats"]
    assert st["violations"] == protected == sum(v["violations"] for v in st["top_pages"])
    assert st["exits_avoided"] == st["page_granular"] - st["violations"] > 0


def _check_record_replay(proc, scratch):
    assert proc.returncode == 0, proc.stderr
    assert (scratch / "run.npz").is_file()
    assert "violations" in proc.stdout


def _check_doctor(proc, scratch):
    assert proc.returncode == 0, proc.stderr
    for row in ("KVM", "Unicorn", "gcc", "valgrind"):
        assert row in proc.stdout


def _lackey_trace(scratch: Path) -> None:
    # stores: 0x4c0010 (protected sub-page 0), 0x4c0100 (same page, sub-page 2: not
    # protected), 0x500000 (another page), and a modify of sub-page 1
    (scratch / "trace.txt").write_text(
        "==1== lackey\nI  0401000,3\n S 04c0010,8\nI  0401003,4\n S 04c0100,8\n L 04c0000,8\n"
        " S 0500000,8\nI  0401007,2\n M 04c0080,4\n")


def _check_lackey_replay(proc, scratch):
    d = _json_out(proc)
    assert (d["writes"], d["accesses"], d["page_granular_exits"], d["violations"], d["spp_misses"],
            d["exits_avoided"], d["skipped_records"]) == (4, 4, 3, 2, 1, 1, 0)
    assert {ip["rip"]: ip["violations"] for ip in d["top_ips"]} == {0x401000: 1, 0x401007: 1}


def _check_my_guest_stop(proc, scratch):
    assert proc.returncode == 1, proc.stderr  # `sppkit run`: 1 when the run ends otherwise (STOP)
    assert "stop-decision" in proc.stdout


def _check_monitor_blocked(proc, scratch):
    assert proc.returncode == 0, proc.stderr
    assert "the rootkit had no effect" in proc.stdout
    assert re.search(r"SPP 450 vs page-granular 60384", proc.stdout), "README / use-case doc figures"


def _check_monitor_symbols(proc, scratch):
    # the IDT is not watched here: the rootkit's gate hook goes through (verdict bit 4)
    assert proc.returncode == 4, proc.stderr
    assert "task3_caps" in proc.stdout and "syscall_table" in proc.stdout


def _check_device_json(proc, scratch):
    d = _json_out(proc)
    assert proc.returncode == 0 and d["intact"] is True
    st = d["run"]["stats"]
    assert (st["violations"], st["page_granular"], st["exits_avoided"]) == (7, 447, 440)


def _check_device_page_granular(proc, scratch):
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"exits in total under this mode\s*│\s*447\b", proc.stdout)


def _check_restore(proc, scratch):
    assert proc.returncode == 0, proc.stderr
    assert "verified" in proc.stdout


def _check_resume(proc, scratch):
    assert proc.returncode == 0, proc.stderr
    assert "identical to the checkpointed run" in proc.stdout


def _check_guard_stop(proc, scratch):
    assert proc.returncode == 1, proc.stderr  # documented: exit status 1 = overflow found
    assert "1 write(s) into guards" in proc.stdout and "buffer #22" in proc.stdout


def _check_guard_skip(proc, scratch):
    assert proc.returncode == 1, proc.stderr  # an overflow was found (and the guest finished)
    assert "3 write(s) into guards" in proc.stdout and "+0..+2 past" in proc.stdout
    assert "guest exit code 0" in proc.stdout


def _check_guard_none(proc, scratch):
    assert proc.returncode == 0, proc.stderr  # documented: no overflow, exit status 0
    assert "no overflow" in proc.stdout


def _check_plot(proc, scratch):
    assert proc.returncode == 0, proc.stderr
    assert (scratch / "mixed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_sweep(proc, scratch):
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"secret\s*│\s*0x[0-9a-f]+\s*│\s*32\b", proc.stdout)


RUNS = [
    Run("README.md", ["sppkit run mixed --policy examples/mixed.toml --engine unicorn --json"], [_check_run_json]),
    Run("README.md", ["sppkit run ./my-guest.elf --protect 0x404100:32 --decision stop"], [_check_my_guest_stop]),
    Run("README.md", ["sppkit doctor"], [_check_doctor], needs_gcc=False),
    Run("README.md", ["sppkit replay trace.txt --format lackey --protect 0x4c0000:256 --json"], [_check_lackey_replay],
        setup=_lackey_trace, needs_gcc=False),
    Run("README.md", ["sppkit run mixed --policy examples/mixed.toml --record run.npz && "
                      "sppkit replay run.npz --protect 0x404100:32"], [_check_record_replay]),
    Run("docs/usecases-monitor-device.md", ["sppkit monitor"], [_check_monitor_blocked]),
    Run("docs/usecases-monitor-device.md", ["sppkit monitor minikernel --decision emulate"], [_rc(7)]),
    Run("docs/usecases-monitor-device.md",
        ["sppkit monitor minikernel --protect-symbols syscall_table,task3_ids,task*_caps --engine unicorn"],
        [_check_monitor_symbols]),
    Run("docs/usecases-monitor-device.md", ["sppkit device --engine unicorn --json"], [_check_device_json]),
    Run("docs/usecases-monitor-device.md", ["sppkit device --page-granular"], [_check_device_page_granular]),
    Run("docs/usecases-checkpoint-guard.md",
        ["sppkit checkpoint ckpt_kvstore --at-port-signal --out /tmp/kv", "sppkit restore /tmp/kv --to 2",
         "sppkit restore /tmp/kv --to 2 --resume --engine unicorn"], [_rc(0), _check_restore, _check_resume]),
    Run("docs/usecases-checkpoint-guard.md", ["sppkit checkpoint ckpt_kvstore --every 200-writes --out /tmp/kv200"]),
    Run("docs/usecases-checkpoint-guard.md", ["sppkit guard guard_bufs"], [_check_guard_stop]),
    Run("docs/usecases-checkpoint-guard.md", ["sppkit guard guard_bufs --decision skip"], [_check_guard_skip]),
    Run("docs/usecases-checkpoint-guard.md", ["sppkit guard guard_bufs --overflow-by 0"], [_check_guard_none]),
    Run("docs/replay.md",
        ["sppkit run mixed --engine unicorn --policy examples/mixed.toml --record mixed.npz",
         "sppkit replay mixed.npz --policy examples/mixed.toml --elf <the guest ELF> --plot mixed.png",
         "sppkit replay mixed.npz --elf <the guest ELF> --sweep"], [_rc(0), _check_plot, _check_sweep]),
]


def _find_line(rel: str, command: str) -> ShLine:
    want = " ".join(shlex.split(_PLACEHOLDER.sub(lambda m: f"PLACEHOLDER_{m.group(1)}".replace(" ", "_"), command)))
    for sl in SH_LINES:
        if sl.rel == rel and sl.command_text == want:
            return sl
    raise AssertionError(f"{rel} no longer documents `{command}`: update RUNS in this test")


def _run_params():
    for r in RUNS:
        first = _find_line(r.rel, r.lines[0])
        marks = _known_bug(first.id) + ([NEEDS_GCC] if r.needs_gcc else [])
        yield pytest.param(r, id=first.id, marks=marks)


def _sppkit_bin(scratch: Path) -> Path:
    """A directory whose ``sppkit`` is this interpreter's."""
    bindir = scratch / "bin"
    bindir.mkdir()
    script = bindir / "sppkit"
    installed = Path(sys.executable).parent / "sppkit"
    target = f'"{installed}"' if installed.is_file() else f'"{sys.executable}" -m sppkit.cli'
    script.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
    script.chmod(0o755)
    return bindir


def _shell_line(sl: ShLine, scratch: Path, placeholders: dict[str, str]) -> str:
    """The documented line as the test runs it: placeholders filled, /tmp/ -> scratch,
    ``--engine unicorn`` where the engine was left to auto."""
    parts = []
    for argv in sl.commands(placeholders):
        argv = [str(scratch) + "/" + a[len("/tmp/"):] if a.startswith("/tmp/") else a for a in argv]
        argv = [placeholders.get(a, a) for a in argv]
        if (argv[0] == "sppkit" and len(argv) > 1 and argv[1] in ENGINE_COMMANDS
                and not any(a == "--engine" or a.startswith("--engine=") for a in argv)):
            argv = [*argv, "--engine", "unicorn"]
        parts.append(shlex.join(argv))
    return " && ".join(parts)


@pytest.mark.parametrize("spec", list(_run_params()))
def test_documented_command_runs(spec: Run, tmp_path):
    """The documented line(s) run, with the documented exit status and output."""
    from sppkit.guests import build_guest

    scratch = tmp_path / "work"
    scratch.mkdir()
    (scratch / "examples").symlink_to(REPO / "examples", target_is_directory=True)
    env = dict(os.environ, PATH=f"{_sppkit_bin(tmp_path)}{os.pathsep}{os.environ.get('PATH', '')}",
               COLUMNS="200", NO_COLOR="1")
    placeholders: dict[str, str] = {}
    if spec.needs_gcc:
        mixed = str(build_guest("mixed"))
        placeholders = {"the guest ELF": mixed, "./my-guest.elf": mixed}
    if spec.setup is not None:
        spec.setup(scratch)
    checks = spec.checks or [_rc(0)] * len(spec.lines)
    assert len(checks) == len(spec.lines)
    for command, check in zip(spec.lines, checks):
        line = _shell_line(_find_line(spec.rel, command), scratch, placeholders)
        proc = subprocess.run(["sh", "-c", line], cwd=scratch, env=env, capture_output=True, text=True, timeout=120)
        if isinstance(check, int):
            check = _rc(check)
        try:
            check(proc, scratch)
        except AssertionError as e:
            raise AssertionError(f"`{line}`: {e}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n"
                                 f"{proc.stderr[-3000:]}") from None


# ====================================================================== links, paths
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_PATH = re.compile(r"(?<![\w/.~-])((?:benchmarks|examples|src|tests|docs)/[\w./*-]*)")


def _links():
    for p in DOC_FILES:
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            for m in _LINK.finditer(line):
                target = m.group(1)
                if re.match(r"^[a-z][a-z+.-]*:", target) or target.startswith("#"):
                    continue  # a URL or an anchor in the same file
                yield pytest.param(p, target, id=f"{_rel(p)}:{n}->{target}")


def _paths():
    seen = set()
    for p in DOC_FILES:
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            for m in _PATH.finditer(line):
                path = m.group(1).rstrip(".,;:")
                if (_rel(p), path) in seen:
                    continue
                seen.add((_rel(p), path))
                yield pytest.param(path, id=f"{_rel(p)}:{n}:{path}")


@pytest.mark.parametrize(("doc", "target"), list(_links()))
def test_relative_link(doc: Path, target: str):
    """A relative link resolves, from the linking file's directory, to an existing file."""
    path = (doc.parent / target.split("#", 1)[0]).resolve()
    assert path.exists(), f"{_rel(doc)} links to {target}, which does not exist"


@pytest.mark.parametrize("path", list(_paths()))
def test_mentioned_path(path: str):
    """A repository path named in the prose (a benchmark script, an example, a source
    or test file; ``*`` as a glob) exists."""
    hits = list(REPO.glob(path.rstrip("/"))) if "*" in path else [REPO / path]
    assert any(h.exists() for h in hits), f"{path} does not exist in the repository"


def _layout_entries():
    """The README's Layout block: ``src/...  a.py b.py kvm/ (binding.py, engine.py) ...``."""
    for b in ALL_BLOCKS:
        if b.rel != "README.md" or b.lang or not any(line.startswith("src/sppkit/") for line in b.lines):
            continue
        for n, line in enumerate(b.lines, b.fence + 1):
            if not line.startswith("src/"):
                continue
            base, *names = line.split()
            sub = ""
            inside = False
            for tok in names:
                if tok.startswith("("):
                    inside = True
                name = tok.strip("(),")
                yield pytest.param(f"{base}{sub if inside else ''}{name}", id=f"README.md:{n}:{name}")
                if tok.endswith(")"):
                    inside = False
                if name.endswith("/") and not inside:
                    sub = name


@pytest.mark.parametrize("path", list(_layout_entries()))
def test_layout_entry_exists(path: str):
    """Every file and directory the README's Layout lists exists where it says."""
    assert (REPO / path).exists(), f"README Layout lists {path}, which does not exist"


def test_docs_have_examples():
    """The collection above found the examples (a broken fence parser finds none)."""
    langs = [b.lang for b in ALL_BLOCKS]
    assert langs.count("python") >= 5 and langs.count("toml") >= 1 and langs.count("sh") >= 8
    assert len(list(_links())) >= 5 and sum(1 for sl in SH_LINES if sl.commands()[0][0] == "sppkit") >= 25
    assert shutil.which("sh"), "the end-to-end runs need a POSIX shell"
