"""The destination side of a migration: it checks, obeys, and can refuse or abort.

prepare: capacity, QEMU version and machine type, boot artefacts (same digest here, or shipped), the
VM's name free; define the VM and start QEMU ``-incoming defer -S``. connect: the data path, QEMU's
settings, ``migrate-incoming``; READY to the source. Then it follows the source's phase notices until
COMPLETED (the source QEMU is paused and done), and only then resumes its QEMU (verify: QMP running,
the test guest's control channel answers, its heartbeat goes on) and answers RESUMED. On COMMIT it
takes ownership of the VM.

Rollback kills its QEMU and forgets the definition. Once it has resumed the VM, it never kills it on
its own: if the source cannot be reached the migration goes in-doubt and the VM keeps running here
(the source is paused), until the source's answer settles it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

from novacron.dwcp.mode import Mode
from novacron.errors import NovacronError
from novacron.guest.control import GuestControl, GuestControlLimits
from novacron.hypervisor.console import wait_for_line
from novacron.hypervisor.driver import StopMode
from novacron.hypervisor.errors import SpecError
from novacron.hypervisor.host import detect_host_limits
from novacron.hypervisor.machine import machine_types
from novacron.hypervisor.spec import parse_spec
from novacron.migration import artefacts
from novacron.migration.context import DataPathFactory, DataPathPlan, MigrationHost, PeerLink, PeerSession
from novacron.migration.control import ControlChannel
from novacron.migration.datapath import DataPathKind, DestinationDataPath
from novacron.migration.errors import (
    ControlProtocolError,
    MigrationCancelled,
    MigrationError,
    MigrationRefused,
    MigrationTimeout,
    PeerLost,
)
from novacron.migration.messages import (
    Abort,
    ArtefactChunk,
    Commit,
    Committed,
    Completed,
    NeedArtefacts,
    PhaseNotice,
    PostcopyStarted,
    Prepare,
    Ready,
    Refuse,
    Resumed,
    State,
)
from novacron.migration.orchestrator import MigrationRun, error_info
from novacron.migration.phases import Phase
from novacron.migration.qemu import MigrationDriver, MigrationMonitor, migration_monitor, qemu_version
from novacron.migration.records import MigrationRecord
from novacron.observability.log import log_event
from novacron.store.inventory import VMRecord
from novacron.store.ownership import MigrationLock

log = logging.getLogger("novacron.migration.destination")

HEARTBEAT = r"NOVACRON-HEARTBEAT"
FOLLOW_POLL_S = 1.0  # how often the destination looks at its QEMU while waiting for the source
CONSOLE_TAIL_LINES = 40  # of the guest's console, kept with a failed check (an oops is 30-40)
# Phases the source announces that the destination mirrors.
MIRRORED = (Phase.PRECOPY, Phase.CONVERGE, Phase.SWITCHOVER)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


class DestinationMigration(MigrationRun):
    role = "destination"

    def __init__(
        self,
        host: MigrationHost,
        prepare: Prepare,
        control: ControlChannel,
        session: PeerSession,
        factory: DataPathFactory,
        *,
        peers: PeerLink | None = None,
        busy: str | None = None,
    ) -> None:
        super().__init__(host, prepare.migration_id, prepare.vm, prepare.source_node)
        self.prepare = prepare
        self.control = control
        self.session = session
        self.factory = factory
        self.peers = peers
        self.busy = busy  # why the host refuses at once (concurrency limit), or None
        # The source's deadline bounds its precopy; the destination allows the same plus a margin.
        self.machine.timeouts = dataclasses.replace(
            host.config.timeouts, deadline_s=prepare.deadline_s + 60.0
        )
        self.path: DestinationDataPath | None = None
        self.monitor: MigrationMonitor | None = None
        self.lock: MigrationLock | None = None
        self._stack = contextlib.AsyncExitStack()
        self._defined = False  # this migration defined the VM here (rollback forgets it)
        self._resumed = False
        self._told_resumed = False  # RESUMED was sent: the source may commit on it at any moment
        self._refused: MigrationRefused | None = None
        self.completed: Completed | None = None

    async def create_record(self) -> MigrationRecord:
        p = self.prepare
        self.record = await self.host.records.create(
            MigrationRecord(
                id=self.id,
                vm=self.vm,
                role="destination",
                source=p.source_node,
                destination=self.host.node,
                mode=p.mode,
                data_path=p.data_path,
                max_downtime_ms=p.max_downtime_ms,
                deadline_s=p.deadline_s,
                allow_postcopy=p.allow_postcopy,
            )
        )
        return self.record

    # ================================================================ lifecycle

    async def _run(self) -> None:
        try:
            try:
                await self.guarded(self._forward())
            except (NovacronError, OSError) as exc:
                log_event(log, "migration.failed", logging.WARNING, error=str(exc), **self.ctx())
                await self._rollback(exc)
        except Exception as exc:
            log.exception("migration.crashed")
            with contextlib.suppress(NovacronError):
                await self._rollback(MigrationError(f"internal error: {exc!r}", **self.ctx()))
        finally:
            await self._cleanup()
            await self.mark_done()

    async def _cleanup(self) -> None:
        if self.path is not None:
            with contextlib.suppress(NovacronError, OSError):
                await self.path.close()
        await self.control.close()
        with contextlib.suppress(NovacronError, OSError):
            await self.session.close()
        with contextlib.suppress(NovacronError, OSError):
            await self._stack.aclose()
        if self.lock is not None:
            with contextlib.suppress(NovacronError):
                await self.lock.release()

    # ================================================================ forward path

    async def _forward(self) -> None:
        await self._prepare()
        await self._connect()
        await self._follow()
        await self._verify()
        await self._await_commit()

    def refuse(self, code: str, reason: str, **extra: Any) -> MigrationRefused:
        err = MigrationRefused(reason, code=code, **self.ctx(**extra))
        self._refused = err
        return err

    async def _prepare(self) -> None:
        host, p = self.host, self.prepare
        async with self.phase_deadline():
            if self.busy is not None:
                raise self.refuse("busy", self.busy)
            await self._check_name()
            if not host.shared_store:
                try:
                    self.lock = await host.locks.acquire(self.vm, p.source_node)
                except NovacronError as exc:
                    raise self.refuse(
                        "busy", f"another migration of {self.vm} is arriving", detail=str(exc)
                    ) from None
            await self._check_capacity()
            await self._check_qemu()
            paths = await self._artefacts()
            spec_data = dict(p.spec)
            spec_data.update({role: str(path) for role, path in paths.items()})
            spec_data["accel"] = p.accel
            try:
                spec = parse_spec(spec_data)
            except SpecError as exc:
                raise self.refuse(
                    "invalid",
                    f"the VM's spec is not valid here: {exc.message}",
                    field=exc.context.get("field"),
                ) from None
            driver = host.driver
            await driver.define(spec)
            self._defined = True
            plan = DataPathPlan(
                kind=DataPathKind(p.data_path),
                mode=Mode(p.mode),
                multifd_channels=int(p.parameters.get("multifd-channels", 0))
                if p.capabilities.get("multifd")
                else 0,
                compression=str(p.parameters.get("multifd-compression", "none")),
            )
            if plan.kind not in self.factory.kinds():
                raise self.refuse("data-path", f"this host cannot run the {plan.kind} data path")
            if plan.kind is not DataPathKind.DIRECT:
                await self.session.accept_data(self.remaining())
            self.path = self.factory.destination(plan, migration_id=self.id, vm=self.vm, session=self.session)
            extra = tuple(self.path.settings.extra_args)
            if isinstance(driver, MigrationDriver):
                await driver.start_incoming(self.vm, extra)
            elif extra:
                raise self.refuse("internal", "the data path needs QEMU arguments this driver cannot add")
            else:
                await driver.start(self.vm, incoming=True)
            self.monitor = await self._stack.enter_async_context(migration_monitor(driver, self.vm))

    async def _check_name(self) -> None:
        host = self.host
        existing = await host.inventory.find(self.vm)
        if existing is not None and existing.node == host.node:
            raise self.refuse("exists", f"a VM named {self.vm} already lives on {host.node}")
        if host.driver.is_defined(self.vm):
            status = await host.driver.status(self.vm)
            if status.alive:
                raise self.refuse(
                    "exists", f"a QEMU for {self.vm} already runs on {host.node}", state=str(status.state)
                )
            await host.driver.delete(self.vm)  # a leftover definition without a live QEMU or record

    async def _check_capacity(self) -> None:
        host, p = self.host, self.prepare
        limits = detect_host_limits()
        capacity = (
            host.config.capacity_mib if host.config.capacity_mib is not None else limits.max_vm_memory_mib
        )
        used = 0
        for name in host.driver.defined():
            if name == self.vm:
                continue
            status = await host.driver.status(name)
            if status.alive:
                used += host.driver.spec(name).memory_mib
        if used + p.memory_mib > capacity:
            raise self.refuse(
                "capacity",
                f"{host.node} has {capacity - used} MiB free for VMs, {self.vm} needs {p.memory_mib} MiB",
                capacity_mib=capacity,
                used_mib=used,
            )
        if p.vcpus > limits.cpus:
            raise self.refuse("capacity", f"{self.vm} needs {p.vcpus} vCPUs, {host.node} has {limits.cpus}")

    async def _check_qemu(self) -> None:
        p, driver = self.prepare, self.host.driver
        ours = await qemu_version(driver.qemu_binary)
        if _version_tuple(ours)[:2] < _version_tuple(p.qemu_version)[:2]:
            raise self.refuse("version", f"QEMU here is {ours}, older than the source's {p.qemu_version}")
        types = await asyncio.to_thread(machine_types, driver.qemu_binary)
        if types.get(p.machine) != p.machine:
            raise self.refuse("machine", f"machine type {p.machine} is not available in QEMU {ours}")

    async def _artefacts(self) -> dict[str, Path]:
        cache = self.host.artefact_cache
        found: dict[str, Path] = {}
        missing = []
        for ref in self.prepare.artefacts:
            local = await artefacts.find_local(ref, cache, same_path=self.host.config.trust_source_paths)
            if local is None:
                missing.append(ref)
            else:
                found[ref.role] = local
        if not missing:
            return found
        await self.note("asking the source for " + ", ".join(r.role for r in missing))
        await self.control.send(NeedArtefacts(migration_id=self.id, roles=[r.role for r in missing]))
        for ref in missing:
            receiver = artefacts.ArtefactReceiver(ref, cache)
            try:
                while True:
                    msg = await self.control.expect((ArtefactChunk,), self.remaining())
                    if isinstance(msg, Abort):
                        raise self.error(MigrationError, f"source aborted: {msg.reason}")
                    if not isinstance(msg, ArtefactChunk) or msg.role != ref.role:
                        raise self.error(ControlProtocolError, "artefact chunk for another file")
                    receiver.add(msg.offset, msg.data)
                    if msg.last:
                        found[ref.role] = receiver.finish()
                        break
            except BaseException:
                receiver.discard()
                raise
        return found

    async def _connect(self) -> None:
        await self.enter(Phase.CONNECT)
        monitor, path = self.monitor, self.path
        if monitor is None or path is None:
            raise self.error(MigrationError, "connect without a QEMU monitor")
        async with self.phase_deadline():
            caps = {**self.prepare.capabilities, **path.settings.capabilities}
            await monitor.set_capabilities(caps)
            params = {"tls-creds": "", **path.settings.parameters}
            await monitor.set_parameters(params)
            uri = await path.start()
            await monitor.execute("migrate-incoming", {"uri": uri})
            if uri.startswith("tcp:") and uri.endswith(":0"):
                uri = await self._listening_uri(monitor)
            await self.control.send(
                Ready(
                    migration_id=self.id,
                    incoming_uri=uri,
                    summary=path.summary(
                        bytes.fromhex(self.prepare.baseline_copy), self.prepare.summary_version
                    ),
                    qemu_version=await monitor.version(),
                )
            )

    @staticmethod
    async def _listening_uri(monitor: MigrationMonitor) -> str:
        info = await monitor.query_migrate()
        for addr in info.get("socket-address") or []:
            if addr.get("type") == "inet":
                return f"tcp:{addr.get('host')}:{addr.get('port')}"
        raise MigrationError("the destination QEMU reports no listening address", vm=monitor.vm)

    async def _follow(self) -> None:
        """Mirror the source's phases until COMPLETED (or POSTCOPY-STARTED)."""
        monitor = self.monitor
        if monitor is None:
            raise self.error(MigrationError, "no QEMU monitor")
        while True:
            if monitor.lost.is_set() or monitor.state.status == "failed":
                why = self.path.stats().error if self.path is not None else None
                raise self.error(
                    MigrationError,
                    "the destination QEMU failed or exited" + (f": data path: {why}" if why else ""),
                    status=monitor.state.status,
                )
            if self.machine.timed_out(self.loop.time()):
                raise self.error(MigrationTimeout, f"phase {self.phase} timed out")
            try:
                msg = await self.control.recv(min(FOLLOW_POLL_S, max(self.remaining(), 0.01)))
            except MigrationTimeout:
                continue
            if isinstance(msg, Abort):
                raise self.error(
                    MigrationCancelled if msg.code == "cancelled" else MigrationError,
                    f"source aborted: {msg.reason}",
                    code=msg.code,
                )
            if isinstance(msg, PhaseNotice):
                await self._mirror(msg.phase)
            elif isinstance(msg, Completed):
                if self.phase in (Phase.CONNECT, Phase.PRECOPY, Phase.CONVERGE):
                    await self._mirror(str(Phase.SWITCHOVER))
                self.completed = msg
                return
            elif isinstance(msg, PostcopyStarted):
                await self.enter(Phase.POSTCOPY)
                self.completed = None
                return
            else:
                raise self.error(ControlProtocolError, f"unexpected {msg.TYPE} message while migrating")

    async def _mirror(self, phase_name: str) -> None:
        try:
            target = Phase(phase_name)
        except ValueError:
            return
        if target not in MIRRORED or target == self.phase:
            return
        # Fill in phases the notices skipped (a small VM goes precopy -> switchover).
        for step in (Phase.PRECOPY, Phase.CONVERGE, Phase.SWITCHOVER):
            if self.phase == target:
                break
            if self.machine.allowed(target):
                await self.enter(target)
                break
            if self.machine.allowed(step):
                await self.enter(step)

    # ================================================================ verify, commit

    async def _verify(self) -> None:
        monitor, path = self.monitor, self.path
        if monitor is None or path is None:
            raise self.error(MigrationError, "no QEMU monitor")
        postcopy = self.phase is Phase.POSTCOPY
        async with self.phase_deadline():
            if not postcopy:
                status = await monitor.wait_status({"completed", "failed"}, self.remaining())
                if status != "completed":
                    raise self.error(MigrationError, "the incoming migration did not complete", status=status)
                runstate = await monitor.runstate()
                if runstate != "paused":
                    raise self.error(
                        MigrationError, "destination not paused after the migration", runstate=runstate
                    )
                await self.enter(Phase.VERIFY, resumed=True, source_completed=True)
            else:
                await self.enter(Phase.VERIFY, resumed=True)
            # From here the VM may run on this host: never killed on our own any more (in-doubt).
            self._resumed = True
            console_from = self._console_size()
            await monitor.execute("cont")
            if not await monitor.wait_for(lambda st: st.resume_ts is not None, self.remaining()):
                raise self.error(MigrationError, "no RESUME event after cont")
            checks = await self._check_alive(monitor, console_from)
        resume_ts = monitor.state.resume_ts
        stop_ts = self.completed.stop_ts if self.completed is not None else None
        downtime = round((resume_ts - stop_ts) * 1000, 1) if resume_ts and stop_ts else None
        self.record = await self.host.records.update(
            self.id,
            "destination",
            resume_ts=resume_ts,
            stop_ts=stop_ts,
            downtime_ms=downtime,
            completed_ts=monitor.state.status_ts.get("completed"),
        )
        # Set before the send: once it may have left, only the source's ABORT rolls us back.
        self._told_resumed = True
        await self.control.send(Resumed(migration_id=self.id, resume_ts=resume_ts, checks=checks))
        # QEMU completing proved the stream arrived; the data path's own end is checked off the
        # critical path (a failure here is worth a note, not a rollback of a running VM).
        try:
            await path.finish()
        except (NovacronError, OSError) as exc:
            await self.note(f"data path did not end cleanly after the VM resumed: {exc}")

    def _console_size(self) -> int:
        path = self.host.driver.run_dir(self.vm).console_log
        return path.stat().st_size if path.exists() else 0

    async def _check_alive(self, monitor: MigrationMonitor, console_from: int) -> list[str]:
        checks = []
        runstate = await monitor.runstate()
        if runstate != "running":
            raise self.error(MigrationError, "the VM does not run after cont", runstate=runstate)
        checks.append("qmp: running")
        if self.host.config.verify_guest and self.prepare.image_profile is not None:
            timeout = self.host.config.guest_check_timeout_s
            rd = self.host.driver.run_dir(self.vm)
            control = GuestControl(
                rd.control_socket, vm=self.vm, limits=GuestControlLimits(call_timeout_s=timeout)
            )
            try:
                await control.connect()
                await control.ping(timeout_s=timeout)
                checks.append("guest control: answers")
                await wait_for_line(
                    rd.console_log, HEARTBEAT, timeout_s=timeout, since=console_from, vm=self.vm
                )
                checks.append("guest heartbeat: continues")
            except NovacronError as exc:
                # What the guest printed says why (an oops, a panic): keep it with the error.
                console = self.host.driver.console_log(self.vm, tail_lines=CONSOLE_TAIL_LINES)
                raise self.error(
                    MigrationError,
                    f"the guest is not alive after resume: {exc.message}",
                    console=console,
                ) from None
            finally:
                await control.close()
        return checks

    async def _await_commit(self) -> None:
        msg = await self.control.expect(
            (Commit,), self.host.config.timeouts.commit_s + self.host.config.timeouts.verify_s
        )
        if isinstance(msg, Abort):
            raise self.error(MigrationError, f"source aborted after the resume: {msg.reason}", code=msg.code)
        if not isinstance(msg, Commit):
            raise self.error(ControlProtocolError, "expected COMMIT")
        await self.commit(msg.owner_epoch)
        await self.control.try_send(Committed(migration_id=self.id))

    async def commit(self, owner_epoch: int | None) -> None:
        """Take the VM: ownership and inventory record on this host; the record is done."""
        await self.enter(Phase.COMMIT, owner_epoch=owner_epoch)
        await take_ownership(self.host, self.vm, self.prepare.source_node, self.prepare.image_profile)
        await self.enter(Phase.DONE, outcome="done")
        log_event(log, "migration.done", **self.ctx())

    # ================================================================ rollback

    async def _rollback(self, exc: BaseException) -> None:
        if self.record is None:
            return
        info = error_info(exc, self.phase)
        cancelled = isinstance(exc, MigrationCancelled)
        peer_abort = self.control.aborted is not None
        if self._resumed and not (peer_abort or self._verify_failed(exc)):
            await self._in_doubt(info.message)
            return
        if self.machine.final or self.phase is Phase.ROLLBACK:
            return
        if not self.machine.allowed(Phase.ROLLBACK):
            await self._in_doubt(info.message)
            return
        await self.enter(Phase.ROLLBACK, error=info)
        if self._refused is not None:
            await self.control.try_send(
                Refuse(
                    migration_id=self.id,
                    code=str(self._refused.context.get("code", "refused")),
                    reason=self._refused.message[:1000],
                )
            )
        elif not peer_abort:
            await self.control.try_send(
                Abort(
                    migration_id=self.id,
                    phase=info.phase,
                    code="cancelled" if cancelled else "failed",
                    reason=info.message[:1000],
                )
            )
        with contextlib.suppress(NovacronError, OSError):
            await self._stack.aclose()
        self.monitor = None
        await self._kill_qemu()
        if self.path is not None:
            with contextlib.suppress(NovacronError, OSError):
                await self.path.abort(info.message)
        await self.control.try_send(State(migration_id=self.id, phase="rollback", qemu="gone", resumed=False))
        final = Phase.CANCELLED if cancelled else Phase.FAILED
        await self.enter(final, outcome="cancelled" if cancelled else "failed")

    def _verify_failed(self, exc: BaseException) -> bool:
        # Our own checks after cont failed: the source is paused and complete, so killing ours and
        # letting the source resume keeps the VM alive exactly once. Not after RESUMED went out (a
        # lost COMMIT then looks like a timeout here, and the source may have retired its copy).
        return self.phase is Phase.VERIFY and not self._told_resumed and not isinstance(exc, PeerLost)

    async def _kill_qemu(self) -> None:
        driver = self.host.driver
        if not self._defined:
            return
        with contextlib.suppress(NovacronError):
            if (await driver.status(self.vm)).alive:
                await driver.stop(self.vm, mode=StopMode.FORCE)
        with contextlib.suppress(NovacronError):
            await driver.delete(self.vm)
        self._defined = False

    async def _in_doubt(self, why: str) -> None:
        from novacron.migration.recovery import settle_destination  # noqa: PLC0415 - recovery imports us

        if self.phase is not Phase.IN_DOUBT:
            await self.enter(Phase.IN_DOUBT)
            await self.note(f"in doubt, the VM keeps running here: {why}")
        with contextlib.suppress(NovacronError, OSError):
            await self._stack.aclose()
        self.monitor = None
        while self.peers is not None:
            record = await self.host.records.get(self.id, "destination")
            if record.final:
                self.record = record
                self.machine.phase = record.phase
                return
            result = await settle_destination(self.host, self.peers, record)
            if result is not None:
                self.record = result
                self.machine.phase = result.phase
                return
            await asyncio.sleep(self.host.config.in_doubt_retry_s)  # a retry period, not synchronisation


async def take_ownership(host: MigrationHost, vm: str, source: str, image_profile: str | None) -> None:
    """After COMMIT: this host owns the VM (ownership record and, on per-host stores, inventory)."""
    own = host.ownership
    current = await own.get(vm)
    if host.shared_store:
        if current is None or current.node != host.node:
            raise MigrationError(
                "ownership did not move to this host", vm=vm, owner=current.node if current else None
            )
    elif current is None:
        await own.claim(vm, host.node)
    elif current.node != host.node:
        await own.transfer(vm, current.node, host.node)
    spec = host.driver.spec(vm).model_dump(mode="json")
    existing = await host.inventory.find(vm)
    if existing is None:
        await host.inventory.create(
            VMRecord(name=vm, spec=spec, node=host.node, desired_state="running", image_profile=image_profile)
        )
    else:
        await host.inventory.update(vm, spec=spec, node=host.node, desired_state="running")
