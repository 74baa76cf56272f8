"""The audit log: one record per write request (who, what, target, result, when), append-only in the store.

Records live under ``/novacron/audit/<time_ns:020d>.<8 hex>``: keys sort by time, the random suffix
keeps two writers in one nanosecond apart, and every append is a put that requires the key not to
exist, so a record is never overwritten. Because they live in the cluster store they replicate with
etcd like every other cluster fact. Keys follow each API server's wall clock; the store revision of
each record (returned on read) is the true commit order across servers.

The store interface ranges by prefix only, so reading a time window walks it as decimal-aligned
blocks of the zero-padded nanosecond timestamp (a prefix of the key is a block of 10^k ns). A window
splits into at most 9 blocks per digit on each side, and a read stops as soon as it has its page, so
every read is bounded however large the log grows. Records older than ``max_age_s`` are pruned in
small batches as new ones arrive.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from novacron.errors import NovacronError, UserError
from novacron.observability.log import log_event
from novacron.observability.metrics import AUDIT_FAILURES
from novacron.store.base import (
    MAX_RANGE_RESULTS,
    MAX_TXN_OPS,
    CasFailed,
    Delete,
    Entry,
    KeyValueStore,
    StoreError,
)

log = logging.getLogger("novacron.audit")

AUDIT_PREFIX = "/novacron/audit/"
TIME_DIGITS = 20  # nanoseconds since the epoch, zero-padded: good until the year 5138
CURSOR_PATTERN = r"^\d{20}\.[0-9a-f]{8}$"
MAX_TEXT = 512  # longest free-text field kept (error messages, paths)


@dataclass(frozen=True)
class AuditLimits:
    max_age_s: float = 90 * 86_400.0
    prune_every: int = 256  # appends between two prune passes
    prune_batch: int = 256  # records deleted per pass at most
    max_page: int = 1_000  # records per read


class AuditQueryError(UserError):
    """A read of the audit log asked for an invalid window or cursor."""


Result = str  # "ok" | "denied" | "invalid" | "error"


class AuditRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    time: float
    request_id: str
    actor: str = Field(description="token:<id>(<name>), local:<name>, or anonymous")
    role: str | None = None
    action: str = Field(description="the route's operation id, e.g. vm.start")
    method: str
    path: str
    target: str | None = None
    status: int
    result: str = Field(description="ok | denied | invalid | error")
    error: str | None = None
    client: str | None = None
    node: str | None = None


class AuditEntry(BaseModel):
    """A stored record with its key (a cursor for the next page) and store revision."""

    model_config = ConfigDict(frozen=True)

    key: str
    revision: int
    record: AuditRecord


@dataclass(frozen=True)
class AuditPage:
    entries: list[AuditEntry]
    next_cursor: str | None  # pass as ``after`` to continue; None when the window is exhausted


def result_of(status: int) -> Result:
    if status < 400:
        return "ok"
    if status in (401, 403):
        return "denied"
    if status < 500:
        return "invalid"
    return "error"


def clip(text: str | None) -> str | None:
    return None if text is None else text[:MAX_TEXT]


def decimal_blocks(lo: int, hi: int, width: int = TIME_DIGITS) -> Iterator[str]:
    """Key prefixes, ascending, whose blocks of zero-padded ``width``-digit numbers cover [lo, hi)."""
    while lo < hi:
        k = 0
        while k < width and lo % 10 ** (k + 1) == 0 and lo + 10 ** (k + 1) <= hi:
            k += 1
        yield f"{lo:0{width}d}"[: width - k]
        lo += 10**k


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


class AuditLog:
    def __init__(
        self,
        store: KeyValueStore,
        *,
        node: str | None = None,
        limits: AuditLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.node = node
        self.limits = limits or AuditLimits()
        self.clock = clock
        self._appends = 0

    async def append(self, record: AuditRecord) -> str:
        """Store ``record``; returns its key. Raises StoreError if the store fails."""
        if record.node is None and self.node is not None:
            record = record.model_copy(update={"node": self.node})
        data = record.model_dump_json().encode()
        for _ in range(4):
            key = f"{AUDIT_PREFIX}{_ns(record.time):0{TIME_DIGITS}d}.{secrets.token_hex(4)}"
            try:
                await self.store.put(key, data, expect_revision=0)
            except CasFailed:  # same nanosecond and same 32 random bits: draw again
                continue
            break
        else:
            raise StoreError("could not find a free audit key", time=record.time)
        self._appends += 1
        if self._appends % self.limits.prune_every == 0:
            await self.prune()
        return key

    async def record(self, record: AuditRecord) -> str | None:
        """Append, and if the store fails keep the record in the error log so it is not lost."""
        try:
            return await self.append(record)
        except NovacronError as exc:
            AUDIT_FAILURES.inc()
            log_event(
                log,
                "audit.append_failed",
                logging.ERROR,
                reason=str(exc),
                **record.model_dump(mode="json"),
            )
            return None

    async def read(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> AuditPage:
        """Records in [since, until) in key order, after the cursor ``after``, at most ``limit``."""
        if not 1 <= limit <= self.limits.max_page:
            raise AuditQueryError(
                "audit page size out of range",
                field="limit",
                location="query.limit",
                limit=limit,
                max=self.limits.max_page,
            )
        lo = _ns(since) if since is not None else 0
        hi = _ns(until) if until is not None else 10**TIME_DIGITS
        if after is not None:
            if not re.match(CURSOR_PATTERN, after):
                raise AuditQueryError(
                    "invalid audit cursor", field="after", location="query.after", after=after[:40]
                )
            lo = max(lo, int(after[:TIME_DIGITS]))
        if lo >= hi:
            if since is not None and until is not None and since >= until:
                raise AuditQueryError(
                    "audit window is empty: since must be before until",
                    field="until",
                    location="query.until",
                )
            return AuditPage([], None)
        entries: list[AuditEntry] = []
        for block, skip_upto in self._blocks(lo, hi, after):
            # The cursor's own nanosecond holds a handful of records at most: read it whole, since
            # the ones up to the cursor are dropped here and must not use up the page.
            want = MAX_RANGE_RESULTS if skip_upto else limit - len(entries)
            for e in await self.store.range(AUDIT_PREFIX + block, limit=want):
                suffix = e.key[len(AUDIT_PREFIX) :]
                if skip_upto is not None and suffix <= skip_upto:
                    continue
                entries.append(AuditEntry(key=suffix, revision=e.mod_revision, record=_decode(e)))
                if len(entries) == limit:
                    return AuditPage(entries, suffix)
        return AuditPage(entries, None)

    @staticmethod
    def _blocks(lo: int, hi: int, after: str | None) -> Iterator[tuple[str, str | None]]:
        """(prefix, skip keys up to this one) pairs covering the window in key order."""
        if after is not None and int(after[:TIME_DIGITS]) == lo:
            yield after[:TIME_DIGITS] + ".", after
            lo += 1
        for block in decimal_blocks(lo, hi):
            yield block, None

    async def prune(self) -> int:
        """Delete up to ``prune_batch`` records older than ``max_age_s``; how many were deleted."""
        horizon = _ns(self.clock() - self.limits.max_age_s)
        keys: list[str] = []
        for block in decimal_blocks(0, horizon):
            want = self.limits.prune_batch - len(keys)
            keys += [e.key for e in await self.store.range(AUDIT_PREFIX + block, limit=want)]
            if len(keys) >= self.limits.prune_batch:
                break
        for i in range(0, len(keys), MAX_TXN_OPS):
            await self.store.txn([], [Delete(k) for k in keys[i : i + MAX_TXN_OPS]])
        return len(keys)


def _decode(entry: Entry) -> AuditRecord:
    try:
        return AuditRecord.model_validate_json(entry.value)
    except ValidationError as exc:
        raise StoreError(
            "corrupt audit record", key=entry.key, reason=str(exc.errors()[0].get("msg"))
        ) from None


__all__ = [
    "AUDIT_PREFIX",
    "CURSOR_PATTERN",
    "AuditEntry",
    "AuditLimits",
    "AuditLog",
    "AuditPage",
    "AuditQueryError",
    "AuditRecord",
    "clip",
    "decimal_blocks",
    "result_of",
]
