"""The receive half of one channel: chunks in any order in, ordered bytes and ACKs out. Sans-IO.

Chunks arrive striped over several streams, so out of order; they wait in a reorder buffer until the
gap before them is filled, then move (as views, no copy) to the read buffer the application drains.
Memory is bounded by the window this side grants: the right edge ``read_offset + grant`` only ever
moves right, and a sender that sends beyond it breaks the protocol (checked on every chunk: the bytes
held, reordered plus unread, may never exceed the grant). The number of reordered chunks is bounded
too, so a peer cannot exhaust memory with tiny chunks.

ACK policy: at once when the sender asks (ACK_REQUESTED), on a duplicate (its ACK was probably lost
with a stream), on a close or abort, and after ``ack_every_bytes``; otherwise ``ack_delay_s`` after the
first unacknowledged chunk. Window updates after reads are sent when the advertised window fell below
a quarter of the grant or the right edge moved by a quarter of it.
"""

from __future__ import annotations

from collections import deque

from novacron.dwcp.errors import ProtocolError, ProtocolErrorKind
from novacron.dwcp.frames.codec import Payload
from novacron.dwcp.frames.messages import MAX_SACK_ITEMS, Ack
from novacron.dwcp.transport.config import INITIAL_CHANNEL_WINDOW

_MAX_SACK_RANGES = MAX_SACK_ITEMS // 2


def _violation(message: str, channel: int, frame: str = "DATA", **context: object) -> ProtocolError:
    return ProtocolError(message, what=ProtocolErrorKind.MALFORMED, frame=frame, channel=channel, **context)


