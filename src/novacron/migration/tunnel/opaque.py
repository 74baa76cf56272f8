"""Compression of bytes the tunnel does not parse: QEMU's main stream and raw multifd packets.

The main stream is one endless zstd stream per direction (blocks flushed per message), as HDE's
streamed bodies are, so its many small, similar records (zero-page flags, section headers) compress
against each other; raw packets are independent zstd frames. Decompression is bounded by the raw
length each message declares (HDE's :class:`~novacron.dwcp.encoding.codecs.CodecBank` checks it).
"""

from __future__ import annotations

from novacron.dwcp.encoding.codecs import NONE, Codec, CodecBank, CodecId, zstd, zstd_stream
from novacron.dwcp.encoding.errors import HdeDecodeError
from novacron.migration.tunnel.errors import RecordError

MIN_COMPRESS_BYTES = 64  # smaller messages go stored (a flushed zstd block costs a few bytes)
STREAM_WINDOW_LOG = 22  # 4 MiB: the main stream's records repeat at short distances
MAX_WINDOW = 1 << STREAM_WINDOW_LOG


def main_stream_codec(compress: bool, level: int = 1) -> Codec:
    return zstd_stream(level) if compress else NONE


def raw_packet_codec(level: int = 1) -> Codec:
    return zstd(level)


class OpaqueCompressor:
    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._bank = CodecBank(MAX_WINDOW, STREAM_WINDOW_LOG, ldm=False)

    def compress(self, data: bytes) -> tuple[Codec, bytes]:
        if self.codec.id is CodecId.NONE or len(data) < MIN_COMPRESS_BYTES:
            return NONE, data
        out = self._bank.compress(self.codec, [data])
        if not self.codec.streamed and len(out) >= len(data):
            return NONE, data  # an independent frame that did not shrink: store it
        return self.codec, out


class OpaqueDecompressor:
    def __init__(self) -> None:
        self._bank = CodecBank(MAX_WINDOW, STREAM_WINDOW_LOG, ldm=False)

    def decompress(self, codec_id: int, level: int, payload: bytes, raw_len: int) -> bytes:
        try:
            codec = Codec(CodecId(codec_id), level)
        except ValueError:
            raise RecordError("unknown codec", codec=codec_id) from None
        try:
            return self._bank.decompress(codec, payload, raw_len)
        except HdeDecodeError as exc:
            raise RecordError("cannot decompress opaque bytes", codec=codec.name, reason=exc.message) from exc
