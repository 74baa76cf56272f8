"""The SQLite store: revisions, compare-and-swap, ranges, transactions, limits."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from novacron.store import CasFailed, Compare, Delete, Put, SqliteStore, StoreLimitError
from novacron.store.base import MAX_VALUE_BYTES


@pytest.fixture
async def store(tmp_path: Path):
    s = SqliteStore(tmp_path / "store.db")
    yield s
    await s.close()


async def test_put_get_revisions(store: SqliteStore) -> None:
    assert await store.get("/a") is None
    r1 = await store.put("/a", b"one")
    r2 = await store.put("/b", b"two")
    r3 = await store.put("/a", b"uno")
    assert r1 < r2 < r3 == await store.revision()
    a = await store.get("/a")
    assert a is not None
    assert (a.value, a.create_revision, a.mod_revision, a.version) == (b"uno", r1, r3, 2)


async def test_cas_must_not_exist_and_mismatch(store: SqliteStore) -> None:
    rev = await store.put("/k", b"v", expect_revision=0)
    with pytest.raises(CasFailed) as exc:
        await store.put("/k", b"w", expect_revision=0)
    assert exc.value.context["actual"] == rev
    with pytest.raises(CasFailed):
        await store.put("/k", b"w", expect_revision=rev + 5)
    rev2 = await store.put("/k", b"w", expect_revision=rev)
    entry = await store.get("/k")
    assert entry is not None and entry.value == b"w" and entry.mod_revision == rev2


async def test_delete_with_and_without_cas(store: SqliteStore) -> None:
    assert await store.delete("/missing") is False
    rev = await store.put("/k", b"v")
    with pytest.raises(CasFailed):
        await store.delete("/k", expect_revision=rev + 1)
    assert await store.get("/k") is not None
    assert await store.delete("/k", expect_revision=rev) is True
    assert await store.get("/k") is None
    # Re-creating a deleted key starts a new life: new create_revision, version 1.
    rev3 = await store.put("/k", b"again")
    again = await store.get("/k")
    assert again is not None and again.create_revision == rev3 and again.version == 1


async def test_range_is_prefix_exact_and_sorted(store: SqliteStore) -> None:
    for key in ("/vms/b", "/vms/a", "/vms_x", "/vm/a", "/vms/%", "/vms/_"):
        await store.put(key, key.encode())
    keys = [e.key for e in await store.range("/vms/")]
    assert keys == sorted(["/vms/a", "/vms/b", "/vms/%", "/vms/_"])
    assert [e.key for e in await store.range("/vms/_")] == ["/vms/_"]
    assert len(await store.range("/vms/", limit=2)) == 2
    with pytest.raises(StoreLimitError):
        await store.range("/", limit=0)


async def test_txn_applies_success_or_failure_atomically(store: SqliteStore) -> None:
    r = await store.put("/lock", b"free")
    ok = await store.txn([Compare("/lock", r)], [Put("/lock", b"held"), Put("/owner", b"n1")], [])
    assert ok.succeeded
    lock = await store.get("/lock")
    assert lock is not None and lock.value == b"held" and lock.mod_revision == ok.revision
    # Stale compare: the failure branch runs instead, nothing from the success branch.
    res = await store.txn([Compare("/lock", r)], [Delete("/owner")], [Put("/conflicts", b"1")])
    assert not res.succeeded
    assert await store.get("/owner") is not None
    assert await store.get("/conflicts") is not None
    # Compare on absence.
    res2 = await store.txn([Compare("/new", 0)], [Put("/new", b"x")])
    assert res2.succeeded and (await store.get("/new")) is not None


async def test_limits(store: SqliteStore) -> None:
    with pytest.raises(StoreLimitError):
        await store.put("", b"x")
    with pytest.raises(StoreLimitError):
        await store.put("/k" * 600, b"x")
    with pytest.raises(StoreLimitError):
        await store.put("/big", b"\0" * (MAX_VALUE_BYTES + 1))
    with pytest.raises(StoreLimitError):
        await store.txn([], [Put(f"/k{i}", b"") for i in range(200)])


async def test_two_connections_share_state_and_cas(tmp_path: Path) -> None:
    a, b = SqliteStore(tmp_path / "s.db"), SqliteStore(tmp_path / "s.db")
    try:
        # Both race to create the same key: exactly one wins.
        results = await asyncio.gather(
            a.put("/vm", b"a", expect_revision=0),
            b.put("/vm", b"b", expect_revision=0),
            return_exceptions=True,
        )
        assert sum(isinstance(r, CasFailed) for r in results) == 1
        ea, eb = await a.get("/vm"), await b.get("/vm")
        assert ea == eb
    finally:
        await a.close()
        await b.close()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["/x", "/y", "/z"]), st.binary(max_size=8)), max_size=20))
def test_revision_strictly_increases_and_last_write_wins(
    tmp_path_factory: pytest.TempPathFactory, ops
) -> None:
    async def run() -> None:
        s = SqliteStore(tmp_path_factory.mktemp("h") / "s.db")
        try:
            last: dict[str, bytes] = {}
            prev = await s.revision()
            for key, value in ops:
                rev = await s.put(key, value)
                assert rev == prev + 1
                prev = rev
                last[key] = value
            for key, value in last.items():
                entry = await s.get(key)
                assert entry is not None and entry.value == value
        finally:
            await s.close()

    asyncio.run(run())
