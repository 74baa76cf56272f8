"""AMST goodput over emulated links, against one plain TCP stream and one TLS stream from the same run.

    python bench/amst.py [--json] [--repeats 3] [--only TEXT] [--methods tcp,tls,amst,...]
                         [--seconds S] [--warmup S] [--streams N] [--link-hint]

Links (WAN emulator, docs/wan-emulator.md; all far below its ~4.4 Gbit/s ceiling):
100 Mbit/s 50 ms RTT 1% loss; 1 Gbit/s 100 ms RTT 0.1% loss; 1 Gbit/s 10 ms RTT; and unshaped
(a veth pair between two namespaces, ~15 Gbit/s, so the endpoints are the limit: "loopback").

Methods, each a sender process in node a and a receiver process in node b (one core each):

* ``tcp``: one plain TCP stream, blocking sockets, the kernel's congestion control (BBR here);
* ``tcp-cubic``: the same with CUBIC, whose loss recovery caps one stream on lossy long paths
  (shaped links only: where "a single stream is loss-limited");
* ``tls``: one TLS 1.3 stream with the cluster certificates, asyncio streams (the stack AMST runs on);
* ``tls-sync``: the same TLS stream with blocking ``ssl`` sockets (unshaped link only, for scale);
* ``amst``: an AMST session (TLS streams, the stream count chosen by the controller unless
  ``--streams``), one channel, bulk writes.

Goodput is measured at the receiver from ``warmup`` seconds after the first byte to the last byte,
as a share of the link's configured rate (the rate counts IP bytes, so TCP payload can reach at most
1448/1500 = 96.5% of it). CPU is user+system time of sender and receiver for the transfer, per GB
delivered. Medians of ``--repeats`` runs. For AMST the table shows the stream count the session ended
with and the range it used. Each run takes /tmp/novacron-heavy.lock while it runs (``--lock``), so
run this command itself without flock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from novacron.testing.benchlock import DEFAULT_LOCK, heavy_lock

MiB = 1 << 20
PIECE = MiB
PORT = 7500
CHECKPOINT_S = 0.1
READY = "READY"


@dataclass(frozen=True)
class Link:
    name: str
    rate_bps: float | None
    rtt_ms: float
    loss: float
    seconds: float
    warmup: float

    @property
    def shaped(self) -> bool:
        return self.rate_bps is not None


LINKS = [
    Link("100 Mbit/s 50 ms 1%", 100e6, 50, 0.01, 20, 5),
    Link("1 Gbit/s 100 ms 0.1%", 1e9, 100, 0.001, 20, 6),
    Link("1 Gbit/s 10 ms", 1e9, 10, 0.0, 15, 3),
    Link("unshaped (veth)", None, 0, 0.0, 10, 2),
]
SHAPED_METHODS = ("tcp", "tcp-cubic", "tls", "amst")
UNSHAPED_METHODS = ("tcp", "tls", "tls-sync", "amst")


def cpu_now() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ============================================================================================ workers


class Progress:
    """Receiver-side byte count with a checkpoint every CHECKPOINT_S (for the warm-up cut).

    Bytes count when they reach the receiving end: read by the application, or (AMST) held in the
    transport's reorder and read buffers (``held``). Otherwise a backlog present when the window
    opens would be counted as if it had crossed the link inside the window."""

    def __init__(self) -> None:
        self.total = 0
        self.first: float | None = None
        self.last = 0.0
        self.points: list[tuple[float, int]] = []  # (time, bytes arrived: read + held)
        self.cpu0 = 0.0
        self.max_held = 0

    def add(self, n: int, held: int = 0) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
            self.cpu0 = cpu_now()
            self.points.append((now, 0))
        self.total += n
        self.last = now
        self.max_held = max(self.max_held, held)
        if now - self.points[-1][0] >= CHECKPOINT_S:
            self.points.append((now, self.total + held))

    def result(self, warmup: float) -> dict[str, Any]:
        if self.first is None:
            return {"bytes": 0, "goodput_bps": 0.0, "cpu_s": 0.0}
        start = next(((t, b) for t, b in self.points if t >= self.first + warmup), self.points[-1])
        span = self.last - start[0]
        measured = self.total - start[1]  # nothing is held any more at the end
        return {
            "max_held_bytes": self.max_held,
            "bytes": self.total,
            "seconds": self.last - self.first,
            "measured_bytes": measured,
            "measured_seconds": span,
            "goodput_bps": measured * 8 / span if span > 0 else 0.0,
            "cpu_s": cpu_now() - self.cpu0,
        }


def tls_config(pki_dir: Path, name: str) -> Any:
    from novacron.security import pki
    from novacron.security.tls import TlsConfig

    return TlsConfig(pki.load_identity(pki_dir / name))


def ready() -> None:
    print(READY, flush=True)


def recv_tcp(host: str, warmup: float, tls: Any | None) -> dict[str, Any]:
    server = socket.create_server((host, PORT))
    ready()
    conn, _ = server.accept()
    if tls is not None:
        conn = tls.server.wrap_socket(conn, server_side=True)
    progress = Progress()
    buf = bytearray(PIECE)
    with conn:
        while n := conn.recv_into(buf):
            progress.add(n)
    return progress.result(warmup)


def send_tcp(host: str, seconds: float, cc: str | None, tls: Any | None) -> dict[str, Any]:
    sock = socket.create_connection((host, PORT))
    if cc:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
    if tls is not None:
        sock = tls.client.wrap_socket(sock, server_hostname=host)
    data = bytes(PIECE)
    cpu0, end = cpu_now(), time.monotonic() + seconds
    sent = 0
    with sock:
        while time.monotonic() < end:
            sock.sendall(data)
            sent += PIECE
        if isinstance(sock, ssl.SSLSocket):
            # close_notify is the receiver's EOF; it then closes without answering it.
            with contextlib.suppress(ssl.SSLError, OSError):
                sock.unwrap()
        else:
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # wait for the receiver to close: every byte has arrived
    return {"sent": sent, "cpu_s": cpu_now() - cpu0}


async def recv_tls_async(host: str, warmup: float, tls: Any) -> dict[str, Any]:
    done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        progress = Progress()
        while data := await reader.read(PIECE):
            progress.add(len(data))
        writer.close()
        done.set_result(progress.result(warmup))

    server = await asyncio.start_server(handle, host, PORT, ssl=tls.server, limit=4 * PIECE)
    ready()
    async with server:
        return await done


async def send_tls_async(host: str, seconds: float, tls: Any) -> dict[str, Any]:
    _, writer = await asyncio.open_connection(host, PORT, ssl=tls.client, server_hostname=host)
    data = bytes(PIECE)
    cpu0, end = cpu_now(), time.monotonic() + seconds
    sent = 0
    while time.monotonic() < end:
        writer.write(data)
        await writer.drain()
        sent += PIECE
    writer.write_eof() if writer.can_write_eof() else None
    writer.close()
    await writer.wait_closed()
    return {"sent": sent, "cpu_s": cpu_now() - cpu0}


async def recv_amst(host: str, warmup: float, tls: Any) -> dict[str, Any]:
    from novacron.dwcp.negotiation import Capabilities
    from novacron.dwcp.transport import AmstListener

    async with AmstListener(tls, capabilities=Capabilities(max_streams=32)) as listener:
        await listener.start(host, PORT)
        ready()
        session = await listener.accept()
        channel = await session.accept_channel()
        progress = Progress()
        while data := await channel.read(4 * PIECE):
            progress.add(len(data), session.core.held_bytes)
        channel.close()
        out = progress.result(warmup)
        await session._wait(lambda: session.closed)
        return out


async def send_amst(
    host: str, seconds: float, tls: Any, streams: int | None, link_bps: float | None
) -> dict[str, Any]:
    from novacron.dwcp.negotiation import Capabilities
    from novacron.dwcp.transport import SessionOptions, connect_session

    options = SessionOptions(streams=streams, link_bps=link_bps)
    session = await connect_session(
        host, PORT, tls, capabilities=Capabilities(max_streams=32), options=options
    )
    channel = session.open_channel("bulk")
    data = bytes(PIECE)
    cpu0, end = cpu_now(), time.monotonic() + seconds
    sent = 0
    counts: list[int] = []
    while time.monotonic() < end:
        await channel.write(data)
        sent += PIECE
        counts.append(session.streams)
    channel.close()
    await channel.drain()
    cpu = cpu_now() - cpu0
    m = session.metrics()
    controller = session.monitor.controller
    history = [
        {
            "at": round(c.at - session.monitor.samples[0].at, 1) if session.monitor.samples else 0,
            "target": c.target,
            "reason": c.reason,
        }
        for c in (controller.history if controller is not None else [])
    ]
    await session.close("benchmark done")
    return {
        "sent": sent,
        "cpu_s": cpu,
        "streams_final": m.streams,
        "streams_min": min(counts) if counts else m.streams,
        "streams_max": max(counts) if counts else m.streams,
        "mode": m.mode.value,
        "mode_switches": m.mode_switches,
        "tcp_retransmits": m.tcp_retransmits,
        "tcp_segments": m.tcp_segments,
        "chunks_retransmitted": m.chunks_retransmitted,
        "chunks_reinjected": session.core.counters.chunks_reinjected,
        "controller": history,
    }


def worker(args: argparse.Namespace) -> None:
    pki_dir = Path(args.pki)
    host = args.host
    if args.role == "recv":
        if args.method in ("tcp", "tcp-cubic"):
            out = recv_tcp(host, args.warmup, None)
        elif args.method == "tls-sync":
            out = recv_tcp(host, args.warmup, tls_config(pki_dir, "b"))
        elif args.method == "tls":
            out = asyncio.run(recv_tls_async(host, args.warmup, tls_config(pki_dir, "b")))
        else:
            out = asyncio.run(recv_amst(host, args.warmup, tls_config(pki_dir, "b")))
    elif args.method in ("tcp", "tcp-cubic"):
        out = send_tcp(host, args.seconds, "cubic" if args.method == "tcp-cubic" else None, None)
    elif args.method == "tls-sync":
        out = send_tcp(host, args.seconds, None, tls_config(pki_dir, "a"))
    elif args.method == "tls":
        out = asyncio.run(send_tls_async(host, args.seconds, tls_config(pki_dir, "a")))
    else:
        out = asyncio.run(
            send_amst(host, args.seconds, tls_config(pki_dir, "a"), args.streams, args.link_bps)
        )
    print(json.dumps(out), flush=True)


# =========================================================================================== driver


def make_pki(directory: Path) -> None:
    from novacron.security import pki

    ca = pki.create_ca("bench")
    for name in ("a", "b"):
        (directory / name).mkdir()
        pki.write_credentials(pki.issue_node_cert(ca, f"bench-{name}", "agent"), directory / name)


def run_once(link: Link, method: str, pki_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from novacron.testing import LinkSpec, WanEmulator

    spec = LinkSpec.for_rtt(link.rtt_ms, rate_bps=link.rate_bps, loss=link.loss) if link.shaped else None
    backend = "tun" if link.shaped else "veth"
    seconds = args.seconds or link.seconds
    warmup = args.warmup if args.warmup is not None else link.warmup
    me = [sys.executable, os.path.abspath(__file__), "worker", "--pki", str(pki_dir), "--method", method]
    with heavy_lock(args.lock), WanEmulator(["a", "b"], link=spec, backend=backend) as wan:
        host = wan.address("b")
        recv = wan.popen(
            "b",
            [*me, "--role", "recv", "--host", host, "--warmup", str(warmup)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert recv.stdout is not None
        line = recv.stdout.readline().strip()
        if line != READY:
            recv.kill()
            raise RuntimeError(f"receiver did not start ({line!r})")
        send_argv = [*me, "--role", "send", "--host", host, "--seconds", str(seconds)]
        if args.streams:
            send_argv += ["--streams", str(args.streams)]
        if args.link_hint and link.rate_bps:
            send_argv += ["--link-bps", str(link.rate_bps)]
        before = wan.stats_blocking() if link.shaped else None
        send = wan.popen("a", send_argv, stdout=subprocess.PIPE, text=True)
        timeout = seconds + 120
        sent_out, _ = send.communicate(timeout=timeout)
        recv_out, _ = recv.communicate(timeout=timeout)
        after = wan.stats_blocking() if link.shaped else None
        if send.returncode or recv.returncode:
            raise RuntimeError(
                f"{method} on {link.name}: worker failed (send {send.returncode}, recv {recv.returncode})"
            )
    sender = json.loads(sent_out.strip().splitlines()[-1])
    receiver = json.loads(recv_out.strip().splitlines()[-1])
    gb = receiver["bytes"] / 1e9
    wire = None
    if before is not None and after is not None:
        # IP bytes the emulated link carried a -> b over the whole transfer (first to last byte).
        carried = after.link("a", "b").fwd_bytes - before.link("a", "b").fwd_bytes
        wire = carried * 8 / receiver["seconds"] if receiver.get("seconds") else None
    out = {
        "wire_bps": wire,
        "overall_bps": receiver["bytes"] * 8 / receiver["seconds"] if receiver.get("seconds") else None,
        "goodput_bps": receiver["goodput_bps"],
        "share": receiver["goodput_bps"] / link.rate_bps if link.rate_bps else None,
        "cpu_s_per_gb": (sender["cpu_s"] + receiver["cpu_s"]) / gb if gb > 0 else None,
        "bytes": receiver["bytes"],
        "measured_seconds": receiver.get("measured_seconds"),
    }
    if "max_held_bytes" in receiver:
        out["max_held_bytes"] = receiver["max_held_bytes"]
    for key in (
        "streams_final",
        "streams_min",
        "streams_max",
        "mode",
        "mode_switches",
        "controller",
        "tcp_retransmits",
        "tcp_segments",
        "chunks_retransmitted",
        "chunks_reinjected",
    ):
        if key in sender:
            out[key] = sender[key]
    return out


def median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    w = sub.add_parser("worker", help="(internal) one end of one run")
    w.add_argument("--role", choices=["send", "recv"], required=True)
    w.add_argument("--method", required=True)
    w.add_argument("--host", required=True)
    w.add_argument("--pki", required=True)
    w.add_argument("--seconds", type=float, default=10)
    w.add_argument("--warmup", type=float, default=2)
    w.add_argument("--streams", type=int)
    w.add_argument("--link-bps", type=float)
    parser.add_argument("--repeats", type=int, default=3, help="runs per link and method (medians are shown)")
    parser.add_argument("--only", help="run only links whose name contains this text")
    parser.add_argument("--methods", help="comma-separated subset of tcp,tcp-cubic,tls,tls-sync,amst")
    parser.add_argument("--seconds", type=float, help="transfer length (default per link)")
    parser.add_argument("--warmup", type=float, help="seconds excluded at the start (default per link)")
    parser.add_argument("--streams", type=int, help="pin AMST's stream count (default: the controller)")
    parser.add_argument("--link-hint", action="store_true", help="tell AMST the link rate (BDP start)")
    parser.add_argument("--lock", default=DEFAULT_LOCK, help="lock file taken around each run ('' for none)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.command == "worker":
        worker(args)
        return

    wanted = set(args.methods.split(",")) if args.methods else None
    results = []
    with tempfile.TemporaryDirectory(prefix="amst-bench-") as tmp:
        pki_dir = Path(tmp)
        make_pki(pki_dir)
        for link in LINKS:
            if args.only and args.only not in link.name:
                continue
            methods = SHAPED_METHODS if link.shaped else UNSHAPED_METHODS
            for method in methods:
                if wanted and method not in wanted:
                    continue
                runs = []
                for i in range(args.repeats):
                    runs.append(run_once(link, method, pki_dir, args))
                    print(
                        f"{link.name} {method} run {i + 1}: {runs[-1]['goodput_bps'] / 1e6:.1f} Mbit/s"
                        + (f", {runs[-1]['streams_final']} streams" if "streams_final" in runs[-1] else ""),
                        file=sys.stderr,
                    )
                row: dict[str, Any] = {"link": asdict(link), "method": method, "runs": runs}
                for key in (
                    "goodput_bps",
                    "share",
                    "cpu_s_per_gb",
                    "streams_final",
                    "streams_min",
                    "streams_max",
                ):
                    row[key] = median(runs, key)
                results.append(row)
    if args.json:
        print(json.dumps({"repeats": args.repeats, "results": results}, indent=2))
        return
    print_table(results, args)


def print_table(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(v: float | None, scale: float = 1, digits: int = 1, suffix: str = "") -> str:
        return "-" if v is None else f"{v / scale:.{digits}f}{suffix}"

    table = Table(
        title=f"AMST vs one stream (medians of {args.repeats}; goodput at the receiver after warm-up)"
    )
    for col in (
        "link",
        "method",
        "streams",
        "goodput Mbit/s",
        "of link rate",
        "vs tcp",
        "vs tls",
        "CPU s/GB",
    ):
        table.add_column(col, justify="left" if col in ("link", "method") else "right")
    by_link: dict[str, dict[str, dict[str, Any]]] = {}
    for row in results:
        by_link.setdefault(row["link"]["name"], {})[row["method"]] = row
    for link_name, rows in by_link.items():
        tcp = rows.get("tcp", {}).get("goodput_bps")
        tls = rows.get("tls", {}).get("goodput_bps")
        for method, row in rows.items():
            g = row["goodput_bps"]
            streams = "1"
            if method == "amst":
                low, high = fmt(row["streams_min"], digits=0), fmt(row["streams_max"], digits=0)
                streams = f"{fmt(row['streams_final'], digits=0)} ({low}-{high})"
            table.add_row(
                link_name,
                method,
                streams,
                fmt(g, 1e6),
                fmt(row["share"], 0.01, 1, "%"),
                fmt(g / tcp if tcp else None, digits=2, suffix="x"),
                fmt(g / tls if tls else None, digits=2, suffix="x"),
                fmt(row["cpu_s_per_gb"], digits=2),
            )
    Console(width=max(120, Console().width)).print(table)


if __name__ == "__main__":
    main()
