"""Agents in two network namespaces joined by the WAN emulator migrate a real guest in each mode.

After every migration: the guest's VERIFY reports 0 corrupted pages, the checksum of its static data
is unchanged, its heartbeat goes on, exactly one QEMU runs it, and both agents' records say done."""

from __future__ import annotations

import pytest

from novacron.testing import LinkSpec
from test_agent_support import (
    agent_cluster,
    boot_vm,
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
            assert m["phase"] == "done", (m.get("error"), m.get("events"))
            assert m["data_path"] == path and m["mode"] == options["mode"]
            assert m["downtime_ms"] is not None and 0 < m["downtime_ms"] < 1000
            p = m["progress"]
            assert p["bytes_raw"] > 0 and p["bytes_wire"] > 0
            dm = await wait_migration(dst, started["id"])
            assert dm["role"] == "destination" and dm["phase"] == "done" and dm["resumed"]
            assert await where_it_runs(cluster, "g1") == [dst.node]
            assert len(qemu_processes(cluster, "g1")) == 1
            corrupted, checksum_now, beats_now = await guest(dst, "g1")
            assert corrupted == 0 and checksum_now == checksum and beats_now >= beats
            beats = beats_now
        stats = await cluster.wan.stats()
        assert stats.link("hosta", "hostb").fwd_bytes > 0
