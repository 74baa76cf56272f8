"""Block codecs a batch body can be sent with, and their bounded decoders.

Two kinds of zstd: ``ZSTD`` bodies are independent frames; ``ZSTD_STREAM`` bodies are the next blocks
of one endless zstd stream per level, kept by both sides for the whole session (a window of
``2**zstd_window_log`` bytes with long-distance matching), so content repeated megabytes apart in
guest memory still compresses, as in QEMU's streaming multifd-zstd, but with a larger window.

Bounds: the decoder knows the exact uncompressed size from the batch header. A frame must declare that
size (checked before inflating, since python-zstandard ignores ``max_output_size`` when a frame
declares one); LZ4 inflates into a buffer of that size; a stream segment's block headers are walked
first and the most it could inflate to must stay within ``2 * size + 1 MiB``. A stream segment that
fails to decode leaves the stream out of step with the encoder's: the decoder then refuses every later
batch (:class:`HdeStreamBroken`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import lz4.block
import zstandard

from novacron.dwcp.encoding.errors import HdeDecodeError, HdeStreamBroken

_BLOCK_MAX = 128 * 1024  # zstd's largest block
_ZSTD_MAGIC = 0xFD2FB528


class CodecId(enum.IntEnum):
    NONE = 0
    LZ4 = 1
    ZSTD = 2
    ZSTD_STREAM = 3


@dataclass(frozen=True, order=True)
class Codec:
    """One codec setting the cost model can pick: an id and (for zstd) a level."""

    id: CodecId
    level: int = 0

    @property
    def name(self) -> str:
        if self.id is CodecId.ZSTD:
            return f"zstd-{self.level}"
        if self.id is CodecId.ZSTD_STREAM:
            return f"zstd-{self.level}s"
        return self.id.name.lower()

    @property
    def streamed(self) -> bool:
        return self.id is CodecId.ZSTD_STREAM

    def unstreamed(self) -> Codec:
        """The same compression as an independent frame (for batches that must not touch a stream)."""
        return Codec(CodecId.ZSTD, self.level) if self.streamed else self


NONE = Codec(CodecId.NONE)
LZ4 = Codec(CodecId.LZ4)


def zstd(level: int) -> Codec:
    return Codec(CodecId.ZSTD, level)


def zstd_stream(level: int) -> Codec:
    return Codec(CodecId.ZSTD_STREAM, level)


ZSTD_LEVELS = range(-7, 20)

# Streamed level 1 is the fast path (links of 1 Gbit/s and more), so it trades LDM for speed: LDM's
# rolling hash over every input byte cost ~30 % of level 1's speed on guest memory, while a 64 Ki-entry
# hash table (256 KiB: fits a core's L2 on this project's VMs, where 2**17 entries did not) and
# 5-byte matches over the same 128 MiB window find most of what LDM found. Measured on the default
# guest's first pass, one core (docs/hde.md, "Window size"): 3.47 at 289 MB/s against 3.46 at 210 with
# LDM and 2.86 at 293 with zstd's own level-1 settings. Higher levels keep LDM (slow links: ratio first).
# (HDE's encoder passes this as ``CodecBank(tuning=...)``; other users keep zstd's own settings.)
STREAM_TUNING: dict[int, dict[str, int]] = {1: {"hash_log": 16, "min_match": 5, "enable_ldm": 0}}
# Output chunk of a stream decompressor: one chunk holds a typical batch body, so no join afterwards.
_STREAM_WRITE_SIZE = 1 << 20


class ZstdContexts:
    """zstd compressors and decompressors kept from one session to the next (held by a cache arena).

    A stream's 128 MiB window is fresh memory in a new context, and first writes to fresh memory run
    at ~400 MB/s on this project's VMs: a new context per migration cost level 1 a sixth of its speed
    on a first pass. A context reused by ``compressobj()`` / ``decompressobj()`` keeps its window.
    One user at a time (the arena's ``in_use`` guards that).
    """

    def __init__(self) -> None:
        self.compressors: dict[tuple[int, int, bool], zstandard.ZstdCompressor] = {}
        self.decompressors: dict[tuple[int, int], zstandard.ZstdDecompressor] = {}


class CodecBank:
    """Compression and decompression contexts of one encoder or decoder; not thread-safe."""

    def __init__(
        self,
        max_zstd_window: int,
        window_log: int = 23,
        ldm: bool = True,
        *,
        tuning: dict[int, dict[str, int]] | None = None,
        contexts: ZstdContexts | None = None,
    ) -> None:
        self._compressors: dict[int, zstandard.ZstdCompressor] = {}
        self._streams: dict[int, zstandard.ZstdCompressionObj] = {}
        self._dstreams: dict[int, zstandard.ZstdDecompressionObj] = {}
        self._stream_started: set[int] = set()
        self._max_window = max_zstd_window
        self._window_log = window_log
        self._ldm = ldm
        self._tuning = tuning or {}
        self._contexts = contexts or ZstdContexts()
        self._dctx = zstandard.ZstdDecompressor(max_window_size=max_zstd_window)
        self.touched_stream = False

    def _stream_compressor(self, level: int) -> zstandard.ZstdCompressionObj:
        key = (level, self._window_log, self._ldm)
        cctx = self._contexts.compressors.get(key)
        if cctx is None:
            tuning = {"enable_ldm": int(self._ldm), **self._tuning.get(level, {})}
            params = zstandard.ZstdCompressionParameters.from_level(
                level, window_log=self._window_log, **tuning
            )
            cctx = zstandard.ZstdCompressor(compression_params=params)
            self._contexts.compressors[key] = cctx
        return cctx.compressobj()

    def _stream_decompressor(self, level: int) -> zstandard.ZstdDecompressionObj:
        # One decompressor per stream: decompressobjs of one ZstdDecompressor share its context.
        key = (level, self._max_window)
        dctx = self._contexts.decompressors.get(key)
        if dctx is None:
            dctx = zstandard.ZstdDecompressor(max_window_size=self._max_window)
            self._contexts.decompressors[key] = dctx
        return dctx.decompressobj(write_size=_STREAM_WRITE_SIZE)

    def compress(self, codec: Codec, parts: list[bytes | memoryview]) -> bytes:
        """Compress the concatenation of ``parts`` (a stream takes them without joining)."""
        if codec.id is not CodecId.ZSTD_STREAM:
            data = parts[0] if len(parts) == 1 else b"".join(parts)
        if codec.id is CodecId.NONE:
            return bytes(data)
        if codec.id is CodecId.LZ4:
            return bytes(lz4.block.compress(data, store_size=False))
        if codec.id is CodecId.ZSTD_STREAM:
            cobj = self._streams.get(codec.level)
            if cobj is None:
                cobj = self._stream_compressor(codec.level)
                self._streams[codec.level] = cobj
            out = [cobj.compress(p) for p in parts]
            out.append(cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
            return b"".join(out)
        cctx = self._compressors.get(codec.level)
        if cctx is None:
            cctx = zstandard.ZstdCompressor(level=codec.level, write_checksum=False)
            self._compressors[codec.level] = cctx
        return bytes(cctx.compress(data))

    def decompress(self, codec: Codec, payload: bytes | memoryview, raw_len: int) -> bytes:
        """Inflate to exactly ``raw_len`` bytes or raise :class:`HdeDecodeError`.

        ``touched_stream`` tells afterwards whether a zstd stream took this payload in (from then on
        the batch cannot be refused without leaving that stream out of step).
        """
        self.touched_stream = False
        if codec.id is CodecId.NONE:
            if len(payload) != raw_len:
                raise HdeDecodeError("stored body has the wrong size", size=len(payload), expected=raw_len)
            return bytes(payload)
        if codec.id is CodecId.ZSTD_STREAM:
            return self._decompress_stream(codec, payload, raw_len)
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

    def _decompress_stream(self, codec: Codec, payload: bytes | memoryview, raw_len: int) -> bytes:
        first = codec.level not in self._stream_started
        bound = stream_segment_bound(bytes(payload), first=first, max_window=self._max_window)
        if bound > 2 * raw_len + (1 << 20):
            raise HdeDecodeError("zstd stream segment could inflate too far", bound=bound, expected=raw_len)
        dobj = self._dstreams.get(codec.level)
        if dobj is None:
            dobj = self._stream_decompressor(codec.level)
            self._dstreams[codec.level] = dobj
        self._stream_started.add(codec.level)
        self.touched_stream = True
        try:
            out = dobj.decompress(payload)
        except zstandard.ZstdError as exc:
            raise HdeStreamBroken("corrupt zstd stream segment", codec=codec.name, detail=str(exc)) from exc
        if len(out) != raw_len:
            raise HdeStreamBroken(
                "stream segment inflated to the wrong size", size=len(out), expected=raw_len
            )
        return bytes(out)


def stream_segment_bound(seg: bytes, *, first: bool, max_window: int) -> int:
    """Most bytes a run of complete zstd blocks (led by the frame header if ``first``) can produce.

    Raises :class:`HdeDecodeError` for anything but complete, non-final blocks: an HDE stream never
    ends its frame, and a segment must decode completely on its own.
    """
    pos, block_max = 0, _BLOCK_MAX
    if first:
        if len(seg) < 6 or int.from_bytes(seg[:4], "little") != _ZSTD_MAGIC:
            raise HdeDecodeError("zstd stream does not start with a frame header")
        fhd = seg[4]
        fcs_flag, single, reserved, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 3) & 1, fhd & 3
        if reserved or dict_flag or single:
            raise HdeDecodeError("unsupported zstd frame header", fhd=fhd)
        exponent, mantissa = seg[5] >> 3, seg[5] & 7
        base = 1 << (10 + exponent)
        window = base + (base // 8) * mantissa
        if window > max_window:
            raise HdeDecodeError("zstd window larger than the limit", window=window, limit=max_window)
        block_max = min(window, _BLOCK_MAX)
        pos = 6 + (0, 2, 4, 8)[fcs_flag]
    bound = 0
    while pos < len(seg):
        if pos + 3 > len(seg):
            raise HdeDecodeError("truncated zstd block header")
        head = int.from_bytes(seg[pos : pos + 3], "little")
        last, kind, size = head & 1, (head >> 1) & 3, head >> 3
        pos += 3
        if last:
            raise HdeDecodeError("zstd stream segment ends its frame")
        if kind == 0:  # raw
            pos += size
            bound += size
        elif kind == 1:  # RLE: one byte repeated size times
            pos += 1
            bound += size
        elif kind == 2:
            if size > block_max:
                raise HdeDecodeError("zstd block larger than the maximum", size=size)
            pos += size
            bound += block_max
        else:
            raise HdeDecodeError("reserved zstd block type")
    if pos != len(seg):
        raise HdeDecodeError("zstd stream segment ends inside a block")
    return bound
