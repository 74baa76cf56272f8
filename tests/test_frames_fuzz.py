"""Property tests of the frame decoder: arbitrary and mutated input gives frames or one ProtocolError,
never another exception, and the decoder never holds more than one maximum-size frame."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from novacron.dwcp.errors import ProtocolError
from novacron.dwcp.frames import (
    HEADER_SIZE,
    MIN_MAX_FRAME_SIZE,
    Ack,
    ChannelClose,
    ChannelOpen,
    DataChunk,
    Frame,
    FrameDecoder,
    Goodbye,
    Ping,
    encode_frame,
)
from test_frames import SAMPLES

U64 = st.integers(min_value=0, max_value=2**64 - 1)
CHANNEL = st.integers(min_value=1, max_value=2**32 - 1)
NAME = st.text(min_size=1, max_size=8)

valid_frames = st.one_of(
    st.builds(lambda i, t: Frame(Ping(ping_id=i, sent_ns=t)), U64, U64),
    st.builds(
        lambda s, c, p: Frame(DataChunk(seq=s), channel=c, payload=p), U64, CHANNEL, st.binary(max_size=3000)
    ),
    st.builds(
        lambda n, w, sack, c: Frame(Ack(next_seq=n, window=w, sack=tuple(sack)), channel=c),
        U64,
        st.none() | U64,
        st.lists(U64, max_size=8),
        CHANNEL,
    ),
    st.builds(
        lambda k, lbl, c: Frame(ChannelOpen(kind=k, label=lbl), channel=c), NAME, st.none() | NAME, CHANNEL
    ),
    st.builds(
        lambda n, r, a, c: Frame(ChannelClose(next_seq=n, reason=r, aborted=a), channel=c),
        U64,
        st.none() | NAME,
        st.booleans(),
        CHANNEL,
    ),
    st.builds(lambda s, r: Frame(Goodbye(scope=s, reason=r)), NAME, st.none() | st.text(max_size=50)),
    st.sampled_from(SAMPLES),
)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    parts, last = [], 0
    for p in [*points, len(data)]:
        parts.append(data[last:p])
        last = p
    return parts


def _feed(dec: FrameDecoder, parts: list[bytes]) -> tuple[list[Frame], ProtocolError | None]:
    """Feed parts, draining after each; check the memory bound at every step."""
    frames: list[Frame] = []
    try:
        for part in parts:
            dec.receive_data(part)
            frames.extend(dec.frames())
            # Fully drained: nothing of the input is referenced; at most one frame is being assembled.
            assert dec.buffered_bytes == dec.copied_bytes
            assert dec.copied_bytes <= max(dec.max_frame_size - HEADER_SIZE, HEADER_SIZE)
        dec.receive_eof()
        frames.extend(dec.frames())
    except ProtocolError as exc:
        return frames, exc
    return frames, None


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=4096), cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_arbitrary_bytes_give_frames_or_a_protocol_error(data: bytes, cuts: list[int]) -> None:
    _feed(FrameDecoder(MIN_MAX_FRAME_SIZE), _split(data, cuts))


@settings(max_examples=300)
@given(
    frames=st.lists(valid_frames, min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0), max_size=12),
)
def test_valid_frames_round_trip_under_any_split(frames: list[Frame], cuts: list[int]) -> None:
    wire = b"".join(encode_frame(f) for f in frames)
    out, err = _feed(FrameDecoder(MIN_MAX_FRAME_SIZE), _split(wire, cuts))
    assert err is None
    assert [(f.body, f.channel, f.flags, bytes(f.payload)) for f in out] == [
        (f.body, f.channel, f.flags, bytes(f.payload)) for f in frames
    ]


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(min_value=0), st.integers(min_value=1, max_value=255)),
    st.tuples(st.just("insert"), st.integers(min_value=0), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(min_value=0), st.integers(min_value=1, max_value=8)),
    st.tuples(st.just("truncate"), st.integers(min_value=0), st.just(0)),
)


@settings(max_examples=500)
@given(
    frames=st.lists(valid_frames, min_size=1, max_size=4),
    mutations=st.lists(mutation, min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0), max_size=6),
)
def test_mutated_streams_give_frames_or_a_protocol_error(
    frames: list[Frame], mutations: list[tuple[str, int, object]], cuts: list[int]
) -> None:
    wire = bytearray(b"".join(encode_frame(f) for f in frames))
    for op, pos, arg in mutations:
        if not wire:
            break
        i = pos % len(wire)
        if op == "flip" and isinstance(arg, int):
            wire[i] ^= arg
        elif op == "insert" and isinstance(arg, bytes):
            wire[i:i] = arg
        elif op == "delete" and isinstance(arg, int):
            del wire[i : i + arg]
        else:
            del wire[i:]
    _feed(FrameDecoder(MIN_MAX_FRAME_SIZE), _split(bytes(wire), cuts))


def test_memory_stays_bounded_over_a_long_stream() -> None:
    """64 MiB of 1 MiB data frames in 61 KiB reads: the decoder's peak is about one frame, not the stream."""
    max_frame = 2 * 1024 * 1024
    frame_wire = encode_frame(Frame(DataChunk(seq=0), channel=1, payload=b"\xab" * (1024 * 1024)))
    chunk = 61 * 1024
    dec = FrameDecoder(max_frame)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        seen = 0
        for _ in range(64):
            for i in range(0, len(frame_wire), chunk):
                dec.receive_data(frame_wire[i : i + chunk])  # slices of bytes: one chunk alive at a time
                for frame in dec.frames():
                    seen += len(frame.payload)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert seen == 64 * 1024 * 1024
    # One frame under assembly + one finished frame in hand + one input chunk, with slack.
    assert peak < 3 * len(frame_wire), peak


def test_garbage_claiming_huge_frames_is_refused_without_buffering() -> None:
    dec = FrameDecoder(MIN_MAX_FRAME_SIZE)
    dec.receive_data(b"\xff" * 4096)
    with pytest.raises(ProtocolError) as info:
        dec.frames()
    assert info.value.what.value == "oversize"
    assert dec.copied_bytes == 0
