"""The AMST session core: logical channels multiplexed over 1..N streams. Sans-IO.

The core never touches a socket or a clock. The asyncio session (``session.py``) and the tests'
simulator drive it the same way:

* streams come and go: :meth:`AmstCore.add_stream`, :meth:`remove_stream` (it died: everything it
  carried that is not acknowledged goes out again on the others), :meth:`drain_stream` (retire it
  gracefully: no new work, :class:`StreamDrained` once nothing on it is unacknowledged);
* frames in: :meth:`receive_frame` (DATA, ACK, PING, PONG, CHANNEL_OPEN, CHANNEL_CLOSE);
* frames out, pulled by each stream when it can take more: :meth:`frames_to_send`. A stream that
  drains faster pulls more often, so striping follows each stream's real rate and a slow stream
  holds only what it pulled (its kernel queue is kept short, see ``tuning.py``);
* time: :meth:`get_timer` / :meth:`handle_timer` (delayed ACKs, pings, stall detection);
* the application: :meth:`open_channel`, :meth:`write`, :meth:`read`, :meth:`close_channel`,
  :meth:`abort_channel`, and the events of :meth:`next_event`.

Reliability. TCP delivers in order what a live stream carries; what a stream carried when it died is
unknown. So every chunk, every CHANNEL_OPEN and every CHANNEL_CLOSE is kept until the peer
acknowledges it (an ACK on the channel proves the OPEN arrived, because a receiver only acknowledges
a channel it knows; the close occupies a sequence number), and resent on another stream when its
stream is lost. The receiver drops duplicates and answers them with an ACK, and every lost stream
makes both sides re-acknowledge all channels, so an ACK lost with a stream is replaced.

Channel ids: the session opener allocates odd ids, the acceptor even ones, each in increasing order,
never reused. Frames of a peer channel may arrive before its CHANNEL_OPEN (another stream was
faster): they are held, within the initial window, until it arrives.

Memory. Receive side: per channel the granted window (at most ``channel_window``); every channel
keeps its initial window, and grants beyond it are bounded per session by ``session_window``, so a
session holds at most ``session_window + channels x INITIAL_CHANNEL_WINDOW``. Send side: the
application may not write while the bytes held for the peer (unsent + unacknowledged) exceed the
session's ``budget``, which the path monitor keeps near ``k x bandwidth x RTT``.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from enum import StrEnum

from novacron.dwcp.errors import ProtocolError, ProtocolErrorKind
from novacron.dwcp.frames.codec import Frame, Payload
from novacron.dwcp.frames.limits import MAX_CHANNEL_ID, MAX_U64
from novacron.dwcp.frames.messages import (
    FLAG_ACK_REQUESTED,
    Ack,
    ChannelClose,
    ChannelOpen,
    DataChunk,
    Ping,
    Pong,
)
from novacron.dwcp.transport.config import DEFAULT_CONFIG, INITIAL_CHANNEL_WINDOW, AmstConfig
from novacron.dwcp.transport.errors import (
    ChannelClosedError,
    ChannelLimitError,
    TransportConfigError,
)
from novacron.dwcp.transport.receiver import ChannelReceiver
from novacron.dwcp.transport.sender import ChannelSender, Chunk

NS = 1_000_000_000
MAX_PENDING_RTT_SAMPLES = 256
MAX_REASON_BYTES = 1024
SLOW_STREAM_FACTOR = 3.0  # chunk latency above this multiple of the best stream's: carry probes only
SLOW_STREAM_MIN_GAP_S = 0.005  # ...and above it by at least this (sub-ms noise on fast paths)
SLOW_STREAM_PROBE_S = 0.5  # a slow stream still gets one small chunk this often, to measure it again
LATENCY_GAIN = 0.25  # EWMA weight of a new chunk-latency sample
REINJECT_FACTOR = 1.5  # the head chunk is late after this multiple of the best stream's chunk latency
REINJECT_FLOOR_S = 0.02
REINJECT_BACKLOG = 0.25  # ...and worth resending once the data held behind it fills this much of the window
MAX_TRANSMISSIONS = 3  # a late head chunk is re-sent at most twice (a lost stream's chunks always are)


class Role(StrEnum):
    OPENER = "opener"  # opened the session (DWCP client): odd channel ids
    ACCEPTOR = "acceptor"  # accepted it (DWCP server): even channel ids


# ------------------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class ChannelOpened:
    """The peer opened a channel (its CHANNEL_OPEN arrived)."""

    channel: int
    kind: str
    label: str | None
    expected_bytes: int | None


@dataclass(frozen=True, slots=True)
class ChannelEnded:
    """A channel left the session: both directions finished, or it was aborted."""

    channel: int
    aborted: bool
    reason: str | None
    by_peer: bool


@dataclass(frozen=True, slots=True)
class StreamStalled:
    """Something sent on the stream has waited longer than the stall timeout: treat it as dead."""

    stream: int
    waited_s: float


@dataclass(frozen=True, slots=True)
class StreamDrained:
    """A stream being retired has nothing unacknowledged left: close it."""

    stream: int


CoreEvent = ChannelOpened | ChannelEnded | StreamStalled | StreamDrained


@dataclass(frozen=True, slots=True)
class RttSample:
    stream: int
    rtt_s: float
    at: float


@dataclass(slots=True)
class CoreCounters:
    """Totals since the session started (metrics read them)."""

    bytes_written: int = 0
    bytes_acked: int = 0
    bytes_delivered: int = 0
    bytes_read: int = 0
    chunks_sent: int = 0
    chunks_retransmitted: int = 0
    chunks_reinjected: int = 0  # of which: late head chunks re-sent while their stream lived
    chunks_duplicate: int = 0
    streams_lost: int = 0
    acks_sent: int = 0
    acks_received: int = 0
    control_resent: int = 0


# ------------------------------------------------------------------------------------ inner state


@dataclass(slots=True, eq=False)
class _Channel:
    id: int
    local: bool  # opened by us
    sender: ChannelSender
    receiver: ChannelReceiver
    kind: str = ""
    label: str | None = None
    expected_bytes: int | None = None
    announced: bool = False  # peer channel: its CHANNEL_OPEN arrived
    open_stream: int | None = None  # local channel: stream the OPEN went on (None: due)
    open_acked: bool = False
    abort_reason: str | None = None
    aborted_by_peer: bool = False
    close_reason: str | None = None
    last_ack_stream: int | None = None


@dataclass(slots=True, eq=False)
class _Stream:
    id: int
    added_at: float
    draining: bool = False
    stalled: bool = False
    sent_chunks: deque[tuple[int, Chunk]] = field(default_factory=deque)  # (channel, chunk), send order
    bytes_sent: int = 0
    frames_sent: int = 0
    ping_due: bool = True
    ping_id: int | None = None  # outstanding
    ping_sent_at: float = 0.0
    pings_sent: int = 0
    next_ping_at: float = 0.0
    pong: Pong | None = None  # answer owed on this stream (the latest ping only)
    rtt_s: float | None = None
    latency_s: float | None = None  # EWMA of chunk send -> acknowledgement on this stream
    last_probe_at: float = float("-inf")


def _channel_error(message: str, channel: int, frame: str) -> ProtocolError:
    return ProtocolError(message, what=ProtocolErrorKind.MALFORMED, frame=frame, channel=channel)


def _truncate(text: str | None) -> str | None:
    if text is None:
        return None
    raw = text.encode("utf-8")
    if len(raw) <= MAX_REASON_BYTES:
        return text
    return raw[:MAX_REASON_BYTES].decode("utf-8", "ignore")


class AmstCore:
    """One side of an AMST session. See the module docstring."""

    def __init__(
        self,
        role: Role,
        now: float,
        *,
        config: AmstConfig = DEFAULT_CONFIG,
        max_frame_size: int,
    ) -> None:
        self.role = role
        self.config = config
        self._chunk_limit = config.chunk_limit(max_frame_size)
        if self._chunk_limit < config.chunk_min:
            raise TransportConfigError(
                "negotiated frame size is too small for chunk_min",
                max_frame_size=max_frame_size,
                chunk_min=config.chunk_min,
            )
        self._channels: dict[int, _Channel] = {}
        self._next_local = 1 if role is Role.OPENER else 2
        self._peer_parity = 0 if role is Role.OPENER else 1
        self._peer_max_seen = 0
        self._peer_gaps: set[int] = set()  # peer ids below the highest seen that have not appeared yet
        self._finished: OrderedDict[int, int] = OrderedDict()  # channel -> the ACK next_seq to repeat
        self._finished_acks: dict[int, int] = {}  # duplicate of a finished channel seen: ACK owed
        self._finished_last_ack: OrderedDict[int, int | None] = OrderedDict()  # channel -> stream
        self._streams: dict[int, _Stream] = {}
        self._ctl_due: dict[int, None] = {}  # channels with a control frame to send (ordered set)
        self._retx: dict[int, None] = {}  # channels with chunks to retransmit
        self._sendable: dict[int, None] = {}  # channels with pending bytes
        self._events: deque[CoreEvent] = deque()
        self.rtt_samples: deque[RttSample] = deque(maxlen=MAX_PENDING_RTT_SAMPLES)
        self.counters = CoreCounters()
        self.budget = config.budget_initial
        self._buffered = 0  # sum of senders' buffered bytes
        self._granted = 0  # sum of receivers' grants
        self._rate_bps: float | None = None
        self._srtt: float | None = None
        self._ping_seq = 0
        self._app_limited = False
        self._window_limited = False
        self._failed: ProtocolError | None = None
        self._started_at = now

    # ================================================================================ properties

    @property
    def streams(self) -> tuple[int, ...]:
        return tuple(self._streams)

    @property
    def live_streams(self) -> int:
        """Streams that take new work (not being retired)."""
        return sum(1 for s in self._streams.values() if not s.draining)

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for the peer: written and not yet acknowledged (the send budget counts these)."""
        return self._buffered

    @property
    def granted_bytes(self) -> int:
        """Receive memory promised to the peer over all channels."""
        return self._granted

    @property
    def held_bytes(self) -> int:
        """Receive memory in use: reordered plus unread bytes over all channels."""
        return sum(c.receiver.held_bytes for c in self._channels.values())

    @property
    def write_room(self) -> int:
        return self.budget - self._buffered

    @property
    def srtt_s(self) -> float | None:
        return self._srtt

    @property
    def chunk_size(self) -> int:
        """Chunk size for new data: about ``chunk_target_s`` of one stream's share of the rate."""
        c = self.config
        if self._rate_bps is None:
            size = c.chunk_initial
        else:
            per_stream = self._rate_bps / 8 / max(1, self.live_streams)
            size = int(per_stream * c.chunk_target_s)
        return max(c.chunk_min, min(self._chunk_limit, size))

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(self._channels)

    def set_rate_estimate(self, bps: float | None) -> None:
        self._rate_bps = bps if bps is None or (math.isfinite(bps) and bps > 0) else None

    def set_budget(self, nbytes: int) -> None:
        c = self.config
        self.budget = max(c.budget_floor, min(c.budget_max, int(nbytes)))

    def take_limit_flags(self) -> tuple[bool, bool]:
        """(application-limited, window-limited) since the previous call: a stream wanted data and
        the application had none (with budget to spare), or the receiver's window held it back."""
        flags = (self._app_limited, self._window_limited)
        self._app_limited = self._window_limited = False
        return flags

    def next_event(self) -> CoreEvent | None:
        return self._events.popleft() if self._events else None

    def stream_stats(self, stream: int) -> tuple[int, int, float | None]:
        """(bytes sent, frames sent, last ping RTT) of one stream."""
        s = self._streams[stream]
        return s.bytes_sent, s.frames_sent, s.rtt_s

    # =================================================================================== streams

    def add_stream(self, stream: int, now: float) -> None:
        if stream in self._streams:
            raise TransportConfigError("stream already in the session", stream=stream)
        self._streams[stream] = _Stream(stream, now, next_ping_at=now)
        # Something may have waited for a stream: re-announce channel state on it.
        for ch in self._channels.values():
            if ch.local and not ch.open_acked:
                ch.open_stream = None
                self._ctl_due[ch.id] = None

    def remove_stream(self, stream: int, now: float) -> int:
        """The stream is gone (died or closed): resend what it carried. Returns chunks requeued."""
        s = self._streams.pop(stream, None)
        if s is None:
            return 0
        self.counters.streams_lost += 1
        requeued = 0
        for ch in self._channels.values():
            n = ch.sender.on_stream_lost(stream)
            if n:
                requeued += n
                self._retx[ch.id] = None
            if ch.sender.fin_due:
                self._ctl_due[ch.id] = None
                self.counters.control_resent += 1
            if ch.local and not ch.open_acked and ch.open_stream == stream:
                ch.open_stream = None
                self._ctl_due[ch.id] = None
                self.counters.control_resent += 1
            # ACKs it carried may be lost: acknowledge again everything we know.
            if ch.announced or ch.local:
                ch.receiver.ack_due = True
                self._ctl_due[ch.id] = None
        # A finished channel's last ACK may have gone down with the stream; the peer, whose stream
        # carrying the CLOSE may still be alive, would never ask again.
        for cid, last in self._finished_last_ack.items():
            if last == stream and cid in self._finished:
                self._finished_acks[cid] = self._finished[cid]
        return requeued

    def drain_stream(self, stream: int, now: float) -> None:
        """Retire a stream: it takes no new work; StreamDrained once nothing on it is unacknowledged."""
        s = self._streams.get(stream)
        if s is None or s.draining:
            return
        s.draining = True
        self._check_drained(s)

    def _check_drained(self, s: _Stream) -> None:
        if not s.draining:
            return
        self._trim_sent(s)
        if not s.sent_chunks and not self._stream_holds_control(s.id):
            s.draining = False  # report once; the stream is closed next
            s.stalled = True
            self._events.append(StreamDrained(s.id))

    def _stream_holds_control(self, stream: int) -> bool:
        for ch in self._channels.values():
            if ch.local and not ch.open_acked and ch.open_stream == stream:
                return True
            if ch.sender.fin_stream == stream and not ch.sender.fin_acked:
                return True
        return False

    @staticmethod
    def _trim_sent(s: _Stream) -> None:
        q = s.sent_chunks
        while q and (q[0][1].acked or q[0][1].stream != s.id):
            q.popleft()

    # ================================================================================== channels

    def open_channel(
        self, kind: str, now: float, label: str | None = None, expected_bytes: int | None = None
    ) -> int:
        """Open a channel to the peer; returns its id. Data may be written at once."""
        if len(self._channels) >= self.config.max_channels:
            raise ChannelLimitError(
                f"session holds its maximum of {self.config.max_channels} channels",
                max_channels=self.config.max_channels,
            )
        if not kind or len(kind.encode("utf-8")) > 32:
            raise TransportConfigError("channel kind must be 1..32 bytes", kind=kind)
        if self._next_local > MAX_CHANNEL_ID:
            raise ChannelLimitError("session ran out of channel ids; open a new session")
        cid = self._next_local
        self._next_local += 2
        ch = self._new_channel(cid, local=True)
        ch.kind, ch.label, ch.expected_bytes = kind, _truncate(label), expected_bytes
        self._regrant(ch)  # the ACK that carries the full window follows the OPEN on the same stream
        self._ctl_due[cid] = None
        return cid

    def _new_channel(self, cid: int, *, local: bool) -> _Channel:
        ch = _Channel(
            cid,
            local,
            ChannelSender(cid),
            ChannelReceiver(cid, max_reorder_chunks=self.config.max_reorder_chunks),
        )
        self._channels[cid] = ch
        self._granted += INITIAL_CHANNEL_WINDOW
        return ch

    def _channel(self, cid: int) -> _Channel:
        ch = self._channels.get(cid)
        if ch is None:
            raise ChannelClosedError("no such channel in the session (finished or never opened)", channel=cid)
        return ch

    def write(self, cid: int, data: Payload) -> None:
        """Queue bytes on a channel. The caller checks :attr:`write_room` first (backpressure)."""
        ch = self._channel(cid)
        if ch.abort_reason is not None:
            raise ChannelClosedError("channel was aborted", channel=cid, reason=ch.abort_reason)
        if ch.sender.closing:
            raise ChannelClosedError("channel is closed for writing", channel=cid)
        before = ch.sender.pending_bytes
        ch.sender.write(data)
        added = ch.sender.pending_bytes - before
        self._buffered += added
        self.counters.bytes_written += added
        if added:
            self._sendable[cid] = None

    def close_channel(self, cid: int, reason: str | None = None) -> None:
        """Half-close: no more writes; the peer reads to EOF after the data already written."""
        ch = self._channel(cid)
        if ch.sender.closing:
            return
        ch.close_reason = _truncate(reason)
        ch.sender.close()
        if ch.sender.fin_due:
            self._ctl_due[cid] = None

    def abort_channel(self, cid: int, reason: str) -> None:
        """Abort both directions: unsent and unread data are dropped; the peer sees the reason."""
        ch = self._channels.get(cid)
        if ch is None or ch.abort_reason is not None:
            return
        ch.abort_reason = _truncate(reason) or "aborted"
        self._buffered -= ch.sender.buffered_bytes
        ch.sender.abort()
        self._granted -= ch.receiver.abort()
        self._sendable.pop(cid, None)
        self._retx.pop(cid, None)
        self._ctl_due[cid] = None

    def read(self, cid: int, n: int) -> bytes:
        ch = self._channel(cid)
        data = ch.receiver.read(n)
        if data:
            self._granted -= len(data)
            self.counters.bytes_read += len(data)
            self._regrant(ch)
            self._maybe_finish(ch)
        return data

    def readable_bytes(self, cid: int) -> int:
        ch = self._channels.get(cid)
        return ch.receiver.unread_bytes if ch is not None else 0

    def at_eof(self, cid: int) -> bool:
        ch = self._channels.get(cid)
        return ch is None or ch.receiver.at_eof

    def unacknowledged(self) -> bool:
        """Whether anything sent still waits for the peer's acknowledgement (data, OPEN, CLOSE)."""
        if self._buffered:
            return True
        for ch in self._channels.values():
            if ch.abort_reason is not None:
                if not ch.aborted_by_peer and not ch.sender.fin_acked:
                    return True
                continue
            if ch.local and not ch.open_acked:
                return True
            if ch.sender.closing and not ch.sender.fin_acked:
                return True
        return False

    def channel_buffered(self, cid: int) -> int:
        ch = self._channels.get(cid)
        return ch.sender.buffered_bytes if ch is not None else 0

    def channel_abort_reason(self, cid: int) -> tuple[str, bool] | None:
        ch = self._channels.get(cid)
        if ch is None or ch.abort_reason is None:
            return None
        return ch.abort_reason, ch.aborted_by_peer

    def write_closed(self, cid: int) -> bool:
        ch = self._channels.get(cid)
        return ch is None or ch.sender.closing

    def _extra_granted(self) -> int:
        return sum(max(0, ch.receiver.grant - INITIAL_CHANNEL_WINDOW) for ch in self._channels.values())

    def _regrant(self, ch: _Channel) -> None:
        """Give a channel its window back: its initial window always (so no channel can starve),
        more up to ``channel_window`` while the session's extra grants stay within ``session_window``."""
        c = self.config
        want = ch.receiver.want_grant(c.channel_window)
        if want <= 0:
            return
        base = max(0, INITIAL_CHANNEL_WINDOW - ch.receiver.grant)
        extra = min(want - base, c.session_window - self._extra_granted())
        give = base + max(0, extra)
        if give <= 0:
            return
        ch.receiver.extend(give, self.chunk_size)
        self._granted += give
        if ch.receiver.ack_due and self._may_ack(ch):
            self._ctl_due[ch.id] = None

    @staticmethod
    def _may_ack(ch: _Channel) -> bool:
        """A peer channel is acknowledged only once its OPEN arrived (an ACK proves the OPEN) or the
        peer aborted it (the abort must be acknowledged even if the OPEN never came)."""
        return ch.local or ch.announced or ch.aborted_by_peer

    def _regrant_all(self) -> None:
        for ch in self._channels.values():
            if self._may_ack(ch):
                self._regrant(ch)

    def _maybe_finish(self, ch: _Channel) -> None:
        if not (ch.sender.done and ch.receiver.done):
            return
        if ch.local and not ch.open_acked and ch.abort_reason is None:
            return
        del self._channels[ch.id]
        self._granted -= ch.receiver.grant if not ch.receiver.aborted else 0
        self._buffered -= ch.sender.buffered_bytes
        self._ctl_due.pop(ch.id, None)
        self._retx.pop(ch.id, None)
        self._sendable.pop(ch.id, None)
        self._finished[ch.id] = ch.receiver.ack_next
        self._finished_last_ack[ch.id] = ch.last_ack_stream
        while len(self._finished) > self.config.finished_channels_remembered:
            gone, _ = self._finished.popitem(last=False)
            self._finished_last_ack.pop(gone, None)
        self._events.append(
            ChannelEnded(ch.id, ch.abort_reason is not None, ch.abort_reason, ch.aborted_by_peer)
        )
        self._regrant_all()

    # ============================================================================== frames in

    def receive_frame(self, stream: int, frame: Frame, now: float) -> None:
        """Apply one frame that arrived on ``stream``. Raises ProtocolError if the peer broke a rule."""
        if self._failed is not None:
            raise self._failed
        try:
            self._receive(stream, frame, now)
        except ProtocolError as exc:
            exc.context.setdefault("stream", stream)
            self._failed = exc
            raise

    def _receive(self, stream: int, frame: Frame, now: float) -> None:
        body = frame.body
        if isinstance(body, DataChunk):
            self._on_data(frame.channel, body.seq, frame.payload, frame.flags, now)
        elif isinstance(body, Ack):
            self._on_ack(frame.channel, body, now)
        elif isinstance(body, Ping):
            s = self._streams.get(stream)
            if s is not None:
                s.pong = Pong(ping_id=body.ping_id, sent_ns=body.sent_ns)
        elif isinstance(body, Pong):
            self._on_pong(stream, body, now)
        elif isinstance(body, ChannelOpen):
            self._on_open(frame.channel, body)
        elif isinstance(body, ChannelClose):
            self._on_close(frame.channel, body)
        else:
            raise ProtocolError(
                f"unexpected {type(body).__name__} frame on an established session",
                what=ProtocolErrorKind.ILLEGAL,
                frame=type(body).__name__,
            )

    def _peer_channel(self, cid: int, frame: str) -> _Channel | None:
        """The channel a peer frame refers to; creates a peer channel on its first frame; None if it
        finished (the frame is a late duplicate)."""
        ch = self._channels.get(cid)
        if ch is not None:
            return ch
        if cid in self._finished:
            self._finished_acks[cid] = self._finished[cid]
            return None
        if cid % 2 != self._peer_parity:
            if cid >= self._next_local:
                raise _channel_error(f"{frame} for a channel this side never opened", cid, frame)
            return None  # ours, finished long ago and forgotten
        if cid <= self._peer_max_seen:
            if cid not in self._peer_gaps:
                return None  # finished long ago and forgotten
            self._peer_gaps.discard(cid)
        else:
            skipped = range(self._peer_max_seen + 2 if self._peer_max_seen else 2 - self._peer_parity, cid, 2)
            if len(self._peer_gaps) + len(skipped) + len(self._channels) >= self.config.max_channels:
                raise ProtocolError(
                    f"peer opened more than {self.config.max_channels} channels",
                    what=ProtocolErrorKind.MALFORMED,
                    frame=frame,
                    channel=cid,
                )
            self._peer_gaps.update(skipped)
            self._peer_max_seen = cid
        if len(self._channels) >= self.config.max_channels:
            raise ProtocolError(
                f"peer opened more than {self.config.max_channels} channels",
                what=ProtocolErrorKind.MALFORMED,
                frame=frame,
                channel=cid,
            )
        return self._new_channel(cid, local=False)

    def _on_data(self, cid: int, seq: int, payload: Payload, flags: int, now: float) -> None:
        ch = self._peer_channel(cid, "DATA") if cid % 2 == self._peer_parity else self._channels.get(cid)
        if ch is None:
            if cid % 2 != self._peer_parity and cid >= self._next_local:
                raise _channel_error("DATA for a channel this side never opened", cid, "DATA")
            if cid in self._finished:
                self._finished_acks[cid] = self._finished[cid]
            return
        r = ch.receiver
        duplicates, delivered = r.duplicates, r.delivered_bytes
        c = self.config
        r.receive(
            seq,
            payload,
            now,
            ack_requested=bool(flags & FLAG_ACK_REQUESTED),
            ack_delay=c.ack_delay_s,
            ack_every=c.ack_every_bytes,
        )
        self.counters.chunks_duplicate += r.duplicates - duplicates
        self.counters.bytes_delivered += r.delivered_bytes - delivered
        if r.ack_due and self._may_ack(ch):
            self._ctl_due[cid] = None

    def _on_ack(self, cid: int, ack: Ack, now: float) -> None:
        self.counters.acks_received += 1
        ch = self._channels.get(cid)
        if ch is None:
            if cid % 2 != self._peer_parity and cid >= self._next_local:
                raise _channel_error("ACK for a channel this side never opened", cid, "ACK")
            return
        # (An ACK may precede the peer's CHANNEL_OPEN on another stream; the sender checks that it
        # acknowledges nothing that was never sent.)
        before = ch.sender.buffered_bytes
        result = ch.sender.on_ack(ack.next_seq, ack.window, ack.sack)
        self._buffered -= before - ch.sender.buffered_bytes
        self.counters.bytes_acked += result.acked_bytes
        if ch.local and not ch.open_acked:
            ch.open_acked = True
        for chunk in result.timed:
            s = self._streams.get(chunk.stream) if chunk.stream is not None else None
            if s is not None:
                sample = max(0.0, now - chunk.sent_at)
                s.latency_s = (
                    sample if s.latency_s is None else s.latency_s + LATENCY_GAIN * (sample - s.latency_s)
                )
        self._reinject_late_head(ch, now)
        if result.window_opened and ch.sender.pending_bytes:
            self._sendable[cid] = None
        if result.acked_chunks:
            for s in self._streams.values():
                if s.draining:
                    self._check_drained(s)
        self._maybe_finish(ch)

    def _reinject_late_head(self, ch: _Channel, now: float) -> None:
        """Later chunks arrived but the first missing one did not: its stream is stuck (typically a
        TCP retransmission timeout). Everything behind it waits in the receiver's reorder buffer, so
        send it again on another stream instead of waiting for TCP."""
        blocking = ch.sender.blocking_chunk()
        if blocking is None:
            return
        head, behind = blocking
        if head.transmissions >= MAX_TRANSMISSIONS or behind < REINJECT_BACKLOG * self.config.channel_window:
            return  # TCP's own recovery is cheaper than duplicates while the backlog is small
        latencies = [s.latency_s for s in self._streams.values() if s.latency_s is not None]
        typical = min(latencies) if latencies else self._srtt
        if typical is None:
            return
        late_after = max(REINJECT_FLOOR_S, REINJECT_FACTOR * typical)
        if now - head.sent_at < late_after or head.stream is None:
            return
        if sum(1 for s in self._streams.values() if not (s.draining or s.stalled)) < 2:
            return  # no other stream to carry it
        # Everything else that stream holds is just as late: resend it all now, not head by head.
        stuck = head.stream
        for other in self._channels.values():
            n = other.sender.reinject_late(stuck, now - late_after, MAX_TRANSMISSIONS)
            if n:
                self._retx[other.id] = None
                self.counters.chunks_reinjected += n

    def _on_open(self, cid: int, body: ChannelOpen) -> None:
        if cid % 2 != self._peer_parity:
            raise _channel_error("CHANNEL_OPEN with an id of this side's parity", cid, "CHANNEL_OPEN")
        ch = self._peer_channel(cid, "CHANNEL_OPEN")
        if ch is None:
            return
        if not ch.announced and ch.abort_reason is None:
            ch.announced = True
            ch.kind, ch.label, ch.expected_bytes = body.kind, body.label, body.expected_bytes
            self._events.append(ChannelOpened(cid, body.kind, body.label, body.expected_bytes))
            self._regrant(ch)
        ch.receiver.ack_due = True  # the ACK also tells the opener that the OPEN arrived
        self._ctl_due[cid] = None

    def _on_close(self, cid: int, body: ChannelClose) -> None:
        if cid % 2 == self._peer_parity:
            ch = self._peer_channel(cid, "CHANNEL_CLOSE")
        else:
            ch = self._channels.get(cid)
            if ch is None and cid >= self._next_local:
                raise _channel_error(
                    "CHANNEL_CLOSE for a channel this side never opened", cid, "CHANNEL_CLOSE"
                )
        if ch is None:
            return
        if body.aborted:
            first = ch.abort_reason is None
            if first:
                ch.abort_reason = body.reason or "aborted by peer"
                ch.aborted_by_peer = True
                self._buffered -= ch.sender.buffered_bytes
                ch.sender.silence()
                self._sendable.pop(cid, None)
                self._retx.pop(cid, None)
            released = ch.receiver.grant if not ch.receiver.aborted else 0
            ch.receiver.on_close(body.next_seq, aborted=True)
            self._granted -= released
        else:
            ch.receiver.on_close(body.next_seq, aborted=False)
        if self._may_ack(ch):
            self._ctl_due[cid] = None
        self._maybe_finish(ch)

    def _on_pong(self, stream: int, body: Pong, now: float) -> None:
        s = self._streams.get(stream)
        if s is None or s.ping_id is None or body.ping_id != s.ping_id:
            return  # a late answer to a ping we no longer wait for
        rtt = max(1e-6, now - s.ping_sent_at)
        s.ping_id = None
        s.rtt_s = rtt
        self._srtt = rtt if self._srtt is None else 0.875 * self._srtt + 0.125 * rtt
        self.rtt_samples.append(RttSample(stream, rtt, now))
        c = self.config
        interval = c.ping_startup_interval_s if s.pings_sent < c.ping_startup_count else c.ping_interval_s
        s.next_ping_at = now + interval

    # ============================================================================= frames out

    def has_work(self, stream: int, now: float) -> bool:
        """Whether :meth:`frames_to_send` would return something for ``stream`` now."""
        s = self._streams.get(stream)
        if s is None:
            return False
        if s.pong is not None or (s.ping_due and s.ping_id is None and not s.stalled) or self._finished_acks:
            return True
        if self._ctl_due and self._control_pending(reliable=not (s.draining or s.stalled)):
            return True
        if s.draining or s.stalled or not self._may_take_data(s, now):
            return False
        if self._retx:
            return True
        cmin = self.config.chunk_min
        return any(self._channels[cid].sender.has_new_data(cmin) for cid in self._sendable)

    def _control_pending(self, *, reliable: bool) -> bool:
        for cid in self._ctl_due:
            ch = self._channels.get(cid)
            if ch is None:
                return True  # stale entry: one pull clears it
            if ch.receiver.ack_due and self._may_ack(ch):
                return True
            if reliable and (
                (ch.local and not ch.open_acked and ch.open_stream is None)
                or (ch.sender.fin_due and (ch.local or ch.announced))
            ):
                return True
        return False

    def _is_slow(self, s: _Stream) -> bool:
        """Much slower than the best other stream: chunks sent on it would hold up reassembly."""
        if s.latency_s is None:
            return False
        others = [
            t.latency_s
            for t in self._streams.values()
            if t is not s and t.latency_s is not None and not (t.draining or t.stalled)
        ]
        if not others:
            return False
        best = min(others)
        return s.latency_s > SLOW_STREAM_FACTOR * best and s.latency_s - best > SLOW_STREAM_MIN_GAP_S

    def _may_take_data(self, s: _Stream, now: float) -> bool:
        return not self._is_slow(s) or now - s.last_probe_at >= SLOW_STREAM_PROBE_S

    def frames_to_send(self, stream: int, now: float) -> list[Frame]:
        """Frames for ``stream`` to send now: control first, then retransmissions, then new data."""
        s = self._streams.get(stream)
        if s is None:
            return []
        out: list[Frame] = []
        if s.pong is not None:
            out.append(Frame(s.pong))
            s.pong = None
        if s.ping_due and s.ping_id is None and not s.stalled:
            self._ping_seq += 1
            s.ping_id = self._ping_seq
            s.ping_sent_at = now
            s.ping_due = False
            s.pings_sent += 1
            out.append(Frame(Ping(ping_id=s.ping_id, sent_ns=min(MAX_U64, max(0, int(now * NS))))))
        self._control_frames(s, out)
        if not (s.draining or s.stalled):
            self._data_frames(s, out, now)
        for frame in out:
            s.frames_sent += 1
            s.bytes_sent += len(frame.payload)
        return out

    def _control_frames(self, s: _Stream, out: list[Frame]) -> None:
        for cid, next_seq in self._finished_acks.items():
            out.append(Frame(Ack(next_seq=next_seq, window=0), channel=cid))
            self._finished_last_ack[cid] = s.id
        self._finished_acks.clear()
        if not self._ctl_due:
            return
        # A stream being retired carries ACKs (losing one is repaired) but nothing that must be
        # acknowledged itself, so that it can drain.
        reliable = not (s.draining or s.stalled)
        due, self._ctl_due = self._ctl_due, {}
        for cid in due:
            ch = self._channels.get(cid)
            if ch is None:
                continue
            keep = False
            if ch.local and not ch.open_acked and ch.open_stream is None:
                if reliable:
                    ch.open_stream = s.id
                    out.append(
                        Frame(
                            ChannelOpen(kind=ch.kind, label=ch.label, expected_bytes=ch.expected_bytes),
                            channel=cid,
                        )
                    )
                else:
                    keep = True
            r = ch.receiver
            if r.ack_due and self._may_ack(ch):
                out.append(Frame(r.make_ack(), channel=cid))
                ch.last_ack_stream = s.id
                self.counters.acks_sent += 1
            snd = ch.sender
            if snd.fin_due and (ch.local or ch.announced):
                if reliable:
                    aborted = ch.abort_reason is not None
                    n = snd.take_fin(s.id)
                    reason = ch.abort_reason if aborted else ch.close_reason
                    out.append(Frame(ChannelClose(next_seq=n, reason=reason, aborted=aborted), channel=cid))
                else:
                    keep = True
            if keep:
                self._ctl_due[cid] = None
            self._maybe_finish(ch)

    def _data_frames(self, s: _Stream, out: list[Frame], now: float) -> None:
        limit = self.chunk_size
        budget = limit * self.config.pull_chunks
        if self._is_slow(s):
            if now - s.last_probe_at < SLOW_STREAM_PROBE_S:
                return
            # One small chunk, to learn whether the stream got faster again.
            s.last_probe_at = now
            limit = budget = self.config.chunk_min
        sent = 0
        while self._retx and sent < budget:
            cid = next(iter(self._retx))
            ch = self._channels.get(cid)
            chunk = ch.sender.take_retransmit(s.id, now) if ch is not None else None
            if ch is None or chunk is None:
                self._retx.pop(cid, None)
                if ch is not None and ch.sender.fin_due:
                    self._ctl_due[cid] = None
                continue
            out.append(self._data_frame(ch, chunk, last=not ch.sender.has_retransmit))
            s.sent_chunks.append((cid, chunk))
            self.counters.chunks_retransmitted += 1
            sent += chunk.size
        if sent >= budget:
            return
        cmin = self.config.chunk_min
        progress = True
        while self._sendable and sent < budget and progress:
            progress = False
            for cid in list(self._sendable):  # one chunk per channel per round: fair interleaving
                ch = self._channels.get(cid)
                if ch is None or ch.sender.pending_bytes == 0:
                    self._sendable.pop(cid, None)
                    continue
                chunk = ch.sender.take_chunk(limit, cmin, s.id, now)
                if chunk is None:
                    self._window_limited = True
                    continue
                out.append(self._data_frame(ch, chunk, last=ch.sender.pending_bytes == 0))
                s.sent_chunks.append((cid, chunk))
                self.counters.chunks_sent += 1
                sent += chunk.size
                progress = True
                # Move the channel to the end so the next pull starts with another one.
                self._sendable.pop(cid, None)
                if ch.sender.pending_bytes:
                    self._sendable[cid] = None
                elif ch.sender.fin_due:
                    self._ctl_due[cid] = None
                if sent >= budget:
                    break
        if sent == 0 and not self._sendable and self._buffered < self.budget:
            self._app_limited = True

    @staticmethod
    def _data_frame(ch: _Channel, chunk: Chunk, *, last: bool) -> Frame:
        # Ask for a quick ACK when the channel's queue just emptied: drain() and the budget wait on it.
        flags = FLAG_ACK_REQUESTED if last else 0
        return Frame(DataChunk(seq=chunk.seq), channel=ch.id, flags=flags, payload=chunk.payload)

    # ================================================================================= timers

    def stall_timeout(self) -> float:
        c = self.config
        if self._srtt is None:
            return c.stall_timeout_s
        return max(c.stall_timeout_s, c.stall_rtt_factor * self._srtt)

    def get_timer(self) -> float | None:
        times: list[float] = []
        for ch in self._channels.values():
            if ch.receiver.ack_at is not None:
                times.append(ch.receiver.ack_at)
        stall = self.stall_timeout()
        for s in self._streams.values():
            if s.stalled:
                continue
            if s.ping_id is None and not s.ping_due:
                times.append(s.next_ping_at)
            oldest = self._oldest_outstanding(s)
            if oldest is not None:
                times.append(oldest + stall)
        return min(times) if times else None

    def _oldest_outstanding(self, s: _Stream) -> float | None:
        self._trim_sent(s)
        times = []
        if s.sent_chunks:
            times.append(s.sent_chunks[0][1].sent_at)
        if s.ping_id is not None:
            times.append(s.ping_sent_at)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        for ch in self._channels.values():
            r = ch.receiver
            if r.ack_at is not None and r.ack_at <= now:
                r.ack_at = None
                r.ack_due = True
                if self._may_ack(ch):
                    self._ctl_due[ch.id] = None
        stall = self.stall_timeout()
        for s in self._streams.values():
            if s.stalled:
                continue
            if s.ping_id is None and not s.ping_due and s.next_ping_at <= now:
                s.ping_due = True
            oldest = self._oldest_outstanding(s)
            if oldest is not None and now >= oldest + stall:  # the same sum get_timer() returned
                s.stalled = True
                self._events.append(StreamStalled(s.id, now - oldest))
            self._check_drained(s)
