"""The receiving half of HDE: batches in, the exact pages or bytes out, or a typed error (sans-IO).

Every size is checked against :class:`HdeLimits` before anything is allocated from it, every reference
is checked against the mirrored caches or the baseline, and the rebuilt content must match the batch
checksum. Only then does the decoder update its state, so a refused batch changes nothing and the same
sequence number can be sent again (for a missing baseline reference: a repair batch).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from novacron.dwcp.encoding import sparse
from novacron.dwcp.encoding.baseline import BaselineSession
from novacron.dwcp.encoding.batch import OpaqueChunk, PageBatch, distinct
from novacron.dwcp.encoding.chunk_cache import ChunkCache
from novacron.dwcp.encoding.codecs import CodecBank
from novacron.dwcp.encoding.errors import HdeDecodeError, HdeReferenceMissing, HdeStreamBroken
from novacron.dwcp.encoding.hashing import TAG_BYTES, checksum
from novacron.dwcp.encoding.limits import PAGE_SHIFT, PAGE_SIZE, HdeLimits
from novacron.dwcp.encoding.session_cache import CacheArena, SessionPageCache
from novacron.dwcp.encoding.wire import (
    FLAG_REPAIR,
    HEADER_SIZE,
    BatchKind,
    ChunkKind,
    Header,
    PageKind,
    unpack_header,
)

KIND_COUNT = len(PageKind)
_NO_ROWS = np.zeros(0, dtype=np.int64)


class _Reader:
    """Consumes a body front to back; running past its end is a decode error, not an IndexError."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.pos = 0

    def take(self, n: int, what: str) -> npt.NDArray[np.uint8]:
        if n < 0 or self.pos + n > len(self.body):
            raise HdeDecodeError("batch body too short", section=what, need=n, have=len(self.body) - self.pos)
        out = np.frombuffer(self.body, dtype=np.uint8, count=n, offset=self.pos)
        self.pos += n
        return out

    def array(self, count: int, dtype: str, what: str) -> npt.NDArray[np.generic]:
        size = np.dtype(dtype).itemsize
        return self.take(count * size, what).view(dtype)

    def finish(self) -> None:
        if self.pos != len(self.body):
            raise HdeDecodeError("trailing bytes in batch body", extra=len(self.body) - self.pos)


def _read_delta(
    r: _Reader, pages: int
) -> tuple[npt.NDArray[np.uint16], npt.NDArray[np.uint16], npt.NDArray[np.uint8]]:
    """One sparse-delta section: run counts, (gap, length) pairs, changed bytes."""
    counts = r.array(pages, "<u2", "delta counts").astype(np.uint16)
    total_runs = int(counts.sum(dtype=np.int64))
    runs = r.array(2 * total_runs, "<u2", "delta runs").astype(np.uint16).reshape(-1, 2)
    data = r.take(int(runs[:, 1].sum(dtype=np.int64)), "delta data")
    return counts, runs, data


