"""The source side of a migration: it drives the phases (docs/migration.md section 2).

Forward path: prepare (lock, session, PREPARE/READY) -> connect (QEMU settings, data path) -> precopy
-> converge (steering) -> switchover (QEMU stops the VM and sends the rest) -> verify (COMPLETED to
the destination, which resumes and answers RESUMED) -> commit (ownership moves, the source QEMU is
quit) -> done.

Rollback: cancel QEMU's migration, make sure the source QEMU runs, tell the destination to kill its
QEMU. Once the source QEMU has completed, the destination may hold (or run) the only complete copy,
so the source resumes only after the destination confirmed its QEMU is gone; when that cannot be
confirmed the migration goes *in-doubt* and keeps asking (``recovery.py``), the VM paused but intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

from novacron.dwcp.encoding.summary import SUMMARY_VERSION_NAMED
from novacron.dwcp.mode import Mode
from novacron.errors import NovacronError
from novacron.hypervisor.driver import StopMode, VMState
from novacron.migration import artefacts
from novacron.migration.context import (
    DataPathFactory,
    DataPathPlan,
    MigrationHost,
    MigrationRequest,
    PeerLink,
    PeerSession,
)
from novacron.migration.control import ControlChannel
from novacron.migration.converge import (
    Abort as SteerAbort,
)
from novacron.migration.converge import (
    ConvergenceSteering,
    Sample,
    SetParameters,
    StartPostcopy,
    SteeringPolicy,
    eta_seconds,
)
from novacron.migration.datapath import DataPathKind, QemuMigrationSettings, SourceDataPath
from novacron.migration.direct import DirectSourcePath
from novacron.migration.errors import (
    MigrationCancelled,
    MigrationConflict,
    MigrationDiverged,
    MigrationError,
    MigrationRefused,
    PeerLost,
    SourceQemuStuck,
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
from novacron.migration.orchestrator import MigrationRun, error_info, wall
from novacron.migration.phases import Phase
from novacron.migration.planning import choose_plan, link_view
from novacron.migration.qemu import FINAL_STATUSES, STUCK_NOTE, MigrationMonitor, migration_monitor
from novacron.migration.records import ErrorInfo, MigrationRecord, Progress
from novacron.observability import metrics
from novacron.observability.log import log_event
from novacron.store.ownership import MigrationLock, NotOwned

log = logging.getLogger("novacron.migration.source")

# QEMU migration statuses in which migrate_cancel does something.
CANCELLABLE_STATUSES = frozenset(
    {"setup", "active", "device", "pre-switchover", "wait-unplug", "postcopy-active", "cancelling"}
)
SWITCHOVER_STATUSES = frozenset({"device", "pre-switchover", "completed"})
# Capabilities we always set explicitly: an earlier migration (or a test) may have left others on.
BASE_CAPABILITIES = {
    "events": True,
    "auto-converge": True,
    "multifd": False,
    "postcopy-ram": False,
    "xbzrle": False,
    "pause-before-switchover": False,
}
RATE_WINDOW_S = 1.0
# Paths where QEMU's bytes go to TCP as they are (or QEMU-compressed): QEMU is capped below the link.
UNCOMPRESSED_PATHS = frozenset({DataPathKind.DIRECT, DataPathKind.PASSTHROUGH})


def merged_settings(
    path: QemuMigrationSettings, caps: dict[str, bool], params: dict[str, Any]
) -> QemuMigrationSettings:
    """The data path's settings plus our policy; the data path's own keys win (they define its wire)."""
    return path.with_policy(
        {k: v for k, v in caps.items() if k not in path.capabilities},
        {k: v for k, v in params.items() if k not in path.parameters},
    )


class SourceMigration(MigrationRun):
    role = "source"

    def __init__(
        self,
        host: MigrationHost,
        migration_id: str,
        request: MigrationRequest,
        peers: PeerLink,
        factory: DataPathFactory,
    ) -> None:
        super().__init__(host, migration_id, request.vm, request.destination)
        self.request = request
        self.peers = peers
        self.factory = factory
        cfg = host.config
        self.max_downtime_ms = request.max_downtime_ms or cfg.default_max_downtime_ms
        self.deadline_s = request.deadline_s or cfg.default_deadline_s
        self.allow_postcopy = request.allow_postcopy and cfg.allow_postcopy
        self.machine.timeouts = dataclasses.replace(cfg.timeouts, deadline_s=self.deadline_s)
        self.session: PeerSession | None = None
        self.control: ControlChannel | None = None
        self.path: SourceDataPath | None = None
        self.plan: DataPathPlan | None = None
        self.monitor: MigrationMonitor | None = None
        self.lock: MigrationLock | None = None
        self.steering: ConvergenceSteering | None = None
        self._stack = contextlib.AsyncExitStack()
        self._was_paused = False
        self._qemu_status = ""
        self._rate_samples: list[tuple[float, int]] = []
        self._uri = ""
        self._last_buffered = 0
        self.qemu_downtime_ms: int | None = None

    # ================================================================ lifecycle

    async def create_record(self) -> MigrationRecord:
        self.record = await self.host.records.create(
            MigrationRecord(
                id=self.id,
                vm=self.vm,
                role="source",
                source=self.host.node,
                destination=self.peer,
                mode=str(self.request.mode or ""),
                mode_forced=self.request.mode is not None,
                max_downtime_ms=self.max_downtime_ms,
                deadline_s=self.deadline_s,
                allow_postcopy=self.allow_postcopy,
            )
        )
        return self.record

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
            self._observe_metrics()
            await self.mark_done()

    async def _cleanup(self) -> None:
        if self.path is not None:
            with contextlib.suppress(NovacronError, OSError):
                await self.path.close()
        if self.control is not None:
            await self.control.close()
        if self.session is not None:
            with contextlib.suppress(NovacronError, OSError):
                await self.session.close()
        with contextlib.suppress(NovacronError, OSError):
            await self._stack.aclose()
        if self.lock is not None:
            with contextlib.suppress(NovacronError):
                await self.lock.release()

    def _observe_metrics(self) -> None:
        rec = self.record
        if rec is None or rec.outcome is None or not rec.mode:
            return
        outcome = {"done": "completed", "failed": "failed", "cancelled": "cancelled"}[rec.outcome]
        with contextlib.suppress(NovacronError):
            metrics.observe_migration(
                rec.mode,
                outcome,
                duration_s=rec.duration_s,
                bytes_raw=rec.progress.bytes_raw,
                bytes_wire=rec.progress.bytes_wire,
                downtime_s=None if rec.downtime_ms is None else rec.downtime_ms / 1000,
            )

    # ================================================================ forward path

    async def _forward(self) -> None:
        ready = await self._prepare()
        await self._connect(ready)
        await self._precopy()
        resumed = await self._verify()
        await self._commit(resumed)

    async def _send_phase(self, phase: Phase, iteration: int = 0) -> None:
        if self.control is not None:
            self.control.phase = str(phase)
            await self.control.try_send(
                PhaseNotice(migration_id=self.id, phase=str(phase), iteration=iteration)
            )

    async def _prepare(self) -> Ready:
        host = self.host
        async with self.phase_deadline():
            record = await host.inventory.get(self.vm)
            if record.node != host.node:
                raise self.error(MigrationConflict, f"VM {self.vm!r} is not on this host", node=record.node)
            status = await host.driver.status(self.vm)
            if status.state not in (VMState.RUNNING, VMState.PAUSED):
                raise self.error(
                    MigrationConflict, f"VM {self.vm!r} is {status.state}; only a running VM migrates"
                )
            self._was_paused = status.state is VMState.PAUSED
            self.monitor = await self._stack.enter_async_context(migration_monitor(host.driver, self.vm))
            if await self.monitor.stuck():
                raise self.error(SourceQemuStuck, f"VM {self.vm!r}: {STUCK_NOTE}")
            await self._ensure_owned()
            self.lock = await host.locks.acquire(self.vm, host.node)
            self._stack.push_async_callback(self._stop_keepalive, asyncio.create_task(self._keep_lock()))
            self.session = await self.peers.open(self.peer, self.id)
            self.control = ControlChannel(
                self.session.control, vm=self.vm, peer=self.peer, migration_id=self.id
            )
            self.control.start()
            mode = await self._decided_mode()
            kinds = self.factory.kinds()
            link = link_view(
                hint_bps=self.session.link_hint_bps(),
                measured_bps=self.session.bandwidth_bps(),
                rtt_s=self.session.path_rtt_s(),
                guest_vcpus=host.driver.spec(self.vm).vcpus,
            )
            self.plan = plan = choose_plan(mode, self.request, kinds, host, link=link)
            if plan.kind is not DataPathKind.DIRECT:
                await self.session.open_data()
            peer_host = self.peers.address(self.peer)[0]
            self.path = self.factory.source(
                plan,
                migration_id=self.id,
                vm=self.vm,
                peer_node=self.peer,
                peer_host=peer_host,
                session=self.session,
            )
            spec = host.driver.spec(self.vm)
            accel = status.accel or "tcg"
            settings = self._settings(self.path.settings)
            prepare = Prepare(
                migration_id=self.id,
                vm=self.vm,
                source_node=host.node,
                spec=spec.model_copy(update={"accel": accel}).model_dump(mode="json"),
                image_profile=record.image_profile,
                qemu_version=await self.monitor.version(),
                machine=spec.machine,
                accel=accel,
                memory_mib=spec.memory_mib,
                vcpus=spec.vcpus,
                artefacts=await artefacts.describe(spec),
                mode=str(mode),
                data_path=str(plan.kind),
                capabilities=dict(settings.capabilities),
                parameters={
                    "multifd-channels": plan.multifd_channels,
                    "multifd-compression": plan.compression,
                },
                max_downtime_ms=self.max_downtime_ms,
                deadline_s=self.deadline_s,
                allow_postcopy=self.allow_postcopy,
                baseline_copy=self.path.baseline_copy().hex(),
                summary_version=SUMMARY_VERSION_NAMED,
            )
            self.record = await host.records.update(
                self.id,
                "source",
                mode=str(mode),
                data_path=str(plan.kind),
                source_was_paused=self._was_paused,
            )
            await self.control.send(prepare)
            while True:
                reply = await self.control.expect((Ready, Refuse, NeedArtefacts), self.remaining())
                if isinstance(reply, NeedArtefacts):
                    await self._ship(prepare, reply)
                    continue
                if isinstance(reply, Refuse):
                    raise self.error(
                        MigrationRefused, f"destination refused: {reply.reason}", code=reply.code
                    )
                if isinstance(reply, Abort):
                    raise self.error(MigrationError, f"destination aborted: {reply.reason}", code=reply.code)
                if isinstance(reply, Ready):
                    return reply

    async def _decided_mode(self) -> Mode:
        if self.request.mode is not None:
            return self.request.mode
        if self.session is None:
            return Mode.HYBRID
        return await self.session.wait_mode(self.host.config.mode_decision_s) or Mode.HYBRID

    def _settings(self, path_settings: QemuMigrationSettings) -> QemuMigrationSettings:
        caps = dict(BASE_CAPABILITIES)
        caps["postcopy-ram"] = self.allow_postcopy and path_settings.multifd_channels == 0
        params: dict[str, Any] = {"tls-creds": "", "tls-hostname": ""}
        return merged_settings(path_settings, caps, params)

    async def _ensure_owned(self) -> None:
        own = self.host.ownership
        try:
            current = await own.require(self.vm)
        except NotOwned:
            # VMs created before ownership was recorded: the host that runs it claims it first.
            await own.claim(self.vm, self.host.node)
            return
        if current.node != self.host.node:
            raise self.error(
                MigrationConflict, f"VM {self.vm!r} is owned by {current.node}", owner=current.node
            )

    async def _keep_lock(self) -> None:
        lock = self.lock
        if lock is None:
            return
        period = max(lock.ttl / 3, 0.5)
        while True:
            await asyncio.sleep(period)  # a refresh period, not synchronisation
            try:
                await lock.refresh()
            except NovacronError as exc:
                log_event(log, "migration.lock_refresh_failed", logging.WARNING, error=str(exc), **self.ctx())
                if lock.lost.is_set():
                    return

    @staticmethod
    async def _stop_keepalive(task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _ship(self, prepare: Prepare, need: NeedArtefacts) -> None:
        control = self.control
        if control is None:
            return
        by_role = {a.role: a for a in prepare.artefacts}
        for role in need.roles:
            ref = by_role.get(role)
            if ref is None:
                raise self.error(
                    MigrationError, "destination asked for an artefact the VM does not have", role=role
                )
            await self.note(f"shipping {role} ({ref.size} bytes)")
            async for offset, data, last in artefacts.read_chunks(Path(ref.path)):
                await control.send(
                    ArtefactChunk(migration_id=self.id, role=role, offset=offset, data=data, last=last)
                )

    async def _connect(self, ready: Ready) -> None:
        await self.enter(Phase.CONNECT)
        await self._send_phase(Phase.CONNECT)
        path, monitor, session = self.path, self.monitor, self.session
        if path is None or monitor is None or session is None or self.plan is None:
            raise self.error(MigrationError, "connect without a prepared data path")
        async with self.phase_deadline():
            if isinstance(path, DirectSourcePath):
                await path.install(monitor)
                path.set_incoming(ready.incoming_uri)
            rtt = session.rtt_s()
            self.steering = ConvergenceSteering(
                SteeringPolicy(
                    max_downtime_ms=self.max_downtime_ms,
                    deadline_at=self.machine.deadline,
                    allow_postcopy=self.allow_postcopy,
                    postcopy_capable=self.allow_postcopy and self.plan.multifd_channels == 0,
                    cap_bandwidth=self.plan.kind in UNCOMPRESSED_PATHS and self.plan.compression == "none",
                    # In a datacenter QEMU, not the fabric, is the bound: a cap at the rate measured
                    # early in pass 1 only slowed it (unshaped: 3.0 s instead of 1.6 s); the backlog
                    # steering still bounds what the socket buffers hold at switchover.
                    cap_from_measurement=self.plan.mode is not Mode.DATACENTER,
                    one_way_delay_s=(rtt or 0.0) / 2,
                ),
                self.host.config.steering,
            )
            settings = self._settings(path.settings)
            params = {**self.steering.initial_parameters(self._link_bps()), **settings.parameters}
            await monitor.set_capabilities(dict(settings.capabilities))
            await monitor.set_parameters(params)
            self._uri = await path.start(ready.summary)

    # ================================================================ precopy .. switchover

    async def _precopy(self) -> None:
        monitor, control = self.monitor, self.control
        if monitor is None or control is None:
            raise self.error(MigrationError, "precopy without a QEMU monitor")
        await self.enter(Phase.PRECOPY)
        await self._send_phase(Phase.PRECOPY)
        await monitor.execute("migrate", {"uri": self._uri})
        interval = self.host.config.sample_interval_s
        while True:
            if control.aborted is not None:
                raise self.error(
                    MigrationError,
                    f"destination aborted: {control.aborted.reason}",
                    code=control.aborted.code,
                )
            if control.lost:
                raise self.error(
                    PeerLost, "lost the destination during the migration", reason=control.lost_reason
                )
            if self.lock is not None and self.lock.lost.is_set():
                raise self.error(MigrationError, "migration lock lost (store unreachable)")
            # A data path that failed before QEMU was past its setup holds QEMU's sockets open (the
            # tunnel: docs/migration.md); QEMU then waits, and only our cancel ends its migration.
            why = self.path.stats().error if self.path is not None else None
            if why is not None:
                raise self.error(MigrationError, f"data path failed: {why}")
            info = await monitor.query_migrate()
            sample = Sample.from_query(info)
            self._qemu_status = sample.status
            sample = await self._observe(sample, info)
            if self.machine.timed_out(self.loop.time()):
                if self.phase in (Phase.PRECOPY, Phase.CONVERGE) and self.steering is not None:
                    await self._steer(sample)  # at the deadline: raises with the steering's reason
                raise self.error(MigrationDiverged, f"phase {self.phase} timed out")
            if sample.status == "completed" or monitor.state.status == "completed":
                if self.phase in (Phase.PRECOPY, Phase.CONVERGE):
                    await self.enter(Phase.SWITCHOVER)
                return
            if sample.status in ("failed", "cancelled"):
                # QEMU only sees its socket break; the data path knows why (corrupt batch, peer gone).
                why = self.path.stats().error if self.path is not None else None
                raise self.error(
                    MigrationError,
                    f"QEMU migration {sample.status}" + (f": data path: {why}" if why else ""),
                    qemu_error=str(info.get("error-desc", "")),
                )
            if sample.status == "postcopy-active" and self.phase is not Phase.POSTCOPY:
                await self._postcopy_started()
            elif sample.status in SWITCHOVER_STATUSES or monitor.state.stop_ts is not None:
                if self.phase in (Phase.PRECOPY, Phase.CONVERGE):
                    await self.enter(Phase.SWITCHOVER)
                    await self._send_phase(Phase.SWITCHOVER)
            elif sample.iteration >= 2 and self.phase is Phase.PRECOPY:
                await self.enter(Phase.CONVERGE)
                await self._send_phase(Phase.CONVERGE, sample.iteration)
            if self.steering is not None and self.phase in (Phase.PRECOPY, Phase.CONVERGE):
                await self._steer(sample)
            status_now = monitor.state.status
            await monitor.wait_for(lambda st, s=status_now: st.status != s, interval)

    def _link_bps(self) -> float | None:
        """The link bandwidth steering may cap QEMU at: only an operator's hint (else the first pass
        measures it). The HDE tunnel is not capped: QEMU's raw rate into it exceeds the link's."""
        if self.session is None or self.plan is None or self.plan.kind not in UNCOMPRESSED_PATHS:
            return None
        return self.session.link_hint_bps()

    async def _steer(self, sample: Sample) -> None:
        steering, monitor = self.steering, self.monitor
        if steering is None or monitor is None:
            return
        actions = steering.observe(sample, self.loop.time())
        bw = self._link_bps()
        if bw:
            actions = steering.link_measured(bw) + actions
        for action in actions:
            if isinstance(action, SetParameters):
                await monitor.set_parameters(action.parameters)
                log_event(
                    log, "migration.steered", logging.DEBUG, vm=self.vm, why=action.why, **action.parameters
                )
                if not action.routine:
                    await self.note(action.why)
            elif isinstance(action, StartPostcopy):
                await self.note(action.why)
                await monitor.execute("migrate-start-postcopy")
            elif isinstance(action, SteerAbort):
                raise self.error(MigrationDiverged, action.reason)

    async def _postcopy_started(self) -> None:
        # From here the destination runs the VM while pages still arrive: there is no way back.
        await self.enter(Phase.POSTCOPY)
        if self.control is not None:
            await self.control.send(
                PostcopyStarted(
                    migration_id=self.id, stop_ts=self.monitor.state.stop_ts if self.monitor else None
                )
            )

    async def _observe(self, sample: Sample, info: dict[str, Any]) -> Sample:
        """Progress from QEMU's figures and the data path's counters; the sample with the wire rate."""
        path = self.path
        if isinstance(path, DirectSourcePath):
            await path.sample(sample.transferred)
        stats = path.stats() if path is not None else None
        now = self.loop.time()
        raw = max(sample.transferred, stats.qemu_bytes if stats else 0)
        wire = stats.transport_bytes if stats and stats.transport_bytes else raw
        self._rate_samples = [(t, b) for t, b in self._rate_samples if now - t <= RATE_WINDOW_S] + [
            (now, wire)
        ]
        t0, b0 = self._rate_samples[0]
        rate = (wire - b0) * 8 / (now - t0) if now > t0 else 0.0
        ram = info.get("ram") or {}
        self.progress = Progress(
            at=wall(),
            qemu_status=sample.status,
            iteration=sample.iteration,
            ram_total=int(ram.get("total", 0)),
            ram_remaining=sample.remaining,
            bytes_raw=raw,
            bytes_wire=wire,
            rate_bps=rate,
            dirty_pages_rate=sample.dirty_pages_rate,
            page_size=sample.page_size,
            throttle_pct=sample.throttle_pct,
            expected_downtime_ms=sample.expected_downtime_ms,
            eta_s=eta_seconds(sample),
            buffered_bytes=path.buffered_bytes() if path is not None else 0,
        )
        await self.save_progress()
        measured = stats is not None and stats.transport_bytes > 0 and now - t0 >= RATE_WINDOW_S / 2
        buffered = path.buffered_bytes() if path is not None else 0
        if sample.status == "active":
            self._last_buffered = buffered
        return dataclasses.replace(
            sample, transferred=raw, wire_bps=rate if measured else None, buffered_bytes=buffered
        )

    # ================================================================ verify, commit

    async def _verify(self) -> Resumed:
        monitor, control, path = self.monitor, self.control, self.path
        if monitor is None or control is None or path is None:
            raise self.error(MigrationError, "verify without a monitor")
        async with self.phase_deadline():
            if self.phase is Phase.SWITCHOVER:
                if (
                    await monitor.wait_status({"completed", "failed", "cancelled"}, self.remaining())
                    != "completed"
                ):
                    raise self.error(
                        MigrationError, "QEMU did not complete the switchover", status=monitor.state.status
                    )
                runstate = await monitor.runstate()
                if runstate != "postmigrate":
                    raise self.error(
                        MigrationError, "source QEMU not paused after completion", runstate=runstate
                    )
                # Downtime runs from here: record, tell the destination, and only then the books.
                await self.enter(Phase.VERIFY, source_completed=True, stop_ts=monitor.state.stop_ts)
                await control.send(Completed(migration_id=self.id, stop_ts=monitor.state.stop_ts))
                await self._after_completion(monitor, path)
            elif self.phase is Phase.POSTCOPY:
                if (
                    await monitor.wait_status(
                        {"completed", "failed"}, self.machine.remaining(self.loop.time())
                    )
                    != "completed"
                ):
                    raise self.error(
                        MigrationError, "post-copy did not complete", status=monitor.state.status
                    )
                await self.enter(Phase.VERIFY, source_completed=True, stop_ts=monitor.state.stop_ts)
                await control.send(Completed(migration_id=self.id, stop_ts=monitor.state.stop_ts))
        async with self.phase_deadline():
            reply = await control.expect((Resumed,), self.remaining())
        if isinstance(reply, Abort):
            raise self.error(
                MigrationError, f"destination could not resume the VM: {reply.reason}", code=reply.code
            )
        if not isinstance(reply, Resumed):
            raise self.error(MigrationError, "unexpected answer to COMPLETED")
        return reply

    async def _after_completion(self, monitor: MigrationMonitor, path: SourceDataPath) -> None:
        """Counters of the finished migration; the data path confirms delivery (off the critical path:
        the destination QEMU completing is what proves the stream arrived)."""
        info = await monitor.query_migrate()
        await self._observe(Sample.from_query(info), info)
        self.qemu_downtime_ms = int(info.get("downtime", 0)) or None
        backlog = self.steering.backlog_ms if self.steering is not None else 0.0
        await self.note(
            f"switchover: QEMU paused the VM for {self.qemu_downtime_ms} ms; "
            f"{self._last_buffered >> 10} KiB ({backlog:.0f} ms) were still on their way before it"
        )
        try:
            await path.finish()
        except (NovacronError, OSError) as exc:
            await self.note(f"data path did not confirm delivery: {exc}")
        self.record = await self.host.records.update(
            self.id, "source", qemu_downtime_ms=self.qemu_downtime_ms, progress=self.progress
        )

    async def _commit(self, resumed: Resumed) -> None:
        host = self.host
        stop_ts = self.monitor.state.stop_ts if self.monitor else None
        downtime = None
        if stop_ts is not None and resumed.resume_ts is not None:
            downtime = round((resumed.resume_ts - stop_ts) * 1000, 1)
        await self.enter(Phase.COMMIT, resume_ts=resumed.resume_ts, downtime_ms=downtime)
        owner = await host.ownership.transfer(self.vm, host.node, self.peer, lock=self.lock)
        await self._retire_source_qemu()
        if host.shared_store:
            await host.inventory.update(self.vm, node=self.peer, desired_state="running")
        else:
            with contextlib.suppress(NovacronError):
                await host.inventory.delete(self.vm)
        confirmed = False
        if self.control is not None and await self.control.try_send(
            Commit(migration_id=self.id, owner_epoch=owner.epoch)
        ):
            with contextlib.suppress(NovacronError):
                reply = await self.control.expect((Committed,), self.host.config.timeouts.commit_s)
                confirmed = isinstance(reply, Committed)
        if not confirmed:
            await self.note("destination did not confirm the commit; it settles by asking this host")
        if self.path is not None:  # late counts: sockets that closed at completion
            stats = self.path.stats()
            if stats.transport_bytes:
                self.progress = self.progress.model_copy(update={"bytes_wire": stats.transport_bytes})
            if stats.codec_batches:  # what HDE's cost model chose, and what it cost
                codecs = ", ".join(f"{name} {n}" for name, n in sorted(stats.codec_batches.items()))
                summary = (
                    f"; the destination's baseline summary took {stats.baseline_summary_bytes:,} bytes"
                    if stats.baseline_summary_bytes
                    else ""
                )
                await self.note(f"HDE batches: {codecs}; encoding took {stats.encode_seconds:.1f} s{summary}")
        await self.enter(Phase.DONE, outcome="done", owner_epoch=owner.epoch, progress=self.progress)
        log_event(
            log, "migration.done", downtime_ms=downtime, bytes_wire=self.progress.bytes_wire, **self.ctx()
        )

    async def _retire_source_qemu(self) -> None:
        """Quit the source QEMU (ownership has moved) and forget its definition on this host."""
        host = self.host
        with contextlib.suppress(NovacronError, OSError):
            await self._stack.aclose()  # the QMP monitor first: quitting QEMU ends it anyway
        self.monitor = None
        status = await host.driver.status(self.vm)
        if status.alive:
            await host.driver.stop(self.vm, mode=StopMode.FORCE)
        with contextlib.suppress(NovacronError):
            await host.driver.delete(self.vm)

    # ================================================================ rollback

    async def _rollback(self, exc: BaseException) -> None:
        info = error_info(exc, self.phase)
        cancelled = isinstance(exc, MigrationCancelled)
        if self.record is None:
            return
        if self.phase in (Phase.POSTCOPY, Phase.COMMIT, Phase.IN_DOUBT):
            await self._in_doubt(info.message)
            return
        if self.phase is Phase.ROLLBACK or self.machine.final:
            return
        info = await self._source_qemu_exit(info)
        # The error first (the record says why whatever happens next), then stop QEMU's migration.
        self.record = await self.host.records.update(self.id, "source", error=info)
        code = "cancelled" if cancelled else "failed"
        completed = await self._stop_qemu_migration()
        # The destination may hold the only complete copy: resume only once it confirmed it is
        # gone; without that answer neither rolling back nor committing is safe: in-doubt.
        if completed and not await self._destination_confirms_gone(info.message, code):
            await self._in_doubt(f"the source had completed: {info.message}")
            return
        await self.enter(Phase.ROLLBACK, error=info)
        if not completed and self.control is not None:
            await self.control.try_send(
                Abort(migration_id=self.id, phase=info.phase, code=code, reason=info.message[:1000])
            )
        await self._resume_source()
        if self.path is not None:
            with contextlib.suppress(NovacronError, OSError):
                await self.path.abort(info.message)
        monitor = self.monitor
        if info.kind != SourceQemuStuck.__name__ and monitor is not None and not monitor.lost.is_set():
            with contextlib.suppress(NovacronError):
                if await monitor.stuck():
                    await self.note(STUCK_NOTE)
        final = Phase.CANCELLED if cancelled else Phase.FAILED
        await self.enter(final, outcome="cancelled" if cancelled else "failed", progress=self.progress)

    async def _source_qemu_exit(self, info: ErrorInfo) -> ErrorInfo:
        """A lost QMP monitor mostly means the source QEMU died (QEMU 7.2 can abort when its multifd
        channels break during setup, docs/hypervisor.md): then that is the error, with QEMU's last
        words, rather than the QMP command it interrupted."""
        if self.monitor is None or not self.monitor.lost.is_set():
            return info
        try:
            status = await self.host.driver.status(self.vm)
        except (NovacronError, OSError):
            return info
        if status.state is not VMState.CRASHED:
            return info
        said = status.last_words
        message = "the source QEMU exited during the migration" + (f": {said}" if said else "")
        return error_info(self.error(MigrationError, message, cause=info.message), self.phase)

    async def _stop_qemu_migration(self) -> bool:
        """Cancel QEMU's migration if it runs; True if the source QEMU had completed (it is paused)."""
        monitor = self.monitor
        if monitor is None or monitor.lost.is_set():
            vm_status = await self.host.driver.status(self.vm)
            return vm_status.qemu_runstate == "postmigrate"
        with contextlib.suppress(NovacronError):
            info = await monitor.query_migrate()
            status = str(info.get("status", ""))
            if status in CANCELLABLE_STATUSES:
                await monitor.execute("migrate_cancel")
                await monitor.wait_status(FINAL_STATUSES, self.host.config.timeouts.rollback_s)
        with contextlib.suppress(NovacronError):
            return await monitor.runstate() == "postmigrate"
        return False

    async def _destination_confirms_gone(self, reason: str, code: str) -> bool:
        control = self.control
        if control is None or control.lost:
            return False
        if not await control.try_send(
            Abort(migration_id=self.id, phase=str(self.phase), code=code, reason=reason[:1000])
        ):
            return False
        deadline = self.loop.time() + self.host.config.query_timeout_s
        while self.loop.time() < deadline:
            try:
                msg = await control.recv(deadline - self.loop.time())
            except (NovacronError, OSError):
                return False
            if isinstance(msg, State):
                return msg.qemu in ("none", "gone") and not msg.resumed
        return False

    async def _resume_source(self) -> None:
        host = self.host
        status = await host.driver.status(self.vm)
        if status.state is VMState.PAUSED and not self._was_paused:
            if self.monitor is not None and not self.monitor.lost.is_set():
                await self.monitor.execute("cont")
            else:
                await host.driver.resume(self.vm)
            await self.note(f"source resumed (was {status.qemu_runstate})")
        elif status.state is VMState.CRASHED:
            await self.note("source QEMU is gone")

    async def _in_doubt(self, why: str) -> None:
        from novacron.migration.recovery import settle_source  # noqa: PLC0415 - recovery imports this module

        if self.phase is not Phase.IN_DOUBT:
            await self.enter(Phase.IN_DOUBT)
            await self.note(f"in doubt: {why}")
        with contextlib.suppress(NovacronError, OSError):
            await self._stack.aclose()
        self.monitor = None
        if self.control is not None:
            await self.control.close()
            self.control = None
        if self.session is not None:
            with contextlib.suppress(NovacronError, OSError):
                await self.session.close()
            self.session = None
        while True:
            record = await self.host.records.get(self.id, "source")
            result = await settle_source(self.host, self.peers, record)
            if result is not None:
                self.record = result
                self.machine.phase = result.phase
                return
            await asyncio.sleep(self.host.config.in_doubt_retry_s)  # a retry period, not synchronisation
