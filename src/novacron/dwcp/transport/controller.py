"""The stream-count controller: how many TCP streams an AMST session should use. Sans-IO.

Theory of operation
-------------------
One TCP stream is limited by its window (window / RTT) and, on a lossy path, by its loss recovery
(Mathis et al.: about MSS / RTT * 1.22 / sqrt(loss)) if its congestion control backs off on loss
(Reno, CUBIC: ``loss_limited``; BBR is not, so only the window counts for it). The controller
starts from that: enough streams for the link's bandwidth, clamped to the bounds of the current mode
(internet 4-16, hybrid 2-8, datacenter 1-4 by default). Then it hill-climbs on measured goodput:

    SETTLING  --settle_s after a change-->  MEASURING  --enough samples-->  decide
      * no probe running: remember this level as the baseline and probe upwards (if allowed);
      * after a probe up:   kept if goodput rose by more than `gain_margin` (and loss did not jump),
                            then probe further up; otherwise revert and probe down once;
      * after a probe down: kept if goodput fell by less than `drop_margin`, then probe further
                            down; otherwise revert;
      * when a probe is reverted the controller holds (STABLE) for `hold_s`, doubling after each
        failed probe up to `max_hold_s`, before it probes again.
    STABLE: a goodput that moves away from the baseline by more than `shift_fraction`, or the end of
      the hold, starts a new probe; a mode change re-plans from the bandwidth-delay product at once.

"Enough samples" is at least `samples_per_decision`, and more (up to `max_samples_per_decision`)
while their relative standard error exceeds `max_relative_error`: noisy links decide more slowly
rather than on noise. Never thrashing comes from: a decision needs several samples (median),
changes are at least `min_change_interval_s` apart, samples right after a change are ignored while
new streams ramp up, margins in both directions, and exponentially growing holds after failed
probes.
Samples taken while the sender was application-limited say nothing about the link and are ignored.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

from novacron.dwcp.mode import Mode, ModeChange
from novacron.errors import UserError

MATHIS_CONSTANT = 1.22  # sqrt(3/2): Reno's throughput under random loss
MAX_PENDING_EVENTS = 64
HISTORY_LIMIT = 256

DEFAULT_BOUNDS: Mapping[Mode, tuple[int, int]] = MappingProxyType(
    {Mode.DATACENTER: (1, 4), Mode.HYBRID: (2, 8), Mode.INTERNET: (4, 16)}
)


class ControllerConfigError(UserError):
    """A stream-controller setting or input is invalid."""


@dataclass(frozen=True)
class ControllerConfig:
    """Bounds, margins and timings of the controller. Rates in bit/s, times in seconds."""

    bounds: Mapping[Mode, tuple[int, int]] = field(default_factory=lambda: DEFAULT_BOUNDS)
    stream_window_bytes: int = 4 << 20
    mss_bytes: int = 1448
    loss_limited: bool = True  # the streams' congestion control backs off on random loss
    gain_margin: float = 0.10
    drop_margin: float = 0.05
    loss_jump: float = 0.02
    samples_per_decision: int = 3
    max_samples_per_decision: int = 12
    max_relative_error: float = 0.04
    shift_samples: int = 10
    settle_s: float = 2.0
    min_change_interval_s: float = 5.0
    hold_s: float = 60.0
    max_hold_s: float = 600.0
    shift_fraction: float = 0.25
    step_fraction: float = 0.25

    def __post_init__(self) -> None:
        for mode in Mode:
            if mode not in self.bounds:
                raise ControllerConfigError("stream bounds missing for a mode", mode=mode.value)
            low, high = self.bounds[mode]
            if not 1 <= low <= high:
                raise ControllerConfigError(
                    "stream bounds need 1 <= min <= max", mode=mode.value, bounds=(low, high)
                )
        if self.stream_window_bytes < 1 or self.mss_bytes < 1:
            raise ControllerConfigError("window and MSS must be positive")
        for name in ("gain_margin", "drop_margin", "loss_jump", "shift_fraction", "step_fraction"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ControllerConfigError(f"{name} must be a fraction in (0, 1)", **{name: value})
        if not 1 <= self.samples_per_decision <= self.max_samples_per_decision:
            raise ControllerConfigError(
                "need 1 <= samples_per_decision <= max_samples_per_decision",
                samples_per_decision=self.samples_per_decision,
                max_samples_per_decision=self.max_samples_per_decision,
            )
        if self.shift_samples < 1:
            raise ControllerConfigError("shift_samples must be at least 1", value=self.shift_samples)
        if not 0 < self.max_relative_error < 1:
            raise ControllerConfigError(
                "max_relative_error is a fraction in (0, 1)", value=self.max_relative_error
            )
        for name in ("settle_s", "min_change_interval_s", "hold_s", "max_hold_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ControllerConfigError(f"{name} must not be negative", **{name: value})
        if self.max_hold_s < self.hold_s:
            raise ControllerConfigError(
                "max_hold_s must be at least hold_s", hold_s=self.hold_s, max_hold_s=self.max_hold_s
            )


def single_stream_bps(rtt_s: float, loss: float | None, config: ControllerConfig) -> float:
    """What one TCP stream can carry: window-limited, and loss-limited (Mathis) when loss is known."""
    window_limit = config.stream_window_bytes * 8 / rtt_s
    if loss is None or loss <= 0 or not config.loss_limited:
        return window_limit
    mathis = config.mss_bytes * 8 / rtt_s * MATHIS_CONSTANT / math.sqrt(loss)
    return min(window_limit, mathis)


def initial_streams(
    mode: Mode,
    config: ControllerConfig,
    rtt_s: float | None = None,
    bandwidth_bps: float | None = None,
    loss: float | None = None,
) -> int:
    """Streams needed to fill `bandwidth_bps` given what one stream carries, within the mode's bounds.

    Without an RTT and a bandwidth there is no product to start from: the mode's minimum is used.
    """
    low, high = config.bounds[mode]
    if rtt_s is None or bandwidth_bps is None or rtt_s <= 0 or bandwidth_bps <= 0:
        return low
    need = math.ceil(bandwidth_bps / single_stream_bps(rtt_s, loss, config))
    return max(low, min(high, need))


class ControllerState(StrEnum):
    SETTLING = "settling"
    MEASURING = "measuring"
    STABLE = "stable"


class ProbeDirection(StrEnum):
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class StreamCountChange:
    """An event: the target stream count changed."""

    previous: int
    target: int
    at: float
    reason: str
    goodput_bps: float | None = None


@dataclass(frozen=True)
class _Probe:
    direction: ProbeDirection
    origin: int  # the count the probe started from (reverted to on failure)
    baseline_bps: float
    baseline_loss: float | None


class StreamCountController:
    """Decides the target number of streams. See the module docstring."""

    def __init__(
        self,
        mode: Mode,
        now: float,
        *,
        config: ControllerConfig | None = None,
        rtt_s: float | None = None,
        bandwidth_bps: float | None = None,
        loss: float | None = None,
    ) -> None:
        self._c = config or ControllerConfig()
        self._mode = mode
        self._rtt_s = rtt_s
        self._target = initial_streams(mode, self._c, rtt_s, bandwidth_bps, loss)
        self._state = ControllerState.SETTLING
        self._after_settle = ControllerState.MEASURING
        self._changed_at = now
        self._samples: list[float] = []
        self._retrans = 0
        self._sent = 0
        self._probe: _Probe | None = None
        self._baseline_bps: float | None = None
        self._tried_down = False
        self._hold_s = self._c.hold_s
        self._hold_until = now
        self._events: deque[StreamCountChange] = deque(maxlen=MAX_PENDING_EVENTS)
        self.history: deque[StreamCountChange] = deque(maxlen=HISTORY_LIMIT)
        self.changes = 0
        first = StreamCountChange(0, self._target, now, f"initial ({mode.value})")
        self._events.append(first)
        self.history.append(first)

    # ---- what others read ----

    @property
    def target(self) -> int:
        return self._target

    @property
    def state(self) -> ControllerState:
        return self._state

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def baseline_bps(self) -> float | None:
        """Goodput measured at the current count (None before the first measurement)."""
        return self._baseline_bps

    def next_event(self) -> StreamCountChange | None:
        return self._events.popleft() if self._events else None

    # ---- inputs ----

    def observe_goodput(self, bps: float, now: float, app_limited: bool = False) -> StreamCountChange | None:
        """Goodput of the whole session over the last interval (all streams together)."""
        if not (math.isfinite(bps) and bps >= 0):
            raise ControllerConfigError("goodput must be a non-negative number of bit/s", bps=bps)
        self.tick(now)
        if app_limited or self._state is ControllerState.SETTLING:
            return None
        keep = max(self._c.max_samples_per_decision, self._c.shift_samples)
        self._samples = [*self._samples, bps][-keep:]
        if now - self._changed_at < self._c.min_change_interval_s:
            return None
        if self._state is ControllerState.STABLE:
            if len(self._samples) < self._c.shift_samples:
                return None
            return self._watch(statistics.median(self._samples[-self._c.shift_samples :]), now)
        if not self._precise_enough():
            return None
        return self._decide(statistics.median(self._samples), now)

    def _precise_enough(self) -> bool:
        """Enough samples for a decision: the minimum, plus more while they scatter widely."""
        n = len(self._samples)
        if n < self._c.samples_per_decision:
            return False
        if n >= self._c.max_samples_per_decision or n < 2:
            return True
        mean = statistics.fmean(self._samples)
        if mean <= 0:
            return True
        relative_error = statistics.stdev(self._samples) / math.sqrt(n) / mean
        return relative_error <= self._c.max_relative_error

    def observe_loss(self, retransmitted: int, sent: int, now: float) -> None:
        """Segments retransmitted and sent (deltas) since the previous call, all streams together."""
        if retransmitted < 0 or sent < 0:
            raise ControllerConfigError(
                "loss figures are non-negative deltas", retransmitted=retransmitted, sent=sent
            )
        self.tick(now)
        if self._state is not ControllerState.SETTLING:
            self._retrans += retransmitted
            self._sent += sent

    def on_mode(
        self, mode: Mode, now: float, *, rtt_s: float | None = None, bandwidth_bps: float | None = None
    ) -> StreamCountChange | None:
        """The mode changed: re-plan from the bandwidth-delay product within the new bounds."""
        if mode == self._mode:
            return None
        self._mode = mode
        if rtt_s is not None:
            self._rtt_s = rtt_s
        bw = bandwidth_bps if bandwidth_bps is not None else self._baseline_bps
        target = initial_streams(mode, self._c, self._rtt_s, bw, self._loss())
        self._hold_s = self._c.hold_s
        self._tried_down = False
        return self._change(target, now, f"mode {mode.value}", None, ControllerState.MEASURING)

    def on_mode_change(self, change: ModeChange) -> StreamCountChange | None:
        """Adapter for :meth:`novacron.dwcp.mode.ModeDetector.subscribe`."""
        est = change.estimates
        return self.on_mode(change.mode, change.at, rtt_s=est.rtt_s, bandwidth_bps=est.bandwidth_bps)

    def tick(self, now: float) -> None:
        """Advance time: settling ends `settle_s` after a change."""
        if self._state is ControllerState.SETTLING and now - self._changed_at >= self._c.settle_s:
            self._state = self._after_settle
            self._samples = []
            self._retrans = self._sent = 0

    # ---- decisions ----

    def _loss(self) -> float | None:
        return self._retrans / self._sent if self._sent > 0 else None

    def _step(self, count: int) -> int:
        return max(1, round(count * self._c.step_fraction))

    def _decide(self, goodput: float, now: float) -> StreamCountChange | None:
        """MEASURING finished: judge the running probe (or start one from a fresh baseline)."""
        probe, loss = self._probe, self._loss()
        low = self._c.bounds[self._mode][0]
        if probe is None:
            self._baseline_bps = goodput
            return self._start_probe(goodput, loss, now, "probe up")
        if probe.direction is ProbeDirection.UP:
            jumped = loss is not None and loss > (probe.baseline_loss or 0.0) + self._c.loss_jump
            if goodput > probe.baseline_bps * (1 + self._c.gain_margin) and not jumped:
                self._baseline_bps = goodput
                self._hold_s = self._c.hold_s
                return self._start_probe(goodput, loss, now, "probe up gained; probe further")
            why = "loss rose" if jumped else "no gain"
            if not self._tried_down and probe.origin > low:
                # Back below where the probe began: do fewer streams carry as much?
                self._tried_down = True
                down = _Probe(ProbeDirection.DOWN, probe.origin, probe.baseline_bps, probe.baseline_loss)
                target = probe.origin - self._step(probe.origin)
                return self._change(
                    target, now, f"probe up: {why}; probe down", down, ControllerState.MEASURING
                )
            return self._revert(probe, now, f"probe up: {why}; revert")
        if goodput >= probe.baseline_bps * (1 - self._c.drop_margin):
            self._baseline_bps = goodput
            if self._target > low:
                # Further steps are judged against the best level seen, so small losses cannot add up.
                best = max(goodput, probe.baseline_bps)
                down = _Probe(ProbeDirection.DOWN, self._target, best, probe.baseline_loss)
                target = self._target - self._step(self._target)
                return self._change(
                    target, now, "probe down held; probe further", down, ControllerState.MEASURING
                )
            self._stable(now)
            return None
        return self._revert(probe, now, "probe down lost goodput; revert")

    def _start_probe(
        self, goodput: float, loss: float | None, now: float, reason: str
    ) -> StreamCountChange | None:
        low, high = self._c.bounds[self._mode]
        if self._target < high:
            up = _Probe(ProbeDirection.UP, self._target, goodput, loss)
            target = self._target + self._step(self._target)
            return self._change(target, now, reason, up, ControllerState.MEASURING)
        if not self._tried_down and self._target > low:
            self._tried_down = True
            down = _Probe(ProbeDirection.DOWN, self._target, goodput, loss)
            target = self._target - self._step(self._target)
            return self._change(target, now, "at maximum; probe down", down, ControllerState.MEASURING)
        self._stable(now)
        return None

    def _revert(self, probe: _Probe, now: float, reason: str) -> StreamCountChange | None:
        self._baseline_bps = probe.baseline_bps
        self._hold_until = now + self._hold_s
        self._hold_s = min(self._c.max_hold_s, self._hold_s * 2)
        return self._change(probe.origin, now, reason, None, ControllerState.STABLE)

    def _stable(self, now: float) -> None:
        self._state = ControllerState.STABLE
        self._probe = None
        self._samples = []
        self._hold_until = now + self._hold_s

    def _watch(self, goodput: float, now: float) -> StreamCountChange | None:
        """STABLE: a clear shift of goodput, or the end of the hold, starts a new probe."""
        base = self._baseline_bps
        if base is not None and base > 0 and abs(goodput - base) / base > self._c.shift_fraction:
            self._hold_s = self._c.hold_s
            self._tried_down = False
            self._baseline_bps = goodput
            return self._start_probe(goodput, self._loss(), now, "goodput shifted; probe up")
        if now >= self._hold_until:
            self._baseline_bps = goodput
            self._tried_down = True  # periodic probes only look upwards
            return self._start_probe(goodput, self._loss(), now, "periodic probe up")
        return None

    def _change(
        self, target: int, now: float, reason: str, probe: _Probe | None, after: ControllerState
    ) -> StreamCountChange | None:
        low, high = self._c.bounds[self._mode]
        target = max(low, min(high, target))
        self._probe = probe
        self._samples = []
        self._retrans = self._sent = 0
        self._state = ControllerState.SETTLING
        self._after_settle = after
        self._changed_at = now
        if target == self._target:
            return None
        change = StreamCountChange(self._target, target, now, reason, self._baseline_bps)
        self._target = target
        self.changes += 1
        self._events.append(change)
        self.history.append(change)
        return change
