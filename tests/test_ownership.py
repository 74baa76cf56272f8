"""VM ownership and migration locks, on SQLite and on a real etcd server (same suite, same answers)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from novacron.store import KeyValueStore, Put
from novacron.store.etcd import EtcdStore
from novacron.store.inventory import VM_PREFIX, Inventory, VMRecord
from novacron.store.ownership import (
    MigrationLockHeld,
    MigrationLockLost,
    MigrationLocks,
    NotOwned,
    OwnershipConflict,
    OwnershipNameError,
    OwnershipRegistry,
    lock_key,
)
from novacron.store.sqlite import SqliteStore
from novacron.testing.etcd import LazyEtcdCluster, ManualClock, wait_for_delete

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Env:
    store: KeyValueStore
    owners: OwnershipRegistry
    locks: MigrationLocks
    expire: Callable[[str, int, int], Awaitable[None]]  # let the lease of ``key`` run out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lazy_etcd() -> AsyncIterator[LazyEtcdCluster]:
    lazy = LazyEtcdCluster(1)
    yield lazy
    await lazy.stop()


@pytest_asyncio.fixture(loop_scope="module", params=["sqlite", pytest.param("etcd", marks=pytest.mark.etcd)])
async def env(
    request: pytest.FixtureRequest, tmp_path: Path, lazy_etcd: LazyEtcdCluster
) -> AsyncIterator[Env]:
    store: KeyValueStore
    if request.param == "sqlite":
        clock = ManualClock()
        store = SqliteStore(tmp_path / "store.db", clock=clock)

        async def expire(key: str, revision: int, ttl: int) -> None:
            clock.advance(ttl)
    else:
        cluster = await lazy_etcd.get()
        store = EtcdStore(cluster.endpoints)

        async def expire(key: str, revision: int, ttl: int) -> None:
            await wait_for_delete(cluster.endpoints[0], key, revision, timeout_s=ttl + 10)

    yield Env(store, OwnershipRegistry(store), MigrationLocks(store, ttl=5), expire)
    await store.close()


@pytest.fixture
def vm() -> str:
    return f"vm-{uuid.uuid4().hex[:8]}"


async def test_claim_then_transfer_chain(env: Env, vm: str) -> None:
    first = await env.owners.claim(vm, "n1")
    assert (first.node, first.epoch) == ("n1", 1) and first.revision > 0
    assert await env.owners.get(vm) == first
    second = await env.owners.transfer(vm, "n1", "n2")
    assert (second.node, second.epoch) == ("n2", 2) and second.revision > first.revision
    third = await env.owners.transfer(vm, "n2", "n3", expect_revision=second.revision)
    assert (third.node, third.epoch) == ("n3", 3)
    assert await env.owners.require(vm) == third


async def test_claim_twice_is_a_conflict(env: Env, vm: str) -> None:
    await env.owners.claim(vm, "n1")
    with pytest.raises(OwnershipConflict) as exc:
        await env.owners.claim(vm, "n2")
    assert exc.value.context["owner"] == "n1"
    assert (await env.owners.require(vm)).node == "n1"


async def test_transfer_refuses_a_stale_view(env: Env, vm: str) -> None:
    with pytest.raises(NotOwned):
        await env.owners.transfer(vm, "n1", "n2")
    first = await env.owners.claim(vm, "n1")
    with pytest.raises(OwnershipConflict) as exc:
        await env.owners.transfer(vm, "n9", "n2")
    assert exc.value.context == {"vm": vm, "expected": "n9", "owner": "n1"}
    await env.owners.transfer(vm, "n1", "n2")
    with pytest.raises(OwnershipConflict):  # the revision the caller read is gone
        await env.owners.transfer(vm, "n2", "n3", expect_revision=first.revision)
    assert (await env.owners.require(vm)).node == "n2"


async def test_claim_creates_related_records_atomically(env: Env, vm: str) -> None:
    record = VMRecord(name=vm, spec={"name": vm}, node="n1")
    inv_put = Put(VM_PREFIX + vm, record.model_dump_json().encode())
    await env.owners.claim(vm, "n1", with_puts=[inv_put])
    assert (await Inventory(env.store).get(vm)).node == "n1"
    # An existing record blocks the claim, and the claim leaves nothing behind.
    other = f"{vm}-b"
    await Inventory(env.store).create(VMRecord(name=other, spec={}, node="n1"))
    with pytest.raises(OwnershipConflict):
        await env.owners.claim(other, "n2", with_puts=[Put(VM_PREFIX + other, b"{}")])
    assert await env.owners.get(other) is None


async def test_release_only_by_owner(env: Env, vm: str) -> None:
    await env.owners.claim(vm, "n1")
    with pytest.raises(OwnershipConflict):
        await env.owners.release(vm, "n2")
    await env.owners.release(vm, "n1")
    assert await env.owners.get(vm) is None
    assert vm not in [o.vm for o in await env.owners.list()]


async def test_bad_names_are_refused(env: Env) -> None:
    with pytest.raises(OwnershipNameError):
        await env.owners.claim("a/b", "n1")
    with pytest.raises(OwnershipNameError):
        await env.owners.claim("ok", "")
    with pytest.raises(OwnershipNameError):
        await env.locks.acquire("x" * 300, "n1")


async def test_lock_is_exclusive_and_released(env: Env, vm: str) -> None:
    lock = await env.locks.acquire(vm, "mig-a")
    with pytest.raises(MigrationLockHeld) as exc:
        await env.locks.acquire(vm, "mig-b")
    assert exc.value.context["holder"] == "mig-a"
    holder = await env.locks.holder(vm)
    assert holder is not None and holder.holder == "mig-a" and holder.ttl == 5
    await lock.refresh()
    assert await lock.still_held()
    await lock.release()
    assert await env.locks.holder(vm) is None
    await lock.release()  # releasing twice is harmless
    again = await env.locks.acquire(vm, "mig-b")
    await again.release()


async def test_transfer_under_a_lock(env: Env, vm: str) -> None:
    await env.owners.claim(vm, "n1")
    async with env.locks.hold(vm, "mig-a") as lock:
        moved = await env.owners.transfer(vm, "n1", "n2", lock=lock)
        assert moved.node == "n2"
    assert await env.locks.holder(vm) is None  # hold() released it


async def test_transfer_with_a_revoked_lock_is_refused(env: Env, vm: str) -> None:
    await env.owners.claim(vm, "n1")
    lock = await env.locks.acquire(vm, "mig-a")
    await env.store.lease_revoke(lock.lease_id)  # as if the lease ran out
    with pytest.raises(MigrationLockLost):
        await env.owners.transfer(vm, "n1", "n2", lock=lock)
    assert (await env.owners.require(vm)).node == "n1"
    assert lock.lost.is_set()


async def test_expired_lock_frees_the_vm_and_fences_the_old_holder(env: Env, vm: str) -> None:
    await env.owners.claim(vm, "n1")
    stale = await env.locks.acquire(vm, "crashed", ttl=2)
    await env.expire(lock_key(vm), stale.revision, 2)
    with pytest.raises(MigrationLockLost):
        await stale.refresh()
    fresh = await env.locks.acquire(vm, "mig-b")
    # The old holder comes back: its lock revision no longer matches, so it cannot move the VM.
    with pytest.raises(MigrationLockLost):
        await env.owners.transfer(vm, "n1", "n3", lock=stale)
    assert (await env.owners.transfer(vm, "n1", "n2", lock=fresh)).node == "n2"
    await fresh.release()
