"""How much the source tunnel may have in flight, and what bandwidth HDE should plan for (sans-IO).

Two figures, both driven by measurements and time handed in by the caller:

* the **window**: wire bytes sent but not yet decoded by the destination. Whatever is in flight at
  switchover adds to the VM's downtime, so it is kept small: when the link is the bottleneck, enough
  for ``2 x RTT + slack`` at the measured bandwidth; otherwise a fixed drain time at the rate reached
  (``inflight_target_s``), which lets the window grow with the rate until the link limits;
* the **bandwidth HDE plans for**: its cost model picks the codec that delivers a batch soonest at
  that bandwidth. The transport's estimate, and the rate the destination acknowledges our records
  at, only see what we give them: while the encoder (not the link) is the bottleneck they are lower
  bounds, and trusting them would pick ever stronger, slower codecs (a self-confirming spiral). So
  while the link does not limit, the figure told grows by ``probe_factor`` every ``probe_interval_s``;
  as soon as the window is found full with most of it still in the transport, it falls back to the
  measurement.

"The link limits" is decided by the caller's observation that a record was ready while the window
was full *and* at least ``link_limited_share`` of the window was still unacknowledged by the
transport (rather than waiting at the destination's decoder, whose CPU stronger compression would
only load more).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from novacron.migration.tunnel.limits import TunnelLimits


class RateMeter:
    """Rate of a growing total over the last ``window_s`` seconds (bounded: old samples drop out)."""

    def __init__(self, window_s: float, max_samples: int = 256) -> None:
        self._window = window_s
        self._samples: deque[tuple[float, int]] = deque(maxlen=max_samples)

    def add(self, now: float, total: int) -> None:
        self._samples.append((now, total))
        while len(self._samples) > 2 and now - self._samples[1][0] > self._window:
            self._samples.popleft()

    def rate(self, now: float) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, v0), (t1, v1) = self._samples[0], self._samples[-1]
        if now - t1 > self._window or t1 <= t0:
            return None  # nothing acknowledged lately: no current figure
        return (v1 - v0) / (t1 - t0)


@dataclass(frozen=True)
class PacingConfig:
    link_limited_hold_s: float = 0.5  # after a full window, the link counts as the bottleneck this long
    link_limited_share: float = 0.5  # ... if at least this share of the window was in the transport
    probe_factor: float = 2.0  # growth of the bandwidth told to HDE while the link does not limit ...
    probe_interval_s: float = 0.5  # ... per this interval ...
    max_probe_gain: float = 64.0  # ... up to this multiple of what was measured
    rate_window_s: float = 1.0  # the acknowledged-rate meter averages over this long
    refresh_s: float = 0.05  # the window is recomputed at most this often


class Pacer:
    def __init__(self, limits: TunnelLimits, config: PacingConfig | None = None) -> None:
        self.limits = limits
        self.config = config or PacingConfig()
        self._acked = RateMeter(self.config.rate_window_s)
        self._link_limited_until = float("-inf")
        self._gain = 1.0
        self._gain_at = float("-inf")
        self._window = limits.inflight_floor
        self._window_at = float("-inf")

    # ---- observations ----

    def acknowledged(self, now: float, acked_wire_total: int) -> None:
        """The destination has now decoded this many wire bytes in total."""
        self._acked.add(now, acked_wire_total)

    def window_full(self, now: float, inflight: int, in_transport: int) -> None:
        """A record was ready but ``inflight`` filled the window; ``in_transport`` of it was not yet
        acknowledged by the transport itself."""
        if in_transport >= self.config.link_limited_share * inflight:
            self._link_limited_until = now + self.config.link_limited_hold_s
            self._window_at = float("-inf")  # the regime changed: recompute now

    def link_limited(self, now: float) -> bool:
        return now < self._link_limited_until

    def acked_rate(self, now: float) -> float | None:
        return self._acked.rate(now)

    # ---- decisions ----

    def window(self, now: float, measured_bw: float | None, rtt_s: float | None) -> int:
        if now - self._window_at < self.config.refresh_s:
            return self._window
        rate = max(measured_bw or 0.0, self._acked.rate(now) or 0.0)
        if self.link_limited(now):
            self._window = self.limits.inflight_bytes(rate, rtt_s)
        else:
            self._window = self.limits.inflight_bytes(rate, None)
        self._window_at = now
        return self._window

    def hde_bandwidth(self, now: float, measured_bw: float | None) -> float | None:
        """Bytes/s for HDE's cost model, or None (nothing measured yet: keep its default)."""
        best = max(measured_bw or 0.0, self._acked.rate(now) or 0.0)
        if best <= 0:
            return None
        if self.link_limited(now):
            self._gain = 1.0
        elif now - self._gain_at >= self.config.probe_interval_s:
            if self._gain_at != float("-inf"):
                self._gain = min(self._gain * self.config.probe_factor, self.config.max_probe_gain)
            self._gain_at = now
        return best * self._gain

    @property
    def gain(self) -> float:
        return self._gain
