"""The send half of one channel: bytes in, numbered chunks out, acknowledgements in. Sans-IO.

Bytes written by the application wait in ``pending`` (as given, not copied) until a stream asks for
work; only then are they cut into a chunk, so small writes made while the streams were busy travel
together. A chunk keeps its sequence number, byte offset and payload until the receiver acknowledges
it, cumulatively (``next_seq``) or selectively (SACK ranges). Chunks sent on a stream that died are
queued for retransmission on another one; the receiver drops duplicates, so resending a chunk that
did arrive is harmless.

Flow control works on byte offsets: the receiver advertises ``window`` bytes beyond the offset of chunk
``next_seq``; the sender keeps the largest right edge it was ever given (right edges never move left,
so a stale ACK that overtook a newer one on another stream cannot shrink it).

The CHANNEL_CLOSE frame occupies the sequence number after the last chunk: an ACK with ``next_seq`` one
beyond it says the receiver has every chunk and the close. An abort works the same way, without the
data.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from novacron.dwcp.errors import ProtocolError, ProtocolErrorKind
from novacron.dwcp.frames.codec import Payload
from novacron.dwcp.transport.config import INITIAL_CHANNEL_WINDOW
from novacron.dwcp.transport.errors import ChannelClosedError


@dataclass(slots=True, eq=False)
class Chunk:
    """One numbered piece of a channel's byte stream, kept until acknowledged."""

    seq: int
    offset: int
    size: int
    payload: Payload
    stream: int | None  # where it last went; None while it waits for (re)transmission
    sent_at: float
    transmissions: int = 1
    acked: bool = False  # cumulatively or selectively acknowledged (payload released)


@dataclass(frozen=True, slots=True)
class AckResult:
    """What one ACK changed."""

    acked_bytes: int  # payload bytes acknowledged for the first time
    acked_chunks: int
    fin_acked: bool  # the CHANNEL_CLOSE (or abort) was acknowledged by this ACK
    window_opened: bool  # the right edge moved
    timed: tuple[Chunk, ...] = ()  # newly acknowledged chunks sent only once (Karn: their timing is clean)


def _violation(message: str, channel: int, **context: object) -> ProtocolError:
    return ProtocolError(message, what=ProtocolErrorKind.MALFORMED, frame="ACK", channel=channel, **context)


