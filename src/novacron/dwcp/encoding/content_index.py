"""Sender-only index from page fingerprint to a session-cache slot that may hold that content.

A direct-mapped table (two entries per slot, newer entries overwrite older ones): lossy on purpose,
since every hit is confirmed against the slot's fingerprint and then byte by byte against the cached
page before the encoder emits a reference. 12 bytes per cache slot, all numpy, all vectorised.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from novacron.dwcp.encoding.session_cache import SessionPageCache


class ContentIndex:
    def __init__(self, cache: SessionPageCache) -> None:
        self._cache = cache
        size = 1
        while size < 2 * cache.capacity:
            size <<= 1
        self._mask = np.uint64(size - 1)
        self._table = np.full(size, -1, dtype=np.int32)
        self._slot_fp = np.zeros(cache.capacity, dtype=np.uint64)

    def find(
        self, fps: npt.NDArray[np.uint64], pages: npt.NDArray[np.uint8], rows: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int32]:
        """For each of ``pages[rows]`` (fingerprints ``fps``): the slot holding the same bytes, or -1."""
        slots = self._table[(fps & self._mask).astype(np.int64)]
        hit = slots >= 0
        hit[hit] = self._slot_fp[slots[hit]] == fps[hit]
        hit[hit] = self._cache.occupied(slots[hit])
        if hit.any():
            cand = np.flatnonzero(hit)
            cached = self._cache.slab64[slots[cand]]
            mine = pages[rows[cand]].view(np.uint64)
            same = (cached == mine).all(axis=1)
            hit[cand[~same]] = False
        out = np.where(hit, slots, -1).astype(np.int32)
        return out

    def insert(self, fps: npt.NDArray[np.uint64], slots: npt.NDArray[np.int32]) -> None:
        ok = slots >= 0
        self._table[(fps[ok] & self._mask).astype(np.int64)] = slots[ok]
        self._slot_fp[slots[ok]] = fps[ok]
