"""The stream-count controller, driven in virtual time against a simulated link."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import pytest

from novacron.dwcp.mode import Mode, ModeChange, ModeEstimates
from novacron.dwcp.transport.controller import (
    ControllerConfig,
    ControllerConfigError,
    ControllerState,
    PathLoss,
    StreamCountChange,
    StreamCountController,
    initial_streams,
    single_stream_bps,
)

MBIT = 1e6
GBIT = 1e9


@dataclass
class LinkModel:
    """Goodput of n TCP streams sharing a bottleneck: each stream is capped by its window and by
    loss recovery (Mathis); together they cannot exceed the capacity; every stream costs a little
    (contention, header overhead); measurements are noisy."""

    capacity_bps: float
    rtt_s: float
    loss: float
    window_bytes: int = 2 << 20
    mss: int = 1448
    overhead_per_stream: float = 0.004
    noise: float = 0.03

    def per_stream_bps(self) -> float:
        window = self.window_bytes * 8 / self.rtt_s
        if self.loss <= 0:
            return window
        return min(window, self.mss * 8 / self.rtt_s * 1.22 / math.sqrt(self.loss))

    def knee(self) -> int:
        return math.ceil(self.capacity_bps / self.per_stream_bps())

    def goodput(self, streams: int, rng: random.Random) -> float:
        ideal = min(self.capacity_bps, streams * self.per_stream_bps()) * (
            1 - self.overhead_per_stream * streams
        )
        return max(0.0, ideal * (1 + rng.gauss(0, self.noise)))


class _NoNoise(random.Random):
    def gauss(self, mu: float = 0.0, sigma: float = 1.0) -> float:
        return 0.0


_NO_NOISE = _NoNoise()


def run(
    ctrl: StreamCountController, link: LinkModel, start: float, end: float, seed: int = 1
) -> list[tuple[float, int]]:
    """Feed one goodput sample per second; returns (time, target) after each sample."""
    rng = random.Random(seed)
    trace = []
    t = start
    while t < end:
        ctrl.observe_goodput(link.goodput(ctrl.target, rng), t)
        trace.append((t, ctrl.target))
        t += 1.0
    return trace


def changes_between(ctrl: StreamCountController, start: float, end: float) -> list[StreamCountChange]:
    return [c for c in ctrl.history if start <= c.at < end and c.previous]


def test_initial_count_comes_from_the_bandwidth_delay_product() -> None:
    cfg = ControllerConfig(stream_window_bytes=2 << 20)
    # 1 Gbit/s over 100 ms with 2 MiB windows: one stream carries ~168 Mbit/s, so 6 are needed.
    assert initial_streams(Mode.INTERNET, cfg, rtt_s=0.1, bandwidth_bps=GBIT) == 6
    # Loss-limited: Mathis at 1e-3 loss and 50 ms gives ~8.9 Mbit/s per stream; 100 Mbit/s needs 12.
    assert single_stream_bps(0.05, 1e-3, cfg) == pytest.approx(8.94e6, rel=0.01)
    assert initial_streams(Mode.INTERNET, cfg, rtt_s=0.05, bandwidth_bps=100 * MBIT, loss=1e-3) == 12
    # Bounds of the mode clamp it; nothing known means the mode's minimum.
    assert initial_streams(Mode.DATACENTER, cfg, rtt_s=0.1, bandwidth_bps=GBIT) == 4
    assert initial_streams(Mode.INTERNET, cfg, rtt_s=0.05, bandwidth_bps=100 * MBIT, loss=0.5) == 16
    assert initial_streams(Mode.INTERNET, cfg) == 4
    assert initial_streams(Mode.DATACENTER, cfg, rtt_s=0.0002, bandwidth_bps=10 * GBIT) == 1


@pytest.mark.parametrize(
    ("link", "mode"),
    [
        (LinkModel(capacity_bps=GBIT, rtt_s=0.1, loss=0.0), Mode.INTERNET),  # window-limited, knee 6
        (LinkModel(capacity_bps=100 * MBIT, rtt_s=0.05, loss=1e-3), Mode.INTERNET),  # loss-limited, knee 12
        (LinkModel(capacity_bps=10 * GBIT, rtt_s=0.0002, loss=0.0), Mode.DATACENTER),  # one stream fills it
    ],
    ids=["window-limited", "loss-limited", "datacenter"],
)
def test_climbs_from_the_minimum_to_the_knee_and_stays(link: LinkModel, mode: Mode) -> None:
    cfg = ControllerConfig(stream_window_bytes=link.window_bytes)
    ctrl = StreamCountController(mode, 0.0, config=cfg)  # knows nothing: starts at the mode's minimum
    low, high = cfg.bounds[mode]
    knee = max(low, min(high, link.knee()))
    best = max(link.goodput(n, _NO_NOISE) for n in range(low, high + 1))
    near_knee = {n for n in range(low, knee + 1) if link.goodput(n, _NO_NOISE) >= 0.9 * best}
    trace = run(ctrl, link, 0.0, 3600.0)
    converged = next(t for t, n in trace if n in near_knee)
    assert converged < 120
    # From then on the count is near the knee nearly all the time (periodic probes aside), never
    # more than one step above it ...
    after = [n for t, n in trace if t >= converged]
    assert sum(1 for n in after if n in near_knee) / len(after) > 0.9
    assert max(after) <= knee + max(1, round(knee * cfg.step_fraction))
    # ... and it changes rarely: a failed probe is followed by a hold that doubles up to max_hold_s.
    later = changes_between(ctrl, converged + 1, 3600)
    probes = [c for c in later if "probe up" in c.reason and "revert" not in c.reason]
    assert len(probes) <= 16  # at most one probe every ~4 minutes on average
    reverts = [c for c in later if "revert" in c.reason]
    for revert in reverts:
        following = [p.at for p in probes if p.at > revert.at]
        if following:
            assert following[0] - revert.at >= cfg.hold_s
    assert ctrl.target in near_knee


def test_starting_from_the_estimate_needs_no_climb() -> None:
    link = LinkModel(capacity_bps=GBIT, rtt_s=0.1, loss=0.0)
    cfg = ControllerConfig(stream_window_bytes=link.window_bytes)
    ctrl = StreamCountController(Mode.INTERNET, 0.0, config=cfg, rtt_s=0.1, bandwidth_bps=GBIT)
    assert ctrl.target == link.knee() == 6
    trace = run(ctrl, link, 0.0, 600.0)
    assert [n for t, n in trace if t > 60][-1] == 6
    assert sum(1 for _, n in trace if n == 6) / len(trace) > 0.85


def test_too_many_streams_are_shed_when_fewer_carry_as_much() -> None:
    link = LinkModel(capacity_bps=GBIT, rtt_s=0.1, loss=0.0, overhead_per_stream=0.002)
    cfg = ControllerConfig(stream_window_bytes=link.window_bytes)
    # A bad guess (a 16-stream start, as if the path were very lossy): it should come down.
    ctrl = StreamCountController(Mode.INTERNET, 0.0, config=cfg, rtt_s=0.1, bandwidth_bps=GBIT, loss=0.5)
    assert ctrl.target == 16
    run(ctrl, link, 0.0, 300.0)
    assert link.knee() <= ctrl.target <= 8


def test_changes_are_never_closer_than_the_minimum_interval() -> None:
    link = LinkModel(capacity_bps=GBIT, rtt_s=0.1, loss=0.0, noise=0.15)  # very noisy measurements
    cfg = ControllerConfig(stream_window_bytes=link.window_bytes)
    ctrl = StreamCountController(Mode.INTERNET, 0.0, config=cfg)
    run(ctrl, link, 0.0, 3600.0, seed=11)
    times = [c.at for c in ctrl.history]
    assert all(b - a >= cfg.min_change_interval_s for a, b in itertools.pairwise(times))
    assert len(times) < 60  # an hour of very noisy samples, not a flip-flop every few seconds


def test_mode_change_replans_within_the_new_bounds() -> None:
    link = LinkModel(capacity_bps=GBIT, rtt_s=0.1, loss=0.0)
    cfg = ControllerConfig(stream_window_bytes=link.window_bytes)
    ctrl = StreamCountController(Mode.INTERNET, 0.0, config=cfg)
    run(ctrl, link, 0.0, 200.0)
    assert ctrl.target == 6
    est = ModeEstimates(rtt_s=0.0005, bandwidth_bps=10 * GBIT, loss=None)
    change = ctrl.on_mode_change(ModeChange(Mode.INTERNET, Mode.DATACENTER, 200.0, "measured", est))
    assert change is not None and change.target == 1 and change.reason.startswith("mode datacenter")
    assert ctrl.on_mode(Mode.DATACENTER, 201.0) is None  # same mode again: nothing to do
    dc_link = LinkModel(capacity_bps=10 * GBIT, rtt_s=0.0005, loss=0.0)
    run(ctrl, dc_link, 201.0, 600.0)
    assert ctrl.target == 1


def test_capacity_increase_is_found_by_later_probes() -> None:
    link = LinkModel(capacity_bps=GBIT, rtt_s=0.1, loss=0.0)
    cfg = ControllerConfig(stream_window_bytes=link.window_bytes)
    ctrl = StreamCountController(Mode.INTERNET, 0.0, config=cfg)
    run(ctrl, link, 0.0, 300.0)
    assert ctrl.target == 6
    bigger = LinkModel(capacity_bps=2 * GBIT, rtt_s=0.1, loss=0.0)  # window-limited: goodput stays put
    run(ctrl, bigger, 300.0, 1500.0, seed=2)
    assert ctrl.target == bigger.knee() == 12


def test_settling_and_app_limited_samples_are_ignored() -> None:
    cfg = ControllerConfig(settle_s=2.0, samples_per_decision=3, min_change_interval_s=0.0)
    ctrl = StreamCountController(Mode.INTERNET, 0.0, config=cfg)
    assert ctrl.state is ControllerState.SETTLING
    assert ctrl.observe_goodput(GBIT, 1.0) is None  # still settling
    ctrl.tick(2.0)
    assert ControllerState(ctrl.state) is ControllerState.MEASURING
    for t in (3.0, 4.0, 5.0):
        assert ctrl.observe_goodput(1.0, t, app_limited=True) is None
    assert ctrl.target == 4
    ctrl.observe_goodput(GBIT, 6.0)
    ctrl.observe_goodput(GBIT, 7.0)
    change = ctrl.observe_goodput(GBIT, 8.0)
    assert change is not None and (change.previous, change.target) == (4, 5)
    assert ctrl.next_event() is not None  # the initial count
    assert ctrl.next_event() == change


def test_a_probe_that_raises_loss_is_reverted_even_with_more_goodput() -> None:
    cfg = ControllerConfig(settle_s=0.0, samples_per_decision=1, min_change_interval_s=0.0, loss_jump=0.02)
    ctrl = StreamCountController(Mode.INTERNET, 0.0, config=cfg)
    ctrl.tick(0.0)
    ctrl.observe_loss(1, 1000, 0.5)
    ctrl.observe_goodput(100 * MBIT, 1.0)
    assert ctrl.target == 5
    ctrl.tick(1.0)
    ctrl.observe_loss(100, 1000, 1.5)  # 10% loss with the extra stream
    change = ctrl.observe_goodput(130 * MBIT, 2.0)
    assert change is not None and change.target == 4 and "loss rose" in change.reason


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bounds": {Mode.DATACENTER: (0, 4), Mode.HYBRID: (2, 8), Mode.INTERNET: (4, 16)}},
        {"bounds": {Mode.DATACENTER: (1, 4)}},
        {"bounds": {Mode.DATACENTER: (5, 4), Mode.HYBRID: (2, 8), Mode.INTERNET: (4, 16)}},
        {"gain_margin": 0.0},
        {"samples_per_decision": 0},
        {"hold_s": 100.0, "max_hold_s": 10.0},
        {"settle_s": -1.0},
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ControllerConfigError):
        ControllerConfig(**kwargs)  # type: ignore[arg-type]


def test_bad_samples_are_refused() -> None:
    ctrl = StreamCountController(Mode.INTERNET, 0.0)
    with pytest.raises(ControllerConfigError):
        ctrl.observe_goodput(-1.0, 1.0)
    with pytest.raises(ControllerConfigError):
        ctrl.observe_loss(-1, 5, 1.0)


# ---- one stream where one stream fills the path (issue 4: the 1 Gbit/s x 10 ms miss) ----

BBR = ControllerConfig(stream_window_bytes=2 << 20, loss_limited=False)  # what the monitor derives here
CUBIC = ControllerConfig(stream_window_bytes=2 << 20, loss_limited=True)


def run_with_loss(
    ctrl: StreamCountController,
    link: LinkModel,
    start: float,
    end: float,
    *,
    loss: float,
    seed: int = 1,
    segments_per_stream: int = 20_000,
) -> list[tuple[float, int]]:
    """Like `run`, plus one TCP_INFO reading per stream per second with random loss `loss`."""
    rng = random.Random(seed)
    trace = []
    t = start
    while t < end:
        for _ in range(ctrl.target):
            expected = loss * segments_per_stream  # binomial, close to normal at these counts
            lost = max(0, round(rng.gauss(expected, math.sqrt(expected))))
            ctrl.observe_loss(lost, segments_per_stream, t)
        ctrl.observe_goodput(link.goodput(ctrl.target, rng), t + 0.5)
        trace.append((t, ctrl.target))
        t += 1.0
    return trace


def test_one_stream_starts_alone_on_a_lossless_short_path() -> None:
    # 1 Gbit/s x 10 ms: a 2 MiB window carries 1.68 Gbit/s, so the internet minimum (4) does not apply.
    for loss in (None, 0.0, 0.009):  # unknown, clean, BBR's own overflow of a shallow queue
        assert initial_streams(Mode.INTERNET, BBR, rtt_s=0.01, bandwidth_bps=GBIT, loss=loss) == 1
    ctrl = StreamCountController(Mode.INTERNET, 0.0, config=BBR, rtt_s=0.01, bandwidth_bps=GBIT)
    assert (ctrl.target, ctrl.floor) == (1, 1)
    first = ctrl.next_event()
    assert first is not None and "one stream fills it" in first.reason
    # Not with too little headroom (1 Gbit/s x 15 ms: 1.12 Gbit/s < 1.25 x 1 Gbit/s), nor unmeasured.
    assert initial_streams(Mode.INTERNET, BBR, rtt_s=0.015, bandwidth_bps=GBIT) == 4
    assert initial_streams(Mode.INTERNET, BBR) == 4
    # The product decides on a long path that one stream's window does not cover (1 Gbit/s x 100 ms:
    # 6 streams), and a long path keeps the mode's minimum even where the window would cover it.
    assert initial_streams(Mode.INTERNET, BBR, rtt_s=0.1, bandwidth_bps=GBIT) == 6
    big_window = ControllerConfig(stream_window_bytes=32 << 20, loss_limited=False)
    assert initial_streams(Mode.INTERNET, big_window, rtt_s=0.1, bandwidth_bps=GBIT, loss=0.0) == 4
    assert initial_streams(Mode.INTERNET, big_window, rtt_s=0.02, bandwidth_bps=GBIT, loss=0.0) == 1


def test_one_stream_stays_alone_and_does_not_thrash() -> None:
    link = LinkModel(capacity_bps=GBIT, rtt_s=0.01, loss=0.0, window_bytes=2 << 20, noise=0.05)
    ctrl = StreamCountController(Mode.INTERNET, 0.0, config=BBR, rtt_s=0.01, bandwidth_bps=GBIT)
    trace = run_with_loss(ctrl, link, 0.0, 3600.0, loss=0.009, seed=5)
    counts = [n for _, n in trace]
    assert max(counts) <= 2  # probes look one stream up and come back
    assert counts.count(1) / len(counts) > 0.9
    assert ctrl.target == 1 and ctrl.floor == 1  # 0.9% is no reason to leave one stream for BBR
    times = [c.at for c in ctrl.history]
    assert all(b - a >= BBR.min_change_interval_s for a, b in itertools.pairwise(times))
    assert len(times) <= 2 * 16 + 1  # an initial count, then at most ~16 probe/revert pairs an hour


@pytest.mark.parametrize("config", [BBR, CUBIC], ids=["bbr", "cubic"])
@pytest.mark.parametrize("loss", [None, 0.001, 0.01])
def test_lossy_long_path_keeps_the_mode_minimum(config: ControllerConfig, loss: float | None) -> None:
    # 100 Mbit/s x 50 ms: a 2 MiB window covers it, but the path is long; loss known or not.
    ctrl = StreamCountController(
        Mode.INTERNET, 0.0, config=config, rtt_s=0.05, bandwidth_bps=100 * MBIT, loss=loss
    )
    assert ctrl.floor == 4 and ctrl.target >= 4
    link = LinkModel(capacity_bps=100 * MBIT, rtt_s=0.05, loss=0.01, window_bytes=2 << 20)
    trace = run_with_loss(ctrl, link, 0.0, 600.0, loss=0.01)
    assert min(n for _, n in trace) >= 4


def test_known_loss_keeps_the_mode_minimum_on_a_short_path() -> None:
    # CUBIC at 1% and 10 ms: Mathis gives ~14 Mbit/s a stream, 100 Mbit/s needs 8 (> the minimum).
    assert initial_streams(Mode.INTERNET, CUBIC, rtt_s=0.01, bandwidth_bps=100 * MBIT, loss=0.01) == 8
    # Loss above one_stream_max_loss keeps even BBR at the mode's minimum.
    assert initial_streams(Mode.INTERNET, BBR, rtt_s=0.01, bandwidth_bps=100 * MBIT, loss=0.08) == 4
    assert initial_streams(Mode.INTERNET, BBR, rtt_s=0.01, bandwidth_bps=100 * MBIT, loss=0.01) == 1


def test_loss_measured_after_a_one_stream_start_restores_the_minimum_at_the_first_decision() -> None:
    # The monitor creates the controller when start-up ends, before any path loss is known: the
    # window alone says one stream, then the first decision sees 1% loss that caps a CUBIC stream.
    ctrl = StreamCountController(Mode.INTERNET, 0.0, config=CUBIC, rtt_s=0.01, bandwidth_bps=100 * MBIT)
    assert ctrl.target == 1
    link = LinkModel(capacity_bps=100 * MBIT, rtt_s=0.01, loss=0.01, window_bytes=2 << 20)
    trace = run_with_loss(ctrl, link, 0.0, 900.0, loss=0.01)
    raised = next(c for c in ctrl.history if c.previous)
    assert raised.target == 4 and "path loss" in raised.reason
    assert raised.at <= CUBIC.min_change_interval_s + 1  # at once: the first decision after the start
    assert ctrl.floor == 4
    assert min(n for t, n in trace if t >= raised.at) >= 4  # and never back to one stream
    # Loss flapping around the limit afterwards changes nothing: the floor is raised once per mode.
    assert sum(1 for c in ctrl.history if "path loss" in c.reason) == 1


def test_a_probe_from_one_stream_adds_streams_when_goodput_grows() -> None:
    # The model's window is too optimistic: each real stream carries only 256 KiB / 10 ms = 210 Mbit/s,
    # so the measured bandwidth (one stream's) looks fillable by one stream. Probes find the knee.
    link = LinkModel(capacity_bps=GBIT, rtt_s=0.01, loss=0.0, window_bytes=256 << 10)
    ctrl = StreamCountController(Mode.INTERNET, 0.0, config=BBR, rtt_s=0.01, bandwidth_bps=210 * MBIT)
    assert ctrl.target == 1
    trace = run_with_loss(ctrl, link, 0.0, 600.0, loss=0.0)
    first_up = next(c for c in ctrl.history if c.previous)
    assert (first_up.previous, first_up.target) == (1, 2) and first_up.reason.startswith("probe up")
    assert ctrl.history[2].reason.startswith("probe up gained")  # 2 streams carried more: kept
    reached = next(t for t, n in trace if n >= link.knee() - 1)
    assert reached < 120
    assert ctrl.target >= link.knee() - 1


def test_path_loss_is_the_median_of_readings() -> None:
    meter = PathLoss(ControllerConfig(loss_min_readings=4, loss_min_segments=1000))
    meter.add(500, 10_000)  # a burst: a stream's start-up overshoot
    for _ in range(2):
        meter.add(0, 10_000)
    assert meter.ratio() is None  # three readings: not known yet
    meter.add(5, 50)  # too few segments to say anything: skipped
    assert meter.ratio() is None
    meter.add(10, 10_000)
    assert meter.ratio() == pytest.approx(0.0005)  # the burst does not count as the path's loss
    with pytest.raises(ControllerConfigError):
        ControllerConfig(one_stream_headroom=0.5)
    with pytest.raises(ControllerConfigError):
        ControllerConfig(one_stream_max_loss=1.0)
    with pytest.raises(ControllerConfigError):
        ControllerConfig(one_stream_max_rtt_s=-0.01)
