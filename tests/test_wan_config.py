"""WAN emulator pieces that need no root: link specs, requirement checks, the forwarder build."""

from __future__ import annotations

import pytest

from novacron.testing import (
    LinkSpec,
    WanConfigError,
    WanEmulator,
    WanUnavailableError,
    build,
    missing_requirements,
    netns,
)


def test_default_queue_is_about_one_bdp_with_a_floor() -> None:
    spec = LinkSpec(rate_bps=100e6, delay_ms=25)
    assert spec.effective_queue_bytes(reverse_delay_ms=25, mtu=1500) == 625_000  # 100 Mbit/s * 50 ms
    assert LinkSpec(rate_bps=1e9).effective_queue_bytes(0, 1500) == 150_000  # floor: 100 packets
    assert LinkSpec(rate_bps=1e9, queue_ms=2).effective_queue_bytes(50, 1500) == 250_000
    assert LinkSpec(rate_bps=1e9, queue_bytes=4242).effective_queue_bytes(50, 1500) == 4242
    with pytest.raises(WanConfigError, match="not both"):
        LinkSpec(queue_bytes=1, queue_ms=1)


def test_shaped_tells_apart_links_that_do_something() -> None:
    assert not LinkSpec().shaped
    assert not LinkSpec(queue_bytes=10_000).shaped
    for spec in (LinkSpec(delay_ms=1), LinkSpec(loss=0.01), LinkSpec(rate_bps=1e9), LinkSpec(up=False)):
        assert spec.shaped
    assert LinkSpec.for_rtt(60, rate_bps=1e8, loss=0.01) == LinkSpec(rate_bps=1e8, delay_ms=30, loss=0.01)


def test_not_root_is_reported_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("novacron.testing.netns.os.geteuid", lambda: 1000)
    assert any("root" in m for m in missing_requirements())
    with pytest.raises(WanUnavailableError, match="root privileges") as info:
        WanEmulator(["a", "b"]).start()
    assert info.value.context["missing"]


def test_missing_ip_command_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("novacron.testing.netns.shutil.which", lambda name: None)
    with pytest.raises(WanUnavailableError, match="iproute2"):
        netns.require_netns_support()


def test_missing_gcc_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("NOVACRON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("novacron.testing.build.shutil.which", lambda name: None)
    with pytest.raises(WanUnavailableError, match="gcc is missing"):
        build.forwarder_binary()


def test_forwarder_builds_once_per_source(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("NOVACRON_CACHE_DIR", str(tmp_path))
    first = build.forwarder_binary()
    assert first.exists() and first.stat().st_mode & 0o111
    mtime = first.stat().st_mtime_ns
    assert build.forwarder_binary() == first
    assert first.stat().st_mtime_ns == mtime
