"""``sppkit replay`` and ``sppkit trace`` (registered on the main group in sppkit.cli).

Heavy imports (matplotlib, pyarrow, dask) happen inside the commands; errors a user can cause are ValueError /
RuntimeError subclasses, printed as one line by the main group.
"""

from __future__ import annotations

import math
import os
import sys

import click

# The API's bounds, one rule: click shows and checks them for --chunk-records and the
# cycle costs.
from .formats import MAX_CHUNK_RECORDS as _MAX_CHUNK
from .replay import MAX_CYCLES as _MAX_CYCLES

_FORMATS = ["auto", "lackey", "csv", "pinatrace", "native"]
_CHUNK = 1 << 20


def _warn(msg: str) -> None:
    click.echo(f"sppkit: warning: {msg}", err=True)


def _report_skipped(skipped: int, examples: list[str]) -> None:
    for e in examples:
        _warn(e)
    if skipped:
        more = f" ({skipped - len(examples)} not shown)" if skipped > len(examples) else ""
        _warn(f"{skipped} malformed record(s) skipped{more}; --strict makes them fatal")


def _finite(ctx, param, value):
    """Reject nan and inf, which FloatRange lets through (and JSON cannot carry)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value}: must be a finite number of cycles, 0 to {_MAX_CYCLES:g}")
    return value


def _refuse_unreadable(what: str, records: int, skipped: int, examples: list[str], formats) -> None:
    """An error (exit status 2, no report, no plot) when not one record could be read:
    most likely the wrong --format."""
    from .formats import unreadable

    if records == 0 and skipped > 0:
        raise unreadable(what, skipped, examples, formats)


def _check_plot(value: str, trace=None) -> None:
    """--plot FILE checked (report.check_plot_path, as plot_replay checks it) before the
    replay whose result it draws; with ``trace``, also against the input trace."""
    from .report import check_plot_path

    try:
        check_plot_path(value, trace)
    except (ValueError, OSError, RuntimeError) as e:  # (RuntimeError: MissingDependency, no matplotlib)
        raise click.BadParameter(str(e), param_hint="'--plot'") from None


def _plot_option(ctx, param, value):
    """--plot FILE: the path alone (the command's body checks it against TRACE, which
    a callback may not have yet)."""
    if value is not None:
        _check_plot(value)
    return value


class _GuestElf(click.Path):
    """--elf: an existing ELF file (click.Path's checks), or the name of a bundled guest
    program (``mixed``...), which the command builds as `sppkit run NAME` does
    (:func:`_load_elf`).  A file of that name wins, as for `sppkit run`."""

    def __init__(self) -> None:
        super().__init__(exists=True, dir_okay=False)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not os.path.lexists(value):
            from ...guests import list_programs

            programs = list_programs()
            if value in programs:
                return value
            self.fail(f"{value!r} is neither a file nor a bundled guest program ({', '.join(programs)})", param, ctx)
        return super().convert(value, param, ctx)


def _load_elf(elf: str):
    """The GuestImage of --elf: the file, or the bundled program of that name, built with
    gcc on first use and cached (``~/.cache/sppkit/guests/NAME-HASH.elf``)."""
    from ...guests import build_guest, list_programs
    from ...guests.elf import load_elf

    if not os.path.lexists(elf) and elf in list_programs():
        from rich.console import Console

        with Console(stderr=True).status(f"building the bundled guest {elf!r} with gcc…"):
            return load_elf(build_guest(elf))
    return load_elf(elf)


def _non_empty(ctx, param, value):
    if value is not None and not value.strip():
        raise click.BadParameter("an empty value")
    return value


def _console(stderr: bool = False):
    """A rich Console; 160 columns when the stream is not a terminal (rich's default of
    80 would squeeze the tables of a piped report)."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 160)


def _parse_protect(arg: str, image):
    """START:LENGTH (integers), or SYMBOL[+OFF][:LENGTH] with --elf: as a policy entry
    with symbol, offset and length (OFF >= 0; LENGTH > 0, default the rest of the
    symbol)."""
    from ...policy import PolicyError, parse_protect_arg, symbol_span

    try:
        return parse_protect_arg(arg)
    except PolicyError as e:
        if image is None:
            if not arg.strip()[:1].isdigit():
                raise PolicyError(f"{e} (or SYMBOL[+OFF][:LENGTH] with --elf FILE)") from None
            raise
    text = arg.strip()
    name, _, length_s = text.partition(":")
    name, plus, off_s = name.partition("+")

    def bad(problem: str) -> click.BadParameter:
        return click.BadParameter(f"{arg!r}: {problem}", param_hint="'--protect'")

    try:
        sym = image.symbol(name.strip())
    except KeyError as e:
        raise bad(str(e)) from None
    try:
        off = int(off_s.strip(), 0) if plus else 0
        length = int(length_s.strip(), 0) if length_s.strip() else None
    except ValueError:
        raise bad("expected SYMBOL[+OFF][:LENGTH] or START:LENGTH (OFF and LENGTH decimal or 0x hex)") from None
    try:
        start, length = symbol_span(sym, off, length)
    except ValueError as e:
        raise bad(str(e)) from None
    if start + length > 1 << 64:
        raise bad(f"range {start:#x}+{length:#x} runs past the 64-bit address space")
    return start, length


def _regions(policy_file, protect, image, *, required: bool):
    """The protected regions ``[(name, start, length), ...]`` of --policy or --protect
    (None if neither is given).  --protect ranges bypass the Policy class, whose
    per-page index would make a huge range slow before the page limit is checked."""
    from ...policy import PolicyError, load_policy

    if policy_file and protect:
        raise click.UsageError("give --policy or --protect, not both")
    if policy_file:
        try:
            pol = load_policy(policy_file, image)
        except PolicyError as e:
            if image is None and "no guest ELF" in str(e):
                raise PolicyError(f"{e}; for `sppkit replay` give the guest with --elf FILE") from None
            raise
        return [(e.name, e.start, e.length) for e in pol]
    if protect:
        out = []
        for p in protect:
            start, length = _parse_protect(p, image)
            out.append((p.strip() if not p.strip()[:1].isdigit() else f"{start:#x}:{length:#x}", start, length))
        return out
    if required:
        raise click.UsageError("nothing to protect: give --policy FILE or --protect START:LENGTH "
                               "(or --sweep with --elf)")
    return None


@click.command("replay",
               short_help="What-if replay of a write trace: exits under page-granular vs sub-page protection.")
@click.argument("trace", type=click.Path(exists=True))
@click.option("--format", "fmt", type=click.Choice(_FORMATS), default="auto", show_default=True,
              help="Trace format (auto: from the name, else from the first lines). A directory is a set of "
                   "shards replayed as one trace, in sorted name order.")
@click.option("--policy", "policy_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML policy (as for `sppkit run`): [[protect]] entries with symbol (needs --elf) or "
                   "start + length.")
@click.option("--protect", multiple=True, metavar="START:LENGTH",
              help="Protect LENGTH bytes at guest-physical START (decimal or 0x hex; repeatable), instead of "
                   "--policy; with --elf also SYMBOL[+OFF][:LENGTH] (default LENGTH: the rest of the symbol).")
@click.option("--elf", "elf_file", type=_GuestElf(), metavar="FILE|NAME",
              help="Guest ELF file, or the name of a bundled guest program (mixed, ...: built with gcc and cached, "
                   "as `sppkit run NAME` does): resolves policy symbols, names pages and IPs, and gives --sweep its "
                   "candidates.")
@click.option("--spp-write-check", type=click.Choice(["all-touched", "first-byte"]), default="all-touched",
              show_default=True, help="all-touched: an access violates if any sub-page it touches is protected; "
                                      "first-byte: only its first byte's sub-page counts (Bochs).")
@click.option("--spp-mode", type=click.Choice(["lazy", "eager"]), default="lazy", show_default=True,
              help="SPPT construction: lazy (one SPP miss per 2-MiB region written) or eager (no misses).")
@click.option("--size", "pin_size", type=click.IntRange(1, 65535), default=8, show_default=True,
              help="Write size in bytes for pinatrace records (they carry none); other formats ignore it.")
@click.option("--strict", is_flag=True, help="A malformed record is an error (default: warn, skip and count).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object on stdout instead of tables (warnings go to stderr).")
@click.option("--plot", "plot_file", metavar="FILE", type=click.Path(dir_okay=False), callback=_plot_option,
              help="Also write a plot (PNG; .svg/.pdf by extension; needs matplotlib): heat map of protected "
                   "pages x sub-pages, and exits page-granular vs SPP.  Not with --sweep.")
@click.option("--top", type=click.IntRange(0), default=10, show_default=True,
              help="Rows in the top pages / sub-pages / IPs lists (sweep: regions printed); 0 = all.")
@click.option("--sweep", is_flag=True,
              help="Per candidate region (policy entries, --protect ranges, or every object symbol of --elf): "
                   "exits under page-granular vs sub-page protection, one table row each.")
@click.option("--sort", type=click.Choice(["avoided", "page", "spp", "name", "address"]), default="avoided",
              show_default=True,
              help="Order of the --sweep rows: most exits avoided, most page-granular exits, most SPP violations, "
                   "by name, or by address.")
@click.option("--dask", "use_dask", is_flag=True,
              help="Replay the shards on a dask.distributed cluster (pip install 'sppkit[distributed]'): a "
                   "local one in this process, or --scheduler's.")
@click.option("--scheduler", metavar="ADDRESS", callback=_non_empty,
              help="With --dask: the address of a running scheduler, e.g. tcp://host:8786.  "
                   "[default: a local cluster]")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="With --dask and no --scheduler: threads of the local cluster.  [default: one per CPU]")
