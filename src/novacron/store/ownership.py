"""The single owner of each VM, and migration locks, as compare-and-swap transactions and leases.

Ownership lives in one key per VM (``/novacron/owners/<vm>``), so at any revision a VM has at most one
owner by construction; what needs care is *changing* it. Every change is a transaction comparing the
owner key's mod_revision with the one its caller read, so of several concurrent transfers of the same
VM from the same state exactly one succeeds. Each record carries an ``epoch`` (1 at the first claim,
+1 per transfer) and the ``op_id`` of the operation that wrote it, which lets a caller whose answer
was lost (StoreOutcomeUnknown) read back whether its own write is the one that landed.

A migration lock (``/novacron/locks/migration/<vm>``) is a key attached to a lease: it disappears when
its holder stops keeping the lease alive (crash, partition). ``transfer(..., lock=...)`` also compares
the lock key, so a migration whose lock has expired, and perhaps been taken by another, cannot move
ownership.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from novacron.errors import ConflictError, NotFoundError, NovacronError, UserError
from novacron.observability.log import log_event
from novacron.store.base import (
    MIN_LEASE_TTL_S,
    Compare,
    Delete,
    KeyValueStore,
    LeaseNotFound,
    Put,
    StoreError,
    StoreOutcomeUnknown,
    check_ttl,
)

OWNER_PREFIX = "/novacron/owners/"
LOCK_PREFIX = "/novacron/locks/migration/"
DEFAULT_LOCK_TTL_S = 15  # a lock outlives a holder's crash by at most this long
KEEPALIVES_PER_TTL = 3  # the holder refreshes its lease this many times per TTL
MAX_NAME_LEN = 253  # VM and node names: DNS-name length, no '/'

log = logging.getLogger(__name__)


class OwnershipConflict(ConflictError):
    """The VM's owner (or its revision) is not what the caller expected: someone else changed it."""


class NotOwned(NotFoundError):
    """The VM has no owner record."""


class MigrationLockHeld(ConflictError):
    """Another migration holds the VM's migration lock."""


class MigrationLockLost(NovacronError):
    """The migration lock's lease ended (not kept alive in time) or the lock was taken over."""


class OwnershipNameError(UserError):
    """A VM or node name is empty, too long or contains '/'."""


def _check_name(kind: str, name: str) -> None:
    if not name or len(name) > MAX_NAME_LEN or "/" in name:
        raise OwnershipNameError(f"invalid {kind} name", **{kind: name[:80]})


