"""The DWCP v3 frame registry: every frame type, its body schema, channel rule, flags and payload.

This is the one place that decides the wire format. To add a frame type: add a code to
:class:`FrameType`, a frozen dataclass for its body, and a :class:`FrameSpec` entry in
:data:`REGISTRY`, then document it in docs/protocol.md. Field numbers are never reused; new fields of an
existing body are optional (old peers ignore them), and anything a peer must understand is gated by the
negotiated protocol version or a feature string.

Frame types 0x01-0x0F belong to the handshake; 0x10-0x2F are defined for the AMST transport (data
chunks, acknowledgements, ping/pong, channels, goodbye); 0x30-0xFF are free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any

from novacron.dwcp.frames.limits import MAX_U16, MAX_U32, MAX_U64
from novacron.dwcp.frames.schema import Field, blob, boolean, text, text_list, uint, uint_list

ID_BYTES = 63  # node and cluster ids (see novacron.security.identity)
ROLE_BYTES = 32
NAME_BYTES = 32  # codec, feature, mode, intent, scope, channel kind
REASON_BYTES = 1024
MAX_CAPABILITY_ITEMS = 32
SESSION_ID_BYTES = 16
JOIN_SECRET_BYTES = 32
JOIN_NONCE_BYTES = 16
JOIN_TOKEN_BYTES = 32
MAX_SACK_ITEMS = 64


class FrameType(IntEnum):
    HELLO = 0x01
    WELCOME = 0x02
    CONFIRM = 0x03
    ERROR = 0x04
    DATA = 0x10
    ACK = 0x11
    PING = 0x12
    PONG = 0x13
    CHANNEL_OPEN = 0x14
    CHANNEL_CLOSE = 0x15
    GOODBYE = 0x16


class ChannelRule(Enum):
    CONTROL = "control"  # channel field must be 0
    DATA = "data"  # channel field must be >= 1


# Flag bits. A frame type lists the bits it allows; any other bit set is a malformed frame.
FLAG_ACK_REQUESTED = 0x0001  # DATA: the sender wants an ACK for this channel soon (e.g. before a pause)


# ------------------------------------------------------------------------------------- handshake bodies


@dataclass(frozen=True, slots=True)
class Hello:
    """Client -> server, first frame on a connection: who I am, what I speak, open or join."""

    min_version: int
    max_version: int
    node_id: str
    cluster_id: str
    role: str
    intent: str  # "open" | "join"
    mode: str  # "datacenter" | "internet" | "hybrid" | "auto"
    max_streams: int
    max_frame_size: int
    codecs: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    session_id: bytes | None = None  # join only
    join_nonce: bytes | None = None  # join only
    join_token: bytes | None = field(default=None, repr=False)  # join only


@dataclass(frozen=True, slots=True)
class Welcome:
    """Server -> client: the chosen version, the session's capabilities, and the session to use."""

    version: int
    min_version: int
    max_version: int
    node_id: str
    cluster_id: str
    role: str
    mode: str
    max_streams: int
    max_frame_size: int
    session_id: bytes
    stream_index: int
    codecs: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    join_secret: bytes | None = field(default=None, repr=False)  # only when a session was opened


@dataclass(frozen=True, slots=True)
class Confirm:
    """Client -> server: WELCOME accepted; the stream is established."""

    session_id: bytes


@dataclass(frozen=True, slots=True)
class Error:
    """Either side, then close: why the handshake or the stream failed."""

    code: str
    reason: str
    step: str | None = None
    min_version: int | None = None  # with code "version-mismatch": the sender's range
    max_version: int | None = None


# ------------------------------------------------------------------------------------- transport bodies


@dataclass(frozen=True, slots=True)
class DataChunk:
    """A chunk of a channel's byte stream; the bytes are the frame's raw payload, not in the body."""

    seq: int  # per-channel sequence number, from 0


@dataclass(frozen=True, slots=True)
class Ack:
    """Receiver -> sender for one channel: every chunk with seq < next_seq has arrived."""

    next_seq: int
    window: int | None = None  # bytes the receiver can still accept beyond next_seq (flow control)
    sack: tuple[int, ...] = ()  # received ranges beyond next_seq: start0, end0, start1, end1 ... (end excl.)


@dataclass(frozen=True, slots=True)
class Ping:
    ping_id: int
    sent_ns: int  # sender's monotonic clock; echoed in the PONG so the sender measures RTT


@dataclass(frozen=True, slots=True)
class Pong:
    ping_id: int
    sent_ns: int


@dataclass(frozen=True, slots=True)
class ChannelOpen:
    kind: str  # e.g. "qemu-main", "qemu-multifd", "sync"
    label: str | None = None
    expected_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class ChannelClose:
    next_seq: int  # number of chunks the sender sent on this channel
    reason: str | None = None
    aborted: bool = False


@dataclass(frozen=True, slots=True)
class Goodbye:
    """The sender closes this stream ("stream") or the whole session ("session") and sends no more."""

    scope: str
    reason: str | None = None


Message = (
    Hello | Welcome | Confirm | Error | DataChunk | Ack | Ping | Pong | ChannelOpen | ChannelClose | Goodbye
)


