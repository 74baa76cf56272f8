"""VMService: what the CLI calls in-process today and the agent will expose remotely.

The inventory (store) says which VMs exist and what state the user wants; the driver says what QEMU
is doing. Creation claims the name in the inventory first (compare-and-swap on "must not exist"), so
two concurrent creates of one name cannot both win; a failure after the claim undoes it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from novacron.errors import NovacronError
from novacron.guest.boot import wait_guest_ready
from novacron.guest.control import GuestControl
from novacron.hypervisor.console import ConsoleMatch
from novacron.hypervisor.driver import StopMode, VMState, VMStatus
from novacron.hypervisor.errors import VMNotDefinedError, VMStateError
from novacron.hypervisor.qemu import QemuDriver
from novacron.hypervisor.spec import VMSpec, parse_spec
from novacron.image import find_image
from novacron.observability.log import log_event
from novacron.store.base import KeyValueStore
from novacron.store.inventory import Inventory, VMAlreadyExists, VMNotFound, VMRecord

log = logging.getLogger("novacron.vm.service")


def local_node_name() -> str:
    return os.environ.get("NOVACRON_NODE") or socket.gethostname()


@dataclass(frozen=True)
class VMServiceLimits:
    ready_timeout_s: float = 120.0  # test guest boot under TCG on a busy 2-core host
    console_tail_lines: int = 200


@dataclass(frozen=True)
class VMInfo:
    record: VMRecord
    status: VMStatus

    @property
    def name(self) -> str:
        return self.record.name

    def as_dict(self) -> dict[str, Any]:
        st = self.status
        return {
            "name": self.record.name,
            "state": str(st.state),
            "desired_state": self.record.desired_state,
            "node": self.record.node,
            "pid": st.pid,
            "accel": st.accel,
            "qemu_runstate": st.qemu_runstate,
            "vcpus": self.record.spec.get("vcpus"),
            "memory_mib": self.record.spec.get("memory_mib"),
            "machine": self.record.spec.get("machine"),
            "image_profile": self.record.image_profile,
            "run_dir": str(st.run_dir) if st.run_dir else None,
            "detail": st.detail,
            "log_tail": list(st.log_tail),
        }


class VMService:
    def __init__(
        self,
        store: KeyValueStore,
        driver: QemuDriver,
        *,
        node: str | None = None,
        limits: VMServiceLimits | None = None,
    ) -> None:
        self.inventory = Inventory(store)
        self.driver = driver
        self.node = node or local_node_name()
        self.limits = limits or VMServiceLimits()

    # ----- create / delete -----

    @staticmethod
    def spec_from_image(name: str, profile: str = "test", **overrides: Any) -> dict[str, Any]:
        """A spec dict for the test guest image of ``profile`` (workload settings via ``workload=``)."""
        image = find_image(profile)
        workload: dict[str, int] = overrides.pop("workload", None) or {}
        spec: dict[str, Any] = {
            "name": name,
            "vcpus": image.vcpus,
            "memory_mib": image.memory_mib,
            "kernel": str(image.kernel),
            "initrd": str(image.initrd),
            "cmdline": image.kernel_cmdline(**workload),
            "accel": "auto",
        }
        spec.update({k: v for k, v in overrides.items() if v is not None})
        return spec

    async def create(self, spec_data: dict[str, Any] | VMSpec, *, image_profile: str | None = None) -> VMInfo:
        spec = spec_data if isinstance(spec_data, VMSpec) else parse_spec(spec_data)
        if await self.inventory.find(spec.name) is not None:
            raise VMAlreadyExists(f"a VM named {spec.name!r} already exists", vm=spec.name)
        record = await self.inventory.create(
            VMRecord(
                name=spec.name, spec=spec.model_dump(mode="json"), node=self.node, image_profile=image_profile
            )
        )
        try:
            if self.driver.is_defined(spec.name):
                # Left over from an earlier failure with no inventory record: only reuse it if idle.
                st = await self.driver.status(spec.name)
                if st.alive:
                    raise VMStateError(
                        f"a QEMU for {spec.name!r} is running without an inventory record", vm=spec.name
                    )
                await self.driver.delete(spec.name)
            resolved = await self.driver.define(spec)
            record = await self.inventory.update(spec.name, spec=resolved.model_dump(mode="json"))
        except BaseException:
            with contextlib.suppress(NovacronError):
                await self.inventory.delete(spec.name)
            raise
        log_event(log, "vm.created", vm=spec.name, node=self.node)
        return VMInfo(record, await self.driver.status(spec.name))

    async def delete(self, name: str, *, force: bool = False) -> None:
        await self.inventory.get(name)
        if self.driver.is_defined(name):
            st = await self.driver.status(name)
            if st.alive:
                if not force:
                    raise VMStateError(f"VM {name!r} is {st.state}; stop it first or use --force", vm=name)
                await self.driver.stop(name, mode=StopMode.FORCE)
            await self.driver.delete(name)
        await self.inventory.delete(name)
        log_event(log, "vm.deleted", vm=name)

    # ----- lifecycle -----

    async def _transition(self, name: str, desired: str, op: Callable[[], Awaitable[VMStatus]]) -> VMInfo:
        await self.inventory.get(name)
        status = await op()
        record = await self.inventory.update(name, desired_state=desired)
        return VMInfo(record, status)

    async def start(self, name: str, *, wait_ready: bool = False) -> VMInfo:
        info = await self._transition(name, "running", lambda: self.driver.start(name))
        if wait_ready:
            await self.wait_ready(name)
        return info

    async def stop(self, name: str, *, force: bool = False, timeout_s: float | None = None) -> VMInfo:
        mode = StopMode.FORCE if force else StopMode.GRACEFUL
        return await self._transition(
            name, "stopped", lambda: self.driver.stop(name, mode=mode, timeout_s=timeout_s)
        )

    async def pause(self, name: str) -> VMInfo:
        return await self._transition(name, "paused", lambda: self.driver.pause(name))

    async def resume(self, name: str) -> VMInfo:
        return await self._transition(name, "running", lambda: self.driver.resume(name))

    # ----- queries -----

    async def _status(self, record: VMRecord) -> VMStatus:
        # One run-directory look-up per VM, never a scan (a listing is O(N)). A record of another
        # node (a shared cluster store) says where the VM is when this host has no run directory.
        try:
            return await self.driver.status(record.name)
        except VMNotDefinedError:
            where = "this host" if record.node == self.node else f"this host; its node is {record.node}"
            return VMStatus(name=record.name, state=VMState.DEFINED, detail=f"not defined on {where}")

    async def show(self, name: str) -> VMInfo:
        record = await self.inventory.get(name)
        return VMInfo(record, await self._status(record))

    async def list(self) -> list[VMInfo]:
        return [VMInfo(r, await self._status(r)) for r in await self.inventory.list()]

    async def console(self, name: str, *, tail_lines: int | None = None) -> str:
        await self.inventory.get(name)
        return self.driver.console_log(name, tail_lines=tail_lines or self.limits.console_tail_lines)

    async def wait_ready(self, name: str, *, timeout_s: float | None = None) -> ConsoleMatch:
        """Wait for the test guest's READY marker in this run's console output."""
        await self.inventory.get(name)
        rd = self.driver.run_dir(name)
        return await wait_guest_ready(
            rd.console_log,
            timeout_s=timeout_s or self.limits.ready_timeout_s,
            since=self.driver.console_offset(name),
            vm=name,
        )

    async def guest(self, name: str) -> GuestControl:
        """A (not yet connected) control-channel client for the VM's test guest."""
        st = (await self.show(name)).status
        if not st.alive:
            raise VMStateError(f"VM {name!r} is {st.state}; its guest cannot answer", vm=name, state=st.state)
        return GuestControl(self.driver.run_dir(name).control_socket, vm=name)


__all__ = ["VMAlreadyExists", "VMInfo", "VMNotFound", "VMService", "VMServiceLimits", "local_node_name"]
