"""Peers over DWCP: static peer addresses, and a migration's sessions on the AMST transport.

A migration uses up to two AMST sessions, both opened by the source agent (``connect_session``, mTLS,
the destination's node id expected in its certificate):

* the **control session** carries the ``migration-control`` channel only. Its messages are few and
  small but some sit on the downtime's critical path (COMPLETED: the source is paused, the
  destination may resume), so they must never queue behind megabytes of pages: AMST has no channel
  priorities, hence a session of their own;
* the **data session** (tunnel and pass-through paths only) starts with a ``migration-data`` channel
  whose label is the migration id, which tells the destination agent which migration it belongs to;
  the tunnel then opens its QEMU channels on it.

Each session's path monitor (one mode detector per session) judges the path; migration sessions use a
short warm-up so the first verdict comes within a fraction of a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from novacron.dwcp.handshake import ExpectedPeer
from novacron.dwcp.mode import Mode, ModeThresholds
from novacron.dwcp.transport import AmstSession, SessionOptions, connect_session
from novacron.errors import NovacronError
from novacron.migration.datapath import CHANNEL_CONTROL, ChannelRouter, DataChannel, DataSession
from novacron.migration.errors import MigrationError, UnknownPeer
from novacron.observability.log import log_event
from novacron.security.tls import TlsConfig

log = logging.getLogger("novacron.agent.peers")

CHANNEL_DATA = "migration-data"
MIN_RTT_SAMPLES = 3
MAX_PENDING_DATA_SESSIONS = 64  # data sessions waiting for their migration to claim them
DATA_SESSION_TTL_S = 120.0  # ... at most this long


@dataclass(frozen=True)
class Peer:
    node: str
    host: str
    port: int
    link_bps: float | None = None


@dataclass
class _Pending:
    amst: AmstSession
    router: ChannelRouter
    peer: str
    at: float


class DataSessions:
    """Destination side: data sessions that arrived, by migration id, until their migration takes them."""

    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}
        self._arrived = asyncio.Condition()

    async def offer(self, migration_id: str, amst: AmstSession, router: ChannelRouter, peer: str) -> None:
        now = time.monotonic()
        for mid, old in list(self._pending.items()):
            if now - old.at > DATA_SESSION_TTL_S or mid == migration_id:
                del self._pending[mid]
                await old.router.close()
                old.amst.abort("data session not claimed")
        if len(self._pending) >= MAX_PENDING_DATA_SESSIONS:
            await router.close()
            amst.abort("too many unclaimed data sessions")
            return
        async with self._arrived:
            self._pending[migration_id] = _Pending(amst, router, peer, now)
            self._arrived.notify_all()

    async def take(self, migration_id: str, peer: str, timeout_s: float) -> tuple[AmstSession, ChannelRouter]:
        async with self._arrived:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._arrived.wait_for(lambda: migration_id in self._pending)
            except TimeoutError:
                raise MigrationError(
                    "the source's data session did not arrive", migration=migration_id, peer=peer
                ) from None
            entry = self._pending.pop(migration_id)
        if entry.peer != peer:
            await entry.router.close()
            entry.amst.abort("data session from another node")
            raise MigrationError(
                "data session opened by another node", migration=migration_id, peer=entry.peer
            )
        return entry.amst, entry.router


TRANSPORT_SAMPLE_SLACK_S = 0.02  # after the transport's sample timer is due, until it has run


class AmstPeerSession:
    """A migration's sessions as the orchestrator sees them (the PeerSession Protocol)."""

    def __init__(
        self,
        amst: AmstSession,
        control: DataChannel,
        *,
        peer: str,
        migration_id: str = "",
        link_bps: float | None = None,
        links: StaticPeers | None = None,
        data_sessions: DataSessions | None = None,
        router: ChannelRouter | None = None,
    ) -> None:
        self.amst = amst
        self.control: DataChannel = control
        self.peer = peer
        self.migration_id = migration_id
        self.data: DataSession | None = None
        self.data_amst: AmstSession | None = None
        self.router: ChannelRouter | None = None
        self._control_router = router
        self._link_bps = link_bps
        self._links = links
        self._data_sessions = data_sessions
        self._loop = asyncio.get_running_loop()

    def rtt_s(self) -> float | None:
        return self.amst.metrics().rtt_s

    def path_rtt_s(self) -> float | None:
        """The path's propagation round trip: the detector's windowed minimum (kernel and ping
        samples), which a busy host's event loop does not inflate; the smoothed RTT before it has one."""
        m = self.amst.metrics()
        return m.min_rtt_s if m.min_rtt_s is not None else m.rtt_s

    def bandwidth_bps(self) -> float | None:
        if self._link_bps is not None:
            return self._link_bps
        measured = self.data_amst or self.amst
        return measured.monitor.rate_estimate(self._loop.time())

    def link_hint_bps(self) -> float | None:
        return self._link_bps

    def wire_bytes(self) -> int:
        return sum(s.metrics().bytes_sent for s in (self.amst, self.data_amst) if s is not None)

    async def wait_mode(self, timeout_s: float) -> Mode | None:
        """The detector's decision, or before it what its RTT samples say once it has enough of them
        and the transport has read its streams' ``TCP_INFO`` once (``ModeDetector.verdict_so_far``),
        waiting at most ``timeout_s``; None if no verdict came in time.

        A plan needs the RTT class, not the detector's settled verdict (which waits seconds for
        goodput or ``warmup_s``): waiting for that cost every migration up to ``timeout_s``. The
        kernel's RTT matters because application-level pings on a host busy with a guest overstate
        a LAN's RTT many times (8.6 ms measured over a veth pair)."""
        loop = self._loop
        deadline = loop.time() + timeout_s
        detector, monitor = self.amst.monitor.detector, self.amst.monitor
        # The kernel's RTT of every stream now, rather than at the transport's first sample timer
        # (up to ``sample_interval_s`` away): it was half a second of every migration's prepare.
        kernel_read = bool(monitor.last_sample is not None or detector.decided or self.amst.read_kernel_rtt())
        if detector.verdict_so_far(loop.time()) is None:
            ready = asyncio.Event()

            def check() -> None:
                if detector.verdict_so_far(loop.time()) is not None:
                    ready.set()

            unwatch = detector.watch(check)
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ready.wait(), max(deadline - loop.time(), 0.0))
            finally:
                unwatch()
        if not kernel_read and monitor.last_sample is None and not detector.decided:
            # No stream to read yet: the first sample is due at the timer, which the session runs
            # itself; waiting past it is enough (bounded by the deadline).
            due = min(monitor.get_timer() + TRANSPORT_SAMPLE_SLACK_S, deadline)
            await asyncio.sleep(max(due - loop.time(), 0.0))
        return detector.verdict_so_far(loop.time())

    async def open_data(self) -> None:
        """Source: open the data session (tunnel paths)."""
        if self.data_amst is not None or self._links is None:
            return
        self.data_amst = await self._links.connect(self.peer)
        marker = self.data_amst.open_channel(CHANNEL_DATA, label=self.migration_id)
        marker.close()
        self.data = self.data_amst

    async def accept_data(self, timeout_s: float) -> None:
        """Destination: wait for the source's data session of this migration."""
        if self.router is not None or self._data_sessions is None:
            return
        self.data_amst, self.router = await self._data_sessions.take(self.migration_id, self.peer, timeout_s)

    async def close(self) -> None:
        for router in (self.router, self._control_router):
            if router is not None:
                await router.close()
        for amst in (self.data_amst, self.amst):
            if amst is not None:
                with contextlib.suppress(NovacronError, OSError):
                    await amst.close("migration ended")


