"""The orchestrator with real TCG guests and QEMU's own TLS (direct path), both hosts in this process
over an in-process control channel: a migration that works, and failures that must end with the VM
running exactly once, its memory intact and a record that says what happened."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal

import pytest

from novacron.dwcp.mode import Mode
from novacron.guest.control import GuestControl
from novacron.hypervisor.driver import VMState
from novacron.migration.context import MigrationRequest
from novacron.migration.converge import SteeringConfig
from novacron.migration.orchestrator import MigrationRun
from novacron.migration.phases import Phase
from novacron.vm.service import VMService
from test_migration_support import SimHost

pytestmark = pytest.mark.qemu

HEARTBEAT = r"NOVACRON-HEARTBEAT n=(\d+)"


async def boot(h: SimHost, name: str, **workload: int) -> VMService:
    svc = VMService(h.store, h.driver, node=h.name)
    spec = VMService.spec_from_image(name, "test", accel="tcg", workload=workload or None)
    await svc.create(spec, image_profile="test")
    await svc.start(name, wait_ready=True)
    return svc


async def guest_facts(h: SimHost, name: str) -> tuple[int, str, int]:
    async with GuestControl(h.driver.run_dir(name).control_socket, vm=name) as ctl:
        verify = await ctl.verify()
        checksum = await ctl.checksum()
        status = await ctl.status()
    return verify.corrupted, checksum.checksum, status.heartbeats


async def running_copies(a: SimHost, b: SimHost, name: str) -> list[str]:
    where = []
    for h in (a, b):
        if h.driver.is_defined(name) and (await h.driver.status(name)).state is VMState.RUNNING:
            where.append(h.name)
    return where


async def test_direct_migration_moves_the_running_guest(hosts: tuple[SimHost, SimHost]) -> None:
    a, b = hosts
    await boot(a, "g1")
    corrupted, checksum, beats = await guest_facts(a, "g1")
    assert corrupted == 0

    run = await a.service.migrate(MigrationRequest("g1", "hostb", mode=Mode.DATACENTER, max_downtime_ms=300))
    record = await asyncio.wait_for(run.wait(), 120)

    assert record.phase is Phase.DONE and record.outcome == "done", record.error
    assert [e.phase for e in record.history][:3] == [Phase.PREPARE, Phase.CONNECT, Phase.PRECOPY]
    assert record.data_path == "direct" and record.mode == "datacenter"
    assert record.downtime_ms is not None and 0 < record.downtime_ms < 2000
    assert record.progress.bytes_raw > 10 << 20  # the guest's memory went across
    dest = await b.host.records.get(run.id, "destination")
    assert dest.phase is Phase.DONE and dest.resumed

    assert await running_copies(a, b, "g1") == ["hostb"]
    assert not a.driver.is_defined("g1")  # the source forgot the VM
    corrupted2, checksum2, beats2 = await guest_facts(b, "g1")
    assert corrupted2 == 0 and checksum2 == checksum and beats2 >= beats
    assert (await b.host.ownership.require("g1")).node == "hostb"
    assert (await b.host.inventory.get("g1")).node == "hostb"

    # ... and back: the destination of the first migration is now the source.
    back = await b.service.migrate(MigrationRequest("g1", "hosta", mode=Mode.DATACENTER))
    record = await asyncio.wait_for(back.wait(), 120)
    assert record.outcome == "done", record.error
    assert await running_copies(a, b, "g1") == ["hosta"]
    corrupted3, checksum3, _ = await guest_facts(a, "g1")
    assert corrupted3 == 0 and checksum3 == checksum


async def assert_runs_once_intact(a: SimHost, b: SimHost, name: str, on: str, checksum: str) -> None:
    assert await running_copies(a, b, name) == [on]
    host = a if on == a.name else b
    corrupted, checksum_now, _ = await guest_facts(host, name)
    assert corrupted == 0 and checksum_now == checksum


async def test_refused_for_capacity_then_boot_files_shipped(hosts: tuple[SimHost, SimHost]) -> None:
    a, b = hosts
    await boot(a, "g2")
    _, checksum, _ = await guest_facts(a, "g2")
    b.host.config = dataclasses.replace(b.host.config, capacity_mib=100, trust_source_paths=False)

    run = await a.service.migrate(MigrationRequest("g2", "hostb", mode=Mode.DATACENTER))
    record = await asyncio.wait_for(run.wait(), 60)
    assert record.outcome == "failed" and record.error is not None
    assert record.error.kind == "MigrationRefused" and record.error.context["code"] == "capacity"
    assert "needs 192 MiB" in record.error.message
    dest = await b.host.records.get(run.id, "destination")
    assert dest.outcome == "failed" and dest.error is not None and dest.error.context["code"] == "capacity"
    await assert_runs_once_intact(a, b, "g2", "hosta", checksum)
    assert not b.driver.is_defined("g2")

    # Room now; hostb ignores paths named by the source, so the kernel and initrd are shipped.
    b.host.config = dataclasses.replace(b.host.config, capacity_mib=None)
    run = await a.service.migrate(MigrationRequest("g2", "hostb", mode=Mode.DATACENTER))
    record = await asyncio.wait_for(run.wait(), 120)
    assert record.outcome == "done", record.error
    assert any("shipping kernel" in e for e in record.events) and any(
        "shipping initrd" in e for e in record.events
    )
    spec = b.driver.spec("g2")
    assert spec.kernel is not None and spec.kernel.is_relative_to(b.host.artefact_cache)
    await assert_runs_once_intact(a, b, "g2", "hostb", checksum)


async def test_cannot_converge_under_a_strict_deadline(hosts: tuple[SimHost, SimHost]) -> None:
    a, b = hosts
    a.link.link_bps = 160e6  # QEMU is capped near 20 MB/s; the guest dirties 24 MB/s of a 24 MiB set
    a.host.config = dataclasses.replace(a.host.config, steering=SteeringConfig(escalate_after_passes=2))
    await boot(a, "g3", ws_mib=24, dirty_rate=6000, dirty_bytes=4000, rewrite_rate=0)
    _, checksum, _ = await guest_facts(a, "g3")
    request = MigrationRequest("g3", "hostb", mode=Mode.DATACENTER, deadline_s=10, max_downtime_ms=50)
    run = await a.service.migrate(request)
    record = await asyncio.wait_for(run.wait(), 90)
    assert record.outcome == "failed" and record.error is not None
    assert record.error.kind == "MigrationDiverged"
    assert "did not converge by the deadline" in record.error.message
    assert record.progress.iteration >= 2
    assert any(e.startswith("auto-converge") for e in record.events), record.events
    dest = await b.host.records.get(run.id, "destination")
    assert dest.outcome == "failed" and not dest.resumed
    await assert_runs_once_intact(a, b, "g3", "hosta", checksum)
    assert not b.driver.is_defined("g3")


async def wait_phase(run: MigrationRun, phases: set[Phase], timeout_s: float = 60) -> None:
    assert await run.wait_phase(phases, timeout_s) in phases


async def wait_pages_flow(run: MigrationRun, timeout_s: float = 60) -> None:
    """Until the source has seen QEMU's migration active with pages sent: its multifd channels are up.

    Losing them while QEMU sets them up is a QEMU 7.2 race of its own that can abort the source
    (docs/hypervisor.md; tests/test_qemu_stuck.py); "mid-precopy" here means after it. Read from the
    run's own samples: a second QMP client polling the command monitor is itself a load on QEMU."""
    async with asyncio.timeout(timeout_s):
        while not (run.progress.qemu_status == "active" and run.progress.bytes_raw > 1 << 20):
            if run.done.is_set():
                raise AssertionError(f"the migration ended before pages flowed: {run.record}")
            await asyncio.sleep(0.05)  # the run samples QEMU on its own clock: poll its last sample


