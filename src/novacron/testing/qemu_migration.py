"""QEMU's own live migration between two emulated nodes: the peer NovaCron is measured against.

No agent sits in the data path: the source QEMU connects over TCP to the destination QEMU, each
living in its node's network namespace of the WAN emulator, both driven over QMP from the caller.
Used by ``bench/migration.py`` and the demo (its side-by-side summary).

    drivers = {n: NamespaceQemuDriver(root / n, namespace=wan.namespace(n)) for n in ("hosta", "hostb")}
    await boot_guest(drivers["hosta"], "qg", "default", zstd_level=3)
    result = await qemu_migrate(wan, drivers["hosta"], drivers["hostb"], "qg", QEMU_CONFIGS["multifd-zstd3"])

Measured per migration, with the same definitions the agent's records use: total time from starting
the destination QEMU (what an operator's "migrate" has to do too) to QMP RESUME on the destination;
downtime from QMP STOP on the source to RESUME on the destination (QMP host timestamps, one machine);
bytes on the link from the emulator's counters, both directions. Then the guest proves its memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from novacron.errors import NovacronError
from novacron.guest.boot import guest_spec, wait_guest_ready
from novacron.guest.control import GuestControl
from novacron.hypervisor.driver import StopMode
from novacron.hypervisor.qemu import QemuDriver
from novacron.hypervisor.rundir import RunDir
from novacron.hypervisor.spec import VMSpec
from novacron.image import find_image
from novacron.migration.qemu import migration_monitor
from novacron.testing.emulator import WanEmulator
from novacron.testing.link import WanStats
from novacron.testing.netns import NETNS_RUN_DIR

QEMU_PORT = 7600  # where a destination QEMU listens in its namespace
DOWNTIME_LIMIT_MS = 300  # QEMU's default, and the agents' default max downtime
# "Unlimited": QEMU's default cap (128 MiB/s) would hold it near 1 Gbit/s; no link here reaches this.
MAX_BANDWIDTH = 4 << 30
MIGRATION_TIMEOUT_S = 600.0
BOOT_TIMEOUT_S = 180.0
ZSTD_DEFAULT_LEVEL = 1
# The guest beats once a second of its own time; a TCG guest on a busy host may need a few seconds
# of ours to reach the next beat after a switchover.
HEARTBEAT_WAIT_S = 10.0
HEARTBEAT_POLL_S = 0.1


class QemuMigrationError(NovacronError):
    """QEMU's own migration failed, timed out, or left the guest damaged."""


@dataclass(frozen=True)
class QemuConfig:
    """One way of running QEMU's own migration."""

    name: str
    label: str
    capabilities: dict[str, bool] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    # QEMU 7.2 ignores multifd-zstd-level set over QMP: it must be a -global of the sending QEMU.
    zstd_level: int = ZSTD_DEFAULT_LEVEL


_MULTIFD = {"multifd-channels": 4, "multifd-compression": "zstd"}
QEMU_CONFIGS: dict[str, QemuConfig] = {
    c.name: c
    for c in (
        QemuConfig("plain", "QEMU precopy"),
        QemuConfig("multifd-zstd1", "QEMU multifd x4 + zstd-1", {"multifd": True}, _MULTIFD, 1),
        QemuConfig("multifd-zstd3", "QEMU multifd x4 + zstd-3", {"multifd": True}, _MULTIFD, 3),
        # Default cache (64 MiB, the size of the default guest's working set).
        QemuConfig("xbzrle", "QEMU XBZRLE", {"xbzrle": True}),
    )
}


class NamespaceQemuDriver(QemuDriver):
    """A QEMU driver whose QEMUs live in a network namespace (``nsenter`` execs QEMU there, so the pid
    the driver records is QEMU's). ``extra_args`` go on every command line it starts; a migration
    destination resumes by itself when its stream is complete (no ``-S``), as plain QEMU does."""

    def __init__(self, root: Path, *, namespace: str, extra_args: tuple[str, ...] = ()) -> None:
        super().__init__(root)
        self.namespace = namespace
        self.extra_args = extra_args

    def _argv(self, rd: RunDir, spec: VMSpec, accel: str, incoming: bool) -> list[str]:
        argv = super()._argv(rd, spec, accel, incoming)
        if incoming and argv[-1] == "-S":
            argv.pop()
        return ["nsenter", f"--net={NETNS_RUN_DIR / self.namespace}", *argv, *self.extra_args]


def zstd_args(level: int) -> tuple[str, ...]:
    return () if level == ZSTD_DEFAULT_LEVEL else ("-global", f"migration.multifd-zstd-level={level}")


def link_bytes(stats: WanStats, a: str, b: str) -> int:
    """Bytes the link between ``a`` and ``b`` carried, both directions: the forwarder's counters, or
    (veth backend, no forwarder) what the two interfaces transmitted."""
    if stats.links:
        return stats.link(a, b).fwd_bytes + stats.link(b, a).fwd_bytes
    return stats.interfaces[a].tx_bytes + stats.interfaces[b].tx_bytes


@dataclass(frozen=True)
class GuestCheck:
    """What the guest says about its memory after a migration."""

    corrupted: int
    checksum: str
    heartbeats: int

    def problems(self, checksum_before: str, heartbeats_before: int) -> list[str]:
        out = []
        if self.corrupted:
            out.append(f"VERIFY: {self.corrupted} corrupted pages")
        if self.checksum != checksum_before:
            out.append(f"CHECKSUM changed {checksum_before} -> {self.checksum}")
        if self.heartbeats <= heartbeats_before:
            out.append(f"heartbeat stopped at {heartbeats_before}")
        return out


