"""The ``sppkit`` command line."""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from pathlib import Path

import click

from . import __version__

from .engines.base import MAX_TIMEOUT  # (the engines' own limit: one rule)
from .usecases.monitor import MEMORY_HELP, Progress, progress_option, timeout_option


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def command_path(ctx: click.Context | None) -> str:
    """``sppkit run`` for the context of `run` (the root is ``sppkit`` whatever name the
    program was started under, e.g. ``main`` in click's CliRunner)."""
    names = []
    while ctx is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    if not names:
        return "sppkit"
    names[-1] = "sppkit"
    return " ".join(reversed(names))


class OneLineError(click.ClickException):
    """An error shown as the single line ``sppkit: error: MESSAGE`` (click's own usage
    errors print four lines: usage, a hint and the message)."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        vars(self)["exit_code"] = exit_code  # click declares exit_code per class; this one varies

    @classmethod
    def from_click(cls, e: click.ClickException) -> "OneLineError":
        msg = " ".join(e.format_message().split())
        ctx = getattr(e, "ctx", None)
        if isinstance(e, click.UsageError) and ctx is not None:
            msg = f"{msg.rstrip('.')} (see '{command_path(ctx)} --help')"
        return cls(msg, e.exit_code)

    def show(self, file=None) -> None:
        click.echo(f"sppkit: error: {self.message}", err=True)


class _Cli(click.Group):
    """Print errors a user can cause as one line, never a traceback: click's usage
    errors (bad option values, unknown options, missing arguments) and the ValueError /
    LookupError / OSError (exit status 2) and RuntimeError (exit status 1) the commands
    raise."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except _NO_ARGS_IS_HELP:
            raise  # `sppkit` alone prints the help
        except OneLineError:
            raise
        except click.ClickException as e:
            raise OneLineError.from_click(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, OneLineError):
            raise
        except _NO_ARGS_IS_HELP:
            raise  # `sppkit trace` alone prints the help of `trace`
        except click.ClickException as e:
            raise OneLineError.from_click(e) from None
        except (ValueError, LookupError, OSError) as e:
            if isinstance(e, OSError) and e.errno == errno.EPIPE:
                raise  # click's main quietens a closed pipe (`sppkit ... | head`)
            raise OneLineError(str(e), 2) from None
        except RuntimeError as e:  # EngineError, KvmUnavailable, GuestBuildError, MissingDependency
            raise OneLineError(str(e), 1) from None
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see main): what was being written is cleaned up
            raise OneLineError("interrupted", 130) from None


_ENGINE_HELP = ("kvm: the real CPU (needs a usable /dev/kvm); unicorn: emulated anywhere, a denied write "
                "faults before it retires; auto: kvm when usable, else unicorn.")


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sppkit")
def main() -> None:
    """sppkit — Intel EPT-based Sub-Page write Protection (SPP) in Python.

    A bit-exact model of the processor (EPT + SPPT walks, exits 48/49/66) and
    the hypervisor side (access maps, lazy SPPT, huge pages, dirty logging,
    violation decisions).  Start with `sppkit demo`; `sppkit doctor` says which
    engines this machine offers; `sppkit COMMAND --help` describes a command.

    Errors are one line on stderr, `sppkit: error: ...`, with a non-zero exit status.
    Ctrl-C and SIGTERM stop a command cleanly (partial output files are removed; a
    guest is stopped at once), with exit status 130.
    """
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM") \
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # SIGTERM (timeout, kill, systemd) as Ctrl-C: a KeyboardInterrupt, so what a
        # command was writing is cleaned up instead of left behind by a killed process
        signal.signal(signal.SIGTERM, signal.default_int_handler)


@main.command(short_help="A tour of SPP: the processor, the hypervisor, a real guest and the four uses.")
@click.option("--engine", type=click.Choice(["auto", "kvm", "unicorn"]), default="auto", show_default=True,
              help="Engine for the guest parts of the demo (the `mixed` guest and the four uses). " + _ENGINE_HELP)
