"""The interface between a migration's orchestrator (control plane) and its data plane.

``docs/migration.md`` section 7 is the specification; this module is its code. The orchestrator knows
the data plane only through :class:`SourceDataPath` and :class:`DestinationDataPath`; the data plane
knows the AMST transport only through :class:`DataSession` and :class:`DataChannel` (the subset of
``novacron.dwcp.transport``'s session and channel it uses), so either side can be tested alone.

Call order (both QEMUs already started, the destination with ``-incoming defer``):

1. the orchestrator applies ``settings`` to both QEMUs (capabilities, then parameters);
2. destination: ``uri = await dst.start()``; its ``summary()`` goes to the source in READY;
3. source: ``uri = await src.start(peer_summary)``; QMP ``migrate-incoming`` on the destination was
   issued with the destination's URI; QMP ``migrate`` with the source's URI;
4. while QEMU migrates: ``stats()`` and ``buffered_bytes()`` for progress and convergence;
5. after QEMU reports ``completed`` on both sides: ``await src.finish()`` / ``await dst.finish()``; or on
   any failure ``await abort(reason)`` (idempotent, never raises for a second call);
6. always, last: ``await close()`` (after a successful finish it first records the baseline copy used by
   a later migration back: call it after commit, it is off the critical path).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from novacron.dwcp.encoding.summary import SUMMARY_VERSION_DIGEST
from novacron.errors import NovacronError
from novacron.observability.log import log_event

log = logging.getLogger("novacron.migration.datapath")

# AMST channel kinds of a migration session (docs/migration.md section 3).
CHANNEL_CONTROL = "migration-control"
CHANNEL_QEMU_MAIN = "qemu-main"
CHANNEL_QEMU_PAGES = "qemu-pages"
CHANNEL_QEMU_RAW = "qemu-raw"  # one QEMU connection carried as plain bytes (pass-through, fallback)
DATA_CHANNEL_KINDS = frozenset({CHANNEL_QEMU_MAIN, CHANNEL_QEMU_PAGES, CHANNEL_QEMU_RAW})


class DataPathKind(enum.StrEnum):
    DIRECT = "direct"  # QEMU to QEMU over TCP with QEMU's own TLS
    TUNNEL = "tunnel"  # through the agents, multifd pages HDE-encoded
    PASSTHROUGH = "passthrough"  # through the agents, every QEMU connection as plain bytes


class DataPathError(NovacronError):
    """The data path failed; context names the VM, the QEMU channel and what went wrong."""


class DataPathAborted(DataPathError):
    """The data path was aborted (locally or by the peer); the reason is in the message."""


@dataclass(frozen=True)
class QemuMigrationSettings:
    """What both QEMUs must be given before ``migrate`` / ``migrate-incoming``."""

    capabilities: Mapping[str, bool]  # e.g. {"multifd": True, "postcopy-ram": False}
    parameters: Mapping[str, Any]  # e.g. {"multifd-channels": 4, "multifd-compression": "none"}
    extra_args: tuple[str, ...] = ()  # destination QEMU extra command-line arguments

    def with_policy(
        self, capabilities: Mapping[str, bool] | None = None, parameters: Mapping[str, Any] | None = None
    ) -> QemuMigrationSettings:
        """These settings plus the orchestrator's (auto-converge, bandwidth ...); the data path's win.

        The data path's own entries (multifd, channel count, compression) define its wire format, so a
        policy cannot override them: a conflicting value raises :class:`DataPathError`.
        """
        caps = dict(capabilities or {})
        params = dict(parameters or {})
        for key, value in self.capabilities.items():
            if key in caps and caps[key] != value:
                raise DataPathError("policy conflicts with the data path's capability", capability=key)
            caps[key] = value
        for key, value in self.parameters.items():
            if key in params and params[key] != value:
                raise DataPathError("policy conflicts with the data path's parameter", parameter=key)
            params[key] = value
        return QemuMigrationSettings(caps, params, self.extra_args)

    def qmp_capabilities(self) -> list[dict[str, Any]]:
        """The argument list of QMP ``migrate-set-capabilities``."""
        return [{"capability": k, "state": v} for k, v in sorted(self.capabilities.items())]

    @property
    def multifd_channels(self) -> int:
        """How many multifd connections the source QEMU will open (0 without multifd)."""
        if not self.capabilities.get("multifd", False):
            return 0
        return int(self.parameters.get("multifd-channels", 2))  # QEMU's default is 2


@dataclass(frozen=True)
class PageCounts:
    """Pages carried, by how they travelled (the progress display's "pages by kind")."""

    zero: int = 0  # all-zero pages seen on multifd channels (QEMU 7.2 sends most zeros on main)
    ref: int = 0  # sent as a reference: unchanged, duplicate, session cache, receiver's baseline
    delta: int = 0  # sent as a sparse delta (against the last version sent, or the baseline copy)
    literal: int = 0  # sent whole (compressed with its batch)
    baseline: int = 0  # of ref + delta: resolved against the receiver's baseline store
    opaque: int = 0  # carried inside opaque pass-through bytes (not parsed)

    @property
    def total(self) -> int:
        return self.zero + self.ref + self.delta + self.literal + self.opaque


@dataclass(frozen=True)
class DataPathStats:
    """A snapshot of one side's counters; all byte counts are totals since ``start``."""

    path: DataPathKind
    qemu_bytes: int = 0  # bytes read from (source) or written to (destination) QEMU, every channel
    qemu_main_bytes: int = 0  # of which on QEMU's main channel
    transport_bytes: int = 0  # bytes handed to (source) or taken from (destination) the transport
    buffered_bytes: int = 0  # taken from QEMU but not yet delivered to the destination QEMU
    inflight_wire_bytes: int = 0  # bytes handed to the transport and not yet consumed by the peer
    window_bytes: int = 0  # the most the data path lets be in flight now: drains in window / bandwidth
    pages: PageCounts = field(default_factory=PageCounts)
    packets: int = 0  # multifd packets parsed
    syncs: int = 0  # of which with the SYNC flag
    channels: int = 0  # QEMU connections carried
    fallback_channels: int = 0  # of which as opaque bytes after something unparsable
    codec_batches: Mapping[str, int] = field(default_factory=dict)  # HDE codec name -> batches
    encode_seconds: float = 0.0  # CPU spent in HDE (encode on the source, decode on the destination)
    baseline_summary_bytes: int = 0  # size of the receiver's baseline summary
    baseline_pages_recorded: int = 0  # pages written to this host's baseline copy by close()
    error: str | None = None  # why the data path failed (None while it works)

    @property
    def ratio(self) -> float:
        """QEMU bytes per transport byte (1.0 before anything moved)."""
        return self.qemu_bytes / self.transport_bytes if self.transport_bytes else 1.0


class DataChannel(Protocol):
    """One AMST channel as the data plane uses it (``novacron.dwcp.transport.Channel``).

    Ordered bytes or messages (one style per channel), both directions.
    """

    kind: str
    label: str | None

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes; waits while the transport's budget is exhausted (backpressure)."""
        ...

    async def read(self, n: int = ...) -> bytes:
        """Up to ``n`` bytes (at least one); ``b""`` once the peer closed its direction."""
        ...

    async def send_message(self, message: bytes | bytearray | memoryview) -> None: ...

    async def recv_message(self) -> bytes | None:
        """The next message, or ``None`` once the peer closed its direction."""
        ...

    async def drain(self) -> None:
        """Wait until everything written so far is acknowledged by the peer."""
        ...

    @property
    def buffered_bytes(self) -> int:
        """Bytes written and not yet acknowledged by the peer."""
        ...

    def close(self, reason: str | None = None) -> None:
        """End our direction (the peer reads EOF after the data)."""
        ...

    def abort(self, reason: str) -> None:
        """Abort both directions; the peer's reads raise with ``reason``."""
        ...


class DataSession(Protocol):
    """The migration's AMST session as the data plane uses it (``novacron.dwcp.transport.AmstSession``)."""

    def open_channel(self, kind: str, *, label: str | None = None) -> DataChannel: ...


class AcceptingSession(Protocol):
    async def accept_channel(self) -> DataChannel: ...


class ChannelAcceptor(Protocol):
    """Where a destination data path takes the channels the source opened (a :class:`ChannelRouter`)."""

    async def accept(self, kind: str, timeout_s: float | None = None) -> DataChannel: ...


class SourceDataPath(Protocol):
    """Lives in the source agent (docs/migration.md section 7)."""

    settings: QemuMigrationSettings

    def baseline_copy(self) -> bytes:
        """Digest of this host's stored copy of the VM for PREPARE (``b""``: none, or not used)."""
        ...

    async def start(self, peer_summary: bytes) -> str:
        """Prepare to receive QEMU's connections; returns the URI for QMP ``migrate``."""
        ...

    def stats(self) -> DataPathStats: ...

    def buffered_bytes(self) -> int:
        """Bytes taken from QEMU but not yet delivered to the destination QEMU."""
        ...

    async def finish(self) -> None:
        """Wait until everything QEMU sent is delivered and acknowledged; raises if it cannot be."""
        ...

    async def abort(self, reason: str) -> None: ...

    async def close(self) -> None:
        """Release everything; after a successful ``finish`` first record the baseline copy."""
        ...


class DestinationDataPath(Protocol):
    """Lives in the destination agent (docs/migration.md section 7)."""

    settings: QemuMigrationSettings

    async def start(self) -> str:
        """Prepare to feed the destination QEMU; returns the URI for QMP ``migrate-incoming``."""
        ...

    def summary(self, sender_copy: bytes = b"", sender_reads: int = SUMMARY_VERSION_DIGEST) -> bytes:
        """This host's baseline summary for the sender (``b""`` if none); ``sender_copy`` is the
        digest PREPARE gave of the sender's own copy of the VM, ``sender_reads`` the newest summary
        version the sender reads."""
        ...

    def stats(self) -> DataPathStats: ...

    async def finish(self) -> None:
        """Wait until every channel ended cleanly and all its bytes reached QEMU; raises if not."""
        ...

    async def abort(self, reason: str) -> None: ...

    async def close(self) -> None:
        """Release everything; after a successful ``finish`` first record the baseline copy."""
        ...


@dataclass(frozen=True)
class RouterLimits:
    max_pending_per_kind: int = 64  # channels accepted but not yet taken by their consumer
    accept_timeout_s: float = 30.0  # default wait in :meth:`ChannelRouter.accept`


class ChannelRouter:
    """Accepts every channel of a session and hands each to whoever asks for its kind.

    The orchestrator takes ``migration-control`` and the destination data path takes its data
    channels from the same session; one accept loop serves both. Channels of a kind nobody takes are
    held up to ``max_pending_per_kind``; more are aborted with a reason.
    """

    def __init__(self, session: AcceptingSession, limits: RouterLimits | None = None) -> None:
        self._session = session
        self.limits = limits or RouterLimits()
        self._queues: dict[str, asyncio.Queue[DataChannel]] = {}
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._closed = asyncio.Event()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._accept_loop(), name="channel-router")

    def _queue(self, kind: str) -> asyncio.Queue[DataChannel]:
        q = self._queues.get(kind)
        if q is None:
            q = self._queues[kind] = asyncio.Queue(self.limits.max_pending_per_kind)
        return q

    async def _accept_loop(self) -> None:
        try:
            while True:
                channel = await self._session.accept_channel()
                q = self._queue(channel.kind)
                if q.full():
                    log_event(log, "router.refused", logging.WARNING, kind=channel.kind, label=channel.label)
                    channel.abort(f"too many pending {channel.kind} channels")
                    continue
                q.put_nowait(channel)
        except (NovacronError, OSError, EOFError) as exc:  # the session ended: waiting accepts learn why
            self._failure = exc
        finally:
            self._closed.set()

    async def accept(self, kind: str, timeout_s: float | None = None) -> DataChannel:
        """The next channel of ``kind`` the peer opened; raises :class:`DataPathError` on timeout."""
        self.start()
        q = self._queue(kind)
        if not q.empty():
            return q.get_nowait()
        getter = asyncio.ensure_future(q.get())
        closed = asyncio.ensure_future(self._closed.wait())
        wait_s = self.limits.accept_timeout_s if timeout_s is None else timeout_s
        try:
            done, _ = await asyncio.wait(
                {getter, closed}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            closed.cancel()
            if not getter.done():
                getter.cancel()
        if getter in done and not getter.cancelled():
            return getter.result()
        if self._closed.is_set():
            raise DataPathError(
                "the session ended before the channel was opened",
                kind=kind,
                reason=str(self._failure) if self._failure else "closed",
            )
        raise DataPathError("the peer did not open the channel in time", kind=kind, timeout_s=wait_s)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
