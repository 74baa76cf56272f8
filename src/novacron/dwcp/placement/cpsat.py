"""Batch placement and rebalancing as a CP-SAT model (OR-Tools), with a time limit and a greedy fallback.

The model counts rather than assigns: VMs of one *kind* (same demand, selector and anti-affinity
group) are interchangeable, so the variables are ``n[k, h]`` = how many VMs of kind ``k`` go on host
``h``, created only where the host passes the static filters (maintenance, labels, one VM's size).
10,000 VMs of a few dozen kinds on 1,000 hosts is tens of thousands of variables instead of ten
million booleans. Constraints: vCPUs and memory per host (on top of the VMs that stay put), at most
one VM of an anti-affinity group per host, each kind placed at most (rebalancing: exactly) its count.

Objective (minimised; utilisation ``u_h`` in permille = the larger of the host's vCPU and memory
shares)::

    UNPLACED_COST * unplaced + W * max_h u_h + sum_h sum_{t in TIERS} max(0, u_h - t) + move_cost * moves

with TIERS = 400, 450, ..., 950 permille and W = hosts x (len(TIERS) + 1) x the largest ratio
between host capacities, large enough that no flattening of the others can pay for a higher peak:
first place everything that fits, then lower the peak, then flatten the rest (the tier sum is a
convex penalty that grows faster the fuller a host is), then - when
rebalancing - move few VMs (``move_cost`` is how many permille-host units of balance one live
migration must buy; ``max_moves`` also bounds them outright). The greedy answer is given to the
solver as a hint, so it starts from a feasible solution. If the solver has no solution when the time
limit ends, or the model would exceed ``max_variables``, the greedy answer is returned and
``notes`` says why.
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from ortools.sat.python import cp_model

from novacron.dwcp.placement.greedy import (
    Move,
    PlacementResult,
    _new_vms,
    greedy_place,
    greedy_rebalance,
    quality_of,
)
from novacron.dwcp.placement.model import VM, Cluster, PlacementInputError
from novacron.dwcp.placement.occupancy import Occupancy

UNPLACED_COST = 10**9
TIERS_PERMILLE = tuple(range(400, 1000, 50))  # 400, 450, ..., 950
PERMILLE = 1000

Kind = tuple[int, int, tuple[tuple[str, str], ...], str | None]


@dataclass(frozen=True)
class CpSatLimits:
    time_limit_s: float = 10.0
    workers: int = 2  # the solver's parallel search workers (threads)
    max_variables: int = 300_000  # a larger model could not even be built in the time limit
    move_cost: int = 50
    # Above this many (kind, host) variables the whole-cluster model is not solved at once but
    # window by window (measured: with 2 workers the 10,000-VM model does not improve on its greedy
    # hint within 10 s, while 40-host windows solve in a fraction of a second each).
    full_model_variables: int = 20_000
    window_hosts: int = 40
    window_time_s: float = 0.5
    max_windows: int = 10_000
    seed: int = 1  # which cold hosts join each window


@dataclass
class _Problem:
    occ: Occupancy  # fixed VMs only
    kinds: dict[Kind, list[VM]]
    current: dict[str, int]  # movable VM -> host index it is on now (rebalancing)
    rebalance: bool


def _check_limits(limits: CpSatLimits) -> None:
    if (
        limits.time_limit_s <= 0
        or limits.workers < 1
        or limits.max_variables < 1
        or limits.move_cost < 0
        or limits.window_hosts < 2
        or limits.window_time_s <= 0
    ):
        raise PlacementInputError("invalid CP-SAT limits", field="limits", limits=str(limits))


def cpsat_place(cluster: Cluster, new: Sequence[VM], limits: CpSatLimits | None = None) -> PlacementResult:
    """Place ``new`` VMs (existing ones stay put) by CP-SAT; greedy if CP-SAT has nothing in time."""
    limits = limits or CpSatLimits()
    _check_limits(limits)
    _new_vms(cluster, new)
    greedy = greedy_place(cluster, new)
    occ = Occupancy(cluster)
    kinds: dict[Kind, list[VM]] = defaultdict(list)
    for vm in sorted(new, key=lambda v: v.name):
        kinds[vm.kind].append(vm)
    problem = _Problem(occ, dict(kinds), {}, rebalance=False)
    if _model_size(problem) <= limits.full_model_variables:
        return _solve(cluster, problem, greedy, limits, max_moves=None)
    full = Cluster(cluster.hosts, (*cluster.vms, *new), cluster.assignment)
    movable = {v.name for v in new} - set(greedy.unplaced)
    return _improve_by_windows(full, greedy, movable, limits, move_cost=0, max_moves=None)


def cpsat_rebalance(cluster: Cluster, max_moves: int, limits: CpSatLimits | None = None) -> PlacementResult:
    """Re-place every placed VM to balance load with at most ``max_moves`` live migrations."""
    limits = limits or CpSatLimits()
    _check_limits(limits)
    if max_moves < 0:
        raise PlacementInputError("max_moves must be >= 0", field="max_moves", value=max_moves)
    greedy = greedy_rebalance(cluster, max_moves)
    occ = Occupancy(cluster, include_assigned=False)
    by_name = {v.name: v for v in cluster.vms}
    kinds: dict[Kind, list[VM]] = defaultdict(list)
    current: dict[str, int] = {}
    for vm_name in sorted(cluster.assignment):
        vm = by_name[vm_name]
        kinds[vm.kind].append(vm)
        current[vm_name] = occ.index[cluster.assignment[vm_name]]
    problem = _Problem(occ, dict(kinds), current, rebalance=True)
    if _model_size(problem) <= limits.full_model_variables:
        return _solve(cluster, problem, greedy, limits, max_moves=max_moves)
    start = PlacementResult(dict(cluster.assignment), {}, [], greedy.quality, "greedy", 0.0)
    return _improve_by_windows(
        cluster, start, set(cluster.assignment), limits, move_cost=limits.move_cost, max_moves=max_moves
    )


def _apply(occ: Occupancy, vm: VM, src: str, dst: str) -> None:
    occ.remove(vm, occ.index[src])
    occ.add(vm, occ.index[dst])


def _window_cost(occ: Occupancy, window: list[int]) -> float:
    """The model's objective (without moves) over ``window``, from the real usage."""
    util = np.ceil(occ.utilisation()[window] * PERMILLE - 1e-9)
    tiers = sum(np.maximum(0.0, util - t).sum() for t in TIERS_PERMILLE)
    return float(_peak_weight(occ, window) * util.max(initial=0.0) + tiers)


