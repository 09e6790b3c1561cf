"""The one result shape every engine returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class ViolationRecord:
    """One SPP violation as an engine saw it.

    ``rip_at``: the writing instruction (known exactly under Unicorn; recovered by
    decoding under KVM).  ``rip_after``: the instruction after it (KVM reports the
    write only after it retired).  ``symbol``: "name+0xoff" when the guest has symbols.
    """

    gpa: int
    size: int
    subpages: tuple[int, ...]
    denied: tuple[int, ...]
    decision: str
    data: str  # hex of the bytes the guest tried to write
    rip_at: int | None = None
    rip_after: int | None = None
    instruction: str | None = None
    symbol: str | None = None
    old: str | None = None  # hex of the bytes there before the write

    @property
    def rip(self) -> int | None:
        """The writing instruction when known, else the instruction after it."""
        return self.rip_at if self.rip_at is not None else self.rip_after

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rip"] = self.rip
        return d


@dataclass
class RunResult:
    engine: str
    exit_code: int | None
    console: str
    stats: dict
    violations: list[ViolationRecord] = field(default_factory=list)
    stop_reason: str = "exit"  # exit | stop-decision | paused | halt | shutdown | timeout
    detail: str = ""  # why the run ended, when not by the guest's exit
    rip_at: int | None = None
    rip_after: int | None = None
    exits: dict = field(default_factory=dict)  # exit kind -> count

    @property
    def exit_status(self) -> int:
        """The command-line status for this run: the guest's exit code (low 8 bits) when
        it exited, 1 when the run ended otherwise."""
        return (self.exit_code & 0xFF) if self.stop_reason == "exit" and self.exit_code is not None else 1

    def to_dict(self, max_violations: int = 1000) -> dict:
        """Plain JSON data (``violations``: the first ``max_violations`` records;
        ``violations_total``: how many there are)."""
        if not isinstance(max_violations, int) or isinstance(max_violations, bool) or max_violations < 0:
            raise ValueError(f"max_violations={max_violations!r:.40}: must be a non-negative integer")
        return {
            "engine": self.engine,
            "exit_code": self.exit_code,
            "console": self.console,
            "stop_reason": self.stop_reason,
            "detail": self.detail,
            "rip_at": self.rip_at,
            "rip_after": self.rip_after,
            "stats": self.stats,
            "exits": self.exits,
            "violations": [v.to_dict() for v in self.violations[:max_violations]],
            "violations_total": len(self.violations),
        }
