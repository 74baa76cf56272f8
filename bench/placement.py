"""ITP placement: 10,000 VMs on 1,000 hosts - greedy time, CP-SAT quality vs greedy within 10 s.

    python bench/placement.py [--json] [--repeat 3] [--hosts 1000] [--vms 10000] [--time-limit 10]
                              [--workers 2] [--seed 7]

Workload (seeded, the same each repeat): hosts of three sizes (32 vCPU/128 GiB, 64/256, 96/512), in
four zones, 40 % with SSDs, 2 % in maintenance; VMs of seven flavours (1 vCPU/2 GiB to 16/64), 20 %
asking for SSD hosts, 10 % pinned to a zone, and 60 anti-affinity groups of 3-5 VMs. All VMs are new
(the hosts start empty).

Measured per repeat: greedy batch placement (wall time; the same filter+score as a single VM),
CP-SAT batch placement (wall time including model building, with the time limit; the greedy answer
is its hint), and one single-VM placement onto the loaded cluster (``place_one``, median of 200).
Quality of an assignment, with a host's utilisation = the larger of its vCPU and memory shares:
``max_util`` (the peak; lower is better - headroom for growth and live migrations), ``stddev_util``
(spread across hosts; lower = more even), ``hosts_used`` and ``unplaced``. ``bound`` is the lowest
peak any assignment could reach (total demand / total capacity of hosts not in maintenance, per
resource). The table shows medians over repeats and CP-SAT/greedy ratios from the same run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

from novacron.dwcp.placement import (
    VM,
    Cluster,
    CpSatLimits,
    Host,
    cpsat_place,
    greedy_place,
    place_one,
)

FLAVOURS = [(1, 2048), (2, 4096), (2, 8192), (4, 8192), (4, 16384), (8, 32768), (16, 65536)]
FLAVOUR_WEIGHTS = [20, 25, 15, 15, 12, 9, 4]
HOST_SIZES = [(32, 131072), (64, 262144), (96, 524288)]
HOST_WEIGHTS = [50, 35, 15]
ZONES = ["z0", "z1", "z2", "z3"]
GROUPS = 60


def workload(hosts: int, vms: int, seed: int) -> tuple[list[Host], list[VM]]:
    rng = random.Random(seed)
    host_list = []
    for i in range(hosts):
        vcpus, mem = rng.choices(HOST_SIZES, HOST_WEIGHTS)[0]
        labels = {"zone": ZONES[i % len(ZONES)]}
        if rng.random() < 0.4:
            labels["ssd"] = "true"
        host_list.append(Host(f"h{i:04d}", vcpus, mem, labels, maintenance=rng.random() < 0.02))
    vm_list = []
    group_sizes = [rng.randint(3, 5) for _ in range(GROUPS)]
    grouped = [(f"g{g}", s) for g, s in enumerate(group_sizes)]
    names_in_groups = iter([g for g, s in grouped for _ in range(s)])
    n_grouped = sum(group_sizes)
    for i in range(vms):
        vcpus, mem = rng.choices(FLAVOURS, FLAVOUR_WEIGHTS)[0]
        r = rng.random()
        selector = {"ssd": "true"} if r < 0.2 else {"zone": rng.choice(ZONES)} if r < 0.3 else {}
        group = next(names_in_groups) if i < n_grouped else None
        if group is not None:
            vcpus, mem, selector = 4, 8192, {}
        vm_list.append(VM(f"vm{i:05d}", vcpus, mem, selector, group))
    return host_list, vm_list


def lower_bound(hosts: list[Host], vms: list[VM]) -> float:
    up = [h for h in hosts if not h.maintenance]
    return max(
        sum(v.vcpus for v in vms) / sum(h.vcpus for h in up),
        sum(v.mem_mib for v in vms) / sum(h.mem_mib for h in up),
    )


def run_once(args: argparse.Namespace) -> dict[str, Any]:
    hosts, vms = workload(args.hosts, args.vms, args.seed)
    cluster = Cluster.of(hosts)
    t0 = time.perf_counter()
    greedy = greedy_place(cluster, vms)
    greedy_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cp = cpsat_place(cluster, vms, CpSatLimits(time_limit_s=args.time_limit, workers=args.workers))
    cp_s = time.perf_counter() - t0
    loaded = Cluster(tuple(hosts), tuple(vms), greedy.assignment)
    probe = VM("probe", 4, 8192, {"ssd": "true"})
    single = []
    for _ in range(200):
        t0 = time.perf_counter()
        place_one(loaded, probe)
        single.append(time.perf_counter() - t0)
    return {
        "greedy": {"seconds": greedy_s, **greedy.quality.as_dict()},
        "cpsat": {"seconds": cp_s, "solver": cp.solver, "notes": cp.notes, **cp.quality.as_dict()},
        "place_one_ms": statistics.median(single) * 1e3,
        "bound": lower_bound(hosts, vms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--vms", type=int, default=10_000)
    parser.add_argument("--time-limit", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    runs = [run_once(args) for _ in range(args.repeat)]

    def med(path: tuple[str, str]) -> float:
        return statistics.median(float(r[path[0]][path[1]]) for r in runs)

    metrics = ("seconds", "max_util", "stddev_util", "mean_util", "hosts_used", "unplaced")
    result: dict[str, Any] = {
        "greedy": {m: med(("greedy", m)) for m in metrics},
        "cpsat": {m: med(("cpsat", m)) for m in metrics},
        "cpsat_solvers": [r["cpsat"]["solver"] for r in runs],
        "cpsat_notes": [r["cpsat"]["notes"] for r in runs],
        "place_one_ms": statistics.median(r["place_one_ms"] for r in runs),
        "bound_max_util": runs[0]["bound"],
        "runs": runs,
        "params": {k: v for k, v in vars(args).items() if k != "json"},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"placement: {args.vms} VMs on {args.hosts} hosts (median of {args.repeat})")
    for col in ("metric", "greedy", "cp-sat", "cp-sat / greedy"):
        table.add_column(col, justify="right")
    for m in metrics:
        g, c = result["greedy"][m], result["cpsat"][m]
        ratio = f"{c / g:.3f}" if g else "-"
        table.add_row(m, f"{g:.4f}", f"{c:.4f}", ratio)
    table.add_row("bound (max_util)", f"{result['bound_max_util']:.4f}", "", "")
    table.add_row("place_one (ms)", f"{result['place_one_ms']:.3f}", "", "")
    Console().print(table)
    Console().print(f"cp-sat solvers: {result['cpsat_solvers']}; notes: {result['cpsat_notes']}")


if __name__ == "__main__":
    main()