async def test_destination_qemu_killed_mid_precopy(hosts: tuple[SimHost, SimHost]) -> None:
    a, b = hosts
    a.link.link_bps = 40e6
    await boot(a, "g4")
    _, checksum, _ = await guest_facts(a, "g4")
    run = await a.service.migrate(MigrationRequest("g4", "hostb", mode=Mode.DATACENTER))
    await wait_phase(run, {Phase.PRECOPY})
    await wait_pages_flow(run)
    status = await b.driver.status("g4")
    assert status.state is VMState.INCOMING and status.pid is not None
    os.kill(status.pid, signal.SIGKILL)
    record = await asyncio.wait_for(run.wait(), 60)
    assert record.outcome == "failed" and record.error is not None
    dest = await b.host.records.get(run.id, "destination")
    assert dest.outcome == "failed" and dest.error is not None
    assert "QEMU" in dest.error.message or "QEMU" in record.error.message
    await assert_runs_once_intact(a, b, "g4", "hosta", checksum)


async def test_source_qemu_killed_mid_precopy_is_named(hosts: tuple[SimHost, SimHost]) -> None:
    a, b = hosts
    a.link.link_bps = 40e6
    await boot(a, "g6")
    run = await a.service.migrate(MigrationRequest("g6", "hostb", mode=Mode.DATACENTER))
    await wait_phase(run, {Phase.PRECOPY})
    await wait_pages_flow(run)
    status = await a.driver.status("g6")
    assert status.pid is not None
    os.kill(status.pid, signal.SIGKILL)
    record = await asyncio.wait_for(run.wait(), 60)
    assert record.outcome == "failed" and record.error is not None
    # SIGKILL leaves QEMU no last words: the message is not padded with our own log lines.
    assert record.error.message == "the source QEMU exited during the migration", record.error
    assert record.error.context["cause"]  # what the lost monitor interrupted is kept
    assert "source QEMU is gone" in record.events
    dest_run = b.service.live(run.id)  # the destination rolls back on the source's ABORT, on its own time
    dest = await asyncio.wait_for(dest_run.wait(), 60) if dest_run is not None else None
    dest = dest or await b.host.records.get(run.id, "destination")
    assert dest.outcome == "failed" and not dest.resumed
    assert dest.error is not None and "the source QEMU exited" in dest.error.message
    assert await running_copies(a, b, "g6") == []
    assert not b.driver.is_defined("g6")


