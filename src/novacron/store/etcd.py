"""etcd backend of the store (etcd v3 gRPC API; tested against Debian's etcd 3.4).

We speak etcd's gRPC API through the stubs and messages that the ``aetcd`` package generates
(``aetcd.rpc``) over our own channels: ``aetcd.Client`` binds to a single host:port, and a store that
must survive the loss of a cluster member needs one channel per member and failover between them.

Retry policy (bounded by ``EtcdLimits.max_attempts``; the next member is tried at once, with a short
bounded backoff after each full round):
- a request that never left (no connection to the member, no leader, server overloaded) is retried
  whatever it is;
- reads, lease keep-alives and revocations, and writes guarded by compares on every key they write
  are retried after an ambiguous failure (connection lost or deadline passed after sending): the
  compare makes the retry unable to apply twice. If the retry then finds its compare broken, the
  caller gets StoreOutcomeUnknown, not CasFailed, because the broken compare may be this write's own
  unacknowledged success;
- any other write (a put or delete without ``expect_revision``, a txn with failure ops or writing
  keys it does not compare) is never resent after an ambiguous failure: StoreOutcomeUnknown.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc  # type: ignore[import-untyped]
from aetcd import rpc  # type: ignore[import-untyped]

from novacron.store.base import (
    MAX_RANGE_RESULTS,
    MAX_VALUE_BYTES,
    NO_LEASE,
    CasFailed,
    Compare,
    Entry,
    Lease,
    LeaseNotFound,
    Op,
    Put,
    StoreError,
    StoreLimitError,
    StoreOutcomeUnknown,
    StoreUnavailable,
    TxnResult,
    check_key,
    check_ttl,
    check_txn,
    check_value,
)

T = TypeVar("T")

DEFAULT_ENDPOINT = "127.0.0.1:2379"
MAX_HISTORY_VERSIONS = 10_000
# Above the largest value plus key and framing; etcd itself caps requests at 1.5 MiB by default.
MAX_MESSAGE_BYTES = MAX_VALUE_BYTES + (1 << 20)
MAX_RANGE_MESSAGE_BYTES = 64 << 20  # a full range of MAX_RANGE_RESULTS small records


@dataclass(frozen=True)
class EtcdLimits:
    request_timeout_s: float = 5.0  # one RPC's deadline
    max_attempts: int = 8  # RPC attempts per operation, across all members
    backoff_initial_s: float = 0.05  # pause after a full round of members failed, doubled per round
    backoff_max_s: float = 1.0
    reconnect_backoff_max_ms: int = 1000  # gRPC's reconnect backoff to a member that went away


@dataclass
class EtcdStats:
    """Counters of what the failover did (for tests, benchmarks and metrics)."""

    not_sent: int = 0  # attempts that failed before reaching a member
    ambiguous: int = 0  # attempts whose answer was lost after sending
    failovers: int = 0  # switches to another member


class Failure(enum.Enum):
    NOT_SENT = "not sent"  # the request cannot have been applied
    AMBIGUOUS = "ambiguous"  # it may have been applied
    FATAL = "fatal"  # an answer from etcd that retrying will not change


# Server answers meaning the request was refused before being proposed to Raft.
_NOT_APPLIED = ("etcdserver: no leader", "etcdserver: too many requests", "etcdserver: not capable")


def classify(code: Any, details: str) -> Failure:
    """How a failed RPC may be retried (pure, so the policy is unit-tested)."""
    if code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in details:
        return Failure.NOT_SENT
    if any(marker in details for marker in _NOT_APPLIED):
        return Failure.NOT_SENT
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    ):
        return Failure.AMBIGUOUS
    return Failure.FATAL


class Retry(enum.Enum):
    ALWAYS = "always"  # reads and idempotent lease calls
    GUARDED = "guarded"  # writes under compares on every key they write
    NEVER_RESEND = "never resend"  # blind writes: retried only if never sent


def prefix_end(prefix: bytes) -> bytes:
    """The first key after every key starting with ``prefix`` (etcd's range_end for a prefix)."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"
    return stripped[:-1] + bytes([stripped[-1] + 1])


def _compare(c: Compare) -> Any:
    return rpc.Compare(
        key=c.key.encode(),
        target=rpc.Compare.MOD,
        result=rpc.Compare.EQUAL,
        mod_revision=c.mod_revision,
    )


def _request_op(op: Op) -> Any:
    if isinstance(op, Put):
        return rpc.RequestOp(request_put=rpc.PutRequest(key=op.key.encode(), value=op.value, lease=op.lease))
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=op.key.encode()))


