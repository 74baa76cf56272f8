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
DEFAULT_READY_TIMEOUT_S = 120.0


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
    spec = await drv.define(
        guest_spec(name, image, accel=accel, memory_mib=memory_mib, workload=workload)
    )
    control = GuestControl(drv.run_dir(name).control_socket, vm=name)
    try:
        started = time.monotonic()
        await drv.start(name)
        ready = await wait_for_line(
            drv.run_dir(name).console_log, READY_PATTERN, timeout_s=ready_timeout_s,
            since=drv.console_offset(name), vm=name,
        )  # fmt: skip
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