async def wait_heartbeat(
    read: Callable[[], Awaitable[int]], past: int, *, timeout_s: float = HEARTBEAT_WAIT_S
) -> int:
    """The guest's heartbeat count once it is above ``past``, or the last count read when
    ``timeout_s`` ran out first. A single reading straight after a switchover can come before the
    next beat (they are a second apart), so "the heartbeat goes on" is waited for, not sampled."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        beats = await read()
        if beats > past or loop.time() >= deadline:
            return beats
        await asyncio.sleep(HEARTBEAT_POLL_S)


async def check_guest(control_socket: Path, vm: str, *, heartbeat_past: int | None = None) -> GuestCheck:
    """The guest's memory check, checksum and heartbeat count; with ``heartbeat_past``, waits (up to
    HEARTBEAT_WAIT_S) for the count to pass it."""
    async with GuestControl(control_socket, vm=vm) as ctl:
        verify = await ctl.verify()
        checksum = await ctl.checksum()

        async def beats() -> int:
            return (await ctl.status()).heartbeats

        heartbeats = await wait_heartbeat(beats, -1 if heartbeat_past is None else heartbeat_past)
    return GuestCheck(verify.corrupted, checksum.checksum, heartbeats)


async def boot_guest(
    driver: NamespaceQemuDriver,
    name: str,
    profile: str,
    *,
    workload: dict[str, int] | None = None,
    zstd_level: int = ZSTD_DEFAULT_LEVEL,
) -> GuestCheck:
    """Define and start the test guest, wait for READY; returns its state as the reference.
    ``zstd_level``: what its first multifd+zstd migration will compress with."""
    image = find_image(profile)
    driver.extra_args = zstd_args(zstd_level)
    await driver.define(guest_spec(name, image, accel="tcg", workload=workload))
    rd = driver.run_dir(name)
    await driver.start(name)
    since = driver.console_offset(name)  # where this start's output begins
    await wait_guest_ready(rd.console_log, since=since, timeout_s=BOOT_TIMEOUT_S, vm=name)
    return await check_guest(driver.run_dir(name).control_socket, name)


@dataclass(frozen=True)
class QemuResult:
    config: str
    total_s: float  # destination QEMU started -> RESUME on the destination
    downtime_ms: float  # source STOP -> destination RESUME (QMP timestamps)
    qemu_downtime_ms: int  # the source QEMU's own figure
    link_bytes: int
    ram_transferred: int  # QEMU's count, before multifd compression
    check: GuestCheck
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


async def _configure(driver: QemuDriver, name: str, config: QemuConfig) -> None:
    caps = {"events": True, "multifd": False, "xbzrle": False, **config.capabilities}
    await driver.execute(
        name,
        "migrate-set-capabilities",
        {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]},
    )
    params = {"downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": MAX_BANDWIDTH, **config.parameters}
    await driver.execute(name, "migrate-set-parameters", params)


async def qemu_migrate(
    wan: WanEmulator,
    src: NamespaceQemuDriver,
    dst: NamespaceQemuDriver,
    name: str,
    config: QemuConfig,
    *,
    before: GuestCheck,
    src_node: str,
    dst_node: str,
    next_zstd_level: int = ZSTD_DEFAULT_LEVEL,
    timeout_s: float = MIGRATION_TIMEOUT_S,
) -> QemuResult:
    """Migrate ``name`` from ``src`` to ``dst`` with ``config``; the source QEMU is removed afterwards
    (the VM lives on at the destination, whatever the verification found). The destination QEMU is
    started with ``next_zstd_level``: the level it will send with when it migrates the VM on."""
    spec = src.spec(name)
    t0 = time.time()
    stats0 = await wan.stats()
    await dst.define(spec)
    dst.extra_args = zstd_args(next_zstd_level)
    await dst.start(name, incoming=True)
    async with migration_monitor(src, name) as smon, migration_monitor(dst, name) as dmon:
        for driver in (src, dst):
            await _configure(driver, name, config)
        uri = f"tcp:{wan.address(dst_node)}:{QEMU_PORT}"
        await dst.execute(name, "migrate-incoming", {"uri": uri})
        await src.execute(name, "migrate", {"uri": uri})
        resumed = asyncio.create_task(dmon.wait_for(lambda st: st.resume_ts is not None, timeout_s))
        failed = asyncio.create_task(smon.wait_status({"failed", "cancelled"}, timeout_s))
        await asyncio.wait({resumed, failed}, return_when=asyncio.FIRST_COMPLETED)
        for task in (resumed, failed):
            task.cancel()
        await asyncio.gather(resumed, failed, return_exceptions=True)
        status = failed.result() if failed.done() and not failed.cancelled() else None
        if status is not None:
            raise QemuMigrationError("QEMU's migration failed", vm=name, config=config.name, status=status)
        resume_ts = dmon.state.resume_ts
        if resume_ts is None:
            raise QemuMigrationError(
                "QEMU's migration did not complete in time", vm=name, config=config.name, timeout_s=timeout_s
            )
        stop_ts = smon.state.stop_ts if smon.state.stop_ts is not None else resume_ts
    stats1 = await wan.stats()
    info = await src.execute(name, "query-migrate")
    await src.stop(name, mode=StopMode.FORCE)
    await src.delete(name)
    check = await check_guest(dst.run_dir(name).control_socket, name, heartbeat_past=before.heartbeats)
    return QemuResult(
        config=config.name,
        total_s=resume_ts - t0,
        downtime_ms=(resume_ts - stop_ts) * 1000,
        qemu_downtime_ms=int(info.get("downtime", 0)),
        link_bytes=link_bytes(stats1, src_node, dst_node) - link_bytes(stats0, src_node, dst_node),
        ram_transferred=int((info.get("ram") or {}).get("transferred", 0)),
        check=check,
        problems=tuple(check.problems(before.checksum, before.heartbeats)),
    )
