"""What the transport measures, and the decisions made from it. Sans-IO.

The :class:`PathMonitor` of a session is fed with

* RTT samples: PING/PONG round trips, and each stream's kernel-smoothed RTT from ``TCP_INFO``;
* loss: each stream's retransmitted and sent segments (``TCP_INFO`` deltas, summed over streams);
* goodput: every ``sample_interval_s`` the bytes the peer acknowledged (send direction) and the bytes
  delivered to us (receive direction), with whether the sender was application- or window-limited.

and passes them on to the one :class:`~novacron.dwcp.mode.ModeDetector` of the session (which alone
decides the mode) and, on the side that opened the session (only it can add streams), to the
:class:`~novacron.dwcp.transport.controller.StreamCountController`. Received goodput is a lower bound
of the path's capacity, so the detector gets it as an application-limited sample (it may only raise
the estimate, and never becomes the first estimate: light traffic must not make a fast path look
slow); the controller only judges the send direction, which it can influence.

Start-up: while goodput still grows by more than ``STARTUP_GROWTH`` per sample (TCP and the send
budget ramping up), samples are held back from the detector, whose first decision would otherwise
rest on a ramp-up figure; the best of them is passed on when growth stops (two samples without it),
or after ``STARTUP_MAX_S``.

From the detector's estimates it derives the send budget (bytes written but not yet acknowledged):
``budget_rtt_factor x bandwidth x RTT`` within ``[budget_floor, budget_max]``. A budget that limits
the sender shows up as goodput near ``budget / RTT``, which makes the next budget ``factor`` times
larger: it grows until the path, not the budget, is the limit, and no further. The controller is
created at the detector's first decision, from its RTT and the best bandwidth figure known (a
configured link rate, else the measured goodput), so its first target already follows the
bandwidth-delay product. The path loss it is given is measured after start-up only: a TCP
start-up overshoots the bottleneck's queue and drops what does not fit (2.2% of the segments on a
lossless 1 Gbit/s x 10 ms emulated link), which says nothing about the path's own loss. At the
controller's creation that figure is usually not known yet; the controller then measures path loss
itself and falls back to the mode's minimum if it is high (docs/transport.md section 6).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace

from novacron.dwcp.mode import Mode, ModeChange, ModeDetector, ModeThresholds, TcpInfo
from novacron.dwcp.transport.config import AmstConfig
from novacron.dwcp.transport.controller import (
    ControllerConfig,
    PathLoss,
    StreamCountChange,
    StreamCountController,
    initial_streams,
)
from novacron.dwcp.transport.tuning import LOSS_TOLERANT_CONTROLS

MAX_PENDING_EVENTS = 64
STARTUP_GROWTH = 1.25  # a sample this much above the best so far means goodput is still ramping up
STARTUP_PLATEAU_SAMPLES = 2
STARTUP_MAX_S = 4.0


@dataclass(frozen=True, slots=True)
class GoodputSample:
    """One interval's goodput, both directions, in bit/s."""

    at: float
    sent_bps: float
    received_bps: float
    app_limited: bool
    window_limited: bool


MonitorEvent = ModeChange | StreamCountChange


