"""Agents in two network namespaces joined by the WAN emulator migrate a real guest in each mode.

After every migration: the guest's VERIFY reports 0 corrupted pages, the checksum of its static data
is unchanged, its heartbeat goes on, exactly one QEMU runs it, and both agents' records say done."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from novacron.testing import LinkSpec
from test_agent_support import (
    NOVACRON,
    agent_cluster,
    boot_vm,
    expect_done,
    guest,
    migrate,
    qemu_processes,
    wait_migration,
    where_it_runs,
)

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.timeout(600)]


async def test_migrations_in_every_mode_over_an_emulated_link() -> None:
    link = LinkSpec.for_rtt(20, rate_bps=200e6)
    async with agent_cluster(link) as cluster:
        a, b = cluster["hosta"], cluster["hostb"]
        node = await a.api("GET", "/v1/node")
        assert node["node"] == "hosta" and "tunnel" in node["data_paths"]
        await boot_vm(a, "g1")
        corrupted, checksum, beats = await guest(a, "g1")
        assert corrupted == 0

        hops = [
            (a, b, {"mode": "internet"}, "tunnel"),
            (b, a, {"mode": "datacenter"}, "direct"),
            (a, b, {"mode": "hybrid", "data_path": "passthrough"}, "passthrough"),
        ]
        for src, dst, options, path in hops:
            started = await migrate(src, "g1", dst.node, **options)
            m = await wait_migration(src, started["id"])
            await expect_done(m, dst)
            assert m["data_path"] == path and m["mode"] == options["mode"]
            assert m["downtime_ms"] is not None and 0 < m["downtime_ms"] < 1000
            p = m["progress"]
            assert p["bytes_raw"] > 0 and p["bytes_wire"] > 0
            dm = await wait_migration(dst, started["id"])
            assert dm["role"] == "destination" and dm["phase"] == "done" and dm["resumed"]
            assert await where_it_runs(cluster, "g1") == [dst.node]
            assert len(qemu_processes(cluster, "g1")) == 1
            corrupted, checksum_now, beats_now = await guest(dst, "g1")
            assert (corrupted, checksum_now) == (0, checksum) and beats_now >= beats, (path, m.get("events"))
            beats = beats_now
        stats = await cluster.wan.stats()
        assert stats.link("hosta", "hostb").fwd_bytes > 0

        # The operator's way: `novacron migrate` against hostb's agent, live display, then the report.
        env = {**os.environ, "NOVACRON_SERVER": f"unix://{b.config.api_socket}", "COLUMNS": "160"}
        proc = await asyncio.create_subprocess_exec(
            NOVACRON, "migrate", "g1", "--to", "hosta", "--max-downtime", "400", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 180)
        text = out.decode()
        assert proc.returncode == 0, (text[-2000:], err.decode()[-2000:])
        assert "result: done" in text and "downtime" in text and "limit 400 ms" in text
        assert await where_it_runs(cluster, "g1") == ["hosta"]
        proc = await asyncio.create_subprocess_exec(
            NOVACRON, "migration", "list", "--json", env=env, stdout=asyncio.subprocess.PIPE
        )
        listed = json.loads((await proc.communicate())[0])
        assert [(m["role"], m["phase"]) for m in listed[:2]] == [("source", "done"), ("destination", "done")]
