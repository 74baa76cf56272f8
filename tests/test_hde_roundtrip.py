"""decode(encode(x)) == x for page streams and opaque data, and the page kinds HDE should pick."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from novacron.dwcp.encoding import (
    PAGE_SIZE,
    DefaultPageHasher,
    HdeDecoder,
    HdeEncoder,
    HdeLimits,
    OpaqueChunk,
    PageKind,
)
from test_hde_support import KEY, batch, text_pages

# A small session cache (64 pages) so the streams below also exercise eviction.
SMALL = HdeLimits(max_pages_per_batch=16, session_cache_bytes=64 * PAGE_SIZE, chunk_cache_bytes=256 * 1024)


def pair(limits: HdeLimits = SMALL) -> tuple[HdeEncoder, HdeDecoder]:
    return HdeEncoder(DefaultPageHasher(KEY), limits), HdeDecoder(limits)


# One step of a page stream: which addresses, and how each page is made.
page_op = st.tuples(
    st.integers(0, 200),  # page index
    st.sampled_from(["zero", "random", "text", "copy", "tweak", "same"]),
    st.integers(0, 2**32 - 1),  # seed
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(page_op, min_size=0, max_size=16), min_size=1, max_size=12), st.booleans())
def test_page_streams_roundtrip(batches: list[list[tuple[int, str, int]]], two_blocks: bool) -> None:
    enc, dec = pair()
    memory: dict[tuple[str, int], bytes] = {}
    for n, ops in enumerate(batches):
        block = "pc.ram" if not two_blocks or n % 2 == 0 else "vga.vram"
        seen: dict[int, np.ndarray] = {}
        for idx, how, seed in ops:
            rng = np.random.default_rng(seed)
            prev = memory.get((block, idx), bytes(PAGE_SIZE))
            if how == "zero":
                page = np.zeros(PAGE_SIZE, np.uint8)
            elif how == "random":
                page = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
            elif how == "text":
                page = text_pages(rng, 1)[0]
            elif how == "copy" and memory:
                keys = sorted(memory)
                page = np.frombuffer(memory[keys[seed % len(keys)]], np.uint8).copy()
            elif how == "tweak":
                page = np.frombuffer(prev, np.uint8).copy()
                pos = rng.integers(0, PAGE_SIZE, size=int(rng.integers(1, 40)))
                page[pos] = rng.integers(0, 256, size=pos.shape[0], dtype=np.uint8)
            else:
                page = np.frombuffer(prev, np.uint8).copy()
            seen[idx] = page
        index = sorted(seen)
        pages = np.array([seen[i] for i in index], dtype=np.uint8).reshape(len(index), PAGE_SIZE)
        b = batch(block, index, pages, meta=os.urandom(n % 5))
        wire = enc.encode(b)
        assert dec.decode(wire) == b
        for i, p in zip(index, pages, strict=True):
            memory[(block, i)] = p.tobytes()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 300_000), st.integers(0, 5), st.binary(max_size=64)), min_size=1, max_size=6
    )
)
def test_opaque_chunks_roundtrip(edits: list[tuple[int, int, bytes]]) -> None:
    enc, dec = pair()
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    for pos, cut, insert in edits:
        data = data[:pos] + insert + data[pos + cut :]  # shift content like changing device state
        meta = insert[:8]
        out = dec.decode(enc.encode_chunk(data, meta))
        assert out == OpaqueChunk(data, meta)


def test_repeated_opaque_data_is_sent_as_references() -> None:
    enc, dec = pair(HdeLimits())
    data = np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    first = enc.encode_chunk(data)
    shifted = b"\x00header" + data  # the same bytes at a shifted offset
    second = enc.encode_chunk(shifted)
    assert dec.decode(first) == OpaqueChunk(data)
    assert dec.decode(second) == OpaqueChunk(shifted)
    assert len(second) < len(first) // 10
    assert enc.stats.chunks_ref > 0


def test_kinds_follow_the_cheapest_representation() -> None:
    enc, dec = pair(HdeLimits())
    rng = np.random.default_rng(3)
    pages = text_pages(rng, 8)
    pages[2] = 0
    pages[5] = pages[4]  # duplicate inside the batch
    b1 = batch("pc.ram", range(8), pages)
    assert dec.decode(enc.encode(b1)) == b1
    assert enc.stats.pages_by_kind[PageKind.ZERO] == 1
    assert enc.stats.pages_by_kind[PageKind.BATCH_DUP] == 1
    assert enc.stats.pages_by_kind[PageKind.LITERAL] == 6

    pages2 = pages.copy()
    pages2[0, 100:110] = 1  # small change: sparse delta
    pages2[1] = pages[3]  # content sent before at another address: session reference
    b2 = batch("pc.ram", range(8), pages2)
    wire = enc.encode(b2)
    assert dec.decode(wire) == b2
    kinds = enc.stats.pages_by_kind
    assert kinds[PageKind.DELTA] == 1
    assert kinds[PageKind.SESSION_REF] == 1
    assert kinds[PageKind.UNCHANGED] == 5  # pages 3..7 (2 is zero again)
    assert len(wire) < 300


def test_delta_beats_literal_for_sparse_changes() -> None:
    enc, dec = pair(HdeLimits())
    rng = np.random.default_rng(5)
    pages = rng.integers(0, 256, (128, PAGE_SIZE), dtype=np.uint8)  # incompressible
    first = enc.encode(batch("pc.ram", range(128), pages))
    dec.decode(first)
    pages[:, rng.integers(0, PAGE_SIZE, 16)] ^= 0xFF  # 16 changed bytes per page
    b = batch("pc.ram", range(128), pages)
    second = enc.encode(b)
    assert dec.decode(second) == b
    assert len(second) * 20 < len(first)
