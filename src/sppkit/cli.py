"""The ``sppkit`` command line."""

from __future__ import annotations

import sys

import click

from . import __version__


class _Cli(click.Group):
    """Print errors a user can cause as one line, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:
            raise
        except (click.ClickException, click.exceptions.Abort):
            raise
        except (ValueError, LookupError, OSError) as e:
            click.echo(f"sppkit: error: {e}", err=True)
            sys.exit(2)
        except RuntimeError as e:  # EngineError, KvmUnavailable, GuestBuildError
            click.echo(f"sppkit: error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sppkit")
def main() -> None:
    """sppkit — Intel EPT-based Sub-Page write Protection (SPP) in Python.

    A bit-exact model of the processor (EPT + SPPT walks, exits 48/49/66) and
    the hypervisor side (access maps, lazy SPPT, huge pages, dirty logging,
    violation decisions).  Start with `sppkit demo`.
    """


@main.command()
@click.option("--engine", type=click.Choice(["auto", "kvm", "unicorn"]), default="auto", show_default=True,
              help="Engine for the guest parts of the demo (the guest and the four uses).")
def demo(engine) -> None:
    """Build an EPT + SPPT, send writes through the processor and a Vm, then run the
    bundled `mixed` guest with a policy on the best engine available."""
    from .demo import main as run_demo

    run_demo(engine=engine)


def _load_guest(guest: str, flat_at: str | None, entry: str | None):
    """An ELF path, a flat binary (with --flat-at), or the name of a bundled program."""
    import os

    from .guests import build_guest, flat_image, list_programs, load_elf

    if entry is not None and flat_at is None:
        raise click.UsageError("--entry applies to a flat binary (--flat-at); an ELF file states its own entry")
    if flat_at is not None:
        data = open(guest, "rb").read()
        return flat_image(data, _address(flat_at, "--flat-at"), _address(entry, "--entry") if entry else None)
    if os.path.exists(guest):
        return load_elf(guest)
    if guest in list_programs():
        return load_elf(build_guest(guest))
    raise click.BadParameter(
        f"{guest!r} is neither a file nor a bundled program ({', '.join(list_programs())})", param_hint="GUEST"
    )


def _address(text: str, option: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not an address (decimal or 0x-prefixed hex)",
                                 param_hint=option) from None
    if value < 0:
        raise click.BadParameter(f"{text!r} is negative", param_hint=option)
    return value


def _policy(policy_file, protect, image, decision):
    from .policy import Policy, load_policy, parse_protect_arg

    if policy_file and protect:
        raise click.UsageError("give --policy or --protect, not both")
    if decision is not None and not protect:
        raise click.UsageError("--decision applies to --protect ranges (a --policy file states its own decisions)")
    if policy_file:
        return load_policy(policy_file, image)
    if protect:
        return Policy.from_ranges([parse_protect_arg(p) for p in protect], decision=decision or "skip")
    return None


@main.command()
@click.argument("guest")
@click.option("--engine", type=click.Choice(["auto", "kvm", "unicorn"]), default="auto", show_default=True,
              help="kvm: the real CPU (needs /dev/kvm); unicorn: emulated, exact faults; auto: kvm when usable.")
@click.option("--policy", "policy_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML policy: [[protect]] entries with symbol or start+length, and decisions.")
@click.option("--protect", multiple=True, metavar="START:LENGTH",
              help="Protect a guest-physical range (repeatable), instead of --policy.")
@click.option("--decision", type=click.Choice(["skip", "emulate", "stop"]), default=None,
              help="Decision for --protect ranges (default skip).")
@click.option("--cpl", type=click.Choice(["0", "3"]), default="3", show_default=True,
              help="Privilege level of the guest. 3 runs natively under KVM on hosts where CPL 0 is emulated.")
@click.option("--memory", default="64M", show_default=True, help="Guest RAM at GPA 0 (K/M/G suffixes).")
@click.option("--spp-mode", type=click.Choice(["lazy", "eager"]), default="lazy", show_default=True,
              help="SPPT construction: lazy (KVM series: rebuilt on SPP misses) or eager.")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds before the guest is stopped (0: no limit).")
@click.option("--flat-at", metavar="GPA", help="GUEST is a flat binary to load at GPA (entry = GPA unless --entry).")
@click.option("--entry", metavar="GPA", help="Entry point of a flat binary.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option("--record", "record_file", type=click.Path(dir_okay=False),
              help="Record the guest's writes (gpa, size, rip) as a native trace (.npz, or .parquet "
                   "with pyarrow) for `sppkit replay`: every write under Unicorn, the writes to "
                   "protected pages under KVM.")
def run(guest, engine, policy_file, protect, decision, cpl, memory, spp_mode, timeout, flat_at, entry, as_json,
        record_file):
    """Run GUEST (an x86-64 ELF, a flat binary, or a bundled program such as
    selftest, mixed or workload; a name that is neither lists them all) with sub-page
    write protection.

    Exit status: the guest's exit code (its write to port 0xF4) when it exits, 1 when
    the run ends otherwise (STOP decision, fault, timeout), 2 on bad input.
    """
    import json

    from rich.console import Console

    from .engines import choose_engine, parse_size
    from .report import print_run

    if record_file is not None and not record_file.strip():
        raise click.BadParameter("an empty path", param_hint="--record")
    image = _load_guest(guest, flat_at, entry)
    pol = _policy(policy_file, protect, image, decision)
    cls, why = choose_engine(engine)
    err = Console(stderr=True)
    if not as_json:
        err.print(f"[dim]engine: {why}[/]")
    eng = cls(image, policy=pol, ram_size=parse_size(memory), cpl=int(cpl), timeout=timeout, spp_mode=spp_mode)
    recorder = None
    try:
        if record_file:
            from .engines.replay.cli import recorder_for

            recorder = recorder_for(record_file)
            eng.record_writes(recorder)
            if not eng.records_every_write:
                err.print(f"[yellow]--record with the {eng.name} engine: only writes to pages holding a "
                          "protected sub-page reach the VMM and are recorded (the rest run on the CPU); "
                          "use --engine unicorn to record every write[/]")
        result = eng.run()
    finally:
        eng.close()
        if recorder is not None:
            recorder.close()
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        print_run(result, Console())
    sys.exit(result.exit_status)


@main.command()
def doctor():
    """Report what this machine offers: KVM, Unicorn (and its C hook trampoline), gcc/binutils, valgrind."""
    import shutil

    from rich.console import Console
    from rich.table import Table

    t = Table(title="sppkit doctor")
    t.add_column("component")
    t.add_column("status")
    t.add_column("detail")
    try:
        from .engines.kvm.binding import CAP_NR_MEMSLOTS, CAP_READONLY_MEM, CAP_SYNC_REGS, Kvm, kvm_status

        ok, why = kvm_status()
        detail = why
        if ok:
            with Kvm() as k:
                pvm = "PVM" if _module_loaded("kvm_pvm") else ("VMX" if _module_loaded("kvm_intel") else
                                                                ("SVM" if _module_loaded("kvm_amd") else "unknown"))
                detail = (f"API {k.api_version()}, {pvm}; READONLY_MEM={k.check_extension(CAP_READONLY_MEM)}, "
                          f"NR_MEMSLOTS={k.check_extension(CAP_NR_MEMSLOTS)}, SYNC_REGS={k.check_extension(CAP_SYNC_REGS)}")
        t.add_row("KVM", "[green]ok[/]" if ok else "[red]unavailable[/]", detail)
    except Exception as e:  # pragma: no cover - reported, not fatal
        t.add_row("KVM", "[red]error[/]", str(e))
    try:
        from .engines.unicorn import unicorn_version

        t.add_row("Unicorn", "[green]ok[/]", unicorn_version())
        from .engines.unicorn import native_status

        ok, why = native_status()
        t.add_row("C hook trampoline (Unicorn)", "[green]ok[/]" if ok else "[yellow]unavailable[/]",
                  why if ok else f"{why}; protected stores take a ctypes callback (same results, slower)")
    except Exception as e:  # pragma: no cover
        t.add_row("Unicorn", "[red]unavailable[/]", str(e))
    from .guests import toolchain_status

    ok, why = toolchain_status()
    t.add_row("gcc (guest programs)", "[green]ok[/]" if ok else "[red]missing[/]", why)
    for tool, use in (("as", "binutils"), ("objcopy", "binutils"), ("valgrind", "memory traces (replay)")):
        path = shutil.which(tool)
        t.add_row(f"{tool} ({use})", "[green]ok[/]" if path else "[yellow]missing[/]", path or "not on PATH")
    Console().print(t)


def _register_replay() -> None:
    from .engines.replay.cli import replay, trace

    main.add_command(replay)
    main.add_command(trace)


_register_replay()


def _register_usecases() -> None:
    from .usecases.checkpoint import checkpoint_command, restore_command
    from .usecases.device import device_command
    from .usecases.guard import guard_command
    from .usecases.monitor import monitor_command

    for cmd in (monitor_command, device_command, checkpoint_command, restore_command, guard_command):
        main.add_command(cmd)


_register_usecases()


def _module_loaded(name: str) -> bool:
    import os

    return os.path.isdir(f"/sys/module/{name}")


if __name__ == "__main__":  # pragma: no cover
    main()
