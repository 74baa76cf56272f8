"""Real agent processes (``novacron agent run``) in the WAN emulator's namespaces.

Each agent gets its own state directory, a node certificate from one CA made for the cluster, the
shared cluster key and a config naming the other agents as static peers. Callers (tests, the
migration benchmark, the demo) drive the agents only through their APIs (unix sockets, reachable from
the caller's namespace) and signals, as an operator would.

    async with agent_cluster(LinkSpec.for_rtt(50, rate_bps=100e6)) as cluster:
        await boot_vm(cluster["hosta"], "g1", profile="default")
        started = await migrate(cluster["hosta"], "g1", "hostb")
        record = await wait_migration(cluster["hosta"], started["id"])

Leaving the block stops the agents (SIGTERM) and tears the emulator down, which kills whatever still
runs in its namespaces (the QEMU processes, which are not the agents' children).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from novacron.agent.config import AgentConfig, parse_config, render_config
from novacron.agent.daemon import write_cluster_key
from novacron.api.client import ApiClient
from novacron.errors import NovacronError
from novacron.security.pki import create_ca, issue_node_cert, write_credentials
from novacron.testing.emulator import Backend, WanEmulator
from novacron.testing.link import LinkSpec

AGENT_READY_S = 120.0  # an agent's start until ``agent.ready`` (loaded hosts are slow)
AGENT_STOP_S = 90.0  # SIGTERM gives live migrations up to 30 s; then the store closes
API_TIMEOUT_S = 120.0  # one API request (booting a guest with wait=true takes ~15 s under TCG)
DWCP_PORT = 7400
MAX_LOG_LINES = 20_000  # an agent's log lines kept in memory (the oldest are dropped)
POLL_S = 0.2  # how often a migration record is asked for while waiting for a phase
FINAL = ("done", "failed", "cancelled")
NOVACRON = str(Path(sys.executable).with_name("novacron"))


class AgentClusterError(NovacronError):
    """An agent of the cluster could not start, or a migration did not reach the expected phase."""


@dataclass
class AgentProc:
    node: str
    config: AgentConfig
    config_path: Path
    proc: asyncio.subprocess.Process | None = None
    lines: list[dict[str, Any]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    @property
    def state(self) -> Path:
        return self.config.state_dir

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def client(self) -> ApiClient:
        return ApiClient(f"unix://{self.config.api_socket}", timeout_s=API_TIMEOUT_S)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    async def api(self, method: str, path: str, body: Any = None) -> Any:
        async with self.client() as c:
            return await c.request(method, path, json=body)


async def _read(agent: AgentProc, ready: asyncio.Event) -> None:
    if agent.proc is None or agent.proc.stderr is None:
        return
    while line := await agent.proc.stderr.readline():
        try:
            record = json.loads(line)
        except ValueError:
            record = {"event": "raw", "text": line.decode(errors="replace").rstrip()}
        if not isinstance(record, dict):
            record = {"event": "raw", "text": str(record)}
        agent.lines.append(record)
        if len(agent.lines) > MAX_LOG_LINES:
            del agent.lines[: len(agent.lines) - MAX_LOG_LINES]
        if record.get("event") == "agent.ready":
            ready.set()


async def start_agent(wan: WanEmulator, agent: AgentProc) -> AgentProc:
    """Start (or restart) the agent in its node's namespace and wait for ``agent.ready``."""
    agent.proc = await wan.create_subprocess_exec(
        agent.node, NOVACRON, "agent", "run", "--config", str(agent.config_path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    ready = asyncio.Event()
    agent.reader = asyncio.create_task(_read(agent, ready))
    waiter = asyncio.ensure_future(ready.wait())
    ended = asyncio.ensure_future(agent.proc.wait())
    await asyncio.wait({waiter, ended}, timeout=AGENT_READY_S, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    ended.cancel()
    if not ready.is_set():
        tail = "\n".join(json.dumps(x) for x in agent.lines[-20:])
        raise AgentClusterError(
            f"agent {agent.node} did not become ready:\n{tail}",
            node=agent.node,
            returncode=agent.proc.returncode,
            timeout_s=AGENT_READY_S,
        )
    return agent


async def stop_agent(agent: AgentProc, *, kill: bool = False) -> int | None:
    proc = agent.proc
    if proc is None or proc.returncode is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    rc = await asyncio.wait_for(proc.wait(), AGENT_STOP_S)
    if agent.reader is not None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(agent.reader, 10)
    return rc


@dataclass
class Cluster:
    wan: WanEmulator
    agents: dict[str, AgentProc]
    root: Path

    def __getitem__(self, node: str) -> AgentProc:
        return self.agents[node]


@contextlib.asynccontextmanager
async def agent_cluster(
    link: LinkSpec | None,
    *,
    nodes: tuple[str, ...] = ("hosta", "hostb"),
    migration: dict[str, dict[str, Any]] | None = None,
    testing: dict[str, dict[str, Any]] | None = None,
    backend: str = "tun",
    log_level: str = "info",  # or "debug"
) -> AsyncIterator[Cluster]:
    """Agents on ``nodes``, one namespace each, joined by the emulator with ``link`` in every direction.

    ``migration`` and ``testing`` are per-node ``[migration]`` / ``[testing]`` config sections;
    ``log_level`` must keep ``info`` events (``agent.ready`` is how a start is noticed)."""
    root = Path(tempfile.mkdtemp(prefix="nva", dir="/tmp"))  # short: unix socket paths live below it
    ca = create_ca("testdc")
    key = write_cluster_key(root / "cluster.key")
    wan = WanEmulator(list(nodes), link=link, backend=Backend(backend))
    try:
        async with wan:
            agents: dict[str, AgentProc] = {}
            for node in nodes:
                state = root / node
                write_credentials(issue_node_cert(ca, node, "agent"), state / "pki")
                node_key = state / "pki" / "cluster.key"
                shutil.copyfile(key, node_key)
                os.chmod(node_key, 0o600)
                cfg = parse_config(
                    {
                        "node_id": node,
                        "state_dir": str(state),
                        "listen": {"dwcp": f"{wan.address(node)}:{DWCP_PORT}"},
                        "peers": {p: f"{wan.address(p)}:{DWCP_PORT}" for p in nodes if p != node},
                        "migration": (migration or {}).get(node, {}),
                        "testing": (testing or {}).get(node, {}),
                        "log_level": log_level,
                    }
                )
                path = state / "agent.toml"
                path.write_text(render_config(cfg))
                agents[node] = AgentProc(node, cfg, path)
            try:
                await asyncio.gather(*(start_agent(wan, a) for a in agents.values()))
                yield Cluster(wan, agents, root)
            finally:
                await asyncio.gather(*(stop_agent(a) for a in agents.values()), return_exceptions=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def boot_vm(agent: AgentProc, name: str, *, profile: str = "test", **workload: int) -> dict[str, Any]:
    """Create and start a test guest on ``agent`` and wait for its READY line."""
    body: dict[str, Any] = {"name": name, "profile": profile, "accel": "tcg", "start": True, "wait": True}
    if workload:
        body["workload"] = workload
    result: dict[str, Any] = await agent.api("POST", "/v1/vms", body)
    return result


async def guest(agent: AgentProc, name: str) -> tuple[int, str, int]:
    """(corrupted pages, static-data checksum, heartbeats) from the guest, through the agent's API."""
    verify = await agent.api("GET", f"/v1/vms/{name}/guest/verify")
    checksum = await agent.api("GET", f"/v1/vms/{name}/guest/checksum")
    status = await agent.api("GET", f"/v1/vms/{name}/guest/status")
    return int(verify["corrupted"]), str(checksum["checksum"]), int(status["heartbeats"])


async def migrate(agent: AgentProc, vm: str, to: str, **options: Any) -> dict[str, Any]:
    started: dict[str, Any] = await agent.api("POST", "/v1/migrations", {"vm": vm, "to": to, **options})
    return started


async def wait_migration(
    agent: AgentProc, migration_id: str, timeout_s: float = 180, phases: tuple[str, ...] = FINAL
) -> dict[str, Any]:
    """The migration's record once it reached one of ``phases`` (polls the agent's API, as the CLI does)."""
    return await wait_record(
        agent, migration_id, lambda m: str(m.get("phase")) in phases, f"phase in {list(phases)}", timeout_s
    )


async def wait_record(
    agent: AgentProc,
    migration_id: str,
    until: Callable[[dict[str, Any]], bool],
    what: str,
    timeout_s: float = 180,
) -> dict[str, Any]:
    """The migration's record once ``until(record)`` holds (``what`` names it in the error)."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                m: dict[str, Any] = await agent.api("GET", f"/v1/migrations/{migration_id}")
                if until(m):
                    return m
                await asyncio.sleep(POLL_S)
    except TimeoutError:
        raise AgentClusterError(
            "migration did not reach the expected state in time",
            node=agent.node,
            migration=migration_id,
            expected=what,
            timeout_s=timeout_s,
        ) from None


async def where_it_runs(cluster: Cluster, vm: str) -> list[str]:
    """Nodes whose agent reports the VM running (asks every agent that is up)."""
    found = []
    for node, agent in cluster.agents.items():
        if not agent.running:
            continue
        vms = await agent.api("GET", "/v1/vms")
        if any(v["name"] == vm and v["state"] == "running" and v["node"] == node for v in vms):
            found.append(node)
    return found


def qemu_processes(cluster: Cluster, vm: str) -> list[int]:
    """Live QEMU processes of ``vm`` on any node (from /proc: whatever the agents believe)."""
    pids = []
    marker = f"{vm},debug-threads=on".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            cmd
            and cmd[0].endswith(b"qemu-system-x86_64")
            and any(str(cluster.root).encode() in c for c in cmd)
            and marker in cmd
        ):
            pids.append(int(entry.name))
    return pids
