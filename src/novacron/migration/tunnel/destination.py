"""The destination side of the tunnel: replay the source QEMU's connections into the destination QEMU.

The destination QEMU listens on our unix socket path after QMP ``migrate-incoming``. We open one
connection per source connection: the main stream first (QEMU takes its first connection as the main
one), then each multifd channel, each only once its first bytes are at hand (QEMU reads a new multifd
channel's init message before it serves anything else). Every QEMU connection is fed by its own
bounded queue (:class:`QemuSink`), so a channel that QEMU leaves blocked in a multifd sync does not
stop the others.

``qemu-pages`` records are decoded in order (``pages.py``) and acknowledged back to the source, with
the QEMU bytes written so far: the source's window and ``buffered_bytes`` come from these. Anything
wrong (a record, an HDE batch, a QEMU connection that fails) aborts every channel with the reason,
which the source sees at once; the orchestrator then rolls back.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from novacron.dwcp.encoding import ArenaPool, BaselineStore, HdeDecodeError
from novacron.dwcp.encoding.summary import SUMMARY_VERSION_DIGEST, SUMMARY_VERSION_NAMED
from novacron.dwcp.transport import TransportError
from novacron.migration.datapath import (
    CHANNEL_QEMU_MAIN,
    CHANNEL_QEMU_PAGES,
    CHANNEL_QEMU_RAW,
    ChannelAcceptor,
    DataChannel,
    DataPathAborted,
    DataPathKind,
    DataPathStats,
    QemuMigrationSettings,
)
from novacron.migration.tunnel.baseline import record_copy
from novacron.migration.tunnel.common import (
    Signal,
    TaskGroup,
    abort_channels,
    describe,
    socket_path,
    tell_peer,
    wait_for_peer_reason,
)
from novacron.migration.tunnel.errors import PeerAborted, TunnelError
from novacron.migration.tunnel.limits import TunnelLimits
from novacron.migration.tunnel.opaque import OpaqueDecompressor
from novacron.migration.tunnel.pages import (
    Deliver,
    DivertChannel,
    EndChannel,
    OpenChannel,
    PageStreamDecoder,
    RequestRepair,
    StreamFinished,
)
from novacron.migration.tunnel.records import pack_ack, pack_main, pack_need_repair, parse_main
from novacron.migration.tunnel.source import raw_label
from novacron.observability.log import log_event

log = logging.getLogger("novacron.migration.tunnel.destination")

DESTINATION_SOCKET = "qemu-dst.sock"
CONNECT_RETRY_FIRST_S = 0.01
CONNECT_RETRY_MAX_S = 0.2
OFF_LOOP_BYTES = 16 * 1024  # records at least this large are decoded in the worker thread
DEFAULT_MAX_SESSION_CACHE = 1 << 30  # the largest HDE session cache a source may ask this host for


async def connect_qemu(
    path: Path, timeout_s: float, what: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the destination QEMU's incoming socket.

    QEMU creates the socket when it gets ``migrate-incoming`` and offers no notification we could
    wait for, so a refused or missing socket is retried with a short backoff until ``timeout_s``.
    """
    delay = CONNECT_RETRY_FIRST_S
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                return await asyncio.open_unix_connection(str(path))
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, CONNECT_RETRY_MAX_S)
    raise TunnelError("unreachable", what=what)  # pragma: no cover - the timeout raises first


@dataclass
class QemuSink:
    """One destination QEMU connection fed from a bounded queue; optionally diverted to raw bytes."""

    name: str
    limit: int
    parts: deque[bytes | memoryview] = field(default_factory=deque)
    queued: int = 0
    written: int = 0
    expected: int | None = None  # total bytes announced by END
    raw: asyncio.Future[DataChannel] | None = None  # set while the channel's rest is relayed raw
    diverted: bool = False
    done: bool = False
    closed_at: int | None = None  # QEMU closed the connection; bytes of it written or refused by then
    signal: Signal = field(default_factory=Signal)

    async def put(self, parts: tuple[bytes | memoryview, ...], failed: asyncio.Event) -> None:
        # Wait for room (an empty queue always takes one more, so a large packet cannot stall).
        await self.signal.wait_until(lambda: self.queued < self.limit or not self.parts or failed.is_set())
        for p in parts:
            self.parts.append(p)
            self.queued += len(p)
        self.signal.notify()

    def end(self, total: int) -> None:
        self.expected = total
        self.signal.notify()


