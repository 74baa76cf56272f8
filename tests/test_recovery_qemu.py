"""Settling migrations nobody drives any more, with real TCG guests (both hosts in this process):
the link dies right after the source QEMU completed (in-doubt on both sides), and a source run that
vanishes mid-precopy (as a crashed agent's would) is settled by the host's recovery."""

from __future__ import annotations

import asyncio

import pytest

from novacron.dwcp.mode import Mode
from novacron.migration.context import MigrationRequest
from novacron.migration.phases import Phase
from test_migration_support import SimHost
from test_orchestrator_qemu import assert_runs_once_intact, boot, guest_facts

pytestmark = pytest.mark.qemu


async def test_link_lost_after_completion_settles_to_commit(hosts: tuple[SimHost, SimHost]) -> None:
    a, b = hosts
    await boot(a, "g1")
    _, checksum, _ = await guest_facts(a, "g1")
    # The destination gets COMPLETED and resumes the VM; its RESUMED never arrives.
    a.link.cut_after = "completed"
    run = await a.service.migrate(MigrationRequest("g1", "hostb", mode=Mode.DATACENTER))
    record = await asyncio.wait_for(run.wait(), 120)

    assert record.phase is Phase.DONE and record.outcome == "done", (record.error, record.events)
    assert Phase.IN_DOUBT in [h.phase for h in record.history]
    assert any("destination runs the VM; committed" in e for e in record.events), record.events
    dest = await asyncio.wait_for(b.service.wait(run.id), 60)
    history = [h.phase for h in dest.history]
    assert dest.phase is Phase.DONE and dest.resumed, (dest.error, dest.events, history)
    await assert_runs_once_intact(a, b, "g1", "hostb", checksum)
    assert (await b.host.ownership.require("g1")).node == "hostb"
    assert (await a.host.ownership.require("g1")).node == "hostb"


async def test_a_vanished_source_run_is_settled_by_recovery(hosts: tuple[SimHost, SimHost]) -> None:
    a, b = hosts
    a.link.link_bps = 40e6  # a slow first pass: time to lose the run in the middle of it
    await boot(a, "g2")
    _, checksum, _ = await guest_facts(a, "g2")
    run = await a.service.migrate(MigrationRequest("g2", "hostb", mode=Mode.DATACENTER))
    assert await run.wait_phase({Phase.PRECOPY}, 60) is Phase.PRECOPY
    # The run stops dead, without its rollback, as with a crashed agent: its record stays in precopy.
    assert run._task is not None
    run._task.cancel()
    await asyncio.wait_for(run.done.wait(), 30)
    stuck = await a.host.records.get(run.id, "source")
    assert stuck.phase is Phase.PRECOPY

    dest = await asyncio.wait_for(b.service.wait(run.id), 60)  # its peer vanished: it rolled back
    assert dest.phase is Phase.FAILED and not dest.resumed
    await a.service.recover()  # what a restarted agent does first
    settled = await a.service.wait_settled(run.id, "source", 60)
    assert settled.phase is Phase.FAILED and settled.error is not None
    assert any(e.startswith("settled: interrupted in precopy") for e in settled.events), settled.events
    await assert_runs_once_intact(a, b, "g2", "hosta", checksum)
    assert await a.host.locks.holder("g2") is None  # the stale lock went with the settlement