def demo(engine) -> None:
    """Build an EPT + SPPT by hand and send writes through the processor model and a
    Vm, then run the bundled `mixed` guest with a policy, and the four uses of SPP
    (monitor, device, checkpoint, guard), on the engine chosen.

    The guest parts need gcc (bundled guests are built on first use and cached); without
    it they are skipped with a note.  Takes a few seconds.
    """
    from .demo import main as run_demo

    if engine != "auto":
        from .engines import choose_engine

        choose_engine(engine)  # --engine kvm on a host without KVM: an error before the demo starts
    run_demo(engine=engine)


def _address(text: str, option: str) -> int:
    """A guest-physical address: decimal or 0x-prefixed hex, 0 <= value < 2**64."""
    try:
        value = int(text.strip(), 0)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not an address (decimal or 0x-prefixed hex, e.g. 0x400000)",
                                 param_hint=option) from None
    if value < 0:
        raise click.BadParameter(f"{text!r} is negative; an address is 0 or more", param_hint=option)
    if value >= 1 << 64:
        raise click.BadParameter(f"{text!r} is beyond the 64-bit address space (at most 0xffffffffffffffff)",
                                 param_hint=option)
    return value


def _address_option(ctx, param, value):
    return None if value is None else _address(value, f"'{param.opts[0]}'")


def _memory_option(ctx, param, value):
    from .engines.base import check_ram_size, parse_size

    try:
        return check_ram_size(parse_size(value))
    except ValueError as e:
        raise click.BadParameter(f"{value!r}: {str(e).partition(': ')[2] or e}") from None


def _trace_path(path: str, option: str) -> str:
    """``path`` if a native trace can be written there (formats.check_native_path, as
    the writer checks it), checked before the work whose output it receives."""
    from .engines.replay.formats import check_native_path

    try:
        check_native_path(path)
    except (ValueError, OSError, RuntimeError) as e:  # (RuntimeError: MissingDependency, no pyarrow)
        raise click.BadParameter(str(e), param_hint=option) from None
    return path


def _record_option(ctx, param, value):
    return None if value is None else _trace_path(value, "'--record'")


def _load_guest(guest: str, flat_at: int | None, entry: int | None, ram_size: int):
    """An ELF path, a flat binary (with --flat-at), or the name of a bundled program."""
    from .guests import build_guest, flat_image, list_programs, load_elf

    if entry is not None and flat_at is None:
        raise click.UsageError("--entry applies to a flat binary (--flat-at); an ELF file states its own entry")
    if not guest.strip():
        raise click.BadParameter(f"an empty name; give an ELF file, a flat binary (with --flat-at) or a bundled "
                                 f"program ({', '.join(list_programs())})", param_hint="'GUEST'")
    if flat_at is not None:
        from ._files import FileTooLarge, NotRegularFile, read_regular

        try:
            data = read_regular(guest, ram_size)
        except FileTooLarge:
            raise click.BadParameter(f"{guest} is larger than guest RAM ({ram_size >> 20:,} MiB, --memory)",
                                     param_hint="'GUEST'") from None
        except NotRegularFile:
            raise click.BadParameter(f"{guest}: not a regular file (a device, FIFO or socket), not a flat binary",
                                     param_hint="'GUEST'") from None
        except OSError as e:
            raise click.BadParameter(f"{guest}: cannot read the flat binary: {e.strerror or e}",
                                     param_hint="'GUEST'") from None
        if not data:
            raise click.BadParameter(f"{guest} is empty: no code to load at --flat-at {flat_at:#x}",
                                     param_hint="'GUEST'")
        end = flat_at + len(data)
        if end > ram_size:
            raise click.BadParameter(
                f"{flat_at:#x}: the flat binary ({len(data):,} bytes, up to {end:#x}) lies beyond guest RAM "
                f"({ram_size >> 20:,} MiB); give a lower --flat-at or a larger --memory", param_hint="'--flat-at'")
        if entry is not None and not flat_at <= entry < end:
            raise click.BadParameter(f"{entry:#x} is outside the flat binary, which spans {flat_at:#x}-{end:#x} "
                                     f"(--flat-at plus its {len(data):,} bytes)", param_hint="'--entry'")
        return flat_image(data, flat_at, entry)
    if os.path.exists(guest) and not guest.endswith(".c"):
        return load_elf(guest)  # (a device or FIFO is refused unread)
    if guest in list_programs() or guest.endswith(".c"):  # (build_guest names a missing or odd .c path)
        from rich.console import Console

        # building takes a few seconds the first time (then it is cached); a spinner on a terminal
        what = f"the bundled guest {guest!r}" if guest in list_programs() else guest
        with Console(stderr=True).status(f"building {what} with gcc…"):
            return load_elf(build_guest(guest))
    raise click.BadParameter(
        f"{guest!r} is neither a file nor a bundled program ({', '.join(list_programs())})", param_hint="'GUEST'"
    )


