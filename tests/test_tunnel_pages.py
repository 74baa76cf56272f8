"""The qemu-pages record stream (sans-IO): multifd bytes of several channels -> records -> the same bytes.

Covers the encoder/decoder pair, the header prediction under arbitrary stale content, fallbacks,
repairs of missing baseline references, corrupted batches and malformed records, and the SYNC barrier.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from novacron.dwcp.encoding import (
    BaselineStore,
    BaselineView,
    DefaultPageHasher,
    HdeDecodeError,
    HdeEncoder,
    HdeLimits,
    PageBatch,
)
from novacron.migration.tunnel.barrier import SyncBarrier
from novacron.migration.tunnel.errors import RecordError
from novacron.migration.tunnel.multifd import (
    FLAG_SYNC,
    OFFSETS_AT,
    PAGE_SIZE,
    Fallback,
    MultifdInit,
    MultifdPacket,
    MultifdParser,
    RawBytes,
    header_size,
)
from novacron.migration.tunnel.pages import (
    Deliver,
    DivertChannel,
    EndChannel,
    OpenChannel,
    PageStreamDecoder,
    PageStreamEncoder,
    RequestRepair,
    StreamFinished,
)
from novacron.migration.tunnel.records import Ack, pack_ack, pack_hello, parse_return_record
from novacron.migration.tunnel.synth import MultifdWriter, qemu_like_streams

KEY = bytes(range(32))
SMALL = HdeLimits(session_cache_bytes=8 << 20)


def _encoder(baseline: BaselineView | None = None, corrupt_seq: int | None = None) -> PageStreamEncoder:
    hde = HdeEncoder(DefaultPageHasher(KEY), SMALL, baseline=baseline)
    return PageStreamEncoder(hde, channels=4, corrupt_seq=corrupt_seq)


def _decoder(**kw: object) -> PageStreamDecoder:
    args: dict[str, object] = {
        "max_channels": 64,
        "max_record_bytes": 8 << 20,
        "max_held_records": 64,
        "max_session_cache_bytes": 1 << 30,
    }
    args.update(kw)
    return PageStreamDecoder(**args)  # type: ignore[arg-type]


class Pipeline:
    """Feeds channel bytes through parser -> encoder -> records -> decoder, like the tunnel does."""

    def __init__(self, enc: PageStreamEncoder, dec: PageStreamDecoder) -> None:
        self.enc, self.dec = enc, dec
        self.parsers: dict[int, MultifdParser] = {}
        self.sent: dict[int, bytearray] = defaultdict(bytearray)
        self.rebuilt: dict[int, bytearray] = defaultdict(bytearray)
        self.raw: dict[int, bytearray] = defaultdict(bytearray)  # diverted bytes (their own channel)
        self.outputs: list[object] = []
        self._deliver(enc.hello().data)

    def _deliver(self, record: bytes) -> None:
        for out in self.dec.receive(record):
            self.outputs.append(out)
            if isinstance(out, OpenChannel):
                self.rebuilt[out.channel] += out.init
            elif isinstance(out, Deliver):
                for part in out.parts:
                    self.rebuilt[out.channel] += part
            elif isinstance(out, RequestRepair):
                self._deliver(self.enc.repair(out.seq).data)

    def feed(self, channel: int, data: bytes) -> None:
        self.sent[channel] += data
        parser = self.parsers.setdefault(channel, MultifdParser())
        self._events(channel, parser.feed(data))

    def _events(self, channel: int, events: Sequence[object]) -> None:
        for ev in events:
            if isinstance(ev, MultifdInit):
                self._deliver(self.enc.open(channel, ev).data)
            elif isinstance(ev, MultifdPacket):
                self._deliver(self.enc.packet(channel, ev).data)
            elif isinstance(ev, Fallback):
                self._deliver(self.enc.divert(channel, ev.reason).data)
                self.raw[channel] += ev.data
            elif isinstance(ev, RawBytes):
                self.raw[channel] += ev.data

    def end(self) -> None:
        for channel, parser in self.parsers.items():
            self._events(channel, parser.eof())
            self._deliver(self.enc.end(channel, len(self.sent[channel])).data)
        self._deliver(self.enc.finish().data)
        self.enc.acknowledged(self.dec.resolved)

    def check(self) -> None:
        for channel, data in self.sent.items():
            assert bytes(self.rebuilt[channel] + self.raw[channel]) == bytes(data), channel


def _page(seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, PAGE_SIZE, np.uint8).tobytes()


# ------------------------------------------------------------------------------------- properties


@st.composite
def merged_streams(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    """Byte pieces of 1..4 channels in an arbitrary interleaving, with stale header junk and fallbacks."""
    channels = draw(st.integers(1, 4))
    pieces: list[tuple[int, bytes]] = []
    pages_alloc = draw(st.integers(1, 8))
    for ch in range(channels):
        w = MultifdWriter(ch, pages_alloc=pages_alloc)
        data = [w.init()]
        for num in range(draw(st.integers(0, 10))):
            if draw(st.integers(0, 3)) == 0:
                at = draw(st.integers(OFFSETS_AT // 2, header_size(pages_alloc) - 1))
                w.scribble(at, draw(st.binary(min_size=1, max_size=24)))
            n = draw(st.integers(0, pages_alloc))
            index = draw(st.lists(st.integers(0, 300), min_size=n, max_size=n, unique=True))
            kinds = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
            # 0: zero page, 1-2: one of a few shared pages, 3-4: a page unique to this position
            pages = b"".join(
                bytes(PAGE_SIZE) if k == 0 else _page(k if k < 3 else 1000 + i * 7 + num)
                for i, k in zip(index, kinds, strict=True)
            )
            misalign = draw(st.integers(0, 9)) == 0
            offsets = [i * PAGE_SIZE + (8 if misalign else 0) for i in index]
            flags = draw(st.sampled_from([0, 0, FLAG_SYNC]))
            data.append(
                w.packet(
                    packet_num=num * channels + ch, block="pc.ram", offsets=offsets, pages=pages, flags=flags
                )
            )
        if draw(st.integers(0, 4)) == 0:
            data.append(draw(st.binary(min_size=1, max_size=40)))
        stream = b"".join(data)
        cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=5)))
        for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            if b > a:
                pieces.append((ch, stream[a:b]))
    order = draw(st.permutations(range(len(pieces))))
    # Keep each channel's pieces in order while interleaving channels arbitrarily.
    by_channel: dict[int, list[bytes]] = defaultdict(list)
    for ch, piece in pieces:
        by_channel[ch].append(piece)
    out: list[tuple[int, bytes]] = []
    for i in order:
        ch = pieces[i][0]
        out.append((ch, by_channel[ch].pop(0)))
    return out


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(merged_streams())
def test_records_rebuild_every_channel_exactly(pieces: list[tuple[int, bytes]]) -> None:
    p = Pipeline(_encoder(), _decoder())
    for ch, data in pieces:
        p.feed(ch, data)
    p.end()
    p.check()
    assert isinstance(p.outputs[-1], StreamFinished)
    assert p.dec.resolved == p.enc.records


def test_realistic_rounds_compress_and_rebuild() -> None:
    rng = np.random.default_rng(5)
    text = np.frombuffer((b"the quick brown fox jumps over the lazy dog " * 100)[:PAGE_SIZE], np.uint8)
    memory = np.zeros((3000, PAGE_SIZE), np.uint8)
    memory[:1500] = text
    memory[::7] = rng.integers(0, 256, (len(memory[::7]), PAGE_SIZE), np.uint8)
    memory[2000:2010, :100] = 1
    p = Pipeline(_encoder(), _decoder())
    second = np.arange(0, 3000, 3)
    for pkt in qemu_like_streams(memory, channels=4, round_pages=512, rounds=[np.arange(3000), second]):
        p.feed(pkt.channel, pkt.data)
    p.end()
    p.check()
    raw = sum(len(b) for b in p.sent.values())
    assert p.enc.hde.stats.wire_bytes < raw / 3  # text compresses, resent pages go as "unchanged"
    assert p.enc.patched_headers == 4  # only the first packet of each channel needs a patch
    assert p.dec.syncs == p.enc.syncs == 8  # two rounds, one SYNC per channel each


# ----------------------------------------------------------------------------------- failure paths


def _one_packet_stream(seed: int = 1) -> bytes:
    w = MultifdWriter(0, pages_alloc=4)
    pages = _page(seed) + _page(seed + 1)
    return w.init() + w.packet(packet_num=1, block="pc.ram", offsets=[0, 4096], pages=pages)


def test_corrupted_batch_is_refused_with_hde_decode_error() -> None:
    p = Pipeline(_encoder(corrupt_seq=0), _decoder())
    with pytest.raises(HdeDecodeError, match=r"checksum|corrupt"):
        p.feed(0, _one_packet_stream())
    assert not any(isinstance(o, Deliver) for o in p.outputs)


def test_missing_baseline_reference_is_repaired(tmp_path: Path) -> None:
    # The sender believes the receiver holds these pages (summary of store A); the receiver's store B
    # does not: the decoder asks for a repair, holds later records, then rebuilds everything exactly.
    hasher = DefaultPageHasher(KEY)
    a = BaselineStore(tmp_path / "a", hasher)
    shared = np.frombuffer(_page(1) + _page(2) + _page(3), np.uint8).reshape(3, PAGE_SIZE)
    a.add_content(shared)
    view = BaselineView(a.summary(None))
    b = BaselineStore(tmp_path / "b", hasher)
    p = Pipeline(_encoder(baseline=view), _decoder(baseline=b.session("vm")))
    w = MultifdWriter(0, pages_alloc=4)
    p.feed(0, w.init())
    p.feed(0, w.packet(packet_num=1, block="pc.ram", offsets=[0, 4096], pages=_page(1) + _page(2)))
    p.feed(0, w.packet(packet_num=2, block="pc.ram", offsets=[8192], pages=_page(3)))
    p.end()
    p.check()
    repairs = [o for o in p.outputs if isinstance(o, RequestRepair)]
    assert [r.seq for r in repairs] == [0]  # after the first repair the sender stops using the baseline
    assert p.enc.hde.stats.repairs == 1 and p.enc.kept_batches == 0
    a.close()
    b.close()


def test_malformed_records_are_refused() -> None:
    dec = _decoder()
    with pytest.raises(RecordError, match="first record is not HELLO"):
        dec.receive(_encoder().open(0, MultifdParser().feed(MultifdWriter(0).init())[0]).data)  # type: ignore[arg-type]
    with pytest.raises(RecordError, match="unknown record type"):
        _decoder().receive(b"\x7e")
    with pytest.raises(RecordError, match="version"):
        _decoder().receive(pack_hello(4, 1 << 20)[:1] + b"\x09" + pack_hello(4, 1 << 20)[2:])
    with pytest.raises(RecordError, match="larger than this host allows"):
        _decoder(max_session_cache_bytes=1 << 20).receive(pack_hello(4, 8 << 20))
    with pytest.raises(RecordError, match="not valid on qemu-pages from the destination"):
        parse_return_record(pack_hello(1, 1))
    assert parse_return_record(pack_ack(3, 99)) == Ack(3, 99)


def test_end_with_a_wrong_byte_count_is_refused() -> None:
    enc, dec = _encoder(), _decoder()
    dec.receive(enc.hello().data)
    dec.receive(enc.open(0, MultifdParser().feed(MultifdWriter(0).init())[0]).data)  # type: ignore[arg-type]
    with pytest.raises(RecordError, match="different byte count"):
        dec.receive(enc.end(0, 65).data)


def test_finish_must_match_the_stream() -> None:
    enc, dec = _encoder(), _decoder()
    dec.receive(enc.hello().data)
    dec.receive(enc.open(0, MultifdParser().feed(MultifdWriter(0).init())[0]).data)  # type: ignore[arg-type]
    with pytest.raises(RecordError, match="channels still open"):
        dec.receive(enc.finish().data)


def test_decoder_outputs_channel_lifecycle_in_order() -> None:
    p = Pipeline(_encoder(), _decoder())
    p.feed(0, _one_packet_stream())
    # Multifd magic but version 0: unparsable from the first byte, the channel opens diverted.
    p.feed(1, b"\x11\x22\x33\x44" + bytes(60) + b"garbage that is not a packet header ......" * 10)
    p.end()
    p.check()
    kinds = [type(o).__name__ for o in p.outputs]
    assert kinds.count("OpenChannel") == 1 and kinds.count("EndChannel") == 2
    assert any(isinstance(o, DivertChannel) and o.channel == 1 for o in p.outputs)
    assert isinstance(p.outputs[-1], StreamFinished)
    assert [o.channel for o in p.outputs if isinstance(o, EndChannel)] == [0, 1]


# ------------------------------------------------------------------------------------------ barrier


def test_barrier_parks_channels_until_the_round_is_complete() -> None:
    b = SyncBarrier(expected=3)
    assert b.took_sync(0) == set() and b.parked(0)
    assert b.took_sync(1) == set()
    with pytest.raises(Exception, match="second SYNC"):
        b.took_sync(1)
    assert b.took_sync(2) == {0, 1, 2} and b.rounds == 1
    assert b.took_sync(2) == set()
    assert b.leave(0) == set()  # round size 2 now: 1 more to come
    assert b.took_sync(1) == {1, 2}
    # A fourth channel nobody announced joins: rounds count it too.
    b.join(3)
    assert b.took_sync(1) == set() and b.took_sync(2) == set() and b.took_sync(3) == {1, 2, 3}
    # A parked channel that leaves frees the others if it completes the round.
    assert b.took_sync(1) == set() and b.took_sync(2) == set()
    assert b.leave(3) == {1, 2}


# ------------------------------------------------------------------------------------- baseline copy


async def test_recording_a_copy_runs_off_the_event_loop(tmp_path: Path) -> None:
    """Recording hashes and writes every page (seconds for a large guest): the agent's event loop,
    which serves the host's other migrations and its API, must not do that work itself."""
    import threading

    from novacron.migration.tunnel.baseline import record_copy

    loop_thread = threading.get_ident()
    seen: list[int] = []

    def batches() -> Iterator[PageBatch]:
        for i in range(3):
            seen.append(threading.get_ident())
            yield PageBatch("pc.ram", np.array([i * PAGE_SIZE], dtype=np.uint64), _page(i + 1))

    store = BaselineStore(tmp_path / "store", DefaultPageHasher(KEY))
    assert await record_copy(store, "vm", batches()) == 3
    assert seen and loop_thread not in seen
    assert store.summary("vm").copy["pc.ram"].index.tolist() == [0, 1, 2]
    store.close()


