"""The multifd parser and header rebuild (sans-IO): exact bytes for any stream, fallback on anything odd."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from novacron.migration.tunnel.classify import ConnectionClassifier, ConnectionKind
from novacron.migration.tunnel.errors import MultifdFormatError
from novacron.migration.tunnel.multifd import (
    FLAG_SYNC,
    OFFSETS_AT,
    PAGE_SIZE,
    RAMBLOCK_AT,
    Fallback,
    MultifdInit,
    MultifdPacket,
    MultifdParser,
    RawBytes,
    apply_patch,
    diff_header,
    header_size,
    initial_header,
    parse_init,
    predict_header,
)
from novacron.migration.tunnel.synth import MultifdWriter, init_message


def _page(fill: int) -> bytes:
    return bytes([fill]) * PAGE_SIZE


def _noise(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, PAGE_SIZE, np.uint8).tobytes()


def _reassemble(events: Sequence[object]) -> bytes:
    """What the parser's events stand for, back to back (must equal what it was fed)."""
    out = bytearray()
    for ev in events:
        if isinstance(ev, MultifdInit):
            out += ev.raw
        elif isinstance(ev, MultifdPacket):
            out += ev.header + ev.data
        elif isinstance(ev, Fallback | RawBytes):
            out += ev.data
    return bytes(out)


def test_init_message_is_parsed_and_checked() -> None:
    init = parse_init(init_message(3, uuid=b"u" * 16), max_channels=8)
    assert (init.channel_id, init.uuid) == (3, b"u" * 16)
    with pytest.raises(MultifdFormatError, match="out of range"):
        parse_init(init_message(8), max_channels=8)
    bad = bytearray(init_message(0))
    bad[7] = 2  # version 2
    with pytest.raises(MultifdFormatError, match="version"):
        parse_init(bytes(bad), max_channels=8)


def test_classifier_tells_main_from_multifd_and_keeps_the_bytes() -> None:
    c = ConnectionClassifier()
    assert c.feed(b"QE") is None
    assert c.feed(b"VM\x00\x00\x00\x03") is ConnectionKind.MAIN
    assert c.head == b"QEVM\x00\x00\x00\x03"
    m = ConnectionClassifier()
    assert m.feed(init_message(1)[:5]) is ConnectionKind.MULTIFD
    assert ConnectionClassifier().feed(b"GET / HTTP/1.1") is ConnectionKind.UNKNOWN


def test_packets_parse_with_stale_header_fields() -> None:
    w = MultifdWriter(0, pages_alloc=4)
    p1 = w.packet(packet_num=7, block="pc.ram", offsets=[0, 8192], pages=_page(1) + _page(2))
    sync = w.packet(packet_num=9, flags=FLAG_SYNC)  # keeps the block name, offsets and next size of p1
    parser = MultifdParser()
    events = parser.feed(w.init() + p1 + sync)
    init, a, b = events
    assert isinstance(init, MultifdInit) and init.channel_id == 0
    assert isinstance(a, MultifdPacket) and isinstance(b, MultifdPacket)
    assert (a.normal_pages, a.block, a.offsets.tolist() if a.offsets is not None else None) == (
        2,
        "pc.ram",
        [0, 8192],
    )
    assert a.data == _page(1) + _page(2) and not a.sync
    assert b.sync and b.normal_pages == 0 and b.data == b"" and b.batchable
    assert b.header[RAMBLOCK_AT : RAMBLOCK_AT + 6] == b"pc.ram"  # stale, as QEMU leaves it
    # The prediction rebuilds both headers exactly from the previous one, without a patch.
    pred_a = predict_header(
        initial_header(len(a.header)), flags=0, packet_num=7, block="pc.ram", offsets=a.offsets
    )
    assert (
        diff_header(a.header, pred_a) != b""
    )  # magic/version/pages_alloc are not predictable the first time
    pred_b = predict_header(a.header, flags=FLAG_SYNC, packet_num=9, block=None, offsets=None)
    assert diff_header(b.header, pred_b) == b""


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda h: h.__setitem__(slice(0, 4), b"\x00\x00\x00\x01"), "packet magic"),
        (lambda h: h.__setitem__(slice(4, 8), struct.pack(">I", 2)), "packet version"),
        (lambda h: h.__setitem__(slice(8, 12), struct.pack(">I", 1 << 5)), "unknown packet flags"),
        (lambda h: h.__setitem__(slice(8, 12), struct.pack(">I", 2 << 1)), "compressed"),
        (lambda h: h.__setitem__(slice(16, 20), struct.pack(">I", 9)), "normal_pages 9 > pages_alloc"),
        (lambda h: h.__setitem__(slice(12, 16), struct.pack(">I", 5000)), "pages_alloc 5000"),
    ],
)
def test_unrecognised_headers_fall_back_with_every_byte_kept(mutate: object, reason: str) -> None:
    w = MultifdWriter(1, pages_alloc=4)
    good = w.packet(packet_num=1, block="pc.ram", offsets=[4096], pages=_page(5))
    bad = bytearray(w.packet(packet_num=2, block="pc.ram", offsets=[0], pages=_page(6)))
    mutate(bad)  # type: ignore[operator]
    stream = w.init() + good + bytes(bad) + b"trailing bytes"
    parser = MultifdParser()
    events = parser.feed(stream) + parser.feed(b"more") + parser.eof()
    assert _reassemble(events) == stream + b"more"
    fb = [e for e in events if isinstance(e, Fallback)]
    assert len(fb) == 1 and reason in fb[0].reason and parser.fell_back
    assert sum(isinstance(e, MultifdPacket) for e in events) == 1


