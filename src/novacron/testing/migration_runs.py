"""One measured migration through the agents (DWCP), its verification, and the issue's goals.

Shared by ``bench/migration.py`` and the demo, so both measure the same way as
:mod:`novacron.testing.qemu_migration` measures QEMU's own migration:

* total time: the migration request (the source agent's record ``created_at``) to QMP RESUME on the
  destination (``resume_ts``), both host clocks of one machine;
* downtime: QMP STOP on the source to RESUME on the destination (the record's ``downtime_ms``);
* bytes on the link: the emulator's counters, both directions, from just before the request to the
  record's final phase (control messages and commit included);
* the guest afterwards: VERIFY 0 corrupted pages, CHECKSUM unchanged, heartbeat going on, exactly one
  QEMU running it, on the destination. Any miss makes the row failed; it is never dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import statistics
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from novacron.errors import NovacronError
from novacron.testing.agents import AgentProc, Cluster, migrate, qemu_processes, wait_migration, where_it_runs
from novacron.testing.qemu_migration import GuestCheck, QemuResult, link_bytes, wait_heartbeat

DWCP_MIGRATION_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Row:
    """One migration as the benchmark and the demo show it."""

    method: str  # "qemu:<config>" or "dwcp:<scenario>"
    total_s: float | None
    downtime_ms: float | None
    link_bytes: int | None
    ok: bool
    problems: tuple[str, ...] = ()
    qemu_downtime_ms: int | None = None
    bytes_raw: int | None = None  # QEMU's own count (before multifd compression / HDE)
    mode: str | None = None
    data_path: str | None = None
    max_downtime_ms: int | None = None
    migration_id: str | None = None
    # seconds spent in each phase (source record), in order; where a slow migration spends its time
    phases: tuple[tuple[str, float], ...] = ()
    # milliseconds after the source's STOP at which each side entered its late phases, and RESUME
    switchover: tuple[tuple[str, float], ...] = ()

    @classmethod
    def from_qemu(cls, result: QemuResult) -> Row:
        return cls(
            method=f"qemu:{result.config}",
            total_s=result.total_s,
            downtime_ms=result.downtime_ms,
            link_bytes=result.link_bytes,
            ok=result.ok,
            problems=result.problems,
            qemu_downtime_ms=result.qemu_downtime_ms,
            bytes_raw=result.ram_transferred,
            max_downtime_ms=300,
        )

    @classmethod
    def failed(cls, method: str, *problems: str) -> Row:
        return cls(
            method=method, total_s=None, downtime_ms=None, link_bytes=None, ok=False, problems=problems
        )

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


async def check_via_agent(agent: AgentProc, vm: str, *, heartbeat_past: int | None = None) -> GuestCheck:
    """The guest's state through ``agent``'s API; with ``heartbeat_past``, waits for the heartbeat
    count to pass it (see ``wait_heartbeat``)."""
    verify = await agent.api("GET", f"/v1/vms/{vm}/guest/verify")
    checksum = await agent.api("GET", f"/v1/vms/{vm}/guest/checksum")

    async def beats() -> int:
        return int((await agent.api("GET", f"/v1/vms/{vm}/guest/status"))["heartbeats"])

    heartbeats = await wait_heartbeat(beats, -1 if heartbeat_past is None else heartbeat_past)
    return GuestCheck(int(verify["corrupted"]), str(checksum["checksum"]), heartbeats)


Follow = Callable[[AgentProc, str], Awaitable[dict[str, Any]]]


async def dwcp_migrate(
    cluster: Cluster,
    vm: str,
    src: str,
    dst: str,
    *,
    method: str,
    before: GuestCheck,
    follow: Follow | None = None,
    timeout_s: float = DWCP_MIGRATION_TIMEOUT_S,
    **options: Any,
) -> tuple[Row, GuestCheck | None]:
    """Migrate ``vm`` from ``src`` to ``dst`` through the agents and verify it where it should run.

    ``follow(agent, migration_id)`` may show progress; it must return the final record. Returns the
    row and the guest's state afterwards (None when it could not be asked)."""
    source = cluster[src]
    stats0 = await cluster.wan.stats()
    started = await migrate(source, vm, dst, **options)
    if follow is not None:
        m = await follow(source, str(started["id"]))
    else:
        m = await wait_migration(source, str(started["id"]), timeout_s=timeout_s)
    stats1 = await cluster.wan.stats()
    problems: list[str] = []
    if m.get("phase") != "done":
        err = m.get("error") or {}
        problems.append(
            f"migration {m.get('phase')}: {err.get('kind')} in {err.get('phase')}: {err.get('message')}"
        )
    now_at = dst if m.get("phase") == "done" else src
    check: GuestCheck | None = None
    try:
        check = await check_via_agent(cluster[now_at], vm, heartbeat_past=before.heartbeats)
        problems += check.problems(before.checksum, before.heartbeats)
    except (NovacronError, OSError) as exc:  # reported in the row: a guest that cannot answer failed
        problems.append(f"guest check on {now_at} failed: {type(exc).__name__}: {exc}")
    running = await where_it_runs(cluster, vm)
    if running != [now_at]:
        problems.append(f"runs on {running}, expected [{now_at}]")
    copies = len(qemu_processes(cluster, vm))
    if copies != 1:
        problems.append(f"{copies} QEMU processes run it")
    progress = m.get("progress") or {}
    dest_record: dict[str, Any] = {}
    with contextlib.suppress(NovacronError, OSError):  # only a breakdown: the row stands without it
        dest_record = await cluster[dst].api("GET", f"/v1/migrations/{started['id']}")
    created, resumed = m.get("created_at"), m.get("resume_ts")
    row = Row(
        method=method,
        total_s=(resumed - created) if resumed and created else None,
        downtime_ms=m.get("downtime_ms"),
        link_bytes=link_bytes(stats1, src, dst) - link_bytes(stats0, src, dst),
        ok=not problems,
        problems=tuple(problems),
        qemu_downtime_ms=m.get("qemu_downtime_ms"),
        bytes_raw=progress.get("bytes_raw"),
        mode=m.get("mode"),
        data_path=m.get("data_path"),
        max_downtime_ms=m.get("max_downtime_ms"),
        migration_id=str(started["id"]),
        phases=phase_durations(m),
        switchover=switchover_timeline(m, dest_record),
    )
    return row, check


