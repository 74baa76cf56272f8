"""``novacron demo``: the README's main job (see novacron.demo)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from novacron.cli.output import console, run_command
from novacron.demo import DemoSettings, print_report, run_demo

app = typer.Typer(invoke_without_command=True)


@app.callback()
def demo(
    profile: Annotated[str, typer.Option(help="Test guest profile (test|default).")] = "default",
    rate: Annotated[int, typer.Option(help="Pages per second the workload dirties.")] = 2250,
    watch: Annotated[float, typer.Option(help="Seconds to watch the workload live.")] = 8.0,
) -> None:
    """Boot the test guest, drive its workload, pause/resume it and verify its memory."""
    settings = DemoSettings(profile=profile, rate=rate, watch_s=watch)
    report = run_command(lambda: asyncio.run(run_demo(settings, console)))
    print_report(report, console)
    if not report.ok:
        raise SystemExit(1)
