"""The 3-host cluster: ``cluster init`` on one host, two ``cluster join``s, 20 VMs placed by the
control node, one host drained by live migration; afterwards every VM runs exactly once (one QEMU),
on another host, with its memory intact (VERIFY finds no corrupted page, CHECKSUM of the static
data unchanged), and the drained host runs none.

Three network namespaces joined by the WAN emulator (unshaped links: a datacenter); real agents, real
QEMU (TCG), real mTLS. The guests use the ``tiny`` image profile (96 MiB, a 4 MiB corpus, 2 MiB
working set, 20 dirty pages/s; same workload and integrity checks as ``test``): 20 TCG guests of
the 192 MiB ``test`` profile, whose 23 MiB initramfs every boot unpacks, took 220 s just to boot on
two shared cores next to three agents.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from novacron.agent.config import load_config
from novacron.api.client import ApiClient
from novacron.image.builder import build_image
from novacron.testing.agents import (
    NOVACRON,
    AgentProc,
    Cluster,
    guest,
    qemu_processes,
    start_agent,
    stop_agent,
)
from novacron.testing.emulator import Backend, WanEmulator

pytestmark = [pytest.mark.netns, pytest.mark.qemu, pytest.mark.slow, pytest.mark.long]

NODES = ("hosta", "hostb", "hostc")
VM_COUNT = 20
CREATE_PARALLEL = 4  # guests booting at once (TCG on two cores)
PROFILE = "tiny"  # the test image with a 4 MiB corpus, 96 MiB of RAM (src/novacron/image/profiles.py)
READY_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 600.0


async def cli(
    wan: WanEmulator, node: str, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    proc = await wan.create_subprocess_exec(
        node, "env", *[f"{k}={v}" for k, v in (env or {}).items()], NOVACRON, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
    return proc.returncode or 0, out.decode(), err.decode()


async def wait_ready_nodes(control: AgentProc, count: int) -> list[dict[str, Any]]:
    async with asyncio.timeout(READY_TIMEOUT_S):
        while True:
            nodes: list[dict[str, Any]] = await control.api("GET", "/v1/nodes")
            if sum(1 for n in nodes if n["health"] == "ready") >= count:
                return nodes
            await asyncio.sleep(0.5)  # heartbeats arrive every 2 s; the registry is read again


@asynccontextmanager
async def joined_cluster() -> AsyncIterator[tuple[Cluster, str]]:
    root = Path(tempfile.mkdtemp(prefix="nvk", dir="/tmp"))  # short: unix socket paths live below it
    wan = WanEmulator(list(NODES), backend=Backend.VETH)  # unshaped links: the kernel forwards
    agents: dict[str, AgentProc] = {}
    try:
        async with wan:
            size = ["--vcpus", "16", "--memory-mib", "4096"]
            init = ["cluster", "init", "--json", "--node", "hosta", "--cluster", "c3", "--advertise",
                    wan.address("hosta"), "--state-dir", str(root / "hosta"), *size]  # fmt: skip
            rc, out, err = await cli(wan, "hosta", *init)
            assert rc == 0, err
            admin = json.loads(out)["admin_token"]
            try:
                control = await start_agent(wan, _agent("hosta", root))
                agents["hosta"] = control
                for node in NODES[1:]:
                    issued = await control.api("POST", "/v1/cluster/tokens", {"ttl_s": 900})
                    join = join_args(wan, node, issued["token"], root / node)
                    rc, out, err = await cli(wan, node, *join, *size)
                    assert rc == 0, err
                    assert "hosta" in json.loads(out)["peers"]
                    agents[node] = await start_agent(wan, _agent(node, root))
                await wait_ready_nodes(control, len(NODES))
                yield Cluster(wan, agents, root), admin
            finally:
                await asyncio.gather(*(stop_agent(a) for a in agents.values()), return_exceptions=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def join_args(
    wan: WanEmulator, node: str, token: str, state: Path, *, node_id: str | None = None
) -> list[str]:
    server = f"https://{wan.address('hosta')}:7480"
    return ["cluster", "join", "--json", "--node", node_id or node, "--token", token, "--server", server,
            "--advertise", wan.address(node), "--state-dir", str(state)]  # fmt: skip


def _agent(node: str, root: Path) -> AgentProc:
    path = root / node / "agent.toml"
    return AgentProc(node, load_config(path), path)


@pytest.mark.timeout(900)
async def test_three_hosts_join_place_twenty_vms_and_drain_one() -> None:
    await asyncio.to_thread(build_image, PROFILE)  # cached after the first build (~10 s)
    async with joined_cluster() as (cluster, admin):
        control = cluster["hosta"]
        # A reused bootstrap token is refused (and audited on the control node).
        issued = await control.api("POST", "/v1/cluster/tokens", {"ttl_s": 900})
        join = join_args(cluster.wan, "hostb", issued["token"], cluster.root / "x1", node_id="extra")
        rc, _, err = await cli(cluster.wan, "hostb", *join)
        assert rc == 0, err
        join = join_args(cluster.wan, "hostc", issued["token"], cluster.root / "x2", node_id="extra2")
        rc, _, err = await cli(cluster.wan, "hostc", *join)
        assert rc == 2 and "already used" in err + _, err
        await control.api("DELETE", "/v1/nodes/extra")

        # 20 VMs, placed by the control node (no node named), created on the chosen nodes' agents.
        placed: dict[str, str] = {}
        gate = asyncio.Semaphore(CREATE_PARALLEL)

        async def create(i: int) -> None:
            name = f"vm{i:02d}"
            async with gate:
                body = {"name": name, "profile": PROFILE, "accel": "tcg", "start": True, "wait": True}
                out = await control.api("POST", "/v1/vms", body)
            placed[name] = out["node"]

        t0 = time.monotonic()
        await asyncio.gather(*(create(i) for i in range(VM_COUNT)))
        print(f"20 VMs placed and booted in {time.monotonic() - t0:.1f} s")
        per_node = {n: sorted(v for v, h in placed.items() if h == n) for n in NODES}
        assert all(per_node[n] for n in NODES), per_node  # the placer spreads them
        t0 = time.monotonic()
        # The static data's checksum before the drain (VERIFY comes after it, on every guest).
        sums = await asyncio.gather(*(checksum(cluster[node], vm) for vm, node in placed.items()))
        before = dict(zip(placed, sums, strict=True))
        print(f"20 checksums in {time.monotonic() - t0:.1f} s")

        drained = "hostb"
        env = {"NOVACRON_SERVER": f"unix://{control.config.api_socket}"}
        drain = ["node", "drain", drained, "--parallel", "3", "--mode", "datacenter", "--json"]
        t0 = time.monotonic()
        rc, out, err = await cli(cluster.wan, "hosta", *drain, env=env)
        print(f"drain of {drained} in {time.monotonic() - t0:.1f} s")
        report = json.loads(out)
        assert rc == 0, json.dumps(report, indent=1) + err
        assert report["state"] == "done" and report["done"] == len(per_node[drained])
        moved = {m["vm"]: m["dst"] for m in report["moves"]}
        assert sorted(moved) == per_node[drained]

        assert report["parallel_effective"] == 2  # the agents' default limit of outgoing migrations
        where = {vm: moved.get(vm, node) for vm, node in placed.items()}
        assert drained not in where.values()
        for vm in where:
            assert len(qemu_processes(cluster, vm)) == 1, vm
        t0 = time.monotonic()
        after = await asyncio.gather(*(guest(cluster[node], vm) for vm, node in where.items()))
        assert {vm: c[0] for vm, c in zip(where, after, strict=True)} == dict.fromkeys(where, 0)
        assert {vm: c[1] for vm, c in zip(where, after, strict=True)} == before
        print(f"20 guests verified again in {time.monotonic() - t0:.1f} s")
        left = [v for v in await cluster[drained].api("GET", "/v1/vms") if v["state"] != "defined"]
        assert left == []
        assert not any(
            str(cluster.root / drained).encode() in _cmdline(pid)
            for vm in placed
            for pid in qemu_processes(cluster, vm)
        )
        nodes = {n["node"]: n for n in await control.api("GET", "/v1/nodes")}
        assert nodes[drained]["health"] == "maintenance"
        # The source's /metrics counted what ran: migrations by mode and outcome, bytes, ratio, API
        # latency by route, store latency.
        scraped = _metrics(await cluster[drained].api("GET", "/metrics"))
        moves = len(per_node[drained])
        assert _total(scraped, "novacron_migrations_total", outcome="completed") >= moves
        assert _total(scraped, "novacron_migration_duration_seconds_count", outcome="completed") >= moves
        assert _total(scraped, "novacron_migration_compression_ratio_count") >= moves
        assert _total(scraped, "novacron_migration_bytes_raw_total") > 0
        assert _total(scraped, "novacron_migration_bytes_wire_total") > 0
        assert _total(scraped, "novacron_api_request_duration_seconds_count", route="/v1/migrations") >= moves
        assert _total(scraped, "novacron_store_operation_duration_seconds_count") > 0
        assert _total(scraped, "novacron_cluster_heartbeats_total", result="ok") > 0
        on_control = _metrics(await control.api("GET", "/metrics"))
        assert _total(on_control, "novacron_cluster_drain_moves_total", result="done") == moves
        assert _total(on_control, "novacron_api_request_duration_seconds_count", route="/v1/vms") >= VM_COUNT
        async with ApiClient(f"unix://{control.config.api_socket}", token=admin) as c:
            entries = (await c.request("GET", "/v1/audit", params={"limit": 500}))["entries"]
        joins = [e["record"] for e in entries if e["record"]["action"] == "cluster.join"]
        assert any(j["result"] == "denied" and "JoinTokenUsed" in (j["error"] or "") for j in joins)


async def checksum(agent: AgentProc, vm: str) -> str:
    return str((await agent.api("GET", f"/v1/vms/{vm}/guest/checksum"))["checksum"])


def _metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(text) for s in f.samples
    ]


def _total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
