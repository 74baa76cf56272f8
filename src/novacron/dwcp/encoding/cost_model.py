"""Per-batch codec choice: minimise the time to deliver a batch, not its size.

Compression and sending overlap (the transport sends batch n while the encoder compresses n+1), so a
batch costs ``max(raw / speed, wire / bandwidth)``. ``speed`` is each codec's measured throughput on
this machine and this data (EWMA of outcomes); ``wire`` is predicted from a cheap probe: the ratio LZ4
reaches on a sample of the batch, times each codec's learned ratio relative to that probe. The bandwidth
is what the transport reports (:meth:`CodecSelector.set_bandwidth`). Codecs not chosen for a while are
tried again now and then so their estimates cannot go stale; every choice and its outcome is handed to
the ``on_choice`` callback and summed in :attr:`CodecSelector.totals`.

Time enters only as measured durations handed to :meth:`CodecSelector.record`, so tests drive this
with made-up numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from novacron.dwcp.encoding.codecs import LZ4, NONE, Codec, zstd, zstd_stream
from novacron.dwcp.encoding.errors import HdeConfigError

# Starting points, measured on this project's 2-core build machine (bench/hde.py prints fresh ones):
# single-thread throughput in bytes/s on mixed binaries, and ratio relative to LZ4's ratio.
# Streamed levels use an 8 MiB window with long-distance matching (see codecs.py).
DEFAULT_SPEED: dict[Codec, float] = {
    NONE: 8e9,
    LZ4: 450e6,
    zstd(1): 320e6,
    zstd(3): 175e6,
    zstd(6): 60e6,
    zstd_stream(1): 220e6,
    zstd_stream(3): 150e6,
    zstd_stream(6): 65e6,
}
DEFAULT_RATIO_VS_LZ4: dict[Codec, float] = {
    NONE: 0.0,
    LZ4: 1.0,
    zstd(1): 1.35,
    zstd(3): 1.45,
    zstd(6): 1.55,
    zstd_stream(1): 1.6,
    zstd_stream(3): 1.67,
    zstd_stream(6): 1.78,
}


@dataclass(frozen=True)
class CostModelConfig:
    codecs: tuple[Codec, ...] = (NONE, LZ4, zstd_stream(1), zstd_stream(3), zstd_stream(6))
    bandwidth: float = 125e6  # bytes/s until the transport reports (1 Gbit/s)
    smoothing: float = 0.2  # EWMA weight of a new outcome
    explore_every: int = 64  # every n-th batch tries the codec measured longest ago
    min_compress_bytes: int = 512  # smaller bodies go uncompressed
    sample_pages: int = 4  # pages of a batch the LZ4 probe looks at

    def __post_init__(self) -> None:
        if not self.codecs or NONE not in self.codecs:
            raise HdeConfigError("the codec list must contain 'none'")
        if self.bandwidth <= 0 or not 0 < self.smoothing <= 1 or self.explore_every < 2:
            raise HdeConfigError("bad cost model settings", bandwidth=self.bandwidth)


@dataclass(frozen=True)
class CodecChoice:
    """One decision and what came of it (for metrics)."""

    seq: int
    codec: Codec
    raw_bytes: int
    wire_bytes: int
    seconds: float
    predicted_wire: float
    predicted_seconds: float
    bandwidth: float
    explored: bool


@dataclass
class CodecTotals:
    batches: int = 0
    raw_bytes: int = 0
    wire_bytes: int = 0
    seconds: float = 0.0


@dataclass
class _Estimate:
    speed: float
    ratio_vs_probe: float
    last_used: int = -1


@dataclass
class CodecSelector:
    config: CostModelConfig = field(default_factory=CostModelConfig)
    on_choice: Callable[[CodecChoice], None] | None = None

    def __post_init__(self) -> None:
        self._est = {
            c: _Estimate(DEFAULT_SPEED.get(c, 100e6), DEFAULT_RATIO_VS_LZ4.get(c, 1.2))
            for c in self.config.codecs
        }
        self._bandwidth = self.config.bandwidth
        self._n = 0
        self.totals: dict[Codec, CodecTotals] = {c: CodecTotals() for c in self.config.codecs}

    @property
    def bandwidth(self) -> float:
        return self._bandwidth

    def set_bandwidth(self, bytes_per_s: float) -> None:
        if not bytes_per_s > 0:
            raise HdeConfigError("bandwidth must be positive", bandwidth=bytes_per_s)
        self._bandwidth = float(bytes_per_s)

    def choose(self, raw_len: int, probe_ratio: float) -> tuple[Codec, float, float, bool]:
        """(codec, predicted wire bytes, predicted seconds, explored?) for a body of ``raw_len``."""
        self._n += 1
        if raw_len < self.config.min_compress_bytes:
            return NONE, float(raw_len), raw_len / self._bandwidth, False
        ranked = sorted(
            ((self._predict(c, raw_len, probe_ratio), c) for c in self.config.codecs),
            key=lambda pc: (pc[0][1], pc[0][0]),
        )
        (wire, secs), best = ranked[0]
        explored = False
        if self._n % self.config.explore_every == 0 and len(ranked) > 1:
            # Re-measure the codec whose estimate is oldest among the three best, so speeds track reality.
            (wire, secs), best = min(ranked[:3], key=lambda pc: self._est[pc[1]].last_used)
            explored = True
        return best, wire, secs, explored

    def record(
        self,
        *,
        seq: int,
        codec: Codec,
        raw_len: int,
        wire_len: int,
        seconds: float,
        probe_ratio: float,
        predicted: tuple[float, float],
        explored: bool,
    ) -> None:
        est = self._est.get(codec)
        if est is not None and raw_len >= self.config.min_compress_bytes:
            a = self.config.smoothing
            if seconds > 0:
                est.speed = (1 - a) * est.speed + a * (raw_len / seconds)
            if codec != NONE and probe_ratio > 0 and wire_len > 0:
                est.ratio_vs_probe = (1 - a) * est.ratio_vs_probe + a * ((raw_len / wire_len) / probe_ratio)
            est.last_used = self._n
        tot = self.totals.setdefault(codec, CodecTotals())
        tot.batches += 1
        tot.raw_bytes += raw_len
        tot.wire_bytes += wire_len
        tot.seconds += seconds
        if self.on_choice is not None:
            self.on_choice(
                CodecChoice(
                    seq,
                    codec,
                    raw_len,
                    wire_len,
                    seconds,
                    predicted[0],
                    predicted[1],
                    self._bandwidth,
                    explored,
                )
            )

    def _predict(self, codec: Codec, raw_len: int, probe_ratio: float) -> tuple[float, float]:
        est = self._est[codec]
        ratio = 1.0 if codec == NONE else max(1.0, probe_ratio * est.ratio_vs_probe)
        wire = raw_len / ratio
        return wire, max(raw_len / est.speed, wire / self._bandwidth)
