"""QEMU 7.2's multifd channel format: a sans-IO parser, and the header prediction both sides share.

Learned from QEMU 7.2's ``migration/multifd.[ch]`` (format facts only). A multifd connection carries:

* a 64-byte init message: be32 magic 0x11223344, be32 version 1, 16-byte UUID, u8 channel id, 7 + 32
  reserved bytes;
* then packets: a header of ``320 + 8 * pages_alloc`` bytes (be32 magic, version, flags, pages_alloc,
  normal_pages, next_packet_size, be64 packet_num, 4 reserved be64, char ramblock[256], pages_alloc be64
  page offsets), followed (compression off) by ``normal_pages`` raw 4 KiB pages.

QEMU reuses one header buffer per channel and rewrites only some fields per packet: ``normal_pages``
offsets, and the ramblock name only when the packet has pages; ``next_packet_size`` only then too. The
rest is whatever the channel's previous packets left there. :func:`predict_header` encodes exactly that
rule, so a sender can ship only the fields that carry information plus a patch of whatever differs from
the prediction (normally nothing) and the receiver rebuilds QEMU's exact bytes.

Anything this parser does not recognise (magic, version, unknown flag bits, compression, a header size
that changes, more pages than allocated) turns the channel into a :class:`Fallback`: every byte from
that point on is carried opaque, so an unknown format costs compression, never correctness. A packet
whose framing is fine but whose pages HDE cannot take (offsets not page aligned or repeated, odd block
name) is reported with ``batchable=False`` and travels whole, as raw bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from novacron.migration.tunnel.errors import MultifdFormatError

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
INIT_SIZE = 64
PAGE_SIZE = 4096
FLAG_SYNC = 1 << 0
COMPRESSION_MASK = 7 << 1  # 0 = none; zlib/zstd payloads are not pages and are not parsed
KNOWN_FLAGS = FLAG_SYNC | COMPRESSION_MASK
RAMBLOCK_SIZE = 256
# Offsets inside a packet header.
FLAGS_AT = 8
PAGES_ALLOC_AT = 12
NORMAL_PAGES_AT = 16
NEXT_SIZE_AT = 20
PACKET_NUM_AT = 24
RAMBLOCK_AT = 64
OFFSETS_AT = 320  # == sizeof(MultiFDPacket_t)
MAX_PAGE_INDEX = (1 << 32) - 1  # HDE's page index limit (16 TiB per RAM block)

_INIT = struct.Struct(">II16sB7s32s")
_FIXED = struct.Struct(">IIIIIIQ")  # magic .. packet_num (32 bytes)
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")

U64Array = npt.NDArray[np.uint64]


def header_size(pages_alloc: int) -> int:
    return OFFSETS_AT + 8 * pages_alloc


@dataclass(frozen=True)
class MultifdInit:
    raw: bytes  # the 64 bytes exactly as QEMU sent them
    channel_id: int
    uuid: bytes


def parse_init(raw: bytes, max_channels: int) -> MultifdInit:
    """Validate a multifd init message; raises :class:`MultifdFormatError` naming what is wrong."""
    if len(raw) != INIT_SIZE:
        raise MultifdFormatError("multifd init message has the wrong size", size=len(raw))
    magic, version, uuid, channel_id, _, _ = _INIT.unpack(raw)
    if magic != MULTIFD_MAGIC:
        raise MultifdFormatError("not a multifd init message", magic=hex(magic))
    if version != MULTIFD_VERSION:
        raise MultifdFormatError("unknown multifd version", version=version)
    if channel_id >= max_channels:
        raise MultifdFormatError("multifd channel id out of range", channel=channel_id, limit=max_channels)
    return MultifdInit(raw, channel_id, uuid)


@dataclass(frozen=True)
class MultifdPacket:
    header: bytes  # exactly as QEMU sent it
    data: bytes  # the normal pages, back to back (normal_pages * 4096 bytes)
    flags: int
    normal_pages: int
    packet_num: int
    block: str | None  # RAM block name (packets with pages, when batchable)
    offsets: U64Array | None  # byte offsets of the pages in the block (when batchable)

    @property
    def sync(self) -> bool:
        return bool(self.flags & FLAG_SYNC)

    @property
    def batchable(self) -> bool:
        """Whether the pages can go through HDE (or the packet has none); else it travels raw."""
        return self.normal_pages == 0 or (self.block is not None and self.offsets is not None)

    @property
    def wire_size(self) -> int:
        return len(self.header) + len(self.data)


@dataclass(frozen=True)
class Fallback:
    """Parsing stopped here; ``data`` (possibly empty) and everything later go opaque."""

    reason: str
    data: bytes


@dataclass(frozen=True)
class RawBytes:
    """Bytes after a fallback, to be carried as they are."""

    data: bytes


MultifdEvent = MultifdInit | MultifdPacket | Fallback | RawBytes


class MultifdParser:
    """Bytes of one multifd connection in, events out (sans-IO); see the module docstring."""

    def __init__(self, *, max_channels: int = 255, max_pages_alloc: int = 1024) -> None:
        self._max_channels = max_channels
        self._max_pages_alloc = max_pages_alloc
        self._buf = bytearray()
        self._pos = 0  # consumed bytes at the front of _buf (compacted lazily)
        self._state = "init"
        self._header_len = 0
        self._pages_alloc = 0
        self.init: MultifdInit | None = None
        self.fallback_reason: str | None = None
        self.consumed = 0  # bytes turned into events so far

    @property
    def fell_back(self) -> bool:
        return self._state == "opaque"

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> list[MultifdEvent]:
        if self._state == "opaque":
            self.consumed += len(data)
            return [RawBytes(bytes(data))] if data else []
        self._buf += data
        out: list[MultifdEvent] = []
        while True:
            event = self._next()
            if event is None:
                break
            out.append(event)
            if isinstance(event, Fallback):
                break
        if self._pos and (self._pos >= len(self._buf) or self._pos > (1 << 20)):
            del self._buf[: self._pos]
            self._pos = 0
        return out

    def eof(self) -> list[MultifdEvent]:
        """The connection ended; bytes of an incomplete packet go opaque (QEMU's own end is clean)."""
        if self._state != "opaque" and self.buffered:
            return [self._fall_back("stream ended inside a packet")]
        return []

    def _fall_back(self, reason: str) -> Fallback:
        rest = bytes(self._buf[self._pos :])
        self._buf = bytearray()
        self._pos = 0
        self._state = "opaque"
        self.fallback_reason = reason
        self.consumed += len(rest)
        return Fallback(reason, rest)

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        self.consumed += n
        return out

    def _next(self) -> MultifdEvent | None:
        have = len(self._buf) - self._pos
        if self._state == "init":
            if have < INIT_SIZE:
                return None
            try:
                init = parse_init(bytes(self._buf[self._pos : self._pos + INIT_SIZE]), self._max_channels)
            except MultifdFormatError as exc:
                return self._fall_back(str(exc))
            self._take(INIT_SIZE)
            self.init = init
            self._state = "header"
            return init
        if have < OFFSETS_AT:
            return None
        p = self._pos
        magic, version, flags, pages_alloc, normal, _next_size, packet_num = _FIXED.unpack_from(self._buf, p)
        if magic != MULTIFD_MAGIC:
            return self._fall_back(f"packet magic {magic:#x}")
        if version != MULTIFD_VERSION:
            return self._fall_back(f"packet version {version}")
        if flags & ~KNOWN_FLAGS:
            return self._fall_back(f"unknown packet flags {flags:#x}")
        if flags & COMPRESSION_MASK:
            return self._fall_back(f"compressed packets (flags {flags:#x})")
        if not 1 <= pages_alloc <= self._max_pages_alloc:
            return self._fall_back(f"pages_alloc {pages_alloc} out of range")
        if self._pages_alloc and pages_alloc != self._pages_alloc:
            return self._fall_back(f"pages_alloc changed from {self._pages_alloc} to {pages_alloc}")
        if normal > pages_alloc:
            return self._fall_back(f"normal_pages {normal} > pages_alloc {pages_alloc}")
        hlen = header_size(pages_alloc)
        if have < hlen + normal * PAGE_SIZE:
            return None
        self._pages_alloc, self._header_len = pages_alloc, hlen
        header = self._take(hlen)
        data = self._take(normal * PAGE_SIZE)
        block, offsets = _batch_fields(header, normal) if normal else (None, None)
        return MultifdPacket(header, data, flags, normal, packet_num, block, offsets)


def _batch_fields(header: bytes, normal: int) -> tuple[str | None, U64Array | None]:
    """Block name and page offsets if HDE can carry them, else (None, None)."""
    name = header[RAMBLOCK_AT : RAMBLOCK_AT + RAMBLOCK_SIZE].split(b"\0", 1)[0]
    if not name:
        return None, None
    try:
        block = name.decode()
    except UnicodeDecodeError:
        return None, None
    offsets = np.frombuffer(header, dtype=">u8", count=normal, offset=OFFSETS_AT).astype(np.uint64)
    if np.any(offsets & np.uint64(PAGE_SIZE - 1)):
        return None, None
    index = offsets >> np.uint64(12)
    if int(index.max()) > MAX_PAGE_INDEX:
        return None, None
    if normal > 1 and not (bool(np.all(index[1:] > index[:-1])) or np.unique(index).shape[0] == normal):
        return None, None
    return block, offsets


# ---------------------------------------------------------------------------------- header rebuild


def initial_header(header_len: int) -> bytes:
    """What both sides assume a channel's header buffer held before its first packet (QEMU zeroes it)."""
    return bytes(header_len)


def predict_header(
    prev: bytes, *, flags: int, packet_num: int, block: str | None, offsets: U64Array | None
) -> bytearray:
    """The header QEMU writes next on a channel whose previous header was ``prev``.

    ``block``/``offsets`` are the packet's pages (``None``/empty for a packet without pages).
    """
    h = bytearray(prev)
    n = 0 if offsets is None else int(offsets.shape[0])
    h[FLAGS_AT : FLAGS_AT + 4] = _BE32.pack(flags)
    h[NORMAL_PAGES_AT : NORMAL_PAGES_AT + 4] = _BE32.pack(n)
    h[PACKET_NUM_AT : PACKET_NUM_AT + 8] = _BE64.pack(packet_num)
    if n:
        if block is None or offsets is None:
            raise MultifdFormatError("a packet with pages needs a block name")
        name = block.encode()
        if len(name) > RAMBLOCK_SIZE or OFFSETS_AT + 8 * n > len(h):
            raise MultifdFormatError("packet does not fit the header", block=block[:64], pages=n)
        h[NEXT_SIZE_AT : NEXT_SIZE_AT + 4] = _BE32.pack(n * PAGE_SIZE)
        h[RAMBLOCK_AT : RAMBLOCK_AT + RAMBLOCK_SIZE] = name.ljust(RAMBLOCK_SIZE, b"\0")
        h[OFFSETS_AT : OFFSETS_AT + 8 * n] = offsets.astype(">u8").tobytes()
    return h


_RUN = struct.Struct("<HH")
MERGE_GAP = 4  # differing runs closer than this are sent as one (a run header costs 4 bytes)


def diff_header(actual: bytes, predicted: bytes | bytearray) -> bytes:
    """A patch turning ``predicted`` into ``actual``: runs of (u16 position, u16 length, bytes)."""
    if len(actual) != len(predicted):
        raise MultifdFormatError("header sizes differ", actual=len(actual), predicted=len(predicted))
    if actual == predicted:
        return b""
    a = np.frombuffer(actual, dtype=np.uint8)
    b = np.frombuffer(bytes(predicted), dtype=np.uint8)
    where = np.flatnonzero(a != b)
    # Split into runs wherever two differing bytes are MERGE_GAP or more apart.
    breaks = np.flatnonzero(np.diff(where) > MERGE_GAP)
    starts = np.concatenate(([where[0]], where[breaks + 1]))
    ends = np.concatenate((where[breaks], [where[-1]])) + 1
    parts: list[bytes] = []
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        parts.append(_RUN.pack(s, e - s))
        parts.append(actual[s:e])
    return b"".join(parts)


def apply_patch(header: bytearray, patch: bytes | memoryview) -> None:
    """Apply a :func:`diff_header` patch in place; raises :class:`MultifdFormatError` if it does not fit."""
    pos, end = 0, len(patch)
    while pos < end:
        if pos + _RUN.size > end:
            raise MultifdFormatError("truncated header patch")
        at, length = _RUN.unpack_from(patch, pos)
        pos += _RUN.size
        if length == 0 or at + length > len(header) or pos + length > end:
            raise MultifdFormatError("header patch out of bounds", at=at, length=length)
        header[at : at + length] = patch[pos : pos + length]
        pos += length