async def test_a_cancelled_recording_returns_only_once_its_thread_stopped(tmp_path: Path) -> None:
    """The batches are views of the session cache, handed to the next session when the tunnel closes:
    a cancelled recording must not return while its thread still reads them."""
    import threading

    from novacron.migration.tunnel.baseline import record_copy

    reading, release = threading.Event(), threading.Event()
    produced: list[int] = []

    def batches() -> Iterator[PageBatch]:
        for i in range(50):
            if i == 1:
                reading.set()
                release.wait(30)
            produced.append(i)
            yield PageBatch("pc.ram", np.array([i * PAGE_SIZE], dtype=np.uint64), _page(i + 1))

    store = BaselineStore(tmp_path / "store", DefaultPageHasher(KEY))
    task = asyncio.create_task(record_copy(store, "vm", batches()))
    assert await asyncio.to_thread(reading.wait, 30)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=0.3)
    assert not done  # still waiting for the thread, which is inside a batch
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert produced == [0, 1]  # it stopped after the batch it was on
    assert store.summary("vm").copy["pc.ram"].index.tolist() == [0]
    store.close()


async def test_both_sides_record_the_same_copy_of_what_crossed(tmp_path: Path) -> None:
    from novacron.migration.tunnel.baseline import record_copy

    p = Pipeline(_encoder(), _decoder())
    w = MultifdWriter(0, pages_alloc=4)
    p.feed(0, w.init())
    p.feed(
        0,
        w.packet(packet_num=1, block="pc.ram", offsets=[0, 4096, 8192], pages=_page(1) + _page(2) + _page(3)),
    )
    # Address 4096 changes, address 8192 becomes zero: the copy holds the last version of each.
    p.feed(0, w.packet(packet_num=2, block="pc.ram", offsets=[4096, 8192], pages=_page(9) + bytes(PAGE_SIZE)))
    p.end()
    p.check()
    sent = list(p.enc.hde.session_pages())
    assert p.dec.hde is not None
    received = list(p.dec.hde.session_pages())
    assert sent == received
    assert len(sent) == 1 and sent[0].offsets.tolist() == [0, 4096]
    assert bytes(sent[0].data) == _page(1) + _page(9)
    hasher = DefaultPageHasher(KEY)
    for side, batches in (("src", sent), ("dst", received)):
        store = BaselineStore(tmp_path / side, hasher)
        assert await record_copy(store, "vm", batches) == 2
        copy = store.summary("vm").copy["pc.ram"]
        assert copy.index.tolist() == [0, 1]
        store.close()