class Ownership(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    vm: str
    node: str
    epoch: int = Field(ge=1)
    op_id: str
    since: float
    revision: int = Field(default=0, exclude=True)  # the owner key's mod_revision when read


class LockRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    vm: str
    holder: str
    lock_id: str
    ttl: int
    acquired_at: float


def owner_key(vm: str) -> str:
    return OWNER_PREFIX + vm


def lock_key(vm: str) -> str:
    return LOCK_PREFIX + vm


def _decode_owner(value: bytes, revision: int, key: str) -> Ownership:
    try:
        record = Ownership.model_validate_json(value)
    except ValidationError as exc:
        raise StoreError(
            "corrupt ownership record", key=key, reason=str(exc.errors()[0].get("msg"))
        ) from None
    return record.model_copy(update={"revision": revision})


class OwnershipRegistry:
    """Who owns (runs, answers for) each VM. Pass ``with_puts`` to ``claim`` to create related records
    (e.g. the VM's inventory record) in the same transaction."""

    def __init__(self, store: KeyValueStore) -> None:
        self.store = store

    async def get(self, vm: str) -> Ownership | None:
        _check_name("vm", vm)
        entry = await self.store.get(owner_key(vm))
        return None if entry is None else _decode_owner(entry.value, entry.mod_revision, entry.key)

    async def require(self, vm: str) -> Ownership:
        current = await self.get(vm)
        if current is None:
            raise NotOwned(f"VM {vm!r} has no owner", vm=vm)
        return current

    async def list(self) -> list[Ownership]:
        return [_decode_owner(e.value, e.mod_revision, e.key) for e in await self.store.range(OWNER_PREFIX)]

    async def claim(self, vm: str, node: str, *, with_puts: Sequence[Put] = ()) -> Ownership:
        """Make ``node`` the first owner of ``vm``; ``with_puts`` keys must not exist either."""
        _check_name("vm", vm)
        _check_name("node", node)
        record = Ownership(vm=vm, node=node, epoch=1, op_id=uuid.uuid4().hex, since=time.time())
        key = owner_key(vm)
        puts = [Put(key, record.model_dump_json().encode()), *with_puts]
        compares = [Compare(p.key, 0) for p in puts]
        try:
            result = await self.store.txn(compares, puts)
        except StoreOutcomeUnknown:
            landed = await self.get(vm)
            if landed is not None and landed.op_id == record.op_id:
                return landed
            raise
        if not result.succeeded:
            current = await self.get(vm)
            if current is not None:
                raise OwnershipConflict(
                    f"VM {vm!r} is already owned", vm=vm, owner=current.node, epoch=current.epoch
                )
            raise OwnershipConflict("a record created with the claim already exists", vm=vm)
        return record.model_copy(update={"revision": result.revision})

    async def transfer(
        self,
        vm: str,
        from_node: str,
        to_node: str,
        *,
        expect_revision: int | None = None,
        lock: MigrationLock | None = None,
    ) -> Ownership:
        """Move ownership from ``from_node`` to ``to_node``, atomically.

        Fails with OwnershipConflict if the owner is not ``from_node`` (or its record is not at
        ``expect_revision``, when given) at the moment of the write, and with MigrationLockLost if
        ``lock`` is given and no longer held. Never retries on conflict: the caller decided to move
        the VM from a state that no longer exists."""
        _check_name("node", to_node)
        if lock is not None and lock.vm != vm:
            raise OwnershipNameError("the migration lock is for another VM", vm=vm, lock_vm=lock.vm)
        current = await self.require(vm)
        if current.node != from_node:
            raise OwnershipConflict(
                f"VM {vm!r} is not owned by {from_node!r}", vm=vm, expected=from_node, owner=current.node
            )
        if expect_revision is not None and current.revision != expect_revision:
            raise OwnershipConflict(
                f"VM {vm!r} ownership changed since it was read",
                vm=vm,
                expected_revision=expect_revision,
                revision=current.revision,
            )
        record = Ownership(
            vm=vm, node=to_node, epoch=current.epoch + 1, op_id=uuid.uuid4().hex, since=time.time()
        )
        compares = [Compare(owner_key(vm), current.revision)]
        if lock is not None:
            compares.append(Compare(lock_key(vm), lock.revision))
        try:
            result = await self.store.txn(compares, [Put(owner_key(vm), record.model_dump_json().encode())])
        except StoreOutcomeUnknown:
            return await self._resolve_unknown(record)
        if result.succeeded:
            log_event(log, "ownership.transferred", vm=vm, src=from_node, dst=to_node, epoch=record.epoch)
            return record.model_copy(update={"revision": result.revision})
        if lock is not None and not await lock.still_held():
            raise MigrationLockLost("migration lock lost before the ownership transfer", vm=vm)
        now = await self.get(vm)
        raise OwnershipConflict(
            f"VM {vm!r} ownership changed concurrently",
            vm=vm,
            expected=from_node,
            owner=None if now is None else now.node,
            epoch=None if now is None else now.epoch,
        )

    async def _resolve_unknown(self, record: Ownership) -> Ownership:
        """After a lost answer: our write landed iff the record carries our op_id; another record of
        the same epoch means another transfer won that step (ours compared the older revision)."""
        landed = await self.get(record.vm)
        if landed is not None and landed.op_id == record.op_id:
            return landed
        if landed is not None and landed.epoch == record.epoch:
            raise OwnershipConflict(
                f"VM {record.vm!r} ownership changed concurrently", vm=record.vm, owner=landed.node
            )
        raise StoreOutcomeUnknown("ownership transfer outcome unknown", vm=record.vm, epoch=record.epoch)

    async def release(self, vm: str, node: str, *, expect_revision: int | None = None) -> None:
        """Forget the owner (the VM is gone). Only its owner may release it."""
        current = await self.require(vm)
        if current.node != node or (expect_revision is not None and current.revision != expect_revision):
            raise OwnershipConflict(
                f"VM {vm!r} is not owned by {node!r} at that revision", vm=vm, owner=current.node
            )
        result = await self.store.txn([Compare(owner_key(vm), current.revision)], [Delete(owner_key(vm))])
        if not result.succeeded:
            raise OwnershipConflict(f"VM {vm!r} ownership changed concurrently", vm=vm)


@dataclass
class MigrationLock:
    """A held migration lock. ``revision`` is the lock key's mod_revision, compared by transfers."""

    store: KeyValueStore
    vm: str
    holder: str
    lock_id: str
    lease_id: int
    ttl: int
    revision: int
    lost: asyncio.Event = field(default_factory=asyncio.Event)

    async def refresh(self) -> None:
        """Keep the lease alive; MigrationLockLost if it has already ended."""
        try:
            await self.store.lease_keepalive(self.lease_id)
        except LeaseNotFound:
            self.lost.set()
            raise MigrationLockLost("migration lock lease ended", vm=self.vm, holder=self.holder) from None

    async def still_held(self) -> bool:
        entry = await self.store.get(lock_key(self.vm))
        held = entry is not None and entry.mod_revision == self.revision and entry.lease == self.lease_id
        if not held:
            self.lost.set()
        return held

    async def release(self) -> None:
        """Give the lock up (revoking the lease deletes the key). Releasing a lost lock is a no-op."""
        with contextlib.suppress(LeaseNotFound):
            await self.store.lease_revoke(self.lease_id)


class MigrationLocks:
    """At most one migration of a VM at a time, with crash safety from leases."""

    def __init__(self, store: KeyValueStore, *, ttl: int = DEFAULT_LOCK_TTL_S) -> None:
        check_ttl(ttl)
        self.store = store
        self.ttl = ttl

    async def holder(self, vm: str) -> LockRecord | None:
        _check_name("vm", vm)
        entry = await self.store.get(lock_key(vm))
        if entry is None:
            return None
        try:
            return LockRecord.model_validate_json(entry.value)
        except ValidationError as exc:
            raise StoreError("corrupt migration lock record", key=entry.key, reason=str(exc)) from None

    async def acquire(self, vm: str, holder: str, ttl: int | None = None) -> MigrationLock:
        """Take the VM's migration lock for ``holder`` or raise MigrationLockHeld."""
        _check_name("vm", vm)
        _check_name("node", holder)
        ttl = self.ttl if ttl is None else ttl
        check_ttl(ttl)
        lease = await self.store.lease_grant(ttl)
        record = LockRecord(vm=vm, holder=holder, lock_id=uuid.uuid4().hex, ttl=ttl, acquired_at=time.time())
        key = lock_key(vm)
        try:
            result = await self.store.txn(
                [Compare(key, 0)], [Put(key, record.model_dump_json().encode(), lease.id)]
            )
        except StoreOutcomeUnknown:
            entry = await self.store.get(key)
            if entry is not None and entry.lease == lease.id:
                return MigrationLock(
                    self.store, vm, holder, record.lock_id, lease.id, ttl, entry.mod_revision
                )
            await self._drop_lease(lease.id)
            raise
        except BaseException:
            await self._drop_lease(lease.id)
            raise
        if not result.succeeded:
            await self._drop_lease(lease.id)
            current = await self.holder(vm)
            raise MigrationLockHeld(
                f"VM {vm!r} is being migrated by another holder",
                vm=vm,
                holder=None if current is None else current.holder,
            )
        log_event(log, "migration_lock.acquired", vm=vm, holder=holder, ttl=ttl)
        return MigrationLock(self.store, vm, holder, record.lock_id, lease.id, ttl, result.revision)

    async def _drop_lease(self, lease_id: int) -> None:
        with contextlib.suppress(StoreError):
            await self.store.lease_revoke(lease_id)

    @contextlib.asynccontextmanager
    async def hold(self, vm: str, holder: str, ttl: int | None = None) -> AsyncIterator[MigrationLock]:
        """Acquire the lock, keep it alive while the block runs, release it afterwards. If a refresh
        fails, ``lock.lost`` is set (and a later ``transfer(lock=...)`` will refuse)."""
        lock = await self.acquire(vm, holder, ttl)
        keeper = asyncio.create_task(_keep_alive(lock))
        try:
            yield lock
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            await lock.release()


async def _keep_alive(lock: MigrationLock) -> None:
    period = max(lock.ttl / KEEPALIVES_PER_TTL, MIN_LEASE_TTL_S / KEEPALIVES_PER_TTL)
    while not lock.lost.is_set():
        await asyncio.sleep(period)  # a refresh period, not synchronisation
        try:
            await lock.refresh()
        except MigrationLockLost:
            log_event(log, "migration_lock.lost", logging.WARNING, vm=lock.vm, holder=lock.holder)
            return
        except StoreError as exc:
            # The store may come back before the TTL runs out: keep trying until the lease is gone.
            log_event(log, "migration_lock.refresh_failed", logging.WARNING, vm=lock.vm, error=str(exc))