@click.option("--chunk-records", type=click.IntRange(1, _MAX_CHUNK), default=_CHUNK, show_default=True,
              help="Records read and replayed at a time (memory use is about 100 bytes per record of chunk).")
@click.option("--exit-cycles", type=click.FloatRange(0, _MAX_CYCLES), default=500.0, callback=_finite,
              show_default=True,
              help="Cycles per VM exit handled in the kernel (Haswell, Bitdefender HVI citing Intel).")
@click.option("--user-exit-cycles", type=click.FloatRange(0, _MAX_CYCLES), default=1500.0, callback=_finite,
              show_default=True,
              help="Cycles per VM exit handled in user space (~3x in-kernel, KVM vmexit unit test).")
@click.option("--miss-cycles", type=click.FloatRange(0, _MAX_CYCLES), default=None, callback=_finite,
              help="Cycles per SPP miss (misses are handled in the kernel).  [default: --exit-cycles]")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress bar on stderr (only when stderr is a terminal).")
def replay(trace, fmt, policy_file, protect, elf_file, spp_write_check, spp_mode, pin_size, strict, as_json,
           plot_file, top, sweep, sort, use_dask, scheduler, workers, chunk_records, exit_cycles, user_exit_cycles,
           miss_cycles, progress):
    """What-if replay of a write trace: exits under page-granular write protection vs
    sub-page (SPP) protection, for the same writes.

    TRACE is a file (valgrind lackey --trace-mem=yes output, CSV gpa,size[,rip], Intel
    Pin pinatrace, or sppkit's native .npz/.parquet) or a directory of shards.  Trace
    addresses are taken as guest-physical.  What to protect: --policy, --protect, or
    --sweep over the object symbols of --elf.  Exit status 0, or 2 on bad input.

    \b
    Examples:
      sppkit replay t.lackey --protect 0x601000:0x80
      sppkit run mixed --engine unicorn --record w.npz   # to make w.npz
      sppkit replay w.npz --policy examples/mixed.toml --elf mixed --plot w.png
      sppkit replay w.npz --elf mixed --sweep --top 20
    """
    import json

    from .replay import CostModel, ProtectionModel, maps_from_ranges
    from .replay import replay as run_replay

    if scheduler is not None and not use_dask:
        raise click.UsageError("--scheduler needs --dask")
    if workers is not None and not use_dask:
        raise click.UsageError("--workers needs --dask (it sets the threads of the local dask cluster)")
    if workers is not None and scheduler is not None:
        raise click.UsageError("--workers sets the threads of a local cluster; the cluster behind --scheduler "
                               "has its own workers")
    ctx = click.get_current_context()
    if not sweep and ctx.get_parameter_source("sort") != click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--sort orders the table of --sweep; add --sweep")
    if plot_file and sweep:
        raise click.UsageError("--plot is not available with --sweep")
    if plot_file:
        _check_plot(plot_file, trace)  # (before --elf, which may build a guest)
    image = _load_elf(elf_file) if elf_file else None
    cost = CostModel(exit_cycles=exit_cycles, user_exit_cycles=user_exit_cycles, miss_cycles=miss_cycles)
    kw = dict(size=pin_size, strict=strict, chunk_records=chunk_records, progress=progress, dask=use_dask,
              scheduler=scheduler, workers=workers, cost=cost)

    if sweep:
        from .report import print_sweep
        from .sweep import SweepModel, candidates_from_elf
        from .sweep import sweep as run_sweep

        regions = _regions(policy_file, protect, image, required=image is None)
        cands = regions if regions is not None else candidates_from_elf(image)
        if not cands:
            if regions is not None:
                raise click.UsageError(f"--policy {policy_file} protects nothing: no regions to sweep")
            raise click.UsageError(f"--elf {elf_file}: no sized object symbols to sweep; give --policy or "
                                   "--protect regions")
        sweep_model = SweepModel(cands, spp_write_check=spp_write_check, spp_mode=spp_mode)
        swept = run_sweep(trace, sweep_model, fmt, sort=sort, **kw)
        sd = swept.to_dict(top)
        _report_skipped(swept.counters.skipped, swept.counters.examples)
        _refuse_unreadable(trace, sd["writes"], swept.counters.skipped, swept.counters.examples, sd.get("formats"))
        if as_json:
            click.echo(json.dumps(sd, allow_nan=False))
        else:
            print_sweep(sd, _console())
            if top and len(swept.rows) > top:
                _console().print(f"… {len(swept.rows) - top} more regions (--top 0 for all)")
        return

    regions = _regions(policy_file, protect, image, required=True)
    if not regions:
        _warn(f"--policy {policy_file} protects nothing: it has no [[protect]] entries")
    try:
        maps = maps_from_ranges((s, n) for _, s, n in regions)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--protect'" if protect else "'--policy'") from None
    model = ProtectionModel(maps, spp_write_check=spp_write_check, spp_mode=spp_mode)
    res = run_replay(trace, model, fmt, **kw)
    d = res.to_dict(top, image)
    _report_skipped(res.skipped_records, res.c.examples)
    _refuse_unreadable(trace, d["writes"], res.skipped_records, res.c.examples, d.get("formats"))
    if plot_file:
        from .report import plot_replay

        d["plot"] = str(plot_replay(res, plot_file))
    if as_json:
        click.echo(json.dumps(d, allow_nan=False))
    else:
        from .report import print_replay

        print_replay(d, _console())
        if plot_file:
            _console(stderr=True).print(f"[dim]plot written to {d['plot']}[/]")


