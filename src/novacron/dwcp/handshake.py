"""The DWCP v3 handshake as a sans-IO state machine, for both roles.

Theory of operation. TLS 1.3 with mutual authentication has already run: the driver hands us the
peer's identity from its verified certificate. Then three frames on the control channel::

    client                                   server
    HELLO  (versions, identity, caps, mode,   -->  check identity against certificate, pick version,
            open | join + session/nonce/token)      intersect caps, open or join the session
           <--  WELCOME (version, identity, session caps, mode, session id, stream index, secret)
    check version, identity, caps  -->  CONFIRM (session id)
    established                                established

Either side refuses by sending ERROR (code, reason, step) and closing. Every waiting state has a
deadline: ``get_timer()`` says when, ``handle_timer(now)`` fires it. Time is always an argument.

Rules of this module:
- Everything that changes the state goes through :data:`TRANSITIONS`; an input missing from the table
  is illegal. If the peer caused it (a frame out of order) we send ERROR and fail; if the local caller
  did (``start`` twice, data after the end) nothing changes. Both raise :class:`IllegalTransition`
  naming the role, state and input.
- Failures raise a typed error after queueing the ERROR frame for the peer; the caller sends
  ``data_to_send()`` and closes. Success queues one :class:`Established` event.
- The machine stops reading frames once established: bytes that followed the handshake stay in
  ``decoder`` for the stream.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NoReturn

from novacron.dwcp.errors import (
    HANDSHAKE_ERRORS,
    ConnectionLost,
    DwcpConfigError,
    DwcpError,
    HandshakeError,
    HandshakeTimeout,
    IdentityMismatch,
    IllegalTransition,
    NegotiationError,
    PeerProtocolError,
    ProtocolError,
    VersionMismatch,
)
from novacron.dwcp.frames.codec import Frame, FrameDecoder, FrameEncoder, Payload
from novacron.dwcp.frames.limits import HANDSHAKE_MAX_FRAME_SIZE
from novacron.dwcp.frames.messages import (
    JOIN_NONCE_BYTES,
    REASON_BYTES,
    Confirm,
    Error,
    Hello,
    Welcome,
)
from novacron.dwcp.negotiation import (
    DEFAULT_CAPABILITIES,
    SUPPORTED_VERSIONS,
    Capabilities,
    Mode,
    VersionRange,
    parse_mode,
)
from novacron.dwcp.session import SessionInfo, SessionTable, join_token, short_id
from novacron.security.identity import NodeIdentity

DEFAULT_TLS_TIMEOUT = 5.0
DEFAULT_STEP_TIMEOUT = 5.0

INTENT_OPEN = "open"
INTENT_JOIN = "join"


class Role(StrEnum):
    CLIENT = "client"
    SERVER = "server"


class State(StrEnum):
    IDLE = "idle"
    AWAIT_HELLO = "await-hello"
    AWAIT_WELCOME = "await-welcome"
    AWAIT_CONFIRM = "await-confirm"
    ESTABLISHED = "established"
    FAILED = "failed"


class Input(StrEnum):
    START = "start"  # local: begin (client sends HELLO)
    HELLO = "HELLO"  # frames received from the peer ...
    WELCOME = "WELCOME"
    CONFIRM = "CONFIRM"
    ERROR = "ERROR"
    OTHER_FRAME = "other-frame"  # any other frame type: never legal during the handshake
    EOF = "eof"  # the peer closed the connection
    TIMEOUT = "timeout"  # the step's deadline passed
    REFUSE = "refuse"  # we reject what the peer sent (bad frame, bad content)


_WAITING = {State.AWAIT_HELLO, State.AWAIT_WELCOME, State.AWAIT_CONFIRM}
_ENDINGS = {
    Input.ERROR: State.FAILED,
    Input.EOF: State.FAILED,
    Input.TIMEOUT: State.FAILED,
    Input.REFUSE: State.FAILED,
}

TRANSITIONS: dict[Role, dict[State, dict[Input, State]]] = {
    Role.CLIENT: {
        State.IDLE: {Input.START: State.AWAIT_WELCOME},
        State.AWAIT_WELCOME: {Input.WELCOME: State.ESTABLISHED, **_ENDINGS},
        State.ESTABLISHED: {},
        State.FAILED: {},
    },
    Role.SERVER: {
        State.IDLE: {Input.START: State.AWAIT_HELLO},
        State.AWAIT_HELLO: {Input.HELLO: State.AWAIT_CONFIRM, **_ENDINGS},
        State.AWAIT_CONFIRM: {Input.CONFIRM: State.ESTABLISHED, **_ENDINGS},
        State.ESTABLISHED: {},
        State.FAILED: {},
    },
}

_STEP = {State.AWAIT_HELLO: "hello", State.AWAIT_WELCOME: "welcome", State.AWAIT_CONFIRM: "confirm"}
_FRAME_INPUTS = {Hello: Input.HELLO, Welcome: Input.WELCOME, Confirm: Input.CONFIRM, Error: Input.ERROR}


@dataclass(frozen=True, slots=True)
class HandshakeTimeouts:
    """Seconds allowed for each step (the TLS one is enforced by the driver)."""

    tls: float = DEFAULT_TLS_TIMEOUT
    hello: float = DEFAULT_STEP_TIMEOUT
    welcome: float = DEFAULT_STEP_TIMEOUT
    confirm: float = DEFAULT_STEP_TIMEOUT

    def __post_init__(self) -> None:
        for name in ("tls", "hello", "welcome", "confirm"):
            if not getattr(self, name) > 0:
                raise DwcpConfigError(f"handshake timeout {name} must be positive", value=getattr(self, name))

    def for_state(self, state: State) -> float:
        return {State.AWAIT_HELLO: self.hello, State.AWAIT_WELCOME: self.welcome}.get(state, self.confirm)


@dataclass(frozen=True, slots=True)
class Offer:
    """What this side brings to a handshake."""

    identity: NodeIdentity  # claimed in HELLO/WELCOME; must match our certificate
    capabilities: Capabilities = DEFAULT_CAPABILITIES
    mode: Mode = Mode.AUTO
    versions: VersionRange = SUPPORTED_VERSIONS


@dataclass(frozen=True, slots=True)
class ExpectedPeer:
    """Optional checks a client makes on the server it reached (None: any trusted value)."""

    node_id: str | None = None
    cluster_id: str | None = None
    role: str | None = None

    def mismatch(self, peer: NodeIdentity) -> str | None:
        for name in ("node_id", "cluster_id", "role"):
            want = getattr(self, name)
            if want is not None and want != getattr(peer, name):
                return f"expected {name.replace('_', ' ')} {want!r}, the server is {peer}"
        return None


@dataclass(frozen=True, slots=True)
class Established:
    """The handshake succeeded. ``opened``: this stream opened the session (index 0)."""

    info: SessionInfo
    opened: bool


def _truncate(text: str, limit: int = REASON_BYTES) -> str:
    raw = text.encode("utf-8")
    return text if len(raw) <= limit else raw[: limit - 3].decode("utf-8", "ignore") + "..."


class _Handshake:
    role: Role

    def __init__(
        self, offer: Offer, peer: NodeIdentity, timeouts: HandshakeTimeouts, address: str | None
    ) -> None:
        self.offer = offer
        self.peer = peer  # from the peer's verified certificate
        self.timeouts = timeouts
        self.address = address
        self.state = State.IDLE
        self.decoder = FrameDecoder(HANDSHAKE_MAX_FRAME_SIZE)
        self.encoder = FrameEncoder(HANDSHAKE_MAX_FRAME_SIZE)
        self.info: SessionInfo | None = None
        self._deadline: float | None = None
        self._out: list[bytes] = []
        self._events: deque[Established] = deque()
        self._claimed: str | None = None  # identity the peer claimed, for error context

    # ---------------------------------------------------------------------------------- public

    @property
    def done(self) -> bool:
        return self.state in (State.ESTABLISHED, State.FAILED)

    def get_timer(self) -> float | None:
        """Deadline of the current step (monotonic seconds), or None when not waiting."""
        return self._deadline

    def handle_timer(self, now: float) -> None:
        """Fire the step deadline if it has passed (a no-op otherwise, so early or late wake-ups are safe)."""
        if self._deadline is None or now < self._deadline:
            return
        step = _STEP[self.state]
        self._refuse(
            HandshakeTimeout(
                f"no {step.upper()} within {self.timeouts.for_state(self.state):g} s", **self._context(step)
            ),
            Input.TIMEOUT,
            now,
        )

    def receive_data(self, data: Payload, now: float) -> None:
        """Bytes from the peer. Raises the handshake's failure, if this input caused one."""
        self._require_waiting("receive-data")
        try:
            self.decoder.receive_data(data)
        except ProtocolError as exc:
            self._refuse(exc, Input.REFUSE, now)
        self._pump(now)

    def receive_eof(self, now: float) -> None:
        """The peer closed its side of the connection."""
        self._require_waiting("eof")
        self._pump(now)
        if self.done:
            return
        step = _STEP[self.state]
        detail = "" if self.decoder.is_idle else " in the middle of a frame"
        err = ConnectionLost(
            f"peer closed the connection{detail} while waiting for {step.upper()}", **self._context(step)
        )
        self._transition(Input.EOF)
        self._release(now)
        raise err

    def connection_lost(self, now: float) -> None:
        """The connection failed or the driver gave up: fail without raising (nothing can be sent)."""
        if self.state in _WAITING:
            self._transition(Input.EOF)
            self._release(now)

    @property
    def step(self) -> str:
        """The message being waited for ("hello", "welcome", "confirm"), else the state's name."""
        return _STEP.get(self.state, self.state.value)

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Established | None:
        return self._events.popleft() if self._events else None

    # ------------------------------------------------------------------------------- internals

    def _context(self, step: str | None = None) -> dict[str, Any]:
        return {
            "step": step or _STEP.get(self.state),
            "role": self.role.value,
            "address": self.address,
            "peer": str(self.peer),
            "claimed": self._claimed,
        }

    def _transition(self, event: Input) -> State:
        new = TRANSITIONS[self.role][self.state].get(event)
        if new is None:
            raise IllegalTransition(
                f"{self.role.value} handshake: {event.value} is not allowed in state {self.state.value}",
                role=self.role.value,
                state=self.state.value,
                event=event.value,
                address=self.address,
            )
        self.state = new
        self._deadline = None
        return new

    def _arm(self, now: float) -> None:
        self._deadline = now + self.timeouts.for_state(self.state)

    def _require_waiting(self, event: str) -> None:
        if self.state not in _WAITING:
            raise IllegalTransition(
                f"{self.role.value} handshake: {event} is not allowed in state {self.state.value}",
                role=self.role.value,
                state=self.state.value,
                event=event,
                address=self.address,
            )

    def _send(self, frame: Frame) -> None:
        self._out.append(self.encoder.encode(frame))

    def _refuse(self, error: DwcpError, event: Input, now: float) -> NoReturn:
        """Fail: tell the peer why (unless it told us), undo reservations, raise ``error``."""
        step = _STEP.get(self.state)
        self._transition(event)
        if event is not Input.ERROR:
            code = error.code if isinstance(error, HandshakeError) else PeerProtocolError.code
            versions = self.offer.versions if isinstance(error, VersionMismatch) else None
            self._send(
                Frame(
                    Error(
                        code=code,
                        reason=_truncate(error.message),
                        step=step,
                        min_version=versions.low if versions else None,
                        max_version=versions.high if versions else None,
                    )
                )
            )
        self._release(now)
        raise error

    def _release(self, now: float) -> None:
        """Undo what a failed handshake had reserved (server: a session or a stream slot)."""

    def _pump(self, now: float) -> None:
        while self.state in _WAITING:
            try:
                frame = self.decoder.next_frame()
            except ProtocolError as exc:
                self._refuse(exc, Input.REFUSE, now)
            if frame is None:
                return
            self._on_frame(frame, now)

    def _on_frame(self, frame: Frame, now: float) -> None:
        body = frame.body
        event = _FRAME_INPUTS.get(type(body), Input.OTHER_FRAME)
        if event not in TRANSITIONS[self.role][self.state]:
            # The peer sent something out of order: refuse it and tell the peer.
            illegal = IllegalTransition(
                f"{self.role.value} handshake: unexpected {frame.type.name} frame "
                f"in state {self.state.value}",
                role=self.role.value,
                state=self.state.value,
                event=frame.type.name,
                address=self.address,
                peer=str(self.peer),
            )
            self._refuse(illegal, Input.REFUSE, now)
        if isinstance(body, Error):
            self._on_error(body, now)
        try:
            self._on_message(body, now)
        except HandshakeError as exc:
            for key, value in self._context().items():
                if value is not None:
                    exc.context.setdefault(key, value)
            self._refuse(exc, Input.REFUSE, now)

    def _on_error(self, err: Error, now: float) -> NoReturn:
        cls = HANDSHAKE_ERRORS.get(err.code, HandshakeError)
        ctx = self._context(err.step)
        if cls is VersionMismatch and err.min_version is not None and err.max_version is not None:
            message = (
                f"no common protocol version: ours {self.offer.versions}, "
                f"peer {err.min_version}..{err.max_version} (refused by peer)"
            )
        else:
            message = f"refused by peer: {err.reason or err.code}"
        failure = cls(message, by_peer=True, peer_code=err.code, **ctx)
        self._transition(Input.ERROR)
        self._release(now)
        raise failure

    def _on_message(self, body: object, now: float) -> None:
        raise NotImplementedError

    def _established(self, info: SessionInfo, opened: bool) -> None:
        self.info = info
        self.decoder.set_max_frame_size(info.capabilities.max_frame_size)
        self.encoder.set_max_frame_size(info.capabilities.max_frame_size)
        self._events.append(Established(info=info, opened=opened))


