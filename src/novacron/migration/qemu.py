"""QEMU as a migration needs it: destinations with the data path's arguments, a QMP session with events.

The driver starts incoming VMs with ``-incoming defer -S`` (the destination stays paused when the
stream completes, so only our explicit ``cont`` runs it, after the source is known to be paused and
completed: a VM never runs twice) and with the spec's ``-uuid`` (both ends agree, as multifd needs).
:class:`MigrationDriver` adds the extra command-line arguments a data path may ask for.

:class:`MigrationMonitor` holds one QMP connection, on the VM's second monitor (``qmp_events``), for
the length of a migration. QMP events are only delivered to a connected client, and the ones a
migration needs (``STOP`` on the source at switchover, ``RESUME`` on the destination at ``cont``,
``MIGRATION`` status changes) carry QEMU's host timestamps, from which the real downtime is computed.
The command monitor stays free for the VM service meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient
from qemu.qmp import QMPError as LibQMPError

from novacron.hypervisor.errors import QMPError
from novacron.hypervisor.qemu import QemuDriver, QemuLimits
from novacron.hypervisor.rundir import RunDir
from novacron.hypervisor.spec import VMSpec
from novacron.observability.log import log_event

log = logging.getLogger("novacron.migration.qemu")

MAX_EVENTS_KEPT = 256
VERSION_TIMEOUT_S = 10.0
# QEMU migration statuses after which nothing more happens on that side.
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
# QEMU 7.2 can leave an ended migration half torn down: when the peer goes away while multifd
# channels are being set up, the migration thread may wait forever for a channel that already quit.
# The status says "failed" but the cleanup never runs, so the migration's yank instance stays
# registered and every later ``migrate`` of that QEMU fails ("duplicate yank instance", leaving the
# status at "setup"). A failed migration's cleanup takes milliseconds; one still pending after
# STUCK_GRACE_S is taken as never coming.
STUCK_GRACE_S = 2.0
STUCK_POLL_S = 0.1
STUCK_NOTE = (
    "the source QEMU cannot migrate again until the VM is restarted "
    "(QEMU 7.2 left its last migration without cleanup)"
)

Ask = Callable[[str], Awaitable[Any]]


async def ended_but_not_cleaned_up(
    ask: Ask, *, grace_s: float = STUCK_GRACE_S, poll_s: float = STUCK_POLL_S
) -> bool:
    """Whether QEMU still holds a migration that ended (status final) but was never cleaned up,
    so that it cannot start another one. ``ask(cmd)`` runs a QMP command. A QEMU without
    ``query-yank`` (before 6.0) cannot tell, and is taken as not stuck."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    while True:
        info = await ask("query-migrate")
        if not isinstance(info, dict) or info.get("status") not in FINAL_STATUSES:
            return False
        try:
            instances = await ask("query-yank")
        except QMPError:
            return False
        held = isinstance(instances, list) and any(
            isinstance(i, dict) and i.get("type") == "migration" for i in instances
        )
        if not held:
            return False
        if loop.time() >= deadline:
            return True
        await asyncio.sleep(poll_s)


