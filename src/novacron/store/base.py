"""The store interface: an etcd-shaped key-value store with revisions and compare-and-swap.

One global revision counter increases with every write. Each entry records the revision that
created it and the one that last modified it; ``expect_revision`` compares against ``mod_revision``
(0 = the key must not exist). The SQLite backend is the embedded default; the etcd backend implements
the same Protocol.

Leases (as in etcd): a lease is granted with a TTL in whole seconds and lives until it is revoked or
not kept alive for its TTL; keys put with a lease are deleted, in one revision, when it ends. A put
without a lease detaches the key from any lease it had.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from novacron.errors import NovacronError, UserError

MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = (3 << 20) // 2  # etcd's default request limit is 1.5 MiB
MAX_RANGE_RESULTS = 10_000
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops
# etcd raises any shorter TTL to 1.5 election timeouts (2 s with the default 1 s election timeout);
# both backends refuse shorter TTLs instead, so a lease means the same on either.
MIN_LEASE_TTL_S = 2
MAX_LEASE_TTL_S = 24 * 3600
NO_LEASE = 0


class StoreError(NovacronError):
    """The store failed (I/O, corrupt database, backend unreachable)."""


class CasFailed(StoreError):
    """A compare-and-swap did not hold: the key's mod_revision was not what the caller expected."""


class StoreUnavailable(StoreError):
    """The backend could not be reached (every endpoint tried, bounded retries spent)."""


class StoreOutcomeUnknown(StoreUnavailable):
    """A write was sent but the connection failed before its answer: it may or may not have applied.

    Raised instead of retrying a write that is not protected by a compare (retrying could apply it
    twice), and when the retry of a compare-protected write found its compare no longer holding (which
    may be this very write's earlier, unacknowledged success). Callers that tagged their write can
    read it back to decide.
    """


class LeaseNotFound(StoreError):
    """The lease does not exist (never granted, revoked, or expired)."""


class StoreLimitError(UserError):
    """A key, value, range, transaction or lease TTL exceeds the store's limits."""


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int  # number of writes since creation (1 after the first put)
    lease: int = NO_LEASE  # the lease the key is attached to (0: none)


@dataclass(frozen=True)
class Compare:
    """Holds when ``key``'s mod_revision equals ``mod_revision`` (0: the key does not exist)."""

    key: str
    mod_revision: int


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = NO_LEASE  # attach the key to this lease (0: detach from any lease)


@dataclass(frozen=True)
class Delete:
    key: str


Op = Put | Delete


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool  # all compares held (success ops applied) or not (failure ops applied)
    revision: int  # store revision after the transaction


@dataclass(frozen=True)
class Lease:
    id: int
    ttl: int  # granted TTL in seconds


class KeyValueStore(Protocol):
    async def get(self, key: str) -> Entry | None: ...

    async def put(
        self, key: str, value: bytes, *, expect_revision: int | None = None, lease: int = NO_LEASE
    ) -> int:
        """Write ``key``; returns the new revision. Raises CasFailed if ``expect_revision`` does not hold,
        LeaseNotFound if ``lease`` is given and does not exist."""
        ...

    async def delete(self, key: str, *, expect_revision: int | None = None) -> bool:
        """Delete ``key``; False if it did not exist. CasFailed if ``expect_revision`` does not hold."""
        ...

    async def range(self, prefix: str, *, limit: int = MAX_RANGE_RESULTS) -> list[Entry]:
        """Entries whose key starts with ``prefix``, sorted by key."""
        ...

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """Apply ``success`` if every compare holds, else ``failure``, atomically."""
        ...

    async def revision(self) -> int: ...

    async def lease_grant(self, ttl: int) -> Lease:
        """A new lease that ends ``ttl`` seconds from now unless kept alive."""
        ...

    async def lease_keepalive(self, lease_id: int) -> int:
        """Restart the lease's TTL; returns the TTL. LeaseNotFound if it has already ended."""
        ...

    async def lease_revoke(self, lease_id: int) -> None:
        """End the lease now, deleting its keys (one revision). LeaseNotFound if it has already ended."""
        ...

    async def lease_ttl(self, lease_id: int) -> int | None:
        """Remaining whole seconds of the lease, or None if it has ended."""
        ...

    async def close(self) -> None: ...


def check_key(key: str) -> None:
    if not key or len(key.encode()) > MAX_KEY_BYTES:
        raise StoreLimitError("store key must be 1..1024 bytes", key=key[:80])


def check_value(key: str, value: bytes) -> None:
    if len(value) > MAX_VALUE_BYTES:
        raise StoreLimitError("store value too large", key=key, bytes=len(value), limit=MAX_VALUE_BYTES)


def check_ttl(ttl: int) -> None:
    if not MIN_LEASE_TTL_S <= ttl <= MAX_LEASE_TTL_S:
        raise StoreLimitError("lease TTL out of bounds", ttl=ttl, min=MIN_LEASE_TTL_S, max=MAX_LEASE_TTL_S)


def check_txn(compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]) -> None:
    """Limits of a transaction, the same on every backend (etcd refuses a key written twice in a branch)."""
    if len(compares) + len(success) + len(failure) > MAX_TXN_OPS:
        raise StoreLimitError("transaction has too many operations", limit=MAX_TXN_OPS)
    for c in compares:
        check_key(c.key)
    for branch in (success, failure):
        seen: set[str] = set()
        for op in branch:
            check_key(op.key)
            if isinstance(op, Put):
                check_value(op.key, op.value)
            if op.key in seen:
                raise StoreLimitError("transaction writes the same key twice", key=op.key)
            seen.add(op.key)
