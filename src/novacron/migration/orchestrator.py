"""What both orchestrator roles share: the phase machine, records written before side effects,
phase timeouts, operator cancel, and progress snapshots.

The roles themselves live in ``source.py`` (drives the migration) and ``destination.py`` (obeys,
checks, can refuse or abort). Each is one asyncio task running its forward path; a cancel request or
an error ends the forward path and runs the role's rollback. The legal moves are those of
``phases.TRANSITIONS``: an illegal one is a bug and raises :class:`IllegalPhaseTransition`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from novacron.errors import NovacronError
from novacron.migration.context import MigrationHost
from novacron.migration.errors import MigrationCancelled, MigrationConflict, MigrationError, MigrationTimeout
from novacron.migration.phases import Phase, PhaseMachine
from novacron.migration.records import ErrorInfo, MigrationRecord, Progress, Role
from novacron.observability.log import log_event

log = logging.getLogger("novacron.migration")

MAX_CONTEXT_VALUE = 200
# A guest's console tail says why it died after resume: an oops runs to 30-40 lines and its end (the
# faulting code, the panic) matters most, so this one value keeps more, from its end.
MAX_CONSOLE_CONTEXT = 4000
STOP_RETRY_S = 1.0


def _context_value(key: str, value: object) -> str:
    text = str(value)
    return text[-MAX_CONSOLE_CONTEXT:] if key == "console" else text[:MAX_CONTEXT_VALUE]


def error_info(exc: BaseException, phase: Phase) -> ErrorInfo:
    if isinstance(exc, NovacronError):
        ctx = {k: _context_value(k, v) for k, v in exc.context.items()}
        return ErrorInfo(kind=type(exc).__name__, message=exc.message, phase=str(phase), context=ctx)
    return ErrorInfo(kind=type(exc).__name__, message=str(exc)[:MAX_CONTEXT_VALUE], phase=str(phase))


class MigrationRun:
    """One side of one migration. Subclasses implement ``_forward`` and ``_rollback``."""

    role: Role

    def __init__(self, host: MigrationHost, migration_id: str, vm: str, peer: str) -> None:
        self.host = host
        self.id = migration_id
        self.vm = vm
        self.peer = peer
        self.loop = asyncio.get_running_loop()
        self.machine = PhaseMachine(started_at=self.loop.time(), timeouts=host.config.timeouts)
        self.record: MigrationRecord | None = None
        self.progress = Progress()
        self.events: list[str] = []
        self.done = asyncio.Event()
        self._cancel: asyncio.Event = asyncio.Event()
        self._cancel_reason = ""
        self._task: asyncio.Task[None] | None = None
        self._last_progress_write = 0.0
        self._phase_changed = asyncio.Condition()

    # ----- identity and errors -----

    @property
    def phase(self) -> Phase:
        return self.machine.phase

    def ctx(self, **extra: Any) -> dict[str, Any]:
        return {"vm": self.vm, "peer": self.peer, "phase": str(self.phase), "migration": self.id, **extra}

    def error(self, cls: type[NovacronError], message: str, **extra: Any) -> NovacronError:
        return cls(message, **self.ctx(**extra))

    # ----- records -----

    async def enter(self, phase: Phase, **changes: Any) -> None:
        """Move to ``phase``: legal move checked, record written (before the phase's side effects)."""
        self.machine.advance(phase, self.loop.time())
        self.record = await self.host.records.update(self.id, self.role, phase=phase, **changes)
        async with self._phase_changed:
            self._phase_changed.notify_all()
        log_event(
            log,
            "migration.phase",
            role=self.role,
            **self.ctx(),
            **{k: v for k, v in changes.items() if k not in ("progress", "role", "vm", "peer", "phase")},
        )

    async def note(self, event: str) -> None:
        self.events.append(event)
        with contextlib.suppress(NovacronError):
            self.record = await self.host.records.add_event(self.id, self.role, event)
        log_event(log, "migration.note", role=self.role, what=event, **self.ctx())

    async def save_progress(self, *, force: bool = False) -> None:
        now = self.loop.time()
        if not force and now - self._last_progress_write < self.host.config.record_progress_every_s:
            return
        self._last_progress_write = now
        with contextlib.suppress(NovacronError):
            self.record = await self.host.records.update(self.id, self.role, progress=self.progress)

    # ----- time -----

    @contextlib.asynccontextmanager
    async def phase_deadline(self) -> AsyncIterator[None]:
        """Bound the block by the current phase's timeout (the deadline for precopy/converge)."""
        phase = self.phase
        expires = self.machine.expires_at()
        try:
            async with asyncio.timeout_at(expires if expires != float("inf") else None):
                yield
        except TimeoutError:
            limit = self.machine.timeouts.of(phase)
            raise MigrationTimeout(
                f"phase {phase} did not finish in time", **self.ctx(timeout_s=round(limit, 3))
            ) from None

    async def wait_phase(self, phases: set[Phase] | frozenset[Phase], timeout_s: float) -> Phase:
        """Wait until the run is in one of ``phases`` (or has ended); the phase it is in."""
        async with self._phase_changed, asyncio.timeout(timeout_s):
            await self._phase_changed.wait_for(lambda: self.phase in phases or self.done.is_set())
        return self.phase

    async def mark_done(self) -> None:
        self.done.set()
        async with self._phase_changed:
            self._phase_changed.notify_all()

    def remaining(self) -> float:
        return self.machine.remaining(self.loop.time())

    # ----- cancel -----

    def cancel(self, reason: str = "cancelled by the operator") -> None:
        if not self.machine.cancellable:
            raise MigrationConflict(
                f"migration {self.id} cannot be cancelled in phase {self.phase}", **self.ctx()
            )
        self._cancel_reason = reason
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    async def guarded(self, body: Coroutine[Any, Any, None]) -> None:
        """Run the forward path; a cancel request (honoured only while cancellable) interrupts it."""
        task = asyncio.ensure_future(body)
        cancel_wait = asyncio.ensure_future(self._cancel.wait())
        try:
            while True:
                done, _ = await asyncio.wait({task, cancel_wait}, return_when=asyncio.FIRST_COMPLETED)
                if task in done:
                    task.result()
                    return
                if self.machine.cancellable:
                    await _stop(task)
                    raise MigrationCancelled(self._cancel_reason or "cancelled", **self.ctx())
                # Past the point of no return: the cancel request is dropped.
                self._cancel.clear()
                cancel_wait = asyncio.ensure_future(self._cancel.wait())
        finally:
            cancel_wait.cancel()
            await _stop(task)

    # ----- lifecycle -----

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._run(), name=f"migration-{self.role}-{self.id}")
        return self._task

    async def _run(self) -> None:
        raise NotImplementedError

    async def wait(self) -> MigrationRecord:
        await self.done.wait()
        if self.record is None:
            raise MigrationError("the migration ended without a record", **self.ctx())
        return self.record

    def snapshot(self) -> dict[str, Any]:
        """Live view for the API: the record with current phase and progress."""
        rec = self.record
        data: dict[str, Any] = (
            rec.model_dump(mode="json") if rec is not None else {"id": self.id, "vm": self.vm}
        )
        data["phase"] = str(self.phase)
        data["progress"] = self.progress.model_dump(mode="json")
        data["live"] = not self.done.is_set()
        return data


async def _stop(task: asyncio.Future[None]) -> None:
    """Cancel ``task`` and wait for it to end. Cancel again while it runs on: Python 3.11's
    ``asyncio.wait_for`` can lose a cancellation that races with its inner future's completion."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_RETRY_S)
    if not task.cancelled():
        with contextlib.suppress(NovacronError, OSError):
            task.result()


def wall() -> float:
    return time.time()