@dataclass(frozen=True, slots=True)
class FrameSpec:
    frame_type: FrameType
    body: type[Any]
    fields: tuple[Field, ...]
    channel: ChannelRule = ChannelRule.CONTROL
    payload: bool = False
    flags: int = 0
    # Derived once, used per frame by the codec:
    name: str = field(init=False, compare=False)
    by_number: dict[int, Field] = field(init=False, repr=False, compare=False)
    required: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        numbers = [f.number for f in self.fields]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"duplicate field number in {self.frame_type.name}")
        object.__setattr__(self, "name", self.frame_type.name)
        object.__setattr__(self, "by_number", {f.number: f for f in self.fields})
        object.__setattr__(self, "required", frozenset(f.name for f in self.fields if f.required))


def _caps_fields(start: int) -> tuple[Field, ...]:
    return (
        uint(start, "max_streams", MAX_U16, low=1),
        uint(start + 1, "max_frame_size", MAX_U32, low=1),
        text_list(start + 2, "codecs", MAX_CAPABILITY_ITEMS, NAME_BYTES),
        text_list(start + 3, "features", MAX_CAPABILITY_ITEMS, NAME_BYTES),
    )


REGISTRY: dict[FrameType, FrameSpec] = {
    spec.frame_type: spec
    for spec in (
        FrameSpec(
            FrameType.HELLO,
            Hello,
            (
                uint(1, "min_version", MAX_U16),
                uint(2, "max_version", MAX_U16),
                text(3, "node_id", ID_BYTES, min_bytes=1),
                text(4, "cluster_id", ID_BYTES, min_bytes=1),
                text(5, "role", ROLE_BYTES, min_bytes=1),
                text(6, "intent", NAME_BYTES, min_bytes=1),
                text(7, "mode", NAME_BYTES, min_bytes=1),
                *_caps_fields(8),
                blob(12, "session_id", SESSION_ID_BYTES, min_len=SESSION_ID_BYTES, required=False),
                blob(13, "join_nonce", JOIN_NONCE_BYTES, min_len=JOIN_NONCE_BYTES, required=False),
                blob(14, "join_token", JOIN_TOKEN_BYTES, min_len=JOIN_TOKEN_BYTES, required=False),
            ),
        ),
        FrameSpec(
            FrameType.WELCOME,
            Welcome,
            (
                uint(1, "version", MAX_U16),
                uint(2, "min_version", MAX_U16),
                uint(3, "max_version", MAX_U16),
                text(4, "node_id", ID_BYTES, min_bytes=1),
                text(5, "cluster_id", ID_BYTES, min_bytes=1),
                text(6, "role", ROLE_BYTES, min_bytes=1),
                text(7, "mode", NAME_BYTES, min_bytes=1),
                *_caps_fields(8),
                blob(12, "session_id", SESSION_ID_BYTES, min_len=SESSION_ID_BYTES),
                uint(13, "stream_index", MAX_U16),
                blob(14, "join_secret", JOIN_SECRET_BYTES, min_len=JOIN_SECRET_BYTES, required=False),
            ),
        ),
        FrameSpec(
            FrameType.CONFIRM,
            Confirm,
            (blob(1, "session_id", SESSION_ID_BYTES, min_len=SESSION_ID_BYTES),),
        ),
        FrameSpec(
            FrameType.ERROR,
            Error,
            (
                text(1, "code", NAME_BYTES, min_bytes=1),
                text(2, "reason", REASON_BYTES),
                text(3, "step", NAME_BYTES, required=False),
                uint(4, "min_version", MAX_U16, required=False),
                uint(5, "max_version", MAX_U16, required=False),
            ),
        ),
        FrameSpec(
            FrameType.DATA,
            DataChunk,
            (uint(1, "seq", MAX_U64),),
            channel=ChannelRule.DATA,
            payload=True,
            flags=FLAG_ACK_REQUESTED,
        ),
        FrameSpec(
            FrameType.ACK,
            Ack,
            (
                uint(1, "next_seq", MAX_U64),
                uint(2, "window", MAX_U64, required=False),
                uint_list(3, "sack", MAX_SACK_ITEMS),
            ),
            channel=ChannelRule.DATA,
        ),
        FrameSpec(FrameType.PING, Ping, (uint(1, "ping_id", MAX_U64), uint(2, "sent_ns", MAX_U64))),
        FrameSpec(FrameType.PONG, Pong, (uint(1, "ping_id", MAX_U64), uint(2, "sent_ns", MAX_U64))),
        FrameSpec(
            FrameType.CHANNEL_OPEN,
            ChannelOpen,
            (
                text(1, "kind", NAME_BYTES, min_bytes=1),
                text(2, "label", REASON_BYTES, required=False),
                uint(3, "expected_bytes", MAX_U64, required=False),
            ),
            channel=ChannelRule.DATA,
        ),
        FrameSpec(
            FrameType.CHANNEL_CLOSE,
            ChannelClose,
            (
                uint(1, "next_seq", MAX_U64),
                text(2, "reason", REASON_BYTES, required=False),
                boolean(3, "aborted"),
            ),
            channel=ChannelRule.DATA,
        ),
        FrameSpec(
            FrameType.GOODBYE,
            Goodbye,
            (text(1, "scope", NAME_BYTES, min_bytes=1), text(2, "reason", REASON_BYTES, required=False)),
        ),
    )
}

SPEC_BY_BODY: dict[type[Any], FrameSpec] = {spec.body: spec for spec in REGISTRY.values()}
