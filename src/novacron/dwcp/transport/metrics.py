"""Metrics hooks of the transport: a per-session snapshot, and observers that export it.

Every session keeps its own figures (:meth:`AmstSession.metrics` returns a
:class:`TransportMetrics` snapshot) and tells its observers as things happen. An observer subclasses
:class:`TransportObserver` and overrides what it needs; :class:`PrometheusObserver` (one per session,
installed by default) keeps the process-wide registry of ``novacron.observability.metrics`` current:
bytes, goodput (sum over sessions), RTT histogram, live streams, stream failures by cause,
retransmitted chunks, TCP retransmissions, stream-count decisions, sessions by mode and mode
switches.
"""

from __future__ import annotations

from dataclasses import dataclass

from novacron.dwcp.mode import Mode, ModeChange
from novacron.dwcp.transport.controller import StreamCountChange
from novacron.dwcp.transport.monitor import GoodputSample
from novacron.observability import metrics as registry


@dataclass(frozen=True, slots=True)
class TransportMetrics:
    """One session's figures at one moment."""

    mode: Mode
    mode_switches: int
    streams: int
    target_streams: int
    goodput_sent_bps: float | None  # latest sample
    goodput_received_bps: float | None
    rtt_s: float | None  # smoothed PING RTT
    min_rtt_s: float | None  # the detector's windowed minimum
    bytes_sent: int  # acknowledged by the peer
    bytes_received: int  # delivered in order
    buffered_bytes: int  # written, not yet acknowledged
    budget_bytes: int
    chunks_retransmitted: int
    tcp_retransmits: int
    tcp_segments: int
    streams_lost: int
    channels: int


class TransportObserver:
    """Hooks called by a session; every method does nothing unless overridden."""

    def session_opened(self, mode: Mode) -> None:
        """The session started with this (initial) mode."""

    def session_closed(self, mode: Mode) -> None:
        """The session ended in this mode."""

    def goodput(self, sample: GoodputSample) -> None:
        """A goodput sample (both directions) was taken."""

    def bytes_moved(self, sent: int, received: int) -> None:
        """Bytes acknowledged by the peer and delivered to us since the previous call."""

    def rtt(self, rtt_s: float) -> None:
        """A PING/PONG round trip completed."""

    def streams(self, live: int, delta: int) -> None:
        """A stream joined (+1) or left (-1); ``live`` is the session's count after it."""

    def stream_lost(self, cause: str) -> None:
        """A stream failed mid-session: ``reset``, ``closed``, ``stalled`` or ``protocol``."""

    def retransmitted(self, chunks: int) -> None:
        """Chunks were resent after their stream was lost."""

    def tcp_retransmits(self, segments: int) -> None:
        """The kernel retransmitted segments on the session's streams (TCP_INFO)."""

    def mode_changed(self, change: ModeChange) -> None:
        """The mode detector switched the session's mode."""

    def stream_target(self, change: StreamCountChange) -> None:
        """The stream-count controller changed its target."""


class PrometheusObserver(TransportObserver):
    """Feeds ``novacron.observability.metrics``; one instance per session (it remembers the
    session's share of the summed goodput gauge and of the stream gauge, to remove it at the end)."""

    def __init__(self) -> None:
        self._goodput = {"sent": 0.0, "received": 0.0}
        self._streams = 0

    def session_opened(self, mode: Mode) -> None:
        registry.session_opened(mode.value)

    def session_closed(self, mode: Mode) -> None:
        registry.session_closed(mode.value)
        for direction, value in self._goodput.items():
            registry.TRANSPORT_GOODPUT.labels(direction).dec(value)
        self._goodput = {"sent": 0.0, "received": 0.0}
        registry.TRANSPORT_STREAMS.dec(self._streams)
        self._streams = 0

    def goodput(self, sample: GoodputSample) -> None:
        for direction, value in (("sent", sample.sent_bps), ("received", sample.received_bps)):
            registry.TRANSPORT_GOODPUT.labels(direction).inc(value - self._goodput[direction])
            self._goodput[direction] = value

    def bytes_moved(self, sent: int, received: int) -> None:
        if sent:
            registry.TRANSPORT_BYTES.labels("sent").inc(sent)
        if received:
            registry.TRANSPORT_BYTES.labels("received").inc(received)

    def rtt(self, rtt_s: float) -> None:
        registry.TRANSPORT_RTT.observe(rtt_s)

    def streams(self, live: int, delta: int) -> None:
        registry.TRANSPORT_STREAMS.inc(delta)
        self._streams += delta

    def stream_lost(self, cause: str) -> None:
        registry.TRANSPORT_STREAM_FAILURES.labels(registry.check_loss_cause(cause)).inc()

    def retransmitted(self, chunks: int) -> None:
        registry.TRANSPORT_CHUNKS_RETRANSMITTED.inc(chunks)

    def tcp_retransmits(self, segments: int) -> None:
        registry.TRANSPORT_TCP_RETRANSMITS.inc(segments)

    def mode_changed(self, change: ModeChange) -> None:
        registry.mode_switched(change.previous.value, change.mode.value)

    def stream_target(self, change: StreamCountChange) -> None:
        if change.previous:
            direction = "up" if change.target > change.previous else "down"
            registry.TRANSPORT_STREAM_TARGET_CHANGES.labels(direction).inc()