class DestinationTunnel:
    """A :class:`~novacron.migration.datapath.DestinationDataPath`: tunnel (HDE) or pass-through."""

    def __init__(
        self,
        channels: ChannelAcceptor,
        *,
        vm: str,
        workdir: Path,
        settings: QemuMigrationSettings,
        passthrough: bool = False,
        limits: TunnelLimits | None = None,
        baseline: BaselineStore | None = None,
        arenas: ArenaPool | None = None,
        max_session_cache_bytes: int = DEFAULT_MAX_SESSION_CACHE,
    ) -> None:
        self.settings = settings
        self.vm = vm
        self.kind = DataPathKind.PASSTHROUGH if passthrough else DataPathKind.TUNNEL
        self.limits = limits or TunnelLimits()
        self._acceptor = channels
        self._workdir = workdir
        self._store = baseline
        # A kept (warm) session cache from the host's pool, given back at close.
        self._arenas = None if passthrough else arenas
        self._arena = self._arenas.lend() if self._arenas is not None else None
        self._max_cache = max_session_cache_bytes
        self._tasks = TaskGroup(f"tunnel-dst-{vm}", self._fail, log)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"hde-dec-{vm}")
        self._signal = Signal()
        self._failed = asyncio.Event()
        self._socket: Path | None = None
        self._summary: bytes | None = None
        self._dec: PageStreamDecoder | None = None
        self._pages: DataChannel | None = None
        self._main: DataChannel | None = None
        self._raws: dict[str, DataChannel] = {}
        self._raw_wanted: set[str] = set()
        self._raw_accepting = False
        self._raw_written = 0
        self._pending_raw: set[asyncio.Future[DataChannel]] = set()
        self._pages_task: asyncio.Task[None] | None = None
        self._sinks: dict[int, QemuSink] = {}
        self._writers: list[asyncio.StreamWriter] = []
        self._main_connected = asyncio.Event()
        self._main_done = False
        self._main_written = 0
        self._passthrough_done = 0
        self._stream_finished = False
        self._transport_bytes = 0
        self._acked_records = 0
        self._acked_bytes = 0
        self._ack_pending: asyncio.TimerHandle | None = None
        self._ack_lock = asyncio.Lock()
        self._error: str | None = None
        self._finished = False
        self._closed = False
        self._recorded = 0

    # ------------------------------------------------------------------------------------- interface

    async def start(self) -> str:
        if self._socket is not None:
            raise TunnelError("destination tunnel started twice", vm=self.vm)
        self._workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = socket_path(self._workdir, DESTINATION_SOCKET)
        path.unlink(missing_ok=True)
        self._socket = path
        if self.kind is DataPathKind.TUNNEL:
            self._tasks.spawn(self._run_main(), "main")
            self._pages_task = self._tasks.spawn(self._run_pages(), "pages")
        else:
            for _ in range(1 + self.settings.multifd_channels):
                self._tasks.spawn(self._run_raw(), "raw")
        log_event(log, "tunnel.destination.started", vm=self.vm, path=self.kind.value, socket=str(path))
        return f"unix:{path}"

    def summary(self, sender_copy: bytes = b"", sender_reads: int = SUMMARY_VERSION_DIGEST) -> bytes:
        if self.kind is DataPathKind.PASSTHROUGH or self._store is None:
            return b""
        if self._summary is None:
            omit = sender_reads >= SUMMARY_VERSION_NAMED
            self._summary = self._store.summary(self.vm, sender_copy, omit_copy_fps=omit).to_bytes()
        return self._summary

    def qemu_bytes(self) -> int:
        return self._main_written + self._raw_written + sum(s.written for s in self._sinks.values())

    def stats(self) -> DataPathStats:
        dec = self._dec
        return DataPathStats(
            path=self.kind,
            qemu_bytes=self.qemu_bytes(),
            qemu_main_bytes=self._main_written,
            transport_bytes=self._transport_bytes,
            buffered_bytes=sum(s.queued for s in self._sinks.values()),
            packets=dec.packets if dec else 0,
            syncs=dec.syncs if dec else 0,
            channels=len(self._sinks) + int(self._main_connected.is_set()),
            fallback_channels=sum(1 for s in self._sinks.values() if s.diverted),
            encode_seconds=dec.decode_seconds if dec else 0.0,
            baseline_summary_bytes=len(self._summary or b""),
            baseline_pages_recorded=self._recorded,
            error=self._error,
        )

    async def finish(self) -> None:
        """Every channel ended and all its bytes reached QEMU (and the source heard so)."""
        if self._error is not None:
            raise DataPathAborted(f"destination tunnel failed: {self._error}", vm=self.vm)
        try:
            async with asyncio.timeout(self.limits.finish_timeout_s):
                await self._signal.wait_until(self._complete_or_failed)
        except TimeoutError:
            reason = "the migration streams did not end in time"
            await self._fail(TunnelError(reason, vm=self.vm, timeout_s=self.limits.finish_timeout_s))
            raise TunnelError(reason, vm=self.vm, timeout_s=self.limits.finish_timeout_s) from None
        if self._error is not None:
            raise DataPathAborted(f"destination tunnel failed: {self._error}", vm=self.vm)
        self._finished = True
        log_event(log, "tunnel.destination.finished", vm=self.vm, qemu_bytes=self.qemu_bytes())

    async def abort(self, reason: str) -> None:
        if self._error is None:
            self._error = reason
        await self._shutdown(reason)

    async def close(self) -> None:
        if self._closed:
            return
        dec = self._dec
        ok = self._finished and self._error is None
        try:
            if ok and self._store is not None and dec is not None and dec.hde is not None:
                self._recorded = await record_copy(self._store, self.vm, dec.hde.session_pages())
        finally:  # cancelled while recording (agent shutdown): the rest of the cleanup still runs
            self._closed = True
            await self._shutdown(None)
            if self._arenas is not None:
                self._arenas.give_back(self._arena)

    # ------------------------------------------------------------------------------------ failures

    async def _fail(self, exc: BaseException) -> None:
        if self._error is None and isinstance(exc, TransportError):
            await wait_for_peer_reason(self._pages_task)  # the source may have said why
        if self._error is None:
            self._error = describe(exc)
            log_event(log, "tunnel.destination.failed", logging.WARNING, vm=self.vm, error=self._error)
            if not isinstance(exc, PeerAborted):
                await tell_peer(self._pages, self._ack_lock, self._error)
        await self._shutdown(self._error)

    async def _shutdown(self, reason: str | None) -> None:
        if reason is not None:
            self._failed.set()
            abort_channels([self._pages, self._main, *self._raws.values()], reason)
        for w in self._writers:
            if reason is not None:
                w.transport.abort()
            else:
                w.close()
        self._writers.clear()
        if self._ack_pending is not None:
            self._ack_pending.cancel()
            self._ack_pending = None
        self._signal.notify()
        for sink in self._sinks.values():
            sink.signal.notify()
        for fut in self._pending_raw:
            fut.cancel()
        await self._tasks.cancel()
        await asyncio.to_thread(self._worker.shutdown, wait=True, cancel_futures=True)
        if self._dec is not None:
            self._dec.close()

    def _complete_or_failed(self) -> bool:
        if self._error is not None:
            return True
        if self.kind is DataPathKind.PASSTHROUGH:
            return self._passthrough_done == 1 + self.settings.multifd_channels
        return self._stream_finished and self._main_done and all(s.done for s in self._sinks.values())

    def _check(self) -> None:
        if self._error is not None:
            raise DataPathAborted(f"destination tunnel failed: {self._error}", vm=self.vm)

    # ----------------------------------------------------------------------------------- QEMU side

    async def _connect(self, what: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._socket is None:
            raise TunnelError("tunnel not started", vm=self.vm)
        try:
            reader, writer = await connect_qemu(self._socket, self.limits.connect_timeout_s, what)
        except TimeoutError:
            raise TunnelError(
                "the destination QEMU did not accept the migration connection",
                vm=self.vm,
                channel=what,
                timeout_s=self.limits.connect_timeout_s,
            ) from None
        self._writers.append(writer)
        return reader, writer

    async def _run_sink(self, sink: QemuSink, first: bool) -> None:
        """Feed one QEMU connection: queued parts, then (if diverted) the raw channel, then EOF."""
        if not first:
            await self._main_connected.wait()
        await sink.signal.wait_until(
            lambda: bool(sink.parts) or sink.raw is not None or self._failed.is_set()
        )
        self._check()
        _, writer = await self._connect(sink.name)
        while True:
            await sink.signal.wait_until(
                lambda: (
                    bool(sink.parts)
                    or sink.expected is not None
                    or sink.raw is not None
                    or self._failed.is_set()
                )
            )
            self._check()
            if sink.parts:
                if sink.closed_at is not None:
                    raise TunnelError(
                        "the destination QEMU closed a migration connection before all of it arrived",
                        vm=self.vm,
                        channel=sink.name,
                        closed_at=sink.closed_at,
                    )
                batch = list(sink.parts)
                sink.parts.clear()
                size = sum(len(p) for p in batch)
                writer.writelines(batch)
                try:
                    await writer.drain()
                except (ConnectionResetError, BrokenPipeError):
                    # QEMU closes its multifd connections as soon as its incoming migration completed,
                    # and the source QEMU's last packet on one (no pages, after the final SYNC) can
                    # come later. Only the channel's END tells that end from a failure: were these
                    # its last bytes? (Counted as written so the source's acknowledgements settle.)
                    sink.closed_at = sink.written + size
                sink.queued -= size
                sink.written += size
                sink.signal.notify()
                self._ack_soon()
                continue
            if sink.raw is not None:
                ch = await sink.raw
                while data := await ch.read(self.limits.read_chunk):
                    self._transport_bytes += len(data)
                    writer.write(data)
                    await writer.drain()
                    sink.written += len(data)
                    self._ack_soon()
                sink.raw = None  # relayed to its end
                if sink.expected is None:
                    await sink.signal.wait_until(lambda: sink.expected is not None or self._failed.is_set())
                    self._check()
            if sink.expected is not None and not sink.parts and sink.raw is None:
                if sink.written != sink.expected:
                    raise TunnelError(
                        "a QEMU channel ended with a different byte count",
                        vm=self.vm,
                        channel=sink.name,
                        written=sink.written,
                        expected=sink.expected,
                    )
                if sink.closed_at is not None:
                    log_event(log, "tunnel.destination.closed_at_end", vm=self.vm, channel=sink.name,
                              bytes=sink.written)  # fmt: skip
                elif writer.can_write_eof():
                    writer.write_eof()
                sink.done = True
                self._signal.notify()
                self._ack_soon()
                return

    # --------------------------------------------------------------------------------- main stream

    async def _run_main(self) -> None:
        main = await self._acceptor.accept(CHANNEL_QEMU_MAIN, self.limits.accept_timeout_s)
        self._main = main
        dec = OpaqueDecompressor()
        writer: asyncio.StreamWriter | None = None
        while (msg := await main.recv_message()) is not None:
            self._transport_bytes += len(msg)
            m = parse_main(msg, max_raw=self.limits.main_message_bytes)
            data = dec.decompress(m.codec, m.level, m.payload, m.raw_len)
            if writer is None:
                reader, writer = await self._connect("main")
                self._main_connected.set()
                self._tasks.spawn(self._main_return(main, reader), "main-return")
            writer.write(data)
            await writer.drain()
            self._main_written += len(data)
            self._ack_soon()
        if writer is not None and writer.can_write_eof():
            writer.write_eof()
        self._main_done = True
        self._signal.notify()

    async def _main_return(self, main: DataChannel, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(self.limits.main_message_bytes):
            await main.send_message(pack_main(0, 0, len(data), data))
        main.close()

    # ------------------------------------------------------------------------------------- records

    async def _run_pages(self) -> None:
        pages = await self._acceptor.accept(CHANNEL_QEMU_PAGES, self.limits.accept_timeout_s)
        self._pages = pages
        session = self._store.session(self.vm) if self._store is not None else None
        dec = PageStreamDecoder(
            max_channels=self.limits.max_channels,
            max_record_bytes=self.limits.max_record_bytes,
            max_held_records=self.limits.held_records,
            max_session_cache_bytes=self._max_cache,
            baseline=session,
            arena=self._arena,
        )
        self._dec = dec
        since_ack = 0
        while (msg := await pages.recv_message()) is not None:
            self._transport_bytes += len(msg)
            try:
                if len(msg) >= OFF_LOOP_BYTES:  # a batch: decode in the worker, the loop keeps moving
                    outs = await asyncio.get_running_loop().run_in_executor(self._worker, dec.receive, msg)
                else:
                    outs = dec.receive(msg)
            except HdeDecodeError as exc:
                raise TunnelError(f"corrupted HDE batch: {exc}", vm=self.vm, record=dec.received - 1) from exc
            for out in outs:
                await self._apply(out)
            since_ack += 1
            if since_ack >= self.limits.ack_every_records:
                since_ack = 0
                await self._send_ack()
            else:
                self._ack_soon()
        if dec.finished is None:
            raise TunnelError("qemu-pages ended before FINISH", vm=self.vm, records=dec.received)
        await self._signal.wait_until(self._complete_or_failed)
        self._check()
        await self._send_ack()
        pages.close()

    async def _apply(self, out: object) -> None:
        if isinstance(out, Deliver):
            await self._sinks[out.channel].put(out.parts, self._failed)
        elif isinstance(out, OpenChannel):
            self._new_sink(out.channel).parts.append(out.init)
            self._sinks[out.channel].queued += len(out.init)
        elif isinstance(out, DivertChannel):
            sink = self._sinks.get(out.channel) or self._new_sink(out.channel)
            log_event(log, "tunnel.destination.diverted", logging.WARNING, vm=self.vm, channel=out.channel)
            sink.diverted = True
            sink.raw = asyncio.ensure_future(self._raw_channel(raw_label(out.channel)))
            self._pending_raw.add(sink.raw)
            sink.signal.notify()
        elif isinstance(out, EndChannel):
            self._sinks[out.channel].end(out.total)
        elif isinstance(out, StreamFinished):
            self._stream_finished = True
            self._signal.notify()
        elif isinstance(out, RequestRepair):
            log_event(log, "tunnel.destination.repair", vm=self.vm, seq=out.seq)
            pages = self._pages
            if pages is not None:
                async with self._ack_lock:
                    await pages.send_message(pack_need_repair(out.seq))

    def _new_sink(self, channel: int) -> QemuSink:
        sink = QemuSink(raw_label(channel), self.limits.channel_queue_bytes)
        self._sinks[channel] = sink
        self._tasks.spawn(self._run_sink(sink, first=False), sink.name)
        return sink

    def _ack_soon(self) -> None:
        """Acknowledge soon (coalesced), or now when many QEMU bytes went unacknowledged."""
        if self._pages is None or self._error is not None:
            return
        if self.qemu_bytes() - self._acked_bytes >= self.limits.ack_every_bytes:
            if self._ack_pending is not None:
                self._ack_pending.cancel()
            self._ack_pending = None
            if not self._ack_lock.locked():
                self._tasks.spawn(self._send_ack(), "ack")
            return
        if self._ack_pending is None:
            self._ack_pending = asyncio.get_running_loop().call_later(
                self.limits.ack_delay_s, self._ack_timer
            )

    def _ack_timer(self) -> None:
        self._ack_pending = None
        if self._error is None:
            self._tasks.spawn(self._send_ack(), "ack")

    async def _send_ack(self) -> None:
        pages, dec = self._pages, self._dec
        if pages is None or dec is None or self._error is not None:
            return
        async with self._ack_lock:
            records, qemu_bytes = dec.resolved, self.qemu_bytes()
            if (records, qemu_bytes) == (self._acked_records, self._acked_bytes):
                return
            self._acked_records, self._acked_bytes = records, qemu_bytes
            await pages.send_message(pack_ack(records, qemu_bytes))

    async def _raw_channel(self, label: str) -> DataChannel:
        """The ``qemu-raw`` channel with this label, whatever order the source opened them in."""
        self._raw_wanted.add(label)
        if not self._raw_accepting:
            self._raw_accepting = True
            self._tasks.spawn(self._accept_raws(), "accept-raw")
        await self._signal.wait_until(lambda: label in self._raws or self._failed.is_set())
        self._check()
        return self._raws[label]

    async def _accept_raws(self) -> None:
        try:
            while any(label not in self._raws for label in self._raw_wanted):
                ch = await self._acceptor.accept(CHANNEL_QEMU_RAW, self.limits.accept_timeout_s)
                self._raws[ch.label or ""] = ch
                self._signal.notify()
        finally:
            self._raw_accepting = False

    # -------------------------------------------------------------------------------- pass-through

    async def _run_raw(self) -> None:
        ch = await self._acceptor.accept(CHANNEL_QEMU_RAW, self.limits.accept_timeout_s)
        label = ch.label or ""
        self._raws[label] = ch
        first = await ch.read(self.limits.read_chunk)
        if label != "main":
            await self._main_connected.wait()
        reader, writer = await self._connect(label)
        if label == "main":
            self._main_connected.set()
            self._tasks.spawn(self._raw_return(ch, reader), "main-return")
        data = first
        while data:
            self._transport_bytes += len(data)
            writer.write(data)
            await writer.drain()
            if label == "main":
                self._main_written += len(data)
            else:
                self._raw_written += len(data)
            data = await ch.read(self.limits.read_chunk)
        if writer.can_write_eof():
            writer.write_eof()
        self._passthrough_done += 1
        self._signal.notify()

    async def _raw_return(self, ch: DataChannel, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(self.limits.read_chunk):
            await ch.write(data)
        ch.close()
