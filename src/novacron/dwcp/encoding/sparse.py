"""Sparse page deltas: the runs of bytes that changed since the version in the session cache.

Like QEMU's XBZRLE (alternating unchanged/changed run lengths, then the new bytes), but computed for a
whole batch at once with numpy and with fixed-width 16-bit run headers that the batch codec compresses
afterwards. Zero gaps shorter than ``merge_gap`` inside a changed region are sent as data, because a run
header costs 4 bytes.

Wire form of the delta section for k pages: ``counts`` (k x u16, runs per page), ``runs``
(sum(counts) x (u16 gap, u16 length); gap counts unchanged bytes since the previous run's end, or since
the page start for a page's first run) and ``data`` (the new bytes of every run, in order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from novacron.dwcp.encoding.errors import HdeDecodeError
from novacron.dwcp.encoding.limits import PAGE_SIZE

_ROW = PAGE_SIZE + 2  # one False before and after every page, so runs never cross pages


@dataclass(frozen=True)
class SparseDelta:
    cost: npt.NDArray[np.int64]  # encoded bytes per page (headers + data)
    page: npt.NDArray[np.int64]  # page row of every run
    start: npt.NDArray[np.int64]
    length: npt.NDArray[np.int64]


def analyse(new: npt.NDArray[np.uint8], base: npt.NDArray[np.uint8], merge_gap: int) -> SparseDelta:
    """Find the changed runs of every row of ``new`` against ``base`` (both (k, 4096) uint8)."""
    k = new.shape[0]
    padded = np.zeros((k, _ROW), dtype=np.int8)
    np.not_equal(new, base, out=padded[:, 1:-1].view(bool))
    edges = np.diff(padded.ravel())
    begin = np.flatnonzero(edges == 1) + 1
    end = np.flatnonzero(edges == -1) + 1
    page = begin // _ROW
    start = begin - page * _ROW - 1
    stop = end - page * _ROW - 1
    if merge_gap > 0 and page.shape[0] > 1:
        merge = (page[1:] == page[:-1]) & (start[1:] - stop[:-1] < merge_gap)
        if merge.any():
            first = np.concatenate(([True], ~merge))
            last = np.concatenate((~merge, [True]))
            page, start, stop = page[first], start[first], stop[last]
    length = stop - start
    cost = np.bincount(page, weights=length + 4, minlength=k).astype(np.int64) + 2
    return SparseDelta(cost=cost, page=page, start=start, length=length)


def encode(
    new: npt.NDArray[np.uint8], delta: SparseDelta, rows: npt.NDArray[np.int64]
) -> tuple[bytes, bytes, bytes]:
    """Serialise the runs of the rows ``rows`` (ascending) of ``new``: (counts, runs, data)."""
    k = new.shape[0]
    chosen = np.zeros(k, dtype=bool)
    chosen[rows] = True
    sel = chosen[delta.page]
    page, start, length = delta.page[sel], delta.start[sel], delta.length[sel]
    counts = np.bincount(page, minlength=k)[rows].astype("<u2")
    prev_stop = np.empty_like(start)
    if start.shape[0]:
        prev_stop[0] = 0
        prev_stop[1:] = start[:-1] + length[:-1]
        prev_stop[np.concatenate(([True], page[1:] != page[:-1]))] = 0
    runs = np.empty((start.shape[0], 2), dtype="<u2")
    runs[:, 0] = start - prev_stop
    runs[:, 1] = length
    src = page * PAGE_SIZE + start
    data = new.reshape(-1)[_gather_index(src, length)]
    return counts.tobytes(), runs.tobytes(), data.tobytes()


def decode_into(
    out: npt.NDArray[np.uint8],
    rows: npt.NDArray[np.int64],
    counts: npt.NDArray[np.uint16],
    runs: npt.NDArray[np.uint16],
    data: npt.NDArray[np.uint8],
) -> None:
    """Write the runs into ``out[rows]`` (which already hold the base pages). Validates every bound."""
    total_runs = int(counts.sum(dtype=np.int64))
    if runs.shape[0] != total_runs:
        raise HdeDecodeError("delta run table has the wrong length", runs=runs.shape[0], expected=total_runs)
    if total_runs == 0:
        if data.shape[0]:
            raise HdeDecodeError("delta data without runs", size=data.shape[0])
        return
    gap = runs[:, 0].astype(np.int64)
    length = runs[:, 1].astype(np.int64)
    if np.any(length == 0):
        raise HdeDecodeError("empty delta run")
    step = gap + length
    csum = np.cumsum(step)
    counts64 = counts.astype(np.int64)
    first = np.cumsum(counts64) - counts64  # index of each page's first run
    has = counts64 > 0
    page_base = np.repeat((csum[first[has]] - step[first[has]]), counts64[has])
    stop = csum - page_base
    if np.any(stop > PAGE_SIZE):
        raise HdeDecodeError("delta run beyond the end of a page")
    if int(length.sum()) != data.shape[0]:
        raise HdeDecodeError("delta data size does not match its runs", size=data.shape[0])
    start = stop - length
    run_row = np.repeat(rows[has], counts64[has])
    dst = run_row * PAGE_SIZE + start
    out.reshape(-1)[_gather_index(dst, length)] = data


def _gather_index(begin: npt.NDArray[np.int64], length: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Concatenated ranges [begin[i], begin[i] + length[i]) as one index array, without a Python loop."""
    total = int(length.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offs = np.cumsum(length) - length
    return np.repeat(begin - offs, length) + np.arange(total, dtype=np.int64)
