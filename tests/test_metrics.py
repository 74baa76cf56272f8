"""The metrics registry: every metric the issue lists, label checks, and the store timing wrapper."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from novacron.observability import metrics as m
from novacron.store.base import StoreLimitError
from novacron.store.sqlite import SqliteStore


def sample(name: str, **labels: str) -> float:
    value = m.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_every_listed_metric_is_exported() -> None:
    body, content_type = m.render()
    assert content_type.startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    for wanted in (
        "novacron_migration_duration_seconds", "novacron_migrations", "novacron_migration_bytes_raw",
        "novacron_migration_bytes_wire", "novacron_migration_compression_ratio", "novacron_dwcp_sessions",
        "novacron_dwcp_mode_switches", "novacron_errors", "novacron_api_request_duration_seconds",
        "novacron_store_operation_duration_seconds",
    ):  # fmt: skip
        assert wanted in names


def test_observe_migration() -> None:
    before = sample("novacron_migrations_total", mode="internet", outcome="completed")
    raw = sample("novacron_migration_bytes_raw_total", mode="internet")
    ratio_n = sample("novacron_migration_compression_ratio_count", mode="internet")
    ratio_sum = sample("novacron_migration_compression_ratio_sum", mode="internet")
    m.observe_migration("internet", "completed", duration_s=12.5, bytes_raw=4000, bytes_wire=1000,
                        downtime_s=0.2)  # fmt: skip
    assert sample("novacron_migrations_total", mode="internet", outcome="completed") == before + 1
    assert sample("novacron_migration_bytes_raw_total", mode="internet") == raw + 4000
    assert sample("novacron_migration_compression_ratio_count", mode="internet") == ratio_n + 1
    assert sample("novacron_migration_compression_ratio_sum", mode="internet") == ratio_sum + 4.0


def test_labels_outside_their_sets_are_refused() -> None:
    with pytest.raises(m.MetricLabelError):
        m.observe_migration("lan", "completed", duration_s=1, bytes_raw=1, bytes_wire=1)
    with pytest.raises(m.MetricLabelError):
        m.observe_migration("internet", "ok", duration_s=1, bytes_raw=1, bytes_wire=1)
    with pytest.raises(m.MetricLabelError):
        m.count_error("nowhere", ValueError())


def test_mode_switch_moves_the_session_gauge() -> None:
    dc = sample("novacron_dwcp_sessions", mode="datacenter")
    hy = sample("novacron_dwcp_sessions", mode="hybrid")
    sw = sample("novacron_dwcp_mode_switches_total", from_mode="datacenter", to_mode="hybrid")
    m.session_opened("datacenter")
    m.mode_switched("datacenter", "hybrid")
    assert sample("novacron_dwcp_sessions", mode="datacenter") == dc
    assert sample("novacron_dwcp_sessions", mode="hybrid") == hy + 1
    assert sample("novacron_dwcp_mode_switches_total", from_mode="datacenter", to_mode="hybrid") == sw + 1
    m.session_closed("hybrid")
    assert sample("novacron_dwcp_sessions", mode="hybrid") == hy


def test_errors_by_type() -> None:
    before = sample("novacron_errors_total", subsystem="migration", type="TimeoutError")
    m.count_error("migration", TimeoutError())
    assert sample("novacron_errors_total", subsystem="migration", type="TimeoutError") == before + 1


async def test_timed_store_records_latency_and_errors(tmp_path: Path) -> None:
    store = m.TimedStore(SqliteStore(tmp_path / "s.db"), "sqlite-test")
    n = sample("novacron_store_operation_duration_seconds_count", backend="sqlite-test", op="put")
    await store.put("/k", b"v")
    assert (await store.get("/k")) is not None
    assert sample("novacron_store_operation_duration_seconds_count", backend="sqlite-test", op="put") == n + 1
    assert sample("novacron_store_operation_duration_seconds_count", backend="sqlite-test", op="get") >= 1
    with pytest.raises(StoreLimitError):
        await store.put("", b"v")
    assert sample("novacron_store_errors_total", backend="sqlite-test", op="put", type="StoreLimitError") == 1
    lease = await store.lease_grant(5)
    await store.put("/leased", b"v", lease=lease.id)
    assert (await store.get("/leased")).lease == lease.id  # type: ignore[union-attr]
    assert await store.lease_ttl(lease.id) is not None
    await store.lease_revoke(lease.id)
    assert await store.get("/leased") is None
    assert (
        sample("novacron_store_operation_duration_seconds_count", backend="sqlite-test", op="lease_revoke")
        == 1
    )
    await store.close()
