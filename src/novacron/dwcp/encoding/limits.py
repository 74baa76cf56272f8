"""Every bound HDE keeps, with its default, in one frozen dataclass.

Encoder and decoder of one session must be built with equal limits: the session caches are mirrored and
evict by the same rule, so a difference in capacity would make a reference point at evicted content.
The handshake carries the cache sizes for that reason (``docs/hde.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

from novacron.dwcp.encoding.errors import HdeConfigError

PAGE_SIZE = 4096
PAGE_SHIFT = 12
MiB = 1 << 20


@dataclass(frozen=True)
class HdeLimits:
    # One page batch: QEMU 7.2's multifd packets hold 128 pages; 1024 leaves room for larger packets.
    max_pages_per_batch: int = 1024
    # RAM block names are at most 256 bytes in QEMU's multifd header.
    max_block_name: int = 256
    # Opaque per-batch metadata carried verbatim (e.g. a multifd packet header with its offset table).
    max_meta_bytes: int = 64 * 1024
    # Largest page index accepted (offset / 4096): 2**32 pages = 16 TiB per RAM block.
    max_page_index: int = (1 << 32) - 1
    # One opaque chunk call (encode_chunk input); QEMU's main-channel reads are far smaller.
    max_chunk_input: int = 16 * MiB
    # Content-defined chunking sizes for opaque data.
    cdc_min: int = 2048
    cdc_avg: int = 8192
    cdc_max: int = 65536
    # Mirrored session state: pages last sent per address (delta bases) and opaque chunks.
    session_cache_bytes: int = 512 * MiB
    chunk_cache_bytes: int = 64 * MiB
    # A sparse delta is used only while it is at most this fraction of a page (else the literal).
    delta_max_fraction: float = 0.75
    # Unchanged gaps shorter than this inside a changed region are sent as data: a run header costs 4
    # bytes, and a copy kept whole lets the batch codec match it against its window in one piece
    # (dirty passes of the test guest: 16 % to 26 % fewer bytes than with 4; docs/hde.md).
    delta_merge_gap: int = 16
    # zstd frames and streams may not ask the decoder for a larger window than this (memory per stream).
    max_zstd_window: int = 128 * MiB
    # Streamed zstd (one stream per level per session): window and long-distance matching. 128 MiB
    # rather than 8: guest memory repeats itself far apart (page cache vs. heap copies); measured on the
    # default guest's first pass, 2 % fewer bytes at every level for the same speed (docs/hde.md).
    # LDM applies to the levels codecs.STREAM_TUNING leaves it to (level 1 runs without: speed).
    zstd_window_log: int = 27
    zstd_ldm: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.max_pages_per_batch <= 65535:
            raise HdeConfigError("max_pages_per_batch must be in 1..65535", value=self.max_pages_per_batch)
        if self.session_pages < 2 * self.max_pages_per_batch:
            raise HdeConfigError(
                "session cache must hold at least two batches",
                session_cache_bytes=self.session_cache_bytes,
                max_pages_per_batch=self.max_pages_per_batch,
            )
        if not PAGE_SIZE <= self.max_chunk_input <= 256 * MiB:
            raise HdeConfigError("max_chunk_input must be in 4 KiB..256 MiB", value=self.max_chunk_input)
        if not 64 <= self.cdc_min < self.cdc_avg < self.cdc_max <= 1 << 24:
            raise HdeConfigError(
                "CDC sizes must satisfy 64 <= min < avg < max <= 16 MiB",
                cdc_min=self.cdc_min,
                cdc_avg=self.cdc_avg,
                cdc_max=self.cdc_max,
            )
        if self.chunk_cache_bytes < 2 * self.cdc_max:
            raise HdeConfigError("chunk cache must hold at least two maximal chunks")
        if not 0.0 < self.delta_max_fraction <= 1.0:
            raise HdeConfigError("delta_max_fraction must be in (0, 1]", value=self.delta_max_fraction)
        if not 0 <= self.delta_merge_gap <= 64:
            raise HdeConfigError("delta_merge_gap must be in 0..64", value=self.delta_merge_gap)
        if not self.zstd_window_log >= 10 or (1 << self.zstd_window_log) > self.max_zstd_window:
            raise HdeConfigError("zstd_window_log must be >= 10 and fit max_zstd_window")
        if self.max_meta_bytes > 1 << 24 or self.max_block_name > 1 << 12:
            raise HdeConfigError("meta or block-name limit too large for the header fields")

    @property
    def session_pages(self) -> int:
        return self.session_cache_bytes // PAGE_SIZE

    @property
    def max_body_bytes(self) -> int:
        """Largest uncompressed batch body; the decoder refuses to inflate anything larger."""
        page_body = self.max_pages_per_batch * (PAGE_SIZE + 8 + 1 + 24 + 2)
        chunk_body = self.max_chunk_input + (self.max_chunk_input // self.cdc_min + 1) * 13
        return max(page_body, chunk_body)
