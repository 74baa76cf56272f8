"""Block codecs a batch body can be sent with, and their bounded decoders.

Every batch body is one independent frame: the decoder knows the exact uncompressed size from the batch
header and refuses a frame that declares or produces anything else *before* allocating its output, so a
hostile peer cannot make it inflate more than ``HdeLimits.max_body_bytes``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import lz4.block
import zstandard

from novacron.dwcp.encoding.errors import HdeDecodeError


class CodecId(enum.IntEnum):
    NONE = 0
    LZ4 = 1
    ZSTD = 2


@dataclass(frozen=True, order=True)
class Codec:
    """One codec setting the cost model can pick: an id and (for zstd) a level."""

    id: CodecId
    level: int = 0

    @property
    def name(self) -> str:
        if self.id is CodecId.ZSTD:
            return f"zstd-{self.level}"
        return self.id.name.lower()


NONE = Codec(CodecId.NONE)
LZ4 = Codec(CodecId.LZ4)


def zstd(level: int) -> Codec:
    return Codec(CodecId.ZSTD, level)


ZSTD_LEVELS = range(-7, 20)


class CodecBank:
    """Reusable compression and decompression contexts (creating a zstd context per call costs more
    than compressing a small batch). One bank per encoder or decoder; not thread-safe."""

    def __init__(self, max_zstd_window: int) -> None:
        self._compressors: dict[int, zstandard.ZstdCompressor] = {}
        self._dctx = zstandard.ZstdDecompressor(max_window_size=max_zstd_window)

    def compress(self, codec: Codec, data: bytes | memoryview) -> bytes:
        if codec.id is CodecId.NONE:
            return bytes(data)
        if codec.id is CodecId.LZ4:
            return bytes(lz4.block.compress(data, store_size=False))
        cctx = self._compressors.get(codec.level)
        if cctx is None:
            cctx = zstandard.ZstdCompressor(level=codec.level, write_checksum=False)
            self._compressors[codec.level] = cctx
        return bytes(cctx.compress(data))

    def decompress(self, codec: Codec, payload: bytes | memoryview, raw_len: int) -> bytes:
        """Inflate to exactly ``raw_len`` bytes or raise :class:`HdeDecodeError`."""
        if codec.id is CodecId.NONE:
            if len(payload) != raw_len:
                raise HdeDecodeError("stored body has the wrong size", size=len(payload), expected=raw_len)
            return bytes(payload)
        try:
            if codec.id is CodecId.LZ4:
                out = lz4.block.decompress(payload, uncompressed_size=raw_len)
            else:
                declared = zstandard.frame_content_size(payload)
                if declared != raw_len:
                    raise HdeDecodeError(
                        "zstd frame declares the wrong size", declared=declared, expected=raw_len
                    )
                out = self._dctx.decompress(payload, max_output_size=raw_len)
        except HdeDecodeError:
            raise
        except (lz4.block.LZ4BlockError, zstandard.ZstdError) as exc:
            raise HdeDecodeError("corrupt compressed body", codec=codec.name, detail=str(exc)) from exc
        if len(out) != raw_len:
            raise HdeDecodeError("body inflated to the wrong size", size=len(out), expected=raw_len)
        return bytes(out)
