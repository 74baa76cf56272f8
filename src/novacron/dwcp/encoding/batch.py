"""What the encoder takes and the decoder gives back: a page batch or an opaque chunk.

A page batch mirrors one QEMU multifd packet: one RAM block, page offsets, the pages' bytes back to back
and the caller's own metadata (e.g. the packet header), which HDE carries verbatim.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from novacron.dwcp.encoding.errors import HdeInputError
from novacron.dwcp.encoding.limits import PAGE_SHIFT, PAGE_SIZE, HdeLimits


@dataclass(frozen=True)
class PageBatch:
    block: str
    offsets: npt.NDArray[np.uint64]
    data: bytes | memoryview  # n * 4096 bytes; the decoder hands out a view of its output (no copy)
    meta: bytes = b""

    @property
    def count(self) -> int:
        return int(self.offsets.shape[0])

    def pages(self) -> npt.NDArray[np.uint8]:
        """The pages as a read-only (n, 4096) array view of ``data`` (no copy)."""
        return np.frombuffer(self.data, dtype=np.uint8).reshape(self.count, PAGE_SIZE)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PageBatch):
            return NotImplemented
        return (
            self.block == other.block
            and np.array_equal(self.offsets, other.offsets)
            and self.data == other.data
            and self.meta == other.meta
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class OpaqueChunk:
    data: bytes
    meta: bytes = b""


def distinct(index: npt.NDArray[np.uint64]) -> bool:
    """No value twice (QEMU sends ascending offsets, so the sort is usually skipped)."""
    if bool(np.all(index[1:] > index[:-1])):
        return True
    return bool(np.unique(index).shape[0] == index.shape[0])


def validate_page_batch(batch: PageBatch, limits: HdeLimits) -> npt.NDArray[np.uint64]:
    """Check ``batch`` against ``limits``; return its page indices (offset / 4096)."""
    name = batch.block.encode()
    if not name or len(name) > limits.max_block_name:
        raise HdeInputError("block name must be 1..max_block_name bytes", block=batch.block[:64])
    if len(batch.meta) > limits.max_meta_bytes:
        raise HdeInputError("meta too large", size=len(batch.meta), limit=limits.max_meta_bytes)
    offsets = batch.offsets
    if not isinstance(offsets, np.ndarray) or offsets.ndim != 1 or offsets.dtype != np.uint64:
        raise HdeInputError("offsets must be a 1-D numpy uint64 array", block=batch.block)
    n = offsets.shape[0]
    if n > limits.max_pages_per_batch:
        raise HdeInputError("too many pages in one batch", count=n, limit=limits.max_pages_per_batch)
    if len(batch.data) != n * PAGE_SIZE:
        raise HdeInputError("data length is not count * 4096", count=n, size=len(batch.data))
    if n and np.bitwise_or.reduce(offsets) & np.uint64(PAGE_SIZE - 1):
        raise HdeInputError("page offsets must be multiples of 4096", block=batch.block)
    index = offsets >> np.uint64(PAGE_SHIFT)
    if n and int(index.max()) > limits.max_page_index:
        raise HdeInputError("page offset beyond max_page_index", block=batch.block, offset=int(offsets.max()))
    if n > 1 and not distinct(index):
        raise HdeInputError("a page offset occurs twice in one batch", block=batch.block)
    return index
