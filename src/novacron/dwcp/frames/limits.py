"""Every limit of the DWCP v3 wire format, in one place (docs/protocol.md lists them).

Frame sizes count the whole frame on the wire, length prefix included. Before the handshake has
negotiated a maximum frame size, :data:`HANDSHAKE_MAX_FRAME_SIZE` applies, so an unauthenticated peer
can make us buffer at most 64 KiB.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from novacron.dwcp.errors import ProtocolError, ProtocolErrorKind

KiB = 1024
MiB = 1024 * KiB

# Header: u32 frame_len (bytes after this field), u8 format version, u8 frame type, u16 flags,
# u32 channel, u32 body_len. Big-endian. The body (msgpack) and the raw payload follow.
HEADER = struct.Struct(">IBBHII")
HEADER_SIZE = HEADER.size  # 16
LENGTH_PREFIX_SIZE = 4
HEADER_AFTER_LENGTH = HEADER_SIZE - LENGTH_PREFIX_SIZE  # counted in frame_len

FRAME_FORMAT_VERSION = 1

HARD_MAX_FRAME_SIZE = 16 * MiB  # no negotiation goes above this
MIN_MAX_FRAME_SIZE = 64 * KiB  # nor below this: every control frame must fit
DEFAULT_MAX_FRAME_SIZE = 4 * MiB  # what a node offers unless configured (fits 1 MiB data chunks)
HANDSHAKE_MAX_FRAME_SIZE = 64 * KiB  # until the handshake has negotiated the real value

MAX_BODY_SIZE = 64 * KiB  # the msgpack body; bulk bytes go in the payload, not the body
MAX_BODY_FIELDS = 64  # entries in a body map (known + unknown fields)
MAX_STRING_BYTES = 4 * KiB  # any string anywhere in a body (fields have tighter limits)
MAX_BYTES_LEN = 4 * KiB  # any binary value anywhere in a body
MAX_LIST_ITEMS = 256  # any list anywhere in a body

CONTROL_CHANNEL = 0
MAX_CHANNEL_ID = 2**32 - 1
MAX_U16 = 2**16 - 1
MAX_U32 = 2**32 - 1
MAX_U64 = 2**64 - 1


def check_max_frame_size(value: int) -> int:
    if not isinstance(value, int) or not MIN_MAX_FRAME_SIZE <= value <= HARD_MAX_FRAME_SIZE:
        raise ProtocolError(
            f"max frame size must be {MIN_MAX_FRAME_SIZE}..{HARD_MAX_FRAME_SIZE} bytes",
            what=ProtocolErrorKind.OVERSIZE,
            value=value,
        )
    return value


@dataclass(frozen=True, slots=True)
class FrameLimits:
    """Limits a codec enforces; ``max_frame_size`` is negotiated per session."""

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE

    def __post_init__(self) -> None:
        check_max_frame_size(self.max_frame_size)
