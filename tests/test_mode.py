"""The mode detector, driven in virtual time (no sleeps, no sockets)."""

from __future__ import annotations

import math
import random
import socket
import struct

import pytest

from novacron.dwcp.mode import (
    Mode,
    ModeChange,
    ModeConfigError,
    ModeDetector,
    ModeThresholds,
    parse_tcp_info,
    read_tcp_info,
)

MS = 1e-3
GBIT = 1e9


def mode_of(det: ModeDetector) -> Mode:
    """The current mode (a call, so the type checker does not pin it between assertions)."""
    return det.mode


def feed(
    det: ModeDetector, start: float, end: float, rtt_s: float, bps: float | None, *, step: float = 1.0
) -> float:
    t = start
    while t < end:
        det.observe_rtt(rtt_s, t)
        if bps is not None:
            det.observe_bandwidth(bps, t)
        t += step
    return t


def test_defaults_follow_the_design_thresholds() -> None:
    cases = [
        (2 * MS, 5 * GBIT, Mode.DATACENTER),
        (2 * MS, 0.5 * GBIT, Mode.INTERNET),  # slow even if near
        (60 * MS, 5 * GBIT, Mode.INTERNET),  # far even if fast
        (20 * MS, 2 * GBIT, Mode.HYBRID),
        (9 * MS, 1 * GBIT, Mode.DATACENTER),  # bandwidth >= 1 Gbit/s counts
    ]
    for rtt, bw, expected in cases:
        det = ModeDetector()
        feed(det, 0, 3, rtt, bw)
        assert det.decided
        assert mode_of(det) is expected, (rtt, bw)


def test_first_decision_waits_for_enough_evidence() -> None:
    det = ModeDetector(ModeThresholds(min_rtt_samples=3, warmup_s=5.0))
    assert det.observe_rtt(80 * MS, 0.0) is None
    assert det.observe_rtt(80 * MS, 1.0) is None
    assert mode_of(det) is Mode.HYBRID and not det.decided
    # Three RTT samples but no bandwidth yet: wait for warm-up, then decide on RTT alone.
    assert det.observe_rtt(80 * MS, 2.0) is None
    change = det.observe_rtt(80 * MS, 5.0)
    assert change is not None
    assert (change.previous, change.mode, change.reason) == (Mode.HYBRID, Mode.INTERNET, "first measurement")


def test_verdict_so_far_needs_only_the_rtt_samples() -> None:
    det = ModeDetector()
    assert det.verdict_so_far(0.0) is None
    det.observe_rtt(80 * MS, 0.0)
    det.observe_rtt(80 * MS, 0.05)
    assert det.verdict_so_far(0.05) is None  # two of the three samples it needs
    det.observe_rtt(80 * MS, 0.1)
    assert det.verdict_so_far(0.1) is Mode.INTERNET
    assert not det.decided and mode_of(det) is Mode.HYBRID  # the session's mode still waits
    fast = ModeDetector()
    for i in range(3):
        fast.observe_rtt(0.2 * MS, i * 0.05)
    assert fast.verdict_so_far(0.1) is Mode.DATACENTER
    fast.force(Mode.INTERNET, 0.2)
    assert fast.verdict_so_far(0.2) is Mode.INTERNET


def test_watchers_hear_every_sample_even_without_a_mode_change() -> None:
    det = ModeDetector()
    heard: list[Mode | None] = []
    unwatch = det.watch(lambda: heard.append(det.verdict_so_far(1.0)))
    for i in range(4):
        det.observe_rtt(20 * MS, i * 0.05)  # hybrid: the same as the initial mode, no change event
    assert heard == [None, None, Mode.HYBRID, Mode.HYBRID]
    unwatch()
    det.observe_rtt(20 * MS, 0.3)
    assert len(heard) == 4


def test_change_needs_confirmation_and_dwell() -> None:
    det = ModeDetector(ModeThresholds(confirm_s=5.0, min_dwell_s=30.0, rtt_window_s=10.0))
    t = feed(det, 0, 40, 2 * MS, 10 * GBIT)
    assert mode_of(det) is Mode.DATACENTER
    # The path moves far away. The 2 ms samples leave the min-filter after 10 s, then the new
    # verdict must hold for 5 s before the switch.
    switched_at = None
    while t < 100:
        change = det.observe_rtt(80 * MS, t)
        det.observe_bandwidth(10 * GBIT, t)
        if change is not None:
            switched_at = t
            break
        t += 1
    assert switched_at is not None
    assert mode_of(det) is Mode.INTERNET
    assert 40 + 10 + 5 - 1 <= switched_at <= 40 + 10 + 5 + 2


