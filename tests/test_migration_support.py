"""Test support for migrations without the AMST transport: an in-process channel pair shaped like an
AMST channel, a peer link that hands each session to a MigrationService in the same process, and two
"hosts" (stores, drivers, PKI) side by side. Fakes of transport only; QEMU and TLS stay real."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from novacron.dwcp.mode import Mode
from novacron.migration.context import MigrationConfig, MigrationHost
from novacron.migration.datapath import ChannelRouter, DataChannel, DataSession
from novacron.migration.errors import UnknownPeer
from novacron.migration.paths import HostDataPaths
from novacron.migration.qemu import MigrationDriver
from novacron.migration.service import MigrationService
from novacron.security.pki import create_ca, issue_node_cert
from novacron.store.sqlite import SqliteStore

_EOF = object()


class PipeChannel:
    """One end of an in-process message channel (the DataChannel shape the control plane uses)."""

    def __init__(self, kind: str, inbox: asyncio.Queue[object], outbox: asyncio.Queue[object]) -> None:
        self.kind = kind
        self.label: str | None = None
        self._inbox = inbox
        self._outbox = outbox
        self.closed = False
        self.broken: str | None = None
        self.cut_after: str | None = None  # break the link right after sending this message type
        self.peer: PipeChannel | None = None

    async def send_message(self, data: bytes) -> None:
        if self.broken is not None:
            raise OSError(f"channel broken: {self.broken}")
        if self.closed:
            raise OSError("channel closed")
        await self._outbox.put(bytes(data))
        if self.cut_after is not None and msgpack.unpackb(data).get("type") == self.cut_after:
            self.cut(f"link cut after {self.cut_after}")

    async def recv_message(self) -> bytes | None:
        item = await self._inbox.get()  # what arrived before a cut is still read, then the error
        if item is _EOF:
            self._inbox.put_nowait(_EOF)
            return None
        if isinstance(item, BaseException):
            self._inbox.put_nowait(item)
            raise item
        assert isinstance(item, bytes)
        return item

    async def write(self, data: bytes) -> None:
        await self.send_message(data)

    async def read(self, n: int = -1) -> bytes:
        return await self.recv_message() or b""

    async def drain(self) -> None:
        return None

    def close(self, reason: str | None = None) -> None:
        if not self.closed:
            self.closed = True
            self._outbox.put_nowait(_EOF)

    def abort(self, reason: str) -> None:
        self.cut(reason)

    def buffered_bytes(self) -> int:
        return 0

    def cut(self, reason: str) -> None:
        """Break both directions after what was sent so far, as a dead link or a killed peer would."""
        self.broken = reason
        if self.peer is not None:
            self.peer.broken = reason
        self._outbox.put_nowait(OSError(f"peer lost: {reason}"))
        self._inbox.put_nowait(OSError(f"peer lost: {reason}"))


def channel_pair(kind: str = "migration-control") -> tuple[PipeChannel, PipeChannel]:
    a_to_b: asyncio.Queue[object] = asyncio.Queue()
    b_to_a: asyncio.Queue[object] = asyncio.Queue()
    a, b = PipeChannel(kind, b_to_a, a_to_b), PipeChannel(kind, a_to_b, b_to_a)
    a.peer, b.peer = b, a
    return a, b


@dataclass
class PipeSession:
    control: DataChannel
    mode_value: Mode | None = Mode.DATACENTER
    data: DataSession | None = None
    router: ChannelRouter | None = None
    link_bps: float | None = None  # what a transport would have measured
    closed: bool = False

    def rtt_s(self) -> float | None:
        return 0.0002

    def path_rtt_s(self) -> float | None:
        return 0.0002

    def bandwidth_bps(self) -> float | None:
        return self.link_bps

    def link_hint_bps(self) -> float | None:
        return self.link_bps

    def wire_bytes(self) -> int:
        return 0

    async def wait_mode(self, timeout_s: float) -> Mode | None:
        return self.mode_value

    async def open_data(self) -> None:
        return None  # no transport here: only the direct path runs in-process

    async def accept_data(self, timeout_s: float) -> None:
        return None

    async def close(self) -> None:
        self.closed = True
        self.control.close()


@dataclass
class PipeLink:
    """Peer link of one host: sessions to another in-process service."""

    me: str
    services: dict[str, MigrationService] = field(default_factory=dict)
    addresses: dict[str, tuple[str, int]] = field(default_factory=dict)
    sessions: list[tuple[PipeChannel, PipeChannel]] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)  # nodes that cannot be reached right now
    link_bps: float | None = None  # announced to the source's steering (caps QEMU on the direct path)
    cut_after: str | None = None  # the next session breaks right after the source sends this message

    def address(self, node: str) -> tuple[str, int]:
        if node not in self.addresses:
            raise UnknownPeer(f"unknown peer {node!r}", node=node)
        return self.addresses[node]

    async def open(self, node: str, migration_id: str) -> PipeSession:
        self.address(node)
        if node in self.refuse or node not in self.services:
            raise OSError(f"cannot reach {node}")
        ours, theirs = channel_pair()
        ours.cut_after, self.cut_after = self.cut_after, None
        self.sessions.append((ours, theirs))
        service = self.services[node]
        asyncio.get_running_loop().create_task(service.handle_session(PipeSession(theirs), self.me))
        return PipeSession(ours, link_bps=self.link_bps)

    def cut_all(self, reason: str = "link cut") -> None:
        for ours, _ in self.sessions:
            ours.cut(reason)


@dataclass
class SimHost:
    name: str
    root: Path
    host: MigrationHost
    service: MigrationService
    link: PipeLink
    store: SqliteStore

    @property
    def driver(self) -> MigrationDriver:
        driver = self.host.driver
        assert isinstance(driver, MigrationDriver)
        return driver


@contextlib.asynccontextmanager
async def two_hosts(
    root: Path, config: MigrationConfig | None = None
) -> AsyncIterator[tuple[SimHost, SimHost]]:
    ca = create_ca("testdc")
    hosts: list[SimHost] = []
    for name in ("hosta", "hostb"):
        base = root / name
        base.mkdir(parents=True, exist_ok=True)
        store = SqliteStore(base / "store.db")
        host = MigrationHost(
            node=name,
            driver=MigrationDriver(base / "vms"),
            store=store,
            credentials=issue_node_cert(ca, name, "agent"),
            workdir=base / "migrations",
            artefact_cache=base / "artefacts",
            config=config or MigrationConfig(),
        )
        link = PipeLink(name)
        service = MigrationService(host, link, HostDataPaths(host))
        hosts.append(SimHost(name, base, host, service, link, store))
    a, b = hosts
    for x, y in ((a, b), (b, a)):
        x.link.services[y.name] = y.service
        x.link.addresses[y.name] = ("127.0.0.1", 0)
    try:
        yield a, b
    finally:
        for h in hosts:
            await h.service.close()
            for vm in h.driver.defined():
                with contextlib.suppress(Exception):
                    if (await h.driver.status(vm)).alive:
                        from novacron.hypervisor.driver import StopMode

                        await h.driver.stop(vm, mode=StopMode.FORCE)
            await h.store.close()


async def test_pipe_pair_carries_messages_and_eof() -> None:
    a, b = channel_pair()
    await a.send_message(b"one")
    assert await b.recv_message() == b"one"
    a.close()
    assert await b.recv_message() is None
    assert await b.recv_message() is None
