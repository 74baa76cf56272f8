"""The mode detector: the one place that decides whether a path is datacenter, hybrid or internet.

Sans-IO: measurements and the current time come in as arguments, mode changes come out as events
(returned from the call that caused them, queued for :meth:`ModeDetector.next_event`, and passed to
subscribers). Nothing here reads a clock or a socket, except :func:`read_tcp_info`, a small helper
the transport uses to turn a socket's ``TCP_INFO`` into measurements.

Theory of operation
-------------------
* RTT: a windowed *minimum* over ``rtt_window_s``. Queueing only ever adds delay, so the minimum is
  the path's propagation RTT; a busy link does not look farther away than it is.
* Bandwidth: a windowed *maximum* of goodput samples, because goodput is a lower bound of capacity.
  A sample taken while the sender was application-limited (it had nothing to send) says nothing
  about capacity when it is low, so it is only used when it raises the estimate. When every recent
  sample was application-limited the last real estimate is kept (an idle link did not get slower).
* Loss: retransmitted / sent segments over ``loss_window_s``. A lossy path is treated as internet
  only when its RTT is not datacenter-like; at datacenter RTTs bursts of retransmissions are normal
  for a TCP filling a fast link and say nothing about distance.
* Verdict (defaults): datacenter when RTT < 10 ms and bandwidth >= 1 Gbit/s; internet when RTT > 50
  ms or bandwidth < 1 Gbit/s (or loss >= 1% above datacenter RTTs); hybrid in between. Unknown
  bandwidth does not count against a mode: the RTT alone decides until goodput is measured.
* Hysteresis: every threshold is moved by ``hysteresis`` (relative) in favour of the current mode,
  so leaving a mode takes a clear crossing. A different verdict must then hold for ``confirm_s``,
  and two switches are at least ``min_dwell_s`` apart. A link wandering around a threshold
  therefore stays in one mode.
* The first decision waits for ``min_rtt_samples`` RTT samples and either a bandwidth sample or
  ``warmup_s`` of RTT history; until then the mode is the configured initial one.
* An operator override (:meth:`ModeDetector.force`) wins immediately; measurements continue, so
  releasing it returns at once to what they say.
"""

from __future__ import annotations

import math
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from novacron.errors import UserError


class Mode(StrEnum):
    """What kind of path a session runs over (the decision; the handshake only announces one)."""

    DATACENTER = "datacenter"
    HYBRID = "hybrid"
    INTERNET = "internet"


class ModeConfigError(UserError):
    """A mode-detector setting or input is invalid."""


