"""Filter-then-score placement of one VM, greedy batch placement and greedy rebalancing.

The greedy batch places the hardest VMs first (largest dominant share of an average host, then the
most constrained: anti-affinity, then selector), each on its best-scoring feasible host. Rebalancing
repeatedly takes the most utilised host and moves the one VM whose move lowers the pair's peak the
most, until no move helps or ``max_moves`` is reached.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from novacron.dwcp.placement.model import VM, Cluster, NoFeasibleHost, PlacementInputError
from novacron.dwcp.placement.occupancy import Occupancy

Solver = Literal["greedy", "cp-sat"]


@dataclass(frozen=True)
class Decision:
    vm: str
    host: str
    score: float
    feasible_hosts: int


@dataclass(frozen=True)
class Move:
    vm: str
    src: str
    dst: str


@dataclass(frozen=True)
class Quality:
    """How good an assignment is. Utilisation of a host = the larger of its vCPU and memory shares."""

    max_util: float
    mean_util: float
    stddev_util: float
    hosts_used: int
    unplaced: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "max_util": round(self.max_util, 4),
            "mean_util": round(self.mean_util, 4),
            "stddev_util": round(self.stddev_util, 4),
            "hosts_used": self.hosts_used,
            "unplaced": self.unplaced,
        }


@dataclass(frozen=True)
class PlacementResult:
    assignment: dict[str, str]  # every VM that has a host afterwards -> host
    unplaced: dict[str, dict[str, int]]  # VM -> hosts rejected per filter
    moves: list[Move]  # VMs already placed that change host (rebalancing)
    quality: Quality
    solver: Solver
    seconds: float
    notes: list[str] = field(default_factory=list)  # why a fallback was used, solver status, ...


def quality_of(occ: Occupancy, unplaced: int = 0) -> Quality:
    """Over the hosts that take VMs (hosts in maintenance count only while they still hold some)."""
    loaded = (occ.used_cpu > 0) | (occ.used_mem > 0)
    counted = ~occ.maintenance | loaded
    util = occ.utilisation()[counted]
    used = loaded[counted]
    return Quality(
        max_util=float(util.max(initial=0.0)),
        mean_util=float(util.mean()) if len(util) else 0.0,
        stddev_util=float(util.std()) if len(util) else 0.0,
        hosts_used=int(np.count_nonzero(used)),
        unplaced=unplaced,
    )


def place_one(cluster: Cluster, vm: VM) -> Decision:
    """The best host for a new VM, or NoFeasibleHost naming how many hosts each filter rejected."""
    if vm.name in cluster.assignment:
        raise PlacementInputError("VM is already placed", field="vm.name", vm=vm.name)
    occ = Occupancy(cluster)
    mask = occ.feasible(vm)
    best = occ.best(vm)
    if best is None:
        raise NoFeasibleHost(f"no host can take VM {vm.name!r}", vm=vm.name, rejected=occ.rejections(vm))
    return Decision(vm.name, occ.hosts[best].name, float(occ.scores(vm)[best]), int(np.count_nonzero(mask)))


def _difficulty(occ: Occupancy, vm: VM) -> tuple[float, int, int, str]:
    avg_cpu = float(occ.cap_cpu.mean())
    avg_mem = float(occ.cap_mem.mean())
    dominant = max(vm.vcpus / avg_cpu, vm.mem_mib / avg_mem)
    return (-dominant, 0 if vm.anti_affinity else 1, 0 if vm.selector else 1, vm.name)


def order_for_placement(occ: Occupancy, vms: Sequence[VM]) -> list[VM]:
    return sorted(vms, key=lambda v: _difficulty(occ, v))


def _new_vms(cluster: Cluster, new: Sequence[VM]) -> None:
    known = {v.name for v in cluster.vms}
    seen: set[str] = set()
    for vm in new:
        if vm.name in known or vm.name in seen:
            raise PlacementInputError("VM to place already exists", field="vm.name", vm=vm.name)
        seen.add(vm.name)


def greedy_place(cluster: Cluster, new: Sequence[VM]) -> PlacementResult:
    """Place ``new`` VMs one by one, hardest first; existing VMs stay where they are."""
    _new_vms(cluster, new)
    started = time.perf_counter()
    occ = Occupancy(cluster)
    assignment = dict(cluster.assignment)
    unplaced: dict[str, dict[str, int]] = {}
    for vm in order_for_placement(occ, new):
        best = occ.best(vm)
        if best is None:
            unplaced[vm.name] = occ.rejections(vm)
            continue
        occ.add(vm, best)
        assignment[vm.name] = occ.hosts[best].name
    return PlacementResult(
        assignment,
        unplaced,
        [],
        quality_of(occ, len(unplaced)),
        "greedy",
        time.perf_counter() - started,
    )


def greedy_rebalance(cluster: Cluster, max_moves: int) -> PlacementResult:
    """Move VMs off the most utilised hosts while that lowers the peak (at most ``max_moves``)."""
    if max_moves < 0:
        raise PlacementInputError("max_moves must be >= 0", field="max_moves", value=max_moves)
    started = time.perf_counter()
    occ = Occupancy(cluster)
    by_name = {v.name: v for v in cluster.vms}
    on_host: list[list[VM]] = [[] for _ in cluster.hosts]
    for vm_name, host_name in cluster.assignment.items():
        on_host[occ.index[host_name]].append(by_name[vm_name])
    assignment = dict(cluster.assignment)
    moved: dict[str, str] = {}  # vm -> original host
    # Maintenance hosts come first: their VMs should leave whatever the load elsewhere.
    for _ in range(max_moves):
        util = occ.utilisation()
        util = np.where(occ.maintenance & (occ.used_cpu > 0), np.inf, util)
        src = int(np.argmax(util))
        best_gain, best_move = 0.0, None
        for vm in sorted(
            on_host[src], key=lambda v: -(v.vcpus / occ.cap_cpu[src] + v.mem_mib / occ.cap_mem[src])
        ):
            dst = occ.best(vm, exclude=src)
            if dst is None:
                continue
            src_after = max(
                (occ.used_cpu[src] - vm.vcpus) / occ.cap_cpu[src],
                (occ.used_mem[src] - vm.mem_mib) / occ.cap_mem[src],
            )
            dst_after = max(
                (occ.used_cpu[dst] + vm.vcpus) / occ.cap_cpu[dst],
                (occ.used_mem[dst] + vm.mem_mib) / occ.cap_mem[dst],
            )
            gain = float(util[src]) - max(src_after, dst_after)
            if gain > best_gain + 1e-9:
                best_gain, best_move = gain, (vm, dst)
        if best_move is None:
            break
        vm, dst = best_move
        occ.remove(vm, src)
        occ.add(vm, dst)
        on_host[src].remove(vm)
        on_host[dst].append(vm)
        moved.setdefault(vm.name, cluster.assignment[vm.name])
        assignment[vm.name] = occ.hosts[dst].name
    moves = [Move(v, src_name, assignment[v]) for v, src_name in moved.items() if assignment[v] != src_name]
    return PlacementResult(assignment, {}, moves, quality_of(occ), "greedy", time.perf_counter() - started)