def session_options(warmup_s: float, link_bps: float | None = None) -> SessionOptions:
    return SessionOptions(
        thresholds=ModeThresholds(warmup_s=warmup_s, min_rtt_samples=MIN_RTT_SAMPLES),
        link_bps=link_bps,
    )


class StaticPeers:
    """The PeerLink of an agent with statically configured peers."""

    def __init__(self, peers: dict[str, Peer], tls: TlsConfig, *, warmup_s: float = 0.5) -> None:
        self.peers = peers
        self.tls = tls
        self.warmup_s = warmup_s

    def peer(self, node: str) -> Peer:
        peer = self.peers.get(node)
        if peer is None:
            raise UnknownPeer(
                f"{node!r} is not a peer of this agent",
                node=node,
                known=",".join(sorted(self.peers)) or "none",
            )
        return peer

    def address(self, node: str) -> tuple[str, int]:
        peer = self.peer(node)
        return peer.host, peer.port

    async def connect(self, node: str) -> AmstSession:
        peer = self.peer(node)
        return await connect_session(
            peer.host,
            peer.port,
            self.tls,
            expect=ExpectedPeer(node_id=node),
            options=session_options(self.warmup_s, peer.link_bps),
        )

    async def open(self, node: str, migration_id: str) -> AmstPeerSession:
        peer = self.peer(node)
        amst = await self.connect(node)
        try:
            control = amst.open_channel(CHANNEL_CONTROL, label=migration_id)
        except BaseException:
            amst.abort("could not open the control channel")
            raise
        log_event(log, "agent.session_opened", peer=node, migration=migration_id, mode=str(amst.mode))
        return AmstPeerSession(
            amst, control, peer=node, migration_id=migration_id, link_bps=peer.link_bps, links=self
        )


MAX_REGISTRY_PEERS = 4096


class ClusterPeers(StaticPeers):
    """Static peers plus the peers the registry names (heartbeat answers). A static entry wins over
    the registry's for the same node (it may carry a link rate); nodes that left the registry are
    forgotten. A peer's address is only a hint: the DWCP handshake checks its certificate."""

    def __init__(self, static: dict[str, Peer], tls: TlsConfig, *, warmup_s: float = 0.5) -> None:
        super().__init__(dict(static), tls, warmup_s=warmup_s)
        self.static = dict(static)

    def update_from_registry(self, addresses: dict[str, str], *, own: str) -> None:
        learned: dict[str, Peer] = {}
        for node, address in list(addresses.items())[:MAX_REGISTRY_PEERS]:
            if node == own or node in self.static:
                continue
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                log_event(log, "agent.registry_peer_invalid", logging.WARNING, node=node, address=address)
                continue
            learned[node] = Peer(node, host.strip("[]"), int(port))
        changed = {n for n in learned if self.peers.get(n) != learned[n]}
        gone = set(self.peers) - set(self.static) - set(learned)
        self.peers = {**learned, **self.static}
        if changed or gone:
            log_event(log, "agent.peers_updated", learned=",".join(sorted(changed)) or None,
                      forgotten=",".join(sorted(gone)) or None, peers=len(self.peers))  # fmt: skip