def phase_durations(record: dict[str, Any]) -> tuple[tuple[str, float], ...]:
    """Seconds from each phase's entry to the next one's (the final phase has none), from a
    migration record as the API returns it."""
    history = [(str(h.get("phase")), float(h.get("at", 0.0))) for h in record.get("history") or []]
    out: list[tuple[str, float]] = []
    for (phase, at), (_, nxt) in itertools.pairwise(history):
        out.append((phase, round(nxt - at, 3)))
    return tuple(out)


LATE_PHASES = ("switchover", "verify", "commit")


def switchover_timeline(source: dict[str, Any], dest: dict[str, Any]) -> tuple[tuple[str, float], ...]:
    """When each side entered its late phases, and the RESUME, in ms after the source's STOP."""
    stop = source.get("stop_ts")
    if not stop:
        return ()
    marks: list[tuple[str, float]] = []
    for side, record in (("src", source), ("dst", dest)):
        if record.get("role") not in (None, "source" if side == "src" else "destination"):
            continue
        for entry in record.get("history") or []:
            if entry.get("phase") in LATE_PHASES:
                marks.append((f"{side}:{entry['phase']}", round((float(entry["at"]) - stop) * 1000, 1)))
    if source.get("resume_ts"):
        marks.append(("resume", round((float(source["resume_ts"]) - stop) * 1000, 1)))
    return tuple(sorted(marks, key=lambda m: m[1]))


# ------------------------------------------------------------------------------------------ goals


@dataclass(frozen=True)
class Goal:
    """``metric`` of ``method`` at most ``limit`` x QEMU's best (downtime: at most the row's limit)."""

    link: str
    method: str
    metric: str  # "time", "bytes" or "downtime"
    limit: float | None
    text: str


