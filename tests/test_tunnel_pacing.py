"""The source tunnel's pacing (sans-IO, virtual time): window size and the bandwidth HDE plans for."""

from __future__ import annotations

from novacron.migration.tunnel.limits import MiB, TunnelLimits
from novacron.migration.tunnel.pacing import Pacer, PacingConfig, RateMeter

LIMITS = TunnelLimits()


def test_rate_meter_averages_recent_samples_and_forgets_old_ones() -> None:
    m = RateMeter(1.0)
    assert m.rate(0.0) is None
    m.add(0.0, 0)
    m.add(0.5, 5_000_000)
    assert m.rate(0.5) == 10_000_000
    for i in range(1, 31):
        m.add(0.5 + i * 0.1, 5_000_000 + i * 100_000)  # slowed down to 1 MB/s
    assert abs((m.rate(3.5) or 0) - 1_000_000) < 150_000  # the fast start has dropped out
    assert m.rate(10.0) is None  # nothing acknowledged for long: no current figure


def test_window_is_the_floor_until_something_is_measured() -> None:
    p = Pacer(LIMITS)
    assert p.window(0.0, None, None) == LIMITS.inflight_floor
    assert p.hde_bandwidth(0.0, None) is None  # HDE keeps its default


def test_link_limited_window_covers_two_round_trips() -> None:
    p = Pacer(LIMITS)
    p.window_full(1.0, inflight=2 * MiB, in_transport=2 * MiB)  # the transport holds it: the link limits
    assert p.link_limited(1.2)
    w = p.window(1.2, 12.5e6, 0.05)  # 100 Mbit/s, 50 ms
    assert w == int(12.5e6 * (2 * 0.05 + LIMITS.inflight_slack_s))
    # A full window waiting at the destination's decoder is not the link.
    q = Pacer(LIMITS)
    q.window_full(1.0, inflight=2 * MiB, in_transport=MiB // 4)
    assert not q.link_limited(1.1)


def test_window_grows_with_the_rate_reached_when_the_link_does_not_limit() -> None:
    p = Pacer(LIMITS)
    t, acked = 0.0, 0
    rates = []
    for _ in range(40):  # the destination decodes what arrives; each window comes back in 50 ms
        w = p.window(t, None, 0.01)
        acked += w
        t += 0.05
        p.acknowledged(t, acked)
        rates.append(w)
    assert rates[-1] > 8 * rates[0]  # 1 MiB at the start, grown with the rate
    assert rates[-1] <= LIMITS.inflight_ceiling


def test_hde_bandwidth_probes_up_while_the_encoder_limits_and_resets_on_the_link() -> None:
    cfg = PacingConfig(probe_interval_s=0.5, probe_factor=2.0, max_probe_gain=8.0)
    p = Pacer(LIMITS, cfg)
    told = []
    for i in range(7):  # 10 MB/s acknowledged all along
        p.acknowledged(0.5 * i, 5_000_000 * i)
        if i:
            told.append(p.hde_bandwidth(0.5 * i, None))
    assert told[:4] == [10e6, 20e6, 40e6, 80e6]
    assert told[5] == 80e6  # capped at 8x
    p.window_full(3.0, inflight=MiB, in_transport=MiB)
    assert p.hde_bandwidth(3.1, 12e6) == 12e6  # the link limits: the measurement as it is
    assert p.gain == 1.0
