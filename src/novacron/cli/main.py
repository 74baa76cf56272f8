"""Entry point of the ``novacron`` command. Each command group lives in its own module."""

from __future__ import annotations

import typer

from novacron import __version__

app = typer.Typer(
    name="novacron",
    help="NovaCron: run and live-migrate QEMU virtual machines across hosts and datacenters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"novacron {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """NovaCron command line."""


def _register() -> None:
    # Groups are imported here, not at module top, so `novacron --help` stays fast and one broken
    # optional subsystem cannot take the whole CLI down with an import error.
    from novacron.cli import groups

    for name, group, help_text in groups.all_groups():
        app.add_typer(group, name=name, help=help_text)


def main() -> None:
    _register()
    app()
