"""The sibling indexer: which pages it stores (pure tracker) and scans of a real memfd (this process's
own, named like QEMU's) into a real baseline store; no QEMU here (test_tunnel_qemu.py has the guests)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from novacron.dwcp.encoding import BaselineLimits, BaselineStore, DefaultPageHasher
from novacron.dwcp.encoding.limits import PAGE_SIZE
from novacron.migration.tunnel.siblings import (
    SiblingConfigError,
    SiblingIndexer,
    SiblingLimits,
    SiblingReadError,
    SiblingTracker,
    SiblingVM,
    find_guest_ram,
)

KEY = bytes(range(32))


def test_first_scan_stores_nonzero_pages_then_only_stable_changes() -> None:
    t = SiblingTracker(8)
    fps = np.arange(1, 9, dtype=np.uint64)
    nonzero = np.array([True] * 6 + [False] * 2)
    rows = t.choose(0, fps, nonzero, budget=100)
    assert rows.tolist() == [True] * 6 + [False] * 2
    t.stored(0, fps, rows)
    t.scan_done()
    # Scan 2: pages 0 and 1 changed; nothing stored yet (they must stay the same for an interval).
    fps2 = fps.copy()
    fps2[:2] = [100, 101]
    assert not t.choose(0, fps2, nonzero, budget=100).any()
    t.scan_done()
    # Scan 3: page 0 stayed at 100 (stored now), page 1 changed again (churn: never stored).
    fps3 = fps2.copy()
    fps3[1] = 102
    rows = t.choose(0, fps3, nonzero, budget=100)
    assert rows.tolist() == [True] + [False] * 7
    t.stored(0, fps3, rows)
    t.scan_done()
    assert not t.choose(0, fps3, nonzero, budget=100)[0]  # stored once, not again


def test_budget_bounds_pages_per_scan_and_chunks_stay_inside() -> None:
    t = SiblingTracker(16)
    rows = t.choose(4, np.arange(1, 9, dtype=np.uint64), np.ones(8, bool), budget=3)
    assert rows.sum() == 3 and rows[:3].all()
    with pytest.raises(SiblingConfigError):
        t.choose(12, np.arange(1, 9, dtype=np.uint64), np.ones(8, bool), budget=3)
    with pytest.raises(SiblingConfigError):
        SiblingLimits(read_bytes=1000)
    with pytest.raises(SiblingConfigError):
        SiblingLimits(cpu_fraction=0)


@pytest.fixture
def ram() -> Iterator[int]:
    """A memfd named as QEMU names its RAM backend, in this process (pid = ours)."""
    fd = os.memfd_create("memory-backend-memfd")
    try:
        yield fd
    finally:
        os.close(fd)


def fill(fd: int, pages: np.ndarray) -> None:
    os.ftruncate(fd, pages.nbytes + 64 * PAGE_SIZE)  # a tail of holes: never touched, reads as zeros
    os.pwrite(fd, pages.tobytes(), 0)


async def test_scan_indexes_a_memfd_into_the_store_and_the_summary(tmp_path: Path, ram: int) -> None:
    rng = np.random.default_rng(1)
    pages = rng.integers(0, 256, size=(300, PAGE_SIZE), dtype=np.uint8)
    pages[10:20] = 0
    pages[50] = pages[51]  # stored once
    fill(ram, pages)
    assert find_guest_ram(os.getpid()) is not None
    hasher = DefaultPageHasher(KEY)
    with BaselineStore(tmp_path / "b", hasher) as store:
        vm = SiblingVM("sib", os.getpid(), "test")

        async def candidates() -> list[SiblingVM]:
            return [vm]

        ix = SiblingIndexer(
            store, candidates, limits=SiblingLimits(read_bytes=64 * PAGE_SIZE, cpu_fraction=1)
        )
        await ix.run_once()
        st = ix.stats()["sib"]
        assert st.scans == 1 and st.pages_read == 364 and st.records_written == 289
        summary = store.summary("someone-else")
        assert np.isin(hasher.fingerprints(pages[:10]), summary.content_fps).all()
        # What a destination decoder would resolve: the sibling's pages by fingerprint and tag.
        got = store.session(None).content(hasher.fingerprints(pages[:5]), hasher.tags(pages[:5]), seq=0)
        assert (got == pages[:5]).all()

        # The guest rewrites 30 pages; they are stored only once they stayed so for a whole interval.
        pages[100:130] = rng.integers(0, 256, size=(30, PAGE_SIZE), dtype=np.uint8)
        fill(ram, pages)
        before = store.records
        await ix.scan(vm)
        assert store.records == before
        await ix.scan(vm)
        assert store.records == before + 30


async def test_a_busy_host_pauses_the_scan(tmp_path: Path, ram: int) -> None:
    fill(ram, np.full((64, PAGE_SIZE), 7, dtype=np.uint8))
    polls = 0
    polled_thrice = asyncio.Event()
    migrating = True

    def busy() -> bool:
        nonlocal polls
        polls += 1
        if polls >= 3:
            polled_thrice.set()
        return migrating

    with BaselineStore(tmp_path / "b", DefaultPageHasher(KEY)) as store:

        async def candidates() -> list[SiblingVM]:
            return [SiblingVM("sib", os.getpid())]

        limits = SiblingLimits(read_bytes=PAGE_SIZE * 16, idle_poll_s=0.01)
        ix = SiblingIndexer(store, candidates, busy=busy, limits=limits)
        task = asyncio.create_task(ix.run_once())
        await asyncio.wait_for(polled_thrice.wait(), 10)
        assert store.records == 0 and not task.done()  # asked three times, read nothing meanwhile
        migrating = False
        await ix.wait_rounds(1, 10)
        assert store.records == 1
        await task


async def test_a_process_without_shared_ram_is_refused(tmp_path: Path) -> None:
    with BaselineStore(tmp_path / "b", DefaultPageHasher(KEY)) as store:

        async def none() -> list[SiblingVM]:
            return []

        ix = SiblingIndexer(store, none)
        if find_guest_ram(os.getpid()) is None:
            with pytest.raises(SiblingReadError, match="no shared RAM memfd"):
                await ix.scan(SiblingVM("x", os.getpid()))
        await ix.run_once()
        assert ix.rounds == 1 and ix.stats() == {}


def test_the_summary_lists_at_most_the_newest_content(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pages = rng.integers(0, 256, size=(100, PAGE_SIZE), dtype=np.uint8)
    hasher = DefaultPageHasher(KEY)
    with BaselineStore(tmp_path / "b", hasher, BaselineLimits(max_summary_fps=30)) as store:
        store.add_content(pages[:70])
        store.add_content(pages[70:])
        fps = store.summary(None).content_fps
        assert fps.shape[0] == 30
        assert set(fps.tolist()) == set(hasher.fingerprints(pages[70:]).tolist())
