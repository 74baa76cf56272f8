"""The store contract, run against both backends: SQLite and a real etcd server.

Whatever a caller can observe (revisions, CAS answers, ranges, transactions, leases) must be the same
on either. Revisions are compared relative to each other (etcd starts at 1, SQLite at 0). Each test
works under its own key prefix, so the etcd server is shared by the module.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from novacron.store import CasFailed, Compare, Delete, KeyValueStore, Put, StoreLimitError
from novacron.store.base import MAX_TXN_OPS, LeaseNotFound
from novacron.store.etcd import EtcdStore
from novacron.store.sqlite import SqliteStore
from novacron.testing.etcd import LazyEtcdCluster, ManualClock, wait_for_delete

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Backend:
    name: str
    store: KeyValueStore
    # Let the lease attached to ``key`` (last written at ``revision``) run out: virtual time on
    # SQLite, an etcd watch on the real delete.
    expire: Callable[[str, int, int], Awaitable[None]]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lazy_etcd() -> AsyncIterator[LazyEtcdCluster]:
    """One etcd server for the module, started only if an etcd-backed test runs."""
    lazy = LazyEtcdCluster(1)
    yield lazy
    await lazy.stop()


@pytest_asyncio.fixture(loop_scope="module", params=["sqlite", pytest.param("etcd", marks=pytest.mark.etcd)])
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, lazy_etcd: LazyEtcdCluster
) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        clock = ManualClock()
        sqlite = SqliteStore(tmp_path / "store.db", clock=clock)

        async def advance(key: str, revision: int, ttl: int) -> None:
            clock.advance(ttl)

        yield Backend("sqlite", sqlite, advance)
        await sqlite.close()
        return
    cluster = await lazy_etcd.get()
    etcd = EtcdStore(cluster.endpoints)

    async def watch(key: str, revision: int, ttl: int) -> None:
        await wait_for_delete(cluster.endpoints[0], key, revision, timeout_s=ttl + 10)

    yield Backend("etcd", etcd, watch)
    await etcd.close()


@pytest.fixture
def p() -> str:
    """A key prefix of this test alone."""
    return f"/t/{uuid.uuid4().hex[:10]}/"


async def test_put_get_revisions(backend: Backend, p: str) -> None:
    s = backend.store
    assert await s.get(p + "a") is None
    r1 = await s.put(p + "a", b"one")
    r2 = await s.put(p + "b", b"two")
    r3 = await s.put(p + "a", b"uno")
    assert r1 < r2 < r3 == await s.revision()
    a = await s.get(p + "a")
    assert a is not None
    assert (a.key, a.value, a.create_revision, a.mod_revision, a.version, a.lease) == (
        p + "a",
        b"uno",
        r1,
        r3,
        2,
        0,
    )


async def test_cas_put(backend: Backend, p: str) -> None:
    s = backend.store
    rev = await s.put(p + "k", b"v", expect_revision=0)
    with pytest.raises(CasFailed) as exc:
        await s.put(p + "k", b"w", expect_revision=0)
    assert exc.value.context["actual"] == rev
    with pytest.raises(CasFailed) as exc:
        await s.put(p + "k", b"w", expect_revision=rev + 5)
    assert exc.value.context == {"key": p + "k", "expected": rev + 5, "actual": rev}
    rev2 = await s.put(p + "k", b"w", expect_revision=rev)
    entry = await s.get(p + "k")
    assert entry is not None and entry.value == b"w" and entry.mod_revision == rev2
    with pytest.raises(CasFailed) as exc:
        await s.put(p + "missing", b"x", expect_revision=rev2)
    assert exc.value.context["actual"] == 0


async def test_delete(backend: Backend, p: str) -> None:
    s = backend.store
    before = await s.revision()
    assert await s.delete(p + "missing") is False
    assert await s.delete(p + "missing", expect_revision=0) is False
    assert await s.revision() == before  # deleting nothing writes nothing
    rev = await s.put(p + "k", b"v")
    with pytest.raises(CasFailed):
        await s.delete(p + "k", expect_revision=rev + 1)
    assert await s.get(p + "k") is not None
    assert await s.delete(p + "k", expect_revision=rev) is True
    assert await s.revision() == rev + 1
    assert await s.get(p + "k") is None
    rev3 = await s.put(p + "k", b"again")
    again = await s.get(p + "k")
    assert again is not None and again.create_revision == rev3 and again.version == 1


async def test_range_prefix_sorted_limited(backend: Backend, p: str) -> None:
    s = backend.store
    for key in ("vms/b", "vms/a", "vms_x", "vm/a", "vms/%", "vms/_", "vms/\u00e9"):
        await s.put(p + key, key.encode())
    keys = [e.key for e in await s.range(p + "vms/")]
    assert keys == sorted(p + k for k in ("vms/a", "vms/b", "vms/%", "vms/_", "vms/\u00e9"))
    assert [e.key for e in await s.range(p + "vms/_")] == [p + "vms/_"]
    assert [e.key for e in await s.range(p + "vms/", limit=2)] == keys[:2]
    with pytest.raises(StoreLimitError):
        await s.range(p, limit=0)


async def test_txn_branches(backend: Backend, p: str) -> None:
    s = backend.store
    r = await s.put(p + "lock", b"free")
    ok = await s.txn([Compare(p + "lock", r)], [Put(p + "lock", b"held"), Put(p + "owner", b"n1")])
    assert ok.succeeded
    lock, owner = await s.get(p + "lock"), await s.get(p + "owner")
    assert lock is not None and owner is not None
    assert lock.mod_revision == owner.mod_revision == ok.revision  # one revision for the whole txn
    res = await s.txn([Compare(p + "lock", r)], [Delete(p + "owner")], [Put(p + "conflicts", b"1")])
    assert not res.succeeded and res.revision == ok.revision + 1
    assert await s.get(p + "owner") is not None and await s.get(p + "conflicts") is not None
    # A branch with nothing to do leaves the revision alone.
    empty = await s.txn([Compare(p + "lock", r)], [Put(p + "x", b"")], [])
    assert not empty.succeeded and empty.revision == res.revision == await s.revision()
    # Compare 0: the key must not exist.
    created = await s.txn([Compare(p + "new", 0)], [Put(p + "new", b"1")])
    assert created.succeeded


async def test_txn_limits_are_the_same(backend: Backend, p: str) -> None:
    s = backend.store
    with pytest.raises(StoreLimitError, match="same key twice"):
        await s.txn([], [Put(p + "a", b"1"), Delete(p + "a")])
    too_many = [Put(f"{p}{i}", b"") for i in range(MAX_TXN_OPS + 1)]
    with pytest.raises(StoreLimitError, match="too many"):
        await s.txn([], too_many)
    with pytest.raises(StoreLimitError):
        await s.put("", b"")


async def test_lease_attach_detach_revoke(backend: Backend, p: str) -> None:
    s = backend.store
    lease = await s.lease_grant(30)
    assert lease.ttl == 30 and lease.id > 0
    ttl = await s.lease_ttl(lease.id)
    assert ttl is not None and 25 <= ttl <= 30
    await s.put(p + "a", b"1", lease=lease.id)
    txn = await s.txn([], [Put(p + "b", b"2", lease.id), Put(p + "c", b"3", lease.id)])
    a = await s.get(p + "a")
    assert a is not None and a.lease == lease.id
    await s.put(p + "c", b"detached")  # a put without lease detaches the key
    c = await s.get(p + "c")
    assert c is not None and c.lease == 0
    before = await s.revision()
    assert before == txn.revision + 1
    await s.lease_revoke(lease.id)
    assert await s.revision() == before + 1  # both attached keys go in one revision
    assert await s.get(p + "a") is None and await s.get(p + "b") is None
    assert await s.get(p + "c") is not None
    assert await s.lease_ttl(lease.id) is None
    with pytest.raises(LeaseNotFound):
        await s.lease_revoke(lease.id)
    with pytest.raises(LeaseNotFound):
        await s.lease_keepalive(lease.id)
    with pytest.raises(LeaseNotFound):
        await s.put(p + "d", b"x", lease=lease.id)
    with pytest.raises(LeaseNotFound):
        await s.txn([], [Put(p + "d", b"x", lease.id)])
    assert await s.get(p + "d") is None


async def test_revoking_an_empty_lease_writes_nothing(backend: Backend) -> None:
    s = backend.store
    lease = await s.lease_grant(10)
    before = await s.revision()
    await s.lease_revoke(lease.id)
    assert await s.revision() == before


async def test_lease_expiry_deletes_attached_keys(backend: Backend, p: str) -> None:
    s = backend.store
    lease = await s.lease_grant(2)
    assert await s.lease_keepalive(lease.id) == 2
    rev = await s.put(p + "lock", b"held", lease=lease.id)
    await s.put(p + "other", b"stays")
    await backend.expire(p + "lock", rev, 2)
    assert await s.get(p + "lock") is None
    assert [e.key for e in await s.range(p)] == [p + "other"]
    assert await s.lease_ttl(lease.id) is None
    with pytest.raises(LeaseNotFound):
        await s.lease_keepalive(lease.id)


async def test_lease_ttl_bounds(backend: Backend) -> None:
    with pytest.raises(StoreLimitError):
        await backend.store.lease_grant(1)
    with pytest.raises(StoreLimitError):
        await backend.store.lease_grant(10**9)


# -- SQLite only: lease time is a clock we move ------------------------------------------------------


async def test_sqlite_keepalive_restarts_the_ttl(tmp_path: Path) -> None:
    clock = ManualClock()
    s = SqliteStore(tmp_path / "s.db", clock=clock)
    try:
        lease = await s.lease_grant(10)
        await s.put("/k", b"v", lease=lease.id)
        clock.advance(9)
        assert await s.lease_ttl(lease.id) == 1
        assert await s.lease_keepalive(lease.id) == 10
        clock.advance(9)
        assert await s.get("/k") is not None
        clock.advance(1)  # exactly at expiry: ended
        assert await s.get("/k") is None
        assert await s.lease_ttl(lease.id) is None
    finally:
        await s.close()


async def test_sqlite_expiry_is_seen_by_every_process_sharing_the_file(tmp_path: Path) -> None:
    clock = ManualClock()
    writer = SqliteStore(tmp_path / "s.db", clock=clock)
    reader = SqliteStore(tmp_path / "s.db", clock=clock)
    try:
        lease = await writer.lease_grant(5)
        rev = await writer.put("/k", b"v", lease=lease.id)
        clock.advance(5)
        assert [e.key for e in await reader.range("/")] == []
        assert await writer.revision() == rev + 1  # the expiry's delete is one revision
    finally:
        await writer.close()
        await reader.close()


async def test_sqlite_schema_1_database_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, create_revision INTEGER NOT NULL,"
        " mod_revision INTEGER NOT NULL, version INTEGER NOT NULL);"
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);"
        "INSERT INTO meta VALUES ('revision', 7), ('schema', 1);"
        "INSERT INTO kv VALUES ('/old', x'6f6c64', 3, 7, 2);"
    )
    db.commit()
    db.close()
    s = SqliteStore(path)
    try:
        old = await s.get("/old")
        assert old is not None and (old.value, old.mod_revision, old.version, old.lease) == (b"old", 7, 2, 0)
        lease = await s.lease_grant(5)
        assert await s.put("/new", b"n", lease=lease.id) == 8
    finally:
        await s.close()
