"""The sending half of HDE: page batches and opaque chunks in, self-checking batches out (sans-IO).

For every page the encoder picks the cheapest representation it can *prove* the decoder will rebuild,
trying them in order of cost (``docs/hde.md``, "Page kinds"): zero; unchanged since last sent; a copy of
an earlier page in this batch; the receiver's baseline copy at this address; a page in the session cache
with the same bytes; baseline content with the same keyed tag; a sparse delta against the last version
sent; else the literal page. The batch body is then compressed with the codec the cost model picks.

State shared with the decoder (session cache, chunk cache, sequence number) changes only through the
batch's *content*, in the same order on both sides; see :mod:`.session_cache`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from novacron.dwcp.encoding import sparse
from novacron.dwcp.encoding.baseline import BaselineSession
from novacron.dwcp.encoding.batch import PageBatch, validate_page_batch
from novacron.dwcp.encoding.chunk_cache import ChunkCache, cut
from novacron.dwcp.encoding.codecs import LZ4, NONE, STREAM_TUNING, CodecBank
from novacron.dwcp.encoding.content_index import ContentIndex
from novacron.dwcp.encoding.cost_model import CodecChoice, CodecSelector, CostModelConfig
from novacron.dwcp.encoding.errors import HdeInputError
from novacron.dwcp.encoding.hashing import PageHasher, checksum
from novacron.dwcp.encoding.limits import PAGE_SIZE, HdeLimits
from novacron.dwcp.encoding.session_cache import CacheArena, SessionPageCache
from novacron.dwcp.encoding.summary import BaselineView
from novacron.dwcp.encoding.wire import FLAG_REPAIR, BatchKind, ChunkKind, Header, PageKind

KIND_COUNT = len(PageKind)
Part = bytes | memoryview


@dataclass
class EncoderStats:
    batches: int = 0
    input_bytes: int = 0
    wire_bytes: int = 0
    seconds: float = 0.0
    pages_by_kind: list[int] = field(default_factory=lambda: [0] * KIND_COUNT)
    chunks_literal: int = 0
    chunks_ref: int = 0
    repairs: int = 0
    baseline_batches: int = 0  # batches that referenced baseline content (keep their input until acked)


def _has_repeats(values: npt.NDArray[np.uint64]) -> bool:
    """Whether any value occurs twice (one sort: most batches have none, and np.unique costs more)."""
    ordered = np.sort(values)
    return bool((ordered[1:] == ordered[:-1]).any())


def _seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "little")


class HdeEncoder:
    def __init__(
        self,
        hasher: PageHasher,
        limits: HdeLimits | None = None,
        *,
        baseline: BaselineView | None = None,
        cost: CostModelConfig | None = None,
        on_choice: Callable[[CodecChoice], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        arena: CacheArena | None = None,
        peer_copy: BaselineSession | None = None,
    ) -> None:
        self.limits = limits or HdeLimits()
        self.hasher = hasher
        self.baseline = baseline
        # The sender's own store holding the same copy as the receiver (the VM came from there):
        # lets a changed page go as a delta against the receiver's copy.
        self.peer_copy = peer_copy
        self.selector = CodecSelector(cost or CostModelConfig(), on_choice)
        self.stats = EncoderStats()
        self.last_used_baseline = False
        self._clock = clock
        self._bank = CodecBank(
            self.limits.max_zstd_window,
            self.limits.zstd_window_log,
            self.limits.zstd_ldm,
            tuning=STREAM_TUNING,
            contexts=arena.zstd if arena is not None else None,
        )
        self._cache = SessionPageCache(self.limits.session_pages, arena)
        self._index = ContentIndex(self._cache)
        self._chunks = ChunkCache(self.limits.chunk_cache_bytes, with_index=True)
        self._seq = 0

    @property
    def next_seq(self) -> int:
        return self._seq

    def set_bandwidth(self, bytes_per_s: float) -> None:
        """The transport's current estimate of deliverable bytes per second (drives the codec choice)."""
        self.selector.set_bandwidth(bytes_per_s)

    def close(self) -> None:
        """Release the cache arena (if one was given) for the next session."""
        self._cache.close()

    def session_pages(self, max_pages: int = 1024) -> Iterator[PageBatch]:
        """The last version sent of every page the session cache holds, as batches (for the baseline)."""
        for block, index, pages in self._cache.snapshot(max_pages):
            yield PageBatch(block, index * np.uint64(PAGE_SIZE), pages.tobytes())

    def forget_baseline(self) -> None:
        """Stop referring to the receiver's baseline (after it reported a missing reference)."""
        self.baseline = None

    # -- pages -------------------------------------------------------------------------------------------
    def encode(self, batch: PageBatch) -> bytes:
        t0 = self._clock()
        index = validate_page_batch(batch, self.limits)
        seq = self._seq
        pages = batch.pages()
        p64 = pages.view(np.uint64)
        n = batch.count
        zero = np.logical_not(p64.any(axis=1))
        nz_rows = np.flatnonzero(~zero)
        # Hash every row in place (a zero page costs less to hash than gathering the others would).
        fps = self.hasher.fingerprints(pages) if nz_rows.shape[0] else np.zeros(n, dtype=np.uint64)
        block = self._cache.block_id(batch.block)
        slots = self._cache.lookup(block, index)
        plan = self._plan(block_name=batch.block, index=index, pages=pages, zero=zero, fps=fps, slots=slots)
        body = self._page_body(index, pages, plan)
        out = self._finish(
            kind=BatchKind.PAGES, flags=0, seq=seq, count=n, body=body, batch=batch, index=index
        )
        after = self._cache.apply(block, index, pages, zero, seq)
        self._index.insert(fps[nz_rows], after[nz_rows])
        self._seq += 1
        kinds = plan.kinds
        counts = np.bincount(kinds, minlength=KIND_COUNT)
        for k in range(KIND_COUNT):
            self.stats.pages_by_kind[k] += int(counts[k])
        self.last_used_baseline = bool(
            counts[PageKind.BASE_SAME_ADDR] or counts[PageKind.BASE_CONTENT] or counts[PageKind.BASE_DELTA]
        )
        self.stats.baseline_batches += int(self.last_used_baseline)
        self.stats.seconds += self._clock() - t0
        return out

    def encode_repair(self, batch: PageBatch, seq: int) -> bytes:
        """Re-encode an already encoded batch ``seq`` with zero and literal pages only.

        For a batch the decoder refused with :class:`HdeReferenceMissing`. Needs no state (the caches
        already hold this batch's pages) and changes none.
        """
        index = validate_page_batch(batch, self.limits)
        if not 0 <= seq < self._seq:
            raise HdeInputError("repair of a batch that was never encoded", seq=seq, next_seq=self._seq)
        pages = batch.pages()
        zero = ~pages.view(np.uint64).any(axis=1)
        kinds = np.where(zero, PageKind.ZERO, PageKind.LITERAL).astype(np.uint8)
        plan = _Plan(kinds=kinds)
        body = self._page_body(index, pages, plan)
        out = self._finish(
            kind=BatchKind.PAGES,
            flags=FLAG_REPAIR,
            seq=seq,
            count=batch.count,
            body=body,
            batch=batch,
            index=index,
        )
        self.stats.repairs += 1
        return out

    def _plan(
        self,
        *,
        block_name: str,
        index: npt.NDArray[np.uint64],
        pages: npt.NDArray[np.uint8],
        zero: npt.NDArray[np.bool_],
        fps: npt.NDArray[np.uint64],
        slots: npt.NDArray[np.int32],
    ) -> _Plan:
        n = index.shape[0]
        p64 = pages.view(np.uint64)
        plan = _Plan(kinds=np.where(zero, PageKind.ZERO, PageKind.LITERAL).astype(np.uint8))
        kinds = plan.kinds
        pending = ~zero
        slab64 = self._cache.slab64

        rows = np.flatnonzero(pending & (slots >= 0))
        if rows.shape[0]:
            same = (slab64[slots[rows]] == p64[rows]).all(axis=1)
            kinds[rows[same]] = PageKind.UNCHANGED
            pending[rows[same]] = False

        rows = np.flatnonzero(pending)
        if rows.shape[0] > 1 and _has_repeats(fps[rows]):
            _, first, inverse = np.unique(fps[rows], return_index=True, return_inverse=True)
            src = rows[first][inverse.ravel()]
            dup = src != rows
            d, s = rows[dup], src[dup]
            eq = (p64[d] == p64[s]).all(axis=1)
            plan.dup_src = np.zeros(n, dtype=np.int64)
            plan.dup_src[d[eq]] = s[eq]
            kinds[d[eq]] = PageKind.BATCH_DUP
            pending[d[eq]] = False

        view = self.baseline
        # Changed rows whose copy the receiver and this side both hold, and that copy's pages.
        copy_rows = np.zeros(0, dtype=np.int64)
        copy_base = np.zeros((0, PAGE_SIZE), dtype=np.uint8)
        if view is not None:
            rows = np.flatnonzero(pending)
            has, their = view.copy_tags(block_name, index[rows])
            if has.any():
                r = rows[has]
                eq, held, mine = self._same_as_their_copy(block_name, index[r], pages[r], their)
                kinds[r[eq]] = PageKind.BASE_SAME_ADDR
                pending[r[eq]] = False
                changed = ~eq[held]
                copy_rows, copy_base = r[held[changed]], mine[changed]

        rows = np.flatnonzero(pending)
        if rows.shape[0]:
            found = self._index.find(fps[rows], pages, rows)
            hit = found >= 0
            plan.ref_slot = np.zeros(n, dtype=np.int64)
            plan.ref_slot[rows[hit]] = found[hit]
            kinds[rows[hit]] = PageKind.SESSION_REF
            pending[rows[hit]] = False

        if view is not None:
            rows = np.flatnonzero(pending)
            hit = view.has_content(fps[rows])
            if hit.any():
                r = rows[hit]
                plan.base_tags = np.zeros((n, 16), dtype=np.uint8)
                plan.base_tags[r] = self.hasher.tags(pages[r])
                kinds[r] = PageKind.BASE_CONTENT
                pending[r] = False

        rows = np.flatnonzero(pending & (slots >= 0))
        if rows.shape[0]:
            base = self._cache.slab[slots[rows]]
            analysis = sparse.analyse(pages[rows], base, self.limits.delta_merge_gap)
            ok = analysis.cost <= self.limits.delta_max_fraction * PAGE_SIZE
            if ok.any():
                plan.delta = sparse.encode(pages[rows], analysis, np.flatnonzero(ok))
                kinds[rows[ok]] = PageKind.DELTA
        if copy_rows.shape[0]:
            self._plan_base_delta(
                plan, pages=pages, pending=pending, slots=slots, copy_rows=copy_rows, copy_base=copy_base
            )
        plan.fps = fps
        return plan

    def _same_as_their_copy(
        self,
        block_name: str,
        index: npt.NDArray[np.uint64],
        pages: npt.NDArray[np.uint8],
        their: npt.NDArray[np.uint8],
    ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
        """(eq, held, mine): whether each page equals the receiver's copy at its address (``their``
        tags); the rows where this side holds that very copy (its stored tag equals theirs), and
        those pages of it (the base for a delta where the page changed).

        Where this side holds the copy, comparing the bytes with it is exact and ~10x cheaper than
        the page's keyed tag (BLAKE3, 3-6 us a page: most of a back-migration's encoding); elsewhere
        the tag decides.
        """
        n = index.shape[0]
        eq = np.zeros(n, dtype=bool)
        held = np.zeros(0, dtype=np.int64)
        mine = np.zeros((0, PAGE_SIZE), dtype=np.uint8)
        if self.peer_copy is not None:
            has, copy, my_tags = self.peer_copy.copy_pages(block_name, index)
            rows = np.flatnonzero(has)
            same_copy = (my_tags == their[rows]).all(axis=1)
            held, mine = rows[same_copy], copy[same_copy]
            eq[held] = (pages[held].view(np.uint64) == mine.view(np.uint64)).all(axis=1)
        by_tag = np.ones(n, dtype=bool)
        by_tag[held] = False
        rows = np.flatnonzero(by_tag)
        if rows.shape[0]:
            eq[rows] = (self.hasher.tags(pages[rows]) == their[rows]).all(axis=1)
        return eq, held, mine

    def _plan_base_delta(
        self,
        plan: _Plan,
        *,
        pages: npt.NDArray[np.uint8],
        pending: npt.NDArray[np.bool_],
        slots: npt.NDArray[np.int32],
        copy_rows: npt.NDArray[np.int64],
        copy_base: npt.NDArray[np.uint8],
    ) -> None:
        """Delta against the receiver's copy, where this side holds the very same copy (``copy_base``,
        read once by :meth:`_same_as_their_copy`)."""
        still = pending[copy_rows] & (slots[copy_rows] < 0) & (plan.kinds[copy_rows] == PageKind.LITERAL)
        rows, base = copy_rows[still], copy_base[still]
        if rows.shape[0] == 0:
            return
        analysis = sparse.analyse(pages[rows], base, self.limits.delta_merge_gap)
        ok = analysis.cost <= self.limits.delta_max_fraction * PAGE_SIZE
        if ok.any():
            plan.base_delta = sparse.encode(pages[rows], analysis, np.flatnonzero(ok))
            plan.kinds[rows[ok]] = PageKind.BASE_DELTA

    def _page_body(
        self, index: npt.NDArray[np.uint64], pages: npt.NDArray[np.uint8], plan: _Plan
    ) -> list[Part]:
        """The body as parts (not joined: a stream codec takes them one by one, saving a copy)."""
        kinds = plan.kinds
        idx_delta = index.astype("<u8")  # a copy, made differences in place
        idx_delta[1:] -= index[:-1]
        parts: list[Part] = [idx_delta.tobytes(), kinds.tobytes()]
        is_kind = [kinds == k for k in range(KIND_COUNT)]
        if plan.ref_slot is not None:
            parts.append(plan.ref_slot[is_kind[PageKind.SESSION_REF]].astype("<u4").tobytes())
        if plan.dup_src is not None:
            parts.append(plan.dup_src[is_kind[PageKind.BATCH_DUP]].astype("<u2").tobytes())
        if plan.base_tags is not None and plan.fps is not None:
            sel = is_kind[PageKind.BASE_CONTENT]
            parts.append(plan.fps[sel].astype("<u8").tobytes())
            parts.append(plan.base_tags[sel].tobytes())
        if plan.delta is not None:
            parts.extend(plan.delta)
        if plan.base_delta is not None:
            parts.extend(plan.base_delta)
        literal = is_kind[PageKind.LITERAL]
        lit = pages if literal.all() else pages[literal]
        parts.append(np.ascontiguousarray(lit).reshape(-1).data)
        return parts

    # -- opaque chunks -------------------------------------------------------------------------------------
    def encode_chunk(self, data: bytes, meta: bytes = b"") -> bytes:
        t0 = self._clock()
        if len(data) > self.limits.max_chunk_input:
            raise HdeInputError("opaque data too large", size=len(data), limit=self.limits.max_chunk_input)
        if len(meta) > self.limits.max_meta_bytes:
            raise HdeInputError("meta too large", size=len(meta), limit=self.limits.max_meta_bytes)
        seq = self._seq
        pieces = cut(data, self.limits)
        kinds = bytearray()
        lengths: list[int] = []
        refs: list[int] = []
        dups: list[int] = []
        literals: list[memoryview] = []
        seen: dict[bytes, int] = {}
        for pos, piece in enumerate(pieces):
            key = bytes(piece)
            lengths.append(len(piece))
            earlier = seen.get(key)
            if earlier is not None:
                kinds.append(ChunkKind.DUP)
                dups.append(earlier)
                continue
            seen[key] = pos
            cid = self._chunks.find(piece)
            if cid is not None:
                kinds.append(ChunkKind.REF)
                refs.append(cid)
            else:
                kinds.append(ChunkKind.LITERAL)
                literals.append(piece)
        body = b"".join(
            [
                bytes(kinds),
                np.asarray(lengths, dtype="<u4").tobytes(),
                np.asarray(refs, dtype="<u8").tobytes(),
                np.asarray(dups, dtype="<u4").tobytes(),
                *literals,
            ]
        )
        out = self._finish(
            kind=BatchKind.CHUNKS,
            flags=0,
            seq=seq,
            count=len(pieces),
            body=[body],
            batch=None,
            index=None,
            data=data,
            meta=meta,
        )
        for piece in literals:
            self._chunks.add(bytes(piece))
        self._seq += 1
        self.stats.chunks_literal += len(literals)
        self.stats.chunks_ref += len(refs) + len(dups)
        self.stats.seconds += self._clock() - t0
        return out

    # -- shared tail -----------------------------------------------------------------------------------------
    def _finish(
        self,
        *,
        kind: BatchKind,
        flags: int,
        seq: int,
        count: int,
        body: list[Part],
        batch: PageBatch | None,
        index: npt.NDArray[np.uint64] | None,
        data: bytes = b"",
        meta: bytes = b"",
    ) -> bytes:
        if batch is not None and index is not None:
            name = batch.block.encode()
            meta = batch.meta
            csum = checksum(
                [
                    _seq_bytes(seq),
                    name,
                    (index * np.uint64(PAGE_SIZE)).astype("<u8").tobytes(),
                    batch.data,
                    meta,
                ]
            )
            input_len = len(batch.data)
        else:
            name = b""
            csum = checksum([_seq_bytes(seq), data, meta])
            input_len = len(data)
        raw_len = sum(len(p) for p in body)
        probe = self._probe(body, raw_len)
        codec, p_wire, p_secs, explored = self.selector.choose(raw_len, probe)
        if flags & FLAG_REPAIR:
            codec = codec.unstreamed()  # the streams have moved on past this batch on the sender
        c0 = self._clock()
        wire = self._bank.compress(codec, body)
        secs = self._clock() - c0
        self.selector.record(
            seq=seq,
            codec=codec,
            raw_len=raw_len,
            wire_len=len(wire),
            seconds=secs,
            probe_ratio=probe,
            predicted=(p_wire, p_secs),
            explored=explored,
        )
        if len(wire) >= raw_len and codec != NONE and not codec.streamed:
            codec, wire = NONE, b"".join(body)  # incompressible after all: store it (a stream gets its bytes)
        header = Header(kind, flags, seq, count, raw_len, len(wire), codec, len(name), len(meta), csum)
        out = b"".join([header.pack(), name, meta, wire])
        self.stats.batches += 1
        self.stats.input_bytes += input_len
        self.stats.wire_bytes += len(out)
        return out

    def _probe(self, body: list[Part], raw_len: int) -> float:
        """LZ4 ratio of a strided sample of the body (the cost model's compressibility input).

        Sampled from the largest part (the literal pages, when there are any), else from the whole.
        """
        cfg = self.selector.config
        want = cfg.sample_pages * PAGE_SIZE
        if raw_len < cfg.min_compress_bytes:
            return 1.0
        largest = max(body, key=len)
        if len(largest) <= want:
            sample = b"".join(body)[: 4 * want]
        else:
            step = len(largest) // cfg.sample_pages
            mv = memoryview(largest)
            sample = b"".join(mv[i * step : i * step + PAGE_SIZE] for i in range(cfg.sample_pages))
        return len(sample) / max(1, len(self._bank.compress(LZ4, [sample])))


@dataclass
class _Plan:
    kinds: npt.NDArray[np.uint8]
    fps: npt.NDArray[np.uint64] | None = None
    ref_slot: npt.NDArray[np.int64] | None = None
    dup_src: npt.NDArray[np.int64] | None = None
    base_tags: npt.NDArray[np.uint8] | None = None
    delta: tuple[bytes, bytes, bytes] | None = None
    base_delta: tuple[bytes, bytes, bytes] | None = None
