"""The receiver's baseline store: pages it already holds from earlier migrations and sibling VMs.

Layout of a store directory (one store per host):

* ``pages.dat`` - 4 KiB records, append-only, deduplicated by content (record number = position);
* ``tags.dat``  - the keyed 16-byte tag of every record, same order;
* ``fps.dat``   - the 64-bit fingerprint of every record, same order (to rebuild the index on open);
* ``copies/<hex(vm)>.npz`` - per VM, per RAM block: sorted page indices and their record numbers
  ("this VM's memory as it left this host"); zero pages are not stored.

In memory it keeps only numpy arrays: the sorted fingerprints with their record numbers (12 bytes per
record) and the copy maps (8 bytes per address), about 0.5 % of the memory described. Page contents
are read through a read-only map of ``pages.dat``: the kernel's page cache is the hot-page cache (LRU,
shrunk by the kernel under memory pressure, never a failure). A user-space LRU slab in front of it
cost 4-15 us per page read against 0.46 us for the map alone (a copy, first-touch faults and a dict
entry per page), so there is none. Records are never deleted while the store is open, so a reference
taken from a summary stays valid for the whole session.
When ``max_records`` is reached, new content is simply not stored (counted in ``skipped_pages``).

Threads: writers (``add_batch``, ``add_content``, ``drop_copy``, ``flush``) take one lock; readers
(decoder threads resolving references) take none: records only grow, and the sorted index is swapped
as one tuple, so a reader sees either the old or the new index, never half of each. That lets the
sibling indexer add content in a worker thread while a migration reads the store.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from novacron.dwcp.encoding.batch import PageBatch
from novacron.dwcp.encoding.errors import BaselineStoreError, HdeConfigError, HdeReferenceMissing
from novacron.dwcp.encoding.hashing import TAG_BYTES, PageHasher
from novacron.dwcp.encoding.limits import PAGE_SIZE
from novacron.dwcp.encoding.summary import BaselineSummary, CopyTags, copy_digest
from novacron.observability.log import log_event

log = logging.getLogger("novacron.dwcp.encoding.baseline")

I32Array = npt.NDArray[np.int32]
U8Array = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class BaselineLimits:
    max_records: int = 1 << 24  # 64 GiB of distinct pages on disk
    # Content fingerprints listed in a summary (8 bytes each: 8 MiB; READY must fit a control message).
    # Beyond it the newest records are listed (the latest siblings' and migrations' content).
    max_summary_fps: int = 1 << 20

    def __post_init__(self) -> None:
        if not 0 < self.max_records < 1 << 31 or self.max_summary_fps < 0:
            raise HdeConfigError("bad baseline limits", max_records=self.max_records)


class BaselineStore:
    def __init__(self, directory: Path, hasher: PageHasher, limits: BaselineLimits | None = None) -> None:
        self.dir = directory
        self.hasher = hasher
        self.limits = limits or BaselineLimits()
        self.skipped_pages = 0
        (directory / "copies").mkdir(parents=True, exist_ok=True)
        self._pages_fd = os.open(directory / "pages.dat", os.O_RDWR | os.O_CREAT, 0o600)
        self._tags_fd = os.open(directory / "tags.dat", os.O_RDWR | os.O_CREAT, 0o600)
        self._fps_fd = os.open(directory / "fps.dat", os.O_RDWR | os.O_CREAT, 0o600)
        self._copies: dict[str, dict[str, tuple[npt.NDArray[np.uint32], I32Array]]] = {}
        self._dirty_copies: set[str] = set()
        self._tags_map: U8Array | None = None
        self._pages_map: U8Array | None = None
        self._write_lock = threading.Lock()
        self._load()

    # -- loading and persistence -----------------------------------------------------------------------
    def _load(self) -> None:
        sizes = (
            os.fstat(self._pages_fd).st_size // PAGE_SIZE,
            os.fstat(self._tags_fd).st_size // TAG_BYTES,
            os.fstat(self._fps_fd).st_size // 8,
        )
        # A crash can leave one file a record ahead of the others: the shortest one decides.
        self.records = min(sizes)
        if max(sizes) != self.records:
            log_event(log, "baseline.truncated", level=logging.WARNING, records=self.records, sizes=sizes)
        fps = np.fromfile(self.dir / "fps.dat", dtype="<u8", count=self.records).astype(np.uint64)
        order = np.argsort(fps, kind="stable")
        self._index = (fps[order], order.astype(np.int32))  # sorted fingerprints, their records
        for path in sorted((self.dir / "copies").glob("*.npz")):
            try:
                vm = bytes.fromhex(path.stem).decode()
                with np.load(path) as z:
                    blocks: dict[str, tuple[npt.NDArray[np.uint32], I32Array]] = {}
                    for key in z.files:
                        if key.startswith("i_"):
                            name = bytes.fromhex(key[2:]).decode()
                            idx = z[key].astype(np.uint32)
                            rec = z["r_" + key[2:]].astype(np.int32)
                            if idx.shape != rec.shape or (rec.shape[0] and int(rec.max()) >= self.records):
                                raise BaselineStoreError("copy refers beyond the stored records", vm=vm)
                            blocks[name] = (idx, rec)
            except (OSError, ValueError, KeyError, BaselineStoreError) as exc:
                log_event(log, "baseline.copy_dropped", level=logging.WARNING, file=path.name, error=str(exc))
                continue
            self._copies[vm] = blocks

    def flush(self) -> None:
        with self._write_lock:
            self._flush()

    def _flush(self) -> None:
        for vm in sorted(self._dirty_copies):
            arrays: dict[str, npt.NDArray[np.generic]] = {}
            for name, (idx, rec) in self._copies.get(vm, {}).items():
                arrays["i_" + name.encode().hex()] = idx
                arrays["r_" + name.encode().hex()] = rec
            final = self.dir / "copies" / (vm.encode().hex() + ".npz")
            tmp = final.with_suffix(".tmp.npz")
            np.savez(tmp, **arrays)  # type: ignore[arg-type]
            os.replace(tmp, final)
        self._dirty_copies.clear()
        for fd in (self._pages_fd, self._tags_fd, self._fps_fd):
            os.fsync(fd)

    def close(self) -> None:
        self.flush()
        for fd in (self._pages_fd, self._tags_fd, self._fps_fd):
            os.close(fd)

    def __enter__(self) -> BaselineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- adding content ----------------------------------------------------------------------------------
    def add_batch(self, vm: str, batch: PageBatch) -> int:
        """Remember ``batch`` as part of ``vm``'s copy on this host; returns the new records written."""
        with self._write_lock:
            return self._add_batch(vm, batch)

    def _add_batch(self, vm: str, batch: PageBatch) -> int:
        pages = batch.pages()
        index = (batch.offsets // np.uint64(PAGE_SIZE)).astype(np.uint32)
        nonzero = pages.view(np.uint64).any(axis=1)
        recs, written = self._store(pages[nonzero])
        blocks = self._copies.setdefault(vm, {})
        old_idx, old_rec = blocks.get(batch.block, (np.zeros(0, np.uint32), np.zeros(0, np.int32)))
        # New versions replace old ones at the same address; zero pages drop the address.
        keep = ~np.isin(old_idx, index)
        ok = recs >= 0
        idx = np.concatenate((old_idx[keep], index[nonzero][ok]))
        rec = np.concatenate((old_rec[keep], recs[ok]))
        order = np.argsort(idx, kind="stable")
        blocks[batch.block] = (idx[order], rec[order])
        self._dirty_copies.add(vm)
        return written

    def add_content(self, pages: U8Array, fps: npt.NDArray[np.uint64] | None = None) -> int:
        """Store pages without an address (e.g. a sibling VM's memory); returns new records written.

        ``fps``: the pages' fingerprints when the caller has them already (the sibling indexer).
        """
        nonzero = pages.view(np.uint64).any(axis=1)
        with self._write_lock:
            return self._store(pages[nonzero], None if fps is None else fps[nonzero])[1]

    def holds_fingerprints(self, fps: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
        """Which fingerprints some record has (a cheap pre-filter: tags decide what is really held)."""
        sorted_fps, _ = self._index
        if sorted_fps.shape[0] == 0:
            return np.zeros(fps.shape[0], dtype=bool)
        pos = np.minimum(np.searchsorted(sorted_fps, fps), sorted_fps.shape[0] - 1)
        return np.asarray(sorted_fps[pos] == fps)

    def drop_copy(self, vm: str) -> None:
        """Forget ``vm``'s address map (its content stays available as baseline content)."""
        with self._write_lock:
            if self._copies.pop(vm, None) is not None:
                (self.dir / "copies" / (vm.encode().hex() + ".npz")).unlink(missing_ok=True)

    def _store(self, pages: U8Array, fps: npt.NDArray[np.uint64] | None = None) -> tuple[I32Array, int]:
        n = pages.shape[0]
        if n == 0:
            return np.zeros(0, np.int32), 0
        if fps is None:
            fps = self.hasher.fingerprints(pages)
        tags = self.hasher.tags(pages)
        recs = self._find(fps, tags)
        new = np.flatnonzero(recs < 0)
        if new.shape[0] == 0:
            return recs, 0
        # Equal pages inside this call are stored once, in order of first occurrence.
        keys = np.ascontiguousarray(tags[new]).view(np.dtype((np.void, TAG_BYTES))).ravel()
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")
        room = max(self.limits.max_records - self.records, 0)
        if room < order.shape[0]:
            self.skipped_pages += int(order.shape[0] - room)
            order = order[:room]
        if order.shape[0] == 0:
            return recs, 0
        base = self.records
        rec_of_key = np.full(first.shape[0], -1, dtype=np.int32)
        rec_of_key[order] = np.arange(base, base + order.shape[0], dtype=np.int32)
        rows = new[first[order]]
        row_fps = np.ascontiguousarray(fps[rows], dtype="<u8")
        # The arrays themselves (fancy indexing made them contiguous copies): no further copy.
        _write_all(self._pages_fd, np.ascontiguousarray(pages[rows]), base * PAGE_SIZE)
        _write_all(self._tags_fd, np.ascontiguousarray(tags[rows]), base * TAG_BYTES)
        _write_all(self._fps_fd, row_fps, base * 8)
        self.records += int(order.shape[0])
        # Insert in fingerprint order, so new values landing at the same position stay sorted too.
        by_fp = np.argsort(row_fps, kind="stable")
        new_fps = row_fps[by_fp]
        sorted_fps, sorted_rec = self._index
        pos = np.searchsorted(sorted_fps, new_fps)
        self._index = (
            np.insert(sorted_fps, pos, new_fps),
            np.insert(sorted_rec, pos, rec_of_key[order][by_fp]),
        )
        recs[new] = rec_of_key[inverse.ravel()]
        return recs, int(order.shape[0])

    # -- lookups -----------------------------------------------------------------------------------------
    def _find(self, fps: npt.NDArray[np.uint64], tags: U8Array) -> I32Array:
        """Record holding exactly the content with these fingerprints and tags, or -1."""
        out = np.full(fps.shape[0], -1, dtype=np.int32)
        sorted_fps, sorted_rec = self._index  # one snapshot: a writer swaps the pair at once
        if sorted_fps.shape[0] == 0 or fps.shape[0] == 0:
            return out
        lo = np.searchsorted(sorted_fps, fps, side="left")
        hi = np.searchsorted(sorted_fps, fps, side="right")
        stored = self._tags()
        single = np.flatnonzero(hi - lo == 1)
        if single.shape[0]:
            rec = sorted_rec[lo[single]]
            same = (stored[rec] == tags[single]).all(axis=1)
            out[single[same]] = rec[same]
        # Several records share a fingerprint only on a collision: check each candidate's tag.
        for i in np.flatnonzero(hi - lo > 1).tolist():
            cand = sorted_rec[int(lo[i]) : int(hi[i])]
            same = (stored[cand] == tags[i]).all(axis=1)
            if same.any():
                out[i] = cand[np.argmax(same)]
        return out

    def _tags(self) -> U8Array:
        tags_map, records = self._tags_map, self.records
        if tags_map is None or tags_map.shape[0] != records:
            tags_map = np.memmap(self.dir / "tags.dat", dtype=np.uint8, mode="r", shape=(records, TAG_BYTES))
            self._tags_map = tags_map
        return tags_map

    def read(self, recs: I32Array) -> U8Array:
        """The pages of these records, in one gather through the map of ``pages.dat``."""
        if recs.shape[0] and (int(recs.min()) < 0 or int(recs.max()) >= self.records):
            raise BaselineStoreError("baseline record out of range", records=self.records)
        return np.asarray(self._pages()[recs])

    def fingerprints(self, recs: I32Array) -> npt.NDArray[np.uint64]:
        """The sorted, distinct fingerprints of these records (from the in-memory index, no I/O)."""
        if recs.shape[0] and (int(recs.min()) < 0 or int(recs.max()) >= self.records):
            raise BaselineStoreError("baseline record out of range", records=self.records)
        sorted_fps, sorted_rec = self._index  # one snapshot: a writer swaps the pair at once
        return np.unique(sorted_fps[np.isin(sorted_rec, recs)])

    def _pages(self) -> U8Array:
        """A read-only map of pages.dat (re-made when records were added)."""
        pages_map, records = self._pages_map, self.records
        if pages_map is None or pages_map.shape[0] != records:
            pages_map = np.memmap(
                self.dir / "pages.dat", dtype=np.uint8, mode="r", shape=(records, PAGE_SIZE)
            )
            self._pages_map = pages_map
        return pages_map

    # -- what the sender is told -------------------------------------------------------------------------
    def summary(
        self, vm: str | None, sender_copy: bytes = b"", *, omit_copy_fps: bool = False
    ) -> BaselineSummary:
        """What the sender is told. ``sender_copy``: the digest of the copy of ``vm`` the sender holds
        (:func:`copy_digest`); when this store's copy has the same digest, it is named by the digest
        instead of listing its tags, and with ``omit_copy_fps`` (a sender that reads summary v3) the
        fingerprints listed leave out that copy's pages, which the sender holds itself."""
        blocks = dict(self._copies.get(vm, {})) if vm is not None else {}
        copy = self._copy_tags(blocks)
        sorted_fps, sorted_rec = self._index
        if sorted_fps.shape[0] > self.limits.max_summary_fps:
            newest = sorted_rec >= self.records - self.limits.max_summary_fps
            sorted_fps, sorted_rec = sorted_fps[newest], sorted_rec[newest]
        named = bool(sender_copy) and copy_digest(copy) == sender_copy
        if named and omit_copy_fps and blocks:
            rest = ~np.isin(sorted_rec, np.concatenate([rec for _, rec in blocks.values()]))
            sorted_fps = sorted_fps[rest]
        fps = np.unique(sorted_fps)
        if named:
            return BaselineSummary(content_fps=fps, copy_digest=sender_copy, copy_fps_omitted=omit_copy_fps)
        return BaselineSummary(copy=copy, content_fps=fps)

    def session(self, vm: str | None) -> BaselineSession:
        return BaselineSession(self, dict(self._copies.get(vm, {})) if vm is not None else {})

    def own_copy(self, vm: str) -> tuple[dict[str, CopyTags], BaselineSession]:
        """This store's copy of ``vm`` as the sender uses it: its tags (what a receiver holding the same
        copy would list, see :meth:`summary`) and a session reading it, from one snapshot of the map."""
        blocks = dict(self._copies.get(vm, {}))
        return self._copy_tags(blocks), BaselineSession(self, blocks)

    def _copy_tags(self, blocks: dict[str, tuple[npt.NDArray[np.uint32], I32Array]]) -> dict[str, CopyTags]:
        if not blocks:
            return {}
        all_tags = self._tags()
        return {name: CopyTags(idx.copy(), np.array(all_tags[rec])) for name, (idx, rec) in blocks.items()}

    # -- memory -------------------------------------------------------------------------------------------
    def index_bytes(self) -> int:
        """Bytes of the in-memory index: fingerprints, record numbers, copy maps (pages stay in pages.dat)."""
        copies = sum(i.nbytes + r.nbytes for blocks in self._copies.values() for i, r in blocks.values())
        sorted_fps, sorted_rec = self._index
        return int(sorted_fps.nbytes + sorted_rec.nbytes + copies)

    def described_bytes(self) -> int:
        """Memory the index describes: the distinct records plus every address of every copy."""
        addresses = sum(i.shape[0] for blocks in self._copies.values() for i, _ in blocks.values())
        return int((self.records + addresses) * PAGE_SIZE)


class BaselineSession:
    """The decoder's read access to the store for one incoming migration (copy maps snapshotted)."""

    def __init__(
        self, store: BaselineStore, copy: dict[str, tuple[npt.NDArray[np.uint32], I32Array]]
    ) -> None:
        self._store = store
        self._copy = copy

    def same_address(self, block: str, index: npt.NDArray[np.uint64], seq: int) -> U8Array:
        idx, rec = self._copy.get(block, (np.zeros(0, np.uint32), np.zeros(0, np.int32)))
        if idx.shape[0] == 0:
            raise HdeReferenceMissing("no baseline copy of this block", block=block, seq=seq)
        pos = np.minimum(np.searchsorted(idx, index), idx.shape[0] - 1)
        hit = idx[pos] == index
        if not hit.all():
            raise HdeReferenceMissing(
                "baseline copy lacks addresses", block=block, seq=seq, missing=int((~hit).sum())
            )
        return self._store.read(rec[pos])

    def fingerprints(self) -> npt.NDArray[np.uint64]:
        """The sorted, distinct fingerprints of this snapshot's pages (what a summary v3 leaves out)."""
        recs = [rec for _, rec in self._copy.values()]
        return self._store.fingerprints(np.concatenate(recs) if recs else np.zeros(0, np.int32))

    def copy_pages(
        self, block: str, index: npt.NDArray[np.uint64]
    ) -> tuple[npt.NDArray[np.bool_], U8Array, U8Array]:
        """(has, pages, tags) of this VM's copy at the given addresses, for the rows that have one.

        The sender's use: when its own store holds the copy the receiver holds (the VM came from there),
        it can send a page as a delta against that copy.
        """
        idx, rec = self._copy.get(block, (np.zeros(0, np.uint32), np.zeros(0, np.int32)))
        n = index.shape[0]
        if idx.shape[0] == 0 or n == 0:
            empty = np.zeros((0, PAGE_SIZE), np.uint8)
            return np.zeros(n, dtype=bool), empty, np.zeros((0, TAG_BYTES), np.uint8)
        pos = np.minimum(np.searchsorted(idx, index), idx.shape[0] - 1)
        has = idx[pos] == index
        recs = rec[pos[has]]
        return has, self._store.read(recs), np.array(self._store._tags()[recs])

    def content(self, fps: npt.NDArray[np.uint64], tags: U8Array, seq: int) -> U8Array:
        recs = self._store._find(fps, tags)
        if np.any(recs < 0):
            raise HdeReferenceMissing(
                "baseline content not held (or its tag differs)", seq=seq, missing=int((recs < 0).sum())
            )
        return self._store.read(recs)


def _write_all(fd: int, data: npt.NDArray[np.generic], offset: int) -> None:
    """``pwrite`` all of ``data`` at ``offset`` (a write may be short: near a full disk, or over 2 GiB)."""
    view = data.data.cast("B")  # contiguous: the caller made it so
    while view:
        done = os.pwrite(fd, view, offset)
        if done <= 0:
            raise OSError(f"short write to the baseline store at offset {offset}")
        view, offset = view[done:], offset + done
