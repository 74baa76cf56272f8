"""API bearer tokens: random secrets shown once, stored hashed with a role, an expiry and a revoked flag.

A token reads ``nvc1.<id>.<secret>``: ``id`` (16 base32 characters) names the stored record, so a
check is one store read; ``secret`` carries 256 random bits. The store keeps only SHA-256 of the whole
token. A slow password hash (argon2, bcrypt) protects *low-entropy* secrets from guessing after a
database leak; against a 256-bit random secret a single SHA-256 is already beyond brute force, and a
slow hash would only add its cost to every API request. Digests are compared in constant time.

Records live under ``/novacron/tokens/<id>`` in the cluster store, so every API server of a cluster
(and etcd replicas) sees a revocation at once; nothing is cached.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationError

from novacron.errors import NotFoundError, UserError
from novacron.security.rbac import AuthError, Role
from novacron.store.base import CasFailed, Delete, KeyValueStore, StoreError

TOKEN_PREFIX = "/novacron/tokens/"
TOKEN_FORMAT_VERSION = "nvc1"
ID_CHARS = 16  # base32: 80 random bits, unique without coordination
SECRET_BYTES = 32
_TOKEN_RE = re.compile(r"^nvc1\.([a-z2-7]{16})\.([A-Za-z0-9_-]{43})$")
ID_PATTERN = r"^[a-z2-7]{16}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"
MAX_PRESENTED_BYTES = 256  # anything longer is not one of ours: refuse before parsing

DAY_S = 86_400.0


@dataclass(frozen=True)
class TokenLimits:
    default_ttl_s: float = 30 * DAY_S
    bootstrap_ttl_s: float = 90 * DAY_S  # the first admin token, made by `cluster init`
    min_ttl_s: float = 60.0
    max_ttl_s: float = 365 * DAY_S
    max_tokens: int = 1_000  # stored records, expired and revoked ones included until pruned
    keep_dead_s: float = 7 * DAY_S  # expired/revoked records stay listable this long, then are pruned
    prune_batch: int = 64  # deletions per prune pass (bounded work on the create path)


class TokenSettingError(UserError):
    """A token was asked for with an invalid name, role or lifetime."""


class TokenLimitError(UserError):
    """The store already holds the maximum number of tokens."""


class TokenNotFound(NotFoundError):
    """No token with that id."""


class TokenInvalid(AuthError):
    """The presented token is malformed, unknown or its secret does not match."""


class TokenExpired(AuthError):
    """The presented token was valid but its lifetime is over."""


class TokenRevoked(AuthError):
    """The presented token was revoked."""


class TokenRecord(BaseModel):
    """What the store remembers about a token (never the secret itself)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    name: str
    role: Role
    created_at: float
    expires_at: float
    created_by: str
    secret_sha256: str
    revoked_at: float | None = None
    revoked_by: str | None = None

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if now >= self.expires_at else "active"

    def public_view(self, now: float) -> dict[str, object]:
        """Everything but the digest, for listings."""
        data = self.model_dump(mode="json", exclude={"secret_sha256"})
        data["state"] = self.state(now)
        return data


@dataclass(frozen=True)
class IssuedToken:
    """A new token: the record as stored and the secret, which is shown this once and never again."""

    record: TokenRecord
    token: str


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def _new_id() -> str:
    return base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()


def _new_secret() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii").rstrip("=")


def parse_token(presented: str) -> tuple[str, str]:
    """Split a presented token into (id, secret); TokenInvalid if it is not of our format."""
    if len(presented) > MAX_PRESENTED_BYTES:
        raise TokenInvalid("invalid token", reason="too long")
    m = _TOKEN_RE.match(presented)
    if m is None:
        raise TokenInvalid("invalid token", reason="not a NovaCron token")
    return m.group(1), m.group(2)


def token_id_of(presented: str) -> str | None:
    """The id part of a well-formed token, without checking it (rate limiting, audit of failures)."""
    try:
        return parse_token(presented)[0]
    except TokenInvalid:
        return None


def _key(token_id: str) -> str:
    return TOKEN_PREFIX + token_id


def _decode(value: bytes, key: str) -> TokenRecord:
    try:
        return TokenRecord.model_validate_json(value)
    except ValidationError as exc:
        raise StoreError("corrupt token record", key=key, reason=str(exc.errors()[0].get("msg"))) from None


def check_name(name: str) -> str:
    if not re.match(NAME_PATTERN, name):
        raise TokenSettingError(
            f"invalid token name {name!r}: 1-64 letters, digits and . _ @ -, starting alphanumeric",
            name=name[:80],
        )
    return name