class ClientHandshake(_Handshake):
    """The connecting side: opens a session, or joins ``join`` (a session this node opened before)."""

    role = Role.CLIENT

    def __init__(
        self,
        offer: Offer,
        peer: NodeIdentity,
        *,
        join: SessionInfo | None = None,
        join_nonce: bytes | None = None,
        expect: ExpectedPeer | None = None,
        timeouts: HandshakeTimeouts | None = None,
        address: str | None = None,
    ) -> None:
        super().__init__(offer, peer, timeouts or HandshakeTimeouts(), address)
        self.join = join
        self.expect = expect
        if join is not None and (join_nonce is None or len(join_nonce) != JOIN_NONCE_BYTES):
            raise DwcpConfigError(f"joining a session needs a {JOIN_NONCE_BYTES}-byte nonce")
        self.join_nonce = join_nonce

    def start(self, now: float) -> None:
        """Send HELLO and start waiting for WELCOME."""
        self._transition(Input.START)
        o = self.offer
        caps = o.capabilities
        join = self.join
        hello = Hello(
            min_version=o.versions.low,
            max_version=o.versions.high,
            node_id=o.identity.node_id,
            cluster_id=o.identity.cluster_id,
            role=o.identity.role,
            intent=INTENT_JOIN if join else INTENT_OPEN,
            mode=o.mode.value,
            max_streams=caps.max_streams,
            max_frame_size=caps.max_frame_size,
            codecs=caps.codecs,
            features=tuple(sorted(caps.features)),
            session_id=join.session_id if join else None,
            join_nonce=self.join_nonce if join else None,
            join_token=(
                join_token(join.join_secret, join.session_id, self.join_nonce, o.identity)
                if join and self.join_nonce
                else None
            ),
        )
        self._send(Frame(hello))
        self._arm(now)

    def _on_message(self, body: object, now: float) -> None:
        if not isinstance(body, Welcome):
            return
        w = body
        ctx = self._context("welcome")
        self._claimed = f"{w.node_id}@{w.cluster_id}/{w.role}"
        ctx["claimed"] = self._claimed
        ours = self.offer.versions
        if w.version not in ours or not w.min_version <= w.version <= w.max_version:
            raise VersionMismatch(
                f"server chose protocol version {w.version} (its range {w.min_version}..{w.max_version}), "
                f"ours {ours}",
                **ctx,
            )
        if (w.node_id, w.cluster_id, w.role) != (self.peer.node_id, self.peer.cluster_id, self.peer.role):
            raise IdentityMismatch(
                f"server claims to be {self._claimed} but its certificate says {self.peer}", **ctx
            )
        if self.expect is not None and (why := self.expect.mismatch(self.peer)):
            raise IdentityMismatch(why, **ctx)
        mode = parse_mode(w.mode)
        if mode is None:
            raise NegotiationError(f"server announced an unknown mode {w.mode!r}", **ctx)
        try:
            caps = Capabilities(
                codecs=w.codecs,
                max_streams=w.max_streams,
                max_frame_size=w.max_frame_size,
                features=frozenset(w.features),
            )
        except DwcpConfigError as exc:
            raise NegotiationError(f"server sent invalid capabilities: {exc.message}", **ctx) from exc
        if not self.offer.capabilities.covers(caps):
            raise NegotiationError("server chose capabilities we did not offer", **ctx)
        join = self.join
        if join is None:
            if w.join_secret is None or w.stream_index != 0:
                raise NegotiationError(
                    "WELCOME for a new session must carry a join secret and index 0", **ctx
                )
            secret = w.join_secret
        else:
            if w.session_id != join.session_id or w.stream_index == 0:
                raise NegotiationError("WELCOME names another session than the one we joined", **ctx)
            if w.version != join.version:
                raise VersionMismatch(
                    f"server chose version {w.version} for a session of version {join.version}", **ctx
                )
            if self.peer != join.peer:
                raise IdentityMismatch(
                    f"joined server is {self.peer}, but the session was opened with {join.peer}", **ctx
                )
            secret = join.join_secret
        self._transition(Input.WELCOME)
        self._send(Frame(Confirm(session_id=w.session_id)))
        info = SessionInfo(
            session_id=w.session_id,
            version=w.version,
            capabilities=caps,
            local=self.offer.identity,
            peer=self.peer,
            peer_mode=mode,
            stream_index=w.stream_index,
            join_secret=secret,
        )
        self._established(info, opened=join is None)


