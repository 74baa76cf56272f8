"""The agent: one asyncio service per host.

It owns this host's QEMU processes (the driver), its store, its DWCP listener (mTLS; AMST sessions
from peers), its migrations (``MigrationService``) and its REST API (unix socket, and TCP if
configured), with the migration and node routes mounted next to the VM routes.

Start order: configuration checks (identity of the certificate = the configured node id), store,
driver, recovery of unfinished migrations (before anything new is accepted), DWCP listener, API.
Stop (SIGTERM/SIGINT): stop accepting, cancel migrations that can still roll back and wait (bounded)
for the others, close the listener and the API, close the store. QEMU processes keep running: a
restarted agent re-attaches to them and settles what was in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from novacron import __version__
from novacron.agent.config import AgentConfig, AgentConfigError, parse_address
from novacron.agent.peers import (
    CHANNEL_DATA,
    AmstPeerSession,
    ClusterPeers,
    DataSessions,
    Peer,
    session_options,
)
from novacron.api.app import build_services, create_app
from novacron.api.deps import ApiServices
from novacron.api.routes import migrations as migration_routes
from novacron.api.server import BoundListeners, Listen, TlsFiles, running_api
from novacron.cluster.calls import MtlsCaller
from novacron.cluster.control import ControlPlane
from novacron.cluster.errors import NodeConflict
from novacron.cluster.jointokens import JoinTokenStore
from novacron.cluster.membership import Membership
from novacron.cluster.registry import NodeRegistry
from novacron.dwcp.encoding import ArenaPool, BaselineStore, DefaultPageHasher, HdeLimits
from novacron.dwcp.transport import AmstListener, AmstSession
from novacron.errors import NovacronError
from novacron.migration.context import MigrationConfig, MigrationHost
from novacron.migration.converge import SteeringConfig
from novacron.migration.datapath import CHANNEL_CONTROL, ChannelRouter, DataPathKind
from novacron.migration.direct import DirectConfig
from novacron.migration.paths import HostDataPaths
from novacron.migration.phases import PhaseTimeouts
from novacron.migration.qemu import MigrationDriver
from novacron.migration.service import MigrationService
from novacron.migration.tunnel.siblings import SiblingStats
from novacron.observability.log import log_event
from novacron.security.pki import load_ca, load_identity
from novacron.security.tls import TlsConfig
from novacron.store.base import KeyValueStore
from novacron.store.sqlite import SqliteStore

log = logging.getLogger("novacron.agent")

CLUSTER_KEY_BYTES = 32
FIRST_CHANNEL_TIMEOUT_S = 10.0  # a peer's new session must say what it is for within this time
MAX_SESSION_HANDLERS = 64  # concurrent incoming sessions being served


class AgentError(NovacronError):
    """The agent cannot start or run (listener, store, identity)."""


def migration_config(cfg: AgentConfig) -> MigrationConfig:
    m = cfg.migration
    host, _ = parse_address(f"{m.direct_listen}:0", "direct_listen")
    return MigrationConfig(
        max_incoming=m.max_incoming,
        max_outgoing=m.max_outgoing,
        default_max_downtime_ms=m.max_downtime_ms,
        default_deadline_s=m.deadline_s,
        allow_postcopy=m.allow_postcopy,
        timeouts=PhaseTimeouts(deadline_s=m.deadline_s, **m.timeouts.model_dump()),
        steering=SteeringConfig(),
        direct=DirectConfig(
            multifd_channels=m.multifd_channels, compression=m.direct_compression, listen_host=host
        ),
        datacenter_path=DataPathKind(m.datacenter_path),
        direct_wan_compression=m.direct_wan_compression,
        capacity_mib=m.capacity_mib,
        trust_source_paths=m.trust_source_paths,
    )


async def _warm_arenas(pool: ArenaPool) -> None:
    """Fault the kept HDE session caches in now, off the event loop, rather than during a migration."""
    started = time.monotonic()
    while await asyncio.to_thread(pool.warm_one):
        pass
    held, _ = pool.sizes
    log_event(log, "agent.cache_arenas_warm", arenas=held, seconds=round(time.monotonic() - started, 2))


def read_cluster_key(path: Path) -> bytes | None:
    """The 32-byte cluster key (raw or hex), None if the file does not exist."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AgentConfigError("cannot read the cluster key", file=str(path), reason=exc.strerror) from None
    if path.stat().st_mode & 0o077:
        raise AgentConfigError(
            "the cluster key file must not be readable by others (chmod 600)", file=str(path)
        )
    text = raw.strip()
    if len(raw) == CLUSTER_KEY_BYTES:
        return raw
    try:
        key = bytes.fromhex(text.decode())
    except ValueError:
        key = b""
    if len(key) != CLUSTER_KEY_BYTES:
        raise AgentConfigError("the cluster key must be 32 bytes (raw, or 64 hex digits)", file=str(path))
    return key


