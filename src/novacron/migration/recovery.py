"""Settling migrations nobody is driving any more (docs/migration.md section 6).

Used in two situations: an agent restarts and finds records that are not final, and a live migration
lost its peer at a moment where neither side may decide alone (in-doubt). The rules:

source
  * ownership already moved to the destination (commit was written): finish the commit (quit the
    source QEMU if it still exists, forget the VM here);
  * before switchover (the source QEMU never completed): roll back here (cancel QEMU's migration, the
    VM runs on); the destination rolls back on its own, it never resumed;
  * after the source QEMU completed: ask the destination. It resumed the VM (it runs there): commit.
    It did not, or does not know the migration: make sure its QEMU is gone, then resume the source.
    It cannot be reached: stay in-doubt (the VM is paused here, complete, and not running anywhere).

destination
  * never resumed: kill its QEMU, forget the definition (the source still has the VM);
  * resumed: the VM runs here and the source is paused or gone. Ask the source: it committed (or its
    QEMU is gone): take ownership. Otherwise stay in-doubt; the source's settling sends COMMIT.

Orphans: an incoming QEMU on this host that no unfinished migration record accounts for is killed.

:func:`answer` is the other half: how an agent answers a peer's QUERY, COMMIT or ABORT about a
migration it holds a record of (over a fresh session, outside any live migration).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from novacron.errors import NovacronError
from novacron.hypervisor.driver import StopMode, VMState
from novacron.migration.context import MigrationHost, PeerLink
from novacron.migration.control import ControlChannel
from novacron.migration.errors import MigrationError
from novacron.migration.messages import Abort, Commit, Committed, Message, Query, State
from novacron.migration.phases import Phase
from novacron.migration.qemu import FINAL_STATUSES, STUCK_NOTE, migration_monitor
from novacron.migration.records import ErrorInfo, MigrationRecord
from novacron.observability.log import log_event
from novacron.store.ownership import lock_key

log = logging.getLogger("novacron.migration.recovery")

CANCELLABLE_STATUSES = frozenset({"setup", "active", "device", "pre-switchover", "wait-unplug", "cancelling"})


async def _qemu_state(host: MigrationHost, vm: str, role: str) -> str:
    """What this host's QEMU of ``vm`` is doing, in the words of the State message."""
    driver = host.driver
    if not driver.is_defined(vm):
        return "none"
    status = await driver.status(vm)
    if status.state is VMState.RUNNING:
        return "running"
    if status.state is VMState.INCOMING:
        return "incoming"
    if status.state is VMState.PAUSED:
        if role == "source" and status.qemu_runstate == "postmigrate":
            return "completed-paused"
        if role == "destination" and status.qemu_runstate == "paused":
            return "completed-paused"
        return "paused"
    return "gone"


LivePhase = Callable[[str, str], Phase | None]
"""The phase of this host's live run of (migration id, role) while it still drives the migration
(not ended, not in-doubt), else None. In-doubt runs only wait for the peer: they count as settleable."""


def _no_live_runs(migration_id: str, role: str) -> Phase | None:
    return None


async def answer_query(
    host: MigrationHost, migration_id: str, asker_role: str, live: LivePhase = _no_live_runs
) -> State:
    role = "destination" if asker_role == "source" else "source"
    record = await host.records.find(migration_id, role)
    if record is None:
        return State(migration_id=migration_id, known=False)
    driving = live(migration_id, role)
    if driving is not None:
        # Its run decides (and holds the QEMU monitor): no probe, no verdict to act on.
        return State(migration_id=migration_id, phase=str(driving), resumed=record.resumed, driving=True)
    qemu = await _qemu_state(host, record.vm, role)
    if record.phase is Phase.DONE and role == "source":
        qemu = "gone"  # the VM has moved; a QEMU of the same name here would be another VM
    return State(migration_id=migration_id, phase=str(record.phase), qemu=qemu, resumed=record.resumed)  # type: ignore[arg-type]


