"""The QEMU implementation of the hypervisor driver, on ``qemu.qmp``.

QEMU runs in its own session and is not our child (it is started through a short-lived shell that
exits at once), so it survives the agent or CLI that started it, and any later process re-attaches
through the run directory: the recorded pid, checked against /proc for pid reuse, and the QMP socket.
A QEMU that disappears without a recorded stop is reported as crashed, with the last lines of its logs.

QEMU's QMP socket serves one client at a time; :meth:`QemuDriver.qmp` connects for the duration of a
block, with a bounded wait, and the driver never keeps a connection open between operations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient
from qemu.qmp import QMPError as LibQMPError

from novacron.hypervisor.accel import AccelChooser
from novacron.hypervisor.driver import StopMode, VMState, VMStatus
from novacron.hypervisor.errors import (
    HypervisorError,
    QMPError,
    SpecError,
    VMNotDefinedError,
    VMStateError,
)
from novacron.hypervisor.machine import resolve_machine
from novacron.hypervisor.process import is_same_process, kill_quietly, proc_start_time, wait_pid_exit
from novacron.hypervisor.rundir import MAX_SOCKET_PATH, RunDir, RunState
from novacron.hypervisor.rundir import tail_lines as read_tail
from novacron.hypervisor.spec import NAME_PATTERN, VMSpec
from novacron.observability.log import log_event
from novacron.paths import state_dir

log = logging.getLogger("novacron.hypervisor.qemu")

START_MARK = "--- "  # opens each start's section of qemu.log (what follows is QEMU's own output)
DEFAULT_QEMU_BINARY = "qemu-system-x86_64"
# Under TCG, QEMU 7.2 clears a page's migration dirty bit without dropping the software-TLB entries
# that let writes to it skip dirty tracking (include/exec/ram_addr.h, the aligned fast path of
# cpu_physical_memory_sync_dirty_bitmap); such a write is lost unless the entry is flushed first.
# Guest address-space switches flush non-global entries, but the kernel's own mappings are global
# and survive them, so a guest kernel could lose writes to its own data across a migration (oopses,
# corrupted page cache). Without PGE no entry is global: every switch flushes everything.
TCG_CPU_MODEL = "qemu64,-pge"
# That narrows the loss but cannot close it: a write between QEMU's last sync and the vCPU stopping
# is lost all the same (docs/hypervisor.md). The fast path is only taken for a RAM block whose
# length is a multiple of 64 pages; QEMU's other path clears bits page by page and resets those TLB
# entries. A RAM size 8 KiB over the spec (QEMU rounds -m to 8 KiB) puts TCG guests on it; both ends
# of a migration compute the same size.
TCG_RAM_PAD_KIB = 8
# QEMU runstates (query-status) mapped to our states; anything else is reported as paused with the
# raw runstate, since the vCPUs are not running.
_RUNSTATE_MAP = {"running": VMState.RUNNING, "inmigrate": VMState.INCOMING}


@dataclass(frozen=True)
class QemuLimits:
    start_timeout_s: float = 20.0  # QEMU up and answering QMP
    start_poll_s: float = 0.02
    qmp_connect_timeout_s: float = 10.0  # includes waiting for another QMP client to leave
    qmp_command_timeout_s: float = 30.0
    graceful_stop_timeout_s: float = 30.0  # guest reacts to the ACPI power button
    quit_timeout_s: float = 10.0
    kill_timeout_s: float = 10.0
    crash_log_lines: int = 15


# Guest RAM of PC machines lives in a shared memfd named like QEMU's default RAM block ("pc.ram"), so
# the migration stream is the same as with plain -m, while the host agent can read the guest's memory
# through /proc/<pid>/fd (the HDE baseline indexes local siblings from it, docs/tunnel.md).
SHARED_RAM_ID = "pc.ram"
SHARED_RAM_MEMFD_NAME = "memory-backend-memfd"  # what QEMU names the memfd (/proc/<pid>/fd link)


def _shared_ram(spec: VMSpec) -> bool:
    return spec.machine.startswith(("pc", "q35"))


def _shared_ram_machine_opt(spec: VMSpec) -> str:
    return f",memory-backend={SHARED_RAM_ID}" if _shared_ram(spec) else ""


def _shared_ram_object(spec: VMSpec, accel: str) -> list[str]:
    if not _shared_ram(spec):
        return []
    return ["-object", f"memory-backend-memfd,id={SHARED_RAM_ID},size={ram_size(spec, accel)},share=on"]


def ram_size(spec: VMSpec, accel: str) -> str:
    """The guest's RAM as QEMU's ``-m`` takes it; under TCG a little over the spec (TCG_RAM_PAD_KIB)."""
    if accel == "tcg":
        return f"{spec.memory_mib * 1024 + TCG_RAM_PAD_KIB}K"
    return f"{spec.memory_mib}M"


class QemuDriver:
    """Runs VMs as QEMU processes; see the module docstring for the process model."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        qemu_binary: str | None = None,
        limits: QemuLimits | None = None,
        accel_cache: Path | None = None,
    ) -> None:
        self.root = root if root is not None else state_dir() / "vms"
        found = qemu_binary or shutil.which(DEFAULT_QEMU_BINARY)
        if not found:
            raise HypervisorError(
                f"{DEFAULT_QEMU_BINARY} not found: install the Debian package qemu-system-x86"
            )
        self.qemu_binary = found
        self.limits = limits or QemuLimits()
        self._accel = AccelChooser(self.qemu_binary, accel_cache or (self.root.parent / "accel-probe.json"))
        self._locks: dict[str, asyncio.Lock] = {}

    # ----- run directories -----

    def run_dir(self, name: str) -> RunDir:
        if not re.match(NAME_PATTERN, name):
            raise SpecError(
                f"invalid VM name {name!r}", field="name", reason="does not match " + NAME_PATTERN
            )
        return RunDir(self.root / name)

    def _existing(self, name: str) -> RunDir:
        rd = self.run_dir(name)
        if not rd.exists():
            raise VMNotDefinedError(f"no VM named {name!r} on this host", vm=name)
        return rd

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def defined(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if RunDir(p).exists())

    def is_defined(self, name: str) -> bool:
        try:
            return self.run_dir(name).exists()
        except SpecError:
            return False

    def spec(self, name: str) -> VMSpec:
        return self._existing(name).read_spec()

    # ----- define / delete -----

    async def define(self, spec: VMSpec) -> VMSpec:
        rd = self.run_dir(spec.name)
        if rd.exists():
            raise VMStateError(f"a VM named {spec.name!r} is already defined on this host", vm=spec.name)
        if any(len(str(sock)) > MAX_SOCKET_PATH for sock in rd.sockets):
            raise SpecError(
                "run directory path too long for unix sockets",
                field="name",
                vm=spec.name,
                reason=f"{rd.path} exceeds {MAX_SOCKET_PATH - 13} bytes",
            )
        resolved = spec.model_copy(
            update={
                "machine": resolve_machine(self.qemu_binary, spec.machine),
                "uuid": spec.uuid or str(uuid.uuid4()),
            }
        )
        rd.path.mkdir(parents=True, exist_ok=True)
        rd.write_spec(resolved)
        rd.write_state(RunState())
        log_event(log, "vm.defined", vm=spec.name, machine=resolved.machine)
        return resolved

    async def delete(self, name: str) -> None:
        async with self._lock(name):
            rd = self._existing(name)
            st = await self._status(rd)
            if st.alive:
                raise VMStateError(
                    f"VM {name!r} is {st.state}; stop it before deleting", vm=name, state=st.state
                )
            shutil.rmtree(rd.path)
            self._locks.pop(name, None)
            log_event(log, "vm.deleted", vm=name)

    # ----- start -----

    def _argv(self, rd: RunDir, spec: VMSpec, accel: str, incoming: bool) -> list[str]:
        argv = [
            self.qemu_binary,
            "-name", f"{spec.name},debug-threads=on",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-machine", f"{spec.machine},accel={accel}{_shared_ram_machine_opt(spec)}",
            "-smp", str(spec.vcpus),
            "-m", ram_size(spec, accel),
            *_shared_ram_object(spec, accel),
            "-chardev", f"socket,id=qmp,path={rd.qmp_socket},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-chardev", f"socket,id=qmp-events,path={rd.events_socket},server=on,wait=off",
            "-mon", "chardev=qmp-events,mode=control",
            "-chardev", f"file,id=console,path={rd.console_log},append=on",
            "-serial", "chardev:console",
            "-chardev", f"socket,id=control,path={rd.control_socket},server=on,wait=off",
            "-serial", "chardev:control",
        ]  # fmt: skip
        if spec.uuid:
            argv += ["-uuid", spec.uuid]
        if spec.cpu_model:
            argv += ["-cpu", spec.cpu_model]
        elif accel == "tcg":
            argv += ["-cpu", TCG_CPU_MODEL]
        if spec.kernel:
            argv += ["-kernel", str(spec.kernel)]
            if spec.initrd:
                argv += ["-initrd", str(spec.initrd)]
            if spec.cmdline:
                argv += ["-append", spec.cmdline]
        if spec.disk:
            fmt = "qcow2" if spec.disk.suffix == ".qcow2" else "raw"
            argv += ["-drive", f"file={spec.disk},if=virtio,format={fmt},cache=none"]
        if incoming:
            # -S: a migration destination stays paused when the stream is complete; the orchestrator
            # resumes it only once the source is known to be stopped (a VM never runs twice).
            argv += ["-incoming", "defer", "-S"]
        return argv

    async def start(self, name: str, *, incoming: bool = False) -> VMStatus:
        async with self._lock(name):
            rd = self._existing(name)
            current = await self._status(rd)
            if current.alive:
                raise VMStateError(f"VM {name!r} is already {current.state}", vm=name, state=current.state)
            spec = rd.read_spec()
            verdict = await self._accel.choose(spec.accel, spec.kernel, spec.cpu_model)
            rd.trim_console_log()
            for sock in rd.sockets:
                sock.unlink(missing_ok=True)
            offset = rd.console_log.stat().st_size if rd.console_log.exists() else 0
            argv = self._argv(rd, spec, verdict.accel, incoming)
            with rd.qemu_log.open("ab") as qlog:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                qlog.write(f"{START_MARK}{stamp} start accel={verdict.accel}\n".encode())
            pid = self._spawn_detached(argv, rd.qemu_log)
            state = RunState(
                pid=pid,
                proc_start=proc_start_time(pid),
                started_at=time.time(),
                accel=verdict.accel,
                incoming=incoming,
                console_offset=offset,
            )
            rd.write_state(state)
            log_event(
                log,
                "vm.starting",
                vm=name,
                pid=pid,
                accel=verdict.accel,
                why=verdict.reason,
                incoming=incoming,
            )
            await self._wait_started(rd, pid)
            return await self._status(rd)

    @staticmethod
    def _spawn_detached(argv: list[str], log_path: Path) -> int:
        """Start QEMU in its own session, not as our child; returns its pid."""
        # The shell backgrounds QEMU, prints its pid and exits: QEMU is reparented to init (or the
        # nearest subreaper) and never becomes a zombie of ours.
        launcher = ["sh", "-c", 'exec 0</dev/null; "$@" >>"$NOVACRON_QEMU_LOG" 2>&1 & echo $!', "sh", *argv]
        env = dict(os.environ, NOVACRON_QEMU_LOG=str(log_path))
        try:
            out = subprocess.run(
                launcher,
                capture_output=True,
                text=True,
                env=env,
                start_new_session=True,
                timeout=30,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            raise HypervisorError("cannot launch QEMU", reason=str(exc)) from None
        try:
            return int(out.strip())
        except ValueError:
            raise HypervisorError("QEMU launcher printed no pid", output=out.strip()) from None

    async def _wait_started(self, rd: RunDir, pid: int) -> None:
        deadline = time.monotonic() + self.limits.start_timeout_s
        while time.monotonic() < deadline:
            if proc_start_time(pid) is None:
                self._record_exit(rd, "crashed")
                raise HypervisorError(
                    "QEMU exited while starting", vm=rd.name, log=" | ".join(read_tail(rd.qemu_log, 5))
                )
            if rd.qmp_socket.exists():
                try:
                    async with self.qmp(rd.name) as qmp:
                        await self._execute(qmp, "query-status", vm=rd.name)
                    return
                except QMPError:
                    pass  # socket created but not accepting yet; keep waiting until the deadline
            # QEMU offers no readiness notification before QMP answers; poll briefly.
            await asyncio.sleep(self.limits.start_poll_s)
        kill_quietly(pid, signal.SIGKILL)
        await wait_pid_exit(pid, self.limits.kill_timeout_s)
        self._record_exit(rd, "crashed")
        raise HypervisorError(
            "QEMU did not answer QMP in time; killed it", vm=rd.name, timeout_s=self.limits.start_timeout_s
        )

    # ----- QMP -----

    def qmp(self, name: str) -> contextlib.AbstractAsyncContextManager[QMPClient]:
        """A QMP client for the duration of the block, on the command monitor (one client at a time)."""
        return self._qmp(name, events=False)

    def qmp_events(self, name: str) -> contextlib.AbstractAsyncContextManager[QMPClient]:
        """A QMP client on the second monitor, for one long-lived user that follows events (e.g. the
        STOP/RESUME/MIGRATION events of a migration) without blocking :meth:`qmp` users."""
        return self._qmp(name, events=True)

    @contextlib.asynccontextmanager
    async def _qmp(self, name: str, *, events: bool) -> AsyncIterator[QMPClient]:
        rd = self._existing(name)
        client = QMPClient(name)
        path = rd.events_socket if events else rd.qmp_socket
        try:
            await asyncio.wait_for(client.connect(str(path)), self.limits.qmp_connect_timeout_s)
        # qemu.qmp asserts it is running when connect() returns; a QEMU that closes the socket right
        # after the greeting (killed or quitting) leaves it disconnecting instead: the same failure.
        except (TimeoutError, ConnectError, OSError, EOFError, AssertionError) as exc:
            with contextlib.suppress(LibQMPError, OSError, EOFError):
                await client.disconnect()
            raise QMPError(
                "cannot connect to QEMU's QMP socket",
                vm=name,
                socket=str(path),
                reason=str(exc) or type(exc).__name__,
            ) from None
        try:
            yield client
        finally:
            # After "quit" or a guest power-off QEMU closes the socket first: EOF is expected here.
            with contextlib.suppress(LibQMPError, OSError, EOFError):
                await client.disconnect()

    async def _execute(self, qmp: QMPClient, cmd: str, args: dict[str, Any] | None = None, *, vm: str) -> Any:
        try:
            return await asyncio.wait_for(qmp.execute(cmd, args), self.limits.qmp_command_timeout_s)
        except ExecuteError as exc:
            raise QMPError(f"QMP {cmd} failed", vm=vm, reason=str(exc)) from None
        except (TimeoutError, LibQMPError, OSError) as exc:
            raise QMPError(
                f"QMP {cmd} did not complete", vm=vm, reason=str(exc) or type(exc).__name__
            ) from None

    async def execute(self, name: str, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Run one QMP command on a fresh connection (for callers that need no events)."""
        async with self.qmp(name) as qmp:
            return await self._execute(qmp, cmd, args, vm=name)

    # ----- status -----

    def _alive_pid(self, rd: RunDir, state: RunState) -> int | None:
        if state.pid is None:
            return None
        return state.pid if is_same_process(state.pid, state.proc_start, str(rd.path)) else None

    def _record_exit(self, rd: RunDir, how: str) -> None:
        state = rd.read_state()
        rd.write_state(
            RunState(
                console_offset=state.console_offset,
                accel=state.accel,
                last_exit=how,
                started_at=state.started_at,
            )
        )

    def _crash_status(self, rd: RunDir, state: RunState) -> VMStatus:
        n = self.limits.crash_log_lines
        qlog = read_tail(rd.qemu_log, n)
        clog = [line for line in self.console_log(rd.name, since_start=True).splitlines()[-n:]]
        detail = "QEMU process is gone without a recorded stop"
        tail = (*(f"qemu.log: {x}" for x in qlog), *(f"console: {x}" for x in clog))
        start = max((i for i, x in enumerate(qlog) if x.startswith(START_MARK)), default=-1)
        said = next((x for x in reversed(qlog[start + 1 :]) if x.strip()), "")
        return VMStatus(
            name=rd.name,
            state=VMState.CRASHED,
            accel=state.accel,
            started_at=state.started_at,
            run_dir=rd.path,
            detail=detail,
            log_tail=tail,
            last_words=said,
        )

    async def _status(self, rd: RunDir) -> VMStatus:
        state = rd.read_state()
        pid = self._alive_pid(rd, state)
        if pid is None:
            if state.pid is not None and not state.stopping:
                self._record_exit(rd, "crashed")
                log_event(log, "vm.crashed", logging.WARNING, vm=rd.name, pid=state.pid)
                return self._crash_status(rd, state)
            if state.pid is not None:  # we were stopping it and it is gone: a clean stop
                self._record_exit(rd, "stopped")
            elif state.last_exit == "crashed":
                return self._crash_status(rd, state)
            return VMStatus(name=rd.name, state=VMState.DEFINED, run_dir=rd.path)
        runstate: str | None = None
        try:
            async with self.qmp(rd.name) as qmp:
                reply = await self._execute(qmp, "query-status", vm=rd.name)
            runstate = str(reply["status"])
        except QMPError as exc:
            log_event(log, "vm.status_unknown", logging.WARNING, vm=rd.name, reason=str(exc))
        if runstate is None:
            vm_state = VMState.INCOMING if state.incoming else VMState.RUNNING
        else:
            vm_state = _RUNSTATE_MAP.get(runstate, VMState.PAUSED)
        return VMStatus(
            name=rd.name,
            state=vm_state,
            pid=pid,
            accel=state.accel,
            qemu_runstate=runstate,
            started_at=state.started_at,
            run_dir=rd.path,
        )

    async def status(self, name: str) -> VMStatus:
        async with self._lock(name):
            return await self._status(self._existing(name))

    # ----- pause / resume -----

    async def _require(self, rd: RunDir, allowed: tuple[VMState, ...], op: str) -> VMStatus:
        st = await self._status(rd)
        if st.state not in allowed:
            raise VMStateError(f"cannot {op} VM {rd.name!r}: it is {st.state}", vm=rd.name, state=st.state)
        return st

    async def pause(self, name: str) -> VMStatus:
        async with self._lock(name):
            rd = self._existing(name)
            st = await self._require(rd, (VMState.RUNNING, VMState.PAUSED), "pause")
            if st.state == VMState.RUNNING:
                await self.execute(name, "stop")
            log_event(log, "vm.paused", vm=name)
            return await self._status(rd)

    async def resume(self, name: str) -> VMStatus:
        async with self._lock(name):
            rd = self._existing(name)
            st = await self._require(rd, (VMState.RUNNING, VMState.PAUSED), "resume")
            if st.state == VMState.PAUSED:
                await self.execute(name, "cont")
            log_event(log, "vm.resumed", vm=name)
            return await self._status(rd)

    # ----- stop -----

    async def stop(
        self, name: str, *, mode: StopMode = StopMode.GRACEFUL, timeout_s: float | None = None
    ) -> VMStatus:
        async with self._lock(name):
            rd = self._existing(name)
            st = await self._status(rd)
            if not st.alive or st.pid is None:
                raise VMStateError(f"cannot stop VM {name!r}: it is {st.state}", vm=name, state=st.state)
            pid = st.pid
            state = rd.read_state()
            state.stopping = True
            rd.write_state(state)
            how = await self._stop_process(name, pid, mode, timeout_s)
            self._record_exit(rd, "stopped")
            log_event(log, "vm.stopped", vm=name, mode=mode, how=how)
            return await self._status(rd)

    async def _stop_process(self, name: str, pid: int, mode: StopMode, timeout_s: float | None) -> str:
        lim = self.limits
        if mode == StopMode.GRACEFUL:
            with contextlib.suppress(QMPError):
                await self.execute(name, "system_powerdown")
                if await wait_pid_exit(
                    pid, timeout_s if timeout_s is not None else lim.graceful_stop_timeout_s
                ):
                    return "guest powered off"
            with contextlib.suppress(QMPError):
                await self.execute(name, "quit")
                if await wait_pid_exit(pid, lim.quit_timeout_s):
                    return "qmp quit"
        else:
            kill_quietly(pid, signal.SIGTERM)
            if await wait_pid_exit(pid, timeout_s if timeout_s is not None else lim.quit_timeout_s):
                return "sigterm"
        kill_quietly(pid, signal.SIGKILL)
        if not await wait_pid_exit(pid, lim.kill_timeout_s):
            raise HypervisorError("QEMU survived SIGKILL", vm=name, pid=pid)
        return "sigkill"

    async def wait_exit(self, name: str, timeout_s: float) -> bool:
        """Wait until the VM's QEMU process is gone (however it ended); True if it did in time."""
        rd = self._existing(name)
        state = rd.read_state()
        pid = self._alive_pid(rd, state)
        return True if pid is None else await wait_pid_exit(pid, timeout_s)

    # ----- console -----

    def console_log(self, name: str, *, tail_lines: int | None = None, since_start: bool = False) -> str:
        rd = self._existing(name)
        if not rd.console_log.is_file():
            return ""
        if tail_lines is not None:
            return "\n".join(read_tail(rd.console_log, tail_lines))
        offset = rd.read_state().console_offset if since_start else 0
        with rd.console_log.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", "replace")

    def console_offset(self, name: str) -> int:
        """Where the current run's output starts in console.log."""
        return self._existing(name).read_state().console_offset
