"""``novacron demo``: the README's main command (see novacron.demo and docs/demo.md)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from novacron.cli.output import console, run_command
from novacron.demo.settings import DEFAULT_DWELL_S, DEFAULT_LINK, DEFAULT_RATE, DemoSettings, parse_link

app = typer.Typer(invoke_without_command=True)


@app.callback()
def demo(  # noqa: PLR0917 - typer maps each parameter to an option
    profile: Annotated[
        str, typer.Option(help="Test guest profile: default (768 MiB, 320 MiB data) or test (192 MiB).")
    ] = "default",
    rate: Annotated[int, typer.Option(help="Pages per second the guest's workload dirties.")] = DEFAULT_RATE,
    link: Annotated[
        str,
        typer.Option(
            help="Emulated link between the hosts: RATE/RTT (100mbit/50ms, 1gbit/10ms) or unshaped."
        ),
    ] = DEFAULT_LINK,
    dwell: Annotated[
        float, typer.Option(help="Seconds the guest works on hostb before it migrates back.")
    ] = DEFAULT_DWELL_S,
    max_downtime: Annotated[int, typer.Option("--max-downtime", help="Downtime limit in ms.")] = 300,
    skip_qemu: Annotated[
        bool, typer.Option("--skip-qemu", help="Leave out QEMU's own migration (the comparison).")
    ] = False,
) -> None:
    """Live-migrate a running VM between two emulated hosts and back, next to QEMU's own migration.

    Two network namespaces joined by the WAN emulator (an internet-like link by default: 100 Mbit/s,
    50 ms RTT), a NovaCron agent in each. The test guest boots on hosta with its memory-dirtying
    workload, migrates to hostb over DWCP with a live progress display, proves its memory is intact,
    works there for a while, and migrates back (hosta kept the memory it sent, so little crosses).
    Then QEMU's own best migration (multifd x4 + zstd-3) moves the same kind of guest over the same
    link, and a summary compares time, downtime and bytes on the link.

    Needs root (namespaces), QEMU and the guest images (`make demo` installs and builds everything).
    Ctrl-C stops it and removes the namespaces, agents and VMs. Exit code 0 when every guest came
    through intact, 1 otherwise, 2 for bad options or a missing prerequisite.
    """
    from novacron.demo.run import run_demo
    from novacron.demo.summary import print_summary

    settings = run_command(
        lambda: DemoSettings(
            profile=profile, rate=rate, link=parse_link(link), dwell_s=dwell,
            skip_qemu=skip_qemu, max_downtime_ms=max_downtime,
        )
    )  # fmt: skip
    result = run_command(lambda: asyncio.run(run_demo(settings, console)))
    print_summary(result, console)
    if not result.ok:
        raise SystemExit(1)
