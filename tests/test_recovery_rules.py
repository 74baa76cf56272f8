"""Settling beside a live run: while a run on the answering host still drives a migration, a peer's
settling conversation gets ``driving`` and nothing is decided (no QEMU here: the records and the rules).

The bug these pin: the source went in-doubt right after COMPLETED, asked the destination while its
run was still in switchover, sent ABORT, and the answer path killed the incoming QEMU that the run
then resumed; the source read ``resumed`` and committed. The VM ran nowhere."""

from __future__ import annotations

import pytest

from novacron.migration.messages import Query, State
from novacron.migration.phases import Phase
from novacron.migration.records import MigrationRecord
from novacron.migration.recovery import LivePhase, _ask, _close, answer_query, settle_source
from test_migration_support import SimHost

MID = "m1test"


async def _records(
    a: SimHost, b: SimHost, dest_phase: Phase, *, resumed: bool, completed: bool
) -> MigrationRecord:
    src = await a.host.records.create(
        MigrationRecord(id=MID, vm="g1", role="source", source="hosta", destination="hostb")
    )
    src = await a.host.records.update(MID, "source", phase=Phase.IN_DOUBT, source_completed=completed)
    await b.host.records.create(
        MigrationRecord(id=MID, vm="g1", role="destination", source="hosta", destination="hostb")
    )
    await b.host.records.update(MID, "destination", phase=dest_phase, resumed=resumed)
    return src


def _drives(phase: Phase, role: str = "destination") -> LivePhase:
    def live(migration_id: str, asked_role: str) -> Phase | None:
        return phase if migration_id == MID and asked_role == role else None

    return live


async def test_a_driving_run_is_reported_and_not_probed(hosts: tuple[SimHost, SimHost]) -> None:
    a, b = hosts
    await _records(a, b, Phase.VERIFY, resumed=True, completed=True)
    state = await answer_query(b.host, MID, "source", _drives(Phase.VERIFY))
    assert state == State(migration_id=MID, phase="verify", resumed=True, driving=True, qemu="none")
    settled = await answer_query(b.host, MID, "source")
    assert not settled.driving and settled.qemu == "none" and settled.resumed


async def test_source_waits_while_the_destination_run_verifies(
    hosts: tuple[SimHost, SimHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = hosts
    record = await _records(a, b, Phase.VERIFY, resumed=True, completed=True)
    monkeypatch.setattr(b.service, "driving_phase", _drives(Phase.VERIFY))
    assert await settle_source(a.host, a.link, record) is None
    assert (await a.host.records.get(MID, "source")).phase is Phase.IN_DOUBT
    assert (await a.host.ownership.get("g1")) is None  # no commit behind the run's back
    # The run ended (here: its QEMU is gone): now the same question settles it.
    monkeypatch.setattr(b.service, "driving_phase", _drives(Phase.VERIFY, role="source"))
    final = await settle_source(a.host, a.link, record)
    assert final is not None and final.phase is Phase.FAILED
    assert any("destination holds no VM" in e for e in final.events), final.events


async def test_abort_beside_a_run_in_switchover_is_not_acted_on(
    hosts: tuple[SimHost, SimHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = hosts
    # A source that did not complete aborts the destination (settle rule 2): beside a live run that
    # ABORT must leave the destination alone; without one, the never-resumed record is rolled back.
    record = await _records(a, b, Phase.SWITCHOVER, resumed=False, completed=False)
    monkeypatch.setattr(b.service, "driving_phase", _drives(Phase.SWITCHOVER))
    final = await settle_source(a.host, a.link, record)
    assert final is not None and final.phase is Phase.FAILED  # the source's own verdict stands
    dest = await b.host.records.get(MID, "destination")
    assert dest.phase is Phase.SWITCHOVER and not dest.final

    monkeypatch.setattr(b.service, "driving_phase", _drives(Phase.SWITCHOVER, role="source"))
    await a.host.records.update(MID, "source", phase=Phase.IN_DOUBT)
    await settle_source(a.host, a.link, await a.host.records.get(MID, "source"))
    dest = await b.host.records.get(MID, "destination")
    assert dest.phase is Phase.FAILED and any("source aborted" in e for e in dest.events), dest.events


async def test_query_message_reports_driving_over_a_session(
    hosts: tuple[SimHost, SimHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = hosts
    await _records(a, b, Phase.SWITCHOVER, resumed=False, completed=True)
    monkeypatch.setattr(b.service, "driving_phase", _drives(Phase.SWITCHOVER))
    asked = await _ask(a.host, a.link, await a.host.records.get(MID, "source"), "hostb",
                       Query(migration_id=MID, role="source"))  # fmt: skip
    assert asked is not None
    control, reply = asked
    await _close(control)
    assert isinstance(reply, State) and reply.driving and reply.phase == "switchover"
