"""The mode detector fed from real TCP transfers over the WAN emulator (root needed)."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from novacron.dwcp.mode import Mode, ModeDetector, ModeThresholds, TcpInfo
from novacron.testing import LinkSpec, WanEmulator
from novacron.testing.traffic import tcp_transfer

pytestmark = pytest.mark.netns


def detect(wan: WanEmulator, seconds: float) -> tuple[ModeDetector, float]:
    """Run a bulk transfer and feed the detector as the transport would: TCP_INFO of the sending
    socket every 100 ms (RTT, delivery rate, retransmissions), then the goodput of the transfer."""
    det = ModeDetector(ModeThresholds(warmup_s=1.0))
    previous: list[TcpInfo] = []

    def on_progress(now: float, info: TcpInfo) -> None:
        det.observe_tcp_info(info, now, previous[-1] if previous else None)
        previous[:] = [info]

    result = tcp_transfer(wan, "a", "b", seconds=seconds, on_progress=on_progress)
    det.observe_bandwidth(result.goodput_bps, time.monotonic())
    return det, result.goodput_bps


def test_a_60ms_link_is_internet() -> None:
    with WanEmulator(["a", "b"], link=LinkSpec.for_rtt(60, rate_bps=200e6)) as wan:
        det, _ = detect(wan, 3.0)
    est = det.estimates(time.monotonic())
    assert det.decided
    assert det.mode is Mode.INTERNET
    assert est.rtt_s is not None and 0.059 <= est.rtt_s <= 0.075


def test_an_unshaped_link_is_datacenter() -> None:
    with WanEmulator(["a", "b"], backend="veth") as wan:
        det, goodput = detect(wan, 2.0)
    est = det.estimates(time.monotonic())
    assert goodput > 1e9
    assert det.decided
    assert det.mode is Mode.DATACENTER
    assert est.rtt_s is not None and est.rtt_s < 0.005
    assert est.bandwidth_bps is not None and est.bandwidth_bps > 1e9


def wander(thresholds: ModeThresholds) -> ModeDetector:
    """Move the emulated RTT between 44 and 56 ms, around the 50 ms internet threshold, while bulk
    traffic runs; feed the detector from TCP_INFO throughout. No rate limit, so no standing queue
    inflates the smoothed RTT the kernel reports."""
    det = ModeDetector(thresholds)
    with WanEmulator(["a", "b"], link=LinkSpec.for_rtt(44)) as wan:
        previous: list[TcpInfo] = []

        def on_progress(now: float, info: TcpInfo) -> None:
            det.observe_tcp_info(info, now, previous[-1] if previous else None)
            previous[:] = [info]

        for rtt_ms in (44, 56, 44, 56, 46, 54, 44, 56):
            wan.set_link_blocking("a", "b", LinkSpec.for_rtt(rtt_ms))
            tcp_transfer(wan, "a", "b", seconds=1.0, on_progress=on_progress)
    return det


# Windows scaled down to the test's length; bandwidth and loss thresholds out of the way so that
# only the RTT decides.
_SCALED = ModeThresholds(
    warmup_s=0.5,
    rtt_window_s=0.5,
    internet_max_bandwidth_bps=1e3,
    datacenter_min_bandwidth_bps=1e3,
    internet_min_loss=1.0,
)


def test_rtt_wandering_around_the_threshold_on_a_real_link_does_not_flap() -> None:
    det = wander(replace(_SCALED, confirm_s=0.3, min_dwell_s=2.0))
    assert det.decided
    assert det.metrics.switches <= 1


def test_the_same_wandering_link_flaps_without_hysteresis() -> None:
    """Control for the test above: the RTT really crosses the threshold back and forth."""
    det = wander(replace(_SCALED, hysteresis=0.0, confirm_s=0.0, min_dwell_s=0.0))
    assert det.metrics.switches >= 4
