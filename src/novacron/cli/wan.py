"""``novacron wan``: the WAN emulator for manual experiments (up, status, set, exec, down, cleanup).

``wan up`` runs in the foreground until Ctrl-C (or ``wan down``) and tears everything down on exit;
the other commands find running instances by their namespaces (``ncwan-<owner pid>-<token>-<node>``)
and reach the forwarder through a control socket under the state directory.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from novacron.cli.output import console, emit_json, run_command
from novacron.errors import NotFoundError, UserError
from novacron.paths import state_dir
from novacron.testing import LinkSpec, WanEmulator, cleanup_leftovers, find_instances
from novacron.testing.forwarder import control_socket_request
from novacron.testing.leftovers import InstanceNamespaces

app = typer.Typer(no_args_is_help=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
InstanceOpt = Annotated[
    str | None, typer.Option("--instance", "-i", help="<owner pid>-<token>; needed only if several run.")
]
_RATE = re.compile(r"^\s*([0-9.]+)\s*([kKmMgG]?)(?:bit/s|bps|b)?\s*$")
_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_rate(text: str) -> float:
    """'100M', '1G', '2.5Gbit/s', '64000' -> bit/s."""
    m = _RATE.match(text)
    if not m:
        raise UserError("bad rate: use bits per second with an optional k/M/G suffix", rate=text)
    return float(m[1]) * _SCALE[m[2].lower()]


def _socket_dir() -> Path:
    return state_dir() / "wan"


def _socket_path(instance: str) -> Path:
    return _socket_dir() / f"{instance}.sock"


def _pick(instance: str | None) -> InstanceNamespaces:
    live = [i for i in find_instances() if i.owner_alive]
    if instance is not None:
        live = [i for i in live if f"{i.owner_pid}-{i.token}" == instance]
    if not live:
        raise NotFoundError("no running WAN emulator instance" + (f" {instance}" if instance else ""))
    if len(live) > 1:
        ids = [f"{i.owner_pid}-{i.token}" for i in live]
        raise UserError("several instances are running; pick one with --instance", instances=ids)
    return live[0]


@app.command()
def up(
    *,
    node: Annotated[
        list[str] | None, typer.Option("--node", "-n", help="Node name (repeat; default a, b).")
    ] = None,
    rate: Annotated[
        str | None, typer.Option(help="Rate per direction, e.g. 100M, 1G (default: none).")
    ] = None,
    rtt_ms: Annotated[float, typer.Option("--rtt-ms", help="Round-trip time (half each way).")] = 0.0,
    jitter_ms: Annotated[float, typer.Option("--jitter-ms", help="Uniform +- jitter per direction.")] = 0.0,
    loss: Annotated[float, typer.Option(help="Random loss per direction, 0..1.")] = 0.0,
    queue_bytes: Annotated[int | None, typer.Option(help="Bottleneck queue (default about one BDP).")] = None,
    backend: Annotated[
        str, typer.Option(help="tun (shaping forwarder) or veth (unshaped, fastest).")
    ] = "tun",
    mtu: Annotated[int, typer.Option(help="MTU of the nodes' interfaces.")] = 1500,
) -> None:
    """Start an emulated network and keep it up until Ctrl-C (or `novacron wan down`)."""

    def body() -> None:
        nodes = node or ["a", "b"]
        spec = None
        if backend != "veth":
            spec = LinkSpec(
                rate_bps=parse_rate(rate) if rate else None,
                delay_ms=rtt_ms / 2,
                jitter_ms=jitter_ms,
                loss=loss,
                queue_bytes=queue_bytes,
            )
        _socket_dir().mkdir(parents=True, exist_ok=True)
        wan = WanEmulator(nodes, link=spec, backend=backend, mtu=mtu, control_socket_dir=_socket_dir())
        sock = wan.control_socket
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            with wan:
                console.print(f"WAN emulator {wan.instance_id} up ({wan.backend.value})", highlight=False)
                for n in wan.nodes:
                    console.print(f"  {n:8} {wan.address(n):15} netns {wan.namespace(n)}", highlight=False)
                if spec is not None:
                    console.print(f"  link (each direction): {spec}", highlight=False)
                console.print("Ctrl-C (or `novacron wan down`) tears it down.", highlight=False)
                signal.sigwait({signal.SIGINT, signal.SIGTERM})
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
            if sock is not None:
                sock.unlink(missing_ok=True)
        console.print("torn down", highlight=False)

    run_command(body)


@app.command()
def status(as_json: JsonOpt = False) -> None:
    """List emulator instances on this machine and, for running ones, their link counters."""

    def body() -> list[dict[str, Any]]:
        out = []
        for inst in find_instances():
            ident = f"{inst.owner_pid}-{inst.token}"
            entry: dict[str, Any] = {
                "instance": ident,
                "owner_pid": inst.owner_pid,
                "owner_alive": inst.owner_alive,
                "namespaces": inst.namespaces,
            }
            sock = _socket_path(ident)
            if inst.owner_alive and sock.exists():
                entry["stats"] = json.loads(control_socket_request(sock, "stats"))
            out.append(entry)
        return out

    found = run_command(body, as_json)
    if as_json:
        emit_json(found)
        return
    if not found:
        console.print("no WAN emulator instances")
    for entry in found:
        state = "running" if entry["owner_alive"] else "LEFTOVER (owner gone; `novacron wan cleanup`)"
        console.print(f"{entry['instance']}: {state}", highlight=False)
        for n, ns in entry["namespaces"].items():
            console.print(f"  {n:8} netns {ns}", highlight=False)
        for link in entry.get("stats", {}).get("links", []):
            console.print(
                f"  {link['src']}->{link['dst']}: rate={link['rate_bps']} delay_ns={link['delay_ns']} "
                f"loss={link['loss']} up={link['up']} fwd={link['fwd_pkts']} pkts/{link['fwd_bytes']} B "
                f"lost={link['loss_pkts']} qdrop={link['qdrop_pkts']} down={link['down_pkts']}",
                highlight=False,
            )


@app.command("set")
def set_link(
    src: Annotated[str, typer.Argument(help="Source node.")],
    dst: Annotated[str, typer.Argument(help="Destination node.")],
    *,
    instance: InstanceOpt = None,
    rate: Annotated[str | None, typer.Option(help="New rate (0 = unlimited), e.g. 100M.")] = None,
    delay_ms: Annotated[float | None, typer.Option("--delay-ms", help="One-way delay.")] = None,
    jitter_ms: Annotated[float | None, typer.Option("--jitter-ms")] = None,
    loss: Annotated[float | None, typer.Option(help="Random loss 0..1.")] = None,
    queue_bytes: Annotated[int | None, typer.Option()] = None,
    link_up: Annotated[bool | None, typer.Option("--up/--cut", help="Restore or cut the link.")] = None,
    one_way: Annotated[bool, typer.Option("--one-way", help="Only src->dst (default: both ways).")] = False,
) -> None:
    """Change a running link; only the given parameters change."""

    def body() -> None:
        inst = _pick(instance)
        sock = _socket_path(f"{inst.owner_pid}-{inst.token}")
        if not sock.exists():
            raise NotFoundError("this instance has no control socket (veth backend?)", path=str(sock))
        parts = []
        if rate is not None:
            parts.append(f"rate={round(parse_rate(rate))}")
        if delay_ms is not None:
            parts.append(f"delay={round(delay_ms * 1e6)}")
        if jitter_ms is not None:
            parts.append(f"jitter={round(jitter_ms * 1e6)}")
        if loss is not None:
            parts.append(f"loss={loss!r}")
        if queue_bytes is not None:
            parts.append(f"queue={queue_bytes}")
        if link_up is not None:
            parts.append(f"up={int(link_up)}")
        if not parts:
            raise UserError("nothing to change: give at least one parameter")
        pairs = [(src, dst)] if one_way else [(src, dst), (dst, src)]
        for a, b in pairs:
            control_socket_request(sock, f"set {a} {b} {' '.join(parts)}")
        console.print(f"set {', '.join(f'{a}->{b}' for a, b in pairs)}: {' '.join(parts)}", highlight=False)

    run_command(body)


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_in(
    ctx: typer.Context,
    node: Annotated[str, typer.Argument(help="Node to run in.")],
    instance: InstanceOpt = None,
) -> None:
    """Run a command inside a node's namespace: novacron wan exec a -- ip addr."""

    def body() -> tuple[str, list[str]]:
        inst = _pick(instance)
        if node not in inst.namespaces:
            raise NotFoundError("no such node in this instance", node=node, nodes=sorted(inst.namespaces))
        if not ctx.args:
            raise UserError("give the command after --")
        return inst.namespaces[node], list(ctx.args)

    ns, argv = run_command(body)
    os.execvp("ip", ["ip", "netns", "exec", ns, *argv])


@app.command()
def down(instance: InstanceOpt = None) -> None:
    """Ask a running `wan up` to tear its network down."""

    def body() -> None:
        inst = _pick(instance)
        os.kill(inst.owner_pid, signal.SIGTERM)
        console.print(f"asked {inst.owner_pid}-{inst.token} to stop", highlight=False)

    run_command(body)


@app.command()
def cleanup(
    include_live: Annotated[
        bool, typer.Option("--all", help="Also instances whose owner still runs.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove namespaces left behind by crashed emulator owners."""
    removed = run_command(lambda: cleanup_leftovers(include_live=include_live), as_json)
    if as_json:
        emit_json({"removed": removed})
    else:
        console.print(f"removed {len(removed)} namespace(s)" + (": " + ", ".join(removed) if removed else ""))