def write_cluster_key(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(os.urandom(CLUSTER_KEY_BYTES).hex() + "\n")
    return path


@dataclass(frozen=True)
class AgentInfo:
    node: str
    cluster: str
    version: str
    dwcp: tuple[str, int]
    peers: dict[str, str]
    data_paths: list[str]
    started_at: float


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.store: KeyValueStore | None = None
        self.tls: TlsConfig | None = None
        self.peers: ClusterPeers | None = None
        self.sibling_stats: Callable[[], Mapping[str, SiblingStats]] | None = None
        self.services: ApiServices | None = None
        self.control: ControlPlane | None = None
        self.membership: Membership | None = None
        self.service: MigrationService | None = None
        self.listener: AmstListener | None = None
        self.info: AgentInfo | None = None
        self.api: BoundListeners | None = None
        self._stack = contextlib.AsyncExitStack()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._handlers = asyncio.Semaphore(MAX_SESSION_HANDLERS)
        self.data_sessions = DataSessions()

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise

    async def _start(self) -> None:
        cfg = self.config
        state = cfg.state_dir
        state.mkdir(parents=True, exist_ok=True)
        creds = load_identity(cfg.pki)
        if creds.identity.node_id != cfg.node_id:
            raise AgentConfigError(
                "the node certificate is for another node", field="node_id",
                configured=cfg.node_id, certificate=creds.identity.node_id,
            )  # fmt: skip
        tls = TlsConfig(creds)
        self.tls = tls
        self.store = open_store(cfg)
        driver = MigrationDriver(state / "vms", accel_cache=state / "accel-probe.json")
        host = MigrationHost(
            node=cfg.node_id,
            driver=driver,
            store=self.store,
            credentials=creds,
            workdir=state / "migrations",
            artefact_cache=state / "artefacts",
            config=migration_config(cfg),
        )
        key = read_cluster_key(cfg.cluster_key_path)
        baseline = BaselineStore(state / "baseline", DefaultPageHasher(key)) if key is not None else None
        if key is None:
            log_event(log, "agent.no_cluster_key", logging.WARNING, file=str(cfg.cluster_key_path),
                      effect="the HDE tunnel is off; internet mode uses the direct path")  # fmt: skip
        arenas = None
        if key is not None and cfg.migration.warm_cache_arenas:
            arenas = ArenaPool(HdeLimits().session_pages, keep=cfg.migration.warm_cache_arenas)
            self._spawn(_warm_arenas(arenas), "warm-arenas")
        paths = HostDataPaths(
            host,
            cluster_key=key,
            baseline=baseline,
            corrupt_batch=cfg.testing.corrupt_hde_batch,
            arenas=arenas,
        )
        static = {
            node: Peer(node, *p.host_port, link_bps=p.link_mbit * 1e6 if p.link_mbit else None)
            for node, p in cfg.peers.items()
        }
        peers = ClusterPeers(static, tls, warmup_s=cfg.migration.mode_warmup_s)
        self.peers = peers
        self.service = MigrationService(host, peers, paths)
        await self.service.recover()
        if baseline is not None:
            # Local siblings (same image) as HDE baseline, indexed in the background (docs/tunnel.md).
            from novacron.migration.tunnel.siblings import SiblingIndexer, host_siblings  # noqa: PLC0415

            service = self.service
            indexer = SiblingIndexer(
                baseline,
                host_siblings(driver, host.inventory, cfg.node_id),
                busy=lambda: bool(service.active_vms()),
            )
            self._spawn(indexer.run(), "sibling-index")
            self.sibling_stats = indexer.stats

        dwcp_host, dwcp_port = parse_address(cfg.listen.dwcp)
        self.listener = AmstListener(tls, options=session_options(cfg.migration.mode_warmup_s))
        bound = await self.listener.start(dwcp_host, dwcp_port)
        self._spawn(self._accept_loop(), "dwcp-accept")

        services = build_services(self.store, driver, node=cfg.node_id, backend=cfg.store.backend)
        self.services = services
        app = create_app(services, extra_routers=migration_routes.ROUTERS)
        app.state.migrations = self.service
        if cfg.cluster is not None and cfg.cluster.is_control:
            self.control = await self._control_plane(services.store, key)
            app.state.control = self.control
        self.info = AgentInfo(
            node=cfg.node_id,
            cluster=creds.identity.cluster_id,
            version=__version__,
            dwcp=bound,
            peers={n: p.address for n, p in cfg.peers.items()},
            data_paths=sorted(str(k) for k in paths.kinds()),
            started_at=time.time(),
        )
        app.state.agent_info = self.info
        app.state.sibling_stats = self.sibling_stats
        listen = Listen(unix=cfg.api_socket)
        if cfg.listen.api_tcp is not None:
            tcp_host, tcp_port = parse_address(cfg.listen.api_tcp)
            tls_files = (
                TlsFiles(cfg.listen.api_tls_cert, cfg.listen.api_tls_key)
                if cfg.listen.api_tls_cert is not None and cfg.listen.api_tls_key is not None
                else None
            )
            listen = Listen(unix=cfg.api_socket, tcp_host=tcp_host, tcp_port=tcp_port, tls=tls_files)
        if cfg.cluster is not None:
            node_host, node_port = parse_address(cfg.cluster.node_listen, "cluster.node_listen")
            listen = dataclasses.replace(
                listen, node_tcp_host=node_host, node_tcp_port=node_port, node_tls=tls
            )
        self.api = await self._stack.enter_async_context(running_api(app, listen))
        if cfg.cluster is not None:
            self.membership = Membership(
                cfg, node_port=self.api.node_port or 0, dwcp_port=bound[1], services=services,
                peers=peers, caller=MtlsCaller(tls), control=self.control,
            )  # fmt: skip
            await self.membership.beat_once()  # registered (or the failure logged) before agent.ready
            self._spawn(self.membership.run(), "heartbeat")
        log_event(
            log,
            "agent.ready",
            node=cfg.node_id,
            dwcp=f"{bound[0]}:{bound[1]}",
            api=str(cfg.api_socket),
            api_tcp_port=self.api.tcp_port,
            data_paths=",".join(self.info.data_paths),
            pid=os.getpid(),
        )

    async def _control_plane(self, store: KeyValueStore, key: bytes | None) -> ControlPlane:
        cfg = self.config
        try:
            ca = load_ca(cfg.pki)
        except NovacronError as exc:
            raise AgentConfigError(
                "a control node needs the cluster CA (ca.pem, ca.key) in its pki directory",
                field="cluster.roles", pki_dir=str(cfg.pki), reason=exc.message,
            ) from None  # fmt: skip
        if self.tls is None:
            raise AgentError("TLS credentials not loaded")
        registry = NodeRegistry(store)
        control = ControlPlane(
            node=cfg.node_id,
            registry=registry,
            join_tokens=JoinTokenStore(store),
            caller=MtlsCaller(self.tls),
            ca=ca,
            cluster_key=key,
            store_info={"backend": cfg.store.backend, "endpoints": list(cfg.store.endpoints)},
        )
        with contextlib.suppress(NodeConflict):
            await registry.admit(cfg.node_id)
        return control

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self) -> None:
        listener = self.listener
        if listener is None:
            return
        while True:
            try:
                session = await listener.accept()
            except NovacronError as exc:
                log_event(log, "agent.accept_stopped", reason=str(exc))
                return
            self._spawn(self._serve(session), f"session-{session.info.name}")

    async def _serve(self, amst: AmstSession) -> None:
        """A peer opened a session: a migration's control session, or its data session."""
        peer = amst.info.peer
        router = ChannelRouter(amst)
        async with self._handlers:
            first = {
                asyncio.ensure_future(
                    router.accept(CHANNEL_CONTROL, FIRST_CHANNEL_TIMEOUT_S)
                ): CHANNEL_CONTROL,
                asyncio.ensure_future(router.accept(CHANNEL_DATA, FIRST_CHANNEL_TIMEOUT_S)): CHANNEL_DATA,
            }
            done, pending = await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            channel = None
            for task in done:
                with contextlib.suppress(NovacronError):
                    channel = task.result()
            if channel is None or self.service is None:
                log_event(log, "agent.session_without_purpose", logging.WARNING, peer=str(peer))
                await router.close()
                amst.abort("no control or data channel")
                return
            if channel.kind == CHANNEL_DATA:
                await self.data_sessions.offer(channel.label or "", amst, router, peer.node_id)
                return
            session = AmstPeerSession(
                amst,
                channel,
                peer=peer.node_id,
                migration_id=channel.label or "",
                data_sessions=self.data_sessions,
                router=router,
            )
            try:
                await self.service.handle_session(session, peer.node_id)
            except (NovacronError, OSError) as exc:
                log_event(log, "agent.session_failed", logging.WARNING, peer=peer.node_id, error=str(exc))
                await session.close()

    async def close(self) -> None:
        log_event(log, "agent.stopping", node=self.config.node_id)
        if self.control is not None:
            await self.control.close()
        if self.service is not None:
            await self.service.close()
        if self.listener is not None:
            await self.listener.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, NovacronError, OSError):
                await task
        with contextlib.suppress(NovacronError, OSError):
            await self._stack.aclose()
        if self.store is not None:
            await self.store.close()
            self.store = None
        log_event(log, "agent.stopped", node=self.config.node_id)


def open_store(cfg: AgentConfig) -> KeyValueStore:
    if cfg.store.backend == "etcd":
        from novacron.store.etcd import EtcdStore  # noqa: PLC0415 - grpc loads only when used

        return EtcdStore(cfg.store.endpoints)
    return SqliteStore(cfg.state_dir / "store.db")


async def run_agent(config: AgentConfig, stop: asyncio.Event) -> None:
    """Run until ``stop`` is set (the CLI sets it on SIGTERM/SIGINT)."""
    agent = Agent(config)
    await agent.start()
    try:
        await stop.wait()
    finally:
        await agent.close()
