"""QEMU-7.2-like multifd channel bytes, for tests and the data-path benchmark (no QEMU needed).

:class:`MultifdWriter` writes packets the way QEMU's send threads do: one header buffer per channel,
reused, of which each packet rewrites only the fields QEMU rewrites (see ``multifd.py``); the rest keeps
whatever earlier packets, or a test's :meth:`MultifdWriter.scribble`, left there.
:func:`qemu_like_streams` cuts a memory image into rounds of packets over several channels, with a SYNC
packet per channel at the end of every round, as QEMU's RAM iterations do.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from novacron.migration.tunnel.multifd import (
    FLAG_SYNC,
    FLAGS_AT,
    INIT_SIZE,
    MULTIFD_MAGIC,
    MULTIFD_VERSION,
    NEXT_SIZE_AT,
    NORMAL_PAGES_AT,
    OFFSETS_AT,
    PACKET_NUM_AT,
    PAGE_SIZE,
    PAGES_ALLOC_AT,
    RAMBLOCK_AT,
    RAMBLOCK_SIZE,
    header_size,
)

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


def init_message(channel_id: int, uuid: bytes = bytes(16)) -> bytes:
    msg = struct.pack(">II16sB7s32s", MULTIFD_MAGIC, MULTIFD_VERSION, uuid, channel_id, bytes(7), bytes(32))
    if len(msg) != INIT_SIZE:
        raise AssertionError("init message layout")  # pragma: no cover - constant layout
    return msg


class MultifdWriter:
    def __init__(self, channel_id: int, *, pages_alloc: int = 128, uuid: bytes = bytes(16)) -> None:
        self.channel_id = channel_id
        self.uuid = uuid
        self.pages_alloc = pages_alloc
        self.header = bytearray(header_size(pages_alloc))
        self.header[0:4] = _BE32.pack(MULTIFD_MAGIC)
        self.header[4:8] = _BE32.pack(MULTIFD_VERSION)
        self.header[PAGES_ALLOC_AT : PAGES_ALLOC_AT + 4] = _BE32.pack(pages_alloc)

    def init(self) -> bytes:
        return init_message(self.channel_id, self.uuid)

    def scribble(self, at: int, data: bytes) -> None:
        """Leave arbitrary bytes in the header buffer (stale content a later packet does not rewrite)."""
        self.header[at : at + len(data)] = data

    def packet(
        self,
        *,
        packet_num: int,
        block: str | None = None,
        offsets: Sequence[int] | npt.NDArray[np.uint64] = (),
        pages: bytes = b"",
        flags: int = 0,
    ) -> bytes:
        n = len(offsets)
        if len(pages) != n * PAGE_SIZE or n > self.pages_alloc:
            raise ValueError("pages must be len(offsets) * 4096 bytes, at most pages_alloc of them")
        h = self.header
        h[FLAGS_AT : FLAGS_AT + 4] = _BE32.pack(flags)
        h[PAGES_ALLOC_AT : PAGES_ALLOC_AT + 4] = _BE32.pack(self.pages_alloc)
        h[NORMAL_PAGES_AT : NORMAL_PAGES_AT + 4] = _BE32.pack(n)
        if n:
            h[NEXT_SIZE_AT : NEXT_SIZE_AT + 4] = _BE32.pack(n * PAGE_SIZE)
        h[PACKET_NUM_AT : PACKET_NUM_AT + 8] = _BE64.pack(packet_num)
        if block is not None and n:
            name = block.encode()[:RAMBLOCK_SIZE]
            h[RAMBLOCK_AT : RAMBLOCK_AT + RAMBLOCK_SIZE] = name.ljust(RAMBLOCK_SIZE, b"\0")  # strncpy
        if n:
            h[OFFSETS_AT : OFFSETS_AT + 8 * n] = np.asarray(offsets, dtype=">u8").tobytes()
        return bytes(h) + pages


@dataclass(frozen=True)
class SyntheticPacket:
    channel: int
    data: bytes
    sync: bool
    pages: int


def qemu_like_streams(
    memory: npt.NDArray[np.uint8],
    *,
    channels: int = 4,
    pages_per_packet: int = 128,
    round_pages: int = 4096,
    block: str = "pc.ram",
    rounds: Sequence[npt.NDArray[np.int64]] | None = None,
) -> Iterator[SyntheticPacket]:
    """Packets of every channel in the order QEMU would hand them out (round-robin), SYNCs per round.

    ``memory`` is an (n, 4096) page array. Without ``rounds`` the non-zero pages are sent once, in
    address order, ``round_pages`` per round (QEMU syncs every ~50 ms of sending); with ``rounds``,
    each entry is the page numbers sent in that round (zero pages are skipped: QEMU 7.2 sends those on
    the main channel).
    """
    if rounds is None:
        nz = np.flatnonzero(memory.reshape(-1, PAGE_SIZE).view(np.uint64).any(axis=1))
        rounds = [nz[i : i + round_pages] for i in range(0, nz.shape[0], round_pages)] or [nz]
    return qemu_like_passes(
        [(memory, r) for r in rounds], channels=channels, pages_per_packet=pages_per_packet, block=block
    )


def qemu_like_passes(
    rounds: Sequence[tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]],
    *,
    channels: int = 4,
    pages_per_packet: int = 128,
    block: str = "pc.ram",
) -> Iterator[SyntheticPacket]:
    """One migration's channel streams: each round is (memory at that time, page numbers sent)."""
    writers = [MultifdWriter(c, pages_alloc=pages_per_packet) for c in range(channels)]
    for c, w in enumerate(writers):
        yield SyntheticPacket(c, w.init(), False, 0)
    num = 0
    turn = 0
    for memory, pages in rounds:
        nonzero = pages[memory[pages].view(np.uint64).any(axis=1)] if pages.shape[0] else pages
        for i in range(0, nonzero.shape[0], pages_per_packet):
            sel = nonzero[i : i + pages_per_packet]
            w = writers[turn % channels]
            turn += 1
            data = w.packet(
                packet_num=num,
                block=block,
                offsets=sel.astype(np.uint64) * np.uint64(PAGE_SIZE),
                pages=memory[sel].tobytes(),
            )
            num += 1
            yield SyntheticPacket(w.channel_id, data, False, int(sel.shape[0]))
        for w in writers:
            yield SyntheticPacket(w.channel_id, w.packet(packet_num=num, flags=FLAG_SYNC), True, 0)
            num += 1
