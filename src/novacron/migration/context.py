"""What a host gives its migrations: settings with named defaults, services, and how to reach peers.

:class:`MigrationHost` bundles the services one agent's migrations use (driver, inventory, store,
records, ownership, locks, credentials) and :class:`MigrationConfig` every limit and default. The
transport is reached through two small Protocols (:class:`PeerLink`, :class:`PeerSession`) so that the
orchestrator can be driven over the real AMST transport by the agent, or over an in-process channel
pair in tests; data paths come from a :class:`DataPathFactory`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from novacron.dwcp.mode import Mode
from novacron.hypervisor.qemu import QemuDriver
from novacron.migration.converge import SteeringConfig
from novacron.migration.datapath import (
    ChannelRouter,
    DataChannel,
    DataPathKind,
    DataSession,
    DestinationDataPath,
    SourceDataPath,
)
from novacron.migration.direct import DirectConfig
from novacron.migration.errors import MigrationInputError
from novacron.migration.phases import PhaseTimeouts
from novacron.migration.records import MigrationRecords
from novacron.security.pki import NodeCredentials
from novacron.store.base import KeyValueStore
from novacron.store.inventory import Inventory
from novacron.store.ownership import MigrationLocks, OwnershipRegistry

MAX_DOWNTIME_RANGE_MS = (1, 60_000)
DEADLINE_RANGE_S = (1.0, 24 * 3600.0)


@dataclass(frozen=True)
class MigrationConfig:
    """A host's migration settings. Times in seconds."""

    max_incoming: int = 2  # concurrent migrations into this host
    max_outgoing: int = 2  # concurrent migrations out of this host
    default_max_downtime_ms: int = 300
    default_deadline_s: float = 600.0
    allow_postcopy: bool = False  # the operator's policy; a request may only narrow it
    timeouts: PhaseTimeouts = field(default_factory=PhaseTimeouts)
    steering: SteeringConfig = field(default_factory=SteeringConfig)
    direct: DirectConfig = field(default_factory=DirectConfig)
    # Datacenter mode: QEMU straight to QEMU with its TLS, or through the agents as plain bytes.
    datacenter_path: DataPathKind = DataPathKind.DIRECT
    # Direct path outside the datacenter (no tunnel available, or forced): QEMU's zstd saves the link.
    direct_wan_compression: str = "zstd"
    sample_interval_s: float = 0.1  # query-migrate while migrating (steering reacts this fast)
    record_progress_every_s: float = 2.0  # progress snapshots written to the record
    mode_decision_s: float = 2.0  # wait at most this for the session's mode detector
    capacity_mib: int | None = None  # RAM this host gives VMs (None: from /proc/meminfo)
    # Use a boot file at the path the source names when its digest matches (else only shipped copies).
    trust_source_paths: bool = True
    verify_guest: bool = True  # test guests: their control channel must answer after resume
    guest_check_timeout_s: float = 10.0
    query_timeout_s: float = 10.0  # recovery: waiting for the peer's answer
    in_doubt_retry_s: float = 2.0  # in-doubt: ask the peer again this often (a retry period)

    def __post_init__(self) -> None:
        if self.max_incoming < 1 or self.max_outgoing < 1:
            raise MigrationInputError("migration concurrency limits must be at least 1", field="max_incoming")
        lo, hi = MAX_DOWNTIME_RANGE_MS
        if not lo <= self.default_max_downtime_ms <= hi:
            raise MigrationInputError("default max downtime out of range", field="default_max_downtime_ms")
        if not DEADLINE_RANGE_S[0] <= self.default_deadline_s <= DEADLINE_RANGE_S[1]:
            raise MigrationInputError("default deadline out of range", field="default_deadline_s")
        if self.sample_interval_s <= 0 or self.record_progress_every_s <= 0:
            raise MigrationInputError("sampling periods must be positive", field="sample_interval_s")


