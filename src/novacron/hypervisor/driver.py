"""The hypervisor driver protocol: what the VM service (and later the migration code) asks of a host.

A driver keeps one run directory per VM and must let VMs outlive the process that started them: a new
process re-attaches to running VMs through what the run directory records.
"""

from __future__ import annotations

import enum
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from qemu.qmp import QMPClient

from novacron.hypervisor.spec import VMSpec


class VMState(enum.StrEnum):
    DEFINED = "defined"  # known, never started or cleanly stopped
    RUNNING = "running"
    PAUSED = "paused"  # vCPUs stopped (pause, or a migration source after completion)
    INCOMING = "incoming"  # started as a migration destination, waiting for the stream
    CRASHED = "crashed"  # the QEMU process went away without a recorded stop


class StopMode(enum.StrEnum):
    GRACEFUL = "graceful"  # ACPI power button, then QMP quit, then SIGKILL, each with a timeout
    FORCE = "force"  # SIGTERM, then SIGKILL


@dataclass(frozen=True)
class VMStatus:
    name: str
    state: VMState
    pid: int | None = None
    accel: str | None = None
    qemu_runstate: str | None = None  # QMP query-status, None when not running or not reachable
    started_at: float | None = None
    run_dir: Path | None = None
    detail: str | None = None  # why it crashed: last lines of qemu.log and console.log
    log_tail: tuple[str, ...] = field(default=())
    last_words: str = ""  # crashed: the last line QEMU itself wrote since its last start ("" if none)

    @property
    def alive(self) -> bool:
        return self.state in (VMState.RUNNING, VMState.PAUSED, VMState.INCOMING)


class HypervisorDriver(Protocol):
    async def define(self, spec: VMSpec) -> VMSpec:
        """Record a VM; returns the spec as it will run (machine type resolved to a versioned one)."""
        ...

    async def start(self, name: str, *, incoming: bool = False) -> VMStatus:
        """Start the VM; ``incoming`` starts it as a migration destination (``-incoming defer -S``):
        it waits for ``migrate-incoming`` and stays paused after the stream completes."""
        ...

    async def stop(
        self, name: str, *, mode: StopMode = StopMode.GRACEFUL, timeout_s: float | None = None
    ) -> VMStatus: ...

    async def pause(self, name: str) -> VMStatus: ...

    async def resume(self, name: str) -> VMStatus: ...

    async def status(self, name: str) -> VMStatus: ...

    async def delete(self, name: str) -> None:
        """Forget a VM that is not running (its run directory goes too)."""
        ...

    def console_log(self, name: str, *, tail_lines: int | None = None) -> str: ...

    def qmp(self, name: str) -> AbstractAsyncContextManager[QMPClient]:
        """A connected QMP client for the duration of the ``async with`` block."""
        ...

    def qmp_events(self, name: str) -> AbstractAsyncContextManager[QMPClient]:
        """A connected QMP client on a second monitor, for a long-lived event listener."""
        ...

    def defined(self) -> list[str]:
        """Names of the VMs this driver knows (from the run directories)."""
        ...

    def is_defined(self, name: str) -> bool:
        """Whether this driver knows a VM of that name (one look-up, not a scan)."""
        ...
