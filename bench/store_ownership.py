"""Ownership transactions per second: etcd (1 member, 3 members) and SQLite.

    python bench/store_ownership.py [--json] [--repeat 3] [--seconds 5] [--clients 32] [--vms 200]

Each backend starts empty (etcd: real servers on loopback with their own data directories, fsync on;
SQLite: a WAL file in a temporary directory), ``--vms`` VMs are claimed, then ``--clients`` concurrent
clients move ownership of random VMs for ``--seconds``: read the owner, then the compare-and-swap
transaction ``OwnershipRegistry.transfer(vm, owner, other, expect_revision=...)``, exactly as the
orchestrator will. Counted: acknowledged transfers per second, conflicts per second (another client
moved the VM between the read and the write - a correct refusal, not an error), and the latency of a
transfer (read + transaction) at p50/p99. A second figure, ``claims/s``, is the rate of first claims
(one CAS transaction each, no read) during set-up. Medians over repeats; the table shows each etcd
setup as a ratio to SQLite from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from novacron.store import KeyValueStore
from novacron.store.etcd import EtcdStore
from novacron.store.ownership import OwnershipConflict, OwnershipRegistry
from novacron.store.sqlite import SqliteStore
from novacron.testing.etcd import EtcdCluster

NODES = [f"host{i}" for i in range(8)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_once(store: KeyValueStore, args: argparse.Namespace, tag: str) -> dict[str, float]:
    owners = OwnershipRegistry(store)
    vms = [f"{tag}-vm{i:04d}" for i in range(args.vms)]
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(args.clients)

    async def claim(vm: str) -> None:
        async with sem:
            await owners.claim(vm, NODES[0])

    await asyncio.gather(*(claim(vm) for vm in vms))
    claims_s = len(vms) / (time.perf_counter() - t0)

    latencies: list[float] = []
    conflicts = 0
    deadline = time.perf_counter() + args.seconds

    async def client(seed: int) -> None:
        nonlocal conflicts
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            vm = rng.choice(vms)
            started = time.perf_counter()
            current = await owners.require(vm)
            target = rng.choice([n for n in NODES if n != current.node])
            try:
                await owners.transfer(vm, current.node, target, expect_revision=current.revision)
            except OwnershipConflict:
                conflicts += 1
                continue
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(args.clients)))
    elapsed = time.perf_counter() - began
    return {
        "transfers_s": len(latencies) / elapsed,
        "conflicts_s": conflicts / elapsed,
        "p50_ms": percentile(latencies, 0.5) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "claims_s": claims_s,
    }


async def bench_backend(name: str, args: argparse.Namespace) -> list[dict[str, float]]:
    runs = []
    if name == "sqlite":
        with tempfile.TemporaryDirectory(prefix="novacron-bench-") as tmp:
            for r in range(args.repeat):
                store = SqliteStore(Path(tmp) / f"own{r}.db")
                try:
                    runs.append(await run_once(store, args, f"r{r}"))
                finally:
                    await store.close()
        return runs
    size = 1 if name == "etcd-1" else 3
    async with EtcdCluster(size) as cluster:
        for r in range(args.repeat):
            etcd = EtcdStore(cluster.endpoints)
            try:
                runs.append(await run_once(etcd, args, f"r{r}"))
            finally:
                await etcd.close()
    return runs


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"backends": {}, "params": {k: v for k, v in vars(args).items() if k != "json"}}
    for name in ("sqlite", "etcd-1", "etcd-3"):
        runs = await bench_backend(name, args)
        result["backends"][name] = {
            **{k: statistics.median(r[k] for r in runs) for k in runs[0]},
            "runs": runs,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--vms", type=int, default=200)
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"ownership transfers: {args.clients} clients, {args.vms} VMs, {args.seconds:g} s "
        f"(median of {args.repeat})"
    )
    for col in ("backend", "transfers/s", "vs sqlite", "conflicts/s", "p50 ms", "p99 ms", "claims/s"):
        table.add_column(col, justify="right")
    base = result["backends"]["sqlite"]["transfers_s"]
    for name, b in result["backends"].items():
        table.add_row(
            name,
            f"{b['transfers_s']:.0f}",
            f"{b['transfers_s'] / base:.2f}x",
            f"{b['conflicts_s']:.0f}",
            f"{b['p50_ms']:.2f}",
            f"{b['p99_ms']:.2f}",
            f"{b['claims_s']:.0f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
