"""Which data path moves a VM fastest over this link with this host's CPU: the sans-IO cost model.

Every candidate path is reduced to one figure, the rate at which it can move QEMU's RAM bytes (the
non-zero pages QEMU sends): ``rate = min(link-bound, CPU-bound)`` where

* link-bound = effective link bandwidth x the path's compression ratio;
* CPU-bound  = cores the path can use / CPU seconds the source spends per QEMU byte.

The fastest path wins; a path within ``tie_margin`` of the fastest that puts fewer bytes on the link
wins over it (fewer bytes for the same time). The destination's CPU is not the bound of any path
here (decoding runs 4-8x faster than encoding), so only the source is modelled.

Candidates (``docs/tunnel.md``, "Choosing the path", has the figures behind the defaults):

* ``tunnel`` - HDE in the agent. Two operating points (what HDE's own cost model switches between by
  bandwidth): dense (long-window zstd streams, best ratio) and fast (LZ4 / zstd-1). The agent's CPU
  per QEMU byte = encode + transport (asyncio, AMST, TLS) per wire byte / ratio; it runs in at most
  ``tunnel_max_cores`` (one encoder thread and the event loop, GIL shared).
* ``direct`` + QEMU zstd (level 1: QEMU 7.2 cannot be told another level at run time) - compressed in
  QEMU's multifd threads, sent with QEMU's TLS.
* ``direct`` without compression - QEMU's TLS only.

Inputs are measured: the link's bandwidth and RTT (the session), the encoder figures (defaults from
``bench/tunnel.py`` on this project's VM, overridable), and the cores the source host has left next to
the guest's vCPUs (a TCG or busy KVM vCPU takes a core).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from novacron.migration.datapath import DataPathKind
from novacron.migration.errors import MigrationInputError

MB = 1e6


@dataclass(frozen=True)
class Codec:
    """One way of compressing: the ratio it reaches on guest memory and its speed on one core."""

    ratio: float  # QEMU bytes / wire bytes
    bytes_per_cpu_s: float  # QEMU bytes compressed per CPU second

    def __post_init__(self) -> None:
        if self.ratio < 1 or self.bytes_per_cpu_s <= 0:
            raise MigrationInputError("codec ratio must be >= 1 and speed > 0", field="path_costs")


@dataclass(frozen=True)
class PathCosts:
    """The host's calibration. Defaults: medians measured on this project's 2-core VM (docs/tunnel.md)."""

    hde_dense: Codec = Codec(ratio=4.27, bytes_per_cpu_s=68 * MB)  # bench/tunnel.py cold, hde@100M
    hde_fast: Codec = Codec(ratio=2.94, bytes_per_cpu_s=235 * MB)  # ... hde@1G
    # The tunnel's own stack per wire byte: asyncio, AMST framing and acks, TLS, socket calls.
    tunnel_wire_bytes_per_cpu_s: float = 70 * MB
    tunnel_max_cores: float = 1.5
    qemu_zstd: Codec = Codec(ratio=2.91, bytes_per_cpu_s=263 * MB)  # QEMU multifd zstd-1, per thread
    qemu_tls_bytes_per_cpu_s: float = 1000 * MB  # QEMU's gnutls + socket writes, per wire byte
    multifd_channels: int = 4
    tcp_window_bytes: int = 6 << 20  # kernel autotuning ceiling (tcp_rmem max) per connection
    tie_margin: float = 0.03  # rates this close count as equal; then fewer link bytes win

    def __post_init__(self) -> None:
        if self.tunnel_wire_bytes_per_cpu_s <= 0 or self.qemu_tls_bytes_per_cpu_s <= 0:
            raise MigrationInputError("per-byte costs must be positive", field="path_costs")
        if self.tunnel_max_cores <= 0 or self.multifd_channels < 1 or not 0 <= self.tie_margin < 1:
            raise MigrationInputError("bad path-cost limits", field="path_costs")


@dataclass(frozen=True)
class LinkView:
    """What the source knows when it plans: the link and its own spare CPU."""

    bandwidth_bps: float  # bits per second, measured (or the operator's hint)
    rtt_s: float | None  # None: unknown (no window bound applied)
    spare_cores: float  # source host cores minus what the guest's vCPUs take

    def __post_init__(self) -> None:
        if self.bandwidth_bps <= 0 or self.spare_cores <= 0:
            raise MigrationInputError("link bandwidth and spare cores must be positive", field="link")


@dataclass(frozen=True)
class Candidate:
    kind: DataPathKind
    compression: str  # QEMU's multifd compression: "none" or "zstd" (direct); "none" for the tunnel
    rate: float  # QEMU bytes per second
    ratio: float  # QEMU bytes per link byte
    bound: str  # "link" or "cpu"

    @property
    def label(self) -> str:
        return f"{self.kind}" + (f"+{self.compression}" if self.compression != "none" else "")


@dataclass(frozen=True)
class PathChoice:
    best: Candidate
    candidates: tuple[Candidate, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        rows = ", ".join(
            f"{c.label} {c.rate / MB:.0f} MB/s ({c.bound}, ratio {c.ratio:.2f})" for c in self.candidates
        )
        return f"{self.best.label}: {rows}"


def _rate(link_Bps: float, codec_ratio: float, cpu_s_per_byte: float, cores: float) -> tuple[float, str]:
    by_link = link_Bps * codec_ratio
    by_cpu = cores / cpu_s_per_byte
    return (by_link, "link") if by_link <= by_cpu else (by_cpu, "cpu")


def candidates(link: LinkView, costs: PathCosts, kinds: frozenset[DataPathKind]) -> list[Candidate]:
    link_Bps = link.bandwidth_bps / 8
    if link.rtt_s:
        # Each TCP connection moves at most its window per round trip; QEMU and AMST both use several.
        link_Bps = min(link_Bps, costs.multifd_channels * costs.tcp_window_bytes / link.rtt_s)
    out: list[Candidate] = []
    if DataPathKind.TUNNEL in kinds:
        cores = min(link.spare_cores, costs.tunnel_max_cores)
        points = []
        for codec in (costs.hde_dense, costs.hde_fast):
            per_byte = 1 / codec.bytes_per_cpu_s + 1 / (codec.ratio * costs.tunnel_wire_bytes_per_cpu_s)
            rate, bound = _rate(link_Bps, codec.ratio, per_byte, cores)
            points.append(Candidate(DataPathKind.TUNNEL, "none", rate, codec.ratio, bound))
        out.append(max(points, key=lambda c: c.rate))  # HDE's own cost model picks its level likewise
    if DataPathKind.DIRECT in kinds:
        cores = min(link.spare_cores, float(costs.multifd_channels))
        z = costs.qemu_zstd
        per_byte = 1 / z.bytes_per_cpu_s + 1 / (z.ratio * costs.qemu_tls_bytes_per_cpu_s)
        rate, bound = _rate(link_Bps, z.ratio, per_byte, cores)
        out.append(Candidate(DataPathKind.DIRECT, "zstd", rate, z.ratio, bound))
        rate, bound = _rate(link_Bps, 1.0, 1 / costs.qemu_tls_bytes_per_cpu_s, cores)
        out.append(Candidate(DataPathKind.DIRECT, "none", rate, 1.0, bound))
    return out


def choose_path(link: LinkView, costs: PathCosts, kinds: frozenset[DataPathKind]) -> PathChoice | None:
    """The fastest candidate (ties: fewest link bytes); None when no modelled path is available."""
    cands = candidates(link, costs, kinds)
    if not cands:
        return None
    top = max(c.rate for c in cands)
    close = [c for c in cands if c.rate >= top * (1 - costs.tie_margin)]
    best = max(close, key=lambda c: (c.ratio, c.rate))
    return PathChoice(best, tuple(sorted(cands, key=lambda c: -c.rate)))
