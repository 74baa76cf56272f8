"""Pure logic of the migration control plane: the phase table, control messages, convergence steering,
records in a real SQLite store, and the control channel over an in-process pair (virtual time, no QEMU)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import pytest

from novacron.migration.control import ControlChannel
from novacron.migration.converge import (
    MIN_DOWNTIME_LIMIT_MS,
    UNCAPPED_BANDWIDTH,
    Abort,
    Action,
    ConvergenceSteering,
    Sample,
    SetParameters,
    StartPostcopy,
    SteeringConfig,
    SteeringPolicy,
)
from novacron.migration.errors import (
    ControlProtocolError,
    IllegalPhaseTransition,
    MigrationInputError,
    MigrationTimeout,
    PeerLost,
)
from novacron.migration.messages import (
    MESSAGE_TYPES,
    ArtefactRef,
    Commit,
    PhaseNotice,
    Prepare,
    Ready,
    decode,
    encode,
)
from novacron.migration.phases import (
    CANCELLABLE_PHASES,
    FINAL_PHASES,
    TRANSITIONS,
    Phase,
    PhaseMachine,
    PhaseTimeouts,
)
from novacron.migration.records import MigrationRecord, MigrationRecords, Progress
from novacron.store.sqlite import SqliteStore
from test_migration_support import channel_pair

# ----------------------------------------------------------------- phases


def test_happy_path_is_legal_and_recorded() -> None:
    m = PhaseMachine(started_at=100.0)
    for i, p in enumerate(
        [
            Phase.CONNECT,
            Phase.PRECOPY,
            Phase.CONVERGE,
            Phase.SWITCHOVER,
            Phase.VERIFY,
            Phase.COMMIT,
            Phase.DONE,
        ]
    ):
        m.advance(p, 100.0 + i)
    assert m.final and [c.new for c in m.history][-1] is Phase.DONE
    assert [c.at for c in m.history] == [100.0 + i for i in range(7)]


@pytest.mark.parametrize("phase", list(Phase))
def test_every_phase_move_outside_the_table_is_refused(phase: Phase) -> None:
    for target in Phase:
        m = PhaseMachine(started_at=0.0)
        m.phase = phase
        if target in TRANSITIONS[phase]:
            m.advance(target, 1.0)
            assert m.phase is target
        else:
            with pytest.raises(IllegalPhaseTransition) as exc:
                m.advance(target, 1.0)
            assert m.phase is phase and exc.value.context["to"] == str(target)


def test_no_rollback_after_commit_or_from_postcopy() -> None:
    assert Phase.ROLLBACK not in TRANSITIONS[Phase.COMMIT]
    assert Phase.ROLLBACK not in TRANSITIONS[Phase.POSTCOPY]
    assert Phase.COMMIT not in CANCELLABLE_PHASES and Phase.POSTCOPY not in CANCELLABLE_PHASES
    assert all(not TRANSITIONS[p] for p in FINAL_PHASES)


def test_phase_timeouts_and_the_deadline_are_virtual_time() -> None:
    t = PhaseTimeouts(prepare_s=10, precopy_s=1000, deadline_s=60)
    m = PhaseMachine(started_at=0.0, timeouts=t)
    assert m.expires_at() == 10 and not m.timed_out(9.9) and m.timed_out(10.0)
    m.advance(Phase.CONNECT, 5.0)
    m.advance(Phase.PRECOPY, 8.0)
    assert m.expires_at() == 60.0  # precopy is capped by the migration deadline
    m.advance(Phase.CONVERGE, 30.0)
    assert m.expires_at() == 60.0 and m.remaining(50.0) == 10.0
    m.advance(Phase.SWITCHOVER, 55.0)
    assert m.expires_at() == 55.0 + t.switchover_s


def test_bad_timeouts_name_the_field() -> None:
    with pytest.raises(MigrationInputError) as exc:
        PhaseTimeouts(verify_s=0)
    assert exc.value.context["field"] == "verify_s"


# ----------------------------------------------------------------- messages


def _prepare(**over: object) -> Prepare:
    data: dict[str, object] = {
        "migration_id": "m1",
        "vm": "g1",
        "source_node": "hosta",
        "spec": {"name": "g1", "memory_mib": 192},
        "qemu_version": "7.2.0",
        "machine": "pc-i440fx-7.2",
        "accel": "tcg",
        "memory_mib": 192,
        "vcpus": 1,
        "artefacts": [ArtefactRef(role="kernel", path="/k", size=3, digest="a" * 64)],
        "mode": "internet",
        "data_path": "direct",
        "capabilities": {"multifd": True},
        "parameters": {"multifd-channels": 4},
        "max_downtime_ms": 300,
        "deadline_s": 600.0,
    }
    data.update(over)
    return Prepare.model_validate(data)


def test_messages_round_trip() -> None:
    for msg in (
        _prepare(),
        Ready(migration_id="m1", incoming_uri="tcp:1.2.3.4:5", summary=b"\x00\xff"),
        Commit(migration_id="m1", owner_epoch=3),
    ):
        assert decode(encode(msg)) == msg


def test_unknown_fields_are_ignored_unknown_types_and_versions_refused() -> None:
    body = msgpack.packb({"type": "commit", "v": 1, "migration_id": "m1", "owner_epoch": 2, "future": [1, 2]})
    assert decode(body) == Commit(migration_id="m1", owner_epoch=2)
    with pytest.raises(ControlProtocolError, match="unknown control message type"):
        decode(msgpack.packb({"type": "teleport", "v": 1, "migration_id": "m1"}))
    with pytest.raises(ControlProtocolError, match="unsupported control message version") as exc:
        decode(msgpack.packb({"type": "commit", "v": 2, "migration_id": "m1"}))
    assert exc.value.context["supported"] == 1
    with pytest.raises(ControlProtocolError, match="not valid msgpack"):
        decode(b"\xc1\xc1")
    with pytest.raises(ControlProtocolError, match="not a map"):
        decode(msgpack.packb([1, 2]))


def test_invalid_fields_name_the_field() -> None:
    raw = encode(_prepare())
    body = msgpack.unpackb(raw)
    body["memory_mib"] = -5
    with pytest.raises(ControlProtocolError) as exc:
        decode(msgpack.packb(body))
    assert exc.value.context["field"] == "memory_mib"
    body = msgpack.unpackb(raw)
    body["migration_id"] = "../etc"
    with pytest.raises(ControlProtocolError) as exc:
        decode(msgpack.packb(body))
    assert exc.value.context["field"] == "migration_id"


def test_every_message_type_has_a_distinct_name_and_version() -> None:
    assert len(MESSAGE_TYPES) == 14 and all(cls.VERSION == 1 for cls in MESSAGE_TYPES.values())


# ----------------------------------------------------------------- steering


def _sample(
    iteration: int, remaining: int, dirty_rate: float, mbps: float = 100.0, status: str = "active"
) -> Sample:
    return Sample(
        status=status,
        iteration=iteration,
        remaining=remaining,
        transferred=0,
        dirty_pages_rate=dirty_rate,
        mbps=mbps,
    )


def test_initial_parameters_keep_auto_converge_idle_and_leave_room_for_the_switchover() -> None:
    s = ConvergenceSteering(SteeringPolicy(max_downtime_ms=300, deadline_at=1000.0, one_way_delay_s=0.025))
    params = s.initial_parameters()
    assert params["throttle-trigger-threshold"] == 100
    assert params["downtime-limit"] == MIN_DOWNTIME_LIMIT_MS  # the first pass: see the next test
    assert params["max-bandwidth"] == UNCAPPED_BANDWIDTH  # bandwidth unknown: never capped below the link
    capped = ConvergenceSteering(SteeringPolicy(max_downtime_ms=300, deadline_at=1000.0)).initial_parameters(
        1e9
    )
    assert capped["max-bandwidth"] == int(1e9 / 8 * 0.9)
    tunnel = SteeringPolicy(max_downtime_ms=300, deadline_at=1000.0, cap_bandwidth=False)
    assert ConvergenceSteering(tunnel).initial_parameters(1e9)["max-bandwidth"] == UNCAPPED_BANDWIDTH


def escalations(actions: list[Action]) -> list[Action]:
    """What steering did beyond its routine downtime-limit and drain-cap settings."""
    return [a for a in actions if not (isinstance(a, SetParameters) and a.routine)]


def test_no_switchover_at_the_end_of_the_first_pass() -> None:
    s = ConvergenceSteering(SteeringPolicy(max_downtime_ms=300, deadline_at=1000.0, one_way_delay_s=0.025))
    assert s.initial_parameters()["downtime-limit"] == MIN_DOWNTIME_LIMIT_MS
    # The first pass, nearly done: QEMU must not switch over with the socket buffers full.
    assert s.observe(_sample(1, 4 << 20, dirty_rate=2000), 1.0) == []
    assert s.observe(_sample(1, 1 << 20, dirty_rate=2000), 2.0) == []
    # The second pass: the operator's budget, less what the switchover costs us.
    out = s.observe(_sample(2, 8 << 20, dirty_rate=2000), 2.1)
    limits = [a.parameters for a in out if isinstance(a, SetParameters) and a.routine]
    assert limits == [{"downtime-limit": int((300 - 25 - 15) * 0.5)}]
    assert s.observe(_sample(3, 4 << 20, dirty_rate=2000), 2.2) == []  # set once


def test_converging_migration_is_left_alone() -> None:
    s = ConvergenceSteering(SteeringPolicy(max_downtime_ms=300, deadline_at=1000.0, cap_bandwidth=False))
    remaining = 400 << 20
    for i in range(1, 8):
        assert escalations(s.observe(_sample(i, remaining, dirty_rate=100), float(i))) == []
        remaining //= 3
    assert s.level == 0


def test_non_converging_escalates_to_auto_converge_then_postcopy_only_when_allowed() -> None:
    # 3,000 pages/s dirtied = 98 Mbit/s against a 100 Mbit/s link: it never converges.
    for allow, capable in ((True, True), (False, False), (True, False)):
        s = ConvergenceSteering(
            SteeringPolicy(
                max_downtime_ms=300,
                deadline_at=1000.0,
                cap_bandwidth=False,
                allow_postcopy=allow,
                postcopy_capable=capable,
            ),
            SteeringConfig(escalate_after_passes=3, postcopy_after_passes=2),
        )
        actions = []
        for i in range(1, 12):
            actions += [
                (i, a) for a in escalations(s.observe(_sample(i, 300 << 20, dirty_rate=3000), float(i)))
            ]
        kinds = [(i, type(a).__name__) for i, a in actions]
        assert kinds[0] == (3, "SetParameters")
        first = actions[0][1]
        assert isinstance(first, SetParameters) and first.parameters["throttle-trigger-threshold"] == 30
        if allow and capable:
            assert kinds[1:] == [(5, "StartPostcopy")]
            assert isinstance(actions[1][1], StartPostcopy) and "post-copy" in actions[1][1].why
        else:
            assert kinds[1:] == []


def test_stalled_remaining_counts_as_not_converging() -> None:
    s = ConvergenceSteering(
        SteeringPolicy(max_downtime_ms=300, deadline_at=1000.0, cap_bandwidth=False),
        SteeringConfig(escalate_after_passes=4),
    )
    out = []
    for i in range(1, 7):
        out += escalations(s.observe(_sample(i, 200 << 20, dirty_rate=10, mbps=1000), float(i)))
    assert len(out) == 1 and isinstance(out[0], SetParameters) and "did not shrink" in out[0].why


def test_deadline_aborts_with_a_reason_that_says_why() -> None:
    s = ConvergenceSteering(SteeringPolicy(max_downtime_ms=300, deadline_at=10.0))
    assert escalations(s.observe(_sample(2, 100 << 20, dirty_rate=3000), 9.0)) == []
    out = s.observe(_sample(3, 100 << 20, dirty_rate=3000, mbps=80), 10.0)
    assert len(out) == 1 and isinstance(out[0], Abort)
    assert "100 MiB left after 3 passes" in out[0].reason and "post-copy not allowed" in out[0].reason
    assert s.observe(_sample(4, 1, 0), 11.0) == []  # once aborted, silent


def test_the_link_is_measured_early_and_qemu_capped_below_it() -> None:
    s = ConvergenceSteering(SteeringPolicy(max_downtime_ms=300, deadline_at=100.0))
    assert s.initial_parameters()["max-bandwidth"] == UNCAPPED_BANDWIDTH
    out = []
    for i, mbps in enumerate([5, 150]):  # TCP ramping up: too early to count
        out += s.observe(_sample(1, 100 << 20, 10, mbps=mbps), 0.2 * i)
    assert out == []
    for i, mbps in enumerate([200, 30, 195, 190, 180]):  # the link rate, and a zero-page stretch
        out += s.observe(_sample(1, 100 << 20, 10, mbps=mbps), 1.0 + 0.1 * i)
    caps = [a for a in out if isinstance(a, SetParameters) and "max-bandwidth" in a.parameters]
    assert len(caps) == 1 and caps[0].parameters["max-bandwidth"] == int(200e6 / 8 * 0.9)
    assert "link measured at 200 Mbit/s" in caps[0].why and not caps[0].routine
    tunnel = ConvergenceSteering(SteeringPolicy(max_downtime_ms=300, deadline_at=100.0, cap_bandwidth=False))
    for i, mbps in enumerate([5, 150, 200, 30, 195]):
        assert tunnel.observe(_sample(1, 100 << 20, 10, mbps=mbps), 0.2 * i) == []  # never capped


def test_datacenter_paths_are_not_capped_at_a_measured_rate_but_at_a_configured_one() -> None:
    policy = SteeringPolicy(max_downtime_ms=300, deadline_at=100.0, cap_from_measurement=False)
    measured = ConvergenceSteering(policy)
    out = []
    for i, mbps in enumerate([5, 150, 200, 30, 195, 190, 180]):
        out += measured.observe(_sample(1, 100 << 20, 10, mbps=mbps), 0.3 * i)
    assert not [a for a in out if isinstance(a, SetParameters) and "max-bandwidth" in a.parameters]
    configured = ConvergenceSteering(policy)
    assert configured.initial_parameters(160e6)["max-bandwidth"] == int(160e6 / 8 * 0.9)


def test_link_measurement_recaps_only_on_real_change() -> None:
    s = ConvergenceSteering(SteeringPolicy(max_downtime_ms=300, deadline_at=10.0))
    s.initial_parameters(100e6)
    assert s.link_measured(105e6) == []
    out = s.link_measured(200e6)
    assert isinstance(out[0], SetParameters) and out[0].parameters["max-bandwidth"] == int(200e6 / 8 * 0.9)


# ----------------------------------------------------------------- records


async def test_records_cas_history_and_unfinished(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db")
    try:
        recs = MigrationRecords(store)
        await recs.create(MigrationRecord(id="m1", vm="g1", role="source", source="a", destination="b"))
        await recs.create(MigrationRecord(id="m1", vm="g1", role="destination", source="a", destination="b"))
        await recs.update("m1", "source", phase=Phase.CONNECT)
        await recs.update("m1", "source", progress=Progress(bytes_raw=10, bytes_wire=5))
        done = await recs.update("m1", "source", phase=Phase.ROLLBACK)
        done = await recs.update("m1", "source", phase=Phase.FAILED, outcome="failed")
        assert [h.phase for h in done.history] == [Phase.PREPARE, Phase.CONNECT, Phase.ROLLBACK, Phase.FAILED]
        assert done.final and done.finished_at is not None and done.progress.ratio == 2.0
        assert [(r.id, r.role) for r in await recs.unfinished()] == [("m1", "destination")]
        assert {r.role for r in await recs.any_role("m1")} == {"source", "destination"}
    finally:
        await store.close()


# ----------------------------------------------------------------- control channel


async def test_control_channel_delivers_in_order_and_reports_loss() -> None:
    a, b = channel_pair()
    ca = ControlChannel(a, vm="g1", peer="hostb", migration_id="m1")
    cb = ControlChannel(b, vm="g1", peer="hosta", migration_id="m1")
    ca.start()
    cb.start()
    await ca.send(PhaseNotice(migration_id="m1", phase="precopy"))
    await ca.send(Commit(migration_id="m1"))
    assert (await cb.recv(1.0)).TYPE == "phase"
    assert (await cb.expect((Commit,), 1.0)).TYPE == "commit"
    with pytest.raises(MigrationTimeout) as exc:
        await cb.recv(0.01)
    assert exc.value.context["peer"] == "hosta" and exc.value.context["phase"] == "prepare"
    a.cut("link cut")
    with pytest.raises(PeerLost):
        await cb.recv(1.0)
    assert cb.lost and "link cut" in (cb.lost_reason or "")
    await ca.close()
    await cb.close()


async def test_control_channel_refuses_another_migrations_message() -> None:
    a, b = channel_pair()
    cb = ControlChannel(b, vm="g1", peer="hosta", migration_id="m1")
    cb.start()
    await a.send_message(encode(Commit(migration_id="m2")))
    with pytest.raises(PeerLost) as exc:
        await cb.recv(1.0)
    assert "another migration" in str(exc.value.context["reason"])
    await asyncio.wait_for(cb.close(), 1.0)


def test_backlog_between_the_qemus_shrinks_the_downtime_limit_and_holds_qemu_back() -> None:
    s = ConvergenceSteering(SteeringPolicy(max_downtime_ms=300, deadline_at=100.0, cap_bandwidth=False))
    s.initial_parameters()

    def at(t: float, sent: int, buffered: int) -> list[SetParameters]:
        out = s.observe(Sample("active", 2, 50 << 20, sent, 10, mbps=400, buffered_bytes=buffered), t)
        assert all(isinstance(a, SetParameters) and a.routine for a in out)
        return [a for a in out if isinstance(a, SetParameters)]

    # QEMU hands over 50 MB/s but only 25 MB/s reach the destination: the backlog grows.
    assert at(0.0, 0, 0) == [SetParameters({"downtime-limit": int((300 - 15) * 0.5)}, "backlog 0 ms", True)]
    assert at(0.2, 10_000_000, 5_000_000) == []  # drain rate not measured over a window yet
    out = at(1.0, 50_000_000, 25_000_000)  # 25 MB at 25 MB/s: 1 s of drain, over the whole budget
    limits = {k: v for a in out for k, v in a.parameters.items()}
    assert limits["downtime-limit"] == 10  # QEMU must not switch over with a second still in flight
    assert limits["max-bandwidth"] == int(25_000_000 * 0.6)  # held below the drain rate
    assert s.backlog_ms == pytest.approx(1000)
    # The backlog drains: the full budget again, and QEMU uncapped (no link-based cap on this path).
    out = at(2.0, 65_000_000, 100_000)
    limits = {k: v for a in out for k, v in a.parameters.items()}
    assert limits == {
        "downtime-limit": int((300 - 15 - s.backlog_ms) * 0.5),
        "max-bandwidth": UNCAPPED_BANDWIDTH,
    }


async def test_a_vm_whose_migration_is_only_closing_waits_instead_of_being_refused() -> None:
    """After its final phase a migration still closes (the baseline recording of what crossed takes
    seconds): the VM's next migration waits for that instead of a 409, while one still under way
    keeps the VM busy."""
    from types import SimpleNamespace
    from typing import Any, cast

    from novacron.migration.service import MigrationService

    service = MigrationService(cast(Any, None), cast(Any, None), cast(Any, None))
    closing = SimpleNamespace(vm="g1", done=asyncio.Event(), machine=SimpleNamespace(final=True))
    running = SimpleNamespace(vm="g2", done=asyncio.Event(), machine=SimpleNamespace(final=False))
    service._runs.update({"m1": cast(Any, closing), "m2": cast(Any, running)})
    assert not await service._free_to_migrate("g2")
    assert await service._free_to_migrate("g3")
    waiting = asyncio.create_task(service._free_to_migrate("g1"))
    finished, _ = await asyncio.wait({waiting}, timeout=0.2)
    assert not finished  # still closing: it waits (the event below is what releases it)
    closing.done.set()
    assert await waiting


def test_an_error_keeps_the_end_of_a_guest_console_and_short_other_context() -> None:
    from novacron.migration.errors import MigrationError
    from novacron.migration.orchestrator import MAX_CONSOLE_CONTEXT, MAX_CONTEXT_VALUE, error_info

    lines = [f"[   16.{i:06d}] line {i}" for i in range(400)]
    console = "\n".join([*lines, "[   16.5] Kernel panic - not syncing"])
    exc = MigrationError("the guest is not alive after resume", vm="g1", console=console, detail="x" * 5000)
    info = error_info(exc, Phase.VERIFY)
    assert info.context["console"].endswith("Kernel panic - not syncing")
    assert len(info.context["console"]) == MAX_CONSOLE_CONTEXT
    assert info.context["detail"] == "x" * MAX_CONTEXT_VALUE
    assert info.context["vm"] == "g1"
