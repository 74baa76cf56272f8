"""Drains: cordon a node, plan where its VMs go (``plan_drain`` over the registry), run the moves as
live migrations through the source agent, at most N at a time (``DrainRun``), and report each VM.

A failed move is retried (``DrainLimits.max_attempts``) and then reported; the VM stays on the
drained node, running (a failed migration rolls back on the source), so nothing is lost. The job
keeps its state in memory for the API (``GET /v1/nodes/{node}/drain``); the last few finished
drains stay readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from novacron.cluster.calls import NodeCaller
from novacron.cluster.errors import ClusterError, NodeConflict
from novacron.cluster.placing import build_cluster
from novacron.cluster.registry import NodeRegistry
from novacron.dwcp.placement import DrainLimits, DrainRun, Move, plan_drain
from novacron.errors import NovacronError
from novacron.observability import metrics
from novacron.observability.log import log_event

log = logging.getLogger("novacron.cluster.drain")

FINAL_PHASES = ("done", "failed", "cancelled")
MAX_FINISHED_DRAINS = 16  # finished drain reports kept for the API


@dataclass(frozen=True)
class DrainSettings:
    poll_s: float = 0.5  # how often a running migration's record is read from the source agent
    move_timeout_s: float = 900.0  # one live migration, start to a final phase
    max_incoming_per_host: int = 2  # the agents' default max_incoming


MoveState = Literal["pending", "running", "done", "failed", "unplaceable"]


@dataclass
class MoveReport:
    vm: str
    dst: str | None
    state: MoveState = "pending"
    attempts: int = 0
    migration: str | None = None
    error: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    downtime_ms: float | None = None


MigrationMode = Literal["auto", "datacenter", "hybrid", "internet"]
DataPath = Literal["direct", "tunnel", "passthrough"]


@dataclass
class DrainJob:
    node: str
    parallel: int
    by: str
    mode: MigrationMode = "auto"  # passed to every migration (auto: the session's mode detector)
    data_path: DataPath | None = None  # None: the source agent's policy for the mode
    parallel_effective: int | None = None  # after the source agent's limit of outgoing migrations
    state: Literal["planning", "running", "done", "failed"] = "planning"
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    error: str | None = None
    moves: dict[str, MoveReport] = field(default_factory=dict)
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        counts = {s: sum(1 for m in self.moves.values() if m.state == s) for s in
                  ("pending", "running", "done", "failed", "unplaceable")}  # fmt: skip
        return {
            "node": self.node,
            "parallel": self.parallel,
            "parallel_effective": self.parallel_effective,
            "by": self.by,
            "mode": self.mode,
            "data_path": self.data_path,
            "state": self.state,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "error": self.error,
            "total": len(self.moves),
            **counts,
            "moves": [vars(m).copy() for m in self.moves.values()],
        }


class Drains:
    """The drains of one control node: at most one per node at a time."""

    def __init__(
        self, registry: NodeRegistry, caller: NodeCaller, settings: DrainSettings | None = None
    ) -> None:
        self.registry = registry
        self.caller = caller
        self.settings = settings or DrainSettings()
        self._jobs: OrderedDict[str, DrainJob] = OrderedDict()

    def get(self, node: str) -> DrainJob | None:
        return self._jobs.get(node)

    async def start(
        self,
        node: str,
        *,
        parallel: int,
        by: str,
        mode: MigrationMode = "auto",
        data_path: DataPath | None = None,
    ) -> DrainJob:
        DrainLimits(max_parallel=parallel)  # validates the bound (PlacementInputError names the field)
        await self.registry.record(node)  # NodeNotFound before anything changes
        current = self._jobs.get(node)
        if current is not None and current.state in ("planning", "running"):
            raise NodeConflict(f"node {node!r} is already being drained", node=node)
        job = DrainJob(node=node, parallel=parallel, by=by, mode=mode, data_path=data_path)
        self._jobs[node] = job
        self._jobs.move_to_end(node)
        while len(self._jobs) > MAX_FINISHED_DRAINS:
            oldest = next(iter(self._jobs))
            if self._jobs[oldest].state in ("planning", "running"):
                break
            del self._jobs[oldest]
        await self.registry.cordon(node, on=True, by=by)
        job.task = asyncio.create_task(self._run(job), name=f"drain-{node}")
        return job

    async def close(self) -> None:
        for job in self._jobs.values():
            if job.task is not None and not job.task.done():
                job.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await job.task

    async def _run(self, job: DrainJob) -> None:
        try:
            await self._drain(job)
        except asyncio.CancelledError:
            job.state, job.error = "failed", "the control node stopped during the drain"
            raise
        except (NovacronError, OSError) as exc:
            job.state, job.error = "failed", str(exc)
            log_event(log, "cluster.drain_failed", logging.WARNING, node=job.node, error=str(exc))
        finally:
            job.ended_at = time.time()

    async def _drain(self, job: DrainJob) -> None:
        views = await self.registry.list()
        by_node = {v.node: v for v in views}
        source = by_node[job.node]
        if source.api is None:
            raise ClusterError("the node never reported its API address", node=job.node)
        cluster = build_cluster(views, await self.registry.placements())
        plan = plan_drain(cluster, job.node)
        for vm, rejected in plan.unplaceable.items():
            why = ", ".join(f"{k}={v}" for k, v in rejected.items())
            job.moves[vm] = MoveReport(vm, None, state="unplaceable", error=f"no node can take it: {why}")
        for move in plan.moves:
            job.moves[move.vm] = MoveReport(move.vm, move.dst)
        job.state = "running"
        log_event(log, "cluster.drain_started", node=job.node, moves=len(plan.moves),
                  unplaceable=len(plan.unplaceable), parallel=job.parallel)  # fmt: skip
        parallel, incoming = await self._bounds(source.api, job.parallel)
        job.parallel_effective = parallel
        limits = DrainLimits(max_parallel=parallel, max_incoming_per_host=incoming)
        run = DrainRun(plan, limits)
        running: dict[asyncio.Task[tuple[bool, str]], Move] = {}
        try:
            while not run.complete:
                for move in run.next_moves():
                    report = job.moves[move.vm]
                    report.state, report.attempts, report.started_at = (
                        "running",
                        report.attempts + 1,
                        time.time(),
                    )
                    report.error = None
                    running[asyncio.create_task(self._move(source.api, move, report, job))] = move
                if not running:
                    break
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    move = running.pop(task)
                    ok, error = task.result()
                    run.finished(move.vm, ok, error)
                    report = job.moves[move.vm]
                    report.ended_at = time.time()
                    if ok:
                        report.state = "done"
                    elif move.vm in run.failed:
                        report.state, report.error = "failed", error
                    else:
                        report.state, report.error = "pending", error  # retried
                    metrics.DRAIN_MOVES.labels(report.state if report.state != "pending" else "retried").inc()
                    if not ok:
                        metrics.count_error("cluster", "DrainMoveFailed")
        finally:
            for task in running:
                task.cancel()
        bad = [m for m in job.moves.values() if m.state != "done"]
        job.state = "failed" if bad else "done"
        if bad:
            job.error = f"{len(bad)} of {len(job.moves)} VMs are still on {job.node}"
        log_event(log, "cluster.drain_finished", node=job.node, state=job.state,
                  done=len(run.done), failed=len(bad))  # fmt: skip

    async def _bounds(self, api: str, parallel: int) -> tuple[int, int]:
        """Moves at once and into one destination: the asked parallelism, cut at the source agent's
        limit of outgoing migrations (more would be refused) and the usual incoming limit."""
        try:
            node = await self.caller.call(api, "GET", "/v1/node")
            outgoing = int(node["limits"]["max_outgoing"])
            incoming = int(node["limits"]["max_incoming"])
        except (NovacronError, OSError, KeyError, TypeError, ValueError) as exc:
            log_event(log, "cluster.drain_limits_unknown", logging.WARNING, error=str(exc))
            outgoing = incoming = self.settings.max_incoming_per_host
        parallel = max(1, min(parallel, outgoing))
        return parallel, max(1, min(parallel, incoming, self.settings.max_incoming_per_host))

    async def _move(self, api: str, move: Move, report: MoveReport, job: DrainJob) -> tuple[bool, str]:
        """One live migration through the source agent: True when it committed."""
        body: dict[str, Any] = {"vm": move.vm, "to": move.dst, "mode": job.mode}
        if job.data_path is not None:
            body["data_path"] = job.data_path
        try:
            async with asyncio.timeout(self.settings.move_timeout_s):
                started = await self.caller.call(api, "POST", "/v1/migrations", body)
                report.migration = str(started["id"])
                while True:
                    record = await self.caller.call(api, "GET", f"/v1/migrations/{report.migration}")
                    phase = str(record.get("phase"))
                    if phase in FINAL_PHASES:
                        break
                    await asyncio.sleep(self.settings.poll_s)  # polling the agent's record, as the CLI does
        except TimeoutError:
            return False, f"no final phase within {self.settings.move_timeout_s:.0f} s"
        except (NovacronError, OSError, KeyError, TypeError) as exc:
            return False, str(exc)
        if phase == "done":
            report.downtime_ms = record.get("downtime_ms")
            return True, ""
        err = record.get("error") or {}
        return False, f"migration {phase}: {err.get('message', err) if isinstance(err, dict) else err}"


__all__ = ["DrainJob", "DrainSettings", "Drains", "MoveReport"]
