"""Boot a test guest and wait for READY: the helper tests and benchmarks share.

    async with boot_test_guest("g1", root=tmp_path / "vms") as g:
        status = await g.control.status()

On exit the guest is killed and its definition removed, whatever happened inside the block.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from novacron.errors import NovacronError
from novacron.guest.control import GuestControl
from novacron.hypervisor.console import ConsoleMatch, wait_for_line
from novacron.hypervisor.driver import StopMode
from novacron.hypervisor.qemu import QemuDriver
from novacron.hypervisor.spec import VMSpec, parse_spec
from novacron.image import GuestImage, find_image

READY_PATTERN = r"NOVACRON-READY\b"
# Lines the guest prints when its workload cannot run: waiting for READY ends at once.
_READY_OR_FAILURE = r"NOVACRON-(READY\b|WORKLOAD-ERROR|WORKLOAD-EXITED)"
DEFAULT_READY_TIMEOUT_S = 120.0


class GuestBootError(NovacronError):
    """The test guest's workload failed to start (its own error line says why)."""


async def wait_guest_ready(
    console_log: Path, *, since: int, timeout_s: float, vm: str | None
) -> ConsoleMatch:
    """Wait for the READY marker after byte ``since`` of ``console_log``; fail fast on a workload error."""
    found = await wait_for_line(console_log, _READY_OR_FAILURE, timeout_s=timeout_s, since=since, vm=vm)
    if not found.line.startswith("NOVACRON-READY"):
        raise GuestBootError("the test guest's workload failed", vm=vm, line=found.line)
    return found


@dataclass(frozen=True)
class BootedGuest:
    name: str
    driver: QemuDriver
    control: GuestControl
    ready: ConsoleMatch
    boot_s: float  # wall time from asking QEMU to start until READY appeared
    image: GuestImage
    spec: VMSpec

    @property
    def console_log(self) -> Path:
        return self.driver.run_dir(self.name).console_log


def guest_spec(
    name: str,
    image: GuestImage,
    *,
    accel: str = "tcg",
    memory_mib: int | None = None,
    vcpus: int | None = None,
    workload: dict[str, int] | None = None,
) -> VMSpec:
    return parse_spec(
        {
            "name": name,
            "vcpus": vcpus or image.vcpus,
            "memory_mib": memory_mib or image.memory_mib,
            "kernel": str(image.kernel),
            "initrd": str(image.initrd),
            "cmdline": image.kernel_cmdline(**(workload or {})),
            "accel": accel,
        }
    )


@contextlib.asynccontextmanager
async def boot_test_guest(
    name: str,
    *,
    root: Path,
    profile: str = "test",
    accel: str = "tcg",
    memory_mib: int | None = None,
    workload: dict[str, int] | None = None,
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    driver: QemuDriver | None = None,
) -> AsyncIterator[BootedGuest]:
    image = find_image(profile)
    drv = driver or QemuDriver(root)
    spec = await drv.define(guest_spec(name, image, accel=accel, memory_mib=memory_mib, workload=workload))
    control = GuestControl(drv.run_dir(name).control_socket, vm=name)
    try:
        started = time.monotonic()
        await drv.start(name)
        ready = await wait_guest_ready(
            drv.run_dir(name).console_log, since=drv.console_offset(name), timeout_s=ready_timeout_s, vm=name
        )
        boot_s = time.monotonic() - started
        await control.connect()
        yield BootedGuest(name, drv, control, ready, boot_s, image, spec)
    finally:
        await control.close()
        with contextlib.suppress(NovacronError):
            if (await drv.status(name)).alive:
                await drv.stop(name, mode=StopMode.FORCE)
        with contextlib.suppress(NovacronError):
            await drv.delete(name)
