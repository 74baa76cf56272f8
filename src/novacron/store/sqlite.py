"""SQLite backend of the store (WAL mode; one global revision counter in the ``meta`` table).

Each operation runs in its own ``BEGIN IMMEDIATE`` transaction, so several processes (CLI, agent,
tests) can share one database file safely. Calls run in a worker thread; a lock serialises them.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from novacron.store.base import (
    MAX_RANGE_RESULTS,
    MAX_TXN_OPS,
    CasFailed,
    Compare,
    Delete,
    Entry,
    Op,
    Put,
    StoreError,
    StoreLimitError,
    TxnResult,
    check_key,
    check_value,
)

BUSY_TIMEOUT_S = 10.0
SCHEMA_VERSION = 1

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 0), ('schema', 1);
"""


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            schema = self._db.execute("SELECT value FROM meta WHERE name='schema'").fetchone()[0]
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
    def _entry(row: tuple[str, bytes, int, int, int]) -> Entry:
        return Entry(
            key=row[0], value=bytes(row[1]), create_revision=row[2], mod_revision=row[3], version=row[4]
        )

    @staticmethod
    def _get(db: sqlite3.Connection, key: str) -> Entry | None:
        row = db.execute(
            "SELECT key, value, create_revision, mod_revision, version FROM kv WHERE key = ?", (key,)
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
                    "INSERT INTO kv (key, value, create_revision, mod_revision, version) "
                    "VALUES (?, ?, ?, ?, 1) ON CONFLICT(key) DO UPDATE SET value = excluded.value, "
                    "mod_revision = excluded.mod_revision, version = kv.version + 1",
                    (op.key, op.value, rev, rev),
                )
            else:
                db.execute("DELETE FROM kv WHERE key = ?", (op.key,))

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
        return await self._run(lambda db: self._get(db, key))

    async def put(self, key: str, value: bytes, *, expect_revision: int | None = None) -> int:
        check_key(key)
        check_value(key, value)

        def body(db: sqlite3.Connection) -> int:
            def inner() -> int:
                if expect_revision is not None:
                    actual = self._mod_revision(db, key)
                    if actual != expect_revision:
                        raise CasFailed(
                            "compare-and-swap failed", key=key, expected=expect_revision, actual=actual
                        )
                rev = self._bump(db)
                self._apply(db, [Put(key, value)], rev)
                return rev

            return self._in_txn(db, inner)

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

            return self._in_txn(db, inner)

        return await self._run(body)

    async def range(self, prefix: str, *, limit: int = MAX_RANGE_RESULTS) -> list[Entry]:
        if not 1 <= limit <= MAX_RANGE_RESULTS:
            raise StoreLimitError("range limit out of bounds", limit=limit, max=MAX_RANGE_RESULTS)

        def body(db: sqlite3.Connection) -> list[Entry]:
            rows = db.execute(
                "SELECT key, value, create_revision, mod_revision, version FROM kv "
                "WHERE key LIKE ? ESCAPE '\\' AND substr(key, 1, ?) = ? ORDER BY key LIMIT ?",
                (_like_prefix(prefix), len(prefix), prefix, limit),
            ).fetchall()
            return [self._entry(r) for r in rows]

        return await self._run(body)

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        if len(compares) + len(success) + len(failure) > MAX_TXN_OPS:
            raise StoreLimitError("transaction has too many operations", limit=MAX_TXN_OPS)
        for c in compares:
            check_key(c.key)
        for op in (*success, *failure):
            check_key(op.key)
            if isinstance(op, Put):
                check_value(op.key, op.value)

        def body(db: sqlite3.Connection) -> TxnResult:
            def inner() -> TxnResult:
                held = all(self._mod_revision(db, c.key) == c.mod_revision for c in compares)
                ops = success if held else failure
                if not ops:
                    return TxnResult(succeeded=held, revision=self._current(db))
                rev = self._bump(db)
                self._apply(db, ops, rev)
                return TxnResult(succeeded=held, revision=rev)

            return self._in_txn(db, inner)

        return await self._run(body)

    async def revision(self) -> int:
        return await self._run(self._current)

    async def close(self) -> None:
        def body() -> None:
            with self._lock:
                if not self._closed:
                    self._closed = True
                    self._db.close()

        await asyncio.to_thread(body)