class HdeDecoder:
    def __init__(
        self,
        limits: HdeLimits | None = None,
        *,
        baseline: BaselineSession | None = None,
        arena: CacheArena | None = None,
    ) -> None:
        self.limits = limits or HdeLimits()
        self.baseline = baseline
        self._bank = CodecBank(
            self.limits.max_zstd_window,
            self.limits.zstd_window_log,
            self.limits.zstd_ldm,
            contexts=arena.zstd if arena is not None else None,
        )
        self._cache = SessionPageCache(self.limits.session_pages, arena)
        self._chunks = ChunkCache(self.limits.chunk_cache_bytes, with_index=False)
        self._seq = 0
        self._broken: HdeDecodeError | None = None

    def close(self) -> None:
        """Release the cache arena (if one was given) for the next session."""
        self._cache.close()

    @property
    def next_seq(self) -> int:
        return self._seq

    def session_pages(self, max_pages: int = 1024) -> Iterator[PageBatch]:
        """The last version received of every page the session cache holds, as batches (for the baseline)."""
        for block, index, pages in self._cache.snapshot(max_pages):
            yield PageBatch(block, index * np.uint64(PAGE_SIZE), pages.tobytes())

    def decode(self, wire: bytes) -> PageBatch | OpaqueChunk:
        if self._broken is not None:
            raise HdeStreamBroken("decoder stopped after a corrupt streamed batch", cause=str(self._broken))
        h = unpack_header(wire, self.limits)
        repair = bool(h.flags & FLAG_REPAIR)
        # A repair replaces the batch just refused; everything else must come in order.
        if h.seq != self._seq:
            raise HdeDecodeError("batch out of sequence", seq=h.seq, expected=self._seq, repair=repair)
        pos = HEADER_SIZE
        try:
            name = wire[pos : pos + h.name_len].decode()
        except UnicodeDecodeError as exc:
            raise HdeDecodeError("block name is not UTF-8", seq=h.seq) from exc
        pos += h.name_len
        meta = wire[pos : pos + h.meta_len]
        pos += h.meta_len
        if repair and h.codec.streamed:
            raise HdeDecodeError("repair batch in a stream codec", seq=h.seq)
        try:
            body = self._bank.decompress(h.codec, memoryview(wire)[pos:], h.raw_len)
            if h.kind is BatchKind.PAGES:
                return self._decode_pages(h, name, meta, body, repair)
            return self._decode_chunks(h, meta, body)
        except HdeReferenceMissing:
            raise  # the stream consumed exactly what the encoder's did: still in step, repairable
        except HdeDecodeError as exc:
            if self._bank.touched_stream:
                # The stream took this segment in; if it was corrupt, its history is now wrong.
                self._broken = exc
            raise

    # -- pages ---------------------------------------------------------------------------------------------
    def _decode_pages(self, h: Header, name: str, meta: bytes, body: bytes, repair: bool) -> PageBatch:
        n, seq, lim = h.count, h.seq, self.limits
        r = _Reader(body)
        index = np.cumsum(r.array(n, "<u8", "offsets"), dtype=np.uint64)
        if n and int(index.max()) > lim.max_page_index:
            raise HdeDecodeError("page index beyond the limit", seq=seq)
        if n > 1 and not distinct(index):
            raise HdeDecodeError("a page occurs twice in one batch", seq=seq)
        kinds = r.take(n, "kinds")
        if n and int(kinds.max()) >= KIND_COUNT:
            raise HdeDecodeError("unknown page kind", seq=seq, kind=int(kinds.max()))
        counts = np.bincount(kinds, minlength=KIND_COUNT)
        n_literal, n_zero = int(counts[PageKind.LITERAL]), int(counts[PageKind.ZERO])
        if repair and n_literal + n_zero != n:
            raise HdeDecodeError("repair batch with references", seq=seq)
        if n_literal + n_zero == n:
            # No references (a first pass, a repair): only the literal section follows.
            literals = r.take(n_literal * PAGE_SIZE, "literal pages")
            r.finish()
            return self._finish_pages(h, name, meta, index, kinds, flat=literals, n_zero=n_zero, built=None)
        ref_slot = r.array(int(counts[PageKind.SESSION_REF]), "<u4", "session refs").astype(np.int32)
        dup_src = r.array(int(counts[PageKind.BATCH_DUP]), "<u2", "batch dups").astype(np.int64)
        n_base = int(counts[PageKind.BASE_CONTENT])
        base_fps = r.array(n_base, "<u8", "baseline fingerprints").astype(np.uint64)
        base_tags = r.take(n_base * TAG_BYTES, "baseline tags").reshape(n_base, TAG_BYTES)
        deltas = [_read_delta(r, int(counts[k])) for k in (PageKind.DELTA, PageKind.BASE_DELTA)]
        literals = r.take(n_literal * PAGE_SIZE, "literal pages")
        r.finish()

        rows = [np.flatnonzero(kinds == k) if counts[k] else _NO_ROWS for k in range(KIND_COUNT)]
        out = np.empty((n, PAGE_SIZE), dtype=np.uint8)
        if n_zero:
            out[rows[PageKind.ZERO]] = 0
        if n_literal:
            out[rows[PageKind.LITERAL]] = literals.reshape(-1, PAGE_SIZE)
        block = self._cache.find_block(name)
        slots = self._cache.lookup(block, index) if block is not None else np.full(n, -1, dtype=np.int32)
        for kind in (PageKind.UNCHANGED, PageKind.DELTA):
            sel = rows[kind]
            if sel.shape[0]:
                if np.any(slots[sel] < 0):
                    raise HdeDecodeError("delta or unchanged page without a cached version", seq=seq)
                out[sel] = self._cache.slab[slots[sel]]
        if counts[PageKind.DELTA]:
            sparse.decode_into(out, rows[PageKind.DELTA].astype(np.int64), *deltas[0])
        sel = rows[PageKind.SESSION_REF]
        if sel.shape[0]:
            if not self._cache.occupied(ref_slot).all():
                raise HdeDecodeError("reference to an empty session-cache slot", seq=seq)
            out[sel] = self._cache.slab[ref_slot]
        for kind in (PageKind.BASE_SAME_ADDR, PageKind.BASE_CONTENT, PageKind.BASE_DELTA):
            sel = rows[kind]
            if sel.shape[0] == 0:
                continue
            if self.baseline is None:
                raise HdeReferenceMissing("baseline reference but no baseline store", seq=seq)
            if kind is PageKind.BASE_CONTENT:
                out[sel] = self.baseline.content(base_fps, base_tags, seq)
            else:
                out[sel] = self.baseline.same_address(name, index[sel], seq)
        if counts[PageKind.BASE_DELTA]:
            sparse.decode_into(out, rows[PageKind.BASE_DELTA].astype(np.int64), *deltas[1])
        sel = rows[PageKind.BATCH_DUP]
        if sel.shape[0]:
            if np.any(dup_src >= sel) or np.any(kinds[dup_src] == PageKind.BATCH_DUP):
                raise HdeDecodeError("bad in-batch duplicate reference", seq=seq)
            out[sel] = out[dup_src]

        return self._finish_pages(h, name, meta, index, kinds, flat=out.reshape(-1), n_zero=n_zero, built=out)

    def _finish_pages(
        self,
        h: Header,
        name: str,
        meta: bytes,
        index: npt.NDArray[np.uint64],
        kinds: npt.NDArray[np.uint8],
        *,
        flat: npt.NDArray[np.uint8],
        n_zero: int,
        built: npt.NDArray[np.uint8] | None,
    ) -> PageBatch:
        """Check the rebuilt batch against its checksum, then (only then) update the session state.

        ``built`` is the page array the decoder assembled (None: ``flat`` holds the literal pages, and
        only the ZERO pages are missing from it).
        """
        n, seq = h.count, h.seq
        data: bytes | memoryview
        if built is None and n_zero:
            # Zero pages between literal ones: place the literals around them.
            built = np.zeros((n, PAGE_SIZE), dtype=np.uint8)
            built[kinds != PageKind.ZERO] = flat.reshape(-1, PAGE_SIZE)
        if built is None:
            # All literal, typical of a first pass: the literal section already is the batch, in order.
            pages = flat.reshape(n, PAGE_SIZE)
            data = flat.data  # a view of the decompressed body, which it keeps alive
        else:
            pages = built
            data = built.reshape(-1).data  # a fresh array per batch: handing out a view is safe
        offsets = index << np.uint64(PAGE_SHIFT)
        got = checksum([seq.to_bytes(8, "little"), name.encode(), offsets.astype("<u8").data, data, meta])
        if got != h.checksum:
            raise HdeDecodeError("batch checksum mismatch: rebuilt pages differ", seq=seq, block=name)
        # The encoder marks exactly the all-zero pages ZERO; a batch that lies about it only breaks
        # its own later batches (their checksums), never the bytes returned.
        zero = kinds == PageKind.ZERO
        self._cache.apply(self._cache.block_id(name), index, pages, zero, seq)
        self._seq += 1
        return PageBatch(name, offsets, data, meta)

    # -- opaque chunks -------------------------------------------------------------------------------------
    def _decode_chunks(self, h: Header, meta: bytes, body: bytes) -> OpaqueChunk:
        n, seq = h.count, h.seq
        r = _Reader(body)
        kinds = r.array(n, "u1", "chunk kinds")
        if n and int(kinds.max()) > max(ChunkKind):
            raise HdeDecodeError("unknown chunk kind", seq=seq)
        lengths = r.array(n, "<u4", "chunk lengths").astype(np.int64)
        if int(lengths.sum()) > self.limits.max_chunk_input or (n and int(lengths.min()) == 0):
            raise HdeDecodeError("chunk sizes out of bounds", seq=seq)
        refs = r.array(int((kinds == ChunkKind.REF).sum()), "<u8", "chunk refs").tolist()
        dups = r.array(int((kinds == ChunkKind.DUP).sum()), "<u4", "chunk dups").tolist()
        pieces: list[bytes] = []
        literals: list[bytes] = []
        ri = di = 0
        for pos, (kind, length) in enumerate(zip(kinds.tolist(), lengths.tolist(), strict=True)):
            if kind == ChunkKind.LITERAL:
                piece = r.take(length, "chunk data").tobytes()
                literals.append(piece)
            elif kind == ChunkKind.REF:
                held = self._chunks.get(int(refs[ri]))
                ri += 1
                if held is None:
                    raise HdeDecodeError("reference to a chunk not in the cache", seq=seq, chunk=refs[ri - 1])
                piece = held
            else:
                src = int(dups[di])
                di += 1
                if src >= pos:
                    raise HdeDecodeError("chunk duplicate refers forward", seq=seq)
                piece = pieces[src]
            if len(piece) != length:
                raise HdeDecodeError("chunk length mismatch", seq=seq, position=pos)
            pieces.append(piece)
        r.finish()
        data = b"".join(pieces)
        if checksum([seq.to_bytes(8, "little"), data, meta]) != h.checksum:
            raise HdeDecodeError("batch checksum mismatch: rebuilt data differ", seq=seq)
        for piece in literals:
            self._chunks.add(piece)
        self._seq += 1
        return OpaqueChunk(data, meta)
