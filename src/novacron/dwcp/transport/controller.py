"""The stream-count controller: how many TCP streams an AMST session should use. Sans-IO.

Theory of operation
-------------------
One TCP stream is limited by its window (window / RTT) and, on a lossy path, by its loss recovery
(Mathis et al.: about MSS / RTT * 1.22 / sqrt(loss)) if its congestion control backs off on loss
(Reno, CUBIC: ``loss_limited``; BBR is not, so only the window counts for it). The controller
starts from that: enough streams for the link's bandwidth, clamped to the bounds of the current mode
(internet 4-16, hybrid 2-8, datacenter 1-4 by default).

The mode's minimum is a guess for paths nothing was measured on; measurements override it. *One
stream fills the path* when the RTT and bandwidth are measured, the RTT is at most
`one_stream_max_rtt_s`, the single-stream model above carries the bandwidth with
`one_stream_headroom` to spare, and the path loss is at most `one_stream_max_loss`. Then the floor
is 1 instead of the mode's minimum, the start is 1, and only a probe that raises goodput adds
streams (extra TLS streams cost CPU and, sharing one bottleneck, overshoot it together). Unknown
path loss (too few segments yet) does not stop the rule; when the path loss measured later says one
stream does not fill the path after all (Mathis for a loss-limited stream, or above
`one_stream_max_loss`), the next decision restores the mode's minimum, for as long as the mode
holds. A path whose loss is known to be too high at the start never goes below the mode's minimum.

Why an RTT limit: loss cannot be told from a full queue with BBR (below), and every loss holds one
stream's data back for about an RTT of recovery while the receiver reassembles behind it. With
several streams the others keep delivering and late chunks are resent on them (docs/transport.md
section 3); with one there is no other path. At short RTTs that stall is short; long lossy paths
keep the mode's minimum, where the benchmark's lossy links ran at or above one stream's figures.

For a loss-tolerant stream (BBR) `one_stream_max_loss` is deliberately high (5%): BBR keeps a
shallow bottleneck queue overflowing a little all the time, so loss does not tell a lossy path from
a clean one. Measured on the WAN emulator with one BBR stream of an AMST session: a median 0.87%
per reading on a lossless 1 Gbit/s x 10 ms link and 0.89% on a 100 Mbit/s x 50 ms link with 1%
random loss.

*Path loss* is the median of per-reading loss ratios (:class:`PathLoss`), not a total: bursts (a
start-up overshoot, a stream joining) move a total but not the median.

Then the controller hill-climbs on measured goodput:

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
MAX_LOSS_READINGS = 256

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
    one_stream_max_loss: float = 0.05  # path loss above which one stream is not trusted alone
    one_stream_headroom: float = 1.25  # one stream's window / RTT over the bandwidth it must carry
    one_stream_max_rtt_s: float = 0.025  # longer paths keep the mode's minimum (module docstring)
    loss_min_segments: int = 1000  # segments sent before a loss ratio means anything
    loss_reading_min_segments: int = 100  # a reading with fewer says nothing about path loss
    loss_min_readings: int = 4  # readings before path loss is known
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
        if not 0 <= self.one_stream_max_loss < 1:
            raise ControllerConfigError(
                "one_stream_max_loss is a fraction in [0, 1)", value=self.one_stream_max_loss
            )
        if not (math.isfinite(self.one_stream_max_rtt_s) and self.one_stream_max_rtt_s >= 0):
            raise ControllerConfigError(
                "one_stream_max_rtt_s must not be negative", value=self.one_stream_max_rtt_s
            )
        if not (math.isfinite(self.one_stream_headroom) and self.one_stream_headroom >= 1):
            raise ControllerConfigError(
                "one_stream_headroom must be at least 1", value=self.one_stream_headroom
            )
        for name in ("loss_min_segments", "loss_reading_min_segments", "loss_min_readings"):
            if getattr(self, name) < 1:
                raise ControllerConfigError(f"{name} must be at least 1", **{name: getattr(self, name)})
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


def one_stream_fills(
    config: ControllerConfig, rtt_s: float | None, bandwidth_bps: float | None, loss: float | None
) -> bool:
    """Measurements say one stream is neither window- nor loss-limited on this path.

    Needs an RTT and a bandwidth (nothing measured proves nothing); ``loss`` None means too few
    segments were sent to tell, which counts as low until a measurement says otherwise.
    """
    if rtt_s is None or bandwidth_bps is None or not (rtt_s > 0 and bandwidth_bps > 0):
        return False
    if rtt_s > config.one_stream_max_rtt_s:
        return False
    if loss is not None and loss > config.one_stream_max_loss:
        return False
    return single_stream_bps(rtt_s, loss, config) >= bandwidth_bps * config.one_stream_headroom


def stream_floor(
    mode: Mode,
    config: ControllerConfig,
    rtt_s: float | None = None,
    bandwidth_bps: float | None = None,
    loss: float | None = None,
) -> int:
    """The fewest streams the controller may use: 1 where one stream fills the path, else the mode's
    minimum."""
    return 1 if one_stream_fills(config, rtt_s, bandwidth_bps, loss) else config.bounds[mode][0]


def initial_streams(
    mode: Mode,
    config: ControllerConfig,
    rtt_s: float | None = None,
    bandwidth_bps: float | None = None,
    loss: float | None = None,
) -> int:
    """Streams needed to fill `bandwidth_bps` given what one stream carries, within the mode's
    maximum and :func:`stream_floor`.

    Without an RTT and a bandwidth there is no product to start from: the mode's minimum is used.
    """
    low = stream_floor(mode, config, rtt_s, bandwidth_bps, loss)
    high = config.bounds[mode][1]
    if rtt_s is None or bandwidth_bps is None or rtt_s <= 0 or bandwidth_bps <= 0:
        return low
    need = math.ceil(bandwidth_bps / single_stream_bps(rtt_s, loss, config))
    return max(low, min(high, need))


class PathLoss:
    """The loss ratio of a path from successive TCP_INFO readings (retransmitted / sent segments).

    The median of the readings' ratios: random loss shows in (nearly) every reading, while a start-up
    overshoot or a stream joining drops in bursts, which move a total but not the median. (BBR's
    steady overflow of a shallow queue is not a burst: see the module docstring.) Readings with fewer than
    `loss_reading_min_segments` are skipped; the ratio is known after `loss_min_readings` readings
    and `loss_min_segments` segments. Bounded: the latest MAX_LOSS_READINGS readings count.
    """

    def __init__(self, config: ControllerConfig) -> None:
        self._c = config
        self._ratios: deque[float] = deque(maxlen=MAX_LOSS_READINGS)
        self.segments = 0

    def add(self, retransmitted: int, sent: int) -> None:
        if sent < self._c.loss_reading_min_segments or retransmitted < 0:
            return
        self._ratios.append(retransmitted / sent)
        self.segments += sent

    def ratio(self) -> float | None:
        if len(self._ratios) < self._c.loss_min_readings or self.segments < self._c.loss_min_segments:
            return None
        return statistics.median(self._ratios)


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
        self._planned_bps = bandwidth_bps  # the bandwidth the floor was planned for
        self._floor = stream_floor(mode, self._c, rtt_s, bandwidth_bps, loss)
        self._target = initial_streams(mode, self._c, rtt_s, bandwidth_bps, loss)
        self._state = ControllerState.SETTLING
        self._after_settle = ControllerState.MEASURING
        self._changed_at = now
        self._samples: list[float] = []
        self._retrans = 0
        self._sent = 0
        self._path_loss = PathLoss(self._c)
        self._probe: _Probe | None = None
        self._baseline_bps: float | None = None
        self._tried_down = False
        self._hold_s = self._c.hold_s
        self._hold_until = now
        self._events: deque[StreamCountChange] = deque(maxlen=MAX_PENDING_EVENTS)
        self.history: deque[StreamCountChange] = deque(maxlen=HISTORY_LIMIT)
        self.changes = 0
        first = StreamCountChange(
            0, self._target, now, _plan_reason(f"initial ({mode.value})", self._c, rtt_s, bandwidth_bps, loss)
        )
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
    def floor(self) -> int:
        """The fewest streams allowed now (see :func:`stream_floor`)."""
        return self._floor

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
        if self._loss_disproves_one_stream():
            self._floor = self._c.bounds[self._mode][0]
            if self._target < self._floor:
                return self._raise_to_floor(now)
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
            self._path_loss.add(retransmitted, sent)

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
        loss = self._path_loss.ratio()
        self._planned_bps = bw
        self._floor = stream_floor(mode, self._c, self._rtt_s, bw, loss)
        target = initial_streams(mode, self._c, self._rtt_s, bw, loss)
        self._hold_s = self._c.hold_s
        self._tried_down = False
        reason = _plan_reason(f"mode {mode.value}", self._c, self._rtt_s, bw, loss)
        return self._change(target, now, reason, None, ControllerState.MEASURING)

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
            self._path_loss = PathLoss(self._c)

    # ---- decisions ----

    def _loss(self) -> float | None:
        """Retransmitted / sent since the last change (None until `loss_min_segments` were sent)."""
        return self._retrans / self._sent if self._sent >= self._c.loss_min_segments else None

    def _loss_disproves_one_stream(self) -> bool:
        """One stream was trusted to fill the path, but the path loss measured since says otherwise."""
        if self._floor >= self._c.bounds[self._mode][0]:
            return False  # the usual case: no median to take
        loss = self._path_loss.ratio()
        return loss is not None and not one_stream_fills(self._c, self._rtt_s, self._planned_bps, loss)

    def _raise_to_floor(self, now: float) -> StreamCountChange | None:
        self._hold_s = self._c.hold_s
        self._tried_down = False
        loss = self._path_loss.ratio() or 0.0
        reason = f"path loss {loss:.2%} measured: back to the {self._mode.value} minimum"
        return self._change(self._floor, now, reason, None, ControllerState.MEASURING)

    def _step(self, count: int) -> int:
        return max(1, round(count * self._c.step_fraction))

    def _decide(self, goodput: float, now: float) -> StreamCountChange | None:
        """MEASURING finished: judge the running probe (or start one from a fresh baseline)."""
        probe, loss = self._probe, self._loss()
        low = self._floor
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
                reason = _noted(f"probe up: {why}; probe down", loss)
                return self._change(target, now, reason, down, ControllerState.MEASURING)
            return self._revert(probe, now, _noted(f"probe up: {why}; revert", loss))
        if goodput >= probe.baseline_bps * (1 - self._c.drop_margin):
            self._baseline_bps = goodput
            if self._target > low:
                # Further steps are judged against the best level seen, so small losses cannot add up.
                best = max(goodput, probe.baseline_bps)
                down = _Probe(ProbeDirection.DOWN, self._target, best, probe.baseline_loss)
                target = self._target - self._step(self._target)
                reason = _noted("probe down held; probe further", loss)
                return self._change(target, now, reason, down, ControllerState.MEASURING)
            self._stable(now)
            return None
        return self._revert(probe, now, _noted("probe down lost goodput; revert", loss))

    def _start_probe(
        self, goodput: float, loss: float | None, now: float, reason: str
    ) -> StreamCountChange | None:
        low, high = self._floor, self._c.bounds[self._mode][1]
        if self._target < high:
            up = _Probe(ProbeDirection.UP, self._target, goodput, loss)
            target = self._target + self._step(self._target)
            return self._change(target, now, _noted(reason, loss), up, ControllerState.MEASURING)
        if not self._tried_down and self._target > low:
            self._tried_down = True
            down = _Probe(ProbeDirection.DOWN, self._target, goodput, loss)
            target = self._target - self._step(self._target)
            reason = _noted("at maximum; probe down", loss)
            return self._change(target, now, reason, down, ControllerState.MEASURING)
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
        target = max(self._floor, min(self._c.bounds[self._mode][1], target))
        self._probe = probe
        self._samples = []
        self._retrans = self._sent = 0
        self._path_loss = PathLoss(self._c)
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


def _plan_reason(
    what: str, config: ControllerConfig, rtt_s: float | None, bandwidth_bps: float | None, loss: float | None
) -> str:
    """The reason of a planned count, with the figures it rests on (they show in benchmarks and logs)."""
    if rtt_s is None or bandwidth_bps is None:
        return what
    basis = "one stream fills it" if one_stream_fills(config, rtt_s, bandwidth_bps, loss) else "product"
    shown = "unknown" if loss is None else f"{loss:.2%}"
    return f"{what}: {basis} ({bandwidth_bps / 1e6:.0f} Mbit/s x {rtt_s * 1e3:.1f} ms, loss {shown})"


def _noted(reason: str, loss: float | None) -> str:
    """A decision's reason with the loss measured at its level (shown in benchmarks and logs)."""
    return reason if loss is None else f"{reason} (loss {loss:.2%})"
