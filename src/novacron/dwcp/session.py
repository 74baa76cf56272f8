"""DWCP sessions: what a handshake produces, and the server's bounded table of open sessions.

A session is opened by the first connection of a client and joined by further connections (streams)
of the multi-stream transport. Join design (docs/protocol.md, "Sessions and join tokens"):

- On open, the server creates a random 16-byte session id and a random 32-byte join secret and sends
  both in WELCOME (inside TLS, so only the authenticated opener learns the secret).
- To join, the client picks a fresh random 16-byte nonce and sends
  ``token = HMAC-SHA256(secret, context | session id | nonce | cluster id | node id | role)``.
  The server recomputes it with the identity from the joiner's *certificate*, so a token is bound to
  the session and to the node: it is useless on another session (other id and secret), from another
  node, or after the session ended (the session and its secret are gone).
- Each nonce is accepted once per session: tokens are single-use per stream, so a captured or
  repeated join is refused as a replay. The set of used nonces is bounded by the per-session join
  limit; a session that needs more joins than that is reopened.

The table is sans-IO: time comes in as ``now`` (monotonic seconds) and nothing here blocks.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from novacron.dwcp.errors import CapacityError, DwcpConfigError, JoinRefused
from novacron.dwcp.frames.messages import JOIN_NONCE_BYTES, JOIN_SECRET_BYTES, SESSION_ID_BYTES
from novacron.dwcp.negotiation import Capabilities, Mode
from novacron.security.identity import NodeIdentity

_TOKEN_CONTEXT = b"novacron/dwcp/v3/join-token\x00"

DEFAULT_MAX_SESSIONS = 1024
DEFAULT_SESSION_IDLE_TIMEOUT = 30.0  # seconds a session survives with no live stream (stream failover)
DEFAULT_MAX_JOINS_PER_SESSION = 256
DEFAULT_REMEMBERED_ENDED = 4096  # ended session ids kept to answer "ended" instead of "unknown"


def _field(value: str) -> bytes:
    raw = value.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


def join_token(secret: bytes, session_id: bytes, nonce: bytes, identity: NodeIdentity) -> bytes:
    """The token a node with ``identity`` presents to join ``session_id`` with ``nonce``."""
    msg = b"".join(
        (
            _TOKEN_CONTEXT,
            session_id,
            nonce,
            _field(identity.cluster_id),
            _field(identity.node_id),
            _field(identity.role),
        )
    )
    return hmac.new(secret, msg, hashlib.sha256).digest()


def short_id(session_id: bytes) -> str:
    """How a session is named in logs and errors (first 8 bytes, hex)."""
    return session_id[:8].hex()


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What a completed handshake established, as seen from one side of one stream."""

    session_id: bytes
    version: int
    capabilities: Capabilities  # the session's: intersection of both offers
    local: NodeIdentity
    peer: NodeIdentity  # from the peer's verified certificate
    peer_mode: Mode  # the mode the peer announced
    stream_index: int  # 0 for the stream that opened the session
    join_secret: bytes = field(repr=False)

    @property
    def name(self) -> str:
        return short_id(self.session_id)


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_sessions: int = DEFAULT_MAX_SESSIONS
    idle_timeout: float = DEFAULT_SESSION_IDLE_TIMEOUT
    max_joins_per_session: int = DEFAULT_MAX_JOINS_PER_SESSION
    remembered_ended: int = DEFAULT_REMEMBERED_ENDED

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.max_joins_per_session < 1 or self.remembered_ended < 0:
            raise DwcpConfigError("session limits must be positive", limits=repr(self))
        if not self.idle_timeout > 0:
            raise DwcpConfigError("session idle timeout must be positive", value=self.idle_timeout)


@dataclass(slots=True)
class Session:
    """One open session on the server."""

    session_id: bytes
    owner: NodeIdentity
    version: int
    capabilities: Capabilities
    peer_mode: Mode
    secret: bytes = field(repr=False)
    opened_at: float
    live_streams: int = 1
    next_index: int = 1
    joins: int = 0
    used_nonces: set[bytes] = field(default_factory=set, repr=False)
    idle_since: float | None = None

    @property
    def name(self) -> str:
        return short_id(self.session_id)