class ChannelSender:
    """Send state of one channel. See the module docstring."""

    def __init__(self, channel: int) -> None:
        self.channel = channel
        self._pending: deque[memoryview] = deque()
        self.pending_bytes = 0
        self.next_seq = 0
        self.next_offset = 0
        self.acked_below = 0
        self.unacked: dict[int, Chunk] = {}  # seq order (inserted in order), seq >= acked_below
        self.inflight_bytes = 0  # sent, not acknowledged in any way
        self.sacked_bytes = 0  # selectively acknowledged beyond the cumulative point (the peer holds them)
        self.right_edge = INITIAL_CHANNEL_WINDOW
        self._retransmit: deque[Chunk] = deque()
        self.acked_bytes = 0  # total, for goodput and drain()
        self.written_bytes = 0
        self.retransmitted_chunks = 0
        # close / abort
        self.closing = False
        self.aborted = False
        self.fin_seq: int | None = None
        self.fin_stream: int | None = None  # stream the CLOSE last went on; None: (re)send due
        self.fin_acked = False

    # ---- application side ----

    def write(self, data: Payload) -> None:
        if self.closing or self.aborted:
            raise ChannelClosedError("channel is closed for writing", channel=self.channel)
        view = data if isinstance(data, memoryview) else memoryview(data)
        if view.nbytes:
            self._pending.append(view.cast("B") if view.format != "B" or view.ndim != 1 else view)
            self.pending_bytes += view.nbytes
            self.written_bytes += view.nbytes

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        """Drop everything unsent and unacknowledged; the abort occupies the next sequence number."""
        self._release_all()
        self.aborted = self.closing = True
        if self.fin_seq is None:
            self.fin_seq = self.next_seq
        self.fin_stream = None
        self.fin_acked = False

    def silence(self) -> None:
        """The peer aborted the channel: drop everything and owe nothing."""
        self._release_all()
        self.aborted = self.closing = True
        self.fin_acked = True

    def _release_all(self) -> None:
        self.sacked_bytes = 0
        self._pending.clear()
        self.pending_bytes = 0
        self.unacked.clear()
        self._retransmit.clear()
        self.inflight_bytes = 0

    @property
    def buffered_bytes(self) -> int:
        """Bytes this channel holds for the peer: unsent plus sent and not yet acknowledged."""
        return self.pending_bytes + self.inflight_bytes

    @property
    def done(self) -> bool:
        """Nothing more to send or to wait for (close or abort acknowledged, or peer aborted)."""
        return self.fin_acked

    @property
    def all_acked(self) -> bool:
        return self.pending_bytes == 0 and self.inflight_bytes == 0 and not self._retransmit

    # ---- what a stream may take ----

    def window_room(self) -> int:
        return self.right_edge - self.next_offset

    def has_new_data(self, chunk_min: int) -> bool:
        """Whether a new chunk can be cut now (data pending and enough window for it)."""
        if self.pending_bytes == 0:
            return False
        return self.window_room() >= min(self.pending_bytes, chunk_min)

    def window_blocked(self, chunk_min: int) -> bool:
        return self.pending_bytes > 0 and not self.has_new_data(chunk_min)

    def take_chunk(self, limit: int, chunk_min: int, stream: int, now: float) -> Chunk | None:
        """Cut the next chunk (at most ``limit`` bytes, within the window) for ``stream``."""
        room = self.window_room()
        size = min(self.pending_bytes, limit, room)
        if size <= 0 or size < min(self.pending_bytes, limit, chunk_min):
            return None  # wait for the window rather than send a sliver
        payload = self._cut(size)
        chunk = Chunk(self.next_seq, self.next_offset, size, payload, stream, now)
        self.unacked[chunk.seq] = chunk
        self.inflight_bytes += size
        self.next_seq += 1
        self.next_offset += size
        return chunk

    def _cut(self, size: int) -> Payload:
        first = self._pending[0]
        if first.nbytes >= size:  # the common case for bulk writes: a slice, no copy
            if first.nbytes == size:
                self._pending.popleft()
            else:
                self._pending[0] = first[size:]
            self.pending_bytes -= size
            return first[:size]
        out = bytearray()
        while len(out) < size:
            piece = self._pending[0]
            need = size - len(out)
            if piece.nbytes <= need:
                out += piece
                self._pending.popleft()
            else:
                out += piece[:need]
                self._pending[0] = piece[need:]
        self.pending_bytes -= size
        return out

    @property
    def has_retransmit(self) -> bool:
        return bool(self._retransmit)

    def take_retransmit(self, stream: int, now: float) -> Chunk | None:
        while self._retransmit:
            chunk = self._retransmit.popleft()
            if chunk.acked or chunk.stream is not None:
                continue  # acknowledged (e.g. by SACK) while it waited
            chunk.stream = stream
            chunk.sent_at = now
            chunk.transmissions += 1
            self.retransmitted_chunks += 1
            return chunk
        return None

    @property
    def fin_due(self) -> bool:
        """A CHANNEL_CLOSE (or abort) must go out: after the last chunk, or again after a lost stream."""
        if self.fin_acked or not self.closing or self.fin_stream is not None:
            return False
        return self.aborted or self.pending_bytes == 0

    def take_fin(self, stream: int) -> int:
        """Mark the close as sent on ``stream``; returns the chunk count it announces."""
        if self.fin_seq is None:
            self.fin_seq = self.next_seq
        self.fin_stream = stream
        return self.fin_seq

    # ---- acknowledgements ----

    def on_ack(self, next_seq: int, window: int | None, sack: tuple[int, ...]) -> AckResult:
        """Apply one ACK; raises ProtocolError if it acknowledges anything never sent."""
        limit = self.next_seq if self.fin_seq is None else self.fin_seq + 1
        if next_seq > limit:
            raise _violation(
                "ACK for chunks that were never sent", self.channel, next_seq=next_seq, sent=limit
            )
        if len(sack) % 2:
            raise _violation("SACK list must hold start,end pairs", self.channel, items=len(sack))
        acked_bytes = acked_chunks = 0
        if self.aborted:
            fin = self.fin_seq is not None and next_seq > self.fin_seq and not self.fin_acked
            self.fin_acked = self.fin_acked or fin
            return AckResult(0, 0, fin, False)
        timed: list[Chunk] = []
        for seq in range(self.acked_below, min(next_seq, self.next_seq)):
            chunk = self.unacked.pop(seq)
            if chunk.acked:
                self.sacked_bytes -= chunk.size
            else:
                acked_bytes += self._mark_acked(chunk)
                acked_chunks += 1
                if chunk.transmissions == 1:
                    timed.append(chunk)
        self.acked_below = max(self.acked_below, min(next_seq, self.next_seq))
        for i in range(0, len(sack), 2):
            start, end = sack[i], sack[i + 1]
            if not next_seq < start < end <= self.next_seq:
                raise _violation(
                    "SACK range outside the chunks sent",
                    self.channel,
                    start=start,
                    end=end,
                    sent=self.next_seq,
                )
            for seq in range(max(start, self.acked_below), end):
                held = self.unacked.get(seq)
                if held is not None and not held.acked:
                    acked_bytes += self._mark_acked(held)
                    self.sacked_bytes += held.size
                    acked_chunks += 1
                    if held.transmissions == 1:
                        timed.append(held)
        fin = self.fin_seq is not None and next_seq > self.fin_seq and not self.fin_acked
        if fin:
            self.fin_acked = True
        opened = False
        if window is not None and next_seq >= self.acked_below:
            # Only the newest cumulative point tells us which byte offset the window starts from.
            nxt = self.unacked.get(next_seq)
            base = nxt.offset if nxt is not None else self.next_offset
            edge = base + window
            if edge > self.right_edge:
                self.right_edge = edge
                opened = True
        return AckResult(acked_bytes, acked_chunks, fin, opened, tuple(timed))

    def _mark_acked(self, chunk: Chunk) -> int:
        chunk.acked = True
        chunk.payload = b""
        self.inflight_bytes -= chunk.size
        self.acked_bytes += chunk.size
        return chunk.size

    # ---- stream failure ----

    def blocking_chunk(self) -> tuple[Chunk, int] | None:
        """The oldest unacknowledged chunk, if later ones were already selectively acknowledged (the
        receiver is holding data behind it), with the bytes it holds back (``held_behind``)."""
        head = self.unacked.get(self.acked_below)
        if head is None or head.acked or head.stream is None or not self.sacked_bytes:
            return None
        return head, self.sacked_bytes

    def reinject_late(self, stream: int, sent_before: float, max_transmissions: int) -> int:
        """Send again, on other streams, every unacknowledged chunk that went out on ``stream``
        before ``sent_before`` (the stream is stuck; its TCP may still deliver them: duplicates are
        dropped by the receiver). Returns how many were queued."""
        late = [
            c
            for c in self.unacked.values()
            if c.stream == stream
            and not c.acked
            and c.sent_at <= sent_before
            and c.transmissions < max_transmissions
        ]
        for chunk in late:
            chunk.stream = None
        if late:
            self._retransmit = deque(sorted([*self._retransmit, *late], key=lambda c: c.seq))
        return len(late)

    def on_stream_lost(self, stream: int) -> int:
        """Queue every unacknowledged chunk last sent on ``stream`` for retransmission."""
        lost = [c for c in self.unacked.values() if c.stream == stream and not c.acked]
        for chunk in lost:
            chunk.stream = None
        if lost:
            merged = sorted([*self._retransmit, *lost], key=lambda c: c.seq)
            self._retransmit = deque(merged)
        if self.fin_stream == stream and not self.fin_acked:
            self.fin_stream = None
        return len(lost)
