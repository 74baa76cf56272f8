"""Pure parts of the demo and the migration benchmark: option parsing, medians, ratios, goals."""

from __future__ import annotations

import pytest

from novacron.demo.settings import DemoInputError, DemoSettings, parse_link
from novacron.demo.summary import DemoResult
from novacron.testing.migration_runs import Row, summarize, with_ratios_and_goals
from novacron.testing.qemu_migration import wait_heartbeat


def test_link_parsing() -> None:
    link = parse_link("100mbit/50ms")
    assert link.spec is not None and link.spec.rate_bps == 100e6 and link.spec.delay_ms == 25
    assert link.backend == "tun" and link.label == "100 Mbit/s, 50 ms RTT"
    assert parse_link("1GBIT/10ms").label == "1 Gbit/s, 10 ms RTT"
    unshaped = parse_link("unshaped")
    assert unshaped.spec is None and unshaped.backend == "veth"
    for bad in ("100mbit", "fast", "100mbit/0ms", "20gbit/10ms", "1kbit/10ms"):
        with pytest.raises(DemoInputError) as info:
            parse_link(bad)
        assert info.value.context["option"] == "--link"


def test_settings_refuse_bad_values() -> None:
    with pytest.raises(DemoInputError):
        DemoSettings(profile="huge")
    with pytest.raises(DemoInputError):
        DemoSettings(rate=-1)
    with pytest.raises(DemoInputError):
        DemoSettings(dwell_s=-5)


def row(method: str, t: float, down: float, mib: float, ok: bool = True) -> Row:
    return Row(
        method, total_s=t, downtime_ms=down, link_bytes=int(mib * (1 << 20)), ok=ok, max_downtime_ms=300
    )


def test_medians_ratios_and_goals() -> None:
    runs = {
        "qemu:plain": [row("qemu:plain", 50, 300, 600)] * 3,
        "qemu:multifd-zstd3": [row("qemu:multifd-zstd3", t, 250, 170) for t in (14, 15, 16)],
        "dwcp:cold": [row("dwcp:cold", t, d, 120) for t, d in ((11, 100), (12, 280), (20, 120))],
        # one failed verify: the row fails its goals, its problem is kept
        "dwcp:back": [row("dwcp:back", 2, 50, 10), Row.failed("dwcp:back", "VERIFY: 3 corrupted pages")],
        "dwcp:warm": [row("dwcp:warm", 12, 350, 60)],
    }
    out = {s.method: s for s in with_ratios_and_goals([summarize("100mbit", m, r) for m, r in runs.items()])}
    best = out["qemu:multifd-zstd3"]
    assert best.total_s == 15 and best.time_ratio == 1.0
    cold = out["dwcp:cold"]
    assert cold.total_s == 12 and cold.downtime_max_ms == 280
    assert cold.time_ratio == pytest.approx(0.8) and cold.bytes_ratio == pytest.approx(120 / 170)
    assert dict(cold.goals) == {
        "cold time <= 0.85x": True,
        "cold bytes <= 0.85x": True,
        "downtime <= limit": True,
    }
    back = out["dwcp:back"]
    assert back.failed == 1 and "VERIFY: 3 corrupted pages" in back.problems
    assert all(met is False for _, met in back.goals)
    warm = out["dwcp:warm"]
    assert dict(warm.goals) == {"warm bytes <= 0.4x": True, "downtime <= limit": False}  # 350 > 300 ms


def test_demo_ratios_need_a_successful_qemu_row() -> None:
    result = DemoResult(DemoSettings(), [row("dwcp:out", 10, 100, 100)])
    assert result.ratios(result.rows[0]) == (None, None)
    result.rows.append(row("qemu:multifd-zstd3", 20, 200, 200))
    assert result.ratios(result.rows[0]) == (0.5, 0.5)
    result.rows.append(Row.failed("dwcp:back", "migration failed"))
    assert not result.ok


async def test_heartbeat_is_waited_for_not_sampled() -> None:
    # Straight after a switchover the count may still be the one from before: the next beat is due.
    readings = iter([3, 3, 3, 4, 5])

    async def read() -> int:
        return next(readings)

    assert await wait_heartbeat(read, 3, timeout_s=5) == 4

    async def stuck() -> int:
        return 3

    assert await wait_heartbeat(stuck, 3, timeout_s=0.3) == 3  # a stopped heartbeat is reported as such