async def test_control_link_cut_mid_precopy_and_cancel(hosts: tuple[SimHost, SimHost]) -> None:
    a, b = hosts
    a.link.link_bps = 40e6
    await boot(a, "g5")
    _, checksum, _ = await guest_facts(a, "g5")
    run = await a.service.migrate(MigrationRequest("g5", "hostb", mode=Mode.DATACENTER))
    await wait_phase(run, {Phase.PRECOPY})
    a.link.cut_all("link cut")
    record = await asyncio.wait_for(run.wait(), 60)
    assert record.outcome == "failed" and record.error is not None and record.error.kind == "PeerLost"
    dest_run = b.service.live(run.id)
    assert dest_run is not None
    dest = await asyncio.wait_for(dest_run.wait(), 60)
    assert dest.outcome == "failed" and not dest.resumed
    await assert_runs_once_intact(a, b, "g5", "hosta", checksum)
    assert not b.driver.is_defined("g5")

    # The operator cancels the next attempt in precopy: both sides roll back, the record says so.
    run = await a.service.migrate(MigrationRequest("g5", "hostb", mode=Mode.DATACENTER))
    await wait_phase(run, {Phase.PRECOPY})
    await a.service.cancel(run.id)
    record = await asyncio.wait_for(run.wait(), 60)
    assert record.phase is Phase.CANCELLED and record.outcome == "cancelled"
    assert record.error is not None and "cancelled by the operator" in record.error.message
    dest = await asyncio.wait_for(b.service.wait(run.id), 60)
    assert dest.outcome in ("cancelled", "failed")
    await assert_runs_once_intact(a, b, "g5", "hosta", checksum)
