"""Page fingerprints and collision-safe content tags.

Two strengths, used where each is safe (``docs/hde.md``, "Hashing and collisions"):

* **fingerprint**: XXH3-64 of a page. Cheap (several GB/s) but not collision
  resistant, so it only *finds candidates*. It is trusted nowhere on its own: a reference into the
  session cache is confirmed by comparing the bytes (the encoder holds a mirror of that cache), and a
  baseline reference carries a tag.
* **tag**: 128 bits of BLAKE3 keyed with the cluster secret. A guest cannot compute it (it lacks the
  key), so it cannot craft a page whose tag matches another VM's page; the decoder accepts baseline
  content only when its stored tag equals the tag in the reference.

Tests replace :class:`PageHasher` to force collisions (the adversarial test hook).
"""

from __future__ import annotations

from typing import Protocol

import blake3
import numpy as np
import numpy.typing as npt
import xxhash

from novacron.dwcp.encoding.errors import HdeConfigError
from novacron.dwcp.encoding.limits import PAGE_SIZE

TAG_BYTES = 16
KEY_BYTES = 32

U8Array = npt.NDArray[np.uint8]
U64Array = npt.NDArray[np.uint64]


class PageHasher(Protocol):
    def fingerprints(self, pages: U8Array) -> U64Array:
        """One 64-bit fingerprint per row of an (n, 4096) uint8 array."""
        ...

    def tags(self, pages: U8Array) -> U8Array:
        """One keyed 16-byte tag per row, as an (n, 16) uint8 array."""
        ...

    def tag_bytes(self, data: bytes) -> bytes:
        """The keyed 16-byte tag of arbitrary bytes (opaque chunks)."""
        ...


class DefaultPageHasher:
    """XXH3 fingerprints and keyed-BLAKE3 tags (the only hasher outside tests)."""

    def __init__(self, cluster_key: bytes) -> None:
        if len(cluster_key) != KEY_BYTES:
            raise HdeConfigError("cluster key must be 32 bytes", size=len(cluster_key))
        self._key = cluster_key

    def fingerprints(self, pages: U8Array) -> U64Array:
        mv = memoryview(np.ascontiguousarray(pages).data).cast("B")
        digest = xxhash.xxh3_64_intdigest
        # A list comprehension over slices: half the per-page cost of a generator into np.fromiter.
        return np.array(
            [digest(mv[i : i + PAGE_SIZE]) for i in range(0, len(mv), PAGE_SIZE)], dtype=np.uint64
        )

    def tags(self, pages: U8Array) -> U8Array:
        mv = memoryview(np.ascontiguousarray(pages).data).cast("B")
        tag, key, size = blake3.blake3, self._key, TAG_BYTES
        # Digests joined once: a row assignment per page cost as much as the hash itself.
        joined = b"".join(
            [tag(mv[i : i + PAGE_SIZE], key=key).digest(size) for i in range(0, len(mv), PAGE_SIZE)]
        )
        return np.frombuffer(joined, dtype=np.uint8).reshape(-1, TAG_BYTES)

    def tag_bytes(self, data: bytes) -> bytes:
        return bytes(blake3.blake3(data, key=self._key).digest(TAG_BYTES))


def checksum(parts: list[bytes | memoryview]) -> bytes:
    """XXH3-128 of the concatenated parts: the batch checksum of the rebuilt content."""
    h = xxhash.xxh3_128()
    for p in parts:
        h.update(p)
    return bytes(h.digest())
