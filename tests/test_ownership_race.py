"""Many concurrent "migrations" of the same VM race to take ownership: never two owners.

Each racer reads the owner, picks another node and tries to move the VM there, half of them under the
migration lock, half with a bare compare on the revision they read. The acknowledged transfers must
form one chain (epoch 2, 3, ... each starting where the previous ended, no epoch won twice). On etcd
the owner key's full MVCC history is read back: every version must be exactly one acknowledged
transfer, in order, so no revision ever held an owner that its writer was not told about, and no
acknowledged transfer was overwritten unseen.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from novacron.store import KeyValueStore
from novacron.store.etcd import EtcdStore
from novacron.store.ownership import (
    MigrationLockHeld,
    MigrationLockLost,
    MigrationLocks,
    Ownership,
    OwnershipConflict,
    OwnershipRegistry,
    owner_key,
)
from novacron.store.sqlite import SqliteStore
from novacron.testing.etcd import LazyEtcdCluster

pytestmark = pytest.mark.asyncio(loop_scope="module")

RACERS = 24
ROUNDS = 8
NODES = [f"n{i}" for i in range(5)]


@dataclass
class Outcome:
    acked: list[tuple[str, Ownership]]  # (from_node, new record)
    conflicts: int
    lock_refusals: int


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lazy_etcd() -> AsyncIterator[LazyEtcdCluster]:
    lazy = LazyEtcdCluster(3)
    yield lazy
    await lazy.stop()


@pytest_asyncio.fixture(loop_scope="module", params=["sqlite", pytest.param("etcd", marks=pytest.mark.etcd)])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, lazy_etcd: LazyEtcdCluster
) -> AsyncIterator[KeyValueStore]:
    s: KeyValueStore
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "race.db")
    else:
        s = EtcdStore((await lazy_etcd.get()).endpoints)
    yield s
    await s.close()


async def _race(store: KeyValueStore, vm: str) -> Outcome:
    owners, locks = OwnershipRegistry(store), MigrationLocks(store, ttl=10)
    out = Outcome([], 0, 0)
    start = asyncio.Event()

    async def racer(i: int) -> None:
        rng = random.Random(i)
        await start.wait()
        for _ in range(ROUNDS):
            current = await owners.require(vm)
            target = rng.choice([n for n in NODES if n != current.node])
            try:
                if i % 2:
                    async with locks.hold(vm, f"mig-{i}") as lock:
                        moved = await owners.transfer(vm, current.node, target, lock=lock)
                else:
                    moved = await owners.transfer(vm, current.node, target, expect_revision=current.revision)
            except (OwnershipConflict, MigrationLockLost):
                out.conflicts += 1
                continue
            except MigrationLockHeld:
                out.lock_refusals += 1
                continue
            out.acked.append((current.node, moved))

    tasks = [asyncio.create_task(racer(i)) for i in range(RACERS)]
    start.set()
    await asyncio.gather(*tasks)
    return out


async def test_concurrent_migrations_never_make_two_owners(store: KeyValueStore) -> None:
    vm = "contested"
    owners = OwnershipRegistry(store)
    first = await owners.claim(vm, NODES[0])
    out = await _race(store, vm)

    assert out.acked, "no racer ever won: the race did not happen"
    assert out.conflicts > 0, "no racer ever lost: the racers did not overlap"
    chain = sorted(out.acked, key=lambda a: a[1].epoch)
    epochs = [rec.epoch for _, rec in chain]
    assert epochs == list(range(2, 2 + len(chain))), "an epoch was won twice or skipped"
    previous = first
    for src, rec in chain:
        assert src == previous.node, f"epoch {rec.epoch} moved the VM from a node that did not own it"
        assert rec.revision > previous.revision
        previous = rec
    final = await owners.require(vm)
    assert final == previous

    if isinstance(store, EtcdStore):
        history = await store.history(owner_key(vm))
        versions = [Ownership.model_validate_json(e.value) for e in history]
        assert [v.op_id for v in versions] == [first.op_id] + [rec.op_id for _, rec in chain]
        assert [e.mod_revision for e in history] == [first.revision] + [rec.revision for _, rec in chain]
