"""The orchestrator with real TCG guests and QEMU's own TLS (direct path), both hosts in this process
over an in-process control channel: a migration that works, and failures that must end with the VM
running exactly once, its memory intact and a record that says what happened."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from novacron.dwcp.mode import Mode
from novacron.guest.control import GuestControl
from novacron.hypervisor.driver import VMState
from novacron.migration.context import MigrationRequest
from novacron.migration.phases import Phase
from novacron.vm.service import VMService
from test_migration_support import SimHost, two_hosts

pytestmark = pytest.mark.qemu

HEARTBEAT = r"NOVACRON-HEARTBEAT n=(\d+)"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: keep run directories short.
    path = Path(tempfile.mkdtemp(prefix="nvo", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


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


@pytest.fixture
async def hosts(short_tmp: Path) -> AsyncIterator[tuple[SimHost, SimHost]]:
    async with two_hosts(short_tmp) as pair:
        yield pair


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
    print("first migration:", record.downtime_ms, "ms downtime", record.progress, record.events)
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
