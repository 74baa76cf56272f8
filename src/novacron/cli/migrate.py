"""``novacron migrate VM --to NODE``: start a live migration on the local agent and follow it live.

The display refreshes from the agent (``GET /v1/migrations/<id>``) every half second: phase, QEMU's
pass, bytes raw (QEMU's) and on the wire, their ratio, the wire rate, the guest's dirty rate and an
ETA; at the end a report with the phases, downtime and bytes. Exit code 0 when the migration
committed, 1 when it failed or was cancelled (the record says why), 2 for bad input.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from novacron.api.clientconfig import connect
from novacron.cli.output import EXIT_FAILURE, console, emit_json, run_command

app = typer.Typer(context_settings={"allow_interspersed_args": True})

POLL_S = 0.5  # the display's refresh period
FINAL_PHASES = ("done", "failed", "cancelled")
_PHASE_STYLE = {"done": "bold green", "failed": "bold red", "cancelled": "yellow", "in-doubt": "bold magenta"}


def mib(n: float | int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):,.1f} MiB"


def mbit(bps: float | None) -> str:
    return "-" if not bps else f"{bps / 1e6:,.1f} Mbit/s"


def progress_table(m: dict[str, Any], started: float) -> Table:
    p = m.get("progress") or {}
    raw, wire = p.get("bytes_raw", 0), p.get("bytes_wire", 0)
    dirty_bps = p.get("dirty_pages_rate", 0) * p.get("page_size", 4096) * 8
    eta = p.get("eta_s")
    phase = str(m.get("phase", "?"))
    table = Table(title=f"migration {m.get('id')}: {m.get('vm')} {m.get('source')} -> {m.get('destination')}",
                  show_header=False, min_width=64)  # fmt: skip
    table.add_column(style="bold")
    table.add_column()
    table.add_row("phase", Text(phase, style=_PHASE_STYLE.get(phase, "cyan")))
    table.add_row("mode / data path", f"{m.get('mode') or '?'} / {m.get('data_path') or '?'}")
    table.add_row("QEMU", f"{p.get('qemu_status') or '-'}, pass {p.get('iteration', 0)}")
    table.add_row("memory left", f"{mib(p.get('ram_remaining'))} of {mib(p.get('ram_total'))}")
    table.add_row("bytes raw / on the wire", f"{mib(raw)} / {mib(wire)}")
    table.add_row("ratio", f"{raw / wire:.2f}x" if wire else "-")
    table.add_row("wire rate", mbit(p.get("rate_bps")))
    table.add_row("dirty rate", f"{p.get('dirty_pages_rate', 0):,.0f} pages/s ({mbit(dirty_bps)})")
    table.add_row("ETA", "-" if eta is None else f"{eta:.1f} s")
    table.add_row("elapsed", f"{time.monotonic() - started:.1f} s")
    return table


def report(m: dict[str, Any]) -> Group:
    p = m.get("progress") or {}
    phase = str(m.get("phase"))
    head = Text.assemble(("result: ", "bold"), (phase, _PHASE_STYLE.get(phase, "white")))
    table = Table(show_header=False, min_width=64)
    table.add_column(style="bold")
    table.add_column()
    created, finished = m.get("created_at") or 0.0, m.get("finished_at")
    if finished:
        table.add_row("total time", f"{finished - created:.2f} s")
    history = m.get("history") or []
    steps = [f"{h['phase']} +{h['at'] - created:.2f}s" for h in history]
    table.add_row("phases", ", ".join(steps))
    table.add_row("mode / data path", f"{m.get('mode')} / {m.get('data_path')}")
    down = m.get("downtime_ms")
    qdown = m.get("qemu_downtime_ms")
    table.add_row("downtime", ("-" if down is None else f"{down:.0f} ms (STOP -> RESUME)")
                  + ("" if qdown is None else f", QEMU's own {qdown} ms")
                  + f", limit {m.get('max_downtime_ms')} ms")  # fmt: skip
    raw, wire = p.get("bytes_raw", 0), p.get("bytes_wire", 0)
    table.add_row(
        "bytes raw / on the wire",
        f"{mib(raw)} / {mib(wire)}" + (f" (ratio {raw / wire:.2f}x)" if wire else ""),
    )
    table.add_row("passes", str(p.get("iteration", 0)))
    for event in m.get("events") or []:
        table.add_row("event", event)
    err = m.get("error")
    if err:
        table.add_row(
            "error", Text(f"{err.get('kind')} in {err.get('phase')}: {err.get('message')}", style="red")
        )
    return Group(head, table)


async def follow(client: Any, migration_id: str, *, live: bool) -> dict[str, Any]:
    started = time.monotonic()
    m: dict[str, Any] = await client.request("GET", f"/v1/migrations/{migration_id}")
    if not live:
        while str(m.get("phase")) not in FINAL_PHASES:
            await asyncio.sleep(POLL_S)  # a display refresh period
            m = await client.request("GET", f"/v1/migrations/{migration_id}")
        return m
    with Live(progress_table(m, started), console=console, refresh_per_second=4, transient=False) as view:
        while str(m.get("phase")) not in FINAL_PHASES:
            await asyncio.sleep(POLL_S)  # a display refresh period
            m = await client.request("GET", f"/v1/migrations/{migration_id}")
            view.update(progress_table(m, started))
    return m


@app.callback(invoke_without_command=True)
def migrate(  # noqa: PLR0917 - typer maps each parameter to an option
    vm: Annotated[str, typer.Argument(help="The VM to move (it runs on this host).")],
    to: Annotated[str, typer.Option("--to", help="Destination node id (a peer of this agent).")],
    mode: Annotated[
        str, typer.Option(help="auto (the mode detector decides) | datacenter | hybrid | internet")
    ] = "auto",
    max_downtime: Annotated[
        int | None, typer.Option("--max-downtime", help="Maximum pause in ms [agent: 300].")
    ] = None,
    deadline: Annotated[
        float | None, typer.Option("--deadline", help="Give up unless switched over within S seconds.")
    ] = None,
    allow_postcopy: Annotated[
        bool,
        typer.Option(
            "--allow-postcopy",
            help="Escalate to post-copy if precopy cannot converge (if the agent allows it).",
        ),
    ] = False,
    data_path: Annotated[
        str | None, typer.Option("--data-path", help="Force direct | tunnel | passthrough.")
    ] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Print the migration id and return.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Machine-readable output (no live display).")
    ] = False,
) -> None:
    """Live-migrate a VM to another node and show its progress."""
    body: dict[str, Any] = {"vm": vm, "to": to, "mode": mode, "allow_postcopy": allow_postcopy}
    for key, value in (("max_downtime_ms", max_downtime), ("deadline_s", deadline), ("data_path", data_path)):
        if value is not None:
            body[key] = value

    async def main() -> dict[str, Any]:
        async with connect() as client:
            started: dict[str, Any] = await client.request("POST", "/v1/migrations", json=body)
            if no_wait:
                return started
            return await follow(client, str(started["id"]), live=not as_json)

    result = run_command(lambda: asyncio.run(main()), as_json)
    if as_json:
        emit_json(result)
    elif no_wait:
        console.print(f"migration {result['id']} started ({result.get('phase')})")
    else:
        console.print(report(result))
    if not no_wait and str(result.get("phase")) != "done":
        raise SystemExit(EXIT_FAILURE)
