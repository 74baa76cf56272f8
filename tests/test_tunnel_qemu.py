"""Live migrations of real TCG guests through the tunnel: source QEMU -> source tunnel -> AMST (TLS,
loopback) -> destination tunnel -> destination QEMU, both QEMUs driven over QMP from the test.

After every migration the guest proves its memory: VERIFY reports 0 corrupted working-set pages, the
CHECKSUM of its static data is unchanged, its heartbeat goes on, and exactly one QEMU runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from qemu.qmp import EventListener, QMPClient

from novacron.dwcp.encoding import BaselineStore, DefaultPageHasher
from novacron.dwcp.encoding.summary import SUMMARY_VERSION_NAMED
from novacron.dwcp.transport import AmstListener, AmstSession, connect_session
from novacron.guest.boot import BootedGuest, boot_test_guest
from novacron.guest.control import GuestControl
from novacron.hypervisor import QemuDriver, StopMode, VMState, wait_for_line
from novacron.migration.datapath import ChannelRouter, DataPathError, DataPathStats, QemuMigrationSettings
from novacron.migration.tunnel import (
    DestinationTunnel,
    SourceTunnel,
    TunnelLimits,
    amst_bandwidth,
    amst_rtt,
    passthrough_settings,
    tunnel_settings,
)
from novacron.migration.tunnel.siblings import SiblingIndexer, SiblingVM
from novacron.security import pki
from novacron.security.tls import TlsConfig
from novacron.testing import LinkSpec, WanEmulator

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(600)]

KEY = bytes(range(32))
HEARTBEAT = r"NOVACRON-HEARTBEAT n=(\d+)"
MIGRATION_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def tls_pair() -> tuple[TlsConfig, TlsConfig]:
    ca = pki.create_ca("dc1")
    return (
        TlsConfig(pki.issue_node_cert(ca, "src-host", "agent")),
        TlsConfig(pki.issue_node_cert(ca, "dst-host", "agent")),
    )


SessionPair = tuple[AmstSession, AmstSession]


@contextlib.asynccontextmanager
async def amst_pair(
    tls: tuple[TlsConfig, TlsConfig], wan: WanEmulator | None = None
) -> AsyncIterator[SessionPair]:
    """An AMST session on loopback, or across the emulator from node a (this thread) to node b."""
    async with AmstListener(tls[1]) as listener:
        if wan is None:
            host, port = await listener.start("127.0.0.1", 0)
        else:
            with wan.netns("b"):  # the listening socket lives in node b (nothing else runs meanwhile)
                host, port = await listener.start(wan.address("b"), 0)
        src = await connect_session(host, port, tls[0])
        dst = await listener.accept()
        try:
            yield src, dst
        finally:
            src.abort("migration over")
            dst.abort("migration over")


# ------------------------------------------------------------------------------------------ helpers


class MigrationEvents:
    """MIGRATION / STOP / RESUME events of one QEMU (second monitor), listened to before migrating."""

    def __init__(self, qmp: QMPClient) -> None:
        self.listener = EventListener(("MIGRATION", "STOP", "RESUME"))
        self.qmp = qmp
        self.status: str | None = None
        self.stop_ts: float | None = None
        self.resume_ts: float | None = None
        self.completed_ts: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def run(self) -> None:
        with self.qmp.listen(self.listener):
            while True:
                ev = await self.listener.get()
                stamp: dict[str, int] = ev["timestamp"]  # type: ignore[assignment]
                data: dict[str, str] = ev.get("data", {})  # type: ignore[assignment]
                ts = stamp["seconds"] + stamp["microseconds"] / 1e6
                if ev["event"] == "MIGRATION":
                    self.status = data["status"]
                    if self.status == "completed":
                        self.completed_ts = ts
                elif ev["event"] == "STOP":
                    self.stop_ts = ts
                elif ev["event"] == "RESUME":
                    self.resume_ts = ts
                self._changed.set()

    async def wait_resumed(self, timeout_s: float) -> float:
        async with asyncio.timeout(timeout_s):
            while self.resume_ts is None:
                self._changed.clear()
                await self._changed.wait()
        return self.resume_ts

    async def wait_status(self, statuses: set[str], timeout_s: float) -> str:
        async with asyncio.timeout(timeout_s):
            while self.status not in statuses:
                self._changed.clear()
                await self._changed.wait()
        assert self.status is not None
        return self.status


@contextlib.asynccontextmanager
async def watch(driver: QemuDriver, name: str) -> AsyncIterator[MigrationEvents]:
    async with driver.qmp_events(name) as qmp:
        ev = MigrationEvents(qmp)
        task = asyncio.create_task(ev.run())
        try:
            yield ev
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def apply_settings(driver: QemuDriver, name: str, settings: QemuMigrationSettings) -> None:
    policy = settings.with_policy(
        {"events": True},
        {"max-bandwidth": 4 << 30, "downtime-limit": 300},
    )
    await driver.execute(name, "migrate-set-capabilities", {"capabilities": policy.qmp_capabilities()})
    await driver.execute(name, "migrate-set-parameters", dict(policy.parameters))


@dataclass
class TeeProxy:
    """Relays unix connections from ``listen`` to ``target`` and hashes what flows forward on each."""

    listen: Path
    target: Path
    seen: list[tuple[int, str]] = field(default_factory=list)  # (bytes, sha256) per connection
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._on, path=str(self.listen))

    async def _on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tr, tw = await asyncio.open_unix_connection(str(self.target))
        h = hashlib.sha256()
        count = 0

        async def back() -> None:
            while data := await tr.read(1 << 16):
                writer.write(data)
                await writer.drain()

        t = asyncio.create_task(back())
        self.tasks.add(t)
        while data := await reader.read(1 << 20):
            h.update(data)
            count += len(data)
            tw.write(data)
            await tw.drain()
        self.seen.append((count, h.hexdigest()))
        if tw.can_write_eof():
            tw.write_eof()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in self.tasks:
            t.cancel()


@dataclass
class Migrated:
    src: DataPathStats
    dst: DataPathStats
    seconds: float
    downtime_ms: float | None
    qemu_downtime_ms: int  # the source QEMU's own figure (stop to last byte written)
    arrived_ms: float | None  # source STOP to the destination QEMU's incoming migration completed
    src_tee: TeeProxy | None = None
    dst_tee: TeeProxy | None = None


async def migrate(
    tls: tuple[TlsConfig, TlsConfig],
    src_drv: QemuDriver,
    dst_drv: QemuDriver,
    name: str,
    work: Path,
    *,
    passthrough: bool = False,
    src_store: BaselineStore | None = None,
    dst_store: BaselineStore | None = None,
    tee: bool = False,
    pair: Callable[[], AbstractAsyncContextManager[SessionPair]] | None = None,
) -> Migrated:
    """Migrate ``name`` from ``src_drv`` to ``dst_drv`` (already defined there) through the tunnel,
    resume it on the destination and quit the source: what the orchestrator does, minus the records."""
    settings = passthrough_settings() if passthrough else tunnel_settings()
    await dst_drv.start(name, incoming=True)
    async with (
        (pair or (lambda: amst_pair(tls)))() as (s_src, s_dst),
        watch(src_drv, name) as src_ev,
        watch(dst_drv, name) as dst_ev,
    ):
        await apply_settings(src_drv, name, settings)
        await apply_settings(dst_drv, name, settings)
        router = ChannelRouter(s_dst)
        dst = DestinationTunnel(
            router,
            vm=name,
            workdir=work / "dst",
            settings=settings,
            passthrough=passthrough,
            baseline=dst_store,
        )
        src = SourceTunnel(
            s_src,
            vm=name,
            workdir=work / "src",
            settings=settings,
            passthrough=passthrough,
            cluster_key=KEY,
            baseline=src_store,
            limits=TunnelLimits(finish_timeout_s=60),
            bandwidth=amst_bandwidth(s_src),
            rtt=amst_rtt(s_src),
        )
        uri_in = await dst.start()
        src_tee = dst_tee = None
        if tee:
            # The destination QEMU listens behind a tee; the tunnel connects to the tee.
            qemu_in = work / "qemu-in.sock"
            dst_tee = TeeProxy(Path(uri_in.removeprefix("unix:")), qemu_in)
            await dst_tee.start()
            uri_in = f"unix:{qemu_in}"
        await dst_drv.execute(name, "migrate-incoming", {"uri": uri_in})
        # PREPARE carries the digest and the newest summary version the source reads.
        uri_out = await src.start(dst.summary(src.baseline_copy(), SUMMARY_VERSION_NAMED))
        if tee:
            qemu_out = work / "qemu-out.sock"
            src_tee = TeeProxy(qemu_out, Path(uri_out.removeprefix("unix:")))
            await src_tee.start()
            uri_out = f"unix:{qemu_out}"
        t0 = time.monotonic()
        await src_drv.execute(name, "migrate", {"uri": uri_out})
        try:
            status = await src_ev.wait_status({"completed", "failed", "cancelled"}, MIGRATION_TIMEOUT_S)
            assert status == "completed", (status, src.stats().error, dst.stats().error)
            assert await dst_ev.wait_status({"completed", "failed"}, 60) == "completed"
            await asyncio.gather(src.finish(), dst.finish())
        except BaseException:
            await asyncio.gather(src.abort("test failed"), dst.abort("test failed"))
            raise
        seconds = time.monotonic() - t0
        info = await src_drv.execute(name, "query-migrate")
        arrived = None
        if src_ev.stop_ts is not None and dst_ev.completed_ts is not None:
            arrived = (dst_ev.completed_ts - src_ev.stop_ts) * 1000
        # Switchover: the source is paused with its migration completed; only now may the destination run.
        assert (await src_drv.status(name)).qemu_runstate == "postmigrate"
        assert (await dst_drv.status(name)).qemu_runstate == "paused"
        await dst_drv.execute(name, "cont")
        resumed = await dst_ev.wait_resumed(10)
        downtime = (resumed - src_ev.stop_ts) * 1000 if src_ev.stop_ts is not None else None
        await src_drv.stop(name, mode=StopMode.FORCE)
        await asyncio.gather(src.close(), dst.close())  # records the baseline copies
        stats = src.stats(), dst.stats()
        for t in (src_tee, dst_tee):
            if t is not None:
                await t.close()
        return Migrated(
            stats[0], stats[1], seconds, downtime, int(info.get("downtime", -1)), arrived, src_tee, dst_tee
        )


def qemu_processes(uuid: str) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (p / "cmdline").read_bytes().split(b"\0")
                if argv and b"qemu-system" in argv[0] and uuid.encode() in argv:
                    out.append(int(p.name))
    return out


async def check_guest(drv: QemuDriver, name: str, uuid: str, checksum: str) -> GuestControl:
    """The guest runs on ``drv`` only, its memory is intact and its heartbeat continues."""
    rd = drv.run_dir(name)
    offset = rd.console_log.stat().st_size if rd.console_log.exists() else 0
    await wait_for_line(rd.console_log, HEARTBEAT, since=offset, timeout_s=15)
    assert (await drv.status(name)).state == VMState.RUNNING
    assert len(qemu_processes(uuid)) == 1
    control = GuestControl(rd.control_socket, vm=name)
    await control.connect()
    verify = await control.verify()
    assert verify.corrupted == 0 and verify.pages > 0, verify
    assert (await control.checksum()).checksum == checksum
    return control


@contextlib.asynccontextmanager
async def guest_pair(tmp_path: Path, name: str) -> AsyncIterator[tuple[BootedGuest, QemuDriver, str]]:
    async with boot_test_guest(name, root=tmp_path / "src-vms") as g:
        before = (await g.control.checksum()).checksum
        await g.control.close()
        dst_drv = QemuDriver(tmp_path / "dst-vms")
        await dst_drv.define(g.spec)  # the same spec: machine type, uuid, kernel, RAM
        try:
            yield g, dst_drv, before
        finally:
            with contextlib.suppress(Exception):
                if (await dst_drv.status(name)).alive:
                    await dst_drv.stop(name, mode=StopMode.FORCE)


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("passthrough", [False, True], ids=["hde", "passthrough"])
async def test_live_migration_through_the_tunnel_is_byte_exact(
    tmp_path: Path, tls_pair: tuple[TlsConfig, TlsConfig], passthrough: bool
) -> None:
    async with guest_pair(tmp_path, "mig") as (g, dst_drv, before):
        uuid = g.spec.uuid
        assert uuid is not None
        m = await migrate(
            tls_pair, g.driver, dst_drv, "mig", tmp_path / "work", passthrough=passthrough, tee=True
        )
        control = await check_guest(dst_drv, "mig", uuid, before)
        await control.close()
        # What the source QEMU wrote on each connection is what the destination QEMU read.
        assert m.src_tee is not None and m.dst_tee is not None
        assert sorted(m.src_tee.seen) == sorted(m.dst_tee.seen)
        assert len(m.src_tee.seen) == 1 + 4
        assert m.src.qemu_bytes == m.dst.qemu_bytes == sum(n for n, _ in m.src_tee.seen)
        assert m.src.error is None and m.dst.error is None
        if not passthrough:
            assert m.src.transport_bytes < m.src.qemu_bytes / 2, m.src
            assert m.src.syncs > 0 and m.src.packets == m.dst.packets
            assert m.src.fallback_channels == 0
        path = "pass-through" if passthrough else "hde"
        print(
            f"\n{path}: {m.seconds:.2f} s, downtime {m.downtime_ms:.0f} ms (QEMU {m.qemu_downtime_ms} ms, "
            f"arrived {m.arrived_ms:.0f} ms), {m.src}"
        )


async def test_back_migration_uses_the_baseline(
    tmp_path: Path, tls_pair: tuple[TlsConfig, TlsConfig]
) -> None:
    hasher = DefaultPageHasher(KEY)
    store_a = BaselineStore(tmp_path / "baseline-a", hasher)
    store_b = BaselineStore(tmp_path / "baseline-b", hasher)
    try:
        async with guest_pair(tmp_path, "boomerang") as (g, drv_b, before):
            uuid = g.spec.uuid
            assert uuid is not None
            there = await migrate(
                tls_pair, g.driver, drv_b, "boomerang", tmp_path / "w1", src_store=store_a, dst_store=store_b
            )
            assert there.src.baseline_pages_recorded > 1000
            assert there.dst.baseline_pages_recorded == there.src.baseline_pages_recorded
            control = await check_guest(drv_b, "boomerang", uuid, before)
            await wait_for_line(
                drv_b.run_dir("boomerang").console_log, r"NOVACRON-HEARTBEAT n=\d+", since=0, timeout_s=10
            )
            s0 = await control.status()
            await control.close()
            back = await migrate(
                tls_pair, drv_b, g.driver, "boomerang", tmp_path / "w2", src_store=store_b, dst_store=store_a
            )
            control = await check_guest(g.driver, "boomerang", uuid, before)
            s1 = await control.status()
            await control.close()
            assert s1.pages_dirtied > s0.pages_dirtied  # the workload ran all along
            assert back.src.pages.baseline > 0.5 * back.src.pages.total, back.src.pages
            assert back.src.transport_bytes < 0.25 * there.src.transport_bytes, (there.src, back.src)
            # Both stores hold the same copy: READY named it by digest, and since store A holds
            # nothing else, no fingerprint is listed either (summary v3: header and digest only).
            assert back.src.baseline_summary_bytes <= 64, back.src
            print(f"\nthere: {there.src}\nback: {back.src}")
    finally:
        store_a.close()
        store_b.close()


async def test_a_sibling_on_the_destination_makes_the_migration_warm(
    tmp_path: Path, tls_pair: tuple[TlsConfig, TlsConfig]
) -> None:
    """Guest A migrates to a host running sibling S (same image) whose memory the indexer put in the
    host's store; then S migrates, cold, to A's old host (nothing there): A's link bytes are a
    fraction of S's, and both arrive intact."""
    hasher = DefaultPageHasher(KEY)
    store = BaselineStore(tmp_path / "baseline-dst", hasher)
    try:
        async with (
            guest_pair(tmp_path, "warm") as (g, dst_drv, before),
            boot_test_guest("sib", root=tmp_path / "dst-vms", driver=dst_drv) as sib,
        ):
            sib_sum = (await sib.control.checksum()).checksum
            await sib.control.close()
            pid = (await dst_drv.status("sib")).pid
            assert pid is not None

            async def siblings() -> list[SiblingVM]:
                return [SiblingVM("sib", pid, "test")]

            indexer = SiblingIndexer(store, siblings)
            t0 = time.monotonic()
            await indexer.run_once()
            st = indexer.stats()["sib"]
            index_s = time.monotonic() - t0
            assert st.records_written > 1000, st
            warm = await migrate(tls_pair, g.driver, dst_drv, "warm", tmp_path / "w1", dst_store=store)
            control = await check_guest(dst_drv, "warm", g.spec.uuid or "", before)
            await control.close()
            # The cold peer: S itself, same image and age, to A's old host, which holds nothing.
            await g.driver.define(sib.spec)
            cold = await migrate(tls_pair, dst_drv, g.driver, "sib", tmp_path / "w2")
            control = await check_guest(g.driver, "sib", sib.spec.uuid or "", sib_sum)
            await control.close()
            with contextlib.suppress(Exception):
                await g.driver.stop("sib", mode=StopMode.FORCE)
            assert warm.src.pages.baseline > 0.3 * warm.src.pages.total, warm.src.pages
            # The test image's guests share ~40 % of their non-zero pages (the rest is per-boot random
            # data, the working set and kernel state); measured 0.61x (8 MiB zstd window), 0.43x (128).
            assert warm.src.transport_bytes < 0.75 * cold.src.transport_bytes, (warm.src, cold.src)
            print(
                f"\nsibling indexed in {index_s:.2f} s ({st.cpu_s:.2f} CPU s, {st.records_written} records); "
                f"warm {warm.src.transport_bytes / 1e6:.1f} MB vs cold "
                f"{cold.src.transport_bytes / 1e6:.1f} MB on the link "
                f"({warm.src.transport_bytes / cold.src.transport_bytes:.2f}x), "
                f"baseline pages {warm.src.pages.baseline} of {warm.src.pages.total}"
            )
    finally:
        store.close()


