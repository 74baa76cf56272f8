"""Typed errors of DWCP: wire-format violations, handshake refusals, stream ends.

Handshake errors carry a short wire ``code`` (sent to the peer in an ERROR frame), the ``step`` that
failed and, as context, the peer address and claimed identity. A refusal received from the peer is
raised as the same class the peer raised (``by_peer=True``), so both sides see e.g. VersionMismatch.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar

from novacron.errors import NovacronError, UserError


class DwcpError(NovacronError):
    """Any DWCP failure."""


class DwcpConfigError(UserError):
    """A local DWCP setting is invalid (capabilities, version range, limits)."""


class ProtocolErrorKind(StrEnum):
    """What was wrong with the bytes or frames a peer sent."""

    UNKNOWN_TYPE = "unknown-type"
    OVERSIZE = "oversize"
    TRUNCATED = "truncated"
    MALFORMED = "malformed"
    VERSION = "version"
    ILLEGAL = "illegal-transition"


class ProtocolError(DwcpError):
    """The peer (or our own caller) broke the wire format or the protocol's state rules."""

    def __init__(self, message: str, *, what: ProtocolErrorKind, **context: Any) -> None:
        super().__init__(message, what=what.value, **context)
        self.what = what


class IllegalTransition(ProtocolError):
    """An event arrived that the state machine does not allow in its current state."""

    def __init__(self, message: str, *, role: str, state: str, event: str, **context: Any) -> None:
        super().__init__(
            message, what=ProtocolErrorKind.ILLEGAL, role=role, state=state, event=event, **context
        )
        self.state = state
        self.event = event


class HandshakeError(DwcpError):
    """The handshake failed; ``code`` is what goes on the wire in the ERROR frame."""

    code: ClassVar[str] = "handshake"

    def __init__(
        self, message: str, *, step: str | None = None, by_peer: bool = False, **context: Any
    ) -> None:
        super().__init__(message, step=step, by_peer=by_peer or None, **context)
        self.step = step
        self.by_peer = by_peer


class VersionMismatch(HandshakeError):
    code = "version-mismatch"


class IdentityMismatch(HandshakeError):
    code = "identity-mismatch"


class NegotiationError(HandshakeError):
    """Capabilities, mode or session fields that cannot be agreed on."""

    code = "negotiation"


class JoinRefused(HandshakeError):
    """A stream could not join a session: unknown or ended session, bad or replayed token, limits."""

    code = "join-refused"


class CapacityError(HandshakeError):
    """The server is at a limit (sessions, connections, handshake rate)."""

    code = "busy"


class HandshakeTimeout(HandshakeError):
    code = "timeout"


class PeerCertificateError(HandshakeError):
    """TLS refused the peer (or the peer refused us): unknown CA, expired, no identity in certificate."""

    code = "certificate"


class ConnectionLost(HandshakeError):
    """The connection closed before the handshake finished."""

    code = "closed"


class PeerProtocolError(HandshakeError):
    """The handshake messages broke the protocol (bad frame, message out of order)."""

    code = "protocol"


HANDSHAKE_ERRORS: dict[str, type[HandshakeError]] = {
    cls.code: cls
    for cls in (
        HandshakeError,
        VersionMismatch,
        IdentityMismatch,
        NegotiationError,
        JoinRefused,
        CapacityError,
        HandshakeTimeout,
        PeerCertificateError,
        ConnectionLost,
        PeerProtocolError,
    )
}


class StreamError(DwcpError):
    """A failure on an established stream."""


class StreamClosed(StreamError):
    """The stream ended: the peer said goodbye, closed the connection, or we closed it."""


class RemoteError(StreamError):
    """The peer reported a fatal error on an established stream (ERROR frame) and closed it."""

    def __init__(self, message: str, *, code: str, **context: Any) -> None:
        super().__init__(message, code=code, **context)
        self.code = code


_RESERVED_LOG_KEYS = {"event", "level", "logger", "ts"}


def error_fields(exc: NovacronError) -> dict[str, Any]:
    """An error as structured log fields: message, class, wire code and context."""
    fields: dict[str, Any] = {"error": exc.message, "kind": type(exc).__name__}
    if isinstance(exc, HandshakeError):
        fields["code"] = exc.code
    elif isinstance(exc, ProtocolError):
        fields["code"] = "protocol"
    for key, value in exc.context.items():
        fields[f"ctx_{key}" if key in _RESERVED_LOG_KEYS else key] = value
    return fields