class SessionTable:
    """The server's open sessions, bounded in number, joins and remembered history."""

    def __init__(
        self, limits: SessionLimits | None = None, *, random_bytes: Callable[[int], bytes] = os.urandom
    ) -> None:
        self.limits = limits or SessionLimits()
        self._random = random_bytes
        self._sessions: dict[bytes, Session] = {}
        self._ended: OrderedDict[bytes, str] = OrderedDict()  # id -> why it ended

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def get(self, session_id: bytes) -> Session | None:
        return self._sessions.get(session_id)

    def open(
        self, owner: NodeIdentity, version: int, capabilities: Capabilities, peer_mode: Mode, now: float
    ) -> Session:
        """Open a session with one live stream (index 0)."""
        self.expire(now)
        if len(self._sessions) >= self.limits.max_sessions:
            raise CapacityError(
                f"server holds its maximum of {self.limits.max_sessions} sessions", step="hello"
            )
        session_id = self._random(SESSION_ID_BYTES)
        while session_id in self._sessions or session_id in self._ended:
            session_id = self._random(SESSION_ID_BYTES)
        session = Session(
            session_id=session_id,
            owner=owner,
            version=version,
            capabilities=capabilities,
            peer_mode=peer_mode,
            secret=self._random(JOIN_SECRET_BYTES),
            opened_at=now,
        )
        self._sessions[session_id] = session
        return session

    def join(
        self, session_id: bytes, identity: NodeIdentity, nonce: bytes, token: bytes, now: float
    ) -> tuple[Session, int]:
        """Admit one more stream to a session; returns the session and the new stream's index."""
        self.expire(now)
        name = short_id(session_id)
        session = self._sessions.get(session_id)
        if session is None:
            why = self._ended.get(session_id)
            if why is not None:
                raise JoinRefused(f"session has ended ({why})", step="hello", session=name)
            raise JoinRefused("no such session", step="hello", session=name)
        if identity != session.owner:
            raise JoinRefused(
                f"session belongs to {session.owner}, not to {identity}", step="hello", session=name
            )
        if len(nonce) != JOIN_NONCE_BYTES:
            raise JoinRefused("join nonce has the wrong length", step="hello", session=name)
        expected = join_token(session.secret, session_id, nonce, identity)
        if not hmac.compare_digest(expected, token):
            raise JoinRefused("join token does not match this session", step="hello", session=name)
        if nonce in session.used_nonces:
            raise JoinRefused("join token was already used (replay)", step="hello", session=name)
        if session.joins >= self.limits.max_joins_per_session:
            raise JoinRefused(
                f"session has used all {self.limits.max_joins_per_session} joins; open a new session",
                step="hello",
                session=name,
            )
        if session.live_streams >= session.capabilities.max_streams:
            raise JoinRefused(
                f"session already has its maximum of {session.capabilities.max_streams} streams",
                step="hello",
                session=name,
            )
        session.used_nonces.add(nonce)
        session.joins += 1
        session.live_streams += 1
        session.idle_since = None
        index = session.next_index
        session.next_index += 1
        return session, index

    def stream_closed(self, session_id: bytes, now: float) -> None:
        """One live stream of the session ended (handshake failure after admission, or stream close)."""
        session = self._sessions.get(session_id)
        if session is None:
            return
        session.live_streams = max(0, session.live_streams - 1)
        if session.live_streams == 0:
            session.idle_since = now

    def discard(self, session_id: bytes, why: str = "opening handshake failed") -> None:
        """Forget a session whose opening handshake never completed."""
        if self._sessions.pop(session_id, None) is not None:
            self._remember(session_id, why)

    def end(self, session_id: bytes, why: str) -> bool:
        """End a session: no stream can join it any more. Returns False if it was not open."""
        if self._sessions.pop(session_id, None) is None:
            return False
        self._remember(session_id, why)
        return True

    def expire(self, now: float) -> list[bytes]:
        """End sessions that had no live stream for the idle timeout; returns their ids."""
        limit = self.limits.idle_timeout
        idle = [
            sid
            for sid, s in self._sessions.items()
            if s.idle_since is not None and now - s.idle_since >= limit
        ]
        for sid in idle:
            self.end(sid, f"no stream for {limit:g} s")
        return idle

    def get_timer(self) -> float | None:
        """When the next idle session expires (monotonic seconds), if any."""
        times = [s.idle_since for s in self._sessions.values() if s.idle_since is not None]
        return min(times) + self.limits.idle_timeout if times else None

    def _remember(self, session_id: bytes, why: str) -> None:
        self._ended[session_id] = why
        self._ended.move_to_end(session_id)
        while len(self._ended) > self.limits.remembered_ended:
            self._ended.popitem(last=False)
