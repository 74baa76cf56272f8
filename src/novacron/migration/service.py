"""The migrations of one host: start, list, show, cancel; incoming sessions; recovery at start.

The agent owns one :class:`MigrationService`. Outgoing migrations start here (per-host limit, one
migration per VM); incoming sessions are handed to :meth:`MigrationService.handle_session`, whose
first control message says what the peer wants: PREPARE starts a destination migration (refused with
``busy`` beyond the incoming limit), QUERY/COMMIT/ABORT are a peer settling an earlier migration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any

from novacron.errors import NovacronError
from novacron.migration import recovery
from novacron.migration.context import DataPathFactory, MigrationHost, MigrationRequest, PeerLink, PeerSession
from novacron.migration.control import ControlChannel
from novacron.migration.destination import DestinationMigration
from novacron.migration.errors import ControlProtocolError, MigrationConflict, MigrationNotFound
from novacron.migration.messages import Prepare
from novacron.migration.orchestrator import MigrationRun
from novacron.migration.phases import Phase
from novacron.migration.records import MigrationRecord
from novacron.migration.source import SourceMigration
from novacron.observability.log import log_event

log = logging.getLogger("novacron.migration.service")

FIRST_MESSAGE_TIMEOUT_S = 10.0
MAX_FINISHED_RUNS = 64  # finished runs kept in memory (their records stay in the store)
SHUTDOWN_WAIT_S = 30.0


def new_migration_id() -> str:
    """Sortable by start time, unique: ``m<unix seconds hex><6 random hex>``."""
    return f"m{int(time.time()):x}{secrets.token_hex(3)}"


# A finished migration's closing (baseline recording) before the VM's next one; below the API client's
# 30 s timeout, so a request that waited still gets its answer.
SETTLE_TIMEOUT_S = 20.0


class MigrationService:
    def __init__(self, host: MigrationHost, peers: PeerLink, factory: DataPathFactory) -> None:
        self.host = host
        self.peers = peers
        self.factory = factory
        self._runs: dict[str, MigrationRun] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._settled = asyncio.Condition()
        self._final: set[str] = set()  # migrations settled by recovery in this process

    # ----- counts -----

    def _active(self, role: str) -> list[MigrationRun]:
        return [r for r in self._runs.values() if r.role == role and not r.done.is_set()]

    def active_vms(self) -> set[str]:
        return {r.vm for r in self._runs.values() if not r.done.is_set()}

    async def _free_to_migrate(self, vm: str) -> bool:
        """Whether ``vm`` is free to migrate again. A migration still under way keeps it busy; one that
        reached its final phase is only closing (the baseline recording of the copy that crossed,
        seconds for a large guest): the next migration waits for that, so it reads the whole copy,
        instead of being refused although the first one already reports done."""
        runs = [r for r in self._runs.values() if r.vm == vm and not r.done.is_set()]
        if any(not r.machine.final for r in runs):
            return False
        for r in runs:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(r.done.wait(), SETTLE_TIMEOUT_S)
        return vm not in self.active_vms()

    # ----- outgoing -----

    async def migrate(self, request: MigrationRequest) -> SourceMigration:
        if self._closing:
            raise MigrationConflict("the agent is shutting down", vm=request.vm)
        if request.destination == self.host.node:
            raise MigrationConflict("the VM is already on this host", vm=request.vm, node=self.host.node)
        self.peers.address(request.destination)  # UnknownPeer early, before any record
        if not await self._free_to_migrate(request.vm):
            raise MigrationConflict(f"VM {request.vm!r} is already migrating", vm=request.vm)
        limit = self.host.config.max_outgoing
        if len(self._active("source")) >= limit:
            raise MigrationConflict(
                "this host is at its limit of outgoing migrations", limit=limit, vm=request.vm
            )
        await self.host.inventory.get(request.vm)  # VMNotFound before a record is written
        run = SourceMigration(self.host, new_migration_id(), request, self.peers, self.factory)
        await run.create_record()
        self._track(run)
        log_event(log, "migration.started", migration=run.id, vm=request.vm, destination=request.destination)
        return run

    def _track(self, run: MigrationRun) -> None:
        self._runs[run.id] = run
        task = run.start()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        finished = [r for r in self._runs.values() if r.done.is_set()]
        for old in finished[: max(0, len(finished) - MAX_FINISHED_RUNS)]:
            self._runs.pop(old.id, None)

    # ----- queries -----

    def live(self, migration_id: str) -> MigrationRun | None:
        return self._runs.get(migration_id)

    def driving_phase(self, migration_id: str, role: str) -> Phase | None:
        """The phase of this host's run of the migration while it still decides its outcome (not
        ended, not in-doubt); None otherwise (see :data:`recovery.LivePhase`)."""
        run = self._runs.get(migration_id)
        if run is None or run.role != role or run.done.is_set() or run.phase is Phase.IN_DOUBT:
            return None
        return run.phase

    async def show(self, migration_id: str) -> dict[str, Any]:
        run = self._runs.get(migration_id)
        if run is not None and not run.done.is_set():
            return run.snapshot()
        records = await self.host.records.any_role(migration_id)
        if not records:
            raise MigrationNotFound(f"no migration {migration_id!r} on this host", migration=migration_id)
        data = records[0].model_dump(mode="json")
        data["live"] = False
        return data

    async def list(self) -> list[dict[str, Any]]:
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for rec in await self.host.records.list():
            data = rec.model_dump(mode="json")
            data["live"] = False
            out[(rec.id, rec.role)] = data
        for run in self._runs.values():
            if not run.done.is_set():
                out[(run.id, run.role)] = run.snapshot()
        return sorted(out.values(), key=lambda d: d.get("created_at", 0.0), reverse=True)

    async def cancel(self, migration_id: str, reason: str = "cancelled by the operator") -> dict[str, Any]:
        run = self._runs.get(migration_id)
        if run is None or run.done.is_set():
            if not await self.host.records.any_role(migration_id):
                raise MigrationNotFound(f"no migration {migration_id!r} on this host", migration=migration_id)
            raise MigrationConflict(f"migration {migration_id} is not running here", migration=migration_id)
        run.cancel(reason)
        return run.snapshot()

    async def wait(self, migration_id: str) -> MigrationRecord:
        run = self._runs.get(migration_id)
        if run is None:
            return (await self.host.records.any_role(migration_id))[0]
        return await run.wait()

    async def wait_settled(self, migration_id: str, role: str, timeout_s: float) -> MigrationRecord:
        """Wait until this host's record of a migration is final (a live run or a recovery settles it)."""
        async with self._settled, asyncio.timeout(timeout_s):
            await self._settled.wait_for(lambda: migration_id in self._final)
        return await self.host.records.get(migration_id, role)

    async def _notify_final(self, migration_id: str) -> None:
        async with self._settled:
            self._final.add(migration_id)
            self._settled.notify_all()

    # ----- incoming -----

    async def handle_session(self, session: PeerSession, peer_node: str) -> None:
        """Serve one session a peer opened: a new incoming migration, or a settling conversation."""
        raw = await session.control.recv_message()
        if raw is None:
            await session.close()
            return
        from novacron.migration.messages import decode  # noqa: PLC0415 - keep the import graph flat

        try:
            first = decode(raw)
        except ControlProtocolError as exc:
            log_event(log, "migration.bad_first_message", logging.WARNING, peer=peer_node, error=str(exc))
            await session.close()
            return
        control = ControlChannel(
            session.control, vm=getattr(first, "vm", "?"), peer=peer_node, migration_id=first.migration_id
        )
        if isinstance(first, Prepare):
            if first.source_node != peer_node:
                log_event(
                    log,
                    "migration.identity_mismatch",
                    logging.WARNING,
                    peer=peer_node,
                    claimed=first.source_node,
                )
                await control.close()
                await session.close()
                return
            busy = None
            if self._closing:
                busy = "the agent is shutting down"
            elif len(self._active("destination")) >= self.host.config.max_incoming:
                busy = (
                    f"{self.host.node} is at its limit of {self.host.config.max_incoming} incoming migrations"
                )
            elif not await self._free_to_migrate(first.vm):
                busy = f"VM {first.vm} is already migrating on {self.host.node}"
            run = DestinationMigration(
                self.host, first, control, session, self.factory, peers=self.peers, busy=busy
            )
            await run.create_record()
            control.start()
            self._track(run)
            return
        control.start()
        try:
            await recovery.answer(self.host, control, first, self.driving_phase)
        except (NovacronError, OSError) as exc:
            log_event(log, "migration.settle_answer_failed", logging.WARNING, peer=peer_node, error=str(exc))
        finally:
            await control.close()
            with contextlib.suppress(NovacronError, OSError):
                await session.close()

    # ----- start and stop -----

    async def recover(self) -> None:
        """Settle every unfinished record of this host (restart) and kill orphan incoming QEMUs."""
        for record in await self.host.records.unfinished():
            task = asyncio.create_task(self._settle(record), name=f"settle-{record.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        killed = await recovery.orphan_incoming(self.host)
        if killed:
            log_event(log, "migration.orphans_killed", vms=",".join(killed))

    async def _settle(self, record: MigrationRecord) -> None:
        settle = recovery.settle_source if record.role == "source" else recovery.settle_destination
        while not self._closing:
            try:
                result = await settle(self.host, self.peers, record)
            except (NovacronError, OSError) as exc:
                log_event(log, "migration.settle_error", logging.WARNING, migration=record.id, error=str(exc))
                result = None
            if result is not None:
                await self._notify_final(record.id)
                return
            record = await self.host.records.get(record.id, record.role)
            if record.final:
                await self._notify_final(record.id)
                return
            await asyncio.sleep(self.host.config.in_doubt_retry_s)  # a retry period, not synchronisation

    async def close(self) -> None:
        """Graceful stop: cancel what can still go back, wait (bounded) for the rest."""
        self._closing = True
        for run in list(self._runs.values()):
            if not run.done.is_set() and run.machine.cancellable:
                with contextlib.suppress(NovacronError):
                    run.cancel("the agent is shutting down")
        pending = [r.done.wait() for r in self._runs.values() if not r.done.is_set()]
        if pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*pending), SHUTDOWN_WAIT_S)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, NovacronError):
                await task
