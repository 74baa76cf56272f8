"""SQLite backend of the store (WAL mode; one global revision counter in the ``meta`` table).

Each operation runs in its own ``BEGIN IMMEDIATE`` transaction, so several processes (CLI, agent,
tests) can share one database file safely. Calls run in a worker thread; a lock serialises them.

Leases live in the ``leases`` table with an absolute expiry time from ``clock`` (wall-clock seconds by
default, so every process sharing the file agrees; tests inject their own). There is no timer: every
operation first ends the leases whose time has passed, deleting their keys in one revision per lease,
so no caller can observe a key whose lease has ended.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from novacron.store.base import (
    MAX_RANGE_RESULTS,
    NO_LEASE,
    CasFailed,
    Compare,
    Delete,
    Entry,
    Lease,
    LeaseNotFound,
    Op,
    Put,
    StoreError,
    StoreLimitError,
    TxnResult,
    check_key,
    check_ttl,
    check_txn,
    check_value,
)

BUSY_TIMEOUT_S = 10.0
SCHEMA_VERSION = 2
LEASE_ID_BITS = 62  # random ids, positive in SQLite's signed 64-bit integers and in etcd's int64

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    version INTEGER NOT NULL,
    lease INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0), ('schema', 2);
"""

# Version 1 had no leases: add the column and table (idempotent parts run on every open).
_SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY,
    ttl INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_expiry ON leases (expires_at);
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease != 0;
"""


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _migrate(db: sqlite3.Connection) -> int:
    db.execute("BEGIN IMMEDIATE")
    try:
        schema = int(db.execute("SELECT value FROM meta WHERE name='schema'").fetchone()[0])
        if schema == 1:
            db.execute("ALTER TABLE kv ADD COLUMN lease INTEGER NOT NULL DEFAULT 0")
            db.execute("UPDATE meta SET value = 2 WHERE name = 'schema'")
            schema = 2
        if schema == SCHEMA_VERSION:
            for statement in _SCHEMA_V2.split(";"):
                if statement.strip():
                    db.execute(statement)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return schema


class SqliteStore:
    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            schema = _migrate(self._db)
        except sqlite3.Error as exc:
            raise StoreError("cannot open the store database", path=str(path), reason=str(exc)) from None
        if schema != SCHEMA_VERSION:
            raise StoreError("store database has an unknown schema", path=str(path), schema=schema)
        self._lock = threading.Lock()
        self._closed = False

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def work() -> T:
            with self._lock:
                if self._closed:
                    raise StoreError("store is closed", path=str(self.path))
                return fn(self._db)

        try:
            return await asyncio.to_thread(work)
        except sqlite3.Error as exc:
            raise StoreError("store operation failed", path=str(self.path), reason=str(exc)) from None

    @staticmethod
    def _entry(row: tuple[str, bytes, int, int, int, int]) -> Entry:
        return Entry(
            key=row[0],
            value=bytes(row[1]),
            create_revision=row[2],
            mod_revision=row[3],
            version=row[4],
            lease=row[5],
        )

    @staticmethod
    def _get(db: sqlite3.Connection, key: str) -> Entry | None:
        row = db.execute(
            "SELECT key, value, create_revision, mod_revision, version, lease FROM kv WHERE key = ?",
            (key,),
        ).fetchone()
        return None if row is None else SqliteStore._entry(row)

    @staticmethod
    def _mod_revision(db: sqlite3.Connection, key: str) -> int:
        row = db.execute("SELECT mod_revision FROM kv WHERE key = ?", (key,)).fetchone()
        return 0 if row is None else int(row[0])

    @staticmethod
    def _bump(db: sqlite3.Connection) -> int:
        db.execute("UPDATE meta SET value = value + 1 WHERE name = 'revision'")
        return int(db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0])

    @staticmethod
    def _current(db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0])

    @staticmethod
    def _apply(db: sqlite3.Connection, ops: Sequence[Op], rev: int) -> None:
        for op in ops:
            if isinstance(op, Put):
                db.execute(
                    "INSERT INTO kv (key, value, create_revision, mod_revision, version, lease) "
                    "VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value, "
                    "mod_revision = excluded.mod_revision, version = kv.version + 1, "
                    "lease = excluded.lease",
                    (op.key, op.value, rev, rev, op.lease),
                )
            else:
                db.execute("DELETE FROM kv WHERE key = ?", (op.key,))

    @staticmethod
    def _check_leases(db: sqlite3.Connection, ops: Sequence[Op]) -> None:
        for op in ops:
            if not isinstance(op, Put) or op.lease == NO_LEASE:
                continue
            if db.execute("SELECT 1 FROM leases WHERE id = ?", (op.lease,)).fetchone() is None:
                raise LeaseNotFound("lease not found", lease=op.lease, key=op.key)

    @staticmethod
    def _end_lease(db: sqlite3.Connection, lease_id: int) -> None:
        """Delete the lease and its keys; the keys go in one new revision (none if it had no keys)."""
        db.execute("DELETE FROM leases WHERE id = ?", (lease_id,))
        if db.execute("SELECT 1 FROM kv WHERE lease = ? LIMIT 1", (lease_id,)).fetchone() is not None:
            SqliteStore._bump(db)
            db.execute("DELETE FROM kv WHERE lease = ?", (lease_id,))

    def _expire(self, db: sqlite3.Connection) -> None:
        """End every lease whose time has passed (call inside a write transaction)."""
        now = self._clock()
        due = db.execute("SELECT id FROM leases WHERE expires_at <= ? ORDER BY expires_at", (now,))
        for (lease_id,) in due.fetchall():
            self._end_lease(db, int(lease_id))

    def _expire_if_due(self, db: sqlite3.Connection) -> None:
        """Before a read: end due leases in a write transaction, only if there are any."""
        due = db.execute("SELECT 1 FROM leases WHERE expires_at <= ? LIMIT 1", (self._clock(),))
        if due.fetchone() is not None:
            self._in_txn(db, lambda: self._expire(db))

    def _write(self, db: sqlite3.Connection, body: Callable[[], T]) -> T:
        """Run ``body`` in a write transaction after ending due leases."""

        def inner() -> T:
            self._expire(db)
            return body()

        return self._in_txn(db, inner)

    def _read(self, db: sqlite3.Connection, body: Callable[[], T]) -> T:
        self._expire_if_due(db)
        return body()

    @staticmethod
    def _in_txn(db: sqlite3.Connection, body: Callable[[], T]) -> T:
        db.execute("BEGIN IMMEDIATE")
        try:
            result = body()
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    async def get(self, key: str) -> Entry | None:
        check_key(key)
        return await self._run(lambda db: self._read(db, lambda: self._get(db, key)))

    async def put(
        self, key: str, value: bytes, *, expect_revision: int | None = None, lease: int = NO_LEASE
    ) -> int:
        check_key(key)
        check_value(key, value)
        op = Put(key, value, lease)

        def body(db: sqlite3.Connection) -> int:
            def inner() -> int:
                if expect_revision is not None:
                    actual = self._mod_revision(db, key)
                    if actual != expect_revision:
                        raise CasFailed(
                            "compare-and-swap failed", key=key, expected=expect_revision, actual=actual
                        )
                self._check_leases(db, [op])
                rev = self._bump(db)
                self._apply(db, [op], rev)
                return rev

            return self._write(db, inner)

        return await self._run(body)

    async def delete(self, key: str, *, expect_revision: int | None = None) -> bool:
        check_key(key)

        def body(db: sqlite3.Connection) -> bool:
            def inner() -> bool:
                actual = self._mod_revision(db, key)
                if expect_revision is not None and actual != expect_revision:
                    raise CasFailed(
                        "compare-and-swap failed", key=key, expected=expect_revision, actual=actual
                    )
                if actual == 0:
                    return False
                self._apply(db, [Delete(key)], self._bump(db))
                return True

            return self._write(db, inner)

        return await self._run(body)

    async def range(self, prefix: str, *, limit: int = MAX_RANGE_RESULTS) -> list[Entry]:
        if not 1 <= limit <= MAX_RANGE_RESULTS:
            raise StoreLimitError("range limit out of bounds", limit=limit, max=MAX_RANGE_RESULTS)

        def body(db: sqlite3.Connection) -> list[Entry]:
            self._expire_if_due(db)
            rows = db.execute(
                "SELECT key, value, create_revision, mod_revision, version, lease FROM kv "
                "WHERE key LIKE ? ESCAPE '\\' AND substr(key, 1, ?) = ? ORDER BY key LIMIT ?",
                (_like_prefix(prefix), len(prefix), prefix, limit),
            ).fetchall()
            return [self._entry(r) for r in rows]

        return await self._run(body)

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        check_txn(compares, success, failure)

        def body(db: sqlite3.Connection) -> TxnResult:
            def inner() -> TxnResult:
                held = all(self._mod_revision(db, c.key) == c.mod_revision for c in compares)
                ops = success if held else failure
                if not ops:
                    return TxnResult(succeeded=held, revision=self._current(db))
                self._check_leases(db, ops)
                rev = self._bump(db)
                self._apply(db, ops, rev)
                return TxnResult(succeeded=held, revision=rev)

            return self._write(db, inner)

        return await self._run(body)

    async def revision(self) -> int:
        return await self._run(lambda db: self._read(db, lambda: self._current(db)))

    async def lease_grant(self, ttl: int) -> Lease:
        check_ttl(ttl)

        def body(db: sqlite3.Connection) -> Lease:
            def inner() -> Lease:
                lease_id = secrets.randbits(LEASE_ID_BITS) or 1
                db.execute(
                    "INSERT INTO leases (id, ttl, expires_at) VALUES (?, ?, ?)",
                    (lease_id, ttl, self._clock() + ttl),
                )
                return Lease(lease_id, ttl)

            return self._write(db, inner)

        return await self._run(body)

    async def lease_keepalive(self, lease_id: int) -> int:
        def body(db: sqlite3.Connection) -> int:
            def inner() -> int:
                row = db.execute("SELECT ttl FROM leases WHERE id = ?", (lease_id,)).fetchone()
                if row is None:
                    raise LeaseNotFound("lease not found", lease=lease_id)
                ttl = int(row[0])
                db.execute("UPDATE leases SET expires_at = ? WHERE id = ?", (self._clock() + ttl, lease_id))
                return ttl

            return self._write(db, inner)

        return await self._run(body)

    async def lease_revoke(self, lease_id: int) -> None:
        def body(db: sqlite3.Connection) -> None:
            def inner() -> None:
                if db.execute("SELECT 1 FROM leases WHERE id = ?", (lease_id,)).fetchone() is None:
                    raise LeaseNotFound("lease not found", lease=lease_id)
                self._end_lease(db, lease_id)

            self._write(db, inner)

        await self._run(body)

    async def lease_ttl(self, lease_id: int) -> int | None:
        def body(db: sqlite3.Connection) -> int | None:
            self._expire_if_due(db)
            row = db.execute("SELECT expires_at FROM leases WHERE id = ?", (lease_id,)).fetchone()
            if row is None:
                return None
            # Whole seconds, rounded down like etcd's LeaseTimeToLive.
            return max(0, int(float(row[0]) - self._clock()))

        return await self._run(body)

    async def close(self) -> None:
        def body() -> None:
            with self._lock:
                if not self._closed:
                    self._closed = True
                    self._db.close()

        await asyncio.to_thread(body)
