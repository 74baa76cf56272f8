"""The source side of the tunnel: the source QEMU migrates into our unix socket; we carry it over AMST.

Every connection QEMU opens is classified by its first bytes (``classify.py``):

* the **main stream** goes on ``qemu-main`` as messages, compressed as one zstd stream (tunnel) or on a
  ``qemu-raw`` channel as plain bytes (pass-through); QEMU's return path comes back the same way;
* each **multifd channel** is parsed (``multifd.py``); its packets enter one merged, ordered stream
  under the SYNC barrier (``barrier.py``) and are encoded into ``qemu-pages`` records with HDE
  (``pages.py``). A channel that stops parsing is diverted to its own ``qemu-raw`` channel. In
  pass-through every multifd channel is a ``qemu-raw`` channel from the start.

Buffering is bounded: a bounded queue of parsed packets, and a window of wire bytes sent but not yet
decoded by the destination (``TunnelLimits.inflight_bytes`` of the measured bandwidth): when it is
full we stop reading from QEMU, so what sits between the two QEMUs stays within the downtime budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from novacron.dwcp.encoding import (
    ArenaPool,
    BaselineSession,
    BaselineStore,
    BaselineSummary,
    BaselineView,
    CostModelConfig,
    DefaultPageHasher,
    HdeDecodeError,
    HdeEncoder,
    HdeLimits,
    copy_digest,
)
from novacron.dwcp.encoding.summary import CopyTags
from novacron.dwcp.transport import AmstSession, TransportError
from novacron.migration.datapath import (
    CHANNEL_QEMU_MAIN,
    CHANNEL_QEMU_PAGES,
    CHANNEL_QEMU_RAW,
    DataChannel,
    DataPathAborted,
    DataPathKind,
    DataPathStats,
    DataSession,
    QemuMigrationSettings,
)
from novacron.migration.tunnel.barrier import SyncBarrier
from novacron.migration.tunnel.baseline import record_copy
from novacron.migration.tunnel.classify import CLASSIFY_BYTES, ConnectionClassifier, ConnectionKind
from novacron.migration.tunnel.common import (
    Signal,
    TaskGroup,
    abort_channels,
    codec_batches,
    describe,
    page_counts,
    socket_path,
    tell_peer,
    wait_for_peer_reason,
)
from novacron.migration.tunnel.errors import PeerAborted, TunnelError
from novacron.migration.tunnel.limits import TunnelLimits
from novacron.migration.tunnel.multifd import (
    Fallback,
    MultifdEvent,
    MultifdInit,
    MultifdPacket,
    MultifdParser,
    RawBytes,
)
from novacron.migration.tunnel.opaque import OpaqueCompressor, OpaqueDecompressor, main_stream_codec
from novacron.migration.tunnel.pacing import Pacer, PacingConfig
from novacron.migration.tunnel.pages import PageStreamEncoder
from novacron.migration.tunnel.records import (
    Abort,
    Ack,
    NeedRepair,
    pack_main,
    parse_main,
    parse_return_record,
)
from novacron.observability.log import log_event

log = logging.getLogger("novacron.migration.tunnel.source")

SOURCE_SOCKET = "qemu-src.sock"
# What a multifd channel carries before its first pages: QEMU's initial packet and one SYNC packet
# (a header and 128 page offsets, ~1.1 KiB). More than this on the channels means QEMU is past setup.
SETUP_BYTES_PER_CHANNEL = 4096


def raw_label(index: int | None) -> str:
    """The ``qemu-raw`` label of a QEMU connection: ``main`` or ``multifd-<n>``."""
    return "main" if index is None else f"multifd-{index}"


@dataclass(frozen=True)
class _OwnCopy:
    """This host's stored copy of the VM, snapshotted once per migration."""

    tags: dict[str, CopyTags]  # what a receiver holding the same copy would list
    session: BaselineSession  # the encoder's reader of that snapshot
    digest: bytes  # copy_digest(tags): b"" when this host holds no copy


@dataclass
class _End:
    total: int