class PathMonitor:
    """Measurements in, mode / stream target / budget out. See the module docstring."""

    def __init__(
        self,
        now: float,
        *,
        config: AmstConfig,
        thresholds: ModeThresholds | None = None,
        controller: ControllerConfig | None = None,
        controls_streams: bool,
        initial_mode: Mode | None = None,
        link_bps: float | None = None,
        max_streams: int,
    ) -> None:
        self._config = config
        self.detector = ModeDetector(thresholds, initial=initial_mode)
        self._controller_config = controller or ControllerConfig()
        self._derive_controller = controller is None  # fill in what the streams really are
        self._controls = controls_streams
        self._link_bps = link_bps
        self._max_streams = max_streams
        self.controller: StreamCountController | None = None
        self._events: deque[MonitorEvent] = deque(maxlen=MAX_PENDING_EVENTS)
        self.detector.subscribe(self._on_mode)
        self._tcp_prev: dict[int, TcpInfo] = {}
        self._next_sample = now + config.sample_interval_s
        self._last_sample_at = now
        self._last_acked = 0
        self._last_delivered = 0
        self.last_sample: GoodputSample | None = None
        self.samples: deque[GoodputSample] = deque(maxlen=256)
        self.tcp_retransmits = 0
        self.tcp_segments = 0
        self._steady_loss = PathLoss(self._controller_config)  # after start-up (module docstring)
        self._started_at = now
        self._startup = True
        self._startup_sent = 0.0
        self._startup_sent_limited = True  # the best send sample was application/window-limited
        self._startup_received = 0.0
        self._plateau = 0

    # ---- what others read ----

    @property
    def mode(self) -> Mode:
        return self.detector.mode

    @property
    def target_streams(self) -> int:
        """Streams the session should have now (clamped to what the session may open)."""
        if self.controller is not None:
            target = self.controller.target
        else:
            target = initial_streams(self.detector.mode, self._controller_config)
        return max(1, min(self._max_streams, target))

    @property
    def in_startup(self) -> bool:
        return self._startup

    @property
    def steady_loss(self) -> float | None:
        """The path's loss measured after start-up (:class:`PathLoss`); None until known."""
        return self._steady_loss.ratio()

    def budget(self, now: float) -> int:
        c = self._config
        est = self.detector.estimates(now)
        bandwidth = self.rate_estimate(now)
        if bandwidth is None or est.rtt_s is None:
            return c.budget_initial
        want = c.budget_rtt_factor * bandwidth / 8 * est.rtt_s
        return int(max(c.budget_floor, min(c.budget_max, want)))

    def rate_estimate(self, now: float) -> float | None:
        """Bit/s the session can move, for sizing chunks and the budget (None until measured)."""
        measured = self.detector.estimates(now).bandwidth_bps
        ramp = max(self._startup_sent, self._startup_received) if self._startup else 0.0
        best = max(measured or 0.0, ramp)
        return best if best > 0 else None

    def next_event(self) -> MonitorEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float:
        return self._next_sample

    # ---- inputs ----

    def observe_rtt(self, rtt_s: float, now: float) -> None:
        if math.isfinite(rtt_s) and rtt_s > 0:
            self._decide(now, self.detector.observe_rtt(rtt_s, now))

    def observe_tcp_info(self, stream: int, info: TcpInfo, now: float) -> None:
        """One stream's TCP_INFO: its smoothed RTT, and its retransmissions since the last reading."""
        previous = self._tcp_prev.get(stream)
        self._tcp_prev[stream] = info
        if info.rtt_s > 0:
            self._decide(now, self.detector.observe_rtt(info.rtt_s, now))
        if previous is None:
            return
        sent = info.data_segs_out - previous.data_segs_out
        retrans = info.total_retrans - previous.total_retrans
        if sent > 0 and retrans >= 0:
            self.tcp_retransmits += retrans
            self.tcp_segments += sent
            if not self._startup:
                self._steady_loss.add(retrans, sent)
            self._decide(now, self.detector.observe_loss(retrans, sent, now))
            if self.controller is not None:
                self.controller.observe_loss(retrans, sent, now)

    def note_streams(self, congestion_control: str | None, window_bytes: int | None) -> None:
        """What the streams use (before the controller exists): with BBR one stream is not limited
        by loss, and its window is what the kernel's autotuning may reach."""
        if not self._derive_controller or self.controller is not None:
            return
        cfg = self._controller_config
        if congestion_control is not None:
            cfg = replace(cfg, loss_limited=congestion_control not in LOSS_TOLERANT_CONTROLS)
        if window_bytes is not None and window_bytes > 0:
            cfg = replace(cfg, stream_window_bytes=window_bytes)
        self._controller_config = cfg

    def forget_stream(self, stream: int) -> None:
        self._tcp_prev.pop(stream, None)

    def handle_timer(
        self, now: float, *, acked_bytes: int, delivered_bytes: int, app_limited: bool, window_limited: bool
    ) -> GoodputSample | None:
        """Take a goodput sample if one is due; ``*_bytes`` are the session's running totals."""
        if now < self._next_sample:
            return None
        elapsed = now - self._last_sample_at
        self._next_sample = now + self._config.sample_interval_s
        if elapsed <= 0:
            return None
        sent_bps = (acked_bytes - self._last_acked) * 8 / elapsed
        received_bps = (delivered_bytes - self._last_delivered) * 8 / elapsed
        self._last_acked, self._last_delivered, self._last_sample_at = acked_bytes, delivered_bytes, now
        sample = GoodputSample(now, sent_bps, received_bps, app_limited, window_limited)
        self.last_sample = sample
        self.samples.append(sample)
        limited = app_limited or window_limited
        if self._startup:
            self._ramp(sample, now)
            return sample
        self._feed_bandwidth(sent_bps, limited, now)
        self._feed_bandwidth(received_bps, True, now)
        if self.controller is not None:
            change = self.controller.observe_goodput(sent_bps, now, app_limited=limited)
            if change is not None:
                self._events.append(change)
        else:
            self.detector.tick(now)
            self._decide(now, None)
        return sample

    def _ramp(self, sample: GoodputSample, now: float) -> None:
        """Start-up: hold samples back until goodput stops growing (see the module docstring)."""
        best = max(self._startup_sent, self._startup_received)
        total = max(sample.sent_bps, sample.received_bps)
        if total > best * STARTUP_GROWTH:
            self._plateau = 0
        else:
            self._plateau += 1
        if sample.sent_bps > self._startup_sent:
            self._startup_sent = sample.sent_bps
            self._startup_sent_limited = sample.app_limited or sample.window_limited
        self._startup_received = max(self._startup_received, sample.received_bps)
        if self._plateau < STARTUP_PLATEAU_SAMPLES and now - self._started_at < STARTUP_MAX_S:
            self.detector.tick(now)
            return
        self._startup = False
        self._feed_bandwidth(self._startup_sent, self._startup_sent_limited, now)
        self._feed_bandwidth(self._startup_received, True, now)
        self._decide(now, None)

    def _feed_bandwidth(self, bps: float, limited: bool, now: float) -> None:
        """A limited sample is only a lower bound: it may raise an estimate, but it does not become
        the first one (light traffic must not look like a slow path; the RTT decides until then)."""
        if bps <= 0 and limited:
            return
        if limited and self.detector.estimates(now).bandwidth_bps is None:
            return
        self._decide(now, self.detector.observe_bandwidth(bps, now, app_limited=limited))

    # ---- decisions ----

    def _on_mode(self, change: ModeChange) -> None:
        self._events.append(change)
        if self.controller is not None:
            moved = self.controller.on_mode_change(change)
            if moved is not None:
                self._events.append(moved)

    def _decide(self, now: float, _change: ModeChange | None) -> None:
        """Create the controller at the detector's first decision (mode changes come via _on_mode)."""
        if not self._controls or self.controller is not None or not self.detector.decided:
            return
        est = self.detector.estimates(now)
        bandwidth = self._link_bps if self._link_bps is not None else est.bandwidth_bps
        self.controller = StreamCountController(
            self.detector.mode,
            now,
            config=self._controller_config,
            rtt_s=est.rtt_s,
            bandwidth_bps=bandwidth,
            loss=self.steady_loss,
        )
        first = self.controller.next_event()
        if first is not None:
            self._events.append(first)
