"""Every bound of the migration tunnel, with its default (``docs/tunnel.md`` explains each)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from novacron.errors import UserError

KiB = 1024
MiB = 1024 * KiB


class TunnelConfigError(UserError):
    """A tunnel limit is out of range."""


@dataclass(frozen=True)
class TunnelLimits:
    # ---- QEMU connections (source listener and destination connections) ----
    max_channels: int = 64  # multifd connections per migration (QEMU allows 1..255; 4-16 in practice)
    read_chunk: int = 256 * KiB  # one read from a QEMU socket (and the read-ahead per connection)
    max_pages_alloc: int = 1024  # pages per multifd packet accepted for parsing (QEMU 7.2: 128)
    classify_timeout_s: float = 10.0  # a new QEMU connection must say what it is within this time
    connect_timeout_s: float = 10.0  # the destination QEMU must accept our connection within this time
    # ---- buffering (bounded by the downtime budget: everything buffered must drain in the pause) ----
    merge_queue_packets: int = 4  # parsed packets waiting for the encoder, all channels together
    sync_round_timeout_s: float = 60.0  # a channel parked after its SYNC waits at most this long
    inflight_floor: int = 1 * MiB  # wire bytes sent but not yet decoded by the peer, at least
    inflight_ceiling: int = 64 * MiB  # ... and at most
    inflight_rtts: float = 2.0  # ... else this many round trips at the measured bandwidth
    inflight_slack_s: float = 0.02  # ... plus this much time (decode, acknowledgement delay)
    inflight_target_s: float = 0.15  # ... or this long at the rate reached, when the link does not limit
    channel_queue_bytes: int = 1 * MiB  # destination: rebuilt bytes waiting for one QEMU channel
    held_records: int = 4096  # destination: records held while a repair is outstanding
    # ---- records ----
    main_message_bytes: int = 256 * KiB  # largest main-channel message (raw bytes per message)
    max_record_bytes: int = 8 * MiB  # largest record accepted from the peer
    ack_every_records: int = 8  # destination acknowledges at least every n records ...
    ack_every_bytes: int = 1 * MiB  # ... or every n QEMU bytes written ...
    ack_delay_s: float = 0.005  # ... or this long after the first unacknowledged record
    # ---- ends ----
    finish_timeout_s: float = 60.0  # finish(): everything delivered and acknowledged within this time
    accept_timeout_s: float = 30.0  # destination: the source's channels must open within this time

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise TunnelConfigError(f"{f.name} must be a positive number", field=f.name, value=value)
        if not 1 <= self.max_channels <= 255:
            raise TunnelConfigError("max_channels must be in 1..255", value=self.max_channels)
        if not 1 <= self.max_pages_alloc <= 1024:
            raise TunnelConfigError("max_pages_alloc must be in 1..1024 (HDE batch limit)")
        if self.inflight_floor > self.inflight_ceiling:
            raise TunnelConfigError("inflight_floor must not exceed inflight_ceiling")
        if self.max_record_bytes < 2 * MiB or self.main_message_bytes > self.max_record_bytes // 2:
            raise TunnelConfigError("max_record_bytes must hold a full multifd packet and a main message")

    def inflight_bytes(self, bandwidth_bytes_per_s: float | None, rtt_s: float | None = None) -> int:
        """The wire-byte window: enough to keep the link busy, little enough to drain in the downtime."""
        if not bandwidth_bytes_per_s or bandwidth_bytes_per_s <= 0:
            return self.inflight_floor
        span = self.inflight_rtts * rtt_s + self.inflight_slack_s if rtt_s else self.inflight_target_s
        want = int(bandwidth_bytes_per_s * span)
        return max(self.inflight_floor, min(self.inflight_ceiling, want))