async def _drop_stale_lock(host: MigrationHost, record: MigrationRecord) -> None:
    """The migration lock a crashed run of this host left behind (its lease would only end after its
    TTL): the migration is settled, so the lock goes now."""
    if record.role == "destination" and host.shared_store:
        return  # on a shared store the lock is the (live) source's, not ours
    with contextlib.suppress(NovacronError):
        # Source: the lock is the source node's; destination (per-host stores): held for the source.
        current = await host.locks.holder(record.vm)
        if current is not None and current.holder == record.source:
            await host.store.delete(lock_key(record.vm))


async def _finish(host: MigrationHost, record: MigrationRecord, phase: Phase, why: str) -> MigrationRecord:
    outcome = "done" if phase is Phase.DONE else "failed"
    changes: dict[str, object] = {"phase": phase, "outcome": outcome}
    if phase is Phase.FAILED and record.error is None:
        changes["error"] = ErrorInfo(kind="Recovered", message=why, phase=str(record.phase))
    events = [*record.events, f"settled: {why}"]
    updated = await host.records.update(record.id, record.role, events=events, **changes)
    await _drop_stale_lock(host, record)
    log_event(
        log,
        "migration.settled",
        migration=record.id,
        vm=record.vm,
        role=record.role,
        phase=str(phase),
        why=why,
    )
    return updated


async def _source_completed(host: MigrationHost, record: MigrationRecord) -> bool:
    """Whether the source QEMU completed its migration (paused, state sent). A migration still in
    flight (QEMU goes on without its agent on the direct path) is cancelled first and judged after."""
    driver, vm = host.driver, record.vm
    if not driver.is_defined(vm):
        return record.source_completed
    status = await driver.status(vm)
    if not status.alive:
        return record.source_completed
    with contextlib.suppress(NovacronError):
        async with migration_monitor(driver, vm) as monitor:
            info = await monitor.query_migrate()
            if info.get("status") in CANCELLABLE_STATUSES:
                await monitor.execute("migrate_cancel")
                await monitor.wait_status(FINAL_STATUSES, host.config.timeouts.rollback_s)
            return await monitor.runstate() == "postmigrate"
    return record.source_completed or status.qemu_runstate == "postmigrate"


async def _resume_source(host: MigrationHost, record: MigrationRecord) -> str:
    driver, vm = host.driver, record.vm
    if not driver.is_defined(vm):
        return "source QEMU definition is gone"
    status = await driver.status(vm)
    if status.state is VMState.PAUSED and not record.source_was_paused:
        await driver.resume(vm)
        how = f"source resumed from {status.qemu_runstate}"
    elif status.state is VMState.RUNNING:
        how = "source runs"
    else:
        return f"source QEMU is {status.state}"
    with contextlib.suppress(NovacronError):
        async with migration_monitor(driver, vm) as monitor:
            if await monitor.stuck():
                how += f"; {STUCK_NOTE}"
    return how


async def _retire_source(host: MigrationHost, record: MigrationRecord) -> None:
    driver, vm = host.driver, record.vm
    if driver.is_defined(vm):
        with contextlib.suppress(NovacronError):
            if (await driver.status(vm)).alive:
                await driver.stop(vm, mode=StopMode.FORCE)
        with contextlib.suppress(NovacronError):
            await driver.delete(vm)
    if host.shared_store:
        with contextlib.suppress(NovacronError):
            await host.inventory.update(vm, node=record.destination, desired_state="running")
    else:
        with contextlib.suppress(NovacronError):
            await host.inventory.delete(vm)


async def _ask(
    host: MigrationHost, peers: PeerLink, record: MigrationRecord, node: str, first: Message
) -> tuple[ControlChannel, Message] | None:
    """Open a session to ``node`` and send ``first``; the channel and the first answer, or None."""
    try:
        session = await peers.open(node, record.id)
    except (NovacronError, OSError) as exc:
        log_event(
            log,
            "migration.settle_unreachable",
            logging.WARNING,
            migration=record.id,
            peer=node,
            error=str(exc),
        )
        return None
    control = ControlChannel(session.control, vm=record.vm, peer=node, migration_id=record.id)
    control.phase = str(record.phase)
    control.start()
    try:
        await control.send(first)
        reply = await control.recv(host.config.query_timeout_s)
    except (NovacronError, OSError) as exc:
        log_event(
            log, "migration.settle_no_answer", logging.WARNING, migration=record.id, peer=node, error=str(exc)
        )
        await control.close()
        with contextlib.suppress(NovacronError, OSError):
            await session.close()
        return None
    control._session = session  # type: ignore[attr-defined] # closed with the channel by _close
    return control, reply