def _policy(policy_file, protect, image, decision, ram_size: int):
    from .policy import Policy, load_policy, parse_protect_arg

    if policy_file:
        pol = load_policy(policy_file, image)
        if not pol:
            _warn(f"--policy {policy_file} protects nothing: it has no [[protect]] entries")
        return pol
    if protect:
        ranges = [parse_protect_arg(p) for p in protect]
        for arg, (start, length) in zip(protect, ranges):
            if start + length > ram_size:
                raise click.BadParameter(f"{arg!r} ends at {start + length:#x}, beyond guest RAM "
                                         f"({ram_size >> 20:,} MiB, --memory)", param_hint="'--protect'")
        return Policy.from_ranges(ranges, decision=decision or "skip")
    return None


def _warn(msg: str) -> None:
    click.echo(f"sppkit: warning: {msg}", err=True)


def _same_file(a: str, b: str | None) -> bool:
    try:
        return b is not None and os.path.exists(a) and os.path.samefile(a, b)
    except OSError:
        return False


@main.command(short_help="Run a guest (ELF, flat binary or bundled program) with sub-page write protection.")
@click.argument("guest")
@click.option("--engine", type=click.Choice(["auto", "kvm", "unicorn"]), default="auto", show_default=True,
              help=_ENGINE_HELP)
@click.option("--policy", "policy_file", type=click.Path(exists=True, dir_okay=False),
              help="TOML policy: [[protect]] entries, each a symbol (with optional offset/length) or "
                   "start + length, and decisions (skip, emulate, stop); see examples/mixed.toml.  "
                   "Default: nothing protected.")
@click.option("--protect", multiple=True, metavar="START:LENGTH",
              help="Protect LENGTH bytes at guest-physical START (decimal or 0x hex; repeatable), instead of "
                   "--policy.  SPP protects whole 128-byte sub-pages.")
@click.option("--decision", type=click.Choice(["skip", "emulate", "stop"]), default=None,
              help="What a write to a --protect range does: skip (discard the write, the guest goes on), "
                   "emulate (commit it, the sub-page stays protected), or stop (write nothing, end the "
                   "run).  [default: skip]")
@click.option("--cpl", type=click.Choice(["0", "3"]), default="3", show_default=True,
              help="Privilege level of the guest. 3 runs natively under KVM on hosts where CPL 0 is emulated.")
@click.option("--memory", metavar="SIZE", default="64M", show_default=True, callback=_memory_option,
              help=MEMORY_HELP)
@click.option("--spp-mode", type=click.Choice(["lazy", "eager"]), default="lazy", show_default=True,
              help="SPPT construction: lazy (KVM series: built on SPP misses, one per 2-MiB region) or eager "
                   "(built up front, no misses).")
@click.option("--timeout", metavar="SECONDS", type=float, default=60.0, show_default=True,
              callback=timeout_option,
              help=f"Seconds before the guest is stopped (exit status 1), from 0 to {MAX_TIMEOUT}; 0: no limit.")
@click.option("--flat-at", metavar="GPA", callback=_address_option,
              help="GUEST is a flat binary (raw code, no ELF header) to load at guest-physical GPA; its entry "
                   "is GPA unless --entry.")
@click.option("--entry", metavar="GPA", callback=_address_option,
              help="Entry point of a flat binary (with --flat-at), inside it.  [default: the --flat-at GPA]")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (console, stop reason, statistics, violations) on stdout instead of "
                   "tables; notes go to stderr.")
