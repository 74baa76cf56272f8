"""The ``qemu-pages`` stream, sans-IO: multifd packets to records (source) and back to QEMU's bytes.

:class:`PageStreamEncoder` takes the parsed events of every multifd connection, in the merged order
the source chose, and returns one record each: a packet's pages become an HDE batch, its header a
prediction patch (``multifd.predict_header``) plus a digest. :class:`PageStreamDecoder` takes the records
in the same order and returns, per QEMU channel, the exact bytes the source QEMU wrote.

HDE keeps mirrored state on both sides (the session cache), so both objects see one total order. A
batch the destination cannot resolve because its baseline store lacks a referenced page (the store
changed since its summary) is repaired: the decoder asks for it (:class:`RequestRepair`), holds every
later record, and resumes when the repair arrives; the encoder keeps the input of every batch that
referred to the baseline until the destination acknowledges it. Anything else wrong with a record or
a batch raises (``RecordError`` / ``HdeDecodeError``): the migration aborts, never writes wrong bytes.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import xxhash

from novacron.dwcp.encoding import (
    BaselineSession,
    CacheArena,
    HdeDecodeError,
    HdeDecoder,
    HdeEncoder,
    HdeInputError,
    HdeLimits,
    HdeReferenceMissing,
    PageBatch,
)
from novacron.migration.tunnel.errors import MultifdFormatError, PeerAborted, RecordError
from novacron.migration.tunnel.multifd import (
    MultifdInit,
    MultifdPacket,
    apply_patch,
    diff_header,
    initial_header,
    predict_header,
)
from novacron.migration.tunnel.opaque import OpaqueCompressor, OpaqueDecompressor, raw_packet_codec
from novacron.migration.tunnel.records import (
    Abort,
    Divert,
    End,
    Finish,
    Hello,
    Open,
    Packet,
    PageRecord,
    RawPacket,
    Repair,
    pack_divert,
    pack_end,
    pack_finish,
    pack_hello,
    pack_open,
    pack_packet,
    pack_raw_packet,
    pack_repair,
    parse_page_record,
)


def header_digest(header: bytes | bytearray) -> int:
    return xxhash.xxh3_64_intdigest(header)


# ------------------------------------------------------------------------------------------- source


@dataclass
class EncodedRecord:
    data: bytes
    raw_bytes: int  # QEMU bytes this record carries


class PageStreamEncoder:
    """Source side: one record per event, in the order the events are given."""

    def __init__(self, hde: HdeEncoder, *, channels: int, corrupt_seq: int | None = None) -> None:
        self.hde = hde
        self.channels = channels
        self.records = 0  # records produced so far (the next record's index)
        self.packets = 0
        self.syncs = 0
        self.raw_packets = 0
        self.patched_headers = 0
        self._prev: dict[int, bytes] = {}
        self._opened: set[int] = set()
        self._raw = OpaqueCompressor(raw_packet_codec())
        # Inputs of batches that referred to the receiver's baseline: record index, sequence, batch.
        self._kept: deque[tuple[int, int, PageBatch]] = deque()
        self._corrupt_seq = corrupt_seq  # test hook: flip a byte of this HDE batch's body

    def _emit(self, data: bytes, raw_bytes: int) -> EncodedRecord:
        self.records += 1
        return EncodedRecord(data, raw_bytes)

    def hello(self) -> EncodedRecord:
        return self._emit(pack_hello(self.channels, self.hde.limits.session_cache_bytes), 0)

    def open(self, channel: int, init: MultifdInit) -> EncodedRecord:
        self._opened.add(channel)
        return self._emit(pack_open(channel, init.raw), len(init.raw))

    def packet(self, channel: int, pkt: MultifdPacket) -> EncodedRecord:
        self.packets += 1
        self.syncs += int(pkt.sync)
        if pkt.batchable:
            rec = self._hde_packet(channel, pkt)
            if rec is not None:
                return rec
        return self._raw_packet(channel, pkt)

    def _hde_packet(self, channel: int, pkt: MultifdPacket) -> EncodedRecord | None:
        prev = self._prev.get(channel) or initial_header(len(pkt.header))
        if len(prev) != len(pkt.header):
            raise MultifdFormatError("multifd header size changed", channel=channel)
        n = pkt.normal_pages
        offsets = pkt.offsets if n else None
        block = pkt.block if n else None
        batch_wire = b""
        if n and offsets is not None and block is not None:
            batch = PageBatch(block, offsets, pkt.data)
            seq = self.hde.next_seq
            try:
                batch_wire = self.hde.encode(batch)
            except HdeInputError:
                return None  # HDE refuses this packet (checked before any state change): send it raw
            if self.hde.last_used_baseline:
                self._kept.append((self.records, seq, batch))
            if seq == self._corrupt_seq:
                batch_wire = _flip_last_byte(batch_wire)
        predicted = predict_header(
            prev, flags=pkt.flags, packet_num=pkt.packet_num, block=block, offsets=offsets
        )
        patch = diff_header(pkt.header, predicted)
        self.patched_headers += int(bool(patch))
        self._prev[channel] = pkt.header
        data = pack_packet(
            channel,
            header_len=len(pkt.header),
            flags=pkt.flags,
            packet_num=pkt.packet_num,
            patch=patch,
            digest=header_digest(pkt.header),
            batch=batch_wire,
        )
        return self._emit(data, pkt.wire_size)

    def _raw_packet(self, channel: int, pkt: MultifdPacket) -> EncodedRecord:
        self.raw_packets += 1
        whole = pkt.header + pkt.data
        codec, payload = self._raw.compress(whole)
        self._prev[channel] = pkt.header
        data = pack_raw_packet(
            channel,
            header_len=len(pkt.header),
            codec=codec.id,
            level=codec.level,
            raw_len=len(whole),
            payload=payload,
        )
        return self._emit(data, len(whole))

    def divert(self, channel: int, reason: str) -> EncodedRecord:
        self._opened.add(channel)
        return self._emit(pack_divert(channel, reason), 0)

    def end(self, channel: int, total: int) -> EncodedRecord:
        return self._emit(pack_end(channel, total), 0)

    def finish(self) -> EncodedRecord:
        return self._emit(pack_finish(len(self._opened), self.records), 0)

    def acknowledged(self, records: int) -> None:
        """The destination resolved every record before index ``records``: forget their inputs."""
        while self._kept and self._kept[0][0] < records:
            self._kept.popleft()

    def repair(self, seq: int) -> EncodedRecord:
        """Re-send batch ``seq`` without references (the destination's baseline lacked one of them)."""
        self.hde.forget_baseline()  # no further baseline references in this session
        for _, kept_seq, batch in self._kept:
            if kept_seq == seq:
                return self._emit(pack_repair(seq, self.hde.encode_repair(batch, seq)), 0)
        raise RecordError("repair asked for a batch that is not kept", seq=seq)

    @property
    def kept_batches(self) -> int:
        return len(self._kept)


def _flip_last_byte(wire: bytes) -> bytes:
    return wire[:-1] + bytes([wire[-1] ^ 0xFF])


# -------------------------------------------------------------------------------------- destination


@dataclass(frozen=True)
class OpenChannel:
    channel: int
    init: bytes


@dataclass(frozen=True)
class Deliver:
    channel: int
    parts: tuple[bytes | memoryview, ...]

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.parts)


