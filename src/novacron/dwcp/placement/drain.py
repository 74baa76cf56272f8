"""Drain: evacuate a host by live migrations, a bounded number at a time.

``plan_drain`` decides where each VM of the host goes (the host is treated as in maintenance; VMs
are placed largest first with the same filter-then-score as a new VM, each destination's capacity
reserved as the plan grows). ``DrainRun`` is the sans-IO executor: the caller (the agent's
orchestrator) asks ``next_moves()`` for migrations it may start now - never more than
``max_parallel`` at once, nor more than ``max_incoming_per_host`` into one destination - reports
each end with ``finished()``, and reads ``progress`` for the user. A failed move is retried up to
``max_attempts`` times, then reported as failed; the VM then still runs on the drained host.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field, replace

from novacron.dwcp.placement.greedy import Move
from novacron.dwcp.placement.model import Cluster, PlacementInputError
from novacron.dwcp.placement.occupancy import Occupancy

DEFAULT_MAX_PARALLEL = 2  # live migrations are heavy: bandwidth and the source's CPU
MAX_PARALLEL_LIMIT = 64
DEFAULT_MAX_INCOMING_PER_HOST = 1
DEFAULT_MAX_ATTEMPTS = 3


@dataclass(frozen=True)
class DrainLimits:
    max_parallel: int = DEFAULT_MAX_PARALLEL
    max_incoming_per_host: int = DEFAULT_MAX_INCOMING_PER_HOST
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    def __post_init__(self) -> None:
        if not 1 <= self.max_parallel <= MAX_PARALLEL_LIMIT:
            raise PlacementInputError(
                "max_parallel out of bounds",
                field="max_parallel",
                value=self.max_parallel,
                max=MAX_PARALLEL_LIMIT,
            )
        if self.max_incoming_per_host < 1:
            raise PlacementInputError(
                "max_incoming_per_host must be >= 1",
                field="max_incoming_per_host",
                value=self.max_incoming_per_host,
            )
        if self.max_attempts < 1:
            raise PlacementInputError(
                "max_attempts must be >= 1", field="max_attempts", value=self.max_attempts
            )


@dataclass(frozen=True)
class DrainPlan:
    host: str
    moves: tuple[Move, ...]  # in the order they should start
    unplaceable: dict[str, dict[str, int]]  # VM -> hosts rejected per filter


def plan_drain(cluster: Cluster, host: str) -> DrainPlan:
    names = {h.name for h in cluster.hosts}
    if host not in names:
        raise PlacementInputError("unknown host to drain", field="host", host=host)
    hosts = tuple(replace(h, maintenance=True) if h.name == host else h for h in cluster.hosts)
    drained = Cluster(hosts, cluster.vms, cluster.assignment)
    occ = Occupancy(drained)
    src = occ.index[host]
    by_name = {v.name: v for v in cluster.vms}
    leaving = [by_name[v] for v, h in cluster.assignment.items() if h == host]
    leaving.sort(key=lambda v: (-max(v.vcpus / occ.cap_cpu.mean(), v.mem_mib / occ.cap_mem.mean()), v.name))
    moves: list[Move] = []
    unplaceable: dict[str, dict[str, int]] = {}
    for vm in leaving:
        # The source is in maintenance, so it is never a destination; taking the VM off it only
        # keeps the usage bookkeeping true once the plan has run.
        occ.remove(vm, src)
        dst = occ.best(vm)
        if dst is None:
            unplaceable[vm.name] = occ.rejections(vm)
            occ.add(vm, src)
            continue
        occ.add(vm, dst)
        moves.append(Move(vm.name, host, occ.hosts[dst].name))
    return DrainPlan(host, tuple(moves), unplaceable)


@dataclass(frozen=True)
class DrainProgress:
    total: int
    done: int
    running: int
    pending: int
    failed: int

    @property
    def fraction(self) -> float:
        return 1.0 if self.total == 0 else (self.done + self.failed) / self.total


@dataclass
class DrainRun:
    """Runs a plan: which moves to start, bounded; what happened; no I/O and no clock."""

    plan: DrainPlan
    limits: DrainLimits = field(default_factory=DrainLimits)
    _pending: deque[Move] = field(init=False)
    _running: dict[str, Move] = field(init=False, default_factory=dict)
    _attempts: Counter[str] = field(init=False, default_factory=Counter)
    done: list[Move] = field(init=False, default_factory=list)
    failed: dict[str, str] = field(init=False, default_factory=dict)  # VM -> last error

    def __post_init__(self) -> None:
        self._pending = deque(self.plan.moves)

    def next_moves(self) -> list[Move]:
        """Moves to start now; each is running until ``finished()`` is called for it."""
        incoming = Counter(m.dst for m in self._running.values())
        started: list[Move] = []
        skipped: list[Move] = []
        while self._pending and len(self._running) < self.limits.max_parallel:
            move = self._pending.popleft()
            if incoming[move.dst] >= self.limits.max_incoming_per_host:
                skipped.append(move)
                continue
            incoming[move.dst] += 1
            self._running[move.vm] = move
            self._attempts[move.vm] += 1
            started.append(move)
        self._pending.extendleft(reversed(skipped))
        return started

    def finished(self, vm: str, ok: bool, error: str = "") -> None:
        move = self._running.pop(vm, None)
        if move is None:
            raise PlacementInputError("no running move for this VM", field="vm", vm=vm)
        if ok:
            self.done.append(move)
        elif self._attempts[vm] < self.limits.max_attempts:
            self._pending.append(move)
        else:
            self.failed[vm] = error or "failed"

    @property
    def complete(self) -> bool:
        return not self._pending and not self._running

    @property
    def progress(self) -> DrainProgress:
        return DrainProgress(
            total=len(self.plan.moves),
            done=len(self.done),
            running=len(self._running),
            pending=len(self._pending),
            failed=len(self.failed),
        )
