"""Pure logic around the handshake: version/capability negotiation, the session table (virtual time)
and the per-peer attempt limiter."""

from __future__ import annotations

import itertools

import pytest

from novacron.dwcp.errors import CapacityError, DwcpConfigError, JoinRefused
from novacron.dwcp.negotiation import Capabilities, Mode, VersionRange
from novacron.dwcp.ratelimit import AttemptLimiter
from novacron.dwcp.session import SessionLimits, SessionTable, join_token
from novacron.security.identity import NodeIdentity

OWNER = NodeIdentity("dc1", "src", "agent")
MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("ours", "theirs", "expected"),
    [
        ((3, 3), (3, 3), 3),
        ((3, 5), (2, 4), 4),
        ((1, 9), (4, 4), 4),
        ((3, 3), (4, 5), None),
        ((5, 6), (1, 4), None),
    ],
)
def test_version_negotiation_picks_the_highest_common(
    ours: tuple[int, int], theirs: tuple[int, int], expected: int | None
) -> None:
    assert VersionRange(*ours).negotiate(VersionRange(*theirs)) == expected
    assert VersionRange(*theirs).negotiate(VersionRange(*ours)) == expected


def test_invalid_version_range() -> None:
    with pytest.raises(DwcpConfigError, match=r"5\.\.4"):
        VersionRange(5, 4)


def test_capability_intersection_and_cover() -> None:
    a = Capabilities(
        codecs=("hde1", "zstd", "lz4"), max_streams=8, max_frame_size=2 * MiB, features=frozenset({"x", "y"})
    )
    b = Capabilities(
        codecs=("lz4", "zstd"), max_streams=16, max_frame_size=MiB, features=frozenset({"y", "z"})
    )
    both = a.intersect(b)
    assert both == Capabilities(
        codecs=("zstd", "lz4"), max_streams=8, max_frame_size=MiB, features=frozenset({"y"})
    )
    assert b.intersect(a).codecs == ("lz4", "zstd")  # each side's own preference order
    assert a.covers(both) and b.covers(both) and not both.covers(a)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_streams": 0},
        {"max_streams": 1000},
        {"max_frame_size": 1024},
        {"max_frame_size": 64 * MiB},
        {"codecs": ("zstd", "zstd")},
        {"codecs": ("",)},
        {"features": frozenset({"x" * 40})},
        {"codecs": tuple(f"c{i}" for i in range(40))},
    ],
)
def test_invalid_capabilities_are_config_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(DwcpConfigError):
        Capabilities(**kwargs)  # type: ignore[arg-type]


def test_peer_offer_is_clamped_to_our_hard_limits() -> None:
    caps = Capabilities.from_wire(("zstd", "zstd"), 60000, 2**32 - 1, ("f",))
    assert caps.codecs == ("zstd",) and caps.max_streams == 256 and caps.max_frame_size == 16 * MiB


def _table(**limits: object) -> SessionTable:
    counter = itertools.count(1)
    return SessionTable(SessionLimits(**limits), random_bytes=lambda n: next(counter).to_bytes(n, "big"))  # type: ignore[arg-type]


def _open(table: SessionTable, now: float = 0.0) -> bytes:
    return table.open(OWNER, 3, Capabilities(), Mode.AUTO, now).session_id


def _join(table: SessionTable, sid: bytes, nonce: bytes, now: float) -> int:
    session = table.get(sid)
    secret = session.secret if session else b"\x00" * 32
    return table.join(sid, OWNER, nonce, join_token(secret, sid, nonce, OWNER), now)[1]


def test_idle_sessions_expire_after_the_timeout() -> None:
    table = _table(idle_timeout=30.0)
    sid = _open(table)
    assert table.get_timer() is None  # one live stream: not idle
    table.stream_closed(sid, 100.0)
    assert table.get_timer() == 130.0
    assert _join(table, sid, b"\x01" * 16, 129.0) == 1  # rejoining in time revives it
    table.stream_closed(sid, 140.0)
    assert table.expire(169.9) == []
    assert table.expire(170.0) == [sid] and sid not in table
    with pytest.raises(JoinRefused, match="no stream for 30 s"):
        _join(table, sid, b"\x02" * 16, 171.0)


def test_session_and_join_limits() -> None:
    table = _table(max_sessions=2, max_joins_per_session=2)
    sid = _open(table)
    _open(table)
    with pytest.raises(CapacityError):
        _open(table)
    for i in range(2):
        _join(table, sid, bytes([i]) * 16, 0.0)
        table.stream_closed(sid, 0.0)
    with pytest.raises(JoinRefused, match="used all 2 joins"):
        _join(table, sid, b"\x09" * 16, 0.0)
    # Ended sessions free their slot; the table remembers a bounded number of ended ids.
    assert table.end(sid, "done") and not table.end(sid, "again")
    _open(table)


def test_remembered_ended_sessions_are_bounded() -> None:
    table = _table(remembered_ended=3)
    ids = [_open(table) for _ in range(5)]
    for sid in ids:
        table.end(sid, "done")
    with pytest.raises(JoinRefused, match="no such session"):  # forgotten: oldest ids
        _join(table, ids[0], b"\x01" * 16, 0.0)
    with pytest.raises(JoinRefused, match="has ended"):
        _join(table, ids[-1], b"\x01" * 16, 0.0)


def test_discarded_open_is_not_joinable() -> None:
    table = _table()
    sid = _open(table)
    table.discard(sid)
    assert len(table) == 0
    with pytest.raises(JoinRefused, match="opening handshake failed"):
        _join(table, sid, b"\x01" * 16, 0.0)


def test_bad_session_limits() -> None:
    with pytest.raises(DwcpConfigError):
        SessionLimits(max_sessions=0)
    with pytest.raises(DwcpConfigError):
        SessionLimits(idle_timeout=0)


def test_attempt_limiter_burst_then_rate() -> None:
    lim = AttemptLimiter(rate=2.0, burst=3)
    assert [lim.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert lim.allow("b", 0.0)  # other peers have their own bucket
    assert not lim.allow("a", 0.4)  # 0.8 token refilled
    assert lim.allow("a", 0.5)  # 0.8 kept + 0.2 s of refill = one whole attempt
    assert not lim.allow("a", 0.5)
    assert [lim.allow("a", 100.0) for _ in range(4)] == [True, True, True, False]  # refill caps at burst


def test_attempt_limiter_table_is_bounded() -> None:
    lim = AttemptLimiter(rate=1.0, burst=1, max_peers=3)
    for i in range(10):
        lim.allow(f"10.0.0.{i}", 0.0)
    assert len(lim) == 3
    with pytest.raises(DwcpConfigError):
        AttemptLimiter(rate=0)
