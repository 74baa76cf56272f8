"""The pure pieces of HDE: sparse deltas, the mirrored session cache, the cost model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from novacron.dwcp.encoding import (
    PAGE_SIZE,
    CodecChoice,
    CodecSelector,
    CostModelConfig,
    HdeDecodeError,
    sparse,
)
from novacron.dwcp.encoding.codecs import LZ4, NONE, zstd
from novacron.dwcp.encoding.session_cache import ABSENT, ZERO, SessionPageCache


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**32 - 1), st.integers(0, 600), st.integers(0, 8))
def test_sparse_delta_roundtrip(k: int, seed: int, changes: int, gap: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (k, PAGE_SIZE), dtype=np.uint8)
    new = base.copy()
    pos = rng.integers(0, k * PAGE_SIZE, changes)
    new.reshape(-1)[pos] ^= rng.integers(1, 256, changes, dtype=np.uint8)
    analysis = sparse.analyse(new, base, gap)
    rows = np.arange(k, dtype=np.int64)
    counts, runs, data = sparse.encode(new, analysis, rows)
    out = base.copy()
    sparse.decode_into(
        out,
        rows,
        np.frombuffer(counts, "<u2"),
        np.frombuffer(runs, "<u2").reshape(-1, 2),
        np.frombuffer(data, np.uint8),
    )
    assert np.array_equal(out, new)
    assert analysis.cost.sum() == len(counts) + len(runs) + len(data)


def test_sparse_decode_rejects_runs_beyond_the_page() -> None:
    out = np.zeros((1, PAGE_SIZE), np.uint8)
    runs = np.array([[4000, 200]], dtype=np.uint16)
    with pytest.raises(HdeDecodeError):
        sparse.decode_into(out, np.array([0]), np.array([1], np.uint16), runs, np.zeros(200, np.uint8))


def test_mirrored_caches_evict_identically_and_keep_the_current_batch() -> None:
    caches = [SessionPageCache(64), SessionPageCache(64)]
    rng = np.random.default_rng(1)
    for seq in range(40):
        index = np.sort(rng.choice(500, 16, replace=False)).astype(np.uint64)
        pages = rng.integers(0, 256, (16, PAGE_SIZE), dtype=np.uint8)
        zero = rng.random(16) < 0.2
        pages[zero] = 0
        slots = [c.apply(c.block_id("pc.ram"), index, pages, zero, seq) for c in caches]
        assert np.array_equal(slots[0], slots[1])
        # Everything just written is present and correct.
        got = caches[0].lookup(0, index)
        assert np.all(got[zero] == ZERO)
        assert np.array_equal(caches[0].slab[got[~zero]], pages[~zero])
    assert caches[0].used <= 64
    all_idx = np.arange(500, dtype=np.uint64)
    assert np.array_equal(caches[0].lookup(0, all_idx), caches[1].lookup(0, all_idx))
    assert np.count_nonzero(caches[0].lookup(0, all_idx) == ABSENT) > 0  # something was evicted


def test_cost_model_trades_cpu_for_bandwidth() -> None:
    choices: list[CodecChoice] = []
    config = CostModelConfig(codecs=(NONE, LZ4, zstd(1), zstd(3), zstd(6)), explore_every=1000)
    sel = CodecSelector(config, on_choice=choices.append)
    raw = 512 * 1024
    sel.set_bandwidth(10e9)  # loopback: anything but 'none' only costs time
    assert sel.choose(raw, probe_ratio=2.0)[0] == NONE
    sel.set_bandwidth(125e6)  # 1 Gbit/s: a fast codec
    assert sel.choose(raw, probe_ratio=2.0)[0] in (LZ4, zstd(1))
    sel.set_bandwidth(12.5e6)  # 100 Mbit/s: the link is the bottleneck, compress harder
    assert sel.choose(raw, probe_ratio=2.0)[0] in (zstd(3), zstd(6))
    assert sel.choose(raw, probe_ratio=1.0)[0] in (zstd(3), zstd(6), zstd(1))
    # Outcomes move the estimates: a codec that turns out slow stops being chosen on a fast link.
    sel.set_bandwidth(125e6)
    for seq in range(30):
        sel.record(
            seq=seq,
            codec=LZ4,
            raw_len=raw,
            wire_len=raw // 2,
            seconds=raw / 20e6,
            probe_ratio=2.0,
            predicted=(0.0, 0.0),
            explored=False,
        )
    assert sel.choose(raw, probe_ratio=2.0)[0] != LZ4
    assert len(choices) == 30 and choices[0].codec == LZ4
    assert sel.totals[LZ4].batches == 30


def test_cost_model_explores_now_and_then() -> None:
    sel = CodecSelector(CostModelConfig(explore_every=4))
    picks = [sel.choose(512 * 1024, 2.0) for _ in range(8)]
    assert sum(1 for p in picks if p[3]) == 2


def test_cache_arena_is_reused_by_one_session_at_a_time() -> None:
    from novacron.dwcp.encoding import CacheArena, DefaultPageHasher, HdeConfigError, HdeEncoder, HdeLimits

    limits = HdeLimits(max_pages_per_batch=16, session_cache_bytes=64 * PAGE_SIZE)
    arena = CacheArena(limits.session_pages, prefault=False)
    first = HdeEncoder(DefaultPageHasher(bytes(32)), limits, arena=arena)
    with pytest.raises(HdeConfigError):
        HdeEncoder(DefaultPageHasher(bytes(32)), limits, arena=arena)  # still in use
    first.close()
    second = HdeEncoder(DefaultPageHasher(bytes(32)), limits, arena=arena)  # stale contents never read
    assert second.next_seq == 0
    second.close()
    with pytest.raises(HdeConfigError):
        HdeEncoder(DefaultPageHasher(bytes(32)), HdeLimits(max_pages_per_batch=16), arena=arena)


def test_arena_pool_lends_each_arena_once_and_keeps_at_most_keep() -> None:
    from novacron.dwcp.encoding import ArenaPool, DefaultPageHasher, HdeEncoder, HdeLimits

    limits = HdeLimits(max_pages_per_batch=16, session_cache_bytes=64 * PAGE_SIZE)
    pool = ArenaPool(limits.session_pages, keep=2)
    assert pool.warm_one() and pool.sizes == (1, 0)
    a = pool.lend()
    b = pool.lend()  # a second one, made lazily: below keep
    assert a is not None and b is not None and a is not b
    assert pool.lend() is None and pool.sizes == (2, 2)  # all lent: the session allocates its own
    assert not pool.warm_one()  # full

    enc = HdeEncoder(DefaultPageHasher(bytes(32)), limits, arena=a)
    pool.give_back(a)
    assert pool.lend() is None  # given back while its cache is still open: not lent again
    enc.close()
    assert pool.lend() is a
    pool.give_back(a)
    pool.give_back(b)
    assert pool.sizes == (2, 0)


def test_arena_pool_refuses_bad_sizes() -> None:
    from novacron.dwcp.encoding import ArenaPool, HdeConfigError

    with pytest.raises(HdeConfigError):
        ArenaPool(0, keep=1)
    with pytest.raises(HdeConfigError):
        ArenaPool(16, keep=-1)
