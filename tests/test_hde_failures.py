"""Bad input, corrupt or hostile batches, adversarial hash collisions: typed errors, never wrong bytes."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from novacron.dwcp.encoding import (
    PAGE_SIZE,
    BaselineStore,
    BaselineSummary,
    BaselineView,
    DefaultPageHasher,
    HdeConfigError,
    HdeDecodeError,
    HdeDecoder,
    HdeEncoder,
    HdeInputError,
    HdeLimits,
    HdeReferenceMissing,
    HdeStreamBroken,
    PageBatch,
    PageKind,
)
from novacron.dwcp.encoding.wire import HEADER_SIZE
from novacron.errors import UserError
from test_hde_support import KEY, CollidingHasher, batch, text_pages

LIM = HdeLimits(session_cache_bytes=8 << 20, zstd_window_log=20)  # small stream windows: fast tests


def stream(n_batches: int = 3) -> list[PageBatch]:
    rng = np.random.default_rng(11)
    out = []
    for s in range(n_batches):
        pages = text_pages(rng, 32)
        pages[::4] = 0
        pages[1, :50] = s  # small change between batches (delta)
        out.append(batch("pc.ram", range(32), pages, meta=b"hdr%d" % s))
    return out


def test_bad_input_is_a_user_error() -> None:
    enc = HdeEncoder(DefaultPageHasher(KEY), LIM)
    good = np.arange(2, dtype=np.uint64) * 4096
    cases = [
        PageBatch("pc.ram", np.array([1], dtype=np.uint64), bytes(PAGE_SIZE)),  # unaligned
        PageBatch("pc.ram", good, bytes(PAGE_SIZE)),  # short data
        PageBatch("pc.ram", np.array([0, 0], dtype=np.uint64), bytes(2 * PAGE_SIZE)),  # duplicate
        PageBatch("pc.ram", good.astype(np.int64), bytes(2 * PAGE_SIZE)),
        PageBatch("", good, bytes(2 * PAGE_SIZE)),
        PageBatch("x" * 300, good, bytes(2 * PAGE_SIZE)),
        PageBatch("pc.ram", np.arange(1025, dtype=np.uint64) * 4096, bytes(1025 * PAGE_SIZE)),
    ]
    for bad in cases:
        with pytest.raises(HdeInputError) as info:
            enc.encode(bad)
        assert isinstance(info.value, UserError)
    assert enc.next_seq == 0  # nothing was consumed
    with pytest.raises(HdeInputError):
        enc.encode_chunk(bytes(LIM.max_chunk_input + 1))
    with pytest.raises(HdeConfigError):
        HdeLimits(session_cache_bytes=PAGE_SIZE)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10**9), st.integers(1, 255), st.integers(0, 2))
def test_corruption_never_yields_wrong_bytes(where: int, xor: int, which: int) -> None:
    enc = HdeEncoder(DefaultPageHasher(KEY), LIM)
    dec = HdeDecoder(LIM)
    batches = stream()
    wires = [enc.encode(b) for b in batches]
    for w in wires[:which]:
        dec.decode(w)
    bad = bytearray(wires[which])
    bad[where % len(bad)] ^= xor
    try:
        out = dec.decode(bytes(bad))
    except HdeDecodeError:
        # Either refused without a state change (the intact batch and the later ones decode), or the
        # corrupt part had entered a zstd stream: then every later batch is refused too.
        rest = list(zip(wires[which:], batches[which:], strict=True))
        try:
            assert dec.decode(rest[0][0]) == rest[0][1]
        except HdeStreamBroken:
            for w, _ in rest:
                with pytest.raises(HdeStreamBroken):
                    dec.decode(w)
        else:
            for w, b in rest[1:]:
                assert dec.decode(w) == b
    else:
        assert out == batches[which]  # the flip hit a field that does not change the result


def test_truncation_reorder_and_replay_are_refused() -> None:
    enc, dec = HdeEncoder(DefaultPageHasher(KEY), LIM), HdeDecoder(LIM)
    w0, w1 = (enc.encode(b) for b in stream(2))
    for cut in (0, 10, HEADER_SIZE, len(w0) - 1):
        with pytest.raises(HdeDecodeError):
            dec.decode(w0[:cut])
    with pytest.raises(HdeDecodeError, match="out of sequence"):
        dec.decode(w1)
    dec.decode(w0)
    with pytest.raises(HdeDecodeError, match="out of sequence"):
        dec.decode(w0)
    dec.decode(w1)


def test_decompression_bomb_is_refused_before_inflating() -> None:
    enc, dec = HdeEncoder(DefaultPageHasher(KEY), LIM), HdeDecoder(LIM)
    wire = enc.encode(batch("pc.ram", range(4), text_pages(np.random.default_rng(1), 4)))
    fields = list(struct.unpack_from("<3sBBBQIIIBbHI16s", wire))
    name_meta = wire[HEADER_SIZE : HEADER_SIZE + fields[10] + fields[11]]
    bomb = zstandard.ZstdCompressor(level=1).compress(bytes(1 << 30))  # 1 GiB of zeros, ~32 KiB
    fields[6] = 4 * PAGE_SIZE + 100  # claims a small body
    fields[7] = len(bomb)
    fields[8] = 2
    header = struct.pack("<3sBBBQIIIBbHI16s", *fields)
    with pytest.raises(HdeDecodeError, match="declares the wrong size"):
        dec.decode(header + name_meta + bomb)
    fields[6] = 1 << 30  # claims the true size: over the limit
    header = struct.pack("<3sBBBQIIIBbHI16s", *fields)
    with pytest.raises(HdeDecodeError, match="larger than the limit"):
        dec.decode(header + name_meta + bomb)


def test_colliding_fingerprints_still_roundtrip() -> None:
    """Every page has the same fingerprint: references must be confirmed by bytes, not by hash."""
    hasher = CollidingHasher(tags_collide=False)
    enc, dec = HdeEncoder(hasher, LIM), HdeDecoder(LIM)
    rng = np.random.default_rng(2)
    for s in range(4):
        pages = text_pages(rng, 64)
        pages[10] = pages[3]  # a true duplicate among false ones
        b = batch("pc.ram", range(s * 64, s * 64 + 64), pages)
        assert dec.decode(enc.encode(b)) == b
    # Colliding fingerprints cost deduplication (only the first candidate is compared), never correctness.
    assert enc.stats.pages_by_kind[PageKind.BATCH_DUP] <= 4


def _store_with(tmp_path: Path, hasher: object, pages: np.ndarray) -> BaselineStore:
    store = BaselineStore(tmp_path / "store", hasher)  # type: ignore[arg-type]
    store.add_batch("sibling", batch("pc.ram", range(pages.shape[0]), pages))
    return store


def test_colliding_tags_are_caught_by_the_batch_checksum(tmp_path: Path) -> None:
    """Even if a tag collided (impossible for keyed BLAKE3 without the key), the checksum refuses."""
    hasher = CollidingHasher(tags_collide=True)
    rng = np.random.default_rng(3)
    store = _store_with(tmp_path, hasher, text_pages(rng, 4))
    enc = HdeEncoder(hasher, LIM, baseline=BaselineView(store.summary(None)))
    dec = HdeDecoder(LIM, baseline=store.session(None))
    victim_pages = text_pages(rng, 4)  # different content, same fingerprint and tag
    b = batch("pc.ram", range(4), victim_pages)
    wire = enc.encode(b)
    assert enc.stats.pages_by_kind[PageKind.BASE_CONTENT] == 4
    with pytest.raises(HdeDecodeError, match="checksum"):
        dec.decode(wire)


def test_fingerprint_collision_with_baseline_is_a_missing_reference_then_repaired(tmp_path: Path) -> None:
    hasher = CollidingHasher(tags_collide=False)
    rng = np.random.default_rng(4)
    store = _store_with(tmp_path, hasher, text_pages(rng, 4))
    enc = HdeEncoder(hasher, LIM, baseline=BaselineView(store.summary(None)))
    dec = HdeDecoder(LIM, baseline=store.session(None))
    b0 = batch("pc.ram", range(4), text_pages(rng, 4))  # fingerprint hits, tag differs
    b1 = batch("pc.ram", range(4), text_pages(rng, 4))
    w0 = enc.encode(b0)
    assert enc.last_used_baseline
    enc.forget_baseline()  # what the sender does once told of a missing reference
    w1 = enc.encode(b1)
    with pytest.raises(HdeReferenceMissing):
        dec.decode(w0)
    with pytest.raises(HdeDecodeError, match="out of sequence"):
        dec.decode(w1)  # later batches wait for the repair
    assert dec.decode(enc.encode_repair(b0, seq=0)) == b0
    assert dec.decode(w1) == b1


def test_summary_parsing_is_bounded() -> None:
    s = BaselineSummary(content_fps=np.array([1, 5, 9], dtype=np.uint64))
    raw = s.to_bytes()
    assert np.array_equal(BaselineSummary.from_bytes(raw).content_fps, s.content_fps)
    for bad in (raw[:-1], raw + b"x", b"XYZ" + raw[3:], raw[:5]):
        with pytest.raises(HdeDecodeError):
            BaselineSummary.from_bytes(bad)
    unsorted = BaselineSummary(content_fps=np.array([5, 1], dtype=np.uint64)).to_bytes()
    with pytest.raises(HdeDecodeError):
        BaselineSummary.from_bytes(unsorted)


def test_stream_segment_bound_catches_bombs_before_inflating() -> None:
    from novacron.dwcp.encoding.codecs import stream_segment_bound

    header = (0xFD2FB528).to_bytes(4, "little") + bytes([0x00, 0x58])  # no size, window 2 MiB
    rle = ((100_000 << 3) | (1 << 1)).to_bytes(3, "little") + b"\x00"  # 100 kB from one byte
    bomb = header + rle * 1000
    assert stream_segment_bound(bomb, first=True, max_window=8 << 20) == 100_000_000
    last = (1 | (0 << 1) | (0 << 3)).to_bytes(3, "little")
    with pytest.raises(HdeDecodeError, match="ends its frame"):
        stream_segment_bound(header + last, first=True, max_window=8 << 20)
    with pytest.raises(HdeDecodeError, match="window larger"):
        stream_segment_bound(header, first=True, max_window=1 << 20)
    with pytest.raises(HdeDecodeError, match="inside a block"):
        stream_segment_bound(rle[:3], first=False, max_window=8 << 20)


def test_reused_zstd_contexts_start_every_session_afresh() -> None:
    """Arena-held zstd contexts carry no history into the next session, even after a corrupt one."""
    from novacron.dwcp.encoding import CacheArena, CostModelConfig
    from novacron.dwcp.encoding.codecs import NONE, zstd_stream

    cost = CostModelConfig(codecs=(NONE, zstd_stream(1)), bandwidth=1e6)  # always the stream
    arenas = [CacheArena(LIM.session_pages, prefault=False) for _ in range(2)]
    batches = stream(4)

    def session(corrupt_at: int | None) -> list[bytes]:
        enc = HdeEncoder(DefaultPageHasher(KEY), LIM, cost=cost, arena=arenas[0])
        dec = HdeDecoder(LIM, arena=arenas[1])
        wires = [enc.encode(b) for b in batches]
        for i, (w, b) in enumerate(zip(wires, batches, strict=True)):
            if i == corrupt_at:
                bad = bytearray(w)
                bad[-3] ^= 0x55
                with pytest.raises(HdeDecodeError):
                    dec.decode(bytes(bad))
                break
            assert dec.decode(w) == b
        enc.close()
        dec.close()
        return wires

    fresh_enc = HdeEncoder(DefaultPageHasher(KEY), LIM, cost=cost)
    fresh = [fresh_enc.encode(b) for b in batches]
    assert session(None) == fresh
    assert session(corrupt_at=2)[0] == fresh[0]  # the decoder's stream breaks mid-session
    assert session(None) == fresh  # and the next session on the same contexts is whole again


def test_batches_without_references_decode_on_the_fast_path() -> None:
    rng = np.random.default_rng(21)
    pages = text_pages(rng, 24)
    pages[[0, 5, 6, 23]] = 0  # zero pages between literal ones
    enc, dec = HdeEncoder(DefaultPageHasher(KEY), LIM), HdeDecoder(LIM)
    b = batch("pc.ram", np.arange(24) * 3, pages, meta=b"m")
    out = dec.decode(enc.encode(b))
    assert out == b
    assert enc.stats.pages_by_kind[PageKind.ZERO] == 4
    assert enc.stats.pages_by_kind[PageKind.LITERAL] == 20
    # The session cache took the batch in: the same pages again are all "unchanged" or zero.
    again = enc.encode(b)
    assert dec.decode(again) == b
    assert enc.stats.pages_by_kind[PageKind.UNCHANGED] == 20
