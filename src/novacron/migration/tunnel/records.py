"""The tunnel's records on the wire, format version 1 (``docs/tunnel.md`` is the specification).

``qemu-pages`` carries one record per AMST message, source to destination, and acknowledgements back.
``qemu-main`` carries main-stream messages in both directions. All integers little-endian. Parsing
checks every length against the message and the limits before using it, and raises
:class:`RecordError` naming the record type and the field.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from novacron.migration.tunnel.errors import RecordError
from novacron.migration.tunnel.multifd import INIT_SIZE, OFFSETS_AT, header_size

FORMAT_VERSION = 1
HELLO_FLAG_HDE = 0x0001  # PACKET records carry HDE batches (always set in version 1)
_KNOWN_HELLO_FLAGS = HELLO_FLAG_HDE
MAX_REASON_BYTES = 512


class RecordType(enum.IntEnum):
    HELLO = 0x01
    OPEN = 0x02
    PACKET = 0x03
    RAW_PACKET = 0x04
    DIVERT = 0x05
    END = 0x06
    REPAIR = 0x07
    FINISH = 0x08
    ABORT = 0x7F  # either direction: the sender gave up, with its reason
    # destination -> source on qemu-pages
    ACK = 0x81
    NEED_REPAIR = 0x82
    # qemu-main, both directions
    MAIN_DATA = 0x10


_HELLO = struct.Struct("<BBHHHQ")  # type, version, flags, channels, reserved, session_cache_bytes
_OPEN = struct.Struct("<BB")  # type, channel; then the 64-byte init message
_PACKET = struct.Struct("<BBHIQHQ")  # type, channel, header_len, flags, packet_num, patch_len, digest
_RAW = struct.Struct("<BBHBbI")  # type, channel, header_len, codec, level, raw_len
_DIVERT = struct.Struct("<BBH")  # type, channel, reason length
_END = struct.Struct("<BBQ")  # type, channel, bytes QEMU sent on the connection
_REPAIR = struct.Struct("<BxQ")  # type, HDE sequence number; then the repair batch
_FINISH = struct.Struct("<BxHQ")  # type, channels opened, records sent before this one
_ACK = struct.Struct("<BQQ")  # type, records applied, QEMU bytes written (all channels)
_NEED_REPAIR = struct.Struct("<BQ")  # type, HDE sequence number
_MAIN = struct.Struct("<BBbI")  # type, codec, level, raw length
_ABORT = struct.Struct("<BH")  # type, reason length

MIN_HEADER_LEN = header_size(1)
MAX_HEADER_LEN = header_size(1024)


@dataclass(frozen=True)
class Hello:
    version: int
    flags: int
    channels: int  # multifd channels the source QEMU was configured with
    session_cache_bytes: int  # HDE session cache size both sides must use


@dataclass(frozen=True)
class Open:
    channel: int
    init: bytes


@dataclass(frozen=True)
class Packet:
    channel: int
    header_len: int
    flags: int
    packet_num: int
    patch: bytes
    digest: int  # XXH3-64 of QEMU's header bytes
    batch: bytes  # HDE page batch (empty for a packet without pages)


@dataclass(frozen=True)
class RawPacket:
    channel: int
    header_len: int
    codec: int
    level: int
    raw_len: int
    payload: bytes


@dataclass(frozen=True)
class Divert:
    channel: int
    reason: str


@dataclass(frozen=True)
class End:
    channel: int
    total: int


@dataclass(frozen=True)
class Repair:
    seq: int
    batch: bytes


@dataclass(frozen=True)
class Finish:
    channels: int
    records: int


@dataclass(frozen=True)
class Ack:
    records: int
    qemu_bytes: int


@dataclass(frozen=True)
class NeedRepair:
    seq: int


@dataclass(frozen=True)
class Abort:
    reason: str


@dataclass(frozen=True)
class MainData:
    codec: int
    level: int
    raw_len: int
    payload: bytes


PageRecord = Hello | Open | Packet | RawPacket | Divert | End | Repair | Finish | Abort
ReturnRecord = Ack | NeedRepair | Abort


# ------------------------------------------------------------------------------------------ packing


def pack_hello(channels: int, session_cache_bytes: int) -> bytes:
    return _HELLO.pack(RecordType.HELLO, FORMAT_VERSION, HELLO_FLAG_HDE, channels, 0, session_cache_bytes)


def pack_open(channel: int, init: bytes) -> bytes:
    if len(init) != INIT_SIZE:
        raise RecordError("init message must be 64 bytes", size=len(init))
    return _OPEN.pack(RecordType.OPEN, channel) + init


def pack_packet(
    channel: int, *, header_len: int, flags: int, packet_num: int, patch: bytes, digest: int, batch: bytes
) -> bytes:
    head = _PACKET.pack(RecordType.PACKET, channel, header_len, flags, packet_num, len(patch), digest)
    return b"".join((head, patch, batch))


def pack_raw_packet(
    channel: int, *, header_len: int, codec: int, level: int, raw_len: int, payload: bytes
) -> bytes:
    return _RAW.pack(RecordType.RAW_PACKET, channel, header_len, codec, level, raw_len) + payload


def pack_divert(channel: int, reason: str) -> bytes:
    raw = reason.encode()[:MAX_REASON_BYTES]
    return _DIVERT.pack(RecordType.DIVERT, channel, len(raw)) + raw


def pack_end(channel: int, total: int) -> bytes:
    return _END.pack(RecordType.END, channel, total)


def pack_repair(seq: int, batch: bytes) -> bytes:
    return _REPAIR.pack(RecordType.REPAIR, seq) + batch


def pack_finish(channels: int, records: int) -> bytes:
    return _FINISH.pack(RecordType.FINISH, channels, records)


def pack_ack(records: int, qemu_bytes: int) -> bytes:
    return _ACK.pack(RecordType.ACK, records, qemu_bytes)


def pack_need_repair(seq: int) -> bytes:
    return _NEED_REPAIR.pack(RecordType.NEED_REPAIR, seq)


def pack_abort(reason: str) -> bytes:
    raw = reason.encode()[:MAX_REASON_BYTES]
    return _ABORT.pack(RecordType.ABORT, len(raw)) + raw


def _parse_abort(buf: bytes) -> Abort:
    _need(buf, _ABORT.size, RecordType.ABORT)
    _, rlen = _ABORT.unpack_from(buf)
    _exact(buf, _ABORT.size + rlen, RecordType.ABORT)
    return Abort(bytes(buf[_ABORT.size :]).decode("utf-8", "replace"))


def pack_main(codec: int, level: int, raw_len: int, payload: bytes) -> bytes:
    return _MAIN.pack(RecordType.MAIN_DATA, codec, level, raw_len) + payload


# ------------------------------------------------------------------------------------------ parsing


def _need(buf: bytes, size: int, what: RecordType) -> None:
    if len(buf) < size:
        raise RecordError("record shorter than its fixed part", record=what.name, size=len(buf), need=size)


def _exact(buf: bytes, size: int, what: RecordType) -> None:
    if len(buf) != size:
        raise RecordError("record has the wrong size", record=what.name, size=len(buf), expected=size)


def _channel(channel: int, max_channels: int, what: RecordType) -> int:
    if channel >= max_channels:
        raise RecordError(
            "channel number out of range", record=what.name, channel=channel, limit=max_channels
        )
    return channel


def _header_len(value: int, what: RecordType) -> int:
    if not MIN_HEADER_LEN <= value <= MAX_HEADER_LEN or (value - OFFSETS_AT) % 8:
        raise RecordError("impossible multifd header length", record=what.name, header_len=value)
    return value


def _type_of(buf: bytes) -> RecordType:
    if not buf:
        raise RecordError("empty record")
    try:
        return RecordType(buf[0])
    except ValueError:
        raise RecordError("unknown record type", type=buf[0]) from None


def parse_page_record(buf: bytes, *, max_channels: int, max_record_bytes: int) -> PageRecord:
    """One ``qemu-pages`` record sent by the source."""
    if len(buf) > max_record_bytes:
        raise RecordError("record too large", size=len(buf), limit=max_record_bytes)
    t = _type_of(buf)
    if t is RecordType.HELLO:
        _exact(buf, _HELLO.size, t)
        _, version, flags, channels, _, cache = _HELLO.unpack(buf)
        if version != FORMAT_VERSION:
            raise RecordError("unsupported tunnel format version", version=version, supported=FORMAT_VERSION)
        if flags & ~_KNOWN_HELLO_FLAGS:
            raise RecordError("unknown HELLO flags", flags=hex(flags))
        if channels > max_channels:
            raise RecordError("more multifd channels than allowed", channels=channels, limit=max_channels)
        return Hello(version, flags, channels, cache)
    if t is RecordType.OPEN:
        _exact(buf, _OPEN.size + INIT_SIZE, t)
        return Open(_channel(buf[1], max_channels, t), bytes(buf[_OPEN.size :]))
    if t is RecordType.PACKET:
        _need(buf, _PACKET.size, t)
        _, ch, hlen, flags, num, plen, digest = _PACKET.unpack_from(buf)
        end = _PACKET.size + plen
        if end > len(buf):
            raise RecordError("header patch runs past the record", record=t.name, patch_len=plen)
        return Packet(
            _channel(ch, max_channels, t),
            _header_len(hlen, t),
            flags,
            num,
            bytes(buf[_PACKET.size : end]),
            digest,
            bytes(buf[end:]),
        )
    if t is RecordType.RAW_PACKET:
        _need(buf, _RAW.size, t)
        _, ch, hlen, codec, level, raw_len = _RAW.unpack_from(buf)
        if raw_len < hlen or raw_len > max_record_bytes:
            raise RecordError("raw packet size out of range", raw_len=raw_len, header_len=hlen)
        return RawPacket(
            _channel(ch, max_channels, t),
            _header_len(hlen, t),
            codec,
            level,
            raw_len,
            bytes(buf[_RAW.size :]),
        )
    if t is RecordType.DIVERT:
        _need(buf, _DIVERT.size, t)
        _, ch, rlen = _DIVERT.unpack_from(buf)
        _exact(buf, _DIVERT.size + rlen, t)
        return Divert(_channel(ch, max_channels, t), bytes(buf[_DIVERT.size :]).decode("utf-8", "replace"))
    if t is RecordType.END:
        _exact(buf, _END.size, t)
        _, ch, total = _END.unpack(buf)
        return End(_channel(ch, max_channels, t), total)
    if t is RecordType.REPAIR:
        _need(buf, _REPAIR.size, t)
        (_, seq) = _REPAIR.unpack_from(buf)
        return Repair(seq, bytes(buf[_REPAIR.size :]))
    if t is RecordType.FINISH:
        _exact(buf, _FINISH.size, t)
        _, channels, records = _FINISH.unpack(buf)
        return Finish(channels, records)
    if t is RecordType.ABORT:
        return _parse_abort(buf)
    raise RecordError("record type not valid on qemu-pages from the source", record=t.name)


def parse_return_record(buf: bytes) -> ReturnRecord:
    """One record the destination sent back on ``qemu-pages``."""
    t = _type_of(buf)
    if t is RecordType.ACK:
        _exact(buf, _ACK.size, t)
        _, records, qemu_bytes = _ACK.unpack(buf)
        return Ack(records, qemu_bytes)
    if t is RecordType.NEED_REPAIR:
        _exact(buf, _NEED_REPAIR.size, t)
        return NeedRepair(_NEED_REPAIR.unpack(buf)[1])
    if t is RecordType.ABORT:
        return _parse_abort(buf)
    raise RecordError("record type not valid on qemu-pages from the destination", record=t.name)


def parse_main(buf: bytes, *, max_raw: int) -> MainData:
    """One ``qemu-main`` message."""
    t = _type_of(buf)
    if t is not RecordType.MAIN_DATA:
        raise RecordError("record type not valid on qemu-main", record=t.name)
    _need(buf, _MAIN.size, t)
    _, codec, level, raw_len = _MAIN.unpack_from(buf)
    if not 0 < raw_len <= max_raw:
        raise RecordError("main-channel message size out of range", raw_len=raw_len, limit=max_raw)
    return MainData(codec, level, raw_len, bytes(buf[_MAIN.size :]))
