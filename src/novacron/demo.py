"""The issue-2 demo: boot the test guest, drive its workload, watch it live, verify its memory.

Run by ``novacron demo`` (the README's main command). Later issues replace it with the migration demo.
It is idempotent (a VM left over by an interrupted run is removed first) and cleans up on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live
from rich.table import Table

from novacron.errors import NovacronError
from novacron.guest.control import GuestControl, GuestStatus
from novacron.hypervisor.console import ConsoleTimeout, wait_for_line
from novacron.store.inventory import VMNotFound
from novacron.vm.local import local_service
from novacron.vm.service import VMService

DEMO_VM = "demo"
HEARTBEAT = r"NOVACRON-HEARTBEAT"
STATUS_PERIOD_S = 0.5


@dataclass(frozen=True)
class DemoSettings:
    profile: str = "default"
    rate: int = 2250  # pages/s, as in the migration measurements of shared/QEMU-MIGRATION-NOTES.md
    bytes_per_page: int = 128
    watch_s: float = 8.0
    pause_s: float = 3.0


@dataclass
class DemoReport:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def check(self, what: str, ok: bool, detail: str) -> None:
        self.checks.append((what, ok, detail))

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(ok for _, ok, _ in self.checks)


def _status_table(st: GuestStatus, requested: int, title: str) -> Table:
    table = Table(title=title, show_header=False, min_width=60)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("guest uptime", f"{st.uptime_s:.1f} s")
    table.add_row("heartbeats", str(st.heartbeats))
    table.add_row("dirty rate requested", f"{requested} pages/s x {st.bytes_per_page} B")
    table.add_row("dirty rate achieved", f"{st.achieved_rate:.0f} pages/s (last second)")
    table.add_row("pages dirtied / rewritten", f"{st.pages_dirtied} / {st.pages_rewritten}")
    table.add_row("working set", f"{st.ws_pages} pages ({st.ws_pages * 4 // 1024} MiB)")
    table.add_row("tmpfs data", f"{st.data_bytes / 2**20:.0f} MiB")
    table.add_row("address-space switches", f"{st.ticks} ping-pongs")
    return table


async def _remove_leftover(svc: VMService, console: Console) -> None:
    with contextlib.suppress(VMNotFound):
        await svc.show(DEMO_VM)
        console.print(f"removing VM [bold]{DEMO_VM}[/] left over by an earlier run")
        await svc.delete(DEMO_VM, force=True)


async def _watch(ctl: GuestControl, console: Console, settings: DemoSettings, report: DemoReport) -> None:
    ack = await ctl.dirty(settings.rate, settings.bytes_per_page)
    deadline = time.monotonic() + settings.watch_s
    st = await ctl.status()
    with Live(_status_table(st, ack.rate, "workload (live)"), console=console, refresh_per_second=4) as live:
        while time.monotonic() < deadline:
            await asyncio.sleep(STATUS_PERIOD_S)  # display refresh period, not synchronisation
            st = await ctl.status()
            live.update(_status_table(st, ack.rate, "workload (live)"))
    ratio = st.achieved_rate / ack.rate if ack.rate else 0.0
    report.check("dirty rate achieved", 0.9 <= ratio <= 1.1, f"{st.achieved_rate:.0f} of {ack.rate} pages/s")


async def _pause_resume(svc: VMService, ctl: GuestControl, settings: DemoSettings, report: DemoReport,
                        console: Console) -> None:  # fmt: skip
    rd = svc.driver.run_dir(DEMO_VM)
    before = await ctl.status()
    await svc.pause(DEMO_VM)
    console.print(f"paused; watching the console for {settings.pause_s:.0f} s: no heartbeat may appear")
    offset = rd.console_log.stat().st_size
    silent = False
    try:
        await wait_for_line(rd.console_log, HEARTBEAT, since=offset, timeout_s=settings.pause_s)
    except ConsoleTimeout:
        silent = True
    report.check("pause stops the guest", silent, "no heartbeat while paused" if silent else "heartbeat seen")
    await svc.resume(DEMO_VM)
    line = await wait_for_line(rd.console_log, HEARTBEAT, since=offset, timeout_s=30)
    console.print(f"resumed: {line.line}", highlight=False)
    after = await ctl.status()
    advanced = after.uptime_s - before.uptime_s
    report.check(
        "guest time stood still",
        advanced < settings.pause_s,
        f"guest uptime advanced {advanced:.1f} s across a {settings.pause_s:.0f} s pause",
    )


async def run_demo(settings: DemoSettings, console: Console) -> DemoReport:
    report = DemoReport()
    async with local_service() as svc:
        await _remove_leftover(svc, console)
        spec = VMService.spec_from_image(DEMO_VM, settings.profile, accel="auto")
        try:
            await svc.create(spec, image_profile=settings.profile)
            console.print(
                f"booting the [bold]{settings.profile}[/] test guest ({spec['memory_mib']} MiB) ..."
            )
            started = time.monotonic()
            info = await svc.start(DEMO_VM)
            ready = await svc.wait_ready(DEMO_VM)
            boot_s = time.monotonic() - started
            console.print(f"READY after {boot_s:.1f} s (accel {info.status.accel}, pid {info.status.pid})")
            console.print(f"  {ready.line}", highlight=False, markup=False)
            async with await svc.guest(DEMO_VM) as ctl:
                checksum = await ctl.checksum()
                console.print(
                    f"tmpfs data checksum {checksum.checksum} over {checksum.bytes / 2**20:.0f} MiB"
                )
                await _watch(ctl, console, settings, report)
                verify = await ctl.verify()
                report.check(
                    "working set intact", verify.ok, f"{verify.corrupted} of {verify.pages} pages corrupted"
                )
                await _pause_resume(svc, ctl, settings, report, console)
                again = await ctl.checksum()
                report.check("data checksum unchanged", again.checksum == checksum.checksum,
                             f"{checksum.checksum} -> {again.checksum}")  # fmt: skip
                verify = await ctl.verify()
                report.check("working set intact after pause", verify.ok,
                             f"{verify.corrupted} of {verify.pages} pages corrupted")  # fmt: skip
                await ctl.stop_dirtying()
            stopped = await svc.stop(DEMO_VM)
            report.check("graceful stop", not stopped.status.alive, f"VM is {stopped.status.state}")
        finally:
            # Also on Ctrl-C (the task is cancelled) or a failure: never leave the demo VM behind.
            with contextlib.suppress(NovacronError, VMNotFound):
                await svc.delete(DEMO_VM, force=True)
    return report


def print_report(report: DemoReport, console: Console) -> None:
    table = Table("check", "result", "detail", title="demo checks")
    for what, ok, detail in report.checks:
        table.add_row(what, "[green]ok[/]" if ok else "[bold red]FAILED[/]", detail)
    console.print(table)
