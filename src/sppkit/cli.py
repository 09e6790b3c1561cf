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
        except (ValueError, LookupError, OSError) as e:
            click.echo(f"sppkit: error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sppkit")
def main() -> None:
    """sppkit — Intel EPT-based Sub-Page write Protection (SPP) in Python.

    A bit-exact model of the processor (EPT + SPPT walks, exits 48/49/66) and
    the hypervisor side (access maps, lazy SPPT, huge pages, dirty logging,
    violation decisions).  Start with `sppkit demo`.
    """


@main.command()
def demo() -> None:
    """Build an EPT + SPPT, send writes through the processor and a Vm, print
    which were allowed and which exited and why."""
    from .demo import main as run_demo

    run_demo()


if __name__ == "__main__":  # pragma: no cover
    main()