async def test_corrupted_batch_fails_the_migration_and_the_source_keeps_running(
    tmp_path: Path, tls_pair: tuple[TlsConfig, TlsConfig]
) -> None:
    async with guest_pair(tmp_path, "corrupt") as (g, dst_drv, before):
        uuid = g.spec.uuid
        assert uuid is not None
        settings = tunnel_settings()
        await dst_drv.start("corrupt", incoming=True)
        async with amst_pair(tls_pair) as (s_src, s_dst), watch(g.driver, "corrupt") as src_ev:
            await apply_settings(g.driver, "corrupt", settings)
            await apply_settings(dst_drv, "corrupt", settings)
            dst = DestinationTunnel(
                ChannelRouter(s_dst), vm="corrupt", workdir=tmp_path / "d", settings=settings
            )
            src = SourceTunnel(
                s_src,
                vm="corrupt",
                workdir=tmp_path / "s",
                settings=settings,
                cluster_key=KEY,
                corrupt_batch=5,
            )
            await dst_drv.execute("corrupt", "migrate-incoming", {"uri": await dst.start()})
            await g.driver.execute("corrupt", "migrate", {"uri": await src.start(dst.summary())})
            assert await src_ev.wait_status({"completed", "failed"}, MIGRATION_TIMEOUT_S) == "failed"
            with pytest.raises(DataPathError):
                await dst.finish()
            err = dst.stats().error
            assert err is not None and "corrupted HDE batch" in err, err
            src_err = src.stats().error
            assert src_err is not None and "corrupted HDE batch" in src_err, src_err
            await asyncio.gather(src.abort("rollback"), dst.abort("rollback"), src.close(), dst.close())
        # Rollback: the destination QEMU goes (QEMU 7.2 exits by itself when its incoming migration
        # fails), the source never stopped running.
        if (await dst_drv.status("corrupt")).alive:
            await dst_drv.stop("corrupt", mode=StopMode.FORCE)
        status = await g.driver.status("corrupt")
        assert status.state == VMState.RUNNING, status
        control = await check_guest(g.driver, "corrupt", uuid, before)
        await control.close()


