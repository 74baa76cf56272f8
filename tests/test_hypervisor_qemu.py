"""The QEMU driver with real test guests under TCG: lifecycle, pause, crash, incoming, accel probe."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from novacron.guest.boot import boot_test_guest, guest_spec
from novacron.hypervisor import ConsoleTimeout, QemuDriver, StopMode, VMState, VMStateError, wait_for_line
from novacron.hypervisor.accel import AccelChooser
from novacron.hypervisor.process import proc_start_time
from novacron.image import find_image

pytestmark = pytest.mark.qemu

HEARTBEAT = r"NOVACRON-HEARTBEAT n=(\d+)"


async def test_lifecycle_pause_resume_dirty_and_graceful_stop(tmp_path: Path) -> None:
    async with boot_test_guest("life", root=tmp_path / "vms") as g:
        st = await g.driver.status("life")
        assert (st.state, st.accel, st.qemu_runstate) == (VMState.RUNNING, "tcg", "running")
        assert st.pid is not None and proc_start_time(st.pid) is not None
        assert "fs=tmpfs" in g.ready.line  # the data lives in a tmpfs

        gs = await g.control.status()
        assert gs.ws_pages == 8 * 256 and gs.data_bytes == 24 << 20
        before = await g.control.checksum()
        assert before.bytes == 24 << 20 and len(before.checksum) == 16
        verify = await g.control.verify()
        assert verify.corrupted == 0 and verify.pages == gs.ws_pages

        # The workload follows a new dirty rate; the heartbeat reports what it achieved.
        await g.control.dirty(1000, 64)
        hb = await wait_for_line(
            g.console_log, r"rate=1000 achieved=([1-9]\d*\.\d)", since=g.ready.offset, timeout_s=20
        )
        assert 900 <= float(hb.match.group(1)) <= 1100

        # Pause stops the guest: no heartbeat for 3 s, guest time stands still.
        s0 = await g.control.status()
        t0 = time.monotonic()
        paused = await g.driver.pause("life")
        assert (paused.state, paused.qemu_runstate) == (VMState.PAUSED, "paused")
        offset = g.console_log.stat().st_size
        with pytest.raises(ConsoleTimeout):
            await wait_for_line(g.console_log, HEARTBEAT, since=offset, timeout_s=3.0)
        resumed = await g.driver.resume("life")
        assert resumed.state == VMState.RUNNING
        await wait_for_line(g.console_log, HEARTBEAT, since=offset, timeout_s=10)
        s1 = await g.control.status()
        wall = time.monotonic() - t0
        assert s1.uptime_s - s0.uptime_s < wall - 2.5, (s0.uptime_s, s1.uptime_s, wall)
        assert s1.heartbeats - s0.heartbeats < wall - 2.5

        # Memory content survived pause/resume.
        assert (await g.control.checksum()).checksum == before.checksum
        assert (await g.control.verify()).corrupted == 0

        with pytest.raises(VMStateError):
            await g.driver.start("life")

        stopped = await g.driver.stop("life", mode=StopMode.GRACEFUL)
        assert stopped.state == VMState.DEFINED
        assert "NOVACRON-POWEROFF" in g.driver.console_log("life", since_start=True)
        assert st.pid is not None and proc_start_time(st.pid) is None
        with pytest.raises(VMStateError):
            await g.driver.pause("life")


async def test_kill_9_is_reported_as_crashed_and_vm_restarts(tmp_path: Path) -> None:
    async with boot_test_guest("crashy", root=tmp_path / "vms") as g:
        pid = (await g.driver.status("crashy")).pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert await g.driver.wait_exit("crashy", 10)
        st = await g.driver.status("crashy")
        assert st.state == VMState.CRASHED and st.detail and "without a recorded stop" in st.detail
        assert any("NOVACRON-READY" in line for line in st.log_tail)
        assert st.last_words == ""  # SIGKILL: QEMU wrote nothing after our start marker
        # A second look still says crashed (the verdict is recorded), and the VM can start again.
        assert (await g.driver.status("crashy")).state == VMState.CRASHED
        again = await g.driver.start("crashy")
        assert again.state == VMState.RUNNING and again.pid != pid
        await wait_for_line(
            g.console_log, r"NOVACRON-READY", since=g.driver.console_offset("crashy"), timeout_s=120
        )
        await g.control.reconnect()
        assert (await g.control.verify()).corrupted == 0


async def test_incoming_destination_waits_for_migration(tmp_path: Path) -> None:
    driver = QemuDriver(tmp_path / "vms")
    await driver.define(guest_spec("dest", find_image("test")))
    try:
        st = await driver.start("dest", incoming=True)
        assert (st.state, st.qemu_runstate) == (VMState.INCOMING, "inmigrate")
        async with driver.qmp("dest") as qmp:
            caps = await qmp.execute("query-migrate-capabilities")
        assert isinstance(caps, list) and caps
        # A long-lived event listener on the second monitor does not block the command monitor.
        async with driver.qmp_events("dest") as events, driver.qmp("dest") as qmp:
            status = await qmp.execute("query-status")
            assert status["status"] == "inmigrate"
            assert (await events.execute("query-name"))["name"] == "dest"
        # The VM keeps the UUID it was defined with: a migration destination must use the same.
        spec = driver.spec("dest")
        assert spec.uuid is not None
        async with driver.qmp("dest") as qmp:
            assert (await qmp.execute("query-uuid"))["UUID"] == spec.uuid
        # Nothing ran: the console is empty until a migration brings the guest in.
        assert driver.console_log("dest", since_start=True) == ""
        assert (await driver.stop("dest", mode=StopMode.FORCE)).state == VMState.DEFINED
    finally:
        if (await driver.status("dest")).alive:
            await driver.stop("dest", mode=StopMode.FORCE)
        await driver.delete("dest")


async def test_qemu_start_failure_is_reported_with_its_log(tmp_path: Path) -> None:
    driver = QemuDriver(tmp_path / "vms")
    spec = guest_spec("broken", find_image("test")).model_copy(update={"cpu_model": "no-such-cpu"})
    await driver.define(spec)
    with pytest.raises(Exception, match="exited while starting") as exc:
        await driver.start("broken")
    assert "no-such-cpu" in str(exc.value)
    await driver.delete("broken")


async def test_auto_accel_is_bounded_and_kills_its_probe(tmp_path: Path) -> None:
    image = find_image("test")
    chooser = AccelChooser("qemu-system-x86_64", tmp_path / "probe.json", timeout_s=4.0)
    started = time.monotonic()
    verdict = await asyncio.wait_for(chooser.choose("auto", image.kernel), 30)
    assert time.monotonic() - started < 15
    assert verdict.accel in ("kvm", "tcg") and verdict.reason
    # Cached: the second answer is immediate and the same.
    t1 = time.monotonic()
    assert await chooser.choose("auto", image.kernel) == verdict
    assert time.monotonic() - t1 < 1
    assert _probe_processes() == []


def _probe_processes() -> list[Path]:
    return [p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, "novacron-kvm-probe")]


def _cmdline_has(proc: Path, marker: str) -> bool:
    try:
        return marker in (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