class TokenStore:
    """Tokens on top of the cluster store. ``clock`` is injectable so tests control expiry."""

    def __init__(
        self,
        store: KeyValueStore,
        *,
        limits: TokenLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.limits = limits or TokenLimits()
        self.clock = clock

    def _ttl(self, ttl_s: float | None, default: float) -> float:
        ttl = default if ttl_s is None else ttl_s
        lim = self.limits
        if not lim.min_ttl_s <= ttl <= lim.max_ttl_s:
            raise TokenSettingError(
                f"token lifetime must be between {lim.min_ttl_s:.0f} s and {lim.max_ttl_s:.0f} s",
                ttl_s=ttl,
            )
        return ttl

    async def create(
        self, name: str, role: Role, *, ttl_s: float | None = None, created_by: str
    ) -> IssuedToken:
        """Issue a token; the returned secret is the only copy that will ever exist."""
        check_name(name)
        ttl = self._ttl(ttl_s, self.limits.default_ttl_s)
        records = await self._all()
        if len(records) >= self.limits.max_tokens:
            records = await self.prune(records)
        if len(records) >= self.limits.max_tokens:
            raise TokenLimitError(
                "too many tokens: revoke some (they are pruned a while after they end)",
                limit=self.limits.max_tokens,
            )
        now = self.clock()
        token_id = _new_id()
        token = f"{TOKEN_FORMAT_VERSION}.{token_id}.{_new_secret()}"
        record = TokenRecord(
            id=token_id,
            name=name,
            role=role,
            created_at=now,
            expires_at=now + ttl,
            created_by=created_by,
            secret_sha256=_digest(token),
        )
        try:
            await self.store.put(_key(token_id), record.model_dump_json().encode(), expect_revision=0)
        except CasFailed:  # 80 random bits colliding means the random source is broken
            raise StoreError("token id collision", token_id=token_id) from None
        return IssuedToken(record=record, token=token)

    async def bootstrap_admin(
        self, name: str = "admin", *, ttl_s: float | None = None, created_by: str = "bootstrap"
    ) -> IssuedToken:
        """The first admin token of a cluster (``cluster init`` and ``novacron token bootstrap``)."""
        return await self.create(
            name, Role.ADMIN, ttl_s=self._ttl(ttl_s, self.limits.bootstrap_ttl_s), created_by=created_by
        )

    async def _all(self) -> list[TokenRecord]:
        entries = await self.store.range(TOKEN_PREFIX, limit=self.limits.max_tokens + self.limits.prune_batch)
        return [_decode(e.value, e.key) for e in entries]

    async def list(self) -> builtins.list[TokenRecord]:
        return sorted(await self._all(), key=lambda r: r.created_at)

    async def get(self, token_id: str) -> TokenRecord:
        if not re.match(ID_PATTERN, token_id):
            raise TokenNotFound(f"no token with id {token_id!r}", token_id=token_id[:40])
        entry = await self.store.get(_key(token_id))
        if entry is None:
            raise TokenNotFound(f"no token with id {token_id!r}", token_id=token_id)
        return _decode(entry.value, entry.key)

    async def revoke(self, token_id: str, *, revoked_by: str) -> TokenRecord:
        """Mark a token revoked (idempotent: revoking twice keeps the first revocation)."""
        for _ in range(8):
            entry = await self.store.get(_key(token_id)) if re.match(ID_PATTERN, token_id) else None
            if entry is None:
                raise TokenNotFound(f"no token with id {token_id!r}", token_id=token_id[:40])
            record = _decode(entry.value, entry.key)
            if record.revoked_at is not None:
                return record
            revoked = record.model_copy(update={"revoked_at": self.clock(), "revoked_by": revoked_by})
            try:
                await self.store.put(
                    entry.key, revoked.model_dump_json().encode(), expect_revision=entry.mod_revision
                )
            except CasFailed:
                continue
            return revoked
        raise StoreError("token revocation kept conflicting", token_id=token_id)

    async def prune(self, records: Sequence[TokenRecord] | None = None) -> builtins.list[TokenRecord]:
        """Delete up to ``prune_batch`` records that ended more than ``keep_dead_s`` ago; the rest."""
        records = await self._all() if records is None else records
        now = self.clock()
        horizon = now - self.limits.keep_dead_s
        dead = [
            r
            for r in records
            if (r.revoked_at is not None and r.revoked_at < horizon) or r.expires_at < horizon
        ][: self.limits.prune_batch]
        if dead:
            await self.store.txn([], [Delete(_key(r.id)) for r in dead])
        gone = {r.id for r in dead}
        return [r for r in records if r.id not in gone]

    async def authenticate(self, presented: str) -> TokenRecord:
        """The record of a valid token; TokenInvalid / TokenExpired / TokenRevoked otherwise."""
        token_id, _ = parse_token(presented)
        entry = await self.store.get(_key(token_id))
        # Unknown id and wrong secret answer alike, so the answer does not reveal which ids exist.
        if entry is None:
            raise TokenInvalid("invalid token", token_id=token_id)
        record = _decode(entry.value, entry.key)
        if not hmac.compare_digest(record.secret_sha256, _digest(presented)):
            raise TokenInvalid("invalid token", token_id=token_id)
        if record.revoked_at is not None:
            raise TokenRevoked("token was revoked", token_id=token_id, name=record.name)
        if self.clock() >= record.expires_at:
            raise TokenExpired("token has expired", token_id=token_id, name=record.name)
        return record


__all__ = [
    "ID_PATTERN",
    "IssuedToken",
    "TokenExpired",
    "TokenInvalid",
    "TokenLimitError",
    "TokenLimits",
    "TokenNotFound",
    "TokenRecord",
    "TokenRevoked",
    "TokenSettingError",
    "TokenStore",
    "check_name",
    "parse_token",
    "token_id_of",
]