def test_rtt_wandering_around_a_threshold_does_not_flap() -> None:
    """RTT drifts 42..58 ms around the 50 ms internet threshold for three hours, with noise."""
    rng = random.Random(7)
    det = ModeDetector()
    changes: list[ModeChange] = []
    det.subscribe(changes.append)
    t = 0.0
    while t < 3 * 3600:
        rtt = 50 * MS + 8 * MS * math.sin(2 * math.pi * t / 600) + rng.uniform(-2, 2) * MS
        det.observe_rtt(rtt, t)
        det.observe_bandwidth(2 * GBIT * rng.uniform(0.9, 1.1), t)
        t += 0.5
    # The first decision may pick either side; after it, the mode stays where it is.
    assert [c.reason for c in changes].count("measured") == 0
    assert det.metrics.switches <= 1


def test_without_hysteresis_the_same_link_does_flap() -> None:
    """Control for the test above: the same trace with no margins/dwell switches many times."""
    rng = random.Random(7)
    det = ModeDetector(ModeThresholds(hysteresis=0.0, confirm_s=0.0, min_dwell_s=0.0, rtt_window_s=1.0))
    t = 0.0
    while t < 3 * 3600:
        rtt = 50 * MS + 8 * MS * math.sin(2 * math.pi * t / 600) + rng.uniform(-2, 2) * MS
        det.observe_rtt(rtt, t)
        det.observe_bandwidth(2 * GBIT, t)
        t += 0.5
    assert det.metrics.switches > 20


def test_bandwidth_noise_around_one_gigabit_does_not_flap() -> None:
    rng = random.Random(3)
    det = ModeDetector()
    t = 0.0
    while t < 3600:
        det.observe_rtt(3 * MS, t)
        det.observe_bandwidth(GBIT * rng.uniform(0.9, 1.1), t)
        t += 1
    assert det.metrics.switches <= 1


def test_app_limited_samples_cannot_lower_the_estimate() -> None:
    det = ModeDetector()
    t = feed(det, 0, 10, 2 * MS, 10 * GBIT)
    assert mode_of(det) is Mode.DATACENTER
    # The session goes idle: tiny goodput, flagged application-limited, for ten minutes.
    while t < 600:
        det.observe_rtt(2 * MS, t)
        det.observe_bandwidth(1e6, t, app_limited=True)
        t += 1
    assert mode_of(det) is Mode.DATACENTER
    assert det.estimates(t).bandwidth_bps == 10 * GBIT
    # The same samples not flagged do count: the link really is slow now.
    while t < 700:
        det.observe_rtt(2 * MS, t)
        det.observe_bandwidth(1e6, t)
        t += 1
    assert mode_of(det) is Mode.INTERNET


def test_app_limited_sample_above_the_estimate_raises_it() -> None:
    det = ModeDetector()
    det.observe_bandwidth(1e8, 0.0)
    det.observe_bandwidth(3e9, 1.0, app_limited=True)
    assert det.estimates(1.0).bandwidth_bps == 3e9


def test_loss_pushes_hybrid_paths_to_internet_but_not_datacenter_ones() -> None:
    det = ModeDetector()
    t = feed(det, 0, 5, 20 * MS, 2 * GBIT)
    assert mode_of(det) is Mode.HYBRID
    for _ in range(60):
        det.observe_rtt(20 * MS, t)
        det.observe_bandwidth(2 * GBIT, t)
        det.observe_loss(30, 1000, t)  # 3%
        t += 1
    assert mode_of(det) is Mode.INTERNET

    dc = ModeDetector()
    t = feed(dc, 0, 5, 1 * MS, 5 * GBIT)
    for _ in range(60):
        dc.observe_rtt(1 * MS, t)
        dc.observe_bandwidth(5 * GBIT, t)
        dc.observe_loss(30, 1000, t)
        t += 1
    assert mode_of(dc) is Mode.DATACENTER


def test_loss_needs_enough_segments() -> None:
    det = ModeDetector(ModeThresholds(min_loss_segments=1000))
    det.observe_loss(5, 10, 0.0)
    assert det.estimates(0.0).loss is None
    det.observe_loss(5, 990, 1.0)
    assert det.estimates(1.0).loss == pytest.approx(0.01)


