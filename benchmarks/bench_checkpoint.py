"""Benchmark of a checkpoint set's index: what listing one more checkpoint costs as the
set grows (a script that prints figures; not a test).

The set's checkpoint list is a journal (checkpoints.jsonl, set format version 2): a
checkpoint appends one line and fsyncs it.  Baseline, measured in the same script: the
version 1 layout, where the whole manifest (one entry per checkpoint so far) was
rewritten atomically (temporary file, fsync, rename, fsync of the directory) at every
checkpoint.  Both use sppkit's own writers on a temporary directory; the checkpoint
files themselves are the same in both layouts and not written here.

Run: .venv/bin/python benchmarks/bench_checkpoint.py  (about 20 s)
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sppkit.usecases import checkpoint as C


def entry(i: int) -> dict:
    """A checkpoint's entry as the checkpointer writes it (the values' sizes are real)."""
    return {"index": i, "file": f"ckpt-{i:06d}.spck", "sha256": "a" * 64, "bytes": 12345,
            "reason": "every 64 tracked writes", "memory_sha256": "b" * 64, "dirty_subpages": 64,
            "dirty_pages": 3, "spp_exits": 64}


HEADER = {"format": C.MANIFEST_FORMAT, "set_id": "0" * 32, "created": "2026-01-01T00:00:00Z",
          "guest": {"name": "g", "elf": "guest.elf", "sha256": "c" * 64}, "engine": "unicorn",
          "ram_size": 64 << 20, "cpl": 3, "granule": 128,
          "regions": [{"name": "data", "gpa": 0x400000, "size": 0x10000}],
          "trigger": {"every_writes": 64, "port": None}}


def cost_at(n: int, samples: int, d: Path) -> tuple[float, float]:
    """Seconds to list checkpoint n+1 in a set already listing n: (journal, v1 manifest)."""
    # version 2: the journal, n lines already there
    body = dict(HEADER, version=C.SET_VERSION)
    chain = C._manifest_digest(body)
    journal = d / C.JOURNAL
    out = bytearray()
    for i in range(n):
        chain, line = C._journal_line(chain, {"checkpoint": entry(i)})
        out += line
    journal.write_bytes(bytes(out))
    t = time.perf_counter()
    for i in range(n, n + samples):
        chain, line = C._journal_line(chain, {"checkpoint": entry(i)})
        C._append(journal, line)
    v2 = (time.perf_counter() - t) / samples
    # version 1: the whole manifest, every entry so far, written atomically; each entry
    # encoded once and cached, as the version 1 writer did
    head = dict(HEADER, version=1)
    canon = [C._canonical_json(entry(i)) for i in range(n)]
    shown = [C._display_json(entry(i)) for i in range(n)]
    t = time.perf_counter()
    for i in range(n, n + samples):
        canon.append(C._canonical_json(entry(i)))
        shown.append(C._display_json(entry(i)))
        C.atomic_write(d / C.MANIFEST, v1_manifest(head, canon, shown))
    v1 = (time.perf_counter() - t) / samples
    return v2, v1


def v1_manifest(head: dict, canon: list[str], shown: list[str]) -> bytes:
    """A version 1 manifest from the entries already encoded (canonical, for its SHA-256;
    displayed, one per line): what the version 1 writer wrote at every checkpoint."""
    body = dict(head, checkpoints=[])  # (the list's place among the sorted keys)
    parts = []
    for key in sorted(body):
        value = "[" + ",".join(canon) + "]" if key == "checkpoints" else C._canonical_json(body[key])
        parts.append(C._canonical_json(key) + ":" + value)
    digest = hashlib.sha256(("{" + ",".join(parts) + "}").encode()).hexdigest()
    lines = []
    for key in sorted(dict(body, sha256=digest)):
        if key == "checkpoints":
            value = "[\n  " + ",\n  ".join(shown) + "\n ]"
        else:
            value = C._display_json(digest if key == "sha256" else body[key])
        lines.append(f" {C._display_json(key)}: {value}")
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,1000,5000,25000",
                    help="set sizes (checkpoints already listed) to measure at, comma-separated")
    ap.add_argument("--samples", type=int, default=20, help="checkpoints listed per measurement")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    console = Console()
    t = Table(title="listing one more checkpoint in a set of N (journal append vs whole-manifest rewrite)")
    for col in ("N checkpoints so far", "journal (v2)", "manifest rewrite (v1)", "v1 / v2"):
        t.add_column(col, justify="right")
    with tempfile.TemporaryDirectory(prefix="sppkit-bench-ckpt-") as tmp:
        for n in sizes:
            v2, v1 = cost_at(n, args.samples, Path(tmp))
            t.add_row(f"{n:,}", f"{v2 * 1e3:.2f} ms", f"{v1 * 1e3:.2f} ms", f"{v1 / v2:.1f}x")
    console.print(t)
    console.print("Each figure includes the fsync the layout needs (one for an append; two for an atomic rewrite).")


if __name__ == "__main__":
    main()