@dataclass(frozen=True)
class ModeThresholds:
    """Thresholds and smoothing of the detector. Rates in bit/s, times in seconds."""

    datacenter_max_rtt_s: float = 0.010
    internet_min_rtt_s: float = 0.050
    datacenter_min_bandwidth_bps: float = 1e9
    internet_max_bandwidth_bps: float = 1e9
    internet_min_loss: float = 0.01
    hysteresis: float = 0.2
    confirm_s: float = 5.0
    min_dwell_s: float = 30.0
    rtt_window_s: float = 30.0
    bandwidth_window_s: float = 30.0
    loss_window_s: float = 30.0
    min_rtt_samples: int = 3
    min_loss_segments: int = 1000
    warmup_s: float = 5.0
    initial_mode: Mode = Mode.HYBRID

    def __post_init__(self) -> None:
        positive = (
            "datacenter_max_rtt_s",
            "internet_min_rtt_s",
            "datacenter_min_bandwidth_bps",
            "internet_max_bandwidth_bps",
            "rtt_window_s",
            "bandwidth_window_s",
            "loss_window_s",
        )
        for name in positive:
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ModeConfigError(f"{name} must be a positive number", **{name: value})
        for name in ("confirm_s", "min_dwell_s", "warmup_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ModeConfigError(f"{name} must not be negative", **{name: value})
        if self.datacenter_max_rtt_s > self.internet_min_rtt_s:
            raise ModeConfigError(
                "the datacenter RTT bound must not exceed the internet one",
                datacenter_max_rtt_s=self.datacenter_max_rtt_s,
                internet_min_rtt_s=self.internet_min_rtt_s,
            )
        if self.internet_max_bandwidth_bps > self.datacenter_min_bandwidth_bps:
            raise ModeConfigError(
                "the internet bandwidth bound must not exceed the datacenter one",
                internet_max_bandwidth_bps=self.internet_max_bandwidth_bps,
                datacenter_min_bandwidth_bps=self.datacenter_min_bandwidth_bps,
            )
        if not 0 <= self.hysteresis < 1:
            raise ModeConfigError("hysteresis is a fraction in [0, 1)", hysteresis=self.hysteresis)
        if not 0 < self.internet_min_loss <= 1:
            raise ModeConfigError("internet_min_loss is a fraction in (0, 1]", value=self.internet_min_loss)
        if self.min_rtt_samples < 1 or self.min_loss_segments < 1:
            raise ModeConfigError(
                "sample minimums must be at least 1",
                min_rtt_samples=self.min_rtt_samples,
                min_loss_segments=self.min_loss_segments,
            )


@dataclass(frozen=True)
class ModeEstimates:
    """The smoothed measurements a verdict is made from (None: not measured yet)."""

    rtt_s: float | None
    bandwidth_bps: float | None
    loss: float | None


@dataclass(frozen=True)
class ModeChange:
    """An event: the effective mode changed."""

    previous: Mode
    mode: Mode
    at: float
    reason: str  # "measured", "first measurement", "forced", "override released"
    estimates: ModeEstimates


@dataclass
class ModeMetrics:
    """Counters for the metrics endpoint (read them; the detector updates them)."""

    mode: Mode
    switches: int = 0
    transitions: dict[tuple[Mode, Mode], int] = field(default_factory=dict)
    rtt_samples: int = 0
    bandwidth_samples: int = 0
    loss_samples: int = 0


MAX_PENDING_EVENTS = 64
"""Events kept for :meth:`ModeDetector.next_event`; older ones are dropped (subscribers see all)."""


class _WindowedExtreme:
    """Min (or max) over a sliding time window, in constant memory: the window is split into buckets
    that each keep their extreme; the estimate is the extreme of the buckets still inside it."""

    BUCKETS = 10

    def __init__(self, window_s: float, want_max: bool) -> None:
        self._width = window_s / self.BUCKETS
        self._window = window_s
        self._max = want_max
        self._buckets: deque[tuple[float, float]] = deque()  # (bucket start, extreme)
        self.stale: float | None = None  # the estimate when the window last ran empty

    def add(self, value: float, now: float) -> None:
        start = math.floor(now / self._width) * self._width
        if self._buckets and self._buckets[-1][0] >= start:
            _, ext = self._buckets[-1]
            better = value > ext if self._max else value < ext
            if better:
                self._buckets[-1] = (self._buckets[-1][0], value)
        else:
            self._buckets.append((start, value))
        self._expire(now)

    def _expire(self, now: float) -> None:
        gone = []
        while self._buckets and self._buckets[0][0] + self._width <= now - self._window:
            gone.append(self._buckets.popleft()[1])
        if gone and not self._buckets:
            self.stale = max(gone) if self._max else min(gone)

    def best(self, now: float) -> float | None:
        """The windowed extreme, or the last one known if no sample is recent enough."""
        value = self.value(now)
        return value if value is not None else self.stale

    def value(self, now: float) -> float | None:
        self._expire(now)
        if not self._buckets:
            return None
        values = [v for _, v in self._buckets]
        return max(values) if self._max else min(values)


class _WindowedRatio:
    """Sum of numerators over sum of denominators in a sliding time window (bucketed)."""

    BUCKETS = 10

    def __init__(self, window_s: float) -> None:
        self._width = window_s / self.BUCKETS
        self._window = window_s
        self._buckets: deque[list[float]] = deque()  # [bucket start, numerator, denominator]

    def add(self, num: float, den: float, now: float) -> None:
        start = math.floor(now / self._width) * self._width
        if self._buckets and self._buckets[-1][0] >= start:
            self._buckets[-1][1] += num
            self._buckets[-1][2] += den
        else:
            self._buckets.append([start, num, den])
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] + self._width <= now - self._window:
            self._buckets.popleft()

    def totals(self, now: float) -> tuple[float, float]:
        self._expire(now)
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)


