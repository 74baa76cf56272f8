"""The audit log on a real SQLite store: ordered append-only keys, paged reads, retention."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from novacron.observability.audit import (
    AUDIT_PREFIX,
    AuditLimits,
    AuditLog,
    AuditQueryError,
    AuditRecord,
    decimal_blocks,
    result_of,
)
from novacron.observability.metrics import AUDIT_FAILURES
from novacron.store.sqlite import SqliteStore

T0 = 1_800_000_000.0


def rec(t: float, action: str = "vm.start", status: int = 200) -> AuditRecord:
    return AuditRecord(time=t, request_id=f"r{t}", actor="token:x(ci)", role="operator", action=action,
                       method="POST", path="/v1/vms/a/start", target="vm/a", status=status,
                       result=result_of(status))  # fmt: skip


@given(st.integers(0, 10**20), st.integers(0, 10**20))
def test_decimal_blocks_cover_the_window_exactly_in_order(a: int, b: int) -> None:
    lo, hi = min(a, b), max(a, b)
    blocks = list(decimal_blocks(lo, hi))
    assert len(blocks) <= 2 * 9 * 20
    covered = 0
    at = lo
    for prefix in blocks:
        size = 10 ** (20 - len(prefix))
        start = int(prefix.ljust(20, "0"))
        assert start == at  # contiguous and ascending
        at += size
        covered += size
    assert at == hi or (lo == hi and not blocks)
    assert covered == hi - lo


@pytest.fixture
async def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = SqliteStore(tmp_path / "store.db")
    yield s
    await s.close()


async def test_append_is_ordered_and_pages_with_a_cursor(store: SqliteStore) -> None:
    log = AuditLog(store, node="n1", clock=lambda: T0 + 1000)
    times = [T0 + i * 0.37 for i in range(250)] + [T0 + 7.0] * 5  # five in one nanosecond
    for t in times:
        await log.append(rec(t))
    seen = []
    after = None
    pages = 0
    while True:
        page = await log.read(after=after, limit=40)
        pages += 1
        seen += page.entries
        if page.next_cursor is None:
            break
        after = page.next_cursor
    assert pages == 7
    assert [e.record.time for e in seen] == sorted(times)
    assert len({e.key for e in seen}) == len(times)
    assert all(e.record.node == "n1" for e in seen)
    revisions = [e.revision for e in seen]
    assert len(set(revisions)) == len(revisions)


async def test_cursor_inside_one_nanosecond(store: SqliteStore) -> None:
    log = AuditLog(store)
    for _ in range(6):
        await log.append(rec(T0))
    first = await log.read(limit=2)
    rest = await log.read(after=first.next_cursor, limit=10)
    assert len(first.entries) == 2 and len(rest.entries) == 4
    assert {e.key for e in first.entries}.isdisjoint({e.key for e in rest.entries})


async def test_time_window(store: SqliteStore) -> None:
    log = AuditLog(store)
    for i in range(100):
        await log.append(rec(T0 + i))
    page = await log.read(since=T0 + 10, until=T0 + 20, limit=100)
    assert [e.record.time for e in page.entries] == [T0 + i for i in range(10, 20)]
    assert page.next_cursor is None
    with pytest.raises(AuditQueryError) as info:
        await log.read(since=T0 + 5, until=T0)
    assert info.value.context["field"] == "until"
    with pytest.raises(AuditQueryError):
        await log.read(after="../../x")
    with pytest.raises(AuditQueryError):
        await log.read(limit=AuditLimits().max_page + 1)


async def test_old_records_are_pruned_in_bounded_batches(store: SqliteStore) -> None:
    now = T0 + 10_000
    log = AuditLog(store, limits=AuditLimits(max_age_s=1000, prune_every=10**9, prune_batch=7),
                   clock=lambda: now)  # fmt: skip
    for i in range(20):
        await log.append(rec(T0 + i))  # older than max_age
    for i in range(5):
        await log.append(rec(now - 10 + i))  # recent
    assert await log.prune() == 7
    assert await log.prune() == 7
    assert await log.prune() == 6
    assert await log.prune() == 0
    left = await log.read(limit=100)
    assert [e.record.time for e in left.entries] == [now - 10 + i for i in range(5)]


async def test_store_failure_keeps_the_record_in_the_error_log(
    store: SqliteStore, caplog: pytest.LogCaptureFixture
) -> None:
    log = AuditLog(store)
    await store.close()
    before = AUDIT_FAILURES._value.get()
    with caplog.at_level(logging.ERROR, logger="novacron.audit"):
        assert await log.record(rec(T0, action="token.revoke")) is None
    assert AUDIT_FAILURES._value.get() == before + 1
    [entry] = [r for r in caplog.records if r.getMessage() == "audit.append_failed"]
    fields = entry.__dict__["novacron_fields"]
    assert fields["action"] == "token.revoke" and fields["actor"] == "token:x(ci)"


async def test_keys_live_under_the_audit_prefix(store: SqliteStore) -> None:
    key = await AuditLog(store).append(rec(T0))
    assert key.startswith(AUDIT_PREFIX + "01800000000000000000.")