async def _close(control: ControlChannel) -> None:
    await control.close()
    session = getattr(control, "_session", None)
    if session is not None:
        with contextlib.suppress(NovacronError, OSError):
            await session.close()


async def settle_source(
    host: MigrationHost, peers: PeerLink, record: MigrationRecord
) -> MigrationRecord | None:
    """Settle a source record; the final record, or None while the destination cannot tell."""
    if record.final:
        return record
    owner = await host.ownership.get(record.vm)
    if owner is not None and owner.node == record.destination:
        await _retire_source(host, record)
        asked = await _ask(
            host, peers, record, record.destination, Commit(migration_id=record.id, owner_epoch=owner.epoch)
        )
        if asked is not None:
            await _close(asked[0])
        return await _finish(host, record, Phase.DONE, "ownership had moved; source QEMU retired")
    if not await _source_completed(host, record):
        how = await _resume_source(host, record)
        asked = await _ask(host, peers, record, record.destination,
                           Abort(migration_id=record.id, phase=str(record.phase), code="failed",
                                 reason="source agent settled the migration before switchover"))  # fmt: skip
        if asked is not None:
            await _close(asked[0])
        return await _finish(host, record, Phase.FAILED, f"interrupted in {record.phase}; {how}")
    asked = await _ask(host, peers, record, record.destination, Query(migration_id=record.id, role="source"))
    if asked is None:
        return None
    control, reply = asked
    try:
        if not isinstance(reply, State) or reply.driving:
            return None  # its live run decides (it resumes and verifies, or rolls back): ask again
        if reply.resumed and reply.qemu in ("running", "paused"):
            return await _commit_from_source(host, control, record)
        if not reply.known or reply.qemu in ("none", "gone"):
            how = await _resume_source(host, record)
            return await _finish(host, record, Phase.FAILED, f"destination holds no VM ({reply.qemu}); {how}")
        # The destination holds an incoming (maybe complete) state it never resumed: have it dropped.
        await control.send(Abort(migration_id=record.id, phase=str(record.phase), code="failed",
                                 reason="source settles the migration: roll back"))  # fmt: skip
        answer = await control.recv(host.config.query_timeout_s)
        if not isinstance(answer, State) or answer.driving:
            return None
        if answer.qemu in ("none", "gone") and not answer.resumed:
            how = await _resume_source(host, record)
            return await _finish(host, record, Phase.FAILED, f"destination dropped its incoming QEMU; {how}")
        if answer.resumed and answer.qemu in ("running", "paused"):
            return await _commit_from_source(host, control, record)
        return None
    except (NovacronError, OSError) as exc:
        log_event(log, "migration.settle_failed", logging.WARNING, migration=record.id, error=str(exc))
        return None
    finally:
        await _close(control)


async def _commit_from_source(
    host: MigrationHost, control: ControlChannel, record: MigrationRecord
) -> MigrationRecord:
    if record.phase is not Phase.COMMIT:
        record = await host.records.update(record.id, "source", phase=Phase.COMMIT)
    owner = await host.ownership.get(record.vm)
    if owner is None:
        owner = await host.ownership.claim(record.vm, record.destination)
    elif owner.node != record.destination:
        owner = await host.ownership.transfer(record.vm, owner.node, record.destination)
    await _retire_source(host, record)
    with contextlib.suppress(NovacronError, OSError):
        await control.send(Commit(migration_id=record.id, owner_epoch=owner.epoch))
        await control.recv(host.config.query_timeout_s)
    return await _finish(host, record, Phase.DONE, "destination runs the VM; committed")


