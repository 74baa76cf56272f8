"""The asyncio AMST session: the sans-IO core and path monitor driven over real DWCP streams.

    session = await connect_session(host, port, tls)            # opener (endpoints.py)
    channel = session.open_channel("qemu-main", label="vm1")
    await channel.write(data)                                  # waits while the send budget is full
    await channel.drain()                                      # until the peer acknowledged it all
    channel.close()                                            # half-close: the peer reads EOF

    session = await listener.accept()                          # acceptor
    channel = await session.accept_channel()
    data = await channel.read(1 << 20)                         # b"" at EOF

Per stream a reader task (frames into the core) and a writer task (pulls frames from the core
whenever its socket takes more). One timer (``loop.call_at``) serves the core (delayed ACKs, pings,
stall detection) and the monitor (goodput samples, TCP_INFO). The opener also runs the stream
manager: it joins streams up to the controller's target and retires the surplus (drained first, so
nothing is resent). A stream that fails (reset, closed, stalled) is dropped, its unacknowledged data
goes out on the others, and the opener joins a replacement.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from novacron.dwcp.errors import DwcpError, ProtocolError, ProtocolErrorKind, StreamClosed, StreamError
from novacron.dwcp.mode import Mode, ModeChange, ModeThresholds
from novacron.dwcp.negotiation import Mode as AnnouncedMode
from novacron.dwcp.stream import Stream
from novacron.dwcp.transport.config import DEFAULT_CONFIG, MESSAGE_HEADER_SIZE, AmstConfig
from novacron.dwcp.transport.controller import ControllerConfig, StreamCountChange
from novacron.dwcp.transport.core import (
    AmstCore,
    ChannelEnded,
    ChannelOpened,
    Role,
    StreamDrained,
    StreamStalled,
)
from novacron.dwcp.transport.errors import (
    ChannelAborted,
    ChannelClosedError,
    MessageTooLarge,
    SessionFailed,
    TransportConfigError,
)
from novacron.dwcp.transport.metrics import PrometheusObserver, TransportMetrics, TransportObserver
from novacron.dwcp.transport.monitor import PathMonitor
from novacron.dwcp.transport.tuning import (
    SocketTuning,
    lowat_for_chunk,
    read_socket_tcp_info,
    set_notsent_lowat,
    set_pacing_cap,
    stream_socket,
    stream_window_limit,
    tune_socket,
)
from novacron.observability.log import log_event

logger = logging.getLogger("novacron.dwcp.transport")

DEFAULT_READ_SIZE = 1 << 20
JOIN_ERRORS = (DwcpError, OSError)

Joiner = Callable[[], Awaitable[Stream]]


def _default_observers() -> list[TransportObserver]:
    return [PrometheusObserver()]


@dataclass(frozen=True)
class SessionOptions:
    """How a session behaves beyond the wire limits of :class:`AmstConfig`."""

    config: AmstConfig = DEFAULT_CONFIG
    tuning: SocketTuning = field(default_factory=SocketTuning)
    thresholds: ModeThresholds | None = None
    controller: ControllerConfig | None = None
    link_bps: float | None = None  # a known link rate: the controller starts from its BDP
    streams: int | None = None  # pin the stream count (the controller is then not used)
    join_concurrency: int = 4
    join_retries: int = 5  # consecutive failed joins before giving up (session fails if no stream)
    join_backoff_s: float = 0.2
    join_backoff_max_s: float = 5.0
    rejoin_timeout_s: float = 30.0  # acceptor: a session without streams fails after this
    close_timeout_s: float = 30.0  # close(): wait this long for the peer to acknowledge everything
    observers: Callable[[], list[TransportObserver]] = _default_observers

    def __post_init__(self) -> None:
        if self.streams is not None and self.streams < 1:
            raise TransportConfigError("streams must be at least 1", streams=self.streams)
        if self.link_bps is not None and not self.link_bps > 0:
            raise TransportConfigError("link_bps must be positive", link_bps=self.link_bps)
        for name in ("join_backoff_s", "join_backoff_max_s", "rejoin_timeout_s", "close_timeout_s"):
            if not getattr(self, name) > 0:
                raise TransportConfigError(f"{name} must be positive", value=getattr(self, name))
        if self.join_concurrency < 1 or self.join_retries < 0:
            raise TransportConfigError(
                "join_concurrency must be >= 1 and join_retries >= 0",
                join_concurrency=self.join_concurrency,
                join_retries=self.join_retries,
            )


@dataclass(eq=False)
class _Runner:
    """One stream of the session and its two tasks."""

    stream: Stream
    index: int
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    idle: bool = False
    retiring: bool = False  # drained on purpose; its end is not a failure
    lowat: int = 0
    pacing_bps: float | None = None
    reader: asyncio.Task[None] | None = None
    writer: asyncio.Task[None] | None = None


def _detected_mode(announced: AnnouncedMode) -> Mode | None:
    return None if announced is AnnouncedMode.AUTO else Mode(announced.value)


class AmstSession:
    """One side of an AMST session. Create with :func:`connect_session` or an :class:`AmstListener`."""

    def __init__(
        self,
        first: Stream,
        role: Role,
        *,
        options: SessionOptions | None = None,
        joiner: Joiner | None = None,
        on_end: Callable[[AmstSession], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        self.options = opts = options or SessionOptions()
        self.info = first.info
        self.role = role
        caps = first.info.capabilities
        self._core = AmstCore(role, now, config=opts.config, max_frame_size=caps.max_frame_size)
        self._joiner = joiner
        self._monitor = PathMonitor(
            now,
            config=opts.config,
            thresholds=opts.thresholds,
            controller=opts.controller,
            controls_streams=role is Role.OPENER and joiner is not None and opts.streams is None,
            initial_mode=_detected_mode(first.info.peer_mode),
            link_bps=opts.link_bps,
            max_streams=caps.max_streams,
        )
        self._observers = opts.observers()
        self._on_end = on_end
        self._runners: dict[int, _Runner] = {}
        self._channels: dict[int, Channel] = {}
        self._incoming: deque[Channel] = deque()
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._failure: SessionFailed | None = None
        self._peer_ended = False
        self._closing = False
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._orphan_timer: asyncio.TimerHandle | None = None
        self._manager: asyncio.Task[None] | None = None
        self._manage = asyncio.Event()
        self._joining = 0
        self._join_failures = 0
        self._join_tasks: set[asyncio.Task[None]] = set()
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._counted = (0, 0, 0, 0)  # acked, delivered, retransmitted chunks, tcp retransmits
        self._mode_at_open = self._monitor.mode
        for obs in self._observers:
            obs.session_opened(self._monitor.mode)
        log_event(
            logger,
            "dwcp.transport.session_started",
            session=self.info.name,
            role=role.value,
            peer=str(self.info.peer),
            mode=self._monitor.mode.value,
            max_streams=caps.max_streams,
        )
        self.add_stream(first)
        if role is Role.OPENER and joiner is not None:
            self._manager = self._loop.create_task(self._manage_streams())
        self._after_core()

    # ====================================================================================== info

    @property
    def mode(self) -> Mode:
        return self._monitor.mode

    @property
    def streams(self) -> int:
        return len(self._runners)

    @property
    def target_streams(self) -> int:
        return self.options.streams or self._monitor.target_streams

    @property
    def buffered_bytes(self) -> int:
        """Bytes written on this session's channels and not yet acknowledged by the peer."""
        return self._core.buffered_bytes

    @property
    def budget_bytes(self) -> int:
        return self._core.budget

    @property
    def closed(self) -> bool:
        return self._closed or self._failure is not None

    @property
    def failure(self) -> SessionFailed | None:
        return self._failure

    @property
    def monitor(self) -> PathMonitor:
        return self._monitor

    @property
    def core(self) -> AmstCore:
        return self._core

    def subscribe_mode(self, callback: Callable[[ModeChange], None]) -> Callable[[], None]:
        """Call ``callback`` with every mode change of this session; returns an unsubscribe function."""
        return self._monitor.detector.subscribe(callback)

    def metrics(self) -> TransportMetrics:
        now = self._loop.time()
        sample = self._monitor.last_sample
        c = self._core.counters
        return TransportMetrics(
            mode=self._monitor.mode,
            mode_switches=self._monitor.detector.metrics.switches,
            streams=len(self._runners),
            target_streams=self.target_streams,
            goodput_sent_bps=sample.sent_bps if sample else None,
            goodput_received_bps=sample.received_bps if sample else None,
            rtt_s=self._core.srtt_s,
            min_rtt_s=self._monitor.detector.estimates(now).rtt_s,
            bytes_sent=c.bytes_acked,
            bytes_received=c.bytes_delivered,
            buffered_bytes=self._core.buffered_bytes,
            budget_bytes=self._core.budget,
            chunks_retransmitted=c.chunks_retransmitted,
            tcp_retransmits=self._monitor.tcp_retransmits,
            tcp_segments=self._monitor.tcp_segments,
            streams_lost=c.streams_lost,
            channels=len(self._core.channels),
        )

    def _ctx(self) -> dict[str, Any]:
        return {"session": self.info.name, "role": self.role.value}

    # ================================================================================== channels

    def open_channel(
        self, kind: str, *, label: str | None = None, expected_bytes: int | None = None
    ) -> Channel:
        """Open a logical channel; the peer gets it from :meth:`accept_channel`."""
        self._raise_if_failed()
        if self._closing:
            raise SessionFailed("session is closing", **self._ctx())
        cid = self._core.open_channel(kind, self._loop.time(), label=label, expected_bytes=expected_bytes)
        channel = Channel(self, cid, kind, label, expected_bytes)
        self._channels[cid] = channel
        self._after_core()
        return channel

    async def accept_channel(self) -> Channel:
        """The next channel the peer opened."""
        await self._wait(lambda: bool(self._incoming) or self._failure is not None or self._peer_ended)
        if self._incoming:
            return self._incoming.popleft()
        self._raise_if_failed()
        raise SessionFailed("peer closed the session", **self._ctx())

    async def drain(self) -> None:
        """Wait until every byte written on every channel has been acknowledged by the peer."""
        await self._wait(lambda: self._core.buffered_bytes == 0 or self._failure is not None)
        if self._core.buffered_bytes:
            self._raise_if_failed()

    # ================================================================================== streams

    def add_stream(self, stream: Stream) -> None:
        """Attach an established stream of this session (the listener calls this for joins)."""
        if stream.info.session_id != self.info.session_id:
            raise TransportConfigError(
                "stream belongs to another session", stream_session=stream.info.name, **self._ctx()
            )
        if self._closing or self._failure is not None:
            stream.abort()
            return
        index = stream.info.stream_index
        if index in self._runners:
            stream.abort()
            raise TransportConfigError("stream index already attached", stream=index, **self._ctx())
        runner = _Runner(stream, index)
        sock = stream_socket(stream)
        if sock is not None:
            runner.lowat = lowat_for_chunk(self._core.chunk_size)
            result = tune_socket(sock, self.options.tuning, lowat_bytes=runner.lowat)
            self._monitor.note_streams(result.congestion_control, stream_window_limit())
            log_event(
                logger,
                "dwcp.transport.stream_added",
                stream=index,
                congestion_control=result.congestion_control,
                **self._ctx(),
            )
        self._runners[index] = runner
        self._core.add_stream(index, self._loop.time())
        runner.reader = self._loop.create_task(self._read_loop(runner))
        runner.writer = self._loop.create_task(self._write_loop(runner))
        if self._orphan_timer is not None:
            self._orphan_timer.cancel()
            self._orphan_timer = None
        for obs in self._observers:
            obs.streams(len(self._runners), +1)
        self._retune_streams(self._loop.time())  # a new stream must not start uncapped
        self._after_core()

    async def _read_loop(self, r: _Runner) -> None:
        cause: str | None = "reset"
        try:
            while True:
                frame = await r.stream.recv_frame()
                self._core.receive_frame(r.index, frame, self._loop.time())
                self._after_core()
        except StreamClosed as exc:
            scope = exc.context.get("scope")
            if scope == "session":
                self._peer_closed_session(exc)
            cause = None if scope is not None or r.retiring else "closed"
        except ProtocolError as exc:
            if exc.what is ProtocolErrorKind.TRUNCATED:
                cause = None if r.retiring else "closed"  # the connection died in the middle of a frame
            else:
                self._fail(SessionFailed(f"peer broke the transport protocol: {exc}", **self._ctx()))
                cause = "protocol"
        except StreamError:
            cause = None if r.retiring else "reset"
        self._lose_stream(r, cause)

    async def _write_loop(self, r: _Runner) -> None:
        core = self._core
        try:
            while True:
                if not core.has_work(r.index, self._loop.time()):
                    r.idle = True
                    r.wake.clear()
                    await r.wake.wait()
                    r.idle = False
                    continue
                frames = core.frames_to_send(r.index, self._loop.time())
                self._after_core()  # pulling may finish channels (their last ACK went out)
                if frames:
                    await r.stream.send_frames(frames)
        except StreamError:
            self._lose_stream(r, None if r.retiring else "reset")

    def _lose_stream(self, r: _Runner, cause: str | None) -> None:
        if self._runners.get(r.index) is not r:
            return
        del self._runners[r.index]
        current = asyncio.current_task()
        for task in (r.reader, r.writer):
            if task is not None and task is not current:
                task.cancel()
        r.stream.abort()
        requeued = self._core.remove_stream(r.index, self._loop.time())
        self._monitor.forget_stream(r.index)
        for obs in self._observers:
            obs.streams(len(self._runners), -1)
            if cause is not None:
                obs.stream_lost(cause)
        log_event(
            logger,
            "dwcp.transport.stream_lost" if cause else "dwcp.transport.stream_closed",
            logging.WARNING if cause else logging.INFO,
            stream=r.index,
            cause=cause,
            requeued_chunks=requeued,
            streams_left=len(self._runners),
            **self._ctx(),
        )
        if not self._runners and not self._closing and self._failure is None:
            if self._peer_ended:
                self._peer_gone()
            elif self.role is Role.ACCEPTOR or self._joiner is None:
                self._orphan_timer = self._loop.call_later(self.options.rejoin_timeout_s, self._orphaned)
        self._manage.set()
        self._retune_streams(self._loop.time())  # the others share the path now
        self._after_core()

    def _orphaned(self) -> None:
        self._orphan_timer = None
        if not self._runners:
            self._fail(
                SessionFailed(
                    f"no stream for {self.options.rejoin_timeout_s:g} s and none joined", **self._ctx()
                )
            )

    def _retire(self, index: int) -> None:
        r = self._runners.get(index)
        if r is None:
            return
        r.retiring = True

        async def close() -> None:
            await r.stream.close("retired by the stream-count controller")
            self._lose_stream(r, None)

        self._spawn(close())

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # ----------------------------------------------------------------------- opener: stream count

    async def _manage_streams(self) -> None:
        while not self._closing and self._failure is None:
            self._manage.clear()
            self._adjust_streams()
            await self._manage.wait()

    def _adjust_streams(self) -> None:
        target = min(self.target_streams, self.info.capabilities.max_streams)
        live = [r for r in self._runners.values() if not r.retiring]
        have = len(live) + self._joining
        if have < target and self._join_failures <= self.options.join_retries:
            for _ in range(min(target - have, self.options.join_concurrency - self._joining)):
                self._joining += 1
                task = self._loop.create_task(self._join_one())
                self._join_tasks.add(task)
                task.add_done_callback(self._join_tasks.discard)
        elif len(live) > target and self._joining == 0:
            for r in sorted(live, key=lambda r: r.index, reverse=True)[: len(live) - max(1, target)]:
                r.retiring = True
                self._core.drain_stream(r.index, self._loop.time())
            self._after_core()

    async def _join_one(self) -> None:
        if self._joiner is None:
            return
        try:
            stream = await self._joiner()
        except JOIN_ERRORS as exc:
            self._join_failures += 1
            log_event(
                logger,
                "dwcp.transport.join_failed",
                logging.WARNING,
                error=str(exc),
                failures=self._join_failures,
                **self._ctx(),
            )
            if self._join_failures > self.options.join_retries:
                if not self._runners:
                    self._fail(SessionFailed(f"no stream left and joins keep failing: {exc}", **self._ctx()))
                self._joining -= 1
                return
            delay = min(self.options.join_backoff_max_s, self.options.join_backoff_s * 2**self._join_failures)
            await asyncio.sleep(delay)  # retry back-off, not synchronisation
            self._joining -= 1
            self._manage.set()
            return
        self._joining -= 1
        self._join_failures = 0
        if self._closing or self._failure is not None:
            await stream.close("session closing")
            return
        self.add_stream(stream)
        self._manage.set()

    # ============================================================================ core plumbing

    def _after_core(self) -> None:
        """Act on what the core and monitor produced, wake whoever can proceed, re-arm the timer."""
        core, monitor = self._core, self._monitor
        while (event := core.next_event()) is not None:
            if isinstance(event, ChannelOpened):
                channel = Channel(self, event.channel, event.kind, event.label, event.expected_bytes)
                self._channels[event.channel] = channel
                self._incoming.append(channel)
            elif isinstance(event, ChannelEnded):
                ended = self._channels.pop(event.channel, None)
                if ended is not None:
                    ended._ended = event
            elif isinstance(event, StreamStalled):
                r = self._runners.get(event.stream)
                if r is not None:
                    log_event(
                        logger,
                        "dwcp.transport.stream_stalled",
                        logging.WARNING,
                        stream=event.stream,
                        waited_s=round(event.waited_s, 3),
                        **self._ctx(),
                    )
                    self._lose_stream(r, "stalled")
            elif isinstance(event, StreamDrained):
                self._retire(event.stream)
        while core.rtt_samples:
            sample = core.rtt_samples.popleft()
            monitor.observe_rtt(sample.rtt_s, sample.at)
            for obs in self._observers:
                obs.rtt(sample.rtt_s)
        while (mev := monitor.next_event()) is not None:
            if isinstance(mev, ModeChange):
                log_event(
                    logger,
                    "dwcp.transport.mode_changed",
                    previous=mev.previous.value,
                    mode=mev.mode.value,
                    reason=mev.reason,
                    **self._ctx(),
                )
                for obs in self._observers:
                    obs.mode_changed(mev)
            elif isinstance(mev, StreamCountChange):
                log_event(
                    logger,
                    "dwcp.transport.stream_target",
                    previous=mev.previous,
                    target=mev.target,
                    reason=mev.reason,
                    **self._ctx(),
                )
                for obs in self._observers:
                    obs.stream_target(mev)
                self._manage.set()
        self._wake()
        self._rearm()

    def _wake(self) -> None:
        core = self._core
        now = self._loop.time()
        for r in self._runners.values():
            if r.idle and not r.wake.is_set() and core.has_work(r.index, now):
                r.wake.set()
        if self._waiters:
            still = []
            for pred, fut in self._waiters:
                if fut.done():
                    continue
                if pred():
                    fut.set_result(None)
                else:
                    still.append((pred, fut))
            self._waiters = still

    async def _wait(self, pred: Callable[[], bool]) -> None:
        if pred():
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append((pred, fut))
        await fut

    def _rearm(self) -> None:
        if self._closed:
            return
        core_at = self._core.get_timer()
        at = self._monitor.get_timer() if core_at is None else min(core_at, self._monitor.get_timer())
        if self._timer is not None and at >= self._timer_at - 1e-4:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        if self._closed:
            return
        now = self._loop.time()
        core, monitor = self._core, self._monitor
        core.handle_timer(now)
        if now >= monitor.get_timer():
            self._sample(now)
        self._after_core()

    def read_kernel_rtt(self) -> int:
        """Feed every stream's ``TCP_INFO`` to the monitor now (its RTT and retransmissions), without
        a goodput sample; returns the streams read. For a one-off decision that should not wait for
        the sample timer (up to ``sample_interval_s``)."""
        if self._closed:
            return 0
        read = self._observe_tcp_info(self._loop.time())
        self._after_core()  # a reading can decide the mode: act on it as after the timer
        return read

    def _observe_tcp_info(self, now: float) -> int:
        """Every stream's ``TCP_INFO`` to the monitor; returns how many streams could be read."""
        read = 0
        for r in list(self._runners.values()):
            sock = stream_socket(r.stream)
            info = read_socket_tcp_info(sock) if sock is not None else None
            if info is not None:
                self._monitor.observe_tcp_info(r.index, info, now)
                read += 1
        return read

    def _sample(self, now: float) -> None:
        core, monitor = self._core, self._monitor
        self._observe_tcp_info(now)
        app_limited, window_limited = core.take_limit_flags()
        c = core.counters
        sample = monitor.handle_timer(
            now,
            acked_bytes=c.bytes_acked,
            delivered_bytes=c.bytes_delivered,
            app_limited=app_limited,
            window_limited=window_limited,
        )
        core.set_budget(monitor.budget(now))
        core.set_rate_estimate(monitor.rate_estimate(now))
        self._retune_streams(now)
        acked, delivered, retx, tcp = self._counted
        now_counts = (c.bytes_acked, c.bytes_delivered, c.chunks_retransmitted, monitor.tcp_retransmits)
        self._counted = now_counts
        for obs in self._observers:
            if sample is not None:
                obs.goodput(sample)
            obs.bytes_moved(now_counts[0] - acked, now_counts[1] - delivered)
            if now_counts[2] > retx:
                obs.retransmitted(now_counts[2] - retx)
            if now_counts[3] > tcp:
                obs.tcp_retransmits(now_counts[3] - tcp)

    def _retune_streams(self, now: float) -> None:
        """Follow the measurements: unsent-bytes mark from the chunk size, pacing cap per stream."""
        tuning = self.options.tuning
        lowat = lowat_for_chunk(self._core.chunk_size)
        rate = self._monitor.rate_estimate(now)
        cap = None
        if tuning.pacing_headroom is not None and rate is not None and not self._monitor.in_startup:
            cap = tuning.pacing_headroom * rate / max(1, len(self._runners))
        for r in self._runners.values():
            sock = stream_socket(r.stream)
            if sock is None:
                continue
            try:
                if tuning.notsent_lowat and r.lowat and r.lowat != lowat:
                    set_notsent_lowat(sock, lowat)
                    r.lowat = lowat
                if cap is not None and (
                    r.pacing_bps is None or abs(cap - r.pacing_bps) > 0.05 * r.pacing_bps
                ):
                    set_pacing_cap(sock, cap)
                    r.pacing_bps = cap
            except OSError:
                pass  # the stream is going away; its reader will notice

    # ============================================================================== end of life

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _peer_closed_session(self, exc: StreamClosed) -> None:
        self._peer_ended = True
        log_event(logger, "dwcp.transport.session_closed_by_peer", reason=exc.message, **self._ctx())
        self._wake()

    def _peer_gone(self) -> None:
        """The peer said GOODBYE to the session and its last stream is gone. Only data of ours it
        did not acknowledge makes that a failure (a close of ours crossing its GOODBYE does not)."""
        if self._core.buffered_bytes:
            self._fail(
                SessionFailed("peer closed the session with data still unacknowledged", **self._ctx()),
                by_peer=True,
            )
            return
        log_event(logger, "dwcp.transport.session_closed", reason="closed by peer", **self._ctx())
        self._teardown()  # unread data stays readable; reads then end with EOF or SessionFailed

    def _fail(self, error: SessionFailed, by_peer: bool = False) -> None:
        if self._failure is not None or self._closed:
            return
        self._failure = error
        log_event(
            logger,
            "dwcp.transport.session_failed",
            logging.WARNING,
            error=error.message,
            by_peer=by_peer,
            **self._ctx(),
        )
        self._teardown()

    def _teardown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._orphan_timer is not None:
            self._orphan_timer.cancel()
        if self._manager is not None:
            self._manager.cancel()
        for join in list(self._join_tasks):
            join.cancel()
        for r in list(self._runners.values()):
            for task in (r.reader, r.writer):
                if task is not None and task is not asyncio.current_task():
                    task.cancel()
            r.stream.abort()
        n = len(self._runners)
        self._runners.clear()
        for obs in self._observers:
            if n:
                obs.streams(0, -n)
            obs.session_closed(self._monitor.mode)
        for fut in (f for _, f in self._waiters):
            if not fut.done():
                fut.set_result(None)
        self._waiters = []
        if self._on_end is not None:
            self._on_end(self)

    async def close(self, reason: str = "session closed") -> None:
        """Close every channel, wait (``close_timeout_s``) until the peer acknowledged everything, and
        end the session. Raises SessionFailed if data could not be delivered."""
        if self._closed:
            self._raise_if_failed()
            return
        for cid in list(self._channels):  # channels the application knows (ours, or announced)
            if self._core.channel_abort_reason(cid) is None and not self._core.write_closed(cid):
                self._core.close_channel(cid, reason)
        self._after_core()
        undelivered = 0
        if not self._peer_ended:
            try:
                async with asyncio.timeout(self.options.close_timeout_s):
                    await self._wait(lambda: not self._core.unacknowledged() or self._failure is not None)
            except TimeoutError:
                undelivered = self._core.buffered_bytes
        self._raise_if_failed()
        self._closing = True
        runners = list(self._runners.values())
        for i, r in enumerate(runners):
            r.retiring = True
            await r.stream.close(reason, end_session=i == 0)
        self._teardown()
        log_event(
            logger, "dwcp.transport.session_closed", reason=reason, undelivered=undelivered, **self._ctx()
        )
        if undelivered:
            raise SessionFailed(
                f"peer did not acknowledge {undelivered} bytes within {self.options.close_timeout_s:g} s",
                undelivered=undelivered,
                **self._ctx(),
            )

    def abort(self, reason: str = "session aborted") -> None:
        """End the session at once: streams dropped, every channel fails."""
        self._fail(SessionFailed(reason, **self._ctx()))

    async def __aenter__(self) -> AmstSession:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is None:
            await self.close()
        else:
            self.abort(f"local error: {exc}")