@click.group("trace", short_help="Trace files: convert to sppkit's native columnar format.")
def trace() -> None:
    """Trace files: convert lackey, CSV, pinatrace or native traces to sppkit's native
    columnar format (.npz or .parquet), which `sppkit replay` reads fastest."""


def _convert_progress(enabled: bool):
    """(context manager, callback) for a progress bar of bytes read on stderr, when
    ``enabled`` and stderr is a terminal; else a no-op pair."""
    import contextlib

    from .replay import _progress_bar, _want_progress

    if not _want_progress(enabled):
        return contextlib.nullcontext(), None
    bar = _progress_bar(0, "bytes")
    state: dict = {}

    def update(src) -> None:
        key = str(src.path)
        if key not in state:
            state[key] = 0
            state["_total"] = state.get("_total", 0) + src.bytes_total
            state["_done"] = state.get("_done", 0)
            if "task" not in state:
                state["task"] = bar.add_task("convert", total=None)
            bar.update(state["task"], total=state["_total"])
        state["_done"] += src.bytes_done - state[key]
        state[key] = src.bytes_done
        bar.update(state["task"], completed=state["_done"])

    return bar, update


@trace.command("convert", short_help="Convert trace IN into OUT in the native format (.npz or .parquet).")
@click.argument("src", metavar="IN", type=click.Path(exists=True))
@click.argument("out", metavar="OUT", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(_FORMATS), default="auto", show_default=True,
              help="Format of IN (a file or a directory of shards); auto: from the name, else from the first "
                   "lines.")
