"""Human output of a replay (rich tables) and its plot (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .formats import MissingDependency, TraceFormatError, _output_file, _reason, clobbered_input

__all__ = ["check_plot_path", "plot_replay", "print_replay", "print_sweep"]


def _n(v) -> str:
    return f"{v:,}" if isinstance(v, int) else (f"{v:,.0f}" if isinstance(v, float) else str(v))


def _cyc(v: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:,.2f} {unit}cycles"
    return f"{v:,.0f} cycles"


def print_replay(d: dict, console: Console) -> None:
    """Print the ``to_dict()`` of a :class:`~sppkit.engines.replay.ReplayResult`."""
    t = Table(title=f"replay of {escape(str(d.get('trace')))}", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("trace records (writes)", _n(d["writes"]))
    t.add_row("accesses (after page split)", _n(d["accesses"]))
    t.add_row("page-granular exits", _n(d["page_granular_exits"]))
    t.add_row("SPP violations (exits)", _n(d["violations"]))
    t.add_row(f"SPP misses ({d['spp_mode']} SPPT)", _n(d["spp_misses"]))
    t.add_row("exits avoided by SPP", _n(d["exits_avoided"]))
    t.add_row("protected pages (written)", f"{_n(d['protected_pages'])} ({_n(d['protected_pages_written'])})")
    t.add_row("skipped (malformed) records", _n(d["skipped_records"]))
    t.add_row("write check", d["spp_write_check"])
    if d.get("elapsed_seconds") is not None:
        rate = d.get("writes_per_second")
        t.add_row("replay time", f"{d['elapsed_seconds']:.3f} s" + (f" ({rate / 1e6:,.1f} M writes/s)" if rate else ""))
    console.print(t)

    est = d["estimated_overhead"]
    c = est["cycles_per_exit"]
    t = Table(title="estimated exit overhead",
              caption=f"{c['kernel']:.0f} cycles per exit handled in the kernel, {c['user_space']:.0f} in user "
                      f"space, {c['spp_miss']:.0f} per SPP miss (docs/replay.md: sources)")
    for col in ("protection", "exits", "in-kernel handling", "user-space handling"):
        t.add_column(col, justify="right" if col != "protection" else "left")
    pg, spp = est["page_granular"], est["spp"]
    t.add_row("page-granular", _n(pg["exits"]), _cyc(pg["kernel_cycles"]), _cyc(pg["user_space_cycles"]))
    t.add_row("SPP", _n(spp["exits"]), _cyc(spp["kernel_cycles"]), _cyc(spp["user_space_cycles"]))
    sp = est["speedup"]
    t.add_row("saved", _n(pg["exits"] - spp["exits"]), _cyc(est["saved"]["kernel_cycles"]),
              _cyc(est["saved"]["user_space_cycles"]))
    if sp["kernel"] is not None:
        t.add_row("page-granular / SPP", "", f"{sp['kernel']:,.1f}x", f"{sp['user_space']:,.1f}x")
    console.print(t)

    if d["top_pages"]:
        t = Table(title="top protected pages")
        for col in ("gpa", "symbol", "page-granular exits", "violations", "access map"):
            t.add_column(col, justify="right" if col in ("page-granular exits", "violations") else "left")
        for p in d["top_pages"]:
            t.add_row(f"{p['gpa']:#x}", escape(p.get("symbol") or "—"), _n(p["page_granular_exits"]),
                      _n(p["violations"]), f"{p['access_map']:#010x}")
        console.print(t)
    if d["top_subpages"]:
        t = Table(title="top violated sub-pages")
        for col in ("gpa", "page", "sub-page", "symbol", "violations", "writes"):
            t.add_column(col, justify="right" if col in ("violations", "writes", "sub-page") else "left")
        for s in d["top_subpages"]:
            t.add_row(f"{s['gpa']:#x}", f"{s['gfn'] << 12:#x}", str(s["subpage"]), escape(s.get("symbol") or "—"),
                      _n(s["violations"]), _n(s["writes"]))
        console.print(t)
    if d["top_ips"]:
        t = Table(title="top violating instructions")
        for col in ("rip", "symbol", "violations"):
            t.add_column(col, justify="right" if col == "violations" else "left")
        for i in d["top_ips"]:
            t.add_row("unknown" if i["rip"] is None else f"{i['rip']:#x}", escape(i.get("symbol") or "—"),
                      _n(i["violations"]))
        console.print(t)
    if not d["page_granular_exits"]:
        console.print("no write touched a protected page")


def print_sweep(d: dict, console: Console) -> None:
    t = Table(title=f"sweep of {escape(str(d.get('trace')))}: {d['candidates']} candidate regions, "
                    f"{_n(d['writes'])} writes ({_n(d['accesses'])} accesses)",
              caption=f"each region protected alone; {d['spp_write_check']}, {d['spp_mode']} SPPT"
                      + (f"; {_n(d['skipped_records'])} malformed records skipped" if d["skipped_records"] else ""))
    for col in ("region", "start", "length", "pages", "page-granular exits", "SPP violations", "SPP misses",
                "exits avoided", "reduction"):
        t.add_column(col, justify="left" if col in ("region", "start") else "right",
                     no_wrap=col != "region", overflow="fold")
    for r in d["sweep"]:
        red = "—" if r["reduction"] is None else f"{100 * r['reduction']:.1f}%"
        t.add_row(escape(r["name"]), f"{r['start']:#x}", _n(r["length"]), _n(r["pages"]), _n(r["page_granular_exits"]),
                  _n(r["violations"]), _n(r["spp_misses"]), _n(r["exits_avoided"]), red)
    console.print(t)


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
    except ImportError:
        raise MissingDependency("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    return matplotlib


def check_plot_path(path, trace=None) -> tuple[Path, str]:
    """``path`` checked as :func:`plot_replay`'s output (callers check it before the
    replay whose result it draws): ``(path, format)``, the format named by the suffix
    (none: png).  An empty path, ``"-"``, or a suffix matplotlib cannot write is a
    ValueError; a directory or a missing parent directory an OSError naming ``path``;
    no matplotlib a :class:`MissingDependency`.  ``trace``: the trace replayed (a file
    or a shard directory), if known: a ``path`` that is one of its files, or in its
    shard directory, is a ValueError (the rule of ``sppkit trace convert``:
    :func:`~sppkit.engines.replay.formats.clobbered_input`)."""
    p = _output_file(path, "the plot (e.g. replay.png)")
    if trace is not None and os.path.exists(trace):
        try:
            why = clobbered_input(trace, p)
        except TraceFormatError:  # (a directory without shards: the replay reports it, as TRACE's fault)
            why = None
        if why is not None:
            raise ValueError(f"{p}: {why}; write the plot elsewhere")
    _matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = p.suffix[1:].lower() or "png"
    kinds = FigureCanvasBase.get_supported_filetypes()
    if fmt not in kinds:
        raise ValueError(f"{p}: matplotlib cannot write .{fmt} files; use .png "
                         f"(or {', '.join('.' + k for k in sorted(kinds) if k != 'png')})")
    return p, fmt


def plot_replay(result, path, *, max_pages: int = 48) -> Path:
    """A PNG: left, a heat map of the most-written protected pages × their 32 sub-pages
    (accesses touching each sub-page, log scale; protected sub-pages outlined, violated
    ones marked); right, exits under page-granular protection vs SPP.

    ``path``: the file to write, exactly that name (PNG, or the format its suffix names:
    .svg, .pdf...); returned.  Checked before anything is drawn: a directory, a missing
    parent directory (OSErrors naming ``path``), a suffix matplotlib cannot write, or a
    file of the trace replayed (``result.trace``) or in its shard directory (a
    ValueError).  An existing file is replaced only when the plot is complete."""
    from .replay import ReplayResult

    if not isinstance(result, ReplayResult):
        raise TypeError(f"plot_replay needs a ReplayResult, got {type(result).__name__}")
    if isinstance(max_pages, (bool, np.bool_)) or not isinstance(max_pages, (int, np.integer)) or max_pages < 0:
        raise ValueError(f"max_pages={max_pages!r}: must be an integer >= 0")
    path, fmt = check_plot_path(path, result.trace)
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    c = result.c
    gfns = result.model.gfns
    P = len(gfns)
    order = np.lexsort((gfns, -c.viol_per_page, -c.pg_per_page))[:max_pages] if P else np.zeros(0, np.int64)
    order = np.sort(order) if len(order) else order
    keys = order[:, None] * 32 + np.arange(32)[None, :]
    writes = c.writes_per_sub.get(keys) if P else np.zeros((0, 32))
    viols = c.viol_per_sub.get(keys) if P else np.zeros((0, 32))
    maps = result.model.maps[order] if P else np.zeros(0, np.int64)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, max(4.0, 1.2 + 0.22 * max(len(order), 8))),
                                   gridspec_kw={"width_ratios": [3, 1.3]})
    if len(order):
        data = np.where(writes > 0, writes, np.nan)
        vmax = max(1.0, float(np.nanmax(data)) if np.isfinite(data).any() else 1.0)
        cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
        im = ax1.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap,
                        norm=LogNorm(vmin=1, vmax=max(vmax, 1.0001)))
        fig.colorbar(im, ax=ax1, label="accesses touching the sub-page", fraction=0.04)
        for row, amap in enumerate(maps):
            for s in range(32):
                if not (int(amap) >> s) & 1:
                    ax1.add_patch(plt.Rectangle((s - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.2))
                    if viols[row, s]:
                        ax1.plot(s, row, marker="x", color="red", markersize=5)
        ax1.set_yticks(range(len(order)))
        ax1.set_yticklabels([f"{int(gfns[i]) << 12:#x}" for i in order], fontsize=7)
    else:
        ax1.text(0.5, 0.5, "no protected pages", ha="center", va="center", transform=ax1.transAxes)
    ax1.set_xticks(range(0, 32, 4))
    ax1.set_xlabel("sub-page (128 bytes each)")
    ax1.set_ylabel("protected page (gpa)")
    ax1.set_title("writes per sub-page (red box: protected, x: violated)")

    misses = result.spp_misses
    labels = ["page-granular", "SPP"]
    vals = [result.page_granular_exits, result.violations + misses]
    bars = ax2.bar(labels, vals, color=["#d62728", "#2ca02c"])
    for b, v in zip(bars, vals):
        ax2.annotate(f"{v:,}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=9)
    if max(vals) > 0 and min(vals) > 0 and max(vals) / min(vals) > 100:
        ax2.set_yscale("log")
    est = result.estimated_overhead()
    ax2.set_title("exits (SPP: violations + misses)")
    ax2.set_xlabel(f"in-kernel: {est['page_granular']['kernel_cycles']:,.0f} vs {est['spp']['kernel_cycles']:,.0f} "
                   "cycles", fontsize=8)
    fig.suptitle(f"sppkit replay: {result.writes:,} writes, {result.accesses:,} accesses")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial")
    try:
        fig.savefig(tmp, dpi=110, format=fmt)
        os.replace(tmp, path)
    except OSError as e:
        raise type(e)(f"{path}: cannot write: {_reason(e)}") from None
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
