"""What one direction of an emulated link does to packets, and the counters it keeps."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from novacron.testing.errors import WanConfigError

MIN_QUEUE_PACKETS = 100
"""Floor of the default bottleneck queue, in full-size packets (a BDP of a near-zero RTT is tiny)."""


@dataclass(frozen=True)
class LinkSpec:
    """One direction of a link. Rates count IP bytes (no Ethernet framing); delays are one-way.

    ``rate_bps=None`` means no bottleneck. ``queue_bytes``/``queue_ms`` bound the droptail queue in
    front of the bottleneck; with neither, the emulator sizes it to about one bandwidth-delay product
    (rate times the RTT of this direction plus the reverse one). Jitter is uniform in +-``jitter_ms``
    and does not reorder packets unless ``reorder`` is set. ``up=False`` cuts the link: every new packet
    is dropped (packets already on the wire still arrive).
    """

    rate_bps: float | None = None
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    queue_bytes: int | None = None
    queue_ms: float | None = None
    reorder: bool = False
    up: bool = True

    def __post_init__(self) -> None:
        if self.rate_bps is not None and not (math.isfinite(self.rate_bps) and self.rate_bps >= 1000):
            raise WanConfigError(
                "link rate must be at least 1000 bit/s (or None for no limit)", rate_bps=self.rate_bps
            )
        for name in ("delay_ms", "jitter_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 60_000):
                raise WanConfigError(f"{name} must be between 0 and 60000 ms", **{name: value})
        if not (0.0 <= self.loss <= 1.0):
            raise WanConfigError("loss is a probability between 0 and 1", loss=self.loss)
        if self.queue_bytes is not None and self.queue_bytes < 1:
            raise WanConfigError("queue_bytes must be positive", queue_bytes=self.queue_bytes)
        if self.queue_ms is not None and not (math.isfinite(self.queue_ms) and self.queue_ms > 0):
            raise WanConfigError("queue_ms must be positive", queue_ms=self.queue_ms)
        if self.queue_bytes is not None and self.queue_ms is not None:
            raise WanConfigError("give queue_bytes or queue_ms, not both")

    @classmethod
    def for_rtt(
        cls, rtt_ms: float, rate_bps: float | None = None, loss: float = 0.0, jitter_ms: float = 0.0
    ) -> LinkSpec:
        """One direction of a symmetric link with round-trip time `rtt_ms` (half of it each way)."""
        return cls(rate_bps=rate_bps, delay_ms=rtt_ms / 2, jitter_ms=jitter_ms, loss=loss)

    @property
    def shaped(self) -> bool:
        """Whether the link does anything to packets (an unshaped link can be a plain veth pair)."""
        return self != LinkSpec(queue_bytes=self.queue_bytes, queue_ms=self.queue_ms, reorder=self.reorder)

    def effective_queue_bytes(self, reverse_delay_ms: float, mtu: int) -> int:
        """Queue limit in bytes: explicit, or from `queue_ms`, or about one BDP (with a floor)."""
        if self.queue_bytes is not None:
            return self.queue_bytes
        floor = MIN_QUEUE_PACKETS * mtu
        if self.rate_bps is None:
            return floor
        if self.queue_ms is not None:
            return max(mtu, int(self.rate_bps * self.queue_ms / 8000))
        bdp = self.rate_bps * (self.delay_ms + reverse_delay_ms) / 8000
        return max(floor, int(bdp))


@dataclass(frozen=True)
class LinkStats:
    """Counters of one directed link since the emulator started (packets/bytes are IP packets)."""

    src: str
    dst: str
    fwd_pkts: int
    fwd_bytes: int
    loss_pkts: int
    loss_bytes: int
    qdrop_pkts: int
    qdrop_bytes: int
    down_pkts: int
    down_bytes: int
    txerr_pkts: int
    held_pkts: int
    held_bytes: int
    max_backlog_bytes: int

    @property
    def offered_pkts(self) -> int:
        """Packets that arrived at this link (delivered, dropped, or still in flight)."""
        return (
            self.fwd_pkts
            + self.loss_pkts
            + self.qdrop_pkts
            + self.down_pkts
            + self.txerr_pkts
            + self.held_pkts
        )


@dataclass(frozen=True)
class InterfaceStats:
    """Kernel counters of a node's emulator-facing interface (drops here happen outside the model)."""

    node: str
    tx_pkts: int
    tx_bytes: int
    tx_dropped: int
    rx_pkts: int
    rx_bytes: int
    rx_dropped: int


@dataclass(frozen=True)
class WanStats:
    """A snapshot of all counters. `links` is empty for the veth backend (it has no forwarder)."""

    at_s: float
    links: dict[tuple[str, str], LinkStats] = field(default_factory=dict)
    interfaces: dict[str, InterfaceStats] = field(default_factory=dict)
    unroutable_pkts: dict[str, int] = field(default_factory=dict)

    def link(self, src: str, dst: str) -> LinkStats:
        try:
            return self.links[(src, dst)]
        except KeyError:
            raise WanConfigError("no such directed link in these stats", src=src, dst=dst) from None
