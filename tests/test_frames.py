"""The DWCP v3 frame codec: round trips, incremental decoding, limits and every kind of protocol error."""

from __future__ import annotations

import struct

import msgpack
import pytest

from novacron.dwcp.errors import ProtocolError, ProtocolErrorKind
from novacron.dwcp.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    FLAG_ACK_REQUESTED,
    HANDSHAKE_MAX_FRAME_SIZE,
    HARD_MAX_FRAME_SIZE,
    HEADER_SIZE,
    MIN_MAX_FRAME_SIZE,
    REGISTRY,
    Ack,
    ChannelClose,
    ChannelOpen,
    Confirm,
    DataChunk,
    Error,
    Frame,
    FrameDecoder,
    FrameEncoder,
    FrameType,
    Goodbye,
    Hello,
    Ping,
    Pong,
    Welcome,
    encode_frame,
)
from novacron.dwcp.frames.limits import FRAME_FORMAT_VERSION, HEADER, MAX_BODY_SIZE

MiB = 1024 * 1024

HELLO = Hello(
    min_version=3,
    max_version=3,
    node_id="host-1",
    cluster_id="dc1",
    role="agent",
    intent="join",
    mode="internet",
    max_streams=8,
    max_frame_size=MiB,
    codecs=("zstd", "lz4"),
    features=("sack",),
    session_id=b"s" * 16,
    join_nonce=b"n" * 16,
    join_token=b"t" * 32,
)

SAMPLES = [
    Frame(HELLO),
    Frame(
        Welcome(
            version=3,
            min_version=3,
            max_version=4,
            node_id="host-2",
            cluster_id="dc1",
            role="agent",
            mode="datacenter",
            max_streams=4,
            max_frame_size=MiB,
            session_id=b"s" * 16,
            stream_index=0,
            codecs=("zstd",),
            join_secret=b"k" * 32,
        )
    ),
    Frame(Confirm(session_id=b"s" * 16)),
    Frame(
        Error(code="version-mismatch", reason="no common version", step="hello", min_version=3, max_version=3)
    ),
    Frame(DataChunk(seq=2**64 - 1), channel=7, flags=FLAG_ACK_REQUESTED, payload=b"\x00\xff" * 1000),
    Frame(Ack(next_seq=10, window=1 << 30, sack=(12, 14, 20, 21)), channel=2**32 - 1),
    Frame(Ping(ping_id=1, sent_ns=123456789)),
    Frame(Pong(ping_id=1, sent_ns=123456789)),
    Frame(ChannelOpen(kind="qemu-multifd", label="multifd 3", expected_bytes=4 << 30), channel=4),
    Frame(ChannelClose(next_seq=99, reason="done", aborted=True), channel=4),
    Frame(Goodbye(scope="session", reason="migration complete")),
]