def test_operator_override_wins_and_release_returns_to_measurements() -> None:
    det = ModeDetector()
    events: list[ModeChange] = []
    unsubscribe = det.subscribe(events.append)
    t = feed(det, 0, 10, 80 * MS, GBIT)
    assert mode_of(det) is Mode.INTERNET
    change = det.force(Mode.DATACENTER, t)
    assert change is not None and change.reason == "forced"
    assert mode_of(det) is Mode.DATACENTER and det.measured_mode is Mode.INTERNET
    t = feed(det, t, t + 100, 80 * MS, GBIT)
    assert mode_of(det) is Mode.DATACENTER  # measurements do not undo an override
    change = det.force(None, t)
    assert change is not None and (change.mode, change.reason) == (Mode.INTERNET, "override released")
    unsubscribe()
    det.force(Mode.HYBRID, t)
    assert [e.mode for e in events] == [Mode.INTERNET, Mode.DATACENTER, Mode.INTERNET]
    assert det.metrics.switches == 4


def test_events_are_polled_in_order() -> None:
    det = ModeDetector()
    feed(det, 0, 10, 80 * MS, GBIT)
    det.force(Mode.DATACENTER, 10)
    first, second = det.next_event(), det.next_event()
    assert first is not None and second is not None
    assert (first.mode, second.mode) == (Mode.INTERNET, Mode.DATACENTER)
    assert det.next_event() is None
    assert det.metrics.transitions == {(Mode.HYBRID, Mode.INTERNET): 1, (Mode.INTERNET, Mode.DATACENTER): 1}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"datacenter_max_rtt_s": 0.0},
        {"datacenter_max_rtt_s": 0.1, "internet_min_rtt_s": 0.05},
        {"internet_max_bandwidth_bps": 2e9, "datacenter_min_bandwidth_bps": 1e9},
        {"hysteresis": 1.0},
        {"confirm_s": -1.0},
        {"min_rtt_samples": 0},
        {"internet_min_loss": 0.0},
    ],
)
def test_bad_thresholds_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ModeConfigError):
        ModeThresholds(**kwargs)  # type: ignore[arg-type]


def test_bad_samples_are_refused() -> None:
    det = ModeDetector()
    with pytest.raises(ModeConfigError, match="RTT"):
        det.observe_rtt(-1.0, 0)
    with pytest.raises(ModeConfigError, match="bandwidth"):
        det.observe_bandwidth(float("nan"), 0)
    with pytest.raises(ModeConfigError, match="non-negative"):
        det.observe_loss(-1, 10, 0)


def test_parse_tcp_info_layout() -> None:
    raw = bytearray(232)
    raw[0], raw[1], raw[7] = 1, 0, 1  # ESTABLISHED, open, delivery rate app-limited
    struct.pack_into("=I", raw, 16, 1448)
    struct.pack_into("=II", raw, 68, 60_000, 1_500)
    struct.pack_into("=I", raw, 80, 42)
    struct.pack_into("=I", raw, 100, 7)
    struct.pack_into("=Q", raw, 104, 12_500_000)
    struct.pack_into("=I", raw, 148, 59_000)
    struct.pack_into("=I", raw, 156, 1000)
    struct.pack_into("=Q", raw, 160, 125_000_000)
    info = parse_tcp_info(bytes(raw))
    assert info.rtt_s == pytest.approx(0.060)
    assert info.min_rtt_s == pytest.approx(0.059)
    assert (info.snd_mss, info.snd_cwnd, info.total_retrans, info.data_segs_out) == (1448, 42, 7, 1000)
    assert info.delivery_rate_bps == pytest.approx(1e9)
    assert info.pacing_rate_bps == pytest.approx(1e8)
    assert info.delivery_rate_app_limited
    with pytest.raises(ModeConfigError):
        parse_tcp_info(bytes(50))


def test_read_tcp_info_from_a_real_socket() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    try:
        cli.sendall(b"x" * 100_000)
        got = 0
        while got < 100_000:
            got += len(conn.recv(65536))
        info = read_tcp_info(cli)
        assert info.state == 1  # TCP_ESTABLISHED
        assert info.rtt_s > 0
        assert info.data_segs_out >= 1
        assert info.bytes_acked > 0
    finally:
        for s in (cli, conn, srv):
            s.close()