class ModeDetector:
    """Decides the mode from RTT, bandwidth and loss samples. See the module docstring."""

    def __init__(self, thresholds: ModeThresholds | None = None, initial: Mode | None = None) -> None:
        self._t = thresholds or ModeThresholds()
        self._measured = initial or self._t.initial_mode
        self._forced: Mode | None = None
        self._decided = False
        self._rtt = _WindowedExtreme(self._t.rtt_window_s, want_max=False)
        self._bw = _WindowedExtreme(self._t.bandwidth_window_s, want_max=True)
        self._loss = _WindowedRatio(self._t.loss_window_s)
        self._rtt_count = 0
        self._first_rtt_at: float | None = None
        self._pending: Mode | None = None
        self._pending_since = 0.0
        self._last_switch_at: float | None = None
        self._events: deque[ModeChange] = deque(maxlen=MAX_PENDING_EVENTS)
        self._subscribers: list[Callable[[ModeChange], None]] = []
        self._watchers: list[Callable[[], None]] = []
        self.metrics = ModeMetrics(mode=self.mode)

    # ---- what others read ----

    @property
    def thresholds(self) -> ModeThresholds:
        return self._t

    @property
    def mode(self) -> Mode:
        """The effective mode: the operator's override if set, else the measured one."""
        return self._forced if self._forced is not None else self._measured

    @property
    def measured_mode(self) -> Mode:
        return self._measured

    @property
    def forced(self) -> Mode | None:
        return self._forced

    @property
    def decided(self) -> bool:
        """Whether the measured mode comes from measurements yet (not the initial guess)."""
        return self._decided

    def estimates(self, now: float) -> ModeEstimates:
        retrans, sent = self._loss.totals(now)
        loss = retrans / sent if sent >= self._t.min_loss_segments else None
        return ModeEstimates(rtt_s=self._rtt.value(now), bandwidth_bps=self._bw.best(now), loss=loss)

    def subscribe(self, callback: Callable[[ModeChange], None]) -> Callable[[], None]:
        """Call `callback` with every future mode change; returns a function that unsubscribes."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    def watch(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` after every measurement taken in (whether or not the mode changed), so
        a waiter can re-check :meth:`verdict_so_far`; returns a function that unsubscribes."""
        self._watchers.append(callback)
        return lambda: self._watchers.remove(callback) if callback in self._watchers else None

    def verdict_so_far(self, now: float) -> Mode | None:
        """The effective mode once decided; before the first decision, what the RTT (and any
        bandwidth) samples so far say, once there are ``min_rtt_samples`` of them; else None.

        For one-off choices that cannot wait ``warmup_s`` (a migration's plan): the RTT settles the
        verdict in most cases, and the session's own mode still waits for the full first decision."""
        if self._forced is not None or self._decided:
            return self.mode
        if self._rtt_count < self._t.min_rtt_samples:
            return None
        return self._verdict(self.estimates(now), None)

    def next_event(self) -> ModeChange | None:
        return self._events.popleft() if self._events else None

    # ---- inputs ----

    def observe_rtt(self, rtt_s: float, now: float) -> ModeChange | None:
        if not (math.isfinite(rtt_s) and rtt_s > 0):
            raise ModeConfigError("an RTT sample must be a positive number of seconds", rtt_s=rtt_s)
        self._rtt.add(rtt_s, now)
        self._rtt_count += 1
        self.metrics.rtt_samples += 1
        if self._first_rtt_at is None:
            self._first_rtt_at = now
        return self.tick(now)

    def observe_bandwidth(self, bps: float, now: float, app_limited: bool = False) -> ModeChange | None:
        """A goodput sample. `app_limited`: the sender ran out of data during it (see the docstring)."""
        if not (math.isfinite(bps) and bps >= 0):
            raise ModeConfigError("a bandwidth sample must be a non-negative number of bit/s", bps=bps)
        if app_limited:
            current = self._bw.best(now)
            if current is not None and bps <= current:
                return self.tick(now)
        self._bw.add(bps, now)
        self.metrics.bandwidth_samples += 1
        return self.tick(now)

    def observe_loss(self, retransmitted: int, sent: int, now: float) -> ModeChange | None:
        """Segments retransmitted and sent since the previous call (deltas, e.g. of TCP_INFO)."""
        if retransmitted < 0 or sent < 0:
            raise ModeConfigError(
                "loss figures are non-negative deltas", retransmitted=retransmitted, sent=sent
            )
        self._loss.add(retransmitted, sent, now)
        self.metrics.loss_samples += 1
        return self.tick(now)

    def observe_tcp_info(
        self, info: TcpInfo, now: float, previous: TcpInfo | None = None
    ) -> ModeChange | None:
        """Feed one socket's TCP_INFO: its smoothed RTT, its delivery rate, and (given the previous
        reading of the same socket) the retransmissions since then."""
        changes = []
        if info.rtt_s > 0:
            changes.append(self.observe_rtt(info.rtt_s, now))
        if info.delivery_rate_bps is not None and info.delivery_rate_bps > 0:
            changes.append(
                self.observe_bandwidth(info.delivery_rate_bps, now, info.delivery_rate_app_limited)
            )
        if previous is not None:
            sent = info.data_segs_out - previous.data_segs_out
            retrans = info.total_retrans - previous.total_retrans
            if sent > 0 and retrans >= 0:
                changes.append(self.observe_loss(retrans, sent, now))
        found = [c for c in changes if c is not None]
        return found[-1] if found else None

    def force(self, mode: Mode | None, now: float) -> ModeChange | None:
        """Operator override: pin the mode (None releases it and returns to the measured mode)."""
        before = self.mode
        released = self._forced is not None and mode is None
        self._forced = mode
        if self.mode == before:
            return None
        return self._emit(before, self.mode, now, "override released" if released else "forced")

    def tick(self, now: float) -> ModeChange | None:
        """Re-evaluate without a new sample (lets a pending change complete after `confirm_s`)."""
        change = self._evaluate(now)
        for callback in list(self._watchers):
            callback()
        return change

    def _evaluate(self, now: float) -> ModeChange | None:
        est = self.estimates(now)
        if not self._ready(now):
            return None
        if not self._decided:
            self._decided = True
            verdict = self._verdict(est, None)
            self._last_switch_at = now
            return self._set_measured(verdict, now, "first measurement", est)
        verdict = self._verdict(est, self._measured)
        if verdict == self._measured:
            self._pending = None
            return None
        if verdict != self._pending:
            self._pending = verdict
            self._pending_since = now
        confirmed = now - self._pending_since >= self._t.confirm_s
        dwelt = self._last_switch_at is None or now - self._last_switch_at >= self._t.min_dwell_s
        if not (confirmed and dwelt):
            return None
        self._pending = None
        self._last_switch_at = now
        return self._set_measured(verdict, now, "measured", est)

    # ---- decision ----

    def _ready(self, now: float) -> bool:
        if self._rtt_count < self._t.min_rtt_samples or self._first_rtt_at is None:
            return False
        has_bw = self._bw.best(now) is not None
        return has_bw or now - self._first_rtt_at >= self._t.warmup_s

    def _verdict(self, est: ModeEstimates, current: Mode | None) -> Mode:
        """Classify the estimates; thresholds lean towards `current` by the hysteresis margin."""
        t, m = self._t, self._t.hysteresis
        if est.rtt_s is None:
            return current or self._measured

        def lean(value: float, mode: Mode, holds_above: bool) -> float:
            # `mode` holds when the measurement is above (or below) `value`. If it is the current
            # mode the threshold moves so that staying is easier; otherwise entering is made harder.
            if current is None:
                return value
            easier = current == mode
            return value * (1 - m) if easier == holds_above else value * (1 + m)

        rtt, bw, loss = est.rtt_s, est.bandwidth_bps, est.loss
        dc_rtt = lean(t.datacenter_max_rtt_s, Mode.DATACENTER, holds_above=False)
        if (
            rtt > lean(t.internet_min_rtt_s, Mode.INTERNET, holds_above=True)
            or (bw is not None and bw < lean(t.internet_max_bandwidth_bps, Mode.INTERNET, holds_above=False))
            or (
                loss is not None
                and rtt >= dc_rtt
                and loss >= lean(t.internet_min_loss, Mode.INTERNET, holds_above=True)
            )
        ):
            return Mode.INTERNET
        dc_bw = lean(t.datacenter_min_bandwidth_bps, Mode.DATACENTER, holds_above=True)
        if rtt < dc_rtt and (bw is None or bw >= dc_bw):
            return Mode.DATACENTER
        return Mode.HYBRID

    def _set_measured(self, verdict: Mode, now: float, reason: str, est: ModeEstimates) -> ModeChange | None:
        before = self.mode
        self._measured = verdict
        if self.mode == before:
            return None
        return self._emit(before, self.mode, now, reason, est)

    def _emit(
        self, before: Mode, after: Mode, now: float, reason: str, est: ModeEstimates | None = None
    ) -> ModeChange:
        change = ModeChange(before, after, now, reason, est or self.estimates(now))
        self.metrics.mode = after
        self.metrics.switches += 1
        key = (before, after)
        self.metrics.transitions[key] = self.metrics.transitions.get(key, 0) + 1
        self._events.append(change)
        for callback in list(self._subscribers):
            callback(change)
        return change


