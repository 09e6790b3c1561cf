"""Replay of recorded write traces: what page-granular write protection would cost
compared with SPP, for the same writes (``sppkit replay``; docs/replay.md).

* :mod:`.formats` — importers (valgrind lackey, CSV, Intel Pin pinatrace, the native
  columnar format) and writers (``.npz``, Parquet), streaming in chunks;
* :mod:`.replay` — the vectorised replay, identical to feeding each access through
  :meth:`sppkit.Vm.write`; shard merging; dask.distributed;
* :mod:`.sweep` — per-region what-if over many candidate regions in one pass;
* :mod:`.report` — rich tables and the plot.
"""

from .formats import (
    FORMATS,
    NO_RIP,
    TRACE_DTYPE,
    Diagnostics,
    MalformedRecord,
    MissingDependency,
    NativeWriter,
    TraceFormatError,
    TraceRecorder,
    convert_trace,
    detect_format,
    list_shards,
    open_trace,
    read_trace,
    write_native,
)
from .replay import CostModel, PageIndex, ProtectionModel, Replayer, ReplayResult, ShardResult, replay, replay_arrays
from .sweep import SweepModel, SweepResult, candidates_from_elf, candidates_from_policy, sweep

# (``sweep`` and ``replay`` name the functions here; their modules stay importable as
# ``sppkit.engines.replay.sweep`` and ``sppkit.engines.replay.replay``)

__all__ = [
    "FORMATS", "NO_RIP", "TRACE_DTYPE", "CostModel", "Diagnostics", "MalformedRecord", "MissingDependency",
    "NativeWriter", "PageIndex", "ProtectionModel", "ReplayResult", "Replayer", "ShardResult", "SweepModel",
    "SweepResult", "TraceFormatError", "TraceRecorder", "candidates_from_elf", "candidates_from_policy",
    "convert_trace", "detect_format", "list_shards", "open_trace", "read_trace", "replay",
    "replay_arrays", "sweep", "write_native",
]
