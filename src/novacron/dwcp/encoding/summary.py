"""What the receiver tells the sender about its baseline store at session start, and the sender's view.

The summary has two parts (``docs/hde.md``, "Baseline summary"):

* the per-address keyed tags of *this VM's* previous copy on the receiver (sorted page indices and one
  16-byte tag each, per RAM block): a page whose tag equals the tag at its address is sent as
  ``BASE_SAME_ADDR`` with no payload at all;
* the sorted, distinct 64-bit fingerprints of all content the store holds (siblings from the same image,
  earlier copies): a page whose fingerprint is in the set is sent as ``BASE_CONTENT`` with its
  fingerprint and keyed tag, which the receiver confirms.

Both are plain numpy arrays (4 + 16 bytes per address, 8 bytes per distinct page): well under 1 % of the
memory they describe. Serialised with a versioned header and bounded on parsing.

When the sender holds the very copy the receiver holds (a VM migrated back to where it came from: both
hosts recorded the same memory with the same cluster key), the first part is redundant: the sender names
its copy by :func:`copy_digest` and the receiver, finding the same digest, sends that digest instead of
the per-address tags (version 2, ``copy_digest``). For a 768 MiB guest that is 32 bytes instead of
~2.4 MB on the link before the migration can start. Version 3 leaves out, as well, the fingerprints of
the named copy's own pages (~1 MB more for that guest): the sender holds those pages and adds their
fingerprints itself (:meth:`BaselineSummary.with_own_copy`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import blake3
import numpy as np
import numpy.typing as npt

from novacron.dwcp.encoding.errors import HdeConfigError, HdeDecodeError
from novacron.dwcp.encoding.hashing import TAG_BYTES

SUMMARY_MAGIC = b"HDS"
SUMMARY_VERSION = 1  # per-address tags of this VM's copy (or none)
SUMMARY_VERSION_DIGEST = 2  # the copy named by its digest: the sender holds the same one
SUMMARY_VERSION_NAMED = 3  # ... and the fingerprints listed are those of the rest of the store only
SUMMARY_VERSIONS = (SUMMARY_VERSION, SUMMARY_VERSION_DIGEST, SUMMARY_VERSION_NAMED)
COPY_DIGEST_BYTES = 32
_HEAD = struct.Struct("<3sBHQ")  # magic, version, block count, content fingerprint count
_DIGEST = struct.Struct(f"<{COPY_DIGEST_BYTES}s")  # versions 2 and 3, right after the header
_BLOCK = struct.Struct("<HQ")  # name length, address count
MAX_SUMMARY_ENTRIES = 1 << 30


@dataclass(frozen=True)
class CopyTags:
    index: npt.NDArray[np.uint32]  # sorted page indices
    tags: npt.NDArray[np.uint8]  # (n, 16)


def copy_digest(copy: dict[str, CopyTags]) -> bytes:
    """BLAKE3 of a copy's address map and tags, blocks in name order (``b""`` for no copy).

    Two hosts holding the same memory of a VM, recorded with the same cluster key, get the same digest;
    any page that differs changes its keyed tag and so the digest.
    """
    if not copy:
        return b""
    h = blake3.blake3()
    for name in sorted(copy):
        ct = copy[name]
        raw = name.encode()
        h.update(_BLOCK.pack(len(raw), ct.index.shape[0]))
        h.update(raw)
        h.update(ct.index.astype("<u4").tobytes())
        h.update(np.ascontiguousarray(ct.tags).tobytes())
    return h.digest(COPY_DIGEST_BYTES)


@dataclass(frozen=True)
class BaselineSummary:
    copy: dict[str, CopyTags] = field(default_factory=dict)
    content_fps: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    # Set instead of ``copy``: "my copy of this VM is the one with this digest, which you hold".
    copy_digest: bytes = b""
    # With ``copy_digest``: whether ``content_fps`` leaves out the named copy's pages (version 3).
    copy_fps_omitted: bool = False

    @property
    def nbytes(self) -> int:
        return int(self.content_fps.nbytes + sum(c.index.nbytes + c.tags.nbytes for c in self.copy.values()))

    def to_bytes(self) -> bytes:
        if self.copy_digest:
            if self.copy or len(self.copy_digest) != COPY_DIGEST_BYTES:
                raise HdeConfigError(
                    "a summary names its copy by a 32-byte digest or by its tags, not both",
                    digest_bytes=len(self.copy_digest),
                )
            version = SUMMARY_VERSION_NAMED if self.copy_fps_omitted else SUMMARY_VERSION_DIGEST
            head = _HEAD.pack(SUMMARY_MAGIC, version, 0, self.content_fps.shape[0])
            return b"".join([head, _DIGEST.pack(self.copy_digest), self.content_fps.astype("<u8").tobytes()])
        if self.copy_fps_omitted:
            raise HdeConfigError("only a summary naming its copy by digest can leave out its fingerprints")
        parts = [_HEAD.pack(SUMMARY_MAGIC, SUMMARY_VERSION, len(self.copy), self.content_fps.shape[0])]
        for name, ct in self.copy.items():
            raw = name.encode()
            parts += [_BLOCK.pack(len(raw), ct.index.shape[0]), raw]
            parts += [ct.index.astype("<u4").tobytes(), np.ascontiguousarray(ct.tags).tobytes()]
        parts.append(self.content_fps.astype("<u8").tobytes())
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, buf: bytes, max_entries: int = MAX_SUMMARY_ENTRIES) -> BaselineSummary:
        try:
            magic, version, nblocks, nfps = _HEAD.unpack_from(buf)
            if magic != SUMMARY_MAGIC or version not in SUMMARY_VERSIONS:
                raise HdeDecodeError(
                    "not an HDE baseline summary v1, v2 or v3", magic=bytes(magic).hex(), version=version
                )
            if nfps > max_entries:
                raise HdeDecodeError("summary too large", fingerprints=nfps)
            pos = _HEAD.size
            digest = b""
            if version != SUMMARY_VERSION:
                (digest,) = _DIGEST.unpack_from(buf, pos)
                pos += _DIGEST.size
                if nblocks != 0 or digest == bytes(COPY_DIGEST_BYTES):
                    raise HdeDecodeError(
                        f"summary v{version} must name its copy by a digest alone", blocks=nblocks
                    )
            copy: dict[str, CopyTags] = {}
            for _ in range(nblocks):
                nlen, count = _BLOCK.unpack_from(buf, pos)
                pos += _BLOCK.size
                if count > max_entries or pos + nlen + count * (4 + TAG_BYTES) > len(buf):
                    raise HdeDecodeError("summary block out of bounds", count=count)
                name = buf[pos : pos + nlen].decode()
                pos += nlen
                index = np.frombuffer(buf, dtype="<u4", count=count, offset=pos).astype(np.uint32)
                pos += 4 * count
                tags = np.frombuffer(buf, dtype=np.uint8, count=count * TAG_BYTES, offset=pos)
                pos += count * TAG_BYTES
                if count > 1 and np.any(np.diff(index.astype(np.int64)) <= 0):
                    raise HdeDecodeError("summary page indices not strictly increasing", block=name)
                copy[name] = CopyTags(index, tags.reshape(count, TAG_BYTES).copy())
            if pos + 8 * nfps != len(buf):
                raise HdeDecodeError("summary size does not match its header", size=len(buf))
            fps = np.frombuffer(buf, dtype="<u8", count=nfps, offset=pos).astype(np.uint64)
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise HdeDecodeError("malformed baseline summary", detail=str(exc)) from exc
        if nfps > 1 and np.any(fps[1:] <= fps[:-1]):
            raise HdeDecodeError("summary fingerprints not sorted and distinct")
        return cls(
            copy=copy,
            content_fps=fps,
            copy_digest=bytes(digest),
            copy_fps_omitted=version == SUMMARY_VERSION_NAMED,
        )

    def with_own_copy(
        self, tags: dict[str, CopyTags], fingerprints: Callable[[], npt.NDArray[np.uint64]]
    ) -> BaselineSummary:
        """The sender's full view of a summary that named its copy: ``tags`` of the sender's own snapshot
        of that copy (the one with this digest), and, for a v3 summary, that snapshot's sorted distinct
        ``fingerprints()`` (only asked for then: a v2 summary lists them already)."""
        if not self.copy_fps_omitted:
            return BaselineSummary(copy=tags, content_fps=self.content_fps)
        content = np.union1d(self.content_fps, fingerprints()).astype(np.uint64)
        return BaselineSummary(copy=tags, content_fps=content)


class BaselineView:
    """The sender's vectorised queries against a summary."""

    def __init__(self, summary: BaselineSummary) -> None:
        self.summary = summary

    def copy_tags(
        self, block: str, index: npt.NDArray[np.uint64]
    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.uint8]]:
        """(has, tags): whether the receiver's copy has a tag at each address, and the tag (rows of has)."""
        ct = self.summary.copy.get(block)
        n = index.shape[0]
        if ct is None or ct.index.shape[0] == 0 or n == 0:
            return np.zeros(n, dtype=bool), np.zeros((0, TAG_BYTES), dtype=np.uint8)
        pos = np.searchsorted(ct.index, index)
        pos_c = np.minimum(pos, ct.index.shape[0] - 1)
        has = ct.index[pos_c] == index
        return has, ct.tags[pos_c[has]]

    def has_content(self, fps: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
        table = self.summary.content_fps
        if table.shape[0] == 0 or fps.shape[0] == 0:
            return np.zeros(fps.shape[0], dtype=bool)
        pos = np.minimum(np.searchsorted(table, fps), table.shape[0] - 1)
        return np.asarray(table[pos] == fps)
