"""Benchmark of the test guest: boot-to-READY time, and achieved vs requested dirty rate.

    flock /tmp/novacron-heavy.lock .venv/bin/python bench/guest_boot.py [--boots 3] [--json]

Boot time is the median of several boots per profile: wall time from asking QEMU to start until the
READY line, and the guest's own uptime when it printed READY. The dirty rate is measured twice for
each requested rate: by the guest (pages its dirtier wrote, over a window of heartbeats) and,
independently, by QEMU (``calc-dirty-rate`` in page-sampling mode: it hashes a sample of guest pages
at the start and end of one second, so it counts distinct pages written, also by the guest kernel, and
reports whole MiB/s: a resolution of 256 pages/s). QEMU 7.2's dirty-bitmap mode kills QEMU under TCG
on this host, so it is not used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from novacron.guest.boot import BootedGuest, boot_test_guest
from novacron.hypervisor.console import wait_for_line

PAGE = 4096
HEARTBEAT = r"NOVACRON-HEARTBEAT n=(\d+)"
QEMU_CALC_TIME_S = 1  # the default working set (16,384 pages) is rewritten in 1.6 s at 10,000 pages/s
QEMU_SAMPLE_PAGES = 10000  # per GiB of guest RAM; QEMU's maximum (default 512)
QEMU_RESULT_TIMEOUT_S = 30.0
SETTLE_HEARTBEATS = 2  # after a rate change, skip the window in which the old rate still counts
MEASURE_HEARTBEATS = 4
DEFAULT_RATES = (500, 2250, 10000)


@dataclass(frozen=True)
class BootResult:
    profile: str
    boots: int
    wall_median_s: float
    wall_min_s: float
    wall_max_s: float
    guest_ready_median_s: float


@dataclass(frozen=True)
class RateResult:
    requested: int
    guest_pages_s: float
    qemu_pages_s: float

    @property
    def guest_ratio(self) -> float:
        return self.guest_pages_s / self.requested

    @property
    def qemu_ratio(self) -> float:
        return self.qemu_pages_s / self.requested


async def bench_boot(profile: str, boots: int, root: Path) -> BootResult:
    walls: list[float] = []
    guest: list[float] = []
    for i in range(boots):
        async with boot_test_guest(
            f"boot-{profile}-{i}", root=root, profile=profile, ready_timeout_s=300
        ) as g:
            walls.append(g.boot_s)
            guest.append((await g.control.status()).ready_ms / 1000)
    return BootResult(
        profile, boots, statistics.median(walls), min(walls), max(walls), statistics.median(guest)
    )


async def _heartbeats(g: BootedGuest, since: int, count: int) -> int:
    offset = since
    for _ in range(count):
        offset = (await wait_for_line(g.console_log, HEARTBEAT, since=offset, timeout_s=30, vm=g.name)).offset
    return offset


async def _qemu_dirty_rate(g: BootedGuest) -> float:
    """Pages/s QEMU measured with calc-dirty-rate (page-sampling mode)."""
    async with g.driver.qmp(g.name) as qmp:
        await qmp.execute(
            "calc-dirty-rate",
            {"calc-time": QEMU_CALC_TIME_S, "sample-pages": QEMU_SAMPLE_PAGES, "mode": "page-sampling"},
        )
        offset = g.console_log.stat().st_size
        # QEMU reports no event when the measurement ends: ask again after each guest heartbeat.
        for _ in range(int(QEMU_RESULT_TIMEOUT_S)):
            offset = await _heartbeats(g, offset, 1)
            info: Any = await qmp.execute("query-dirty-rate")
            if info.get("status") == "measured":
                return float(info["dirty-rate"]) * (1 << 20) / PAGE  # MiB/s -> pages/s
    raise TimeoutError("QEMU did not finish calc-dirty-rate")


async def bench_rates(profile: str, rates: tuple[int, ...], root: Path) -> list[RateResult]:
    results = []
    async with boot_test_guest(f"rate-{profile}", root=root, profile=profile, ready_timeout_s=300) as g:
        for rate in rates:
            await g.control.dirty(rate, 128, 0)
            offset = await _heartbeats(g, g.console_log.stat().st_size, SETTLE_HEARTBEATS)
            s0 = await g.control.status()
            await _heartbeats(g, offset, MEASURE_HEARTBEATS)
            s1 = await g.control.status()
            guest_rate = (s1.pages_dirtied - s0.pages_dirtied) / (s1.uptime_s - s0.uptime_s)
            results.append(RateResult(rate, guest_rate, await _qemu_dirty_rate(g)))
        await g.control.stop_dirtying()
    return results


def _print(boots: list[BootResult], rates: list[RateResult], rate_profile: str, console: Console) -> None:
    t = Table(title="boot to READY (TCG)")
    for col in ("profile", "boots", "wall median", "wall min..max", "guest uptime at READY"):
        t.add_column(col, justify="right")
    for b in boots:
        spread = f"{b.wall_min_s:.2f}..{b.wall_max_s:.2f} s"
        t.add_row(
            b.profile, str(b.boots), f"{b.wall_median_s:.2f} s", spread, f"{b.guest_ready_median_s:.2f} s"
        )
    console.print(t)
    r = Table(title=f"dirty rate ({rate_profile} profile, 128 B per page)")
    for col in ("requested pages/s", "guest measured", "ratio", "QEMU measured", "ratio"):
        r.add_column(col, justify="right")
    for x in rates:
        r.add_row(str(x.requested), f"{x.guest_pages_s:.0f}", f"{x.guest_ratio:.3f}", f"{x.qemu_pages_s:.0f}",
                  f"{x.qemu_ratio:.3f}")  # fmt: skip
    console.print(r)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="nc-bench-") as tmp:
        root = Path(tmp) / "vms"
        boots = [await bench_boot(p, args.boots, root) for p in args.profiles]
        rates = await bench_rates(args.rate_profile, tuple(args.rates), root)
    return {
        "boot": [asdict(b) for b in boots],
        "dirty_rate": [asdict(r) | {"guest_ratio": r.guest_ratio, "qemu_ratio": r.qemu_ratio} for r in rates],
        "rate_profile": args.rate_profile,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=3, help="boots per profile (median reported)")
    parser.add_argument("--profiles", nargs="+", default=["test", "default"])
    parser.add_argument("--rate-profile", default="default", help="profile whose guest runs the rate test")
    parser.add_argument("--rates", nargs="+", type=int, default=list(DEFAULT_RATES))
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        boots = [BootResult(**b) for b in result["boot"]]
        rates = [
            RateResult(x["requested"], x["guest_pages_s"], x["qemu_pages_s"]) for x in result["dirty_rate"]
        ]
        _print(boots, rates, args.rate_profile, Console())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