def _decode_all(data: bytes, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> list[Frame]:
    dec = FrameDecoder(max_frame_size)
    dec.receive_data(data)
    frames = dec.frames()
    dec.receive_eof()
    assert dec.next_frame() is None
    return frames


def _same(a: Frame, b: Frame) -> bool:
    return (a.body, a.channel, a.flags, bytes(a.payload)) == (b.body, b.channel, b.flags, bytes(b.payload))


def _raw_frame(
    ftype: int, body: bytes, *, channel: int = 0, flags: int = 0, payload: bytes = b"", fmt: int = 1
) -> bytes:
    frame_len = HEADER_SIZE - 4 + len(body) + len(payload)
    return HEADER.pack(frame_len, fmt, ftype, flags, channel, len(body)) + body + payload


def _expect(
    kind: ProtocolErrorKind, data: bytes, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> ProtocolError:
    dec = FrameDecoder(max_frame_size)
    dec.receive_data(data)
    dec.receive_eof()
    with pytest.raises(ProtocolError) as info:
        dec.frames()
    assert info.value.what is kind, info.value
    # The decoder is dead afterwards and repeats the same error.
    with pytest.raises(ProtocolError) as again:
        dec.next_frame()
    assert again.value is info.value
    return info.value


def test_every_registered_type_has_a_sample() -> None:
    assert {f.type for f in SAMPLES} == set(REGISTRY)


@pytest.mark.parametrize("frame", SAMPLES, ids=lambda f: f.type.name)
def test_round_trip(frame: Frame) -> None:
    data = encode_frame(frame)
    (decoded,) = _decode_all(data)
    assert _same(decoded, frame)
    assert decoded.type is frame.type


def test_any_split_of_the_input_gives_the_same_frames() -> None:
    stream = b"".join(encode_frame(f) for f in SAMPLES)
    expected = SAMPLES
    # Every two-way split, and byte-by-byte.
    for cut in range(0, len(stream) + 1, 7):
        dec = FrameDecoder(DEFAULT_MAX_FRAME_SIZE)
        out: list[Frame] = []
        for part in (stream[:cut], stream[cut:]):
            dec.receive_data(part)
            out.extend(dec.frames())
        assert len(out) == len(expected) and all(_same(a, b) for a, b in zip(out, expected, strict=True)), cut
    dec = FrameDecoder(DEFAULT_MAX_FRAME_SIZE)
    out = []
    for i in range(len(stream)):
        dec.receive_data(stream[i : i + 1])
        out.extend(dec.frames())
    assert all(_same(a, b) for a, b in zip(out, expected, strict=True)) and len(out) == len(expected)


def test_header_layout_is_the_documented_one() -> None:
    data = encode_frame(Frame(DataChunk(seq=5), channel=3, payload=b"abc"))
    frame_len, fmt, ftype, flags, channel, body_len = struct.unpack(">IBBHII", data[:16])
    assert (fmt, ftype, flags, channel) == (FRAME_FORMAT_VERSION, 0x10, 0, 3)
    assert frame_len == len(data) - 4
    assert msgpack.unpackb(data[16 : 16 + body_len], strict_map_key=False) == {1: 5}
    assert data[16 + body_len :] == b"abc"


def test_data_payload_is_not_copied_on_encode_and_sliced_on_decode() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    enc = FrameEncoder(DEFAULT_MAX_FRAME_SIZE)
    head, out_payload = enc.encode_parts(Frame(DataChunk(seq=1), channel=1, payload=payload))
    assert out_payload is payload  # handed to the socket as is
    wire = head + payload
    # Whole frame in one input: the payload is a view into that input (zero copy).
    dec = FrameDecoder(DEFAULT_MAX_FRAME_SIZE)
    dec.receive_data(wire)
    frame = dec.next_frame()
    assert frame is not None and isinstance(frame.payload, memoryview)
    assert frame.payload.obj is wire and bytes(frame.payload) == payload
    # Split input: assembled once into a buffer of exactly the frame's size.
    dec = FrameDecoder(DEFAULT_MAX_FRAME_SIZE)
    for i in range(0, len(wire), 65536):
        dec.receive_data(wire[i : i + 65536])
        assert dec.copied_bytes <= len(wire)
    frame = dec.next_frame()
    assert frame is not None and bytes(frame.payload) == payload
    assert isinstance(frame.payload, memoryview) and len(frame.payload.obj) == len(wire) - 4 - 12  # type: ignore[arg-type]


def test_mutable_input_is_copied_so_later_changes_do_not_leak_into_frames() -> None:
    buf = bytearray(encode_frame(Frame(DataChunk(seq=1), channel=1, payload=b"original")))
    dec = FrameDecoder(DEFAULT_MAX_FRAME_SIZE)
    dec.receive_data(buf)
    buf[-8:] = b"CHANGED!"
    frame = dec.next_frame()
    assert frame is not None and bytes(frame.payload) == b"original"


def test_unknown_optional_fields_are_ignored() -> None:
    body = msgpack.packb({1: 42, 2: 7, 99: "from the future", "x": [1, 2]}, use_bin_type=True)
    (frame,) = _decode_all(_raw_frame(FrameType.PING, body))
    assert frame.body == Ping(ping_id=42, sent_ns=7)


def test_unknown_frame_type_is_refused() -> None:
    err = _expect(ProtocolErrorKind.UNKNOWN_TYPE, _raw_frame(0x7F, msgpack.packb({})))
    assert "0x7f" in str(err)


def test_oversize_length_is_refused_before_the_body_arrives() -> None:
    header = HEADER.pack(DEFAULT_MAX_FRAME_SIZE, FRAME_FORMAT_VERSION, FrameType.DATA, 0, 1, 3)
    dec = FrameDecoder(DEFAULT_MAX_FRAME_SIZE)
    dec.receive_data(header)  # only the header: the decoder must not wait for 4 MiB
    with pytest.raises(ProtocolError) as info:
        dec.next_frame()
    assert info.value.what is ProtocolErrorKind.OVERSIZE
    assert dec.copied_bytes == 0


def test_handshake_limit_applies_until_the_negotiated_one_is_set() -> None:
    frame = Frame(DataChunk(seq=0), channel=1, payload=b"x" * (HANDSHAKE_MAX_FRAME_SIZE))
    wire = encode_frame(frame)
    _expect(ProtocolErrorKind.OVERSIZE, wire, HANDSHAKE_MAX_FRAME_SIZE)
    with pytest.raises(ProtocolError):
        FrameEncoder(HANDSHAKE_MAX_FRAME_SIZE).encode(frame)
    dec = FrameDecoder(HANDSHAKE_MAX_FRAME_SIZE)
    dec.set_max_frame_size(MiB)
    dec.receive_data(wire)
    assert dec.next_frame() is not None


def test_max_frame_size_bounds() -> None:
    for bad in (MIN_MAX_FRAME_SIZE - 1, HARD_MAX_FRAME_SIZE + 1):
        with pytest.raises(ProtocolError):
            FrameDecoder(bad)
        with pytest.raises(ProtocolError):
            FrameEncoder(bad)


def test_truncated_stream_is_reported_at_eof() -> None:
    wire = encode_frame(SAMPLES[0])
    for cut in (1, HEADER_SIZE - 1, HEADER_SIZE, len(wire) - 1):
        err = _expect(ProtocolErrorKind.TRUNCATED, wire[:cut])
        assert "middle of a frame" in str(err)
    # A clean end between frames is not an error.
    assert len(_decode_all(wire + wire)) == 2


def test_wrong_format_version_is_refused() -> None:
    _expect(ProtocolErrorKind.VERSION, _raw_frame(FrameType.PING, msgpack.packb({1: 1, 2: 2}), fmt=2))


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (_raw_frame(FrameType.PING, b"\xc1"), "not a valid msgpack"),  # 0xc1 is never used in msgpack
        (_raw_frame(FrameType.PING, msgpack.packb([1, 2])), "expected a map"),
        (_raw_frame(FrameType.PING, msgpack.packb({1: 1})), "sent_ns (2) is missing"),
        (_raw_frame(FrameType.PING, msgpack.packb({1: -1, 2: 1})), "ping_id"),
        (_raw_frame(FrameType.PING, msgpack.packb({1: True, 2: 1})), "unsigned integer"),
        (_raw_frame(FrameType.PING, msgpack.packb({1: "1", 2: 1})), "unsigned integer"),
        (_raw_frame(FrameType.CONFIRM, msgpack.packb({1: b"short"})), "length 5"),
        (_raw_frame(FrameType.GOODBYE, msgpack.packb({1: "x" * 40})), "scope"),
        (_raw_frame(FrameType.PING, msgpack.packb({1: 1, 2: 2}) + b"\x00"), "not a valid msgpack"),
        (_raw_frame(FrameType.PING, msgpack.packb({1: 1, 2: 2}), channel=3), "control channel"),
        (_raw_frame(FrameType.DATA, msgpack.packb({1: 1}), channel=0), "channel id >= 1"),
        (_raw_frame(FrameType.DATA, msgpack.packb({1: 1}), channel=1, flags=0x8000), "unknown flags"),
        (_raw_frame(FrameType.PING, msgpack.packb({1: 1, 2: 2}), payload=b"x"), "no payload"),
        (HEADER.pack(8, 1, FrameType.PING, 0, 0, 0), "shorter than"),
        (HEADER.pack(12, 1, FrameType.PING, 0, 0, 0), "body length 0"),
        (HEADER.pack(20, 1, FrameType.PING, 0, 0, 30) + b"\x00" * 8, "does not fit"),
        (_raw_frame(FrameType.HELLO, b"\x91" * 300), "not a valid msgpack"),  # nesting/array limits
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_malformed_frames_are_refused_with_a_reason(data: bytes, needle: str) -> None:
    err = _expect(ProtocolErrorKind.MALFORMED, data)
    assert needle in str(err), str(err)
    assert "offset" in err.context


def test_body_larger_than_its_limit_is_oversize() -> None:
    body = b"\x80" + b"\x00" * MAX_BODY_SIZE
    err = _expect(ProtocolErrorKind.OVERSIZE, _raw_frame(FrameType.PING, body))
    assert "body" in str(err)


def test_encoder_refuses_invalid_frames() -> None:
    enc = FrameEncoder(DEFAULT_MAX_FRAME_SIZE)
    with pytest.raises(ProtocolError, match="control channel"):
        enc.encode(Frame(Ping(ping_id=1, sent_ns=1), channel=2))
    with pytest.raises(ProtocolError, match="no payload"):
        enc.encode(Frame(Ping(ping_id=1, sent_ns=1), payload=b"x"))
    with pytest.raises(ProtocolError, match="ping_id"):
        enc.encode(Frame(Ping(ping_id=-5, sent_ns=1)))
    with pytest.raises(ProtocolError, match="not a registered"):
        enc.encode(Frame(object()))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        enc.encode(Frame(DataChunk(seq=1), channel=1, payload=b"x" * DEFAULT_MAX_FRAME_SIZE))


def test_data_after_eof_is_an_error() -> None:
    dec = FrameDecoder()
    dec.receive_eof()
    with pytest.raises(ProtocolError):
        dec.receive_data(b"x")
