"""Limits and defaults of the AMST transport (docs/transport.md explains each choice).

Wire constants (both peers must agree, they are part of protocol version 3) are module constants;
everything a node may choose on its own is a field of :class:`AmstConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from novacron.dwcp.frames.limits import HEADER_SIZE
from novacron.dwcp.transport.errors import TransportConfigError

KiB = 1024
MiB = 1024 * KiB

INITIAL_CHANNEL_WINDOW = 256 * KiB
"""Wire constant: bytes a sender may send on a new channel before the receiver's first ACK says more."""

DATA_BODY_OVERHEAD = 16
"""Room left in a DATA frame for its msgpack body (a map with one u64) beside the payload."""

MESSAGE_HEADER_SIZE = 4
"""Messages travel in the channel's byte stream as a big-endian u32 length followed by the bytes."""


@dataclass(frozen=True, slots=True)
class AmstConfig:
    """What one side of a session uses. Sizes in bytes, times in seconds."""

    # ---- chunking: a chunk should take about `chunk_target_s` on one stream ----
    chunk_min: int = 16 * KiB
    chunk_max: int = 1 * MiB
    chunk_initial: int = 256 * KiB
    chunk_target_s: float = 0.010
    # ---- receive side (memory bound: session_window + max_channels * INITIAL_CHANNEL_WINDOW) ----
    channel_window: int = 64 * MiB  # >= ~3 x BDP: striping over lossy streams delays reassembly
    session_window: int = 128 * MiB
    max_channels: int = 256
    max_reorder_chunks: int = 65536
    max_message_size: int = 16 * MiB  # a migration READY carries the baseline summary (28 B per page)
    finished_channels_remembered: int = 1024
    ack_delay_s: float = 0.005
    ack_every_bytes: int = 1 * MiB
    # ---- send side: bytes written but not yet acknowledged, per session ----
    budget_initial: int = 16 * MiB
    budget_floor: int = 4 * MiB
    budget_max: int = 256 * MiB
    budget_rtt_factor: float = 4.0
    pull_chunks: int = 2
    # ---- liveness and measurements ----
    ping_interval_s: float = 1.0
    ping_startup_interval_s: float = 0.05
    ping_startup_count: int = 4
    stall_timeout_s: float = 5.0
    stall_rtt_factor: float = 10.0
    sample_interval_s: float = 0.5

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TransportConfigError(f"{f.name} must be a number", field=f.name, value=value)
            if not (math.isfinite(value) and value > 0):
                raise TransportConfigError(f"{f.name} must be positive", field=f.name, value=value)
        if not self.chunk_min <= self.chunk_initial <= self.chunk_max:
            raise TransportConfigError(
                "need chunk_min <= chunk_initial <= chunk_max",
                chunk_min=self.chunk_min,
                chunk_initial=self.chunk_initial,
                chunk_max=self.chunk_max,
            )
        if self.chunk_min > INITIAL_CHANNEL_WINDOW:
            raise TransportConfigError(
                "chunk_min must fit in the initial channel window",
                chunk_min=self.chunk_min,
                initial_window=INITIAL_CHANNEL_WINDOW,
            )
        if self.channel_window < max(self.chunk_max, INITIAL_CHANNEL_WINDOW):
            raise TransportConfigError(
                "channel_window must hold at least one largest chunk and the initial window",
                channel_window=self.channel_window,
                chunk_max=self.chunk_max,
            )
        if self.session_window < self.channel_window:
            raise TransportConfigError(
                "session_window must be at least channel_window",
                session_window=self.session_window,
                channel_window=self.channel_window,
            )
        if not self.budget_floor <= self.budget_initial <= self.budget_max:
            raise TransportConfigError(
                "need budget_floor <= budget_initial <= budget_max",
                budget_floor=self.budget_floor,
                budget_initial=self.budget_initial,
                budget_max=self.budget_max,
            )
        if self.budget_floor < self.chunk_max:
            raise TransportConfigError(
                "budget_floor must hold at least one largest chunk",
                budget_floor=self.budget_floor,
                chunk_max=self.chunk_max,
            )
        if self.max_message_size > 2**32 - 1:
            raise TransportConfigError("max_message_size must fit in 32 bits", value=self.max_message_size)

    def chunk_limit(self, max_frame_size: int) -> int:
        """The largest payload a DATA frame may carry under the session's negotiated frame size."""
        return min(self.chunk_max, max_frame_size - HEADER_SIZE - DATA_BODY_OVERHEAD)


DEFAULT_CONFIG = AmstConfig()