@dataclass
class _Multifd:
    index: int
    parser: MultifdParser
    unparked: asyncio.Event = field(default_factory=asyncio.Event)
    raw: asyncio.Future[DataChannel] | None = None
    taken: int = 0
    ended: bool = False


_Item = tuple[_Multifd, MultifdEvent | _End]


class SourceTunnel:
    """A :class:`~novacron.migration.datapath.SourceDataPath`: tunnel (HDE) or pass-through."""

    def __init__(
        self,
        session: DataSession,
        *,
        vm: str,
        workdir: Path,
        settings: QemuMigrationSettings,
        passthrough: bool = False,
        cluster_key: bytes | None = None,
        hde_limits: HdeLimits | None = None,
        cost: CostModelConfig | None = None,
        limits: TunnelLimits | None = None,
        baseline: BaselineStore | None = None,
        bandwidth: Callable[[], float | None] | None = None,
        rtt: Callable[[], float | None] | None = None,
        pacing: PacingConfig | None = None,
        arenas: ArenaPool | None = None,
        compress_main: bool = True,
        corrupt_batch: int | None = None,
    ) -> None:
        if not passthrough and cluster_key is None:
            raise TunnelError("the HDE tunnel needs the cluster key", vm=vm)
        self.settings = settings
        self.vm = vm
        self.kind = DataPathKind.PASSTHROUGH if passthrough else DataPathKind.TUNNEL
        self.limits = limits or TunnelLimits()
        self._session = session
        self._workdir = workdir
        self._cluster_key = cluster_key
        self._hde_limits = hde_limits or HdeLimits()
        self._cost = cost
        self._store = baseline
        self._own_copy: _OwnCopy | None = None
        self._bandwidth = bandwidth
        self._rtt = rtt
        self._pacer = Pacer(self.limits, pacing)
        self._merged_pending = 0  # an event taken from the queue and not yet sent
        self._acked_wire = 0
        # A kept (warm) session cache from the host's pool, given back at close.
        self._arenas = None if passthrough else arenas
        self._arena = self._arenas.lend() if self._arenas is not None else None
        self._compress_main = compress_main
        self._corrupt_batch = corrupt_batch
        self._tasks = TaskGroup(f"tunnel-src-{vm}", self._fail, log)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hde-enc-{vm}")
        self._signal = Signal()
        self._server: asyncio.Server | None = None
        self._socket: Path | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._enc: PageStreamEncoder | None = None
        self._pages: DataChannel | None = None
        self._main: DataChannel | None = None
        self._raws: dict[str, DataChannel] = {}
        self._barrier = SyncBarrier(settings.multifd_channels)
        self._multifd: list[_Multifd] = []
        self._merged: asyncio.Queue[_Item] = asyncio.Queue(self.limits.merge_queue_packets)
        self._send_lock = asyncio.Lock()
        self._inflight: deque[tuple[int, int]] = deque()  # (record index, wire bytes)
        self._inflight_bytes = 0
        self._acked_records = 0
        self._acked_qemu_bytes = 0
        self._main_seen = False
        self._main_done = False
        self._summary_bytes = 0
        self._qemu_bytes = 0
        self._qemu_main_bytes = 0
        self._transport_bytes = 0
        self._raw_pages = 0
        self._error: str | None = None
        self._finished = False
        self._closed = False
        self._recorded = 0
        self._started_at: float | None = None
        self._return_task: asyncio.Task[None] | None = None
        self._finish_sent = False

    # ------------------------------------------------------------------------------------- interface

    async def start(self, peer_summary: bytes) -> str:
        if self._server is not None:
            raise TunnelError("source tunnel started twice", vm=self.vm)
        self._workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = socket_path(self._workdir, SOURCE_SOCKET)
        path.unlink(missing_ok=True)
        if self.kind is DataPathKind.TUNNEL:
            self._start_hde(peer_summary)
        self._server = await asyncio.start_unix_server(
            self._on_connection, path=str(path), limit=self.limits.read_chunk
        )
        os.chmod(path, 0o600)
        self._socket = path
        self._started_at = time.monotonic()
        log_event(log, "tunnel.source.started", vm=self.vm, path=self.kind.value, socket=str(path))
        return f"unix:{path}"

    def baseline_copy(self) -> bytes:
        """The digest of this host's stored copy of the VM (``b""`` if none), for PREPARE.

        The copy is snapshotted here: a destination holding the same one names it by this digest in
        its summary (docs/hde.md, "Baseline store"), and the encoder then reads this very snapshot.
        """
        own = self._own() if self.kind is DataPathKind.TUNNEL else None
        return own.digest if own is not None else b""

    def _own(self) -> _OwnCopy | None:
        if self._store is None:
            return None
        if self._own_copy is None:
            tags, session = self._store.own_copy(self.vm)
            self._own_copy = _OwnCopy(tags, session, copy_digest(tags))
        return self._own_copy

    def _start_hde(self, peer_summary: bytes) -> None:
        view: BaselineView | None = None
        own = self._own()
        if peer_summary:
            try:
                summary = BaselineSummary.from_bytes(peer_summary)
            except HdeDecodeError as exc:
                raise TunnelError("the destination's baseline summary is malformed", vm=self.vm) from exc
            if summary.copy_digest:
                if own is None or own.digest != summary.copy_digest:
                    raise TunnelError(
                        "the destination's summary names a baseline copy this host did not offer",
                        vm=self.vm,
                        digest=summary.copy_digest.hex(),
                    )
                summary = summary.with_own_copy(own.tags, own.session.fingerprints)
            view = BaselineView(summary)
            self._summary_bytes = len(peer_summary)
        peer_copy = own.session if own is not None else None
        key = self._cluster_key
        if key is None:  # checked in __init__; keeps the type checker informed
            raise TunnelError("the HDE tunnel needs the cluster key", vm=self.vm)
        hde = HdeEncoder(
            DefaultPageHasher(key),
            self._hde_limits,
            baseline=view,
            cost=self._cost,
            arena=self._arena,
            peer_copy=peer_copy,
        )
        self._enc = PageStreamEncoder(
            hde, channels=self.settings.multifd_channels, corrupt_seq=self._corrupt_batch
        )
        self._main = self._session.open_channel(CHANNEL_QEMU_MAIN, label=self.vm)
        self._pages = self._session.open_channel(CHANNEL_QEMU_PAGES, label=self.vm)
        self._tasks.spawn(self._send_hello(), "hello")
        self._tasks.spawn(self._encode_loop(), "encode")
        self._return_task = self._tasks.spawn(self._return_loop(), "acks")

    def _inflight_wire(self) -> int:
        if self.kind is DataPathKind.PASSTHROUGH:
            return sum(ch.buffered_bytes for ch in self._raws.values())
        return self._inflight_bytes

    def buffered_bytes(self) -> int:
        if self.kind is DataPathKind.PASSTHROUGH:
            return sum(ch.buffered_bytes for ch in self._raws.values())
        return max(0, self._qemu_bytes - self._acked_qemu_bytes)

    def stats(self) -> DataPathStats:
        enc = self._enc
        hde = enc.hde if enc is not None else None
        return DataPathStats(
            path=self.kind,
            qemu_bytes=self._qemu_bytes,
            qemu_main_bytes=self._qemu_main_bytes,
            transport_bytes=self._transport_bytes,
            buffered_bytes=self.buffered_bytes(),
            inflight_wire_bytes=self._inflight_wire(),
            window_bytes=self._window(),
            pages=page_counts(hde.stats.pages_by_kind if hde else [0] * 9, self._raw_pages),
            packets=enc.packets if enc else 0,
            syncs=enc.syncs if enc else 0,
            channels=len(self._multifd) + int(self._main_seen),
            fallback_channels=sum(1 for m in self._multifd if m.raw is not None),
            codec_batches=codec_batches(hde.selector.totals) if hde else {},
            encode_seconds=hde.stats.seconds if hde else 0.0,
            baseline_summary_bytes=self._summary_bytes,
            baseline_pages_recorded=self._recorded,
            error=self._error,
        )

    async def finish(self) -> None:
        """QEMU reported ``completed``: wait until every connection ended and all of it was delivered."""
        self._raise_if_failed()
        deadline = self.limits.finish_timeout_s
        try:
            async with asyncio.timeout(deadline):
                await self._signal.wait_until(self._all_ended_or_failed)
                self._raise_if_failed()
                if self.kind is DataPathKind.TUNNEL:
                    await self._finish_hde()
                else:
                    for ch in self._raws.values():
                        await ch.drain()
        except TimeoutError:
            reason = "the migration streams did not end and drain in time"
            await self._fail(TunnelError(reason, vm=self.vm, timeout_s=deadline, **self._progress()))
            raise TunnelError(reason, vm=self.vm, timeout_s=deadline) from None
        self._finished = True
        log_event(log, "tunnel.source.finished", vm=self.vm, **self._progress())

    async def _finish_hde(self) -> None:
        enc, pages, main = self._enc, self._pages, self._main
        if enc is None or pages is None or main is None:
            raise TunnelError("tunnel not started", vm=self.vm)
        # Every event encoded and sent (or the path failed meanwhile).
        await self._signal.wait_until(
            lambda: self._error is not None or (self._merged.empty() and self._merged_pending == 0)
        )
        self._raise_if_failed()
        async with self._send_lock:
            await self._send_record(enc.finish().data)
            self._finish_sent = True
        pages.close()
        await self._signal.wait_until(
            lambda: (
                self._error is not None
                or (self._acked_records >= enc.records and self._acked_qemu_bytes >= self._qemu_bytes)
            )
        )
        self._raise_if_failed()
        await main.drain()

    async def abort(self, reason: str) -> None:
        if self._error is None:
            self._error = reason
        await self._shutdown(reason)

    async def close(self) -> None:
        if self._closed:
            return
        try:
            if self._finished and self._error is None and self._store is not None and self._enc is not None:
                self._recorded = await record_copy(self._store, self.vm, self._enc.hde.session_pages())
        finally:  # cancelled while recording (agent shutdown): the rest of the cleanup still runs
            self._closed = True
            await self._shutdown(None)
            if self._enc is not None:
                self._enc.hde.close()
            if self._arenas is not None:
                self._arenas.give_back(self._arena)

    # ------------------------------------------------------------------------------------ failures

    async def _fail(self, exc: BaseException) -> None:
        if self._error is None and isinstance(exc, TransportError):
            # The channels went away: the destination may have said why just before. Give its
            # reason (an ABORT record, read by the return loop) the chance to be the one recorded.
            await wait_for_peer_reason(self._return_task)
        if self._error is None:
            self._error = describe(exc)
            log_event(log, "tunnel.source.failed", logging.WARNING, vm=self.vm, error=self._error)
            if not isinstance(exc, PeerAborted):
                await tell_peer(self._pages, self._send_lock, self._error)
        self._signal.notify()
        if self._qemu_may_be_in_setup():
            # QEMU's sockets stay open (unread) until the orchestrator has cancelled QEMU's migration
            # and calls abort(): multifd channels lost while QEMU 7.2 sets them up can leave its
            # migration hung for good, or crash QEMU (docs/hypervisor.md).
            await self._stop_work(self._error)
        else:
            await self._shutdown(self._error)

    def _qemu_may_be_in_setup(self) -> bool:
        """Whether QEMU may still be setting up its multifd channels: none has carried page data yet
        (what QEMU sends before pages is an initial packet and a SYNC, a few KiB a channel)."""
        channels = self.settings.multifd_channels
        multifd_bytes = self._qemu_bytes - self._qemu_main_bytes
        return channels > 0 and multifd_bytes <= SETUP_BYTES_PER_CHANNEL * channels

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise DataPathAborted(f"source tunnel failed: {self._error}", vm=self.vm)

    async def _shutdown(self, reason: str | None) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for w in self._writers:
            w.transport.abort() if reason is not None else w.close()
        self._writers.clear()
        await self._stop_work(reason)
        if server is not None:
            with contextlib.suppress(OSError):
                await server.wait_closed()
        if self._socket is not None:
            self._socket.unlink(missing_ok=True)

    async def _stop_work(self, reason: str | None) -> None:
        """Stop relaying: the peer's channels (aborted when ``reason``), the tasks, the encoder."""
        if reason is not None:
            abort_channels([self._pages, self._main, *self._raws.values()], reason)
        self._signal.notify()
        await self._tasks.cancel()
        # An encode may still run in the worker thread: let it end before the arena is given back.
        await asyncio.to_thread(self._worker.shutdown, wait=True, cancel_futures=True)
        if reason is not None and self._enc is not None:
            self._enc.hde.close()  # give the cache arena back; nothing will be recorded

    def _all_ended_or_failed(self) -> bool:
        if self._error is not None:
            return True
        return self._main_done and all(m.ended for m in self._multifd)

    def _progress(self) -> dict[str, int]:
        return {
            "qemu_bytes": self._qemu_bytes,
            "acked_qemu_bytes": self._acked_qemu_bytes,
            "multifd": len(self._multifd),
            "ended": sum(m.ended for m in self._multifd),
        }

    # --------------------------------------------------------------------------------- connections

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        if self._error is None:  # after a failure QEMU's connections are only held, until abort()
            self._tasks.spawn(self._handle(reader, writer), "connection")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cls = ConnectionClassifier()
        async with asyncio.timeout(self.limits.classify_timeout_s):
            while cls.kind is None:
                data = await reader.read(CLASSIFY_BYTES - len(cls.head))
                if not data:
                    raise TunnelError("a QEMU connection closed before saying what it is", vm=self.vm)
                cls.feed(data)
        if cls.kind is ConnectionKind.MAIN:
            await self._run_main(reader, writer, cls.head)
        elif cls.kind is ConnectionKind.MULTIFD:
            await self._run_multifd(reader, cls.head)
        else:
            raise TunnelError(
                "unrecognised connection on the migration socket", vm=self.vm, first_bytes=cls.head.hex()
            )

    def _taken(self, n: int, main: bool) -> None:
        self._qemu_bytes += n
        if main:
            self._qemu_main_bytes += n

    async def _run_main(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes
    ) -> None:
        if self._main_seen:
            raise TunnelError("QEMU opened a second main migration stream", vm=self.vm)
        self._main_seen = True
        if self.kind is DataPathKind.PASSTHROUGH:
            ch = self._raw_channel(None)
            self._tasks.spawn(self._raw_return(ch, writer), "main-return")
            await self._relay_raw(ch, reader, head, main=True)
        else:
            main = self._main
            if main is None:
                raise TunnelError("tunnel not started", vm=self.vm)
            self._tasks.spawn(self._main_return(main, writer), "main-return")
            comp = OpaqueCompressor(main_stream_codec(self._compress_main))
            data = head
            while data:
                self._taken(len(data), main=True)
                codec, payload = comp.compress(data)
                msg = pack_main(codec.id, codec.level, len(data), payload)
                await main.send_message(msg)
                self._transport_bytes += len(msg)
                data = await reader.read(self.limits.main_message_bytes)
            main.close()
        self._main_done = True
        self._signal.notify()

    async def _main_return(self, main: DataChannel, writer: asyncio.StreamWriter) -> None:
        """QEMU's return path (destination to source), when the migration enables it."""
        dec = OpaqueDecompressor()
        while (msg := await main.recv_message()) is not None:
            m = parse_main(msg, max_raw=self.limits.main_message_bytes)
            try:
                writer.write(dec.decompress(m.codec, m.level, m.payload, m.raw_len))
                await writer.drain()
            except (ConnectionResetError, BrokenPipeError):
                if self._main_done:
                    return  # QEMU already ended its side: the return path has no reader any more
                raise

    def _raw_channel(self, index: int | None) -> DataChannel:
        label = raw_label(index)
        ch = self._session.open_channel(CHANNEL_QEMU_RAW, label=label)
        self._raws[label] = ch
        return ch

    async def _relay_raw(
        self, ch: DataChannel, reader: asyncio.StreamReader, head: bytes, *, main: bool
    ) -> None:
        data = head
        while data:
            self._taken(len(data), main)
            # Bound what the transport holds for this connection (its share of the window): what is
            # in flight at switchover adds to the downtime.
            if ch.buffered_bytes >= max(self.limits.read_chunk, self._window() // (1 + len(self._raws))):
                await ch.drain()
            await ch.write(data)
            self._transport_bytes += len(data)
            data = await reader.read(self.limits.read_chunk)
        ch.close()

    async def _raw_return(self, ch: DataChannel, writer: asyncio.StreamWriter) -> None:
        while data := await ch.read(self.limits.read_chunk):
            writer.write(data)
            await writer.drain()

    async def _run_multifd(self, reader: asyncio.StreamReader, head: bytes) -> None:
        if len(self._multifd) >= self.limits.max_channels:
            raise TunnelError("too many multifd connections", vm=self.vm, limit=self.limits.max_channels)
        m = _Multifd(len(self._multifd), MultifdParser(max_pages_alloc=self.limits.max_pages_alloc))
        m.unparked.set()
        self._multifd.append(m)
        if self.kind is DataPathKind.PASSTHROUGH:
            await self._relay_raw(self._raw_channel(m.index), reader, head, main=False)
            m.ended = True
            self._signal.notify()
            return
        self._barrier.join(m.index)
        data = head
        while data:
            self._taken(len(data), main=False)
            m.taken += len(data)
            await self._produce(m, m.parser.feed(data))
            data = await reader.read(self.limits.read_chunk)
        await self._produce(m, m.parser.eof())
        self._release(self._barrier.leave(m.index))
        await self._merged.put((m, _End(m.taken)))

    async def _produce(self, m: _Multifd, events: list[MultifdEvent]) -> None:
        """Queue a channel's events for the encoder, parking the channel after each SYNC (barrier)."""
        for ev in events:
            if isinstance(ev, RawBytes):
                if m.raw is None:
                    raise TunnelError("raw bytes before the channel was diverted", channel=m.index)
                ch = await m.raw
                await ch.write(ev.data)
                self._transport_bytes += len(ev.data)
                continue
            if isinstance(ev, Fallback):  # before queueing it: the encoder fulfils this future
                m.raw = asyncio.get_running_loop().create_future()
            await self._merged.put((m, ev))
            if isinstance(ev, MultifdPacket) and ev.sync:
                released = self._barrier.took_sync(m.index)
                self._release(released)
                if m.index not in released:
                    m.unparked.clear()
                    try:
                        await asyncio.wait_for(m.unparked.wait(), self.limits.sync_round_timeout_s)
                    except TimeoutError:
                        raise TunnelError(
                            "a multifd SYNC round did not complete (QEMU's channel count differs from "
                            "the settings?)",
                            vm=self.vm,
                            channel=m.index,
                            connected=len(self._multifd),
                            expected=self.settings.multifd_channels,
                            timeout_s=self.limits.sync_round_timeout_s,
                        ) from None
            elif isinstance(ev, Fallback):
                self._release(self._barrier.leave(m.index))

    def _release(self, channels: set[int]) -> None:
        for index in channels:
            self._multifd[index].unparked.set()

    # ------------------------------------------------------------------------------------- records

    async def _send_hello(self) -> None:
        enc = self._enc
        if enc is not None:
            async with self._send_lock:
                await self._send_record(enc.hello().data)

    async def _send_record(self, data: bytes) -> None:
        pages = self._pages
        if pages is None:
            raise TunnelError("tunnel not started", vm=self.vm)
        index = (self._enc.records - 1) if self._enc is not None else 0
        self._inflight.append((index, len(data)))
        self._inflight_bytes += len(data)
        await pages.send_message(data)
        self._transport_bytes += len(data)

    def _measured_bw(self) -> float | None:
        return self._bandwidth() if self._bandwidth is not None else None

    def _window(self) -> int:
        rtt = self._rtt() if self._rtt is not None else None
        return self._pacer.window(time.monotonic(), self._measured_bw(), rtt)

    def _may_send(self) -> bool:
        return self._inflight_bytes < self._window() or self._error is not None

    async def _encode_loop(self) -> None:
        enc = self._enc
        if enc is None:
            return
        while True:
            m, ev = await self._merged.get()
            self._merged_pending = 1
            try:
                if not self._may_send() and self._pages is not None:
                    self._pacer.window_full(
                        time.monotonic(), self._inflight_bytes, self._pages.buffered_bytes
                    )
                await self._signal.wait_until(self._may_send)
                self._raise_if_failed()
                if (bw := self._pacer.hde_bandwidth(time.monotonic(), self._measured_bw())) is not None:
                    enc.hde.set_bandwidth(bw)
                async with self._send_lock:
                    await self._encode_one(enc, m, ev)
            finally:
                self._merged_pending = 0
                self._signal.notify()

    async def _encode_one(self, enc: PageStreamEncoder, m: _Multifd, ev: MultifdEvent | _End) -> None:
        if isinstance(ev, MultifdInit):
            await self._send_record(enc.open(m.index, ev).data)
        elif isinstance(ev, MultifdPacket):
            raw_before = enc.raw_packets
            if ev.normal_pages:
                # HDE works in C mostly (zstd, LZ4, numpy, hashes) and lets go of the GIL: off the
                # event loop, the transport keeps sending while the next batch is encoded.
                rec = await asyncio.get_running_loop().run_in_executor(self._worker, enc.packet, m.index, ev)
            else:
                rec = enc.packet(m.index, ev)
            await self._send_record(rec.data)
            if enc.raw_packets != raw_before:
                self._raw_pages += ev.normal_pages
        elif isinstance(ev, Fallback):
            await self._send_record(enc.divert(m.index, ev.reason).data)
            log_event(
                log, "tunnel.source.diverted", logging.WARNING, vm=self.vm, channel=m.index, why=ev.reason
            )
            ch = self._raw_channel(m.index)
            if ev.data:
                await ch.write(ev.data)
                self._transport_bytes += len(ev.data)
            if m.raw is not None:
                m.raw.set_result(ch)
        elif isinstance(ev, _End):
            if m.raw is not None:
                (await m.raw).close()
            await self._send_record(enc.end(m.index, ev.total).data)
            m.ended = True
            self._signal.notify()

    async def _return_loop(self) -> None:
        pages, enc = self._pages, self._enc
        if pages is None or enc is None:
            return
        while (msg := await pages.recv_message()) is not None:
            rec = parse_return_record(msg)
            if isinstance(rec, Abort):
                raise PeerAborted(f"the destination aborted: {rec.reason}", vm=self.vm)
            if isinstance(rec, Ack):
                self._on_ack(enc, rec)
            elif isinstance(rec, NeedRepair):
                log_event(log, "tunnel.source.repair", vm=self.vm, seq=rec.seq)
                async with self._send_lock:
                    loop = asyncio.get_running_loop()
                    repaired = await loop.run_in_executor(self._worker, enc.repair, rec.seq)
                    await self._send_record(repaired.data)
        if not self._finish_sent:
            raise TunnelError("the destination closed qemu-pages before the end", vm=self.vm)

    def _on_ack(self, enc: PageStreamEncoder, ack: Ack) -> None:
        if ack.records > enc.records or ack.records < self._acked_records:
            raise TunnelError("acknowledgement out of range", records=ack.records, sent=enc.records)
        self._acked_records = ack.records
        self._acked_qemu_bytes = max(self._acked_qemu_bytes, ack.qemu_bytes)
        while self._inflight and self._inflight[0][0] < ack.records:
            size = self._inflight.popleft()[1]
            self._inflight_bytes -= size
            self._acked_wire += size
        self._pacer.acknowledged(time.monotonic(), self._acked_wire)
        enc.acknowledged(ack.records)
        self._signal.notify()


def amst_bandwidth(session: AmstSession) -> Callable[[], float | None]:
    """Bytes/s the AMST session measures (its path monitor's rate estimate), for ``bandwidth=``."""
    loop = asyncio.get_running_loop()

    def probe() -> float | None:
        bits = session.monitor.rate_estimate(loop.time())
        return bits / 8 if bits else None

    return probe


def amst_rtt(session: AmstSession) -> Callable[[], float | None]:
    """The AMST session's smoothed round-trip time in seconds, for ``rtt=``."""

    def probe() -> float | None:
        return session.metrics().rtt_s

    return probe
