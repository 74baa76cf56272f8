"""The etcd backend's retry policy (pure parts) and its behaviour when no member answers."""

from __future__ import annotations

import grpc
import pytest

from novacron.store import Compare, Delete, Put, StoreUnavailable
from novacron.store.etcd import EtcdLimits, EtcdStore, Failure, classify, prefix_end, txn_is_guarded
from novacron.testing.etcd import EtcdCluster


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: refused",
            Failure.NOT_SENT,
        ),
        (grpc.StatusCode.UNAVAILABLE, "etcdserver: no leader", Failure.NOT_SENT),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: too many requests", Failure.NOT_SENT),
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", Failure.AMBIGUOUS),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", Failure.AMBIGUOUS),
        (grpc.StatusCode.UNAVAILABLE, "etcdserver: request timed out", Failure.AMBIGUOUS),
        (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: duplicate key given in txn request", Failure.FATAL),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded", Failure.FATAL),
    ],
)
def test_classify(code: grpc.StatusCode, details: str, expected: Failure) -> None:
    assert classify(code, details) is expected


def test_prefix_end() -> None:
    assert prefix_end(b"/vms/") == b"/vms0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"  # everything from the key on
    assert prefix_end(b"") == b"\0"


def test_only_self_guarding_txns_are_resent() -> None:
    assert txn_is_guarded([Compare("/a", 3)], [Put("/a", b"")], [])
    assert txn_is_guarded([Compare("/a", 3), Compare("/l", 9)], [Put("/a", b"")], [])
    assert not txn_is_guarded([], [Put("/a", b"")], [])  # blind
    assert not txn_is_guarded([Compare("/l", 9)], [Put("/a", b"")], [])  # writes a key it does not compare
    assert not txn_is_guarded([Compare("/a", 3)], [Put("/a", b"")], [Delete("/b")])  # failure branch writes


@pytest.mark.etcd
async def test_a_cluster_with_no_member_left_is_reported_unavailable() -> None:
    async with EtcdCluster(1) as cluster:
        store = EtcdStore(cluster.endpoints, EtcdLimits(max_attempts=3, request_timeout_s=1.0))
        try:
            await store.put("/k", b"v")
            await cluster.kill(0)
            with pytest.raises(StoreUnavailable) as exc:
                await store.get("/k")
            assert exc.value.context["attempts"] == 3
            assert store.stats.not_sent == 3
            # A compare-protected write that never left is not "outcome unknown": it surely did not apply.
            with pytest.raises(StoreUnavailable) as exc2:
                await store.put("/k", b"w", expect_revision=2)
            assert type(exc2.value) is StoreUnavailable
            await cluster.restart(0)
            entry = await store.get("/k")
            assert entry is not None and entry.value == b"v"
        finally:
            await store.close()