@click.option("--record", "record_file", metavar="FILE", type=click.Path(dir_okay=False),
              callback=_record_option,
              help="Record the guest's writes (gpa, size, rip) as a native trace (.npz, or .parquet "
                   "with pyarrow) for `sppkit replay`: every write under Unicorn, the writes to "
                   "protected pages under KVM.  An existing FILE is replaced.")
@progress_option
def run(guest, engine, policy_file, protect, decision, cpl, memory, spp_mode, timeout, flat_at, entry, as_json,
        record_file, progress):
    """Run GUEST with sub-page write protection and report its writes to protected
    sub-pages (violations), what page-granular protection would have trapped, and
    the guest's console.

    GUEST is an x86-64 static ELF, a flat binary (with --flat-at), a C file (built
    with gcc against sppkit's guest runtime: main()'s return value is the exit code),
    or a bundled program (selftest, mixed, workload, ...: a name that is neither lists
    them all; bundled programs are built with gcc on first use).

    Exit status: the guest's exit code (its write to port 0xF4) when it exits, 1 when
    the run ends otherwise (STOP decision, fault, timeout), 2 on bad input.

    \b
    Examples:
      sppkit run mixed --policy examples/mixed.toml
      sppkit run code.bin --flat-at 0x400000 --protect 0x401000:8 --decision stop
      sppkit run mixed --engine unicorn --timeout 5 --json
      sppkit run workload --engine unicorn --record w.npz   # then: sppkit replay w.npz ...
    """
    import json

    from rich.console import Console

    from .engines import choose_engine
    from .report import print_run

    # option conflicts first: loading a bundled guest may build it with gcc
    if policy_file and protect:
        raise click.UsageError("give --policy or --protect, not both")
    if decision is not None and not protect:
        raise click.UsageError("--decision applies to --protect ranges (a --policy file states its own decisions)")
    if record_file is not None:
        for what, path in (("GUEST", guest), ("--policy", policy_file)):
            if _same_file(record_file, path):
                raise click.BadParameter(f"{record_file} is the {what} file; record to another path",
                                         param_hint="'--record'")
    image = _load_guest(guest, flat_at, entry, memory)
    pol = _policy(policy_file, protect, image, decision, memory)
    cls, why = choose_engine(engine)
    eng = cls(image, policy=pol, ram_size=memory, cpl=int(cpl), timeout=timeout, spp_mode=spp_mode)
    recorder = None
    try:
        if not as_json:
            Console(stderr=True).print(f"[dim]engine: {why}[/]")
        if record_file:
            from .engines.replay.cli import recorder_for

            recorder = recorder_for(record_file)
            eng.record_writes(recorder)
            if not eng.records_every_write:
                _warn(f"--record with the {eng.name} engine: only writes to pages holding a protected sub-page "
                      "reach the VMM and are recorded (the rest run on the CPU); use --engine unicorn to record "
                      "every write")
        with Progress(f"run: {Path(str(guest)).name} on the {eng.name} engine (Ctrl-C stops it)…", progress):
            result = eng.run()
    except BaseException:
        if recorder is not None:
            recorder.abort()  # a run that failed leaves no half-written trace
        raise
    else:
        if recorder is not None:
            recorder.close()
    finally:
        eng.close()
    if as_json:
        click.echo(json.dumps(result.to_dict(), allow_nan=False))
    else:
        print_run(result, Console())
    sys.exit(result.exit_status)


@main.command(short_help="Report what this machine offers: KVM, Unicorn, gcc/binutils, valgrind.")
def doctor():
    """Report what this machine offers sppkit: KVM (for --engine kvm), Unicorn (and its
    C hook trampoline), gcc and binutils (to build the bundled guests), and valgrind
    (to record memory traces for `sppkit replay`), each with its status and what it
    is for.  Information only: the exit status is 0 whatever is missing.
    """
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
        from .vmm.write_cache import status as write_cache_status

        wok, wwhy = write_cache_status()
        t.add_row("C write cache (Vm)", "[green]ok[/]" if wok else "[yellow]unavailable[/]",
                  f"{wwhy}; with the C trampoline, stores the processor's cache permits outright are made in C"
                  if wok else f"{wwhy}; every protected store goes to vm.write (same results, slower)")
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