class ChannelReceiver:
    """Receive state of one channel. See the module docstring."""

    def __init__(self, channel: int, *, max_reorder_chunks: int) -> None:
        self.channel = channel
        self._max_reorder = max_reorder_chunks
        self.next_seq = 0
        self._reorder: dict[int, Payload] = {}
        self.reorder_bytes = 0
        self._readbuf: deque[memoryview] = deque()
        self.unread_bytes = 0
        self.read_offset = 0
        self.right_edge = INITIAL_CHANNEL_WINDOW
        self.fin_seq: int | None = None  # chunks the peer announced in CHANNEL_CLOSE
        self.aborted = False
        self.delivered_bytes = 0
        self.duplicates = 0
        # acknowledgement state
        self.ack_due = False  # send an ACK at the next opportunity
        self.ack_at: float | None = None  # or at this time
        self._since_ack = 0
        self._advertised_edge = INITIAL_CHANNEL_WINDOW
        self.acks_sent = 0

    # ---- state ----

    @property
    def grant(self) -> int:
        """Bytes this side has promised to hold (reordered + unread + still allowed to arrive)."""
        return self.right_edge - self.read_offset

    @property
    def held_bytes(self) -> int:
        return self.reorder_bytes + self.unread_bytes

    @property
    def reorder_chunks(self) -> int:
        return len(self._reorder)

    @property
    def complete(self) -> bool:
        """Every chunk before the close has been delivered to the read buffer."""
        return self.fin_seq is not None and self.next_seq >= self.fin_seq

    @property
    def at_eof(self) -> bool:
        return self.complete and self.unread_bytes == 0

    @property
    def done(self) -> bool:
        """Nothing left for the application or to acknowledge."""
        if self.aborted:
            return not self.ack_due
        return self.at_eof and not self.ack_due and self.ack_at is None

    # ---- chunks in ----

    def receive(
        self, seq: int, payload: Payload, now: float, *, ack_requested: bool, ack_delay: float, ack_every: int
    ) -> bool:
        """Take one DATA chunk; returns True if bytes became readable. Raises ProtocolError."""
        if self.aborted:
            return False  # in flight when the channel was aborted
        if self.fin_seq is not None and seq >= self.fin_seq:
            raise _violation("DATA beyond the channel's close", self.channel, seq=seq, fin=self.fin_seq)
        if seq < self.next_seq or seq in self._reorder:
            self.duplicates += 1
            self.ack_due = True  # its ACK was likely lost with a stream: say again what we have
            return False
        size = payload.nbytes if isinstance(payload, memoryview) else len(payload)
        if size == 0:
            raise _violation("empty DATA chunk", self.channel, seq=seq)
        if seq - self.next_seq > self._max_reorder:
            raise _violation(
                "DATA too far ahead of the next expected chunk",
                self.channel,
                seq=seq,
                expected=self.next_seq,
                max_reorder=self._max_reorder,
            )
        if self.held_bytes + size > self.grant:
            raise _violation(
                "flow control violated: DATA beyond the advertised window",
                self.channel,
                seq=seq,
                size=size,
                held=self.held_bytes,
                grant=self.grant,
            )
        readable = False
        if seq == self.next_seq:
            self._deliver(payload, size)
            readable = True
            while self._reorder and self.next_seq in self._reorder:
                piece = self._reorder.pop(self.next_seq)
                n = piece.nbytes if isinstance(piece, memoryview) else len(piece)
                self.reorder_bytes -= n
                self._deliver(piece, n)
        else:
            self._reorder[seq] = payload
            self.reorder_bytes += size
        self._since_ack += size
        if ack_requested or self._since_ack >= min(ack_every, max(1, self.grant // 4)) or self.complete:
            self.ack_due = True
        elif self.ack_at is None:
            self.ack_at = now + ack_delay
        return readable

    def _deliver(self, payload: Payload, size: int) -> None:
        self._readbuf.append(payload if isinstance(payload, memoryview) else memoryview(payload))
        self.unread_bytes += size
        self.delivered_bytes += size
        self.next_seq += 1

    def on_close(self, next_seq: int, aborted: bool) -> None:
        """The peer's CHANNEL_CLOSE: ``next_seq`` chunks in all (or an abort). Raises ProtocolError."""
        self.ack_due = True
        if aborted:
            if not self.aborted:
                self.abort()
            self.fin_seq = next_seq if self.fin_seq is None else self.fin_seq
            return
        if self.fin_seq is not None and self.fin_seq != next_seq:
            raise _violation(
                "CHANNEL_CLOSE disagrees with an earlier one",
                self.channel,
                frame="CHANNEL_CLOSE",
                next_seq=next_seq,
                earlier=self.fin_seq,
            )
        highest = max(self._reorder, default=self.next_seq - 1)
        if next_seq < self.next_seq or next_seq <= highest:
            raise _violation(
                "CHANNEL_CLOSE announces fewer chunks than arrived",
                self.channel,
                frame="CHANNEL_CLOSE",
                next_seq=next_seq,
                received=max(self.next_seq, highest + 1),
            )
        self.fin_seq = next_seq

    def abort(self) -> int:
        """Drop every held byte (local or peer abort); returns the grant released."""
        released = self.grant
        self._reorder.clear()
        self._readbuf.clear()
        self.reorder_bytes = self.unread_bytes = 0
        self.read_offset = self.right_edge  # nothing more may arrive: the grant is zero
        self.aborted = True
        return released

    # ---- application side ----

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of what has arrived in order (b"" if none); one copy."""
        if n <= 0 or not self._readbuf:
            return b""
        views: list[memoryview] = []
        size = 0
        buf = self._readbuf
        while buf and size < n:
            piece = buf[0]
            need = n - size
            if piece.nbytes <= need:
                views.append(buf.popleft())
                size += piece.nbytes
            else:
                views.append(piece[:need])
                buf[0] = piece[need:]
                size = n
        out = bytes(views[0]) if len(views) == 1 else b"".join(views)
        self.unread_bytes -= size
        self.read_offset += size
        return out

    def want_grant(self, limit: int) -> int:
        """How much more window this channel could use, up to ``limit`` in all."""
        if self.aborted or self.complete:
            return 0
        return max(0, limit - self.grant)

    def extend(self, amount: int, chunk_hint: int) -> None:
        """Grant ``amount`` more bytes; decide whether the peer must hear about it soon."""
        if amount <= 0:
            return
        self.right_edge += amount
        advertised = self._advertised_edge - (self.read_offset + self.unread_bytes)
        moved = self.right_edge - self._advertised_edge
        if advertised < max(2 * chunk_hint, self.grant // 4) or moved >= self.grant // 4:
            self.ack_due = True

    # ---- ACKs out ----

    @property
    def ack_next(self) -> int:
        """Cumulative point to acknowledge; one beyond the close once everything before it arrived."""
        if self.fin_seq is not None and (self.aborted or self.next_seq >= self.fin_seq):
            return self.fin_seq + 1
        return self.next_seq

    def make_ack(self) -> Ack:
        sack: list[int] = []
        if self._reorder and not self.aborted:
            run_start = run_end = -1
            for seq in sorted(self._reorder):
                if seq == run_end:
                    run_end += 1
                    continue
                if run_start >= 0:
                    sack += (run_start, run_end)
                    if len(sack) >= 2 * _MAX_SACK_RANGES:
                        break
                run_start, run_end = seq, seq + 1
            if run_start >= 0 and len(sack) < 2 * _MAX_SACK_RANGES:
                sack += (run_start, run_end)
        delivered_offset = self.read_offset + self.unread_bytes
        window = 0 if self.aborted else max(0, self.right_edge - delivered_offset)
        self.ack_due = False
        self.ack_at = None
        self._since_ack = 0
        self._advertised_edge = self.right_edge
        self.acks_sent += 1
        return Ack(next_seq=self.ack_next, window=window, sack=tuple(sack))
