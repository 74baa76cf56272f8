"""Opaque data: content-defined chunks and the mirrored cache of chunks sent in this session.

Device state and other main-channel bytes repeat between pre-copy rounds and between migrations only in
parts, at shifting offsets; content-defined chunking (FastCDC, compiled ``pyfastcdc``) cuts them at
content-determined points so equal regions yield equal chunks. Every literal chunk enters the cache
under the next chunk id on both sides; the oldest ids leave first when the byte budget is exceeded
(FIFO: deterministic, and the decoder needs no more than ids and sizes to mirror it).
"""

from __future__ import annotations

from collections import OrderedDict

import xxhash
from pyfastcdc import FastCDC

from novacron.dwcp.encoding.limits import HdeLimits


def cut(data: bytes, limits: HdeLimits) -> list[memoryview]:
    """Split ``data`` into content-defined chunks (the whole input if it is shorter than cdc_min)."""
    if len(data) <= limits.cdc_min:
        return [memoryview(data)] if data else []
    chunker = FastCDC(
        avg_size=limits.cdc_avg, min_size=limits.cdc_min, max_size=limits.cdc_max, normalized_chunking=1
    )
    return [c.data for c in chunker.cut_buf(data)]


class ChunkCache:
    def __init__(self, budget_bytes: int, with_index: bool) -> None:
        self.budget = budget_bytes
        self.size = 0
        self.next_id = 0
        self._chunks: OrderedDict[int, bytes] = OrderedDict()
        # Encoder only: XXH3-128 digest -> id. A hit is confirmed by comparing bytes before use.
        self._index: dict[bytes, int] | None = {} if with_index else None

    def get(self, chunk_id: int) -> bytes | None:
        return self._chunks.get(chunk_id)

    def find(self, chunk: bytes | memoryview) -> int | None:
        if self._index is None:
            return None
        cid = self._index.get(xxhash.xxh3_128_digest(chunk))
        if cid is None:
            return None
        held = self._chunks.get(cid)
        return cid if held is not None and held == chunk else None

    def add(self, chunk: bytes) -> None:
        cid = self.next_id
        self.next_id += 1
        self._chunks[cid] = chunk
        self.size += len(chunk)
        if self._index is not None:
            self._index[xxhash.xxh3_128_digest(chunk)] = cid
        while self.size > self.budget:
            old_id, old = self._chunks.popitem(last=False)
            self.size -= len(old)
            if self._index is not None:
                key = xxhash.xxh3_128_digest(old)
                if self._index.get(key) == old_id:
                    del self._index[key]
