"""``novacron migration list|show|cancel``: the migrations this host's agent knows."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import typer
from rich.table import Table

from novacron.api.clientconfig import connect
from novacron.cli.migrate import mib, report
from novacron.cli.output import console, emit_json, run_command

app = typer.Typer(no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
IdArg = Annotated[str, typer.Argument(help="Migration id.")]


def _call(method: str, path: str, as_json: bool, body: dict[str, Any] | None = None) -> Any:
    async def main() -> Any:
        async with connect() as client:
            return await client.request(method, path, json=body)

    return run_command(lambda: asyncio.run(main()), as_json)


@app.command("list")
def list_migrations(as_json: JsonOpt = False) -> None:
    """Migrations in and out of this host, newest first (both roles of a migration on one host)."""
    rows = _call("GET", "/v1/migrations", as_json)
    if as_json:
        emit_json(rows)
        return
    table = Table(
        "id", "vm", "role", "from", "to", "phase", "mode/path", "started", "took", "downtime", "wire"
    )
    for m in rows:
        created = m.get("created_at") or 0.0
        took = (m.get("finished_at") or time.time()) - created
        down = m.get("downtime_ms")
        table.add_row(
            m.get("id", "?"), m.get("vm", "?"), m.get("role", "?"),
            m.get("source", "?"), m.get("destination", "?"),
            str(m.get("phase")), f"{m.get('mode') or '-'}/{m.get('data_path') or '-'}",
            time.strftime("%H:%M:%S", time.localtime(created)), f"{took:.1f} s",
            "-" if down is None else f"{down:.0f} ms", mib((m.get("progress") or {}).get("bytes_wire")),
        )  # fmt: skip
    console.print(table)


@app.command()
def show(migration_id: IdArg, as_json: JsonOpt = False) -> None:
    """One migration: phases, progress, downtime, bytes, events, error."""
    m = _call("GET", f"/v1/migrations/{migration_id}", as_json)
    if as_json:
        emit_json(m)
    else:
        console.print(report(m))


@app.command()
def cancel(
    migration_id: IdArg,
    reason: Annotated[str, typer.Option(help="Recorded with the migration.")] = "cancelled by the operator",
    as_json: JsonOpt = False,
) -> None:
    """Cancel a migration before it commits (it rolls back: the VM keeps running where it was)."""
    m = _call("POST", f"/v1/migrations/{migration_id}/cancel", as_json, {"reason": reason})
    if as_json:
        emit_json(m)
    else:
        console.print(f"cancel requested for {migration_id} (phase {m.get('phase')})")
