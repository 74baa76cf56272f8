"""``novacron node``: the node registry (through a control node's API) and drains."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from novacron.api.client import ApiClient
from novacron.api.clientconfig import connect
from novacron.cli.output import EXIT_FAILURE, console, emit_json, run_command
from novacron.cluster.errors import ClusterSettingError

app = typer.Typer(no_args_is_help=True)
T = TypeVar("T")
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
NodeArg = Annotated[str, typer.Argument(help="Node id.")]
DRAIN_POLL_S = 0.5  # how often the drain's report is read while it runs
DRAIN_TIMEOUT_S = 6 * 3600.0


def _remote(body: Callable[[ApiClient], Awaitable[T]], as_json: bool) -> T:
    async def main() -> T:
        async with connect() as client:
            return await body(client)

    return run_command(lambda: asyncio.run(main()), as_json)


def _ago(ts: float | None) -> str:
    return "-" if ts is None else f"{max(0.0, time.time() - ts):.0f}s ago"


def _node_table(nodes: list[dict[str, Any]]) -> Table:
    table = Table("node", "health", "roles", "vCPUs", "RAM MiB", "VMs", "labels", "DWCP", "heartbeat")
    style = {"ready": "green", "not-ready": "red", "maintenance": "yellow"}
    for n in nodes:
        labels = ",".join(f"{k}={v}" for k, v in sorted(n["labels"].items()))
        table.add_row(n["node"], f"[{style[n['health']]}]{n['health']}[/]", ",".join(n["roles"]),
                      str(n["vcpus"] or "-"), str(n["memory_mib"] or "-"), str(len(n["vms"])), labels or "-",
                      n["dwcp"] or "-", _ago(n["heartbeat_at"]))  # fmt: skip
    return table


@app.command("list")
def list_nodes(as_json: JsonOpt = False) -> None:
    """Registered nodes with health (ready / not-ready / maintenance), capacity and VMs."""
    nodes = _remote(lambda c: c.request("GET", "/v1/nodes"), as_json)
    if as_json:
        emit_json(nodes)
    else:
        console.print(_node_table(nodes))


@app.command()
def show(node: NodeArg, as_json: JsonOpt = False) -> None:
    """One node, with the VMs it reported."""
    n = _remote(lambda c: c.request("GET", f"/v1/nodes/{node}"), as_json)
    if as_json:
        emit_json(n)
        return
    console.print(_node_table([n]))
    for vm in n["vms"]:
        console.print(
            f"  {vm['name']}  {vm['vcpus']} vCPU  {vm['memory_mib']} MiB  {vm['state']}", highlight=False
        )


@app.command()
def cordon(node: NodeArg, as_json: JsonOpt = False) -> None:
    """Maintenance: the node takes no new VMs (its VMs keep running)."""
    n = _remote(lambda c: c.request("POST", f"/v1/nodes/{node}/cordon"), as_json)
    emit_json(n) if as_json else console.print(f"{node}: {n['health']}", highlight=False)


@app.command()
def uncordon(node: NodeArg, as_json: JsonOpt = False) -> None:
    """End maintenance."""
    n = _remote(lambda c: c.request("POST", f"/v1/nodes/{node}/uncordon"), as_json)
    emit_json(n) if as_json else console.print(f"{node}: {n['health']}", highlight=False)


@app.command()
def label(
    node: NodeArg,
    labels: Annotated[list[str], typer.Argument(help="key=value to set, key- to remove.")],
    as_json: JsonOpt = False,
) -> None:
    """Set or remove operator labels (they override the agent's own)."""

    def parse() -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for item in labels:
            if item.endswith("-") and "=" not in item:
                out[item[:-1]] = None
                continue
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ClusterSettingError("labels are key=value or key-", field="labels", value=item)
            out[key] = value
        return out

    body = run_command(parse, as_json)
    n = _remote(lambda c: c.request("PUT", f"/v1/nodes/{node}/labels", json={"labels": body}), as_json)
    emit_json(n) if as_json else console.print(_node_table([n]))


@app.command()
def remove(node: NodeArg, as_json: JsonOpt = False) -> None:
    """Forget a node (admin). Its certificate stays valid until it expires."""
    out = _remote(lambda c: c.request("DELETE", f"/v1/nodes/{node}"), as_json)
    emit_json(out) if as_json else console.print(f"removed {node}", highlight=False)


def _moves_table(report: dict[str, Any]) -> Table:
    table = Table("VM", "to", "state", "attempts", "downtime ms", "error")
    style = {"done": "green", "running": "cyan", "pending": "white", "failed": "red", "unplaceable": "red"}
    for m in report["moves"]:
        downtime = f"{m['downtime_ms']:.0f}" if m.get("downtime_ms") is not None else "-"
        table.add_row(m["vm"], m["dst"] or "-", f"[{style[m['state']]}]{m['state']}[/]", str(m["attempts"]),
                      downtime, (m.get("error") or "")[:80])  # fmt: skip
    return table


@app.command()
def drain(
    node: NodeArg,
    parallel: Annotated[int, typer.Option("--parallel", help="Live migrations in flight at once.")] = 2,
    mode: Annotated[str, typer.Option("--mode", help="auto | datacenter | hybrid | internet")] = "auto",
    data_path: Annotated[
        str | None, typer.Option("--data-path", help="direct | tunnel | passthrough")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Cordon the node and move every VM off it by live migration; exit 1 if any VM stays."""

    request: dict[str, Any] = {"parallel": parallel, "mode": mode}
    if data_path is not None:
        request["data_path"] = data_path

    async def main() -> dict[str, Any]:
        async with connect() as client:
            report: dict[str, Any] = await client.request("POST", f"/v1/nodes/{node}/drain", json=request)
            columns = (TextColumn("draining {task.description}"), BarColumn(), TaskProgressColumn(),
                       TextColumn("{task.fields[detail]}"), TimeElapsedColumn())  # fmt: skip
            progress = Progress(*columns, console=console)
            task = progress.add_task(node, total=max(1, report["total"]), detail="planning")
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                with (
                    Live(progress, console=console, transient=True)
                    if not as_json
                    else contextlib.nullcontext()
                ):
                    while report["state"] in ("planning", "running"):
                        await asyncio.sleep(DRAIN_POLL_S)  # the drain runs on the control node; poll it
                        report = await client.request("GET", f"/v1/nodes/{node}/drain")
                        finished = report["done"] + report["failed"] + report["unplaceable"]
                        detail = (f"{report['done']} moved, {report['running']} moving, "
                                  f"{report['failed'] + report['unplaceable']} failed")  # fmt: skip
                        progress.update(
                            task, total=max(1, report["total"]), completed=finished, detail=detail
                        )
            return report

    report = run_command(lambda: asyncio.run(main()), as_json)
    if as_json:
        emit_json(report)
    else:
        console.print(_moves_table(report))
        took = (report["ended_at"] or time.time()) - report["started_at"]
        why = f": {report['error']}" if report["error"] else ""
        moved = f"{report['done']}/{report['total']} moved in {took:.1f} s"
        console.print(f"drain of {node}: {report['state']} ({moved}){why}", highlight=False)
    if report["state"] != "done":
        raise typer.Exit(EXIT_FAILURE)