class MigrationDriver(QemuDriver):
    """The QEMU driver; incoming VMs may get the data path's extra command-line arguments."""

    def __init__(self, root: Path | None = None, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self._incoming_args: dict[str, tuple[str, ...]] = {}

    def _argv(self, rd: RunDir, spec: VMSpec, accel: str, incoming: bool) -> list[str]:
        argv = super()._argv(rd, spec, accel, incoming)
        if incoming:
            argv += list(self._incoming_args.get(rd.name, ()))
        return argv

    async def start_incoming(self, name: str, extra_args: tuple[str, ...] = ()) -> None:
        self._incoming_args[name] = extra_args
        try:
            await self.start(name, incoming=True)
        finally:
            self._incoming_args.pop(name, None)


def qmp_timestamp(event: dict[str, Any]) -> float | None:
    ts = event.get("timestamp") or {}
    try:
        return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class MonitorState:
    """What the event reader has seen so far."""

    status: str = ""  # last MIGRATION status
    statuses: list[str] = field(default_factory=list)
    status_ts: dict[str, float] = field(default_factory=dict)  # first QMP timestamp of each status
    stop_ts: float | None = None
    resume_ts: float | None = None
    passes: int = 0
    events: list[tuple[str, float | None]] = field(default_factory=list)


class MigrationMonitor:
    """A QMP session of one VM for the length of a migration; see the module docstring."""

    def __init__(self, driver: QemuDriver, vm: str, client: QMPClient) -> None:
        self.driver = driver
        self.vm = vm
        self.client = client
        self.state = MonitorState()
        self._changed = asyncio.Condition()
        self._listener = EventListener(("MIGRATION", "MIGRATION_PASS", "STOP", "RESUME", "SHUTDOWN"))
        self._reader: asyncio.Task[None] | None = None
        self.lost = asyncio.Event()  # the QMP connection ended (QEMU died or quit)

    @property
    def limits(self) -> QemuLimits:
        return self.driver.limits

    def _start(self) -> None:
        self.client.register_listener(self._listener)
        self._reader = asyncio.create_task(self._read_events(), name=f"qmp-events-{self.vm}")

    async def _read_events(self) -> None:
        try:
            while True:
                event = await self._listener.get()
                name = str(event.get("event"))
                ts = qmp_timestamp(dict(event))
                raw = event.get("data")
                data: dict[str, Any] = dict(raw) if isinstance(raw, dict) else {}
                async with self._changed:
                    st = self.state
                    if len(st.events) < MAX_EVENTS_KEPT:
                        st.events.append((name, ts))
                    if name == "MIGRATION":
                        st.status = str(data.get("status", ""))
                        if len(st.statuses) < MAX_EVENTS_KEPT:
                            st.statuses.append(st.status)
                        if ts is not None:
                            st.status_ts.setdefault(st.status, ts)
                    elif name == "MIGRATION_PASS":
                        st.passes = int(data.get("pass", st.passes))
                    elif name == "STOP":
                        st.stop_ts = ts
                    elif name == "RESUME":
                        st.resume_ts = ts
                    self._changed.notify_all()
        except asyncio.CancelledError:
            raise

    async def execute(
        self, cmd: str, args: dict[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> Any:
        wait = timeout_s if timeout_s is not None else self.limits.qmp_command_timeout_s
        try:
            return await asyncio.wait_for(self.client.execute(cmd, args), wait)
        except ExecuteError as exc:
            raise QMPError(f"QMP {cmd} failed", vm=self.vm, reason=str(exc)) from None
        except (TimeoutError, LibQMPError, OSError, EOFError) as exc:
            self.lost.set()
            raise QMPError(
                f"QMP {cmd} did not complete", vm=self.vm, reason=str(exc) or type(exc).__name__
            ) from None

    async def wait_for(self, predicate: Any, timeout_s: float) -> bool:
        """Wait until ``predicate(state)`` holds; False on timeout."""
        try:
            async with self._changed, asyncio.timeout(timeout_s):
                await self._changed.wait_for(lambda: predicate(self.state))
        except TimeoutError:
            return False
        return True

    async def wait_status(self, statuses: frozenset[str] | set[str], timeout_s: float) -> str | None:
        """Wait for a MIGRATION event with one of ``statuses`` (or already seen); the status, or None."""
        ok = await self.wait_for(lambda st: any(s in statuses for s in st.statuses), timeout_s)
        if not ok:
            return None
        return next(s for s in self.state.statuses if s in statuses)

    async def stuck(self) -> bool:
        """Whether this QEMU cannot migrate again: see :func:`ended_but_not_cleaned_up`."""
        return await ended_but_not_cleaned_up(self.execute)

    async def query_migrate(self) -> dict[str, Any]:
        reply = await self.execute("query-migrate")
        return dict(reply) if isinstance(reply, dict) else {}

    async def runstate(self) -> str:
        reply = await self.execute("query-status")
        return str(reply["status"])

    async def version(self) -> str:
        reply = await self.execute("query-version")
        q = reply["qemu"]
        return f"{q['major']}.{q['minor']}.{q['micro']}"

    async def set_capabilities(self, caps: dict[str, bool]) -> None:
        if caps:
            await self.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": k, "state": v} for k, v in sorted(caps.items())]},
            )

    async def set_parameters(self, params: dict[str, Any]) -> None:
        if params:
            await self.execute("migrate-set-parameters", dict(params))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        with contextlib.suppress(LibQMPError, KeyError, ValueError):
            self.client.remove_listener(self._listener)


@contextlib.asynccontextmanager
async def migration_monitor(driver: QemuDriver, vm: str) -> AsyncIterator[MigrationMonitor]:
    async with driver.qmp_events(vm) as client:
        monitor = MigrationMonitor(driver, vm, client)
        monitor._start()
        log_event(log, "migration.qmp_attached", vm=vm)
        try:
            yield monitor
        finally:
            await monitor.close()


_versions: dict[str, str] = {}


async def qemu_version(binary: str) -> str:
    """``major.minor.micro`` of a QEMU binary (``--version``), cached per binary."""
    cached = _versions.get(binary)
    if cached is not None:
        return cached
    proc = await asyncio.create_subprocess_exec(
        binary, "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), VERSION_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise QMPError("QEMU --version did not answer", qemu=binary) from None
    m = re.search(rb"version (\d+\.\d+\.\d+)", out)
    if m is None:
        raise QMPError("cannot read QEMU's version", qemu=binary, output=out[:120].decode(errors="replace"))
    _versions[binary] = m.group(1).decode()
    return _versions[binary]
