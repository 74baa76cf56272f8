"""Shared builders for the HDE tests (holds no tests itself; named to stay inside the HDE test files)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from novacron.dwcp.encoding import PAGE_SIZE, PageBatch

KEY = bytes(range(32))


def batch(
    block: str, index: Sequence[int] | npt.NDArray[Any], pages: npt.NDArray[np.uint8], meta: bytes = b""
) -> PageBatch:
    offsets = np.asarray(index, dtype=np.uint64) * np.uint64(PAGE_SIZE)
    return PageBatch(block, offsets, np.ascontiguousarray(pages, dtype=np.uint8).tobytes(), meta)


def text_pages(rng: np.random.Generator, n: int) -> npt.NDArray[np.uint8]:
    """Compressible pages: words from a small vocabulary, like text or structured data."""
    vocab = np.frombuffer(b"the quick brown fox jumps over lazy dog 0123456789 memory page ", dtype=np.uint8)
    return vocab[rng.integers(0, vocab.shape[0], size=(n, PAGE_SIZE))].astype(np.uint8)


class CollidingHasher:
    """Test hook: every page gets the same fingerprint, and (optionally) the same tag."""

    def __init__(self, tags_collide: bool) -> None:
        self.tags_collide = tags_collide

    def fingerprints(self, pages: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
        return np.full(pages.shape[0], 42, dtype=np.uint64)

    def tags(self, pages: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        if self.tags_collide:
            return np.full((pages.shape[0], 16), 7, dtype=np.uint8)
        from novacron.dwcp.encoding import DefaultPageHasher

        return DefaultPageHasher(KEY).tags(pages)

    def tag_bytes(self, data: bytes) -> bytes:
        return bytes(16)