class ServerHandshake(_Handshake):
    """The accepting side: checks HELLO against the peer certificate and opens or joins a session."""

    role = Role.SERVER

    def __init__(
        self,
        offer: Offer,
        peer: NodeIdentity,
        sessions: SessionTable,
        *,
        timeouts: HandshakeTimeouts | None = None,
        address: str | None = None,
    ) -> None:
        super().__init__(offer, peer, timeouts or HandshakeTimeouts(), address)
        self.sessions = sessions
        self._pending: SessionInfo | None = None  # what WELCOME promised, until CONFIRM
        self._opened = False

    def start(self, now: float) -> None:
        """Start waiting for HELLO."""
        self._transition(Input.START)
        self._arm(now)

    def _release(self, now: float) -> None:
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        if self._opened:
            self.sessions.discard(pending.session_id)
        else:
            self.sessions.stream_closed(pending.session_id, now)

    def _on_message(self, body: object, now: float) -> None:
        if isinstance(body, Hello):
            self._on_hello(body, now)
        elif isinstance(body, Confirm):
            self._on_confirm(body)

    def _on_hello(self, h: Hello, now: float) -> None:
        self._claimed = f"{h.node_id}@{h.cluster_id}/{h.role}"
        ctx = self._context("hello")
        try:
            theirs = VersionRange(h.min_version, h.max_version)
        except DwcpConfigError as exc:
            raise NegotiationError(f"invalid version range in HELLO: {exc.message}", **ctx) from exc
        ours = self.offer.versions
        version = ours.negotiate(theirs)
        if version is None:
            raise VersionMismatch(f"no common protocol version: ours {ours}, peer {theirs}", **ctx)
        if (h.node_id, h.cluster_id, h.role) != (self.peer.node_id, self.peer.cluster_id, self.peer.role):
            raise IdentityMismatch(
                f"HELLO claims {self._claimed} but the certificate says {self.peer}", **ctx
            )
        mode = parse_mode(h.mode)
        if mode is None:
            raise NegotiationError(f"unknown mode {h.mode!r}", **ctx)
        try:
            offered = Capabilities.from_wire(h.codecs, h.max_streams, h.max_frame_size, h.features)
        except DwcpConfigError as exc:
            raise NegotiationError(f"invalid capabilities in HELLO: {exc.message}", **ctx) from exc
        if h.intent == INTENT_OPEN:
            caps = offered.intersect(self.offer.capabilities)  # client's codec preference order
            session = self.sessions.open(self.peer, version, caps, mode, now)
            self._opened = True
            index = 0
            secret: bytes | None = session.secret
        elif h.intent == INTENT_JOIN:
            if h.session_id is None or h.join_nonce is None or h.join_token is None:
                raise NegotiationError("a join needs session_id, join_nonce and join_token", **ctx)
            existing = self.sessions.get(h.session_id)
            if existing is not None and existing.version not in theirs:
                raise VersionMismatch(
                    f"session uses protocol version {existing.version}, peer offers {theirs}", **ctx
                )
            session, index = self.sessions.join(h.session_id, self.peer, h.join_nonce, h.join_token, now)
            caps, version, secret = session.capabilities, session.version, None
        else:
            raise NegotiationError(f"unknown intent {h.intent!r} (expected open or join)", **ctx)
        self._pending = SessionInfo(
            session_id=session.session_id,
            version=version,
            capabilities=caps,
            local=self.offer.identity,
            peer=self.peer,
            peer_mode=mode,
            stream_index=index,
            join_secret=session.secret,
        )
        self._transition(Input.HELLO)
        me = self.offer.identity
        self._send(
            Frame(
                Welcome(
                    version=version,
                    min_version=ours.low,
                    max_version=ours.high,
                    node_id=me.node_id,
                    cluster_id=me.cluster_id,
                    role=me.role,
                    mode=self.offer.mode.value,
                    max_streams=caps.max_streams,
                    max_frame_size=caps.max_frame_size,
                    session_id=session.session_id,
                    stream_index=index,
                    codecs=caps.codecs,
                    features=tuple(sorted(caps.features)),
                    join_secret=secret,
                )
            )
        )
        self._arm(now)

    def _on_confirm(self, c: Confirm) -> None:
        pending = self._pending
        if pending is None or c.session_id != pending.session_id:
            raise PeerProtocolError(
                f"CONFIRM names session {short_id(c.session_id)}, not the one offered",
                **self._context("confirm"),
            )
        self._transition(Input.CONFIRM)
        self._pending = None  # the stream owns the session slot from now on
        self._established(pending, opened=self._opened)