async def settle_destination(
    host: MigrationHost, peers: PeerLink, record: MigrationRecord
) -> MigrationRecord | None:
    """Settle a destination record; the final record, or None while it must wait for the source."""
    from novacron.migration.destination import take_ownership  # noqa: PLC0415 - destination imports us

    if record.final:
        return record
    if record.phase is Phase.COMMIT:
        await take_ownership(host, record.vm, record.source, None)
        return await _finish(host, record, Phase.DONE, "commit was recorded; ownership taken")
    if not record.resumed:
        await _drop_incoming(host, record.vm)
        return await _finish(
            host, record, Phase.FAILED, f"interrupted in {record.phase} before resuming; QEMU killed"
        )
    asked = await _ask(host, peers, record, record.source, Query(migration_id=record.id, role="destination"))
    if asked is None:
        return None
    control, reply = asked
    try:
        if not isinstance(reply, State) or reply.driving:
            return None
        if reply.phase == str(Phase.DONE) or (reply.known and reply.qemu in ("none", "gone")):
            await take_ownership(host, record.vm, record.source, None)
            return await _finish(
                host, record, Phase.DONE, f"source is {reply.phase} ({reply.qemu}); ownership taken"
            )
        if reply.qemu == "running":
            # Cannot happen under the protocol (the source resumes only once we confirmed our QEMU is
            # gone); if it does, the source is the recorded owner, so ours must go.
            log_event(log, "migration.two_copies", logging.ERROR, migration=record.id, vm=record.vm)
            await _drop_incoming(host, record.vm)
            return await _finish(
                host, record, Phase.FAILED, "the source runs the VM: killed the destination copy"
            )
        return None
    finally:
        await _close(control)


async def _drop_incoming(host: MigrationHost, vm: str) -> None:
    driver = host.driver
    if not driver.is_defined(vm):
        return
    with contextlib.suppress(NovacronError):
        if (await driver.status(vm)).alive:
            await driver.stop(vm, mode=StopMode.FORCE)
    with contextlib.suppress(NovacronError):
        await driver.delete(vm)


async def answer(
    host: MigrationHost, control: ControlChannel, first: Message, live: LivePhase = _no_live_runs
) -> None:
    """Serve a peer's settling conversation about a migration this host holds a record of.

    While a live run of this host still drives the migration, only it decides: COMMIT and ABORT are
    not acted on here (the answer says ``driving``; the peer asks again once the run ended or went
    in-doubt). Acting beside it once killed a VM the run then resumed, while the source committed."""
    from novacron.migration.destination import take_ownership  # noqa: PLC0415 - destination imports us

    message: Message | None = first
    while message is not None:
        if isinstance(message, Query):
            await control.send(await answer_query(host, message.migration_id, message.role, live))
        elif live(message.migration_id, "destination") is not None:
            await control.send(await answer_query(host, message.migration_id, "source", live))
        elif isinstance(message, Commit):
            record = await host.records.find(message.migration_id, "destination")
            if record is not None and not record.final:
                if record.phase is not Phase.COMMIT:
                    record = await host.records.update(
                        record.id, "destination", phase=Phase.COMMIT, owner_epoch=message.owner_epoch
                    )
                await take_ownership(host, record.vm, record.source, None)
                await _finish(host, record, Phase.DONE, "source committed")
            await control.send(Committed(migration_id=message.migration_id))
        elif isinstance(message, Abort):
            record = await host.records.find(message.migration_id, "destination")
            if record is not None and not record.final and not record.resumed:
                await _drop_incoming(host, record.vm)
                await _finish(host, record, Phase.FAILED, f"source aborted: {message.reason}")
            await control.send(await answer_query(host, message.migration_id, "source", live))
        else:
            raise MigrationError("unexpected message in a settling conversation", type=message.TYPE)
        try:
            message = await control.recv(host.config.query_timeout_s)
        except (NovacronError, OSError):
            message = None


async def orphan_incoming(host: MigrationHost) -> list[str]:
    """Incoming QEMUs on this host that no unfinished migration accounts for; killed. Their names."""
    unfinished = {r.vm for r in await host.records.unfinished() if r.role == "destination"}
    killed = []
    driver = host.driver
    for vm in driver.defined():
        if vm in unfinished:
            continue
        rd = driver.run_dir(vm)
        if not rd.read_state().incoming:
            continue
        record = await host.inventory.find(vm)
        if record is not None and record.node == host.node:
            continue  # a VM that arrived and was committed here
        status = await driver.status(vm)
        if status.alive:
            await _drop_incoming(host, vm)
            killed.append(vm)
            log_event(log, "migration.orphan_killed", vm=vm, state=str(status.state))
    return killed