@dataclass(frozen=True)
class DivertChannel:
    channel: int
    reason: str


@dataclass(frozen=True)
class EndChannel:
    channel: int
    total: int


@dataclass(frozen=True)
class StreamFinished:
    channels: int


@dataclass(frozen=True)
class RequestRepair:
    seq: int


DecoderOutput = OpenChannel | Deliver | DivertChannel | EndChannel | StreamFinished | RequestRepair


@dataclass
class _Channel:
    prev: bytes | None = None
    delivered: int = 0  # bytes produced from records (diverted bytes are counted by the caller)
    diverted: bool = False
    ended: bool = False


@dataclass
class _Pending:
    index: int
    record: Packet
    seq: int
    held: list[tuple[int, bytes]] = field(default_factory=list)


class PageStreamDecoder:
    """Destination side: records in sending order to per-channel QEMU bytes (see module docstring)."""

    def __init__(
        self,
        *,
        max_channels: int,
        max_record_bytes: int,
        max_held_records: int,
        max_session_cache_bytes: int,
        baseline: BaselineSession | None = None,
        arena: CacheArena | None = None,
    ) -> None:
        self._max_channels = max_channels
        self._max_record = max_record_bytes
        self._max_held = max_held_records
        self._max_cache = max_session_cache_bytes
        self._baseline = baseline
        self._arena = arena
        self.hde: HdeDecoder | None = None
        self.hello: Hello | None = None
        self.finished: Finish | None = None
        self.received = 0  # records received (the next record's index)
        self.packets = 0
        self.syncs = 0
        self.batches = 0
        self.decode_seconds = 0.0
        self._channels: dict[int, _Channel] = {}
        self._pending: _Pending | None = None
        self._raw = OpaqueDecompressor()

    @property
    def resolved(self) -> int:
        """Index of the first record not yet turned into bytes (what the source may forget below)."""
        return self._pending.index if self._pending is not None else self.received

    def channel_delivered(self, channel: int) -> int:
        ch = self._channels.get(channel)
        return ch.delivered if ch is not None else 0

    def close(self) -> None:
        if self.hde is not None:
            self.hde.close()

    def receive(self, data: bytes) -> list[DecoderOutput]:
        index = self.received
        self.received += 1
        rec = self._parse(data)
        if isinstance(rec, Abort):
            raise PeerAborted(f"the source aborted: {rec.reason}")
        if self.finished is not None:
            raise RecordError("record after FINISH", index=index)
        if self._pending is not None and not isinstance(rec, Repair):
            if len(self._pending.held) >= self._max_held:
                raise RecordError("too many records held while waiting for a repair", limit=self._max_held)
            self._pending.held.append((index, data))
            return []
        return self._apply(index, rec)

    def _parse(self, data: bytes) -> PageRecord:
        return parse_page_record(data, max_channels=self._max_channels, max_record_bytes=self._max_record)

    def _apply(self, index: int, rec: PageRecord) -> list[DecoderOutput]:
        if self.hello is None:
            if not isinstance(rec, Hello):
                raise RecordError("first record is not HELLO", record=type(rec).__name__)
            return self._start(rec)
        if isinstance(rec, Open):
            return self._open(rec)
        if isinstance(rec, Packet):
            return self._packet(index, rec)
        if isinstance(rec, RawPacket):
            return self._raw_packet(rec)
        if isinstance(rec, Divert):
            if rec.channel not in self._channels:  # unparsable from its first byte: opened diverted
                self._open(Open(rec.channel, b""))
            ch = self._open_channel(rec.channel, "DIVERT")
            ch.diverted = True
            return [DivertChannel(rec.channel, rec.reason)]
        if isinstance(rec, End):
            ch = self._open_channel(rec.channel, "END")
            if not ch.diverted and rec.total != ch.delivered:
                raise RecordError(
                    "channel ended with a different byte count",
                    channel=rec.channel,
                    sent=rec.total,
                    rebuilt=ch.delivered,
                )
            ch.ended = True
            return [EndChannel(rec.channel, rec.total)]
        if isinstance(rec, Repair):
            return self._repair(rec)
        if isinstance(rec, Finish):
            open_channels = [c for c, ch in self._channels.items() if not ch.ended]
            if open_channels:
                raise RecordError("FINISH with channels still open", channels=open_channels)
            if rec.channels != len(self._channels) or rec.records != index:
                raise RecordError(
                    "FINISH does not match what arrived",
                    channels=rec.channels,
                    seen_channels=len(self._channels),
                    records=rec.records,
                    seen_records=index,
                )
            self.finished = rec
            return [StreamFinished(rec.channels)]
        raise RecordError("HELLO twice")

    def _start(self, hello: Hello) -> list[DecoderOutput]:
        if hello.session_cache_bytes > self._max_cache:
            raise RecordError(
                "the source's HDE session cache is larger than this host allows",
                requested=hello.session_cache_bytes,
                limit=self._max_cache,
            )
        limits = HdeLimits(session_cache_bytes=hello.session_cache_bytes)
        arena = (
            self._arena if self._arena is not None and self._arena.capacity == limits.session_pages else None
        )
        self.hde = HdeDecoder(limits, baseline=self._baseline, arena=arena)
        self.hello = hello
        return []

    def _open(self, rec: Open) -> list[DecoderOutput]:
        if rec.channel in self._channels:
            raise RecordError("channel opened twice", channel=rec.channel)
        if len(self._channels) >= self._max_channels:
            raise RecordError("too many channels", limit=self._max_channels)
        self._channels[rec.channel] = _Channel(delivered=len(rec.init))
        return [OpenChannel(rec.channel, rec.init)] if rec.init else []

    def _open_channel(self, channel: int, what: str) -> _Channel:
        ch = self._channels.get(channel)
        if ch is None or ch.ended:
            raise RecordError("record for a channel that is not open", record=what, channel=channel)
        if ch.diverted and what != "END":
            raise RecordError("record for a diverted channel", record=what, channel=channel)
        return ch

    def _packet(self, index: int, rec: Packet) -> list[DecoderOutput]:
        self._open_channel(rec.channel, "PACKET")
        batch: PageBatch | None = None
        if rec.batch:
            hde = self.hde
            if hde is None:
                raise RecordError("packet before HELLO")
            seq = hde.next_seq
            t0 = time.perf_counter()
            try:
                decoded = hde.decode(rec.batch)
            except HdeReferenceMissing:
                self.decode_seconds += time.perf_counter() - t0
                self._pending = _Pending(index, rec, seq)
                return [RequestRepair(seq)]
            self.decode_seconds += time.perf_counter() - t0
            if not isinstance(decoded, PageBatch):
                raise HdeDecodeError("a packet's batch holds opaque chunks", seq=seq)
            batch = decoded
        return [self._rebuild(rec, batch)]

    def _rebuild(self, rec: Packet, batch: PageBatch | None) -> Deliver:
        ch = self._open_channel(rec.channel, "PACKET")
        prev = ch.prev if ch.prev is not None else initial_header(rec.header_len)
        if len(prev) != rec.header_len:
            raise RecordError("multifd header size changed", channel=rec.channel, header_len=rec.header_len)
        try:
            header = predict_header(
                prev,
                flags=rec.flags,
                packet_num=rec.packet_num,
                block=batch.block if batch is not None else None,
                offsets=batch.offsets if batch is not None else None,
            )
            apply_patch(header, rec.patch)
        except MultifdFormatError as exc:
            raise RecordError(
                "cannot rebuild the multifd header", channel=rec.channel, reason=exc.message
            ) from exc
        if header_digest(header) != rec.digest:
            raise RecordError("rebuilt multifd header differs from QEMU's", channel=rec.channel)
        out = bytes(header)
        ch.prev = out
        self.packets += 1
        self.syncs += rec.flags & 1
        if batch is None:
            ch.delivered += len(out)
            return Deliver(rec.channel, (out,))
        self.batches += 1
        ch.delivered += len(out) + len(batch.data)
        return Deliver(rec.channel, (out, batch.data))

    def _raw_packet(self, rec: RawPacket) -> list[DecoderOutput]:
        ch = self._open_channel(rec.channel, "RAW_PACKET")
        whole = self._raw.decompress(rec.codec, rec.level, rec.payload, rec.raw_len)
        if ch.prev is not None and len(ch.prev) != rec.header_len:
            raise RecordError("multifd header size changed", channel=rec.channel, header_len=rec.header_len)
        ch.prev = whole[: rec.header_len]
        ch.delivered += len(whole)
        self.packets += 1
        return [Deliver(rec.channel, (whole,))]

    def _repair(self, rec: Repair) -> list[DecoderOutput]:
        pending = self._pending
        hde = self.hde
        if pending is None or hde is None or rec.seq != pending.seq:
            raise RecordError("unexpected repair", seq=rec.seq, waiting=pending.seq if pending else None)
        decoded = hde.decode(rec.batch)
        if not isinstance(decoded, PageBatch):
            raise HdeDecodeError("a repair batch holds opaque chunks", seq=rec.seq)
        self._pending = None
        out: list[DecoderOutput] = [self._rebuild(pending.record, decoded)]
        held = pending.held
        for pos, (index, data) in enumerate(held):
            rec_h = parse_page_record(
                data, max_channels=self._max_channels, max_record_bytes=self._max_record
            )
            out.extend(self._apply(index, rec_h))
            if self._pending is not None:  # another batch needs a repair: hold the rest again
                self._pending.held.extend(held[pos + 1 :])
                break
        return out