@pytest.mark.netns
@pytest.mark.parametrize("passthrough", [False, True], ids=["hde", "passthrough"])
async def test_migration_across_the_wan_emulator(
    tmp_path: Path, tls_pair: tuple[TlsConfig, TlsConfig], passthrough: bool
) -> None:
    """100 Mbit/s, 50 ms RTT between two namespaces: the source side runs in node a (this thread for
    the whole migration, so every transport socket it opens lives there), the destination in b."""
    link = LinkSpec.for_rtt(50, rate_bps=100e6)
    async with guest_pair(tmp_path, "wan") as (g, dst_drv, before), WanEmulator(["a", "b"], link=link) as wan:
        uuid = g.spec.uuid
        assert uuid is not None
        with wan.netns("a"):
            m = await migrate(
                tls_pair,
                g.driver,
                dst_drv,
                "wan",
                tmp_path / "work",
                passthrough=passthrough,
                pair=lambda: amst_pair(tls_pair, wan),
            )
        stats = (await wan.stats()).link("a", "b")
        control = await check_guest(dst_drv, "wan", uuid, before)
        await control.close()
        # What crossed the emulated link: our records plus TLS/TCP/IP overhead, a few per cent.
        assert m.src.transport_bytes <= stats.fwd_bytes <= 1.1 * m.src.transport_bytes + (1 << 20)
        if not passthrough:
            assert stats.fwd_bytes < 0.5 * m.src.qemu_bytes
        path = "pass-through" if passthrough else "hde"
        print(
            f"\nWAN {path}: {m.seconds:.2f} s, link {stats.fwd_bytes / 1e6:.1f} MB for "
            f"{m.src.qemu_bytes / 1e6:.1f} MB from QEMU, downtime {m.downtime_ms:.0f} ms "
            f"(arrived {m.arrived_ms:.0f} ms), codecs {dict(m.src.codec_batches)}"
        )
