"""API latency at a fixed request rate (open loop), on the SQLite and the etcd store backends.

A server process (this script with ``--serve``) runs the real API on loopback TCP with its default
limits, on a fresh store holding ``--vms`` defined test VMs (not booted) and a few tokens. This
process sends requests on a fixed schedule (``--rate`` per second, whether or not earlier answers
came back) and measures each latency from the *scheduled* send time, so client-side queueing is
counted rather than hidden. Mix: 60 % GET /v1/vms/{name}, 20 % GET /v1/vms (``--mix light``: shows
instead), 10 % GET /v1/whoami, 10 % audited writes (POST /v1/tokens, DELETE /v1/tokens/{id},
alternately), over 8 viewer tokens and one admin token (each under the default per-token limit).
The first second is warm-up. The server's CPU time per request is read from /proc.

Prints a table (medians over ``--repeats`` runs, and etcd relative to SQLite); ``--json`` for data.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

READY = "READY "
VIEWER_TOKENS = 8
SERVER_START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 64


# ----- server side (a separate process, so the load generator does not share its event loop) -----


async def serve(backend: str, root: Path, vms: int) -> None:
    from novacron.api.app import build_services, create_app
    from novacron.api.server import Listen, running_api
    from novacron.hypervisor.qemu import QemuDriver
    from novacron.security.rbac import Role
    from novacron.store.base import KeyValueStore
    from novacron.store.sqlite import SqliteStore
    from novacron.vm.service import VMService

    async with contextlib.AsyncExitStack() as stack:
        store: KeyValueStore
        if backend == "etcd":
            from novacron.store.etcd import EtcdStore
            from novacron.testing.etcd import EtcdCluster

            cluster = await stack.enter_async_context(EtcdCluster(1, base_dir=root / "etcd"))
            store = EtcdStore(cluster.endpoints)
        else:
            store = SqliteStore(root / "store.db")
        stack.push_async_callback(store.close)
        services = build_services(store, QemuDriver(root / "vms"), backend=backend, node="bench")
        app = create_app(services)
        viewers = [
            (await services.tokens.create(f"viewer-{i}", Role.VIEWER, created_by="bench")).token
            for i in range(VIEWER_TOKENS)
        ]
        admin = (await services.tokens.bootstrap_admin("bench-admin")).token
        names = [f"bench-{i:03d}" for i in range(vms)]
        for name in names:
            await services.vms.create(VMService.spec_from_image(name, "test"), image_profile="test")
        async with running_api(app, Listen(tcp_host="127.0.0.1", tcp_port=0)) as bound:
            info = {"port": bound.tcp_port, "viewers": viewers, "admin": admin, "vms": names,
                    "pid": os.getpid()}  # fmt: skip
            sys.stdout.write(READY + json.dumps(info) + "\n")
            sys.stdout.flush()
            await asyncio.to_thread(sys.stdin.read)  # serve until the parent closes our stdin


# ----- load side -----


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


class HttpConnection:
    """A minimal HTTP/1.1 keep-alive client connection: the load generator must cost far less CPU
    than the server it measures (both share this machine), which httpx does not."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> HttpConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def request(self, method: str, path: str, token: str, body: bytes = b"") -> tuple[int, bytes]:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        status = int(status_line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def load(
    info: dict[str, Any], rate: float, duration_s: float, warmup_s: float, mix: str = "default"
) -> dict[str, Any]:
    latencies: list[float] = []
    by_kind: dict[str, list[float]] = {"read": [], "write": []}
    errors: dict[int, int] = {}
    created: deque[str] = deque()
    viewers, admin, vms = info["viewers"], info["admin"], info["vms"]
    total = int(rate * (duration_s + warmup_s))
    warm = int(rate * warmup_s)
    pool: asyncio.Queue[HttpConnection] = asyncio.Queue()
    for _ in range(MAX_CONNECTIONS):
        pool.put_nowait(await HttpConnection.open(info["port"]))

    async def one(i: int, scheduled: float) -> None:
        slot = i % 20
        kind, body = "read", b""
        if slot < 12:
            method, path = "GET", f"/v1/vms/{vms[i % len(vms)]}"
        elif slot < 16:
            # light: no inventory listing (its cost is VMService's, growing with the VM count)
            method, path = ("GET", "/v1/vms") if mix == "default" else ("GET", f"/v1/vms/{vms[0]}")
        elif slot < 18:
            method, path = "GET", "/v1/whoami"
        else:
            kind = "write"
            if slot == 18 or not created:
                method, path = "POST", "/v1/tokens"
                body = json.dumps({"name": f"b{i}", "role": "viewer"}).encode()
            else:
                method, path = "DELETE", f"/v1/tokens/{created.popleft()}"
        token = admin if kind == "write" else viewers[i % len(viewers)]
        conn = await pool.get()
        try:
            status, data = await asyncio.wait_for(conn.request(method, path, token, body), REQUEST_TIMEOUT_S)
            pool.put_nowait(conn)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError):
            status = 0
            conn.close()
            pool.put_nowait(await HttpConnection.open(info["port"]))
        if status == 201:
            created.append(json.loads(data)["record"]["id"])
        elapsed = time.perf_counter() - scheduled
        if i >= warm:
            latencies.append(elapsed)
            by_kind[kind].append(elapsed)
            if status >= 400 or status == 0:
                errors[status] = errors.get(status, 0) + 1

    cpu0 = server_cpu_s(info["pid"])
    tasks = []
    t0 = time.perf_counter() + 0.05
    for i in range(total):
        scheduled = t0 + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the open-loop schedule, not waiting for an event
        if i == warm:
            cpu0 = server_cpu_s(info["pid"])
        tasks.append(asyncio.create_task(one(i, scheduled)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - (t0 + warm / rate)
    cpu = server_cpu_s(info["pid"]) - cpu0
    while not pool.empty():
        pool.get_nowait().close()
    ms = [x * 1000 for x in latencies]
    return {
        "requests": len(latencies),
        "achieved_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(percentile(ms, 0.50), 2),
        "p90_ms": round(percentile(ms, 0.90), 2),
        "p99_ms": round(percentile(ms, 0.99), 2),
        "max_ms": round(max(ms), 2),
        "read_p99_ms": round(percentile([x * 1000 for x in by_kind["read"]], 0.99), 2),
        "write_p50_ms": round(percentile([x * 1000 for x in by_kind["write"]], 0.50), 2),
        "write_p99_ms": round(percentile([x * 1000 for x in by_kind["write"]], 0.99), 2),
        "server_cpu_ms_per_request": round(cpu * 1000 / max(1, len(latencies)), 2),
        "errors": errors,
    }


def server_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the server process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(backend: str, root: Path, vms: int) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", backend, "--root", str(root), "--vms", str(vms)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # blocks until the server speaks: its READY line is the event
        if not line:
            raise RuntimeError(f"{backend} server exited before READY (code {proc.wait()})")
        if line.startswith(READY):
            return proc, json.loads(line[len(READY) :])
    proc.kill()
    raise RuntimeError(f"{backend} server not ready in {SERVER_START_TIMEOUT_S} s")


def stop_server(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def etcd_available() -> str | None:
    """None if the etcd backend and binary are here, else why not."""
    try:
        from novacron.store.etcd import EtcdStore  # noqa: F401
        from novacron.testing.etcd import ETCD_BINARY
    except ImportError as exc:
        return f"etcd backend not importable: {exc}"
    if not Path(ETCD_BINARY).exists():
        return f"{ETCD_BINARY} missing (Debian package etcd-server)"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=200.0, help="requests per second (default 200)")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vms", type=int, default=20, help="defined VMs in the inventory")
    ap.add_argument("--backend", choices=["sqlite", "etcd", "all"], default="all")
    ap.add_argument("--mix", choices=["default", "light"], default="default",
                    help="light: GET /v1/vms/{name} instead of listing all VMs")  # fmt: skip
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--serve", choices=["sqlite", "etcd"], help=argparse.SUPPRESS)
    ap.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.serve:
        asyncio.run(serve(args.serve, args.root, args.vms))
        return

    backends = ["sqlite", "etcd"] if args.backend == "all" else [args.backend]
    results: dict[str, Any] = {}
    for backend in backends:
        if backend == "etcd" and (why := etcd_available()) is not None:
            results[backend] = {"skipped": why}
            continue
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="novacron-bench-api-") as tmp:
                proc, info = start_server(backend, Path(tmp), args.vms)
                try:
                    runs.append(asyncio.run(load(info, args.rate, args.duration, args.warmup, args.mix)))
                finally:
                    stop_server(proc)
        summary = {
            key: statistics.median(r[key] for r in runs)
            for key in (
                "achieved_per_s",
                "p50_ms",
                "p90_ms",
                "p99_ms",
                "max_ms",
                "read_p99_ms",
                "write_p50_ms",
                "write_p99_ms",
                "server_cpu_ms_per_request",
            )
        }
        summary["errors"] = sum(sum(r["errors"].values()) for r in runs)
        results[backend] = {"median": summary, "runs": runs}
    report = {
        "rate_per_s": args.rate,
        "duration_s": args.duration,
        "repeats": args.repeats,
        "vms": args.vms,
        "mix": args.mix,
        "results": results,
    }
    if "median" in results.get("sqlite", {}) and "median" in results.get("etcd", {}):
        s, e = results["sqlite"]["median"], results["etcd"]["median"]
        report["etcd_vs_sqlite"] = {k: round(e[k] / s[k], 2) for k in ("p50_ms", "p99_ms") if s[k] > 0}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"API latency at {args.rate:.0f} req/s ({args.duration:.0f} s x {args.repeats}, median)"
    )
    for col in (
        "backend",
        "achieved/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "write p50",
        "write p99",
        "cpu ms/req",
        "errors",
    ):
        table.add_column(col)
    for backend, res in results.items():
        if "skipped" in res:
            table.add_row(backend, res["skipped"], *[""] * 9)
            continue
        m = res["median"]
        keys = ("achieved_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms", "write_p50_ms", "write_p99_ms",
                "server_cpu_ms_per_request", "errors")  # fmt: skip
        table.add_row(backend, *(str(m[k]) for k in keys))
    console = Console()
    console.print(table)
    if "etcd_vs_sqlite" in report:
        console.print(f"etcd / sqlite: {report['etcd_vs_sqlite']}")


if __name__ == "__main__":
    main()