# ---- TCP_INFO ----

_TCP_INFO_LEN = 512


@dataclass(frozen=True)
class TcpInfo:
    """The parts of Linux's ``struct tcp_info`` the transport and the detector use (SI units)."""

    state: int
    ca_state: int
    rtt_s: float
    rttvar_s: float
    min_rtt_s: float | None
    snd_cwnd: int
    snd_mss: int
    total_retrans: int
    data_segs_out: int
    bytes_acked: int
    bytes_retrans: int | None
    pacing_rate_bps: float | None
    delivery_rate_bps: float | None
    delivery_rate_app_limited: bool


def parse_tcp_info(raw: bytes) -> TcpInfo:
    """Decode ``getsockopt(TCP_INFO)`` bytes; fields newer than the running kernel come back None."""
    if len(raw) < 104:
        raise ModeConfigError("TCP_INFO too short", length=len(raw))
    state, ca_state = raw[0], raw[1]
    app_limited = bool(raw[7] & 1)
    snd_mss = struct.unpack_from("=I", raw, 16)[0]
    rtt_us, rttvar_us = struct.unpack_from("=II", raw, 68)
    snd_cwnd = struct.unpack_from("=I", raw, 80)[0]
    total_retrans = struct.unpack_from("=I", raw, 100)[0]

    def u64(off: int) -> int | None:
        return struct.unpack_from("=Q", raw, off)[0] if len(raw) >= off + 8 else None

    def u32(off: int) -> int | None:
        return struct.unpack_from("=I", raw, off)[0] if len(raw) >= off + 4 else None

    pacing = u64(104)
    min_rtt_us = u32(148)
    delivery_bytes_per_s = u64(160)
    return TcpInfo(
        state=state,
        ca_state=ca_state,
        rtt_s=rtt_us / 1e6,
        rttvar_s=rttvar_us / 1e6,
        min_rtt_s=None if min_rtt_us in (None, 0, 0xFFFFFFFF) else min_rtt_us / 1e6,
        snd_cwnd=snd_cwnd,
        snd_mss=snd_mss,
        total_retrans=total_retrans,
        data_segs_out=u32(156) or 0,
        bytes_acked=u64(120) or 0,
        bytes_retrans=u64(208),
        pacing_rate_bps=None if pacing in (None, 2**64 - 1) else pacing * 8.0,
        delivery_rate_bps=None if delivery_bytes_per_s is None else delivery_bytes_per_s * 8.0,
        delivery_rate_app_limited=app_limited,
    )


def read_tcp_info(sock: socket.socket) -> TcpInfo:
    """Read TCP_INFO of a connected TCP socket (Linux)."""
    return parse_tcp_info(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN))