@dataclass(frozen=True)
class MigrationRequest:
    """What an operator asks for. ``mode`` None: the mode detector decides."""

    vm: str
    destination: str
    mode: Mode | None = None
    max_downtime_ms: int | None = None
    deadline_s: float | None = None
    allow_postcopy: bool = False
    data_path: DataPathKind | None = None  # None: chosen from the mode

    def __post_init__(self) -> None:
        if self.max_downtime_ms is not None:
            lo, hi = MAX_DOWNTIME_RANGE_MS
            if not lo <= self.max_downtime_ms <= hi:
                raise MigrationInputError(
                    f"max downtime must be {lo}..{hi} ms", field="max_downtime_ms", value=self.max_downtime_ms
                )
        if self.deadline_s is not None and not DEADLINE_RANGE_S[0] <= self.deadline_s <= DEADLINE_RANGE_S[1]:
            raise MigrationInputError(
                "deadline must be 1 s .. 24 h", field="deadline_s", value=self.deadline_s
            )


class PeerSession(Protocol):
    """One migration's session with the peer agent, as the orchestrator uses it."""

    control: DataChannel
    data: DataSession | None  # for the tunnel's source side (opens channels); None if unavailable
    router: ChannelRouter | None  # for the tunnel's destination side (accepts channels)

    def rtt_s(self) -> float | None: ...

    def path_rtt_s(self) -> float | None:
        """The path's propagation RTT (windowed minimum), for planning; None if unknown."""
        ...

    def bandwidth_bps(self) -> float | None:
        """Measured (or configured) path bandwidth, None if unknown."""
        ...

    def link_hint_bps(self) -> float | None:
        """The link rate the operator configured for this peer, None if not given. (What the session
        measures is useless for the direct path: only control messages cross the session then.)"""
        ...

    def wire_bytes(self) -> int:
        """Bytes this side sent on the session (acknowledged), all channels."""
        ...

    async def wait_mode(self, timeout_s: float) -> Mode | None: ...

    async def open_data(self) -> None:
        """Source: open the session the tunnel's data channels go on (sets ``data``)."""
        ...

    async def accept_data(self, timeout_s: float) -> None:
        """Destination: wait for the source's data session (sets ``router``)."""
        ...

    async def close(self) -> None: ...


class PeerLink(Protocol):
    """How a source reaches a destination agent."""

    def address(self, node: str) -> tuple[str, int]:
        """The peer's DWCP address (UnknownPeer if it is not configured)."""
        ...

    async def open(self, node: str, migration_id: str) -> PeerSession: ...


@dataclass(frozen=True)
class DataPathPlan:
    """How a migration's bytes travel: chosen by the source from the mode, sent in PREPARE."""

    kind: DataPathKind
    mode: Mode
    multifd_channels: int  # 0: one connection (post-copy needs that in QEMU 7.2)
    compression: str = "none"  # QEMU's multifd compression (direct path only)


class DataPathFactory(Protocol):
    def kinds(self) -> frozenset[DataPathKind]:
        """The data paths this host can run."""
        ...

    def source(
        self, plan: DataPathPlan, *, migration_id: str, vm: str, peer_node: str, peer_host: str,
        session: PeerSession,
    ) -> SourceDataPath: ...  # fmt: skip

    def destination(
        self, plan: DataPathPlan, *, migration_id: str, vm: str, session: PeerSession
    ) -> DestinationDataPath: ...


@dataclass
class MigrationHost:
    """The services of one host that its migrations (both roles) work with."""

    node: str
    driver: QemuDriver
    store: KeyValueStore
    credentials: NodeCredentials
    workdir: Path  # per-migration scratch (TLS directories), state_dir()/migrations
    artefact_cache: Path  # shipped boot files, by digest
    config: MigrationConfig = field(default_factory=MigrationConfig)
    shared_store: bool = False  # True when every host uses the same store (etcd)
    inventory: Inventory = field(init=False)
    records: MigrationRecords = field(init=False)
    ownership: OwnershipRegistry = field(init=False)
    locks: MigrationLocks = field(init=False)

    def __post_init__(self) -> None:
        self.inventory = Inventory(self.store)
        self.records = MigrationRecords(self.store)
        self.ownership = OwnershipRegistry(self.store)
        self.locks = MigrationLocks(self.store)
