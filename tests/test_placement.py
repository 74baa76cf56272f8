"""ITP placement: filters and score for one VM, greedy and CP-SAT batches, rebalancing, drain."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping

import pytest

from novacron.dwcp.placement import (
    VM,
    Cluster,
    CpSatLimits,
    DrainLimits,
    DrainRun,
    Host,
    NoFeasibleHost,
    PlacementInputError,
    cpsat_place,
    cpsat_rebalance,
    greedy_place,
    greedy_rebalance,
    place_one,
    plan_drain,
)


def check_valid(hosts: list[Host] | tuple[Host, ...], vms: list[VM], assignment: Mapping[str, str]) -> None:
    """Every hard constraint holds: capacity, selectors, anti-affinity (maintenance: no *new* VMs)."""
    by_host = {h.name: h for h in hosts}
    cpu: Counter[str] = Counter()
    mem: Counter[str] = Counter()
    groups: Counter[tuple[str, str]] = Counter()
    for vm in vms:
        host_name = assignment.get(vm.name)
        if host_name is None:
            continue
        host = by_host[host_name]
        cpu[host_name] += vm.vcpus
        mem[host_name] += vm.mem_mib
        assert all(host.labels.get(k) == v for k, v in vm.selector.items()), (vm, host)
        if vm.anti_affinity:
            groups[(vm.anti_affinity, host_name)] += 1
    for name, host in by_host.items():
        assert cpu[name] <= host.vcpus and mem[name] <= host.mem_mib, name
    assert all(c <= 1 for c in groups.values()), groups


def random_cluster(seed: int, hosts: int, vms: int) -> tuple[list[Host], list[VM]]:
    rng = random.Random(seed)
    host_list = [
        Host(
            f"h{i}",
            rng.choice([8, 16, 32]),
            rng.choice([16384, 32768, 65536]),
            {"ssd": str(rng.random() < 0.5)},
        )
        for i in range(hosts)
    ]
    vm_list = [
        VM(
            f"v{i}",
            rng.choice([1, 2, 4]),
            rng.choice([1024, 2048, 4096]),
            {"ssd": "True"} if rng.random() < 0.2 else {},
            f"g{i % 5}" if rng.random() < 0.1 else None,
        )
        for i in range(vms)
    ]
    return host_list, vm_list


# -- one VM ---------------------------------------------------------------------------------------


def test_place_one_prefers_the_least_loaded_host() -> None:
    hosts = [Host("a", 16, 32768), Host("b", 16, 32768)]
    busy = VM("busy", 8, 8192)
    cluster = Cluster.of(hosts, [busy], {"busy": "a"})
    decision = place_one(cluster, VM("new", 2, 2048))
    assert decision.host == "b" and decision.feasible_hosts == 2


def test_score_keeps_cpu_and_memory_in_proportion() -> None:
    # Equal peaks after placement; "cpu-heavy" already uses its CPUs, "mem-heavy" its memory.
    hosts = [Host("cpu-heavy", 16, 32768), Host("mem-heavy", 16, 32768)]
    vms = [VM("c", 8, 4096), VM("m", 2, 16384)]
    cluster = Cluster.of(hosts, vms, {"c": "cpu-heavy", "m": "mem-heavy"})
    # A memory-hungry VM belongs where memory is free.
    assert place_one(cluster, VM("new-mem", 1, 8192)).host == "cpu-heavy"
    assert place_one(cluster, VM("new-cpu", 4, 1024)).host == "mem-heavy"


def test_filters_and_rejection_counts() -> None:
    hosts = [
        Host("maint", 64, 65536, {"ssd": "true"}, maintenance=True),
        Host("hdd", 64, 65536, {"ssd": "false"}),
        Host("ssd-full", 4, 8192, {"ssd": "true"}),
        Host("ssd-grouped", 64, 65536, {"ssd": "true"}),
    ]
    sibling = VM("db-1", 1, 1024, anti_affinity="db")
    cluster = Cluster.of(hosts, [sibling], {"db-1": "ssd-grouped"})
    vm = VM("db-2", 8, 8192, {"ssd": "true"}, "db")
    with pytest.raises(NoFeasibleHost) as exc:
        place_one(cluster, vm)
    assert exc.value.context["rejected"] == {"maintenance": 1, "labels": 1, "anti_affinity": 1, "capacity": 1}
    ok = Cluster.of(
        [*hosts, Host("ssd-free", 16, 16384, {"ssd": "true"})], [sibling], {"db-1": "ssd-grouped"}
    )
    assert place_one(ok, vm).host == "ssd-free"


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: Host("h", 0, 1024), "host.vcpus/mem_mib"),
        (lambda: Host("bad name", 1, 1024), "host.name"),
        (lambda: VM("v", 1, -5), "vm.vcpus/mem_mib"),
        (lambda: VM("v", 1, 1024, {"": "x"}), "vm.selector"),
        (lambda: Cluster.of([Host("h", 1, 1), Host("h", 1, 1)]), "host.name"),
        (lambda: Cluster.of([Host("h", 1, 1)], [VM("v", 1, 1)], {"v": "nowhere"}), "assignment"),
        (lambda: DrainLimits(max_parallel=0), "max_parallel"),
    ],
)
def test_bad_input_names_the_field(make: object, field: str) -> None:
    with pytest.raises(PlacementInputError) as exc:
        make()  # type: ignore[operator]
    assert exc.value.context["field"] == field


# -- batches --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_greedy_and_cpsat_respect_every_constraint(seed: int) -> None:
    hosts, vms = random_cluster(seed, 12, 60)
    cluster = Cluster.of(hosts)
    greedy = greedy_place(cluster, vms)
    check_valid(hosts, vms, greedy.assignment)
    cp = cpsat_place(cluster, vms, CpSatLimits(time_limit_s=2))
    check_valid(hosts, vms, cp.assignment)
    assert cp.solver == "cp-sat"
    assert cp.quality.unplaced <= greedy.quality.unplaced
    assert set(cp.assignment) | set(cp.unplaced) == {v.name for v in vms}


def test_cpsat_packs_what_greedy_cannot() -> None:
    # Two 10-vCPU hosts, VMs 5+5+4+3+3 = 20: greedy (largest first, least loaded) leaves a 3 out;
    # the only full packing is {5,5} and {4,3,3}.
    hosts = [Host("a", 10, 65536), Host("b", 10, 65536)]
    vms = [VM("v5a", 5, 1024), VM("v5b", 5, 1024), VM("v4", 4, 1024), VM("v3a", 3, 1024), VM("v3b", 3, 1024)]
    cluster = Cluster.of(hosts)
    greedy = greedy_place(cluster, vms)
    assert greedy.quality.unplaced == 1
    cp = cpsat_place(cluster, vms, CpSatLimits(time_limit_s=5))
    assert cp.solver == "cp-sat" and cp.quality.unplaced == 0 and not cp.unplaced
    check_valid(hosts, vms, cp.assignment)


def test_cpsat_lowers_the_peak_below_greedy() -> None:
    # Greedy puts the 6 first on a 12-vCPU host and then must stack; the optimum spreads 6 | 4+4 | ...
    hosts = [Host("big", 12, 65536), Host("s1", 8, 65536), Host("s2", 8, 65536)]
    vms = [VM("v6", 6, 1024), VM("v4a", 4, 1024), VM("v4b", 4, 1024), VM("v4c", 4, 1024), VM("v2", 2, 1024)]
    cluster = Cluster.of(hosts)
    greedy = greedy_place(cluster, vms)
    cp = cpsat_place(cluster, vms, CpSatLimits(time_limit_s=5))
    check_valid(hosts, vms, cp.assignment)
    assert cp.quality.max_util <= greedy.quality.max_util
    assert cp.quality.max_util == pytest.approx(20 / 28, abs=0.1)  # near the average


def test_model_too_large_falls_back_to_greedy_and_says_so() -> None:
    hosts, vms = random_cluster(1, 6, 20)
    result = cpsat_place(Cluster.of(hosts), vms, CpSatLimits(max_variables=1, full_model_variables=10**6))
    assert result.solver == "greedy"
    assert "model too large" in result.notes[0]
    check_valid(hosts, vms, result.assignment)


def test_windowed_cpsat_never_does_worse_than_greedy() -> None:
    hosts, vms = random_cluster(3, 30, 200)
    cluster = Cluster.of(hosts)
    greedy = greedy_place(cluster, vms)
    cp = cpsat_place(cluster, vms, CpSatLimits(time_limit_s=3, full_model_variables=0, window_hosts=10))
    assert "windows" in cp.notes[0]
    check_valid(hosts, vms, cp.assignment)
    assert cp.quality.max_util <= greedy.quality.max_util + 1e-9
    assert set(cp.assignment) == set(greedy.assignment)


# -- rebalancing ----------------------------------------------------------------------------------


def _lopsided() -> Cluster:
    hosts = [Host("hot", 16, 65536), Host("cold1", 16, 65536), Host("cold2", 16, 65536)]
    vms = [VM(f"v{i}", 3, 4096) for i in range(5)]
    return Cluster.of(hosts, vms, {v.name: "hot" for v in vms})


@pytest.mark.parametrize("solver", ["greedy", "cp-sat"])
def test_rebalance_is_bounded_by_max_moves(solver: str) -> None:
    cluster = _lopsided()

    def run(max_moves: int):  # type: ignore[no-untyped-def]
        if solver == "greedy":
            return greedy_rebalance(cluster, max_moves)
        return cpsat_rebalance(cluster, max_moves, CpSatLimits(time_limit_s=5, move_cost=1))

    assert run(0).moves == []
    one = run(1)
    assert len(one.moves) == 1 and one.moves[0].src == "hot"
    assert one.quality.max_util == pytest.approx(12 / 16)
    free = run(10)
    assert 2 <= len(free.moves) <= 4
    assert free.quality.max_util == pytest.approx(6 / 16)  # 2 + 2 + 1 VMs of 3 vCPU
    check_valid(list(cluster.hosts), list(cluster.vms), free.assignment)
    assert set(free.assignment) == {v.name for v in cluster.vms}


# -- drain ----------------------------------------------------------------------------------------


def test_drain_plan_moves_everything_that_fits() -> None:
    hosts = [Host("src", 32, 65536), Host("d1", 8, 16384), Host("d2", 8, 16384)]
    vms = [VM(f"v{i}", 2, 2048, anti_affinity="g" if i < 3 else None) for i in range(9)]
    vms.append(VM("huge", 16, 4096))
    cluster = Cluster.of(hosts, vms, {v.name: "src" for v in vms})
    plan = plan_drain(cluster, "src")
    moved = {m.vm for m in plan.moves}
    assert "huge" in plan.unplaceable and plan.unplaceable["huge"] == {"maintenance": 1, "capacity": 2}
    assert {v.name for v in vms} - moved == {"huge"} | set(plan.unplaceable)
    after = {**cluster.assignment, **{m.vm: m.dst for m in plan.moves}}
    check_valid(hosts, vms, after)
    assert all(m.src == "src" and m.dst != "src" for m in plan.moves)
    with pytest.raises(PlacementInputError):
        plan_drain(cluster, "nope")


def test_drain_run_bounds_parallelism_and_retries() -> None:
    hosts = [Host("src", 64, 131072), *(Host(f"d{i}", 16, 32768) for i in range(3))]
    vms = [VM(f"v{i}", 2, 2048) for i in range(9)]
    cluster = Cluster.of(hosts, vms, {v.name: "src" for v in vms})
    run = DrainRun(
        plan_drain(cluster, "src"), DrainLimits(max_parallel=2, max_incoming_per_host=1, max_attempts=2)
    )
    assert run.progress.total == 9
    peak_running = 0
    failures_left = {"v0": 2, "v1": 1}  # v0 fails twice (gives up), v1 once (retried)
    while not run.complete:
        started = run.next_moves()
        assert started, "a drain with pending moves and free slots must start something"
        peak_running = max(peak_running, run.progress.running)
        assert len({m.dst for m in started}) == len(started)  # one incoming per destination
        for move in started:
            if failures_left.get(move.vm, 0) > 0:
                failures_left[move.vm] -= 1
                run.finished(move.vm, ok=False, error="destination refused")
            else:
                run.finished(move.vm, ok=True)
    assert peak_running <= 2
    assert run.failed == {"v0": "destination refused"}
    assert run.progress.done == 8 and run.progress.fraction == 1.0
    with pytest.raises(PlacementInputError):
        run.finished("v3", ok=True)
