"""Every NovaCron metric, defined once on one registry that other modules import and update.

``/metrics`` (the API) renders :data:`REGISTRY`. Label values are bounded sets (modes, outcomes,
route templates, error class names, store operations), never VM names or peer addresses, so the number
of series stays small whatever the cluster does. Helpers check labels that come from callers, so a
typo fails loudly in tests instead of creating a stray series.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Final, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from novacron.errors import UserError
from novacron.store.base import (
    MAX_RANGE_RESULTS,
    NO_LEASE,
    Compare,
    Entry,
    KeyValueStore,
    Lease,
    Op,
    TxnResult,
)

T = TypeVar("T")

REGISTRY: Final = CollectorRegistry(auto_describe=True)

MODES: Final = ("datacenter", "hybrid", "internet")
MIGRATION_OUTCOMES: Final = ("completed", "failed", "cancelled", "rolled_back")
STORE_OPS: Final = (
    "get", "put", "delete", "range", "txn", "revision",
    "lease_grant", "lease_keepalive", "lease_revoke", "lease_ttl",
)  # fmt: skip
UNMATCHED_ROUTE: Final = "<unmatched>"

# Buckets: migrations run from under a second (small VM, datacenter) to many minutes (internet).
_MIGRATION_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600)
_DOWNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)
_RATIO_BUCKETS = (1, 1.25, 1.5, 2, 3, 5, 10, 20, 50, 100)
_API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)
_STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)

# ----- migrations -----
MIGRATION_DURATION = Histogram(
    "novacron_migration_duration_seconds",
    "Wall time of a live migration from start to commit or rollback.",
    ["mode", "outcome"],
    buckets=_MIGRATION_BUCKETS,
    registry=REGISTRY,
)
MIGRATION_DOWNTIME = Histogram(
    "novacron_migration_downtime_seconds",
    "Time the guest was paused at switchover.",
    ["mode"],
    buckets=_DOWNTIME_BUCKETS,
    registry=REGISTRY,
)
MIGRATIONS = Counter(
    "novacron_migrations_total", "Finished migrations by mode and outcome.", ["mode", "outcome"],
    registry=REGISTRY,
)  # fmt: skip
MIGRATION_BYTES_RAW = Counter(
    "novacron_migration_bytes_raw_total",
    "Bytes of migration stream produced by QEMU (before DWCP encoding).",
    ["mode"],
    registry=REGISTRY,
)
MIGRATION_BYTES_WIRE = Counter(
    "novacron_migration_bytes_wire_total",
    "Bytes DWCP put on the wire for migrations (after encoding, before TLS).",
    ["mode"],
    registry=REGISTRY,
)
COMPRESSION_RATIO = Histogram(
    "novacron_migration_compression_ratio",
    "Raw bytes divided by wire bytes, per finished migration.",
    ["mode"],
    buckets=_RATIO_BUCKETS,
    registry=REGISTRY,
)

# ----- DWCP mode -----
SESSION_MODE = Gauge(
    "novacron_dwcp_sessions", "Open DWCP sessions by current mode.", ["mode"], registry=REGISTRY
)
MODE_SWITCHES = Counter(
    "novacron_dwcp_mode_switches_total",
    "Mode changes decided by the mode detector.",
    ["from_mode", "to_mode"],
    registry=REGISTRY,
)

# ----- errors -----
ERRORS = Counter(
    "novacron_errors_total",
    "Errors by subsystem and type (the exception class name).",
    ["subsystem", "type"],
    registry=REGISTRY,
)

# ----- API -----
API_LATENCY = Histogram(
    "novacron_api_request_duration_seconds",
    "API request latency by method, route template and status class.",
    ["method", "route", "status"],
    buckets=_API_BUCKETS,
    registry=REGISTRY,
)
API_RATE_LIMITED = Counter(
    "novacron_api_rate_limited_total",
    "Requests answered 429, by what the limit was keyed on (token or address).",
    ["keyed_by"],
    registry=REGISTRY,
)
AUDIT_FAILURES = Counter(
    "novacron_audit_append_failures_total",
    "Audit records that could not be written to the store (they go to the error log instead).",
    registry=REGISTRY,
)

# ----- store -----
STORE_LATENCY = Histogram(
    "novacron_store_operation_duration_seconds",
    "State store operation latency by backend and operation.",
    ["backend", "op"],
    buckets=_STORE_BUCKETS,
    registry=REGISTRY,
)
STORE_ERRORS = Counter(
    "novacron_store_errors_total",
    "State store operations that raised, by backend, operation and error type.",
    ["backend", "op", "type"],
    registry=REGISTRY,
)

# ----- cluster -----
DRAIN_MOVES = Counter(
    "novacron_cluster_drain_moves_total",
    "Drain moves (live migrations started by a drain) by result: done, retried, failed.",
    ["result"],
    registry=REGISTRY,
)
HEARTBEATS = Counter(
    "novacron_cluster_heartbeats_total",
    "Heartbeats an agent sent, by result (ok: a control node took it).",
    ["result"],
    registry=REGISTRY,
)

_SUBSYSTEMS: Final = frozenset(
    {"api", "store", "migration", "dwcp", "hypervisor", "guest", "placement", "security", "agent", "cluster"}
)


class MetricLabelError(UserError):
    """A metric was updated with a label value outside its fixed set (a programming error)."""


def _check(value: str, allowed: Sequence[str] | frozenset[str], label: str) -> str:
    if value not in allowed:
        raise MetricLabelError(
            f"unknown {label} {value!r} for a metric", label=label, value=value, allowed=",".join(allowed)
        )
    return value


def observe_migration(
    mode: str,
    outcome: str,
    *,
    duration_s: float,
    bytes_raw: int,
    bytes_wire: int,
    downtime_s: float | None = None,
) -> None:
    """Record one finished migration (the orchestrator calls this once per migration)."""
    _check(mode, MODES, "mode")
    _check(outcome, MIGRATION_OUTCOMES, "outcome")
    MIGRATION_DURATION.labels(mode, outcome).observe(duration_s)
    MIGRATIONS.labels(mode, outcome).inc()
    MIGRATION_BYTES_RAW.labels(mode).inc(bytes_raw)
    MIGRATION_BYTES_WIRE.labels(mode).inc(bytes_wire)
    if bytes_wire > 0 and bytes_raw > 0:
        COMPRESSION_RATIO.labels(mode).observe(bytes_raw / bytes_wire)
    if downtime_s is not None:
        MIGRATION_DOWNTIME.labels(mode).observe(downtime_s)


def session_opened(mode: str) -> None:
    SESSION_MODE.labels(_check(mode, MODES, "mode")).inc()


def session_closed(mode: str) -> None:
    SESSION_MODE.labels(_check(mode, MODES, "mode")).dec()


def mode_switched(old: str, new: str) -> None:
    """A session moved from ``old`` to ``new`` mode: count the switch and move it between gauges."""
    _check(old, MODES, "mode")
    _check(new, MODES, "mode")
    MODE_SWITCHES.labels(old, new).inc()
    SESSION_MODE.labels(old).dec()
    SESSION_MODE.labels(new).inc()


def count_error(subsystem: str, error: BaseException | str) -> None:
    """Count an error by subsystem and type name (exception classes are a bounded set)."""
    _check(subsystem, _SUBSYSTEMS, "subsystem")
    name = error if isinstance(error, str) else type(error).__name__
    ERRORS.labels(subsystem, name).inc()


def observe_api_request(method: str, route: str, status: int, seconds: float) -> None:
    API_LATENCY.labels(method, route, f"{status // 100}xx").observe(seconds)


def render() -> tuple[bytes, str]:
    """The registry in Prometheus text format, with its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class TimedStore:
    """A KeyValueStore that records the latency and errors of every call to the store it wraps."""

    def __init__(self, inner: KeyValueStore, backend: str) -> None:
        self.inner = inner
        self.backend = backend

    async def _timed(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        start = time.perf_counter()
        try:
            return await call()
        except Exception as exc:
            STORE_ERRORS.labels(self.backend, op, type(exc).__name__).inc()
            raise
        finally:
            STORE_LATENCY.labels(self.backend, op).observe(time.perf_counter() - start)

    async def get(self, key: str) -> Entry | None:
        return await self._timed("get", lambda: self.inner.get(key))

    async def put(
        self, key: str, value: bytes, *, expect_revision: int | None = None, lease: int = NO_LEASE
    ) -> int:
        return await self._timed(
            "put", lambda: self.inner.put(key, value, expect_revision=expect_revision, lease=lease)
        )

    async def delete(self, key: str, *, expect_revision: int | None = None) -> bool:
        return await self._timed("delete", lambda: self.inner.delete(key, expect_revision=expect_revision))

    async def range(self, prefix: str, *, limit: int = MAX_RANGE_RESULTS) -> list[Entry]:
        return await self._timed("range", lambda: self.inner.range(prefix, limit=limit))

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        return await self._timed("txn", lambda: self.inner.txn(compares, success, failure))

    async def revision(self) -> int:
        return await self._timed("revision", self.inner.revision)

    async def lease_grant(self, ttl: int) -> Lease:
        return await self._timed("lease_grant", lambda: self.inner.lease_grant(ttl))

    async def lease_keepalive(self, lease_id: int) -> int:
        return await self._timed("lease_keepalive", lambda: self.inner.lease_keepalive(lease_id))

    async def lease_revoke(self, lease_id: int) -> None:
        await self._timed("lease_revoke", lambda: self.inner.lease_revoke(lease_id))

    async def lease_ttl(self, lease_id: int) -> int | None:
        return await self._timed("lease_ttl", lambda: self.inner.lease_ttl(lease_id))

    async def close(self) -> None:
        await self.inner.close()


@asynccontextmanager
async def timed(histogram: Histogram, *labels: str) -> AsyncIterator[None]:
    """Observe the wall time of a block into ``histogram`` with ``labels``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        histogram.labels(*labels).observe(time.perf_counter() - start)


# ==================================================================================================
# DWCP transport (AMST). Added by the transport (issue 4); updated only through
# novacron.dwcp.transport.metrics.PrometheusObserver. Label values are fixed sets.
# ==================================================================================================
TRANSPORT_DIRECTIONS: Final = ("sent", "received")
TRANSPORT_LOSS_CAUSES: Final = ("reset", "closed", "stalled", "protocol")
_RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5)

TRANSPORT_BYTES = Counter(
    "novacron_dwcp_transport_bytes_total",
    "Application bytes carried by AMST: acknowledged by the peer (sent) or delivered in order (received).",
    ["direction"],
    registry=REGISTRY,
)
TRANSPORT_GOODPUT = Gauge(
    "novacron_dwcp_goodput_bits_per_second",
    "Latest goodput sample of every open AMST session, summed, by direction.",
    ["direction"],
    registry=REGISTRY,
)
TRANSPORT_RTT = Histogram(
    "novacron_dwcp_rtt_seconds",
    "Round-trip times measured by AMST with PING/PONG frames.",
    buckets=_RTT_BUCKETS,
    registry=REGISTRY,
)
TRANSPORT_STREAMS = Gauge(
    "novacron_dwcp_streams", "Live TCP/TLS streams of all open AMST sessions.", registry=REGISTRY
)
TRANSPORT_STREAM_FAILURES = Counter(
    "novacron_dwcp_stream_failures_total",
    "AMST streams lost mid-session, by cause (reset, closed, stalled, protocol).",
    ["cause"],
    registry=REGISTRY,
)
TRANSPORT_CHUNKS_RETRANSMITTED = Counter(
    "novacron_dwcp_chunks_retransmitted_total",
    "Chunks resent on another stream because the stream that carried them was lost.",
    registry=REGISTRY,
)
TRANSPORT_TCP_RETRANSMITS = Counter(
    "novacron_dwcp_tcp_retransmits_total",
    "TCP segments the kernel retransmitted on AMST streams (from TCP_INFO).",
    registry=REGISTRY,
)
TRANSPORT_STREAM_TARGET_CHANGES = Counter(
    "novacron_dwcp_stream_target_changes_total",
    "Stream-count controller decisions, by direction (up, down).",
    ["direction"],
    registry=REGISTRY,
)


def check_transport_direction(direction: str) -> str:
    return _check(direction, TRANSPORT_DIRECTIONS, "direction")


def check_loss_cause(cause: str) -> str:
    return _check(cause, TRANSPORT_LOSS_CAUSES, "cause")


__all__ = [
    "API_LATENCY",
    "API_RATE_LIMITED",
    "AUDIT_FAILURES",
    "COMPRESSION_RATIO",
    "ERRORS",
    "MIGRATIONS",
    "MIGRATION_BYTES_RAW",
    "MIGRATION_BYTES_WIRE",
    "MIGRATION_DOWNTIME",
    "MIGRATION_DURATION",
    "MIGRATION_OUTCOMES",
    "MODES",
    "MODE_SWITCHES",
    "REGISTRY",
    "SESSION_MODE",
    "STORE_ERRORS",
    "STORE_LATENCY",
    "STORE_OPS",
    "UNMATCHED_ROUTE",
    "MetricLabelError",
    "TimedStore",
    "count_error",
    "mode_switched",
    "observe_api_request",
    "observe_migration",
    "render",
    "session_closed",
    "session_opened",
    "timed",
]
__all__ += [
    "TRANSPORT_BYTES",
    "TRANSPORT_CHUNKS_RETRANSMITTED",
    "TRANSPORT_DIRECTIONS",
    "TRANSPORT_GOODPUT",
    "TRANSPORT_LOSS_CAUSES",
    "TRANSPORT_RTT",
    "TRANSPORT_STREAMS",
    "TRANSPORT_STREAM_FAILURES",
    "TRANSPORT_STREAM_TARGET_CHANGES",
    "TRANSPORT_TCP_RETRANSMITS",
    "check_loss_cause",
    "check_transport_direction",
]