# The goals (issue 6, "Done when"); links by their benchmark keys.
GOALS: tuple[Goal, ...] = (
    Goal("100mbit", "dwcp:cold", "time", 0.85, "cold time <= 0.85x"),
    Goal("100mbit", "dwcp:cold", "bytes", 0.85, "cold bytes <= 0.85x"),
    Goal("100mbit", "dwcp:warm", "bytes", 0.4, "warm bytes <= 0.4x"),
    Goal("100mbit", "dwcp:back", "time", 0.2, "back time <= 0.2x"),
    Goal("100mbit", "dwcp:back", "bytes", 0.1, "back bytes <= 0.1x"),
    Goal("1gbit", "dwcp:cold", "time", 1.0, "cold time <= 1.0x"),
    Goal("unshaped", "dwcp:cold", "time", 1.1, "cold time <= 1.1x"),
    *(Goal(link, f"dwcp:{s}", "downtime", None, "downtime <= limit")
      for link in ("100mbit", "1gbit", "unshaped") for s in ("cold", "warm", "back")),
)  # fmt: skip


@dataclass(frozen=True)
class Summary:
    """Medians over the repeats of one method on one link (failed repeats counted, not averaged in)."""

    link: str
    method: str
    runs: int
    failed: int
    total_s: float | None
    downtime_ms: float | None  # median
    downtime_max_ms: float | None
    link_bytes: float | None
    max_downtime_ms: int | None
    problems: tuple[str, ...] = ()
    time_ratio: float | None = None
    bytes_ratio: float | None = None
    goals: list[tuple[str, bool | None]] = field(default_factory=list)  # (goal, met; None: no data)

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["problems"] = list(self.problems)
        return out


def _median(values: Sequence[float | int | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(link: str, method: str, rows: Sequence[Row]) -> Summary:
    good = [r for r in rows if r.ok]
    downtimes = [r.downtime_ms for r in good if r.downtime_ms is not None]
    limits = [r.max_downtime_ms for r in rows if r.max_downtime_ms is not None]
    return Summary(
        link=link,
        method=method,
        runs=len(rows),
        failed=len(rows) - len(good),
        total_s=_median([r.total_s for r in good]),
        downtime_ms=_median(downtimes),
        downtime_max_ms=max(downtimes) if downtimes else None,
        link_bytes=_median([r.link_bytes for r in good]),
        max_downtime_ms=min(limits) if limits else None,
        problems=tuple(p for r in rows for p in r.problems),
    )


def best_qemu(summaries: Sequence[Summary]) -> Summary | None:
    """QEMU's best configuration: the fastest (median time) whose every repeat succeeded."""
    qemu = [s for s in summaries if s.method.startswith("qemu:") and s.failed == 0 and s.total_s is not None]
    return min(qemu, key=lambda s: s.total_s or 0.0) if qemu else None


def _ratio(value: float | None, reference: float | None) -> float | None:
    return value / reference if value is not None and reference else None


def with_ratios_and_goals(summaries: Sequence[Summary], goals: Sequence[Goal] = GOALS) -> list[Summary]:
    """Each summary with its ratios against QEMU's best on the same link, and its goals judged."""
    out = []
    by_link: dict[str, list[Summary]] = {}
    for s in summaries:
        by_link.setdefault(s.link, []).append(s)
    for link, rows in by_link.items():
        best = best_qemu(rows)
        for s in rows:
            tr = _ratio(s.total_s, best.total_s if best else None)
            br = _ratio(s.link_bytes, best.link_bytes if best else None)
            judged: list[tuple[str, bool | None]] = []
            for g in goals:
                if g.link != link or g.method != s.method:
                    continue
                met: bool | None
                if s.failed:
                    met = False
                elif g.metric == "downtime":
                    limit = s.max_downtime_ms
                    met = None if s.downtime_max_ms is None or limit is None else s.downtime_max_ms <= limit
                else:
                    value = tr if g.metric == "time" else br
                    met = None if value is None or g.limit is None else value <= g.limit
                judged.append((g.text, met))
            out.append(dataclasses.replace(s, time_ratio=tr, bytes_ratio=br, goals=judged))
    return out
