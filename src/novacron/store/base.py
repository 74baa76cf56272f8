"""The store interface: an etcd-shaped key-value store with revisions and compare-and-swap.

One global revision counter increases with every write. Each entry records the revision that
created it and the one that last modified it; ``expect_revision`` compares against ``mod_revision``
(0 = the key must not exist). The SQLite backend is the embedded default; an etcd backend implements
the same Protocol.
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


class StoreError(NovacronError):
    """The store failed (I/O, corrupt database, backend unreachable)."""


class CasFailed(StoreError):
    """A compare-and-swap did not hold: the key's mod_revision was not what the caller expected."""


class StoreLimitError(UserError):
    """A key, value, range or transaction exceeds the store's limits."""


@dataclass(frozen=True)
class Entry:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int  # number of writes since creation (1 after the first put)


@dataclass(frozen=True)
class Compare:
    """Holds when ``key``'s mod_revision equals ``mod_revision`` (0: the key does not exist)."""

    key: str
    mod_revision: int


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes


@dataclass(frozen=True)
class Delete:
    key: str


Op = Put | Delete


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool  # all compares held (success ops applied) or not (failure ops applied)
    revision: int  # store revision after the transaction


class KeyValueStore(Protocol):
    async def get(self, key: str) -> Entry | None: ...

    async def put(self, key: str, value: bytes, *, expect_revision: int | None = None) -> int:
        """Write ``key``; returns the new revision. Raises CasFailed if ``expect_revision`` does not hold."""
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

    async def close(self) -> None: ...


def check_key(key: str) -> None:
    if not key or len(key.encode()) > MAX_KEY_BYTES:
        raise StoreLimitError("store key must be 1..1024 bytes", key=key[:80])


def check_value(key: str, value: bytes) -> None:
    if len(value) > MAX_VALUE_BYTES:
        raise StoreLimitError("store value too large", key=key, bytes=len(value), limit=MAX_VALUE_BYTES)