@click.option("--size", "pin_size", type=click.IntRange(1, 65535), default=8, show_default=True,
              help="Write size in bytes for pinatrace records (they carry none); other formats ignore it.")
@click.option("--strict", is_flag=True, help="A malformed record is an error (default: warn, skip and count).")
@click.option("--shard-records", type=click.IntRange(1), default=None,
              help="Write OUT as a directory (OUT without its suffix) of shards part-00000.npz ... of at most "
                   "this many records each.  [default: one file]")
@click.option("--chunk-records", type=click.IntRange(1, _MAX_CHUNK), default=_CHUNK, show_default=True,
              help="Records read and written at a time (memory use is about 100 bytes per record of chunk).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (records, skipped_records, files, elapsed_seconds) instead of a line.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress bar on stderr (only when stderr is a terminal).")
def convert(src, out, fmt, pin_size, strict, shard_records, chunk_records, as_json, progress):
    """Convert trace IN into OUT in the native format: OUT.npz (numpy, uncompressed
    columns gpa u64, size u16, rip u64) or OUT.parquet (needs pyarrow:
    pip install 'sppkit[parquet]').  Streams: memory stays flat.  An existing OUT
    file is replaced only when the conversion succeeds.

    \b
    Examples:
      sppkit trace convert t.lackey t.npz
      sppkit trace convert big.csv big.parquet --strict
      sppkit trace convert big.lackey shards --shard-records 10000000
    """
    import json
    import time

    from .formats import Diagnostics, convert_trace

    # OUT (empty, suffix, a directory, a missing parent, the input itself, old shards)
    # is checked by convert_trace before anything is read or written: one rule.
    diag = Diagnostics(strict=strict)
    t0 = time.perf_counter()
    bar, on_chunk = _convert_progress(progress)
    with bar:
        info = convert_trace(src, out, fmt, size=pin_size, shard_records=shard_records,
                             chunk_records=chunk_records, diagnostics=diag, progress=on_chunk)
    info["elapsed_seconds"] = time.perf_counter() - t0
    _report_skipped(diag.skipped, diag.examples)  # (a trace with no readable record: convert_trace refused it)
    if as_json:
        click.echo(json.dumps(info, allow_nan=False))
    else:
        files = info["files"]
        if shard_records is None:
            where = out
        else:
            shards = f"{len(files)} shard{'s' if len(files) != 1 else ''}"
            where = f"{os.path.dirname(files[0]) if files else out} ({shards})"
        click.echo(f"{info['records']:,} records written to {where}"
                   + (f"; {diag.skipped:,} malformed records skipped" if diag.skipped else "")
                   + f" in {info['elapsed_seconds']:.2f} s")


def recorder_for(path):
    """A :class:`~sppkit.engines.replay.TraceRecorder` for ``sppkit run --record``."""
    from .formats import TraceRecorder

    return TraceRecorder(path)


__all__ = ["convert", "recorder_for", "replay", "trace"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(replay())
