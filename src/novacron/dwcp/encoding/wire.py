"""HDE wire format, version 1: the batch header and the page kinds (specified in ``docs/hde.md``)."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from novacron.dwcp.encoding.codecs import Codec, CodecId
from novacron.dwcp.encoding.errors import HdeDecodeError
from novacron.dwcp.encoding.limits import HdeLimits

MAGIC = b"HDE"
VERSION = 1

# magic, version, kind, flags, seq, count, raw body length, wire body length, codec, level,
# name length, meta length, checksum (XXH3-128 of the rebuilt content).
_HEADER = struct.Struct("<3sBBBQIIIBbHI16s")
HEADER_SIZE = _HEADER.size

FLAG_REPAIR = 0x01  # re-encoding of a batch that failed on a missing reference: no references inside
_KNOWN_FLAGS = FLAG_REPAIR


class BatchKind(enum.IntEnum):
    PAGES = 1
    CHUNKS = 2


class PageKind(enum.IntEnum):
    ZERO = 0  # no payload
    LITERAL = 1  # 4096 bytes in the literal section
    UNCHANGED = 2  # same as the session cache at this address
    DELTA = 3  # sparse delta against the session cache at this address
    SESSION_REF = 4  # u32 slot of the session cache holding the same bytes
    BATCH_DUP = 5  # u16 index of an earlier page of this batch with the same bytes
    BASE_SAME_ADDR = 6  # the receiver's baseline copy of this VM at this address
    BASE_CONTENT = 7  # u64 fingerprint + 16-byte keyed tag of baseline content
    BASE_DELTA = 8  # sparse delta against the receiver's baseline copy at this address


class ChunkKind(enum.IntEnum):
    LITERAL = 0
    REF = 1  # u64 id of a chunk in the session chunk cache
    DUP = 2  # u32 position of an earlier chunk of the same batch


@dataclass(frozen=True)
class Header:
    kind: BatchKind
    flags: int
    seq: int
    count: int
    raw_len: int
    wire_len: int
    codec: Codec
    name_len: int
    meta_len: int
    checksum: bytes

    def pack(self) -> bytes:
        return _HEADER.pack(
            MAGIC,
            VERSION,
            self.kind,
            self.flags,
            self.seq,
            self.count,
            self.raw_len,
            self.wire_len,
            self.codec.id,
            self.codec.level,
            self.name_len,
            self.meta_len,
            self.checksum,
        )


def unpack_header(buf: bytes | memoryview, limits: HdeLimits) -> Header:
    """Parse and bound-check a batch header; the total size must match the fields exactly."""
    if len(buf) < HEADER_SIZE:
        raise HdeDecodeError("batch shorter than its header", size=len(buf))
    (
        magic,
        version,
        kind,
        flags,
        seq,
        count,
        raw_len,
        wire_len,
        codec_id,
        level,
        name_len,
        meta_len,
        csum,
    ) = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise HdeDecodeError("not an HDE batch (bad magic)", magic=bytes(magic).hex())
    if version != VERSION:
        raise HdeDecodeError("unsupported HDE format version", version=version, supported=VERSION)
    try:
        bkind = BatchKind(kind)
        cid = CodecId(codec_id)
    except ValueError as exc:
        raise HdeDecodeError("unknown batch kind or codec", kind=kind, codec=codec_id) from exc
    if flags & ~_KNOWN_FLAGS:
        raise HdeDecodeError("unknown batch flags", flags=flags)
    if bkind is BatchKind.PAGES:
        if count > limits.max_pages_per_batch:
            raise HdeDecodeError("too many pages", count=count, limit=limits.max_pages_per_batch)
        if not 1 <= name_len <= limits.max_block_name:
            raise HdeDecodeError("bad block name length", name_len=name_len)
    elif name_len:
        raise HdeDecodeError("chunk batch with a block name", name_len=name_len)
    if meta_len > limits.max_meta_bytes:
        raise HdeDecodeError("meta too large", meta_len=meta_len, limit=limits.max_meta_bytes)
    if raw_len > limits.max_body_bytes:
        raise HdeDecodeError("body larger than the limit", raw_len=raw_len, limit=limits.max_body_bytes)
    if cid is CodecId.NONE and wire_len != raw_len:
        raise HdeDecodeError("stored body with different sizes", raw_len=raw_len, wire_len=wire_len)
    expected = HEADER_SIZE + name_len + meta_len + wire_len
    if len(buf) != expected:
        raise HdeDecodeError("batch size does not match its header", size=len(buf), expected=expected)
    return Header(bkind, flags, seq, count, raw_len, wire_len, Codec(cid, level), name_len, meta_len, csum)
