"""Human-readable reports (rich tables) for runs."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .engines.result import RunResult


def _hex(v: int | None) -> str:
    return "—" if v is None else f"{v:#x}"


def print_run(result: RunResult, console: Console, *, max_rows: int = 50) -> None:
    if result.console:
        console.rule(f"guest console ({result.engine})")
        console.out(result.console.rstrip("\n"), highlight=False)
    console.rule("sub-page write protection")
    if result.violations:
        t = Table(title=f"violations ({len(result.violations)})")
        for col in ("gpa", "symbol", "sub-page", "size", "rip", "instruction", "decision"):
            t.add_column(col)
        for v in result.violations[:max_rows]:
            rip = v.rip_at if v.rip_at is not None else v.rip_after
            rip_s = _hex(rip) if v.rip_at is not None else (f"after {_hex(v.rip_after)}" if rip is not None else "—")
            t.add_row(_hex(v.gpa), escape(v.symbol or "—"), ",".join(map(str, v.denied)), str(v.size), rip_s,
                      escape(v.instruction or "—"), v.decision)
        console.print(t)
        if len(result.violations) > max_rows:
            console.print(f"… {len(result.violations) - max_rows} more (use --json for the first 1000)")
    else:
        console.print("no violations")
    st = result.stats
    exits = sum(result.exits.values())
    console.print(
        f"writes to protected pages {st['writes']}, of which SPP violations {st['violations']} "
        f"(page-granular protection would trap {st['page_granular']}; exits avoided {st['exits_avoided']}), "
        f"SPP misses {st['spp_misses']}, engine exits {exits}"
    )
    code = "—" if result.exit_code is None else str(result.exit_code)
    console.print(f"stop: {result.stop_reason}, guest exit code {code}"
                  + (f", rip {_hex(result.rip_at)}" if result.stop_reason in ("stop-decision", "shutdown")
                     and result.rip_at is not None else "")
                  + (f" — {escape(result.detail)}" if result.detail else ""))


def emit_report(report, as_json: bool, printer) -> None:
    """Print a use-case report (``report.to_dict()`` as one JSON object, or the engine
    choice on stderr and ``printer(report, console)``), then exit with the guest's status."""
    import json
    import sys

    import click

    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        Console(stderr=True).print(f"[dim]engine: {report.engine_reason}[/]")
        printer(report, Console())
    sys.exit(report.result.exit_status)
