"""The mirrored session page cache: the version of each page last sent in this session.

Encoder and decoder each hold one, built with equal capacity and updated with the same pages in the same
order, so their contents are identical after every batch; that is what lets a batch say "unchanged",
"delta against your copy" or "same as slot 17" without the decoder ever lacking the base. The update
depends only on (addresses, page contents) of a batch, never on how the batch was encoded, so a batch
re-encoded without references (repair) leaves the same state behind.

Eviction is "least recently sent": every page written gets a stamp (sequence * 65536 + position), which
is unique, so "the k smallest stamps" is one well-defined set whatever sorting algorithm finds it.
When slots run out the cache evicts in bulk (an eighth of its capacity at least) to keep the cost per
batch low. Address maps are numpy arrays per RAM block (4 bytes per page); there is no per-page Python
object.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from novacron.dwcp.encoding.codecs import ZstdContexts
from novacron.dwcp.encoding.errors import HdeConfigError
from novacron.dwcp.encoding.limits import PAGE_SIZE

ABSENT = -1  # the decoder may not hold this address: no delta base
ZERO = -2  # the last version sent was the zero page

I32Array = npt.NDArray[np.int32]
I64Array = npt.NDArray[np.int64]


class CacheArena:
    """Memory for one session page cache, touched once and reused by one session after another.

    Writing a page of fresh anonymous memory for the first time costs a page fault; on this project's
    VMs that limits first writes to ~400 MB/s, which would make every migration's first pass pay for
    faulting in its cache. An agent keeps an arena per concurrent migration instead and pays once.
    """

    def __init__(self, capacity_pages: int, *, prefault: bool = True) -> None:
        self.slab = np.zeros((capacity_pages, PAGE_SIZE), dtype=np.uint8)
        if prefault:
            self.slab.fill(0)  # touch every page now rather than during a migration
        self.in_use = False
        # The session's zstd contexts too: their windows are as costly to fault in as the slab.
        self.zstd = ZstdContexts()

    @property
    def capacity(self) -> int:
        return int(self.slab.shape[0])


class ArenaPool:
    """The cache arenas an agent keeps between migrations: at most ``keep``, each lent to one session.

    Measured on a 100 Mbit/s tunnelled migration: without kept arenas, faulting in each session's
    fresh cache (kernel page clearing in the encoder and decoder threads) took ~7 % of the host's CPU
    and half the encoder thread's time on a back-migration. :meth:`warm_one` prefaults an arena off
    the event loop (the agent calls it at start); :meth:`lend` hands out a free one (or a new, lazily
    faulted one while fewer than ``keep`` exist), None when all are lent: the session then allocates
    its own cache as before. Thread-safe: warming runs in a worker thread.
    """

    def __init__(self, capacity_pages: int, keep: int) -> None:
        if capacity_pages < 1 or keep < 0:
            raise HdeConfigError("bad arena pool size", capacity_pages=capacity_pages, keep=keep)
        self.capacity_pages = capacity_pages
        self.keep = keep
        self._arenas: list[CacheArena] = []
        self._lent: set[int] = set()  # id() of arenas lent out
        self._pending = 0  # arenas being prefaulted (counted against ``keep``)
        self._lock = threading.Lock()

    def warm_one(self) -> bool:
        """Create one prefaulted arena if the pool is below ``keep`` (slow: call it off the loop)."""
        with self._lock:
            if len(self._arenas) + self._pending >= self.keep:
                return False
            self._pending += 1
        try:
            arena = CacheArena(self.capacity_pages, prefault=True)
        finally:
            with self._lock:
                self._pending -= 1
        with self._lock:
            self._arenas.append(arena)
        return True

    def lend(self) -> CacheArena | None:
        with self._lock:
            for arena in self._arenas:
                if id(arena) not in self._lent and not arena.in_use:
                    self._lent.add(id(arena))
                    return arena
            if len(self._arenas) + self._pending < self.keep:
                arena = CacheArena(self.capacity_pages, prefault=False)
                self._arenas.append(arena)
                self._lent.add(id(arena))
                return arena
        return None

    def give_back(self, arena: CacheArena | None) -> None:
        """The borrower is done (its cache closed; an arena still in use stays unavailable)."""
        if arena is not None:
            with self._lock:
                self._lent.discard(id(arena))

    @property
    def sizes(self) -> tuple[int, int]:
        """(arenas held, arenas lent)."""
        with self._lock:
            return len(self._arenas), len(self._lent)


class SessionPageCache:
    def __init__(self, capacity_pages: int, arena: CacheArena | None = None) -> None:
        self.capacity = capacity_pages
        if arena is not None:
            if arena.capacity != capacity_pages or arena.in_use:
                raise HdeConfigError(
                    "arena busy or of the wrong size", arena=arena.capacity, wanted=capacity_pages
                )
            arena.in_use = True
            self.slab = arena.slab
        else:
            # np.zeros maps untouched pages lazily, so an idle cache costs no RAM.
            self.slab = np.zeros((capacity_pages, PAGE_SIZE), dtype=np.uint8)
        self._arena = arena
        self.slab64 = self.slab.view(np.uint64)
        self._stamp = np.full(capacity_pages, -1, dtype=np.int64)
        self._owner_block = np.full(capacity_pages, -1, dtype=np.int32)
        self._owner_index = np.zeros(capacity_pages, dtype=np.int64)
        self._free = np.zeros(capacity_pages, dtype=bool)  # freed below the high-water mark
        self._free_count = 0
        self._high_water = 0
        self._maps: list[I32Array] = []
        self._block_ids: dict[str, int] = {}

    def close(self) -> None:
        """Give the arena back (its contents are stale from now on; nothing reads them unowned)."""
        if self._arena is not None:
            self._arena.in_use = False
            self._arena = None

    # -- lookups ---------------------------------------------------------------------------------------
    def block_id(self, name: str) -> int:
        """A stable small id per block name, assigned in order of first use (same on both sides)."""
        bid = self._block_ids.get(name)
        if bid is None:
            bid = len(self._maps)
            self._block_ids[name] = bid
            self._maps.append(np.full(0, ABSENT, dtype=np.int32))
        return bid

    def find_block(self, name: str) -> int | None:
        """The id of a block already seen, without creating one (the decoder must not mutate early)."""
        return self._block_ids.get(name)

    def lookup(self, block: int, index: npt.NDArray[np.uint64]) -> I32Array:
        amap = self._maps[block]
        out = np.full(index.shape[0], ABSENT, dtype=np.int32)
        inside = index < np.uint64(amap.shape[0])
        out[inside] = amap[index[inside].astype(np.int64)]
        return out

    def occupied(self, slots: I32Array) -> npt.NDArray[np.bool_]:
        """Which of ``slots`` currently hold a page (the decoder validates references with this)."""
        ok = (slots >= 0) & (slots < self.capacity)
        res = np.zeros(slots.shape[0], dtype=bool)
        res[ok] = self._owner_block[slots[ok]] >= 0
        return res

    @property
    def used(self) -> int:
        return self._high_water - self._free_count

    def snapshot(self, max_pages: int) -> Iterator[tuple[str, npt.NDArray[np.uint64], npt.NDArray[np.uint8]]]:
        """Every cached page: (block name, page indices ascending, page copies), ``max_pages`` at a time.

        What the session sent (or received) last at each address it still holds: after a migration,
        "this VM's memory as it left (arrived at) this host" for the baseline store. Addresses whose
        last version was the zero page, or that were evicted, are not listed.
        """
        names = {bid: name for name, bid in self._block_ids.items()}
        for bid, amap in enumerate(self._maps):
            index = np.flatnonzero(amap >= 0)
            for start in range(0, index.shape[0], max_pages):
                sel = index[start : start + max_pages]
                yield names[bid], sel.astype(np.uint64), self.slab[amap[sel]]

    # -- the one mutation ------------------------------------------------------------------------------
    def apply(
        self,
        block: int,
        index: npt.NDArray[np.uint64],
        pages: npt.NDArray[np.uint8],
        zero: npt.NDArray[np.bool_],
        seq: int,
    ) -> I32Array:
        """Record that ``pages`` (distinct addresses) were sent in batch ``seq``; return their slots."""
        n = index.shape[0]
        idx = index.astype(np.int64)
        amap = self._grow(block, int(idx.max()) + 1 if n else 0)
        slots = amap[idx].copy()
        stamps = np.int64(seq) * 65536 + np.arange(n, dtype=np.int64)

        any_zero = bool(zero.any())
        if any_zero:
            # Zero pages give their slot back; the address remembers "zero".
            zero_with_slot = zero & (slots >= 0)
            if zero_with_slot.any():
                self._release(slots[zero_with_slot])
            amap[idx[zero]] = ZERO
            slots[zero] = ZERO
            keep = ~zero & (slots >= 0)
            need = ~zero & (slots < 0)
        else:
            keep = slots >= 0
            need = ~keep
        self._stamp[slots[keep]] = stamps[keep]
        k = int(need.sum())
        if k:
            new = self._allocate(k, protect=slots[keep])
            slots[need] = new
            self._owner_block[new] = block
            self._owner_index[new] = idx[need]
            self._stamp[new] = stamps[need]
            amap[idx[need]] = new
        if not any_zero:
            self.slab[slots] = pages  # the common case; avoids a temporary copy of the batch
        elif k + int(keep.sum()):
            write = ~zero
            self.slab[slots[write]] = pages[write]
        return slots

    # -- internals -------------------------------------------------------------------------------------
    def _grow(self, block: int, size: int) -> I32Array:
        amap = self._maps[block]
        if size > amap.shape[0]:
            grown = np.full(max(size, 2 * amap.shape[0], 1024), ABSENT, dtype=np.int32)
            grown[: amap.shape[0]] = amap
            self._maps[block] = amap = grown
        return amap

    def _release(self, slots: I32Array) -> None:
        self._owner_block[slots] = -1
        self._stamp[slots] = -1
        self._free[slots] = True
        self._free_count += int(slots.shape[0])

    def _allocate(self, k: int, protect: I32Array) -> I32Array:
        if self._free_count + (self.capacity - self._high_water) < k:
            self._evict(max(k, self.capacity // 8), protect)
        taken: list[I32Array] = []
        if self._free_count:
            reuse = np.flatnonzero(self._free)[:k].astype(np.int32)
            self._free[reuse] = False
            self._free_count -= int(reuse.shape[0])
            taken.append(reuse)
            k -= int(reuse.shape[0])
        if k:
            fresh = np.arange(self._high_water, self._high_water + k, dtype=np.int32)
            self._high_water += k
            taken.append(fresh)
        return np.concatenate(taken) if len(taken) > 1 else taken[0]

    def _evict(self, want: int, protect: I32Array) -> None:
        stamps = self._stamp[: self._high_water].copy()
        stamps[protect] = np.iinfo(np.int64).max  # pages of the current batch stay
        candidates = np.flatnonzero(stamps >= 0)
        want = min(want, candidates.shape[0] - protect.shape[0])
        if want <= 0:
            return
        cand_stamps = stamps[candidates]
        victims = candidates[np.argpartition(cand_stamps, want - 1)[:want]].astype(np.int32)
        blocks = self._owner_block[victims]
        for b in np.unique(blocks):
            sel = victims[blocks == b]
            self._maps[int(b)][self._owner_index[sel]] = ABSENT
        self._release(victims)