def _entry(kv: Any) -> Entry:
    return Entry(
        key=kv.key.decode(),
        value=bytes(kv.value),
        create_revision=int(kv.create_revision),
        mod_revision=int(kv.mod_revision),
        version=int(kv.version),
        lease=int(kv.lease),
    )


def txn_is_guarded(compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]) -> bool:
    """A txn may be resent after an ambiguous failure only if applying it breaks its own compares."""
    compared = {c.key for c in compares}
    return bool(compares) and not failure and all(op.key in compared for op in success)


class EtcdStore:
    """The store on an etcd cluster. ``endpoints`` are ``host:port`` client addresses of its members."""

    def __init__(
        self, endpoints: Sequence[str] = (DEFAULT_ENDPOINT,), limits: EtcdLimits | None = None
    ) -> None:
        if not endpoints:
            raise StoreLimitError("etcd store needs at least one endpoint")
        self.endpoints = list(endpoints)
        self.limits = limits or EtcdLimits()
        if self.limits.max_attempts < 1:
            raise StoreLimitError(
                "etcd max_attempts must be at least 1", max_attempts=self.limits.max_attempts
            )
        self._channels: list[Any | None] = [None] * len(self.endpoints)
        self._current = 0
        self._closed = False
        self.stats = EtcdStats()

    # -- connection and retries ---------------------------------------------------------------------

    def _channel(self, index: int) -> Any:
        channel = self._channels[index]
        if channel is None:
            channel = grpc.aio.insecure_channel(
                self.endpoints[index],
                options=[
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_receive_message_length", MAX_RANGE_MESSAGE_BYTES),
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", self.limits.reconnect_backoff_max_ms),
                ],
            )
            self._channels[index] = channel
        return channel

    async def _call(
        self, what: str, retry: Retry, rpc_call: Callable[[Any], Awaitable[T]], **ctx: Any
    ) -> tuple[T, bool]:
        """Run ``rpc_call(channel)`` with failover; returns its answer and whether an earlier attempt
        failed ambiguously (it may have applied). Raises StoreOutcomeUnknown per the module's policy."""
        if self._closed:
            raise StoreError("store is closed", endpoints=",".join(self.endpoints))
        ambiguous = False
        last: str = ""
        backoff = self.limits.backoff_initial_s
        for attempt in range(1, self.limits.max_attempts + 1):
            index = self._current
            try:
                return await rpc_call(self._channel(index)), ambiguous
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
                kind = classify(code, details)
                if "requested lease not found" in details:
                    raise LeaseNotFound(
                        "lease not found", op=what, after_lost_answer=ambiguous or None, **ctx
                    ) from None
                if kind is Failure.FATAL:
                    raise StoreError(
                        "etcd refused the request", op=what, code=code.name, reason=details, **ctx
                    ) from None
                last = f"{self.endpoints[index]}: {code.name}: {details}"
                if kind is Failure.NOT_SENT:
                    self.stats.not_sent += 1
                else:
                    self.stats.ambiguous += 1
                    if retry is Retry.NEVER_RESEND:
                        raise StoreOutcomeUnknown(
                            "etcd write outcome unknown (connection lost after sending)",
                            op=what,
                            endpoint=self.endpoints[index],
                            reason=details,
                            **ctx,
                        ) from None
                    ambiguous = True
            if self._current == index and len(self.endpoints) > 1:
                self._current = (index + 1) % len(self.endpoints)
                self.stats.failovers += 1
            if attempt % len(self.endpoints) == 0 and attempt < self.limits.max_attempts:
                await asyncio.sleep(backoff)  # retry backoff, not synchronisation: every member failed
                backoff = min(backoff * 2, self.limits.backoff_max_s)
        if ambiguous and retry is not Retry.ALWAYS:
            raise StoreOutcomeUnknown(
                "etcd write outcome unknown (no member answered a retry)", op=what, last_error=last, **ctx
            )
        raise StoreUnavailable(
            "etcd cluster unreachable",
            op=what,
            endpoints=",".join(self.endpoints),
            attempts=self.limits.max_attempts,
            last_error=last,
            **ctx,
        )

    @property
    def _timeout(self) -> float:
        return self.limits.request_timeout_s

    # -- key-value ----------------------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        return await self.get_at(key, 0)

    async def get_at(self, key: str, revision: int) -> Entry | None:
        """``key`` as it was at ``revision`` (0: now). etcd keeps history until compacted."""
        check_key(key)
        request = rpc.RangeRequest(key=key.encode(), revision=revision)

        async def call(ch: Any) -> Any:
            return await rpc.KVStub(ch).Range(request, timeout=self._timeout)

        resp, _ = await self._call("get", Retry.ALWAYS, call, key=key)
        return _entry(resp.kvs[0]) if resp.kvs else None

    async def history(self, key: str, *, limit: int = MAX_HISTORY_VERSIONS) -> list[Entry]:
        """Every version of ``key``'s current life, oldest first (from etcd's MVCC history)."""
        versions: list[Entry] = []
        entry = await self.get(key)
        while entry is not None and len(versions) < limit:
            versions.append(entry)
            if entry.version == 1:
                break
            entry = await self.get_at(key, entry.mod_revision - 1)
        return versions[::-1]

    async def put(
        self, key: str, value: bytes, *, expect_revision: int | None = None, lease: int = NO_LEASE
    ) -> int:
        check_key(key)
        check_value(key, value)
        put = rpc.PutRequest(key=key.encode(), value=value, lease=lease)
        if expect_revision is None:

            async def blind(ch: Any) -> Any:
                return await rpc.KVStub(ch).Put(put, timeout=self._timeout)

            resp, _ = await self._call("put", Retry.NEVER_RESEND, blind, key=key)
            return int(resp.header.revision)
        txn = rpc.TxnRequest(
            compare=[_compare(Compare(key, expect_revision))],
            success=[rpc.RequestOp(request_put=put)],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key.encode(), keys_only=True))],
        )
        resp = await self._guarded_txn("put", txn, key=key)
        if not resp.succeeded:
            kvs = resp.responses[0].response_range.kvs
            actual = int(kvs[0].mod_revision) if kvs else 0
            raise CasFailed("compare-and-swap failed", key=key, expected=expect_revision, actual=actual)
        return int(resp.header.revision)

    async def delete(self, key: str, *, expect_revision: int | None = None) -> bool:
        check_key(key)
        request = rpc.DeleteRangeRequest(key=key.encode())
        if expect_revision is None:

            async def blind(ch: Any) -> Any:
                return await rpc.KVStub(ch).DeleteRange(request, timeout=self._timeout)

            resp, _ = await self._call("delete", Retry.NEVER_RESEND, blind, key=key)
            return int(resp.deleted) > 0
        txn = rpc.TxnRequest(
            compare=[_compare(Compare(key, expect_revision))],
            success=[rpc.RequestOp(request_delete_range=request)],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=key.encode(), keys_only=True))],
        )
        resp = await self._guarded_txn("delete", txn, key=key)
        if not resp.succeeded:
            kvs = resp.responses[0].response_range.kvs
            actual = int(kvs[0].mod_revision) if kvs else 0
            raise CasFailed("compare-and-swap failed", key=key, expected=expect_revision, actual=actual)
        return int(resp.responses[0].response_delete_range.deleted) > 0

    async def _guarded_txn(self, what: str, txn: Any, **ctx: Any) -> Any:
        """A txn whose compares guard every key it writes (its failure branch only reads)."""

        async def call(ch: Any) -> Any:
            return await rpc.KVStub(ch).Txn(txn, timeout=self._timeout)

        resp, ambiguous = await self._call(what, Retry.GUARDED, call, **ctx)
        if not resp.succeeded and ambiguous:
            raise StoreOutcomeUnknown(
                "etcd write outcome unknown: compare failed on a retry after a lost answer", op=what, **ctx
            )
        return resp

    async def range(self, prefix: str, *, limit: int = MAX_RANGE_RESULTS) -> list[Entry]:
        if not 1 <= limit <= MAX_RANGE_RESULTS:
            raise StoreLimitError("range limit out of bounds", limit=limit, max=MAX_RANGE_RESULTS)
        start = prefix.encode() or b"\0"
        request = rpc.RangeRequest(
            key=start,
            range_end=prefix_end(prefix.encode()),
            limit=limit,
            sort_order=rpc.RangeRequest.ASCEND,
            sort_target=rpc.RangeRequest.KEY,
        )

        async def call(ch: Any) -> Any:
            return await rpc.KVStub(ch).Range(request, timeout=self._timeout)

        resp, _ = await self._call("range", Retry.ALWAYS, call, prefix=prefix)
        return [_entry(kv) for kv in resp.kvs]

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        check_txn(compares, success, failure)
        request = rpc.TxnRequest(
            compare=[_compare(c) for c in compares],
            success=[_request_op(op) for op in success],
            failure=[_request_op(op) for op in failure],
        )

        async def call(ch: Any) -> Any:
            return await rpc.KVStub(ch).Txn(request, timeout=self._timeout)

        guarded = txn_is_guarded(compares, success, failure)
        resp, ambiguous = await self._call("txn", Retry.GUARDED if guarded else Retry.NEVER_RESEND, call)
        if guarded and not resp.succeeded and ambiguous:
            raise StoreOutcomeUnknown(
                "etcd txn outcome unknown: compare failed on a retry after a lost answer",
                keys=",".join(sorted({c.key for c in compares})),
            )
        return TxnResult(succeeded=bool(resp.succeeded), revision=int(resp.header.revision))

    async def revision(self) -> int:
        request = rpc.RangeRequest(key=b"\0", range_end=b"\0", count_only=True)

        async def call(ch: Any) -> Any:
            return await rpc.KVStub(ch).Range(request, timeout=self._timeout)

        resp, _ = await self._call("revision", Retry.ALWAYS, call)
        return int(resp.header.revision)

    # -- leases -------------------------------------------------------------------------------------

    async def lease_grant(self, ttl: int) -> Lease:
        check_ttl(ttl)

        # A grant resent after a lost answer at worst leaves an unused lease that expires by itself.
        async def call(ch: Any) -> Any:
            return await rpc.LeaseStub(ch).LeaseGrant(rpc.LeaseGrantRequest(TTL=ttl), timeout=self._timeout)

        resp, _ = await self._call("lease_grant", Retry.ALWAYS, call, ttl=ttl)
        if resp.error:
            raise StoreError("etcd refused the lease", ttl=ttl, reason=resp.error)
        return Lease(int(resp.ID), int(resp.TTL))

    async def lease_keepalive(self, lease_id: int) -> int:
        async def call(ch: Any) -> Any:
            stream = rpc.LeaseStub(ch).LeaseKeepAlive(timeout=self._timeout)
            try:
                await stream.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                return await stream.read()
            finally:
                stream.cancel()

        resp, _ = await self._call("lease_keepalive", Retry.ALWAYS, call, lease=lease_id)
        if resp is grpc.aio.EOF or int(resp.TTL) <= 0:
            raise LeaseNotFound("lease not found", lease=lease_id)
        return int(resp.TTL)

    async def lease_revoke(self, lease_id: int) -> None:
        async def call(ch: Any) -> Any:
            return await rpc.LeaseStub(ch).LeaseRevoke(
                rpc.LeaseRevokeRequest(ID=lease_id), timeout=self._timeout
            )

        try:
            await self._call("lease_revoke", Retry.GUARDED, call, lease=lease_id)
        except LeaseNotFound as exc:
            # After a lost answer, "not found" on the retry is most likely our own revocation: the
            # lease is gone either way, which is what the caller asked for.
            if not exc.context.get("after_lost_answer"):
                raise

    async def lease_ttl(self, lease_id: int) -> int | None:
        async def call(ch: Any) -> Any:
            return await rpc.LeaseStub(ch).LeaseTimeToLive(
                rpc.LeaseTimeToLiveRequest(ID=lease_id), timeout=self._timeout
            )

        resp, _ = await self._call("lease_ttl", Retry.ALWAYS, call, lease=lease_id)
        ttl = int(resp.TTL)
        return None if ttl < 0 else ttl

    async def close(self) -> None:
        self._closed = True
        channels, self._channels = self._channels, [None] * len(self.endpoints)
        for channel in channels:
            if channel is not None:
                await channel.close()