class Channel:
    """One logical channel: ordered bytes (``write``/``read``) or messages (``send_message``/
    ``recv_message``) in both directions. Use one style per channel: messages are framed in the byte
    stream (u32 length + bytes)."""

    def __init__(
        self, session: AmstSession, cid: int, kind: str, label: str | None, expected_bytes: int | None
    ) -> None:
        self._s = session
        self.id = cid
        self.kind = kind
        self.label = label
        self.expected_bytes = expected_bytes
        self._ended: ChannelEnded | None = None

    def __repr__(self) -> str:
        return f"Channel(id={self.id}, kind={self.kind!r}, label={self.label!r}, session={self._s.info.name})"

    def _ctx(self) -> dict[str, Any]:
        return {"channel": self.id, "kind": self.kind, "session": self._s.info.name}

    def _check_abort(self) -> None:
        info = self._s._core.channel_abort_reason(self.id)
        if info is None and self._ended is not None and self._ended.aborted:
            info = (self._ended.reason or "aborted", self._ended.by_peer)
        if info is not None:
            reason, by_peer = info
            who = "peer" if by_peer else "this side"
            raise ChannelAborted(f"channel aborted by {who}: {reason}", by_peer=by_peer, **self._ctx())

    @property
    def buffered_bytes(self) -> int:
        """Bytes written on this channel and not yet acknowledged."""
        return self._s._core.channel_buffered(self.id)

    @property
    def ended(self) -> bool:
        return self._ended is not None

    # ---- sending ----

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``; waits while the session's send budget is full (backpressure)."""
        s = self._s
        if not isinstance(data, bytes):
            data = bytes(data)  # the transport keeps it until acknowledged; the caller may reuse theirs
        view = memoryview(data)
        piece = s.options.config.chunk_max
        for start in range(0, len(view), piece):
            self._check_writable()
            await s._wait(lambda: s._core.write_room > 0 or self._unwritable())
            self._check_writable()
            s._core.write(self.id, view[start : start + piece])
            s._after_core()

    def _unwritable(self) -> bool:
        s = self._s
        return (
            s._failure is not None
            or s._peer_ended
            or self._ended is not None
            or s._core.channel_abort_reason(self.id) is not None
            or s._core.write_closed(self.id)
        )

    def _check_writable(self) -> None:
        self._check_abort()
        s = self._s
        s._raise_if_failed()
        if s._peer_ended:
            raise SessionFailed("peer closed the session", **self._ctx())
        if self._ended is not None or s._core.write_closed(self.id):
            raise ChannelClosedError("channel is closed for writing", **self._ctx())

    async def drain(self) -> None:
        """Wait until everything written on this channel has been acknowledged by the peer."""
        s = self._s
        await s._wait(lambda: self.buffered_bytes == 0 or self._failed())
        if self.buffered_bytes:
            self._check_abort()
            s._raise_if_failed()
            raise SessionFailed("peer closed the session before acknowledging", **self._ctx())

    def _failed(self) -> bool:
        s = self._s
        return s._failure is not None or s._peer_ended or s._core.channel_abort_reason(self.id) is not None

    def close(self, reason: str | None = None) -> None:
        """Half-close: nothing more will be written; the peer reads EOF after the data sent so far."""
        s = self._s
        if self._ended is not None or s._failure is not None:
            return
        s._core.close_channel(self.id, reason)
        s._after_core()

    def abort(self, reason: str) -> None:
        """Drop both directions now; the peer's reads and writes fail with ChannelAborted(reason)."""
        s = self._s
        if self._ended is not None or s._failure is not None:
            return
        s._core.abort_channel(self.id, reason)
        s._after_core()

    async def wait_closed(self) -> None:
        """Wait until both directions are finished (or the channel was aborted)."""
        s = self._s
        await s._wait(lambda: self._ended is not None or s._failure is not None)
        s._raise_if_failed()

    async def send_message(self, message: bytes | bytearray | memoryview) -> None:
        size = len(message)
        limit = self._s.options.config.max_message_size
        if size > limit:
            raise MessageTooLarge(f"message of {size} bytes exceeds {limit}", size=size, **self._ctx())
        await self.write(size.to_bytes(MESSAGE_HEADER_SIZE, "big"))
        if size:
            await self.write(message)

    # ---- receiving ----

    async def read(self, n: int = DEFAULT_READ_SIZE) -> bytes:
        """Up to ``n`` bytes (at least one), or b"" at the end of the peer's data."""
        if n <= 0:
            raise TransportConfigError("read size must be positive", n=n, **self._ctx())
        s = self._s
        core = s._core
        while True:
            self._check_abort()
            if core.readable_bytes(self.id):
                data = core.read(self.id, n)
                s._after_core()
                return data
            if self._ended is not None or core.at_eof(self.id):
                return b""
            s._raise_if_failed()
            if s._peer_ended:
                raise SessionFailed("peer closed the session before this channel's end", **self._ctx())
            await s._wait(
                lambda: (
                    core.readable_bytes(self.id) > 0
                    or core.at_eof(self.id)
                    or self._ended is not None
                    or s._failure is not None
                    or s._peer_ended
                    or core.channel_abort_reason(self.id) is not None
                )
            )

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; ChannelClosedError if the peer's data ends first."""
        parts = bytearray()
        while len(parts) < n:
            data = await self.read(n - len(parts))
            if not data:
                raise ChannelClosedError(
                    f"channel ended after {len(parts)} of {n} bytes", received=len(parts), **self._ctx()
                )
            parts += data
        return bytes(parts)

    async def recv_message(self) -> bytes | None:
        """The next message, or None at the end of the peer's data."""
        header = await self.read(MESSAGE_HEADER_SIZE)
        if not header:
            return None
        if len(header) < MESSAGE_HEADER_SIZE:
            header += await self.readexactly(MESSAGE_HEADER_SIZE - len(header))
        size = int.from_bytes(header, "big")
        limit = self._s.options.config.max_message_size
        if size > limit:
            self.abort(f"message of {size} bytes exceeds the limit of {limit}")
            raise MessageTooLarge(
                f"peer sent a message of {size} bytes (limit {limit})", size=size, **self._ctx()
            )
        return await self.readexactly(size) if size else b""
