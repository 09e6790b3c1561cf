"""The demo: SPP at work, first at the processor, then through the hypervisor layer."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .arch import (
    SECONDARY_ENABLE_EPT,
    SECONDARY_SPP,
    Access,
    EptBuilder,
    HostMemory,
    Processor,
    SppEvent,
    SpptBuilder,
    VmExit,
    vector_from_map,
)
from .vmm import Decision, Vm


def processor_demo(console: Console) -> list[tuple[str, str]]:
    """Build an EPT and an SPPT by hand, send writes through the processor model."""
    mem = HostMemory(maxphyaddr=46)
    ept = EptBuilder(mem)
    ram = mem.alloc_range(0x4000)
    # gpa 0x1000: read-only with bit 61 (sub-page protected); 0x2000: writable;
    # 0x3000: read-only with bit 61 but no SPP vector yet; 0x4000: read-only, no bit 61.
    ept.map(0x1000, ram, 0x1000, w=False, spp=True)
    ept.map(0x2000, ram + 0x1000, 0x1000)
    ept.map(0x3000, ram + 0x2000, 0x1000, w=False, spp=True)
    ept.map(0x4000, ram + 0x3000, 0x1000, w=False)
    sppt = SpptBuilder(mem)
    # sub-pages 0 and 2 of gpa 0x1000 writable, the other 30 protected
    sppt.set_vector(0x1000, vector_from_map(0b101))
    # gpa 0x3000 shares that L1 table, so its vector exists and is all zero (an L1E
    # has no present bit): every sub-page protected.  gpa 0x200000 lies in another
    # 2-MiB region whose L2E is not present: an SPP miss.
    cpu = Processor(
        mem, ept.eptp(accessed_dirty=True),
        secondary_controls=SECONDARY_ENABLE_EPT | SECONDARY_SPP, spptp=sppt.spptp,
    )
    cases = [
        ("write 8 B to writable page", 0x2010, 8, Access.WRITE),
        ("write 8 B to sub-page 0 (writable)", 0x1000, 8, Access.WRITE),
        ("write 8 B to sub-page 1 (protected)", 0x1080, 8, Access.WRITE),
        ("write 8 B to sub-page 2 (writable)", 0x1100, 8, Access.WRITE),
        ("write 16 B spanning sub-pages 0-1", 0x1078, 16, Access.WRITE),
        ("read 8 B of sub-page 1", 0x1080, 8, Access.READ),
        ("write to page with all-zero vector", 0x3000, 4, Access.WRITE),
        ("write to read-only page, no bit 61", 0x4000, 4, Access.WRITE),
        ("write beyond SPPT (2-MiB region with no L2E)", 0x200000, 4, Access.WRITE),
    ]
    ept.map(0x200000, ram, 0x1000, w=False, spp=True)
    table = Table(title="sppkit.arch — one processor, EPT + SPPT built in host memory")
    for col in ("access", "gpa", "outcome", "exit", "qualification"):
        table.add_column(col)
    results = []
    for what, gpa, size, acc in cases:
        try:
            (hr, *_) = cpu.translate(gpa, size, acc, gla=0x400000 + gpa)
            row = (what, f"{gpa:#x}", f"[green]allowed[/] → hpa {hr.hpa:#x}", "—", "—")
            results.append((what, "allowed"))
        except VmExit as e:
            row = (what, f"{gpa:#x}", f"[red]{e.name}[/]" + (f" ({'miss' if e.is_miss else 'misconfig'})" if isinstance(e, SppEvent) else ""),
                   str(e.reason), f"{e.qualification:#x}")
            results.append((what, e.name))
        table.add_row(*row)
    console.print(table)
    return results


def vm_demo(console: Console) -> dict:
    """A VM with one memslot: protect sub-pages, write, let a handler decide."""
    vm = Vm()
    vm.add_memslot(0, 0, 4 << 20)
    vm.enable_spp(mode="lazy")
    # page 0x10: sub-page 3 holds a "secret" structure; everything else stays writable
    vm.set_subpage_access(0x10, [0xFFFFFFFF & ~(1 << 3)])
    log = []

    def handler(ev):
        log.append(ev)
        return Decision.SKIP

    vm.on_violation(handler)
    writes = [(0x10000 + 0x40, b"hot data"), (0x10000 + 3 * 128, b"attack!!"), (0x10000 + 4 * 128, b"neighbor"),
              (0x10000 + 3 * 128 - 4, b"straddle"), (0x20000, b"elsewhere")]
    table = Table(title="sppkit.vmm — Vm.write with sub-page 3 of gfn 0x10 protected (lazy SPPT)")
    for col in ("gpa", "bytes", "committed", "decision", "denied sub-pages"):
        table.add_column(col)
    for gpa, data in writes:
        r = vm.write(gpa, data)
        table.add_row(f"{gpa:#x}", data.decode(), "yes" if r.committed else "[red]no[/]",
                      r.decision.value if r.decision else "—",
                      ", ".join(map(str, r.event.denied)) if r.event else "—")
    console.print(table)
    st = vm.stats()
    console.print(
        f"writes {st['writes']}, page-granular protection would trap {st['page_granular']}, "
        f"SPP violations {st['violations']}, SPP misses {st['spp_misses']} "
        f"(exits avoided: {st['exits_avoided']})"
    )
    return st


MIXED_POLICY = """
decision = "skip"
[[protect]]
name = "secret key"
symbol = "secret"
[[protect]]
name = "configuration"
symbol = "config"
[[protect]]
name = "stack canary"
symbol = "canary"
"""


def guest_demo(console: Console, engine: str = "auto"):
    """The bundled `mixed` guest on the best engine available, with three small
    structures protected inside pages full of hot data."""
    from .engines import choose_engine
    from .guests import build_guest, load_elf, toolchain_status
    from .policy import parse_policy
    from .report import print_run

    ok, why = toolchain_status()
    if not ok:
        console.print(f"[yellow]guest demo skipped: {why}[/]")
        return None
    image = load_elf(build_guest("mixed"))
    policy = parse_policy(MIXED_POLICY, source="<demo policy>", image=image)
    cls, reason = choose_engine(engine)
    console.rule(f"[bold]a real guest: `mixed` on the {cls.name} engine ({reason})")
    eng = cls(image, policy=policy, cpl=3)
    try:
        result = eng.run()
    finally:
        eng.close()
    print_run(result, console, max_rows=8)
    return result


def main(console: Console | None = None, engine: str = "auto") -> None:
    console = console or Console()
    console.rule("[bold]sppkit demo: EPT-based Sub-Page write Protection")
    processor_demo(console)
    vm_demo(console)
    guest_demo(console, engine)
    from .guests import toolchain_status

    if not toolchain_status()[0]:
        return
    from .usecases.checkpoint import demo_checkpoint
    from .usecases.device import demo_device
    from .usecases.guard import demo_guard
    from .usecases.monitor import demo_monitor

    console.rule("[bold]the four uses of SPP")
    demo_monitor(console, engine)
    demo_device(console, engine)
    demo_checkpoint(console, engine)
    demo_guard(console, engine)