def _peak_weight(occ: Occupancy, hosts: list[int]) -> int:
    """Weight of the peak: one permille more on the peak host outweighs any tier gain elsewhere."""
    cpu, mem = occ.cap_cpu[hosts], occ.cap_mem[hosts]
    ratio = max(float(cpu.max() / cpu.min()), float(mem.max() / mem.min())) if hosts else 1.0
    return len(hosts) * (len(TIERS_PERMILLE) + 1) * math.ceil(ratio)


def _model_size(p: _Problem) -> int:
    return sum(int(np.count_nonzero(p.occ.static_mask(vms[0]))) for vms in p.kinds.values())


def _improve_by_windows(
    full: Cluster,
    start: PlacementResult,
    movable: set[str],
    limits: CpSatLimits,
    *,
    move_cost: int,
    max_moves: int | None,
) -> PlacementResult:
    """Large-neighbourhood search with CP-SAT: repeatedly re-solve, exactly, the VMs of a window of
    hosts - the most utilised half and a random half from the least utilised - keeping the rest
    fixed. Each window's hint is the current answer, so no window makes things worse."""
    started = time.perf_counter()
    deadline = started + limits.time_limit_s
    rng = random.Random(limits.seed)
    by_name = {v.name: v for v in full.vms}
    original = dict(start.assignment)
    assignment = dict(start.assignment)
    occ = Occupancy(Cluster(full.hosts, full.vms, assignment))
    on_host: list[set[str]] = [set() for _ in full.hosts]
    for vm_name, host in assignment.items():
        on_host[occ.index[host]].add(vm_name)
    half = max(1, min(limits.window_hosts, len(full.hosts)) // 2)
    windows = solved = relocated = 0
    while windows < limits.max_windows:
        remaining = deadline - time.perf_counter()
        if remaining < min(limits.window_time_s, 0.2):
            break
        windows += 1
        order = np.argsort(-occ.utilisation(), kind="stable").tolist()
        hot = order[:half]
        cold_pool = order[half:]
        cold = rng.sample(cold_pool, min(half, len(cold_pool)))
        window = sorted({*hot, *cold})
        sub_hosts = tuple(full.hosts[i] for i in window)
        sub_vm_names = sorted(n for i in window for n in on_host[i])
        sub_vms = tuple(by_name[n] for n in sub_vm_names)
        sub_assignment = {n: assignment[n] for n in sub_vm_names}
        fixed = {n: h for n, h in sub_assignment.items() if n not in movable}
        sub_cluster = Cluster(sub_hosts, sub_vms, sub_assignment)
        occ_fixed = Occupancy(Cluster(sub_hosts, sub_vms, fixed))
        kinds: dict[Kind, list[VM]] = defaultdict(list)
        current: dict[str, int] = {}
        for n in sub_vm_names:
            if n in movable:
                kinds[by_name[n].kind].append(by_name[n])
                current[n] = occ_fixed.index[sub_assignment[n]]
        if not kinds:
            continue
        budget = None
        if max_moves is not None:
            budget = max_moves - sum(1 for n, h in assignment.items() if original.get(n) != h)
        hint = PlacementResult(sub_assignment, {}, [], start.quality, "greedy", 0.0)
        sub_limits = replace(limits, time_limit_s=min(limits.window_time_s, remaining), move_cost=move_cost)
        result = _solve(
            sub_cluster, _Problem(occ_fixed, dict(kinds), current, rebalance=True), hint, sub_limits, budget
        )
        if result.solver != "cp-sat":
            continue
        # A solver cut short before loading its hint may return any feasible answer: keep a
        # window's answer only if it is no worse than what the window had.
        before = _window_cost(occ, window)
        for move in result.moves:
            _apply(occ, by_name[move.vm], move.src, move.dst)
        if _window_cost(occ, window) > before:
            for move in result.moves:
                _apply(occ, by_name[move.vm], move.dst, move.src)
            continue
        solved += 1
        relocated += len(result.moves)
        for move in result.moves:
            on_host[occ.index[move.src]].discard(move.vm)
            on_host[occ.index[move.dst]].add(move.vm)
            assignment[move.vm] = move.dst
    note = (
        f"CP-SAT over windows: {solved} of {windows} windows of {2 * half} hosts kept, "
        f"{relocated} VM relocations"
    )
    if solved == 0:
        return _fallback(start, started, f"no window solved in time ({windows} tried)")
    moves = [
        Move(n, original[n], h)
        for n, h in sorted(assignment.items())
        if n in original and original[n] != h and max_moves is not None
    ]
    return PlacementResult(
        assignment,
        start.unplaced,
        moves,
        quality_of(occ, len(start.unplaced)),
        "cp-sat",
        time.perf_counter() - started,
        [note],
    )


def _solve(
    cluster: Cluster, p: _Problem, greedy: PlacementResult, limits: CpSatLimits, max_moves: int | None
) -> PlacementResult:
    started = time.perf_counter()
    occ = p.occ
    n_hosts = len(occ.hosts)
    free_cpu = (occ.cap_cpu - occ.used_cpu).astype(np.int64)
    free_mem = (occ.cap_mem - occ.used_mem).astype(np.int64)

    # Candidate (kind, host) pairs and their upper bounds.
    kind_list = list(p.kinds)
    current_count: dict[tuple[int, int], int] = defaultdict(int)
    for ki, kind in enumerate(kind_list):
        for vm in p.kinds[kind]:
            if vm.name in p.current:
                current_count[(ki, p.current[vm.name])] += 1
    bounds: dict[tuple[int, int], int] = {}
    for ki, kind in enumerate(kind_list):
        rep = p.kinds[kind][0]
        count = len(p.kinds[kind])
        mask = occ.static_mask(rep)
        if rep.anti_affinity is not None:
            mask &= occ._group(rep.anti_affinity) == 0
        fit = np.minimum(free_cpu // rep.vcpus, free_mem // rep.mem_mib)
        cap = 1 if rep.anti_affinity is not None else count
        for host in np.nonzero(mask)[0].tolist():
            ub = int(min(cap, fit[host]))
            if ub > 0:
                bounds[(ki, host)] = ub
        # VMs may stay on a host that no longer passes the filters (maintenance, labels changed).
        for (k2, at), c in list(current_count.items()):
            if k2 == ki and (ki, at) not in bounds:
                bounds[(ki, at)] = c
    if len(bounds) > limits.max_variables:
        return _fallback(
            greedy, started, f"model too large: {len(bounds)} variables > {limits.max_variables}"
        )

    model = cp_model.CpModel()
    n = {key: model.new_int_var(0, ub, f"n{key[0]}_{key[1]}") for key, ub in bounds.items()}
    per_host: list[list[tuple[cp_model.IntVar, VM]]] = [[] for _ in range(n_hosts)]
    per_kind: list[list[cp_model.IntVar]] = [[] for _ in kind_list]
    for (ki, h), var in n.items():
        per_host[h].append((var, p.kinds[kind_list[ki]][0]))
        per_kind[ki].append(var)

    Sum = cp_model.LinearExpr.sum
    placed_total: list[cp_model.LinearExpr] = []
    to_place = 0
    # Rebalancing keeps every VM; when greedy placed every new VM, so must CP-SAT (the model then
    # needs no huge penalty coefficient, which would blunt the solver's bounds).
    must_place_all = p.rebalance or not greedy.unplaced
    for ki, kind in enumerate(kind_list):
        count = len(p.kinds[kind])
        placed = Sum(per_kind[ki])
        model.add(placed == count if must_place_all else placed <= count)
        placed_total.append(placed)
        to_place += count
    unplaced = to_place - Sum(placed_total)

    util = [model.new_int_var(0, PERMILLE, f"u{h}") for h in range(n_hosts)]
    peak = model.new_int_var(0, PERMILLE, "peak")
    excess_terms: list[cp_model.IntVar] = []
    excess_of: list[tuple[int, int, cp_model.IntVar]] = []
    for h in range(n_hosts):
        terms = per_host[h]
        variables = [var for var, _ in terms]
        cpu = cp_model.LinearExpr.weighted_sum(variables, [vm.vcpus for _, vm in terms])
        mem = cp_model.LinearExpr.weighted_sum(variables, [vm.mem_mib for _, vm in terms])
        if terms:
            model.add(cpu <= int(free_cpu[h]))
            model.add(mem <= int(free_mem[h]))
        cap_cpu, cap_mem = int(occ.cap_cpu[h]), int(occ.cap_mem[h])
        model.add(util[h] * cap_cpu >= PERMILLE * (int(occ.used_cpu[h]) + cpu))
        model.add(util[h] * cap_mem >= PERMILLE * (int(occ.used_mem[h]) + mem))
        model.add(peak >= util[h])
        for t in TIERS_PERMILLE:
            e = model.new_int_var(0, PERMILLE - t, f"e{h}_{t}")
            model.add(e >= util[h] - t)
            excess_terms.append(e)
            excess_of.append((h, t, e))
    # Anti-affinity: one VM of a group per host across all kinds of that group.
    group_vars: dict[tuple[str, int], list[cp_model.IntVar]] = defaultdict(list)
    for (ki, h), var in n.items():
        group = kind_list[ki][3]
        if group is not None:
            group_vars[(group, h)].append(var)
    for members in group_vars.values():
        if len(members) > 1:
            model.add(Sum(members) <= 1)

    moves_expr: cp_model.LinearExpr | int = 0
    stay_of: list[tuple[int, int, int, cp_model.IntVar]] = []
    if p.rebalance:
        stays: list[cp_model.IntVar] = []
        for (ki, h), c in current_count.items():
            stay = model.new_int_var(0, c, f"s{ki}_{h}")
            model.add(stay <= n[(ki, h)])
            stays.append(stay)
            stay_of.append((ki, h, c, stay))
        moves_expr = len(p.current) - Sum(stays)
        if max_moves is not None:
            model.add(moves_expr <= max_moves)

    model.minimize(
        (0 if must_place_all else UNPLACED_COST * unplaced)
        + _peak_weight(occ, list(range(n_hosts))) * peak
        + Sum(excess_terms)
        + limits.move_cost * moves_expr
    )
    _hint(model, _Vars(n, util, peak, excess_of, stay_of), kind_list, p, greedy)

    solver = cp_model.CpSolver()
    remaining = limits.time_limit_s - (time.perf_counter() - started)
    if remaining <= 0:
        return _fallback(greedy, started, "model building used the whole time limit")
    solver.parameters.max_time_in_seconds = remaining
    solver.parameters.num_workers = limits.workers
    # Symmetry detection costs seconds on these models and the counting already removes most of it.
    solver.parameters.symmetry_level = 0
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return _fallback(
            greedy, started, f"CP-SAT found no solution in time (status {solver.status_name(status)})"
        )
    counts = {key: int(solver.value(var)) for key, var in n.items()}
    return _disaggregate(cluster, p, kind_list, counts, started=started, status=solver.status_name(status))


@dataclass
class _Vars:
    n: dict[tuple[int, int], cp_model.IntVar]
    util: list[cp_model.IntVar]
    peak: cp_model.IntVar
    excess: list[tuple[int, int, cp_model.IntVar]]
    stay: list[tuple[int, int, int, cp_model.IntVar]]


def _hint(
    model: cp_model.CpModel, v: _Vars, kind_list: list[Kind], p: _Problem, greedy: PlacementResult
) -> None:
    """Hint the greedy answer for *every* variable: a complete, feasible hint is CP-SAT's first
    solution, so the solver never has less than greedy when the time runs out."""
    kind_index = {kind: ki for ki, kind in enumerate(kind_list)}
    hinted: dict[tuple[int, int], int] = defaultdict(int)
    cpu = p.occ.used_cpu.copy()
    mem = p.occ.used_mem.copy()
    for kind, vms in p.kinds.items():
        for vm in vms:
            host = greedy.assignment.get(vm.name)
            if host is not None and (kind_index[kind], p.occ.index[host]) in v.n:
                h = p.occ.index[host]
                hinted[(kind_index[kind], h)] += 1
                cpu[h] += vm.vcpus
                mem[h] += vm.mem_mib
    for key, var in v.n.items():
        model.add_hint(var, hinted.get(key, 0))
    util = [
        max(
            -(-PERMILLE * int(cpu[h]) // int(p.occ.cap_cpu[h])),
            -(-PERMILLE * int(mem[h]) // int(p.occ.cap_mem[h])),
        )
        for h in range(len(v.util))
    ]
    for h, var in enumerate(v.util):
        model.add_hint(var, min(util[h], PERMILLE))
    model.add_hint(v.peak, min(max(util, default=0), PERMILLE))
    for h, t, var in v.excess:
        model.add_hint(var, max(0, min(util[h], PERMILLE) - t))
    for ki, h, c, var in v.stay:
        model.add_hint(var, min(c, hinted.get((ki, h), 0)))


def _fallback(greedy: PlacementResult, started: float, why: str) -> PlacementResult:
    return PlacementResult(
        greedy.assignment,
        greedy.unplaced,
        greedy.moves,
        greedy.quality,
        "greedy",
        greedy.seconds + time.perf_counter() - started,
        [f"greedy fallback: {why}"],
    )


def _disaggregate(
    cluster: Cluster,
    p: _Problem,
    kind_list: list[Kind],
    counts: dict[tuple[int, int], int],
    *,
    started: float,
    status: str,
) -> PlacementResult:
    occ = p.occ
    assignment = {} if p.rebalance else dict(cluster.assignment)
    unplaced: dict[str, dict[str, int]] = {}
    moves: list[Move] = []
    left_out: list[VM] = []
    per_kind_hosts: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for (ki, h), c in counts.items():
        if c:
            per_kind_hosts[ki].append((h, c))
    for ki, kind in enumerate(kind_list):
        slots = dict(per_kind_hosts.get(ki, []))
        pool: deque[VM] = deque()
        # VMs already on a host the solution keeps for their kind stay there.
        for vm in p.kinds[kind]:
            now = p.current.get(vm.name)
            if now is not None and slots.get(now, 0) > 0:
                slots[now] -= 1
                assignment[vm.name] = occ.hosts[now].name
            else:
                pool.append(vm)
        for h in sorted(slots):
            for _ in range(slots[h]):
                vm = pool.popleft()
                assignment[vm.name] = occ.hosts[h].name
                if vm.name in p.current:
                    moves.append(Move(vm.name, occ.hosts[p.current[vm.name]].name, occ.hosts[h].name))
        left_out.extend(pool)
    final = Occupancy(Cluster(cluster.hosts, (*cluster.vms, *_new(p, cluster)), assignment))
    for vm in left_out:
        unplaced[vm.name] = final.rejections(vm)
    return PlacementResult(
        assignment,
        unplaced,
        moves,
        quality_of(final, len(unplaced)),
        "cp-sat",
        time.perf_counter() - started,
        [f"CP-SAT status {status}"],
    )


def _new(p: _Problem, cluster: Cluster) -> list[VM]:
    known = {v.name for v in cluster.vms}
    return [vm for vms in p.kinds.values() for vm in vms if vm.name not in known]
