"""API tokens on a real SQLite store, with a controlled clock for expiry."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from novacron.security.rbac import Role
from novacron.security.tokens import (
    TOKEN_PREFIX,
    TokenExpired,
    TokenInvalid,
    TokenLimitError,
    TokenLimits,
    TokenNotFound,
    TokenRevoked,
    TokenSettingError,
    TokenStore,
    parse_token,
    token_id_of,
)
from novacron.store.sqlite import SqliteStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = SqliteStore(tmp_path / "store.db")
    yield s
    await s.close()


async def test_issue_and_authenticate(store: SqliteStore) -> None:
    clock = Clock()
    tokens = TokenStore(store, clock=clock)
    issued = await tokens.create("ci", Role.OPERATOR, ttl_s=3600, created_by="admin")
    token_id, secret = parse_token(issued.token)
    assert token_id == issued.record.id and len(secret) == 43
    record = await tokens.authenticate(issued.token)
    assert (record.name, record.role, record.expires_at) == ("ci", Role.OPERATOR, clock.now + 3600)


async def test_only_the_hash_is_stored(store: SqliteStore) -> None:
    tokens = TokenStore(store)
    issued = await tokens.create("ci", Role.VIEWER, created_by="t")
    _, secret = parse_token(issued.token)
    raw = b"".join(e.value for e in await store.range(TOKEN_PREFIX))
    assert secret.encode() not in raw
    assert hashlib.sha256(issued.token.encode()).hexdigest().encode() in raw
    assert "secret_sha256" not in issued.record.public_view(time.time())


async def test_wrong_secret_and_unknown_id_answer_alike(store: SqliteStore) -> None:
    tokens = TokenStore(store)
    issued = await tokens.create("ci", Role.VIEWER, created_by="t")
    token_id, secret = parse_token(issued.token)
    forged = f"nvc1.{token_id}.{'A' * 43}"
    unknown = f"nvc1.{'a' * 16}.{secret}"
    messages = set()
    for bad in (forged, unknown):
        with pytest.raises(TokenInvalid) as info:
            await tokens.authenticate(bad)
        messages.add(info.value.message)
    assert messages == {"invalid token"}


@pytest.mark.parametrize(
    "presented",
    [
        "",
        "Bearer x",
        "nvc1.short.secret",
        "nvc2." + "a" * 16 + "." + "A" * 43,
        "x" * 5000,
        "nvc1." + "A" * 16 + "." + "A" * 43,
    ],
)
async def test_malformed_tokens_are_invalid_without_a_store_read(store: SqliteStore, presented: str) -> None:
    with pytest.raises(TokenInvalid):
        await TokenStore(store).authenticate(presented)
    assert token_id_of(presented) is None


async def test_expiry_follows_the_clock(store: SqliteStore) -> None:
    clock = Clock()
    tokens = TokenStore(store, clock=clock)
    issued = await tokens.create("ci", Role.VIEWER, ttl_s=60, created_by="t")
    clock.now += 59.9
    await tokens.authenticate(issued.token)
    clock.now += 0.1
    with pytest.raises(TokenExpired) as info:
        await tokens.authenticate(issued.token)
    assert info.value.context["token_id"] == issued.record.id
    assert issued.record.state(clock.now) == "expired"


async def test_revocation_is_immediate_and_idempotent(store: SqliteStore) -> None:
    clock = Clock()
    tokens = TokenStore(store, clock=clock)
    issued = await tokens.create("ci", Role.ADMIN, created_by="t")
    first = await tokens.revoke(issued.record.id, revoked_by="alice")
    clock.now += 10
    again = await tokens.revoke(issued.record.id, revoked_by="bob")
    assert again.revoked_at == first.revoked_at and again.revoked_by == "alice"
    with pytest.raises(TokenRevoked):
        await tokens.authenticate(issued.token)
    # A second server on the same store (no cache) refuses it too.
    with pytest.raises(TokenRevoked):
        await TokenStore(store).authenticate(issued.token)


async def test_revoke_and_get_unknown(store: SqliteStore) -> None:
    tokens = TokenStore(store)
    for bad in ("a" * 16, "../../etc", "A" * 16):
        with pytest.raises(TokenNotFound):
            await tokens.revoke(bad, revoked_by="t")
        with pytest.raises(TokenNotFound):
            await tokens.get(bad)


@pytest.mark.parametrize(
    ("name", "ttl"), [("", 60), ("-x", 60), ("a b", 60), ("x" * 65, 60), ("ok", 59), ("ok", 366 * 86400)]
)
async def test_bad_settings_are_refused(store: SqliteStore, name: str, ttl: float) -> None:
    with pytest.raises(TokenSettingError):
        await TokenStore(store).create(name, Role.VIEWER, ttl_s=ttl, created_by="t")


async def test_bootstrap_admin(store: SqliteStore) -> None:
    clock = Clock()
    tokens = TokenStore(store, clock=clock)
    issued = await tokens.bootstrap_admin()
    assert issued.record.role == Role.ADMIN
    assert issued.record.expires_at == clock.now + TokenLimits().bootstrap_ttl_s
    assert (await tokens.authenticate(issued.token)).name == "admin"


async def test_token_count_is_bounded_and_dead_tokens_are_pruned(store: SqliteStore) -> None:
    clock = Clock()
    limits = TokenLimits(max_tokens=3, keep_dead_s=100, prune_batch=2)
    tokens = TokenStore(store, limits=limits, clock=clock)
    old = [await tokens.create(f"t{i}", Role.VIEWER, ttl_s=60, created_by="t") for i in range(3)]
    with pytest.raises(TokenLimitError):
        clock.now += 120  # expired, but not yet for keep_dead_s
        await tokens.create("more", Role.VIEWER, created_by="t")
    clock.now += 100  # now dead long enough: the next create prunes (at most prune_batch)
    fresh = await tokens.create("more", Role.VIEWER, created_by="t")
    remaining = {r.id for r in await tokens.list()}
    assert fresh.record.id in remaining
    assert len(remaining) == 2  # two of the three old ones pruned, one left for the next pass
    assert len(remaining & {o.record.id for o in old}) == 1
