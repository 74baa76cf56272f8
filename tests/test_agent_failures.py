"""Failures of migrations between real agents over the WAN emulator. Each must end with the VM running
exactly once, its memory intact (VERIFY, CHECKSUM), and records on both agents that say what happened."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from novacron.testing import LinkSpec
from test_agent_support import (
    AgentProc,
    Cluster,
    agent_cluster,
    boot_vm,
    expect_done,
    guest,
    migrate,
    qemu_processes,
    start_agent,
    stop_agent,
    wait_migration,
    wait_record,
    where_it_runs,
)

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.timeout(600)]

WAN = LinkSpec.for_rtt(50, rate_bps=100e6)  # the internet link


async def intact_on(cluster: Cluster, vm: str, node: str, checksum: str) -> None:
    assert await where_it_runs(cluster, vm) == [node]
    assert len(qemu_processes(cluster, vm)) == 1
    corrupted, now, _ = await guest(cluster[node], vm)
    assert corrupted == 0 and now == checksum


def qemu_sending(m: dict[str, Any]) -> bool:
    """The source QEMU is past its setup stage. Tests that kill an agent and then migrate the VM
    again wait for this: a peer lost during QEMU 7.2's multifd setup can leave the source QEMU unable
    to migrate again (the source then refuses, saying why: test_qemu_stuck.py)."""
    progress = m.get("progress") or {}
    return progress.get("qemu_status") == "active" and int(progress.get("bytes_raw", 0)) > 0


async def record(agent: AgentProc, migration_id: str, role: str) -> dict[str, Any]:
    rows = await agent.api("GET", "/v1/migrations")
    found = [r for r in rows if r["id"] == migration_id and r["role"] == role]
    assert found, f"{agent.node} has no {role} record of {migration_id}"
    return found[0]


async def settled(agent: AgentProc, migration_id: str, role: str, timeout_s: float = 120) -> dict[str, Any]:
    async with asyncio.timeout(timeout_s):
        while True:
            rec = await record(agent, migration_id, role)
            if rec["phase"] in ("done", "failed", "cancelled"):
                return rec
            await asyncio.sleep(0.2)  # polling the agent's API


async def test_link_cut_mid_precopy() -> None:
    async with agent_cluster(WAN, testing={"hosta": {}}) as cluster:
        a, b = cluster["hosta"], cluster["hostb"]
        await boot_vm(a, "g1", dirty_rate=2000)
        _, checksum, _ = await guest(a, "g1")

        started = await migrate(a, "g1", "hostb", mode="internet")
        await wait_migration(a, started["id"], phases=("precopy", "converge"))
        await cluster.wan.set_link("hosta", "hostb", up=False)
        m = await wait_migration(a, started["id"])
        await cluster.wan.set_link("hosta", "hostb", up=True)
        assert m["phase"] == "failed" and m["error"]["kind"] in ("PeerLost", "MigrationError"), m["error"]
        dest = await settled(b, started["id"], "destination")
        assert dest["phase"] == "failed" and not dest["resumed"]
        await intact_on(cluster, "g1", "hosta", checksum)


async def test_corrupted_hde_batch_rolls_back() -> None:
    async with agent_cluster(WAN, testing={"hosta": {"corrupt_hde_batch": 3}}) as cluster:
        a, b = cluster["hosta"], cluster["hostb"]
        await boot_vm(a, "g2")
        _, checksum, _ = await guest(a, "g2")
        started = await migrate(a, "g2", "hostb", mode="internet")
        m = await wait_migration(a, started["id"])
        assert m["phase"] == "failed" and m["data_path"] == "tunnel"
        dest = await settled(b, started["id"], "destination")
        assert dest["phase"] == "failed" and not dest["resumed"]
        text = str(m["error"]) + str(dest["error"])
        assert "corrupt" in text.lower() or "checksum" in text.lower(), text
        await intact_on(cluster, "g2", "hosta", checksum)


async def test_destination_agent_killed_then_restarted() -> None:
    async with agent_cluster(WAN) as cluster:
        a, b = cluster["hosta"], cluster["hostb"]
        await boot_vm(a, "g3", dirty_rate=2000)
        _, checksum, _ = await guest(a, "g3")
        started = await migrate(a, "g3", "hostb", mode="internet")
        await wait_record(a, started["id"], qemu_sending, "QEMU active and sending")
        await stop_agent(b, kill=True)
        m = await wait_migration(a, started["id"])
        assert m["phase"] == "failed" and m["error"] is not None
        await start_agent(cluster.wan, b)  # recovery settles its half
        dest = await settled(b, started["id"], "destination")
        assert dest["phase"] == "failed" and not dest["resumed"]
        await intact_on(cluster, "g3", "hosta", checksum)
        # Nothing is left half-done: the same VM migrates now.
        again = await migrate(a, "g3", "hostb", mode="internet")
        m = await wait_migration(a, again["id"])
        await expect_done(m, b)
        await intact_on(cluster, "g3", "hostb", checksum)


async def test_source_agent_killed_then_restarted() -> None:
    async with agent_cluster(WAN) as cluster:
        a, b = cluster["hosta"], cluster["hostb"]
        await boot_vm(a, "g4", dirty_rate=2000)
        _, checksum, _ = await guest(a, "g4")
        started = await migrate(a, "g4", "hostb", mode="internet")
        await wait_record(a, started["id"], qemu_sending, "QEMU active and sending")
        await stop_agent(a, kill=True)
        dest = await settled(b, started["id"], "destination")
        assert dest["phase"] == "failed" and not dest["resumed"]
        await start_agent(cluster.wan, a)  # recovery settles the source half
        src = await settled(a, started["id"], "source")
        assert src["phase"] == "failed" and any("settled" in e for e in src["events"]), src
        await intact_on(cluster, "g4", "hosta", checksum)
        again = await migrate(a, "g4", "hostb", mode="internet")
        m = await wait_migration(a, again["id"])
        await expect_done(m, b)
        await intact_on(cluster, "g4", "hostb", checksum)
