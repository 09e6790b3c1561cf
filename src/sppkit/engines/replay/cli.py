"""``sppkit replay`` and ``sppkit trace`` (registered on the main group in sppkit.cli).

Heavy imports happen inside the commands; errors a user can cause are ValueError /
RuntimeError subclasses, printed as one line by the main group.
"""

from __future__ import annotations

import math
import sys

import click

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
        raise click.BadParameter(f"{value}: must be a finite number of cycles")
    return value


def _console(stderr: bool = False):
    """A rich Console; 160 columns when the stream is not a terminal (rich's default of
    80 would squeeze the tables of a piped report)."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 160)


def _parse_protect(arg: str, image):
    """START:LENGTH (integers), or SYMBOL[+OFF][:LENGTH] with --elf."""
    from ...policy import PolicyError, parse_protect_arg

    try:
        return parse_protect_arg(arg)
    except PolicyError:
        if image is None:
            raise
    text = arg.strip()
    name, _, length_s = text.partition(":")
    name, plus, off_s = name.partition("+")
    try:
        sym = image.symbol(name.strip())
    except KeyError as e:
        raise click.BadParameter(f"{arg!r}: {e}", param_hint="--protect") from None
    try:
        off = int(off_s, 0) if plus else 0
        length = int(length_s, 0) if length_s.strip() else sym.size - off
    except ValueError:
        raise click.BadParameter(f"{arg!r}: expected SYMBOL[+OFF][:LENGTH] or START:LENGTH",
                                 param_hint="--protect") from None
    if length <= 0:
        raise click.BadParameter(f"{arg!r}: symbol {sym.name!r} has size {sym.size}; give a length",
                                 param_hint="--protect")
    return sym.addr + off, length


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


@click.command("replay")
@click.argument("trace", type=click.Path(exists=True))
@click.option("--format", "fmt", type=click.Choice(_FORMATS), default="auto", show_default=True,
              help="Trace format (auto: from the name, else from the first lines). A directory is a set of "
                   "shards replayed as one trace, in sorted name order.")
@click.option("--policy", "policy_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML policy (as for `sppkit run`): [[protect]] entries with symbol or start+length.")
@click.option("--protect", multiple=True, metavar="START:LENGTH",
              help="Protect a guest-physical range (repeatable); with --elf also SYMBOL[+OFF][:LENGTH].")
@click.option("--elf", "elf_file", type=click.Path(exists=True, dir_okay=False),
              help="Guest ELF: resolves policy symbols, names pages and IPs, and gives --sweep its candidates.")
@click.option("--spp-write-check", type=click.Choice(["all-touched", "first-byte"]), default="all-touched",
              show_default=True, help="all-touched: an access violates if any sub-page it touches is protected; "
                                      "first-byte: only its first byte's sub-page counts (Bochs).")
@click.option("--spp-mode", type=click.Choice(["lazy", "eager"]), default="lazy", show_default=True,
              help="SPPT construction: lazy (one SPP miss per 2-MiB region written) or eager (no misses).")
@click.option("--size", "pin_size", type=click.IntRange(1, 65535), default=8, show_default=True,
              help="Write size for pinatrace records (they carry none).")
@click.option("--strict", is_flag=True, help="A malformed record is an error (default: warn, skip and count).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False),
              help="Write a PNG: heat map of protected pages x sub-pages, and exits page-granular vs SPP.")
@click.option("--top", type=click.IntRange(0), default=10, show_default=True,
              help="Rows in the top pages / sub-pages / IPs lists (sweep: rows printed; 0 = all).")
@click.option("--sweep", is_flag=True,
              help="Per candidate region (policy entries, --protect ranges, or every object symbol of --elf): "
                   "exits under page-granular vs sub-page protection, sorted.")
@click.option("--sort", type=click.Choice(["avoided", "page", "spp", "name", "address"]), default="avoided",
              show_default=True, help="Sweep order.")
@click.option("--dask", "use_dask", is_flag=True,
              help="Replay the shards on a dask.distributed cluster (pip install 'sppkit[distributed]').")
@click.option("--scheduler", metavar="ADDRESS", help="With --dask: a running scheduler (default: a LocalCluster).")
@click.option("--workers", type=click.IntRange(1), default=None, help="With --dask and no --scheduler: threads.")
@click.option("--chunk-records", type=click.IntRange(1), default=_CHUNK, show_default=True,
              help="Records per chunk (memory use is about 100 bytes per record of chunk).")
@click.option("--exit-cycles", type=click.FloatRange(0), default=500.0, callback=_finite, show_default=True,
              help="Cycles per VM exit handled in the kernel (Haswell, Bitdefender HVI citing Intel).")
@click.option("--user-exit-cycles", type=click.FloatRange(0), default=1500.0, callback=_finite, show_default=True,
              help="Cycles per VM exit handled in user space (~3x in-kernel, KVM vmexit unit test).")
@click.option("--miss-cycles", type=click.FloatRange(0), default=None, callback=_finite,
              help="Cycles per SPP miss (default: --exit-cycles; misses are handled in the kernel).")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress bar on stderr (only when stderr is a terminal).")
def replay(trace, fmt, policy_file, protect, elf_file, spp_write_check, spp_mode, pin_size, strict, as_json,
           plot_file, top, sweep, sort, use_dask, scheduler, workers, chunk_records, exit_cycles, user_exit_cycles,
           miss_cycles, progress):
    """What-if replay of a write trace: exits under page-granular write protection vs
    sub-page (SPP) protection, for the same writes.

    TRACE is a file (valgrind lackey --trace-mem=yes output, CSV gpa,size[,rip], Intel
    Pin pinatrace, or sppkit's native .npz/.parquet) or a directory of shards.  Trace
    addresses are taken as guest-physical.  Exit status 0, or 2 on bad input.
    """
    import json

    from .replay import CostModel, ProtectionModel, maps_from_ranges
    from .replay import replay as run_replay

    if scheduler and not use_dask:
        raise click.UsageError("--scheduler needs --dask")
    image = None
    if elf_file:
        from ...guests.elf import load_elf

        image = load_elf(elf_file)
    cost = CostModel(exit_cycles=exit_cycles, user_exit_cycles=user_exit_cycles, miss_cycles=miss_cycles)
    kw = dict(size=pin_size, strict=strict, chunk_records=chunk_records, progress=progress, dask=use_dask,
              scheduler=scheduler, workers=workers, cost=cost)

    if sweep:
        from .report import print_sweep
        from .sweep import SweepModel, candidates_from_elf
        from .sweep import sweep as run_sweep

        if plot_file:
            raise click.UsageError("--plot is not available with --sweep")
        regions = _regions(policy_file, protect, image, required=image is None)
        cands = regions if regions is not None else candidates_from_elf(image)
        if not cands:
            raise click.UsageError(f"{elf_file}: no sized object symbols to sweep")
        sweep_model = SweepModel(cands, spp_write_check=spp_write_check, spp_mode=spp_mode)
        swept = run_sweep(trace, sweep_model, fmt, sort=sort, **kw)
        sd = swept.to_dict(top or None)
        _report_skipped(swept.counters.skipped, swept.counters.examples)
        if as_json:
            click.echo(json.dumps(sd))
        else:
            print_sweep(sd, _console())
            if top and len(swept.rows) > top:
                _console().print(f"… {len(swept.rows) - top} more regions (--top 0 for all)")
        return

    regions = _regions(policy_file, protect, image, required=True)
    model = ProtectionModel(maps_from_ranges((s, n) for _, s, n in regions), spp_write_check=spp_write_check,
                            spp_mode=spp_mode)
    res = run_replay(trace, model, fmt, **kw)
    _report_skipped(res.skipped_records, res.c.examples)
    d = res.to_dict(top, image)
    if plot_file:
        from .report import plot_replay

        d["plot"] = str(plot_replay(res, plot_file))
    if as_json:
        click.echo(json.dumps(d))
    else:
        from .report import print_replay

        print_replay(d, _console())
        if plot_file:
            _console(stderr=True).print(f"[dim]plot written to {d['plot']}[/]")


@click.group("trace")
def trace() -> None:
    """Trace files: convert to sppkit's native columnar format."""


@trace.command("convert")
@click.argument("src", metavar="IN", type=click.Path(exists=True))
@click.argument("out", metavar="OUT", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(_FORMATS), default="auto", show_default=True,
              help="Format of IN (a file or a directory of shards).")
@click.option("--size", "pin_size", type=click.IntRange(1, 65535), default=8, show_default=True,
              help="Write size for pinatrace records.")
@click.option("--strict", is_flag=True, help="A malformed record is an error (default: warn, skip and count).")
@click.option("--shard-records", type=click.IntRange(1), default=None,
              help="Write OUT as a directory of shards of at most this many records each.")
@click.option("--chunk-records", type=click.IntRange(1), default=_CHUNK, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def convert(src, out, fmt, pin_size, strict, shard_records, chunk_records, as_json):
    """Convert trace IN into OUT in the native format: OUT.npz (numpy, uncompressed
    columns gpa u64, size u16, rip u64) or OUT.parquet (needs pyarrow:
    pip install 'sppkit[parquet]').  Streams: memory stays flat."""
    import json
    import time

    from .formats import Diagnostics, convert_trace, overwritten_input

    clash = overwritten_input(src, out, shard_records)
    if clash is not None:
        raise click.UsageError(f"OUT {out} would overwrite the input file {clash}; "
                               f"write the converted trace to another path")
    diag = Diagnostics(strict=strict)
    t0 = time.perf_counter()
    info = convert_trace(src, out, fmt, size=pin_size, shard_records=shard_records, chunk_records=chunk_records,
                         diagnostics=diag)
    info["elapsed_seconds"] = time.perf_counter() - t0
    _report_skipped(diag.skipped, diag.examples)
    if as_json:
        click.echo(json.dumps(info))
    else:
        where = out if len(info["files"]) == 1 else f"{out} ({len(info['files'])} shards)"
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