def test_header_size_change_and_truncation_fall_back() -> None:
    a, b = MultifdWriter(0, pages_alloc=4), MultifdWriter(0, pages_alloc=8)
    stream = a.init() + a.packet(packet_num=0) + b.packet(packet_num=1)
    events = MultifdParser().feed(stream)
    assert isinstance(events[-1], Fallback) and "pages_alloc changed" in events[-1].reason
    assert _reassemble(events) == stream
    p = MultifdParser()
    cut = a.init() + a.packet(packet_num=2, block="x", offsets=[0], pages=_page(1))[:-10]
    events = p.feed(cut) + p.eof()
    assert isinstance(events[-1], Fallback) and "ended inside" in events[-1].reason
    assert _reassemble(events) == cut


def test_packets_hde_cannot_take_are_marked_not_batchable() -> None:
    w = MultifdWriter(0, pages_alloc=4)
    cases = [
        w.packet(packet_num=0, block="pc.ram", offsets=[100], pages=_page(1)),  # not page aligned
        w.packet(packet_num=1, block="pc.ram", offsets=[4096, 4096], pages=_page(1) * 2),  # repeated
        w.packet(packet_num=2, block="", offsets=[0], pages=_page(1)),  # empty name
        w.packet(packet_num=3, block="pc.ram", offsets=[1 << 50], pages=_page(1)),  # beyond HDE's index
    ]
    events = MultifdParser().feed(w.init() + b"".join(cases))
    packets = [e for e in events if isinstance(e, MultifdPacket)]
    assert len(packets) == 4 and not any(p.batchable for p in packets)


def test_patch_roundtrip_and_bounds() -> None:
    base = bytes(range(256)) * 2
    actual = bytearray(base)
    actual[3] ^= 1
    actual[5] ^= 1  # within the merge gap: one run
    actual[400:410] = b"0123456789"
    patch = diff_header(bytes(actual), base)
    rebuilt = bytearray(base)
    apply_patch(rebuilt, patch)
    assert rebuilt == actual
    assert diff_header(base, base) == b""
    with pytest.raises(MultifdFormatError):
        apply_patch(bytearray(16), struct.pack("<HH", 10, 10) + bytes(10))
    with pytest.raises(MultifdFormatError):
        apply_patch(bytearray(16), b"\x01")


# ------------------------------------------------------------------------------ property: exact rebuild


@st.composite
def channel_streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    pages_alloc = draw(st.integers(1, 6))
    w = MultifdWriter(draw(st.integers(0, 7)), pages_alloc=pages_alloc)
    out = [w.init()]
    hsize = header_size(pages_alloc)
    for num in range(draw(st.integers(0, 12))):
        if draw(st.booleans()):  # stale junk anywhere in the reused header buffer
            at = draw(st.integers(OFFSETS_AT // 2, hsize - 1))
            w.scribble(at, draw(st.binary(min_size=1, max_size=min(32, hsize - at))))
        n = draw(st.integers(0, pages_alloc))
        index = draw(st.lists(st.integers(0, 4000), min_size=n, max_size=n, unique=True))
        offsets = [i * PAGE_SIZE + (draw(st.sampled_from([0, 0, 0, 8])) if n else 0) for i in index]
        fills = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
        pages = b"".join(_page(f) if f < 3 else _noise(i) for i, f in enumerate(fills))
        block = draw(st.sampled_from(["pc.ram", "pc.ram", "vga.vram", "x" * 256]))
        flags = draw(st.sampled_from([0, 0, FLAG_SYNC]))
        out.append(w.packet(packet_num=num * 4 + 1, block=block, offsets=offsets, pages=pages, flags=flags))
    if draw(st.booleans()):
        out.append(draw(st.binary(max_size=64)))  # junk at the end: must fall back, not corrupt
    data = b"".join(out)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    return data, cuts


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(channel_streams())
def test_parser_consumes_exactly_what_it_was_fed(sample: tuple[bytes, list[int]]) -> None:
    data, cuts = sample
    parser = MultifdParser()
    events: list[object] = []
    for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
        events += parser.feed(data[a:b])
    events += parser.eof()
    assert _reassemble(events) == data
    assert parser.consumed == len(data)
