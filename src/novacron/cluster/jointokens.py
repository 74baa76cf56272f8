"""Bootstrap tokens: short-lived, single-use, and pinning the cluster CA.

Format (one string the operator copies to the joining host)::

    nvcj1.<id: 16 base32>.<secret: 43 base64url>.<sha256 of the CA certificate's DER: 64 hex>

The first three parts authenticate the join (the store keeps only the SHA-256 of the whole secret
part, like API tokens); the last part is what the joining host checks the server's CA against before
it trusts anything the server says (kubeadm's discovery hash, carried inside the token). A token is
consumed by a compare-and-swap on its record, so two joins racing with one token cannot both win.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationError

from novacron.cluster.errors import (
    ClusterSettingError,
    JoinTokenExpired,
    JoinTokenInvalid,
    JoinTokenUsed,
)
from novacron.store.base import CasFailed, Delete, KeyValueStore, StoreError

JOIN_TOKEN_PREFIX = "/novacron/cluster/join-tokens/"
JOIN_TOKEN_VERSION = "nvcj1"
_JOIN_RE = re.compile(r"^nvcj1\.([a-z2-7]{16})\.([A-Za-z0-9_-]{43})\.([0-9a-f]{64})$")
MAX_JOIN_TOKEN_CHARS = 200


@dataclass(frozen=True)
class JoinTokenLimits:
    default_ttl_s: float = 15 * 60.0
    min_ttl_s: float = 60.0
    max_ttl_s: float = 24 * 3600.0  # bootstrap tokens are for joining now, not for later
    max_tokens: int = 256  # records kept (used and expired ones are pruned first)
    keep_ended_s: float = 3600.0  # ended records stay this long, so reuse says "used", not "invalid"


class JoinTokenRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    secret_sha256: str
    created_at: float
    expires_at: float
    created_by: str
    used_at: float | None = None
    used_by: str | None = None  # the node that joined with it


@dataclass(frozen=True)
class JoinToken:
    """A parsed bootstrap token."""

    id: str
    secret: str
    ca_sha256: str

    def __str__(self) -> str:
        return f"{JOIN_TOKEN_VERSION}.{self.id}.{self.secret}.{self.ca_sha256}"


@dataclass(frozen=True)
class IssuedJoinToken:
    token: JoinToken
    record: JoinTokenRecord


def parse_join_token(text: str) -> JoinToken:
    """Split a presented token; JoinTokenInvalid (without echoing the secret) if it is not one."""
    text = text.strip()
    m = _JOIN_RE.match(text) if len(text) <= MAX_JOIN_TOKEN_CHARS else None
    if m is None:
        raise JoinTokenInvalid(
            "not a bootstrap token (expected nvcj1.<id>.<secret>.<ca sha256>; create one with "
            "`novacron cluster token create`)"
        )
    return JoinToken(id=m.group(1), secret=m.group(2), ca_sha256=m.group(3))


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _new_id() -> str:
    return base64.b32encode(secrets.token_bytes(10)).decode().lower()


def _key(token_id: str) -> str:
    return JOIN_TOKEN_PREFIX + token_id


def _decode(value: bytes, key: str) -> JoinTokenRecord:
    try:
        return JoinTokenRecord.model_validate_json(value)
    except ValidationError as exc:
        raise StoreError(
            "corrupt bootstrap token record", key=key, reason=str(exc.errors()[0].get("msg"))
        ) from None


class JoinTokenStore:
    def __init__(
        self,
        store: KeyValueStore,
        *,
        limits: JoinTokenLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.limits = limits or JoinTokenLimits()
        self.clock = clock

    async def create(self, *, ca_sha256: str, ttl_s: float | None, created_by: str) -> IssuedJoinToken:
        lim = self.limits
        ttl = lim.default_ttl_s if ttl_s is None else ttl_s
        if not lim.min_ttl_s <= ttl <= lim.max_ttl_s:
            raise ClusterSettingError(
                f"bootstrap token lifetime must be between {lim.min_ttl_s:.0f} s and {lim.max_ttl_s:.0f} s",
                field="ttl_s",
                ttl_s=ttl,
            )
        if not re.fullmatch(r"[0-9a-f]{64}", ca_sha256):
            raise ClusterSettingError("CA fingerprint must be 64 lowercase hex digits", field="ca_sha256")
        await self._prune()
        if len(await self.store.range(JOIN_TOKEN_PREFIX, limit=lim.max_tokens + 1)) >= lim.max_tokens:
            raise ClusterSettingError("too many live bootstrap tokens", limit=lim.max_tokens)
        now = self.clock()
        token = JoinToken(id=_new_id(), secret=secrets.token_urlsafe(32), ca_sha256=ca_sha256)
        record = JoinTokenRecord(
            id=token.id,
            secret_sha256=_digest(token.secret),
            created_at=now,
            expires_at=now + ttl,
            created_by=created_by,
        )
        try:
            await self.store.put(_key(token.id), record.model_dump_json().encode(), expect_revision=0)
        except CasFailed:
            raise StoreError("bootstrap token id collision", token_id=token.id) from None
        return IssuedJoinToken(token=token, record=record)

    async def consume(self, presented: str, *, node: str) -> JoinTokenRecord:
        """Check a presented token and mark it used by ``node``, atomically (compare-and-swap)."""
        token = parse_join_token(presented)
        entry = await self.store.get(_key(token.id))
        # Unknown id and wrong secret answer alike: the answer does not reveal which ids exist.
        if entry is None:
            raise JoinTokenInvalid("invalid bootstrap token", token_id=token.id)
        record = _decode(entry.value, entry.key)
        if not hmac.compare_digest(record.secret_sha256, _digest(token.secret)):
            raise JoinTokenInvalid("invalid bootstrap token", token_id=token.id)
        if record.used_at is not None:
            raise JoinTokenUsed(
                "bootstrap token was already used (they are single-use)",
                token_id=token.id,
                used_by=record.used_by,
            )
        if self.clock() >= record.expires_at:
            raise JoinTokenExpired("bootstrap token has expired", token_id=token.id)
        used = record.model_copy(update={"used_at": self.clock(), "used_by": node})
        try:
            await self.store.put(
                entry.key, used.model_dump_json().encode(), expect_revision=entry.mod_revision
            )
        except CasFailed:
            raise JoinTokenUsed("bootstrap token was used by a concurrent join", token_id=token.id) from None
        return used

    async def list(self) -> list[JoinTokenRecord]:
        entries = await self.store.range(JOIN_TOKEN_PREFIX, limit=self.limits.max_tokens + 1)
        return sorted((_decode(e.value, e.key) for e in entries), key=lambda r: r.created_at)

    async def _prune(self) -> None:
        horizon = self.clock() - self.limits.keep_ended_s
        dead = [
            r.id
            for r in await self.list()
            if (r.used_at is not None and r.used_at < horizon) or r.expires_at < horizon
        ]
        if dead:
            await self.store.txn([], [Delete(_key(i)) for i in dead[:64]])


__all__ = [
    "JOIN_TOKEN_PREFIX",
    "IssuedJoinToken",
    "JoinToken",
    "JoinTokenLimits",
    "JoinTokenRecord",
    "JoinTokenStore",
    "parse_join_token",
]
