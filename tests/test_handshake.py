"""The DWCP v3 handshake state machine, driven with no sockets and virtual time.

Covers every transition of TRANSITIONS, every illegal input in every state for both roles, and the
checks made on HELLO and WELCOME (version, identity, capabilities, mode, sessions, join tokens).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import pytest

from novacron.dwcp.errors import (
    CapacityError,
    ConnectionLost,
    DwcpConfigError,
    DwcpError,
    HandshakeTimeout,
    IdentityMismatch,
    IllegalTransition,
    JoinRefused,
    NegotiationError,
    PeerProtocolError,
    ProtocolError,
    VersionMismatch,
)
from novacron.dwcp.frames import (
    Confirm,
    DataChunk,
    Error,
    Frame,
    FrameDecoder,
    Hello,
    Ping,
    Welcome,
    encode_frame,
)
from novacron.dwcp.frames.limits import HARD_MAX_FRAME_SIZE
from novacron.dwcp.handshake import (
    TRANSITIONS,
    ClientHandshake,
    Established,
    ExpectedPeer,
    HandshakeTimeouts,
    Input,
    Offer,
    Role,
    ServerHandshake,
    State,
)
from novacron.dwcp.negotiation import Capabilities, Mode, VersionRange
from novacron.dwcp.session import SessionInfo, SessionLimits, SessionTable, join_token
from novacron.security.identity import NodeIdentity

CLIENT_ID = NodeIdentity("dc1", "src-host", "agent")
SERVER_ID = NodeIdentity("dc1", "dst-host", "agent")
MiB = 1024 * 1024
V3 = VersionRange(3, 3)
T = HandshakeTimeouts(tls=1.0, hello=2.0, welcome=3.0, confirm=4.0)
CLIENT_CAPS = Capabilities(
    codecs=("hde1", "zstd", "lz4"), max_streams=8, max_frame_size=2 * MiB, features=frozenset({"sack", "bbr"})
)
SERVER_CAPS = Capabilities(
    codecs=("lz4", "zstd"), max_streams=16, max_frame_size=4 * MiB, features=frozenset({"sack", "x"})
)


def _table(**limits: object) -> SessionTable:
    counter = itertools.count()
    # Deterministic "random" ids make failures reproducible.
    return SessionTable(
        SessionLimits(**limits),  # type: ignore[arg-type]
        random_bytes=lambda n: next(counter).to_bytes(n, "big"),
    )


def _client(
    *,
    claimed: NodeIdentity = CLIENT_ID,
    server_cert: NodeIdentity = SERVER_ID,
    versions: VersionRange = V3,
    caps: Capabilities = CLIENT_CAPS,
    join: SessionInfo | None = None,
    nonce: bytes | None = None,
    expect: ExpectedPeer | None = None,
) -> ClientHandshake:
    offer = Offer(identity=claimed, capabilities=caps, mode=Mode.INTERNET, versions=versions)
    return ClientHandshake(
        offer,
        server_cert,
        join=join,
        join_nonce=nonce if nonce is not None else (b"\x01" * 16 if join else None),
        expect=expect,
        timeouts=T,
        address="10.0.0.1:7400",
    )


def _server(
    table: SessionTable,
    *,
    claimed: NodeIdentity = SERVER_ID,
    client_cert: NodeIdentity = CLIENT_ID,
    versions: VersionRange = V3,
    caps: Capabilities = SERVER_CAPS,
) -> ServerHandshake:
    offer = Offer(identity=claimed, capabilities=caps, mode=Mode.DATACENTER, versions=versions)
    return ServerHandshake(offer, client_cert, table, timeouts=T, address="10.0.0.2:55000")


def _frames(data: bytes) -> list[Frame]:
    dec = FrameDecoder(HARD_MAX_FRAME_SIZE)
    dec.receive_data(data)
    return dec.frames()


def _run(
    client: ClientHandshake, server: ServerHandshake, now: float = 0.0
) -> tuple[Established, Established]:
    server.start(now)
    client.start(now)
    server.receive_data(client.data_to_send(), now)  # HELLO
    client.receive_data(server.data_to_send(), now)  # WELCOME
    server.receive_data(client.data_to_send(), now)  # CONFIRM
    c, s = client.next_event(), server.next_event()
    assert c is not None and s is not None
    return c, s


def _state(m: ClientHandshake | ServerHandshake) -> State:
    return m.state  # read through a call: mypy would keep the narrowing from an earlier assert


def _error_sent(machine: ClientHandshake | ServerHandshake) -> Error:
    (frame,) = _frames(machine.data_to_send())
    assert isinstance(frame.body, Error)
    return frame.body


def _hello(**changes: object) -> Hello:
    base = {
        "min_version": 3,
        "max_version": 3,
        "node_id": CLIENT_ID.node_id,
        "cluster_id": CLIENT_ID.cluster_id,
        "role": CLIENT_ID.role,
        "intent": "open",
        "mode": "internet",
        "max_streams": 4,
        "max_frame_size": MiB,
    }
    base.update(changes)
    return Hello(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ success


def test_open_handshake_establishes_the_same_session_on_both_sides() -> None:
    table = _table()
    client, server = _client(), _server(table)
    c, s = _run(client, server)
    assert c.opened and s.opened
    assert client.state is State.ESTABLISHED and server.state is State.ESTABLISHED
    assert c.info.session_id == s.info.session_id and c.info.session_id in table
    assert c.info.join_secret == s.info.join_secret and len(c.info.join_secret) == 32
    assert c.info.version == s.info.version == 3
    assert (c.info.peer, c.info.local, s.info.peer, s.info.local) == (
        SERVER_ID,
        CLIENT_ID,
        CLIENT_ID,
        SERVER_ID,
    )
    assert c.info.peer_mode is Mode.DATACENTER and s.info.peer_mode is Mode.INTERNET
    assert c.info.stream_index == s.info.stream_index == 0
    # Capabilities: intersection, codecs in the client's order of preference, numbers at the minimum.
    expected = Capabilities(
        codecs=("zstd", "lz4"), max_streams=8, max_frame_size=2 * MiB, features=frozenset({"sack"})
    )
    assert c.info.capabilities == s.info.capabilities == expected
    # Negotiated frame size applies to both codecs from now on; no timer is left running.
    assert client.decoder.max_frame_size == server.encoder.max_frame_size == 2 * MiB
    assert client.get_timer() is None and server.get_timer() is None
    assert client.next_event() is None and server.next_event() is None


def test_highest_common_version_wins() -> None:
    client, server = _client(versions=VersionRange(3, 5)), _server(_table(), versions=VersionRange(2, 4))
    c, s = _run(client, server)
    assert c.info.version == s.info.version == 4


def test_bytes_pipelined_after_confirm_stay_for_the_stream() -> None:
    client, server = _client(), _server(_table())
    server.start(0)
    client.start(0)
    server.receive_data(client.data_to_send(), 0)
    client.receive_data(server.data_to_send(), 0)
    data = Frame(DataChunk(seq=0), channel=1, payload=b"x" * MiB)  # above the 64 KiB handshake limit
    server.receive_data(client.data_to_send() + encode_frame(data), 0)
    assert server.state is State.ESTABLISHED
    frame = server.decoder.next_frame()
    assert frame is not None and bytes(frame.payload) == b"x" * MiB


def test_join_gets_the_next_stream_index_and_the_session_capabilities() -> None:
    table = _table()
    c, _ = _run(_client(), _server(table))
    joiner = _client(
        join=c.info,
        nonce=b"\x02" * 16,
        caps=Capabilities(
            max_frame_size=4 * MiB, codecs=("zstd", "lz4", "hde1"), features=frozenset({"sack"})
        ),
    )
    cj, sj = _run(joiner, _server(table))
    assert not cj.opened and not sj.opened
    assert cj.info.session_id == c.info.session_id and cj.info.stream_index == sj.info.stream_index == 1
    assert cj.info.capabilities == c.info.capabilities  # the session's, not a new intersection
    assert cj.info.join_secret == c.info.join_secret
    assert table.get(c.info.session_id).live_streams == 2  # type: ignore[union-attr]


# --------------------------------------------------------------------------------- transition table


def test_every_legal_transition_is_exercised() -> None:
    """Each (role, state, input) in the table, driven through the public API."""
    seen: set[tuple[Role, State, Input]] = set()

    def record(m: ClientHandshake | ServerHandshake, before: State, event: Input) -> None:
        assert m.state is TRANSITIONS[m.role][before][event]
        seen.add((m.role, before, event))

    def fail_with(m: ClientHandshake | ServerHandshake, event: Input, now: float = 0.0) -> None:
        before = m.state
        with pytest.raises(DwcpError):
            if event is Input.EOF:
                m.receive_eof(now)
            elif event is Input.TIMEOUT:
                deadline = m.get_timer()
                assert deadline is not None
                m.handle_timer(deadline)
            elif event is Input.ERROR:
                m.receive_data(encode_frame(Frame(Error(code="busy", reason="go away"))), now)
            elif event is Input.REFUSE:
                m.receive_data(b"\xff" * 16, now)
        record(m, before, event)

    def at(role: Role, state: State) -> ClientHandshake | ServerHandshake:
        table = _table()
        if role is Role.CLIENT:
            c = _client()
            if state is State.AWAIT_WELCOME:
                c.start(0)
            return c
        s = _server(table)
        if state in (State.AWAIT_HELLO, State.AWAIT_CONFIRM):
            s.start(0)
        if state is State.AWAIT_CONFIRM:
            c = _client()
            c.start(0)
            s.receive_data(c.data_to_send(), 0)
        return s

    for role, states in TRANSITIONS.items():
        for state, moves in states.items():
            for event in moves:
                m = at(role, state)
                assert m.state is state
                if event is Input.START:
                    m.start(0)
                    record(m, state, event)
                elif event in (Input.HELLO, Input.WELCOME, Input.CONFIRM):
                    _drive_success(m)
                    record(m, state, event)
                else:
                    fail_with(m, event)
    expected = {(r, s, e) for r, states in TRANSITIONS.items() for s, moves in states.items() for e in moves}
    assert seen == expected


def _drive_success(m: ClientHandshake | ServerHandshake) -> None:
    """Feed ``m`` the legal next message from a well-behaved peer."""
    if isinstance(m, ClientHandshake):
        server = _server(_table())
        server.start(0)
        server.receive_data(m.data_to_send(), 0)
        m.receive_data(server.data_to_send(), 0)
    elif m.state is State.AWAIT_HELLO:
        c = _client()
        c.start(0)
        m.receive_data(c.data_to_send(), 0)
    else:
        pending = m._pending
        assert pending is not None
        m.receive_data(encode_frame(Frame(Confirm(session_id=pending.session_id))), 0)


WRONG_FRAMES = {
    "HELLO": Frame(_hello()),
    "WELCOME": Frame(
        Welcome(
            version=3,
            min_version=3,
            max_version=3,
            node_id="dst-host",
            cluster_id="dc1",
            role="agent",
            mode="auto",
            max_streams=1,
            max_frame_size=MiB,
            session_id=b"\x00" * 16,
            stream_index=0,
            join_secret=b"k" * 32,
        )
    ),
    "CONFIRM": Frame(Confirm(session_id=b"\x00" * 16)),
    "DATA": Frame(DataChunk(seq=0), channel=1, payload=b"early"),
    "PING": Frame(Ping(ping_id=1, sent_ns=1)),
}
ILLEGAL_PEER_FRAMES = [
    (Role.CLIENT, State.AWAIT_WELCOME, "HELLO"),
    (Role.CLIENT, State.AWAIT_WELCOME, "CONFIRM"),
    (Role.CLIENT, State.AWAIT_WELCOME, "DATA"),
    (Role.CLIENT, State.AWAIT_WELCOME, "PING"),
    (Role.SERVER, State.AWAIT_HELLO, "WELCOME"),
    (Role.SERVER, State.AWAIT_HELLO, "CONFIRM"),
    (Role.SERVER, State.AWAIT_HELLO, "DATA"),
    (Role.SERVER, State.AWAIT_HELLO, "PING"),
    (Role.SERVER, State.AWAIT_CONFIRM, "HELLO"),
    (Role.SERVER, State.AWAIT_CONFIRM, "WELCOME"),
    (Role.SERVER, State.AWAIT_CONFIRM, "DATA"),
]


@pytest.mark.parametrize(("role", "state", "frame"), ILLEGAL_PEER_FRAMES)
def test_frames_out_of_order_are_refused_and_reported_to_the_peer(
    role: Role, state: State, frame: str
) -> None:
    table = _table()
    if role is Role.CLIENT:
        m: ClientHandshake | ServerHandshake = _client()
        m.start(0)
        m.data_to_send()  # the HELLO
    else:
        m = _server(table)
        m.start(0)
        if state is State.AWAIT_CONFIRM:
            c = _client()
            c.start(0)
            m.receive_data(c.data_to_send(), 0)
            m.data_to_send()  # the WELCOME
    assert m.state is state
    with pytest.raises(IllegalTransition) as info:
        m.receive_data(encode_frame(WRONG_FRAMES[frame]), 1.0)
    assert info.value.context["state"] == state.value and info.value.context["event"] == frame
    assert m.state is State.FAILED and m.get_timer() is None
    assert _error_sent(m).code == "protocol"
    assert len(table) == 0  # a session reserved by HELLO is dropped again


@pytest.mark.parametrize("role", list(Role))
def test_local_misuse_is_refused_without_changing_state(role: Role) -> None:
    m: ClientHandshake | ServerHandshake = _client() if role is Role.CLIENT else _server(_table())
    # Before start: no input but START is allowed.
    before_start: list[Callable[[], None]] = [lambda: m.receive_data(b"x", 0), lambda: m.receive_eof(0)]
    for call in before_start:
        with pytest.raises(IllegalTransition) as info:
            call()
        assert info.value.context["state"] == "idle"
    assert m.state is State.IDLE
    m.handle_timer(100.0)  # no timer armed: a no-op
    assert m.state is State.IDLE
    m.start(0)
    with pytest.raises(IllegalTransition, match="start is not allowed"):
        m.start(0)
    # After the end: nothing more is accepted.
    m.connection_lost(1.0)
    assert _state(m) is State.FAILED
    after_end: list[Callable[[], None]] = [
        lambda: m.receive_data(b"x", 2),
        lambda: m.receive_eof(2),
        lambda: m.start(2),
    ]
    for call in after_end:
        with pytest.raises(IllegalTransition):
            call()
    assert _state(m) is State.FAILED


def test_nothing_is_accepted_after_establishment() -> None:
    client, server = _client(), _server(_table())
    _run(client, server)
    for m in (client, server):
        with pytest.raises(IllegalTransition, match="established"):
            m.receive_data(b"\x00", 1)
        with pytest.raises(IllegalTransition):
            m.receive_eof(1)
        assert m.state is State.ESTABLISHED


# ------------------------------------------------------------------------------------------ timeouts


def test_server_drops_a_silent_peer_at_the_hello_deadline() -> None:
    server = _server(_table())
    server.start(10.0)
    assert server.get_timer() == 12.0
    server.handle_timer(11.999)  # early wake-up: nothing happens
    assert server.state is State.AWAIT_HELLO
    with pytest.raises(HandshakeTimeout, match="no HELLO within 2 s") as info:
        server.handle_timer(12.0)
    assert info.value.context["step"] == "hello" and info.value.context["address"] == "10.0.0.2:55000"
    err = _error_sent(server)
    assert (err.code, err.step) == ("timeout", "hello")
    assert _state(server) is State.FAILED and server.get_timer() is None


def test_client_gives_up_waiting_for_welcome() -> None:
    client = _client()
    client.start(5.0)
    client.data_to_send()
    assert client.get_timer() == 8.0
    with pytest.raises(HandshakeTimeout, match="WELCOME"):
        client.handle_timer(9.0)
    assert _error_sent(client).code == "timeout"


def test_confirm_timeout_drops_the_session_it_opened() -> None:
    table = _table()
    client, server = _client(), _server(table)
    server.start(0)
    client.start(0)
    server.receive_data(client.data_to_send(), 1.0)
    assert len(table) == 1 and server.get_timer() == 5.0
    with pytest.raises(HandshakeTimeout, match="CONFIRM"):
        server.handle_timer(5.0)
    assert len(table) == 0


def test_confirm_timeout_on_a_join_frees_the_stream_slot() -> None:
    table = _table()
    c, _ = _run(_client(), _server(table))
    joiner, server = _client(join=c.info), _server(table)
    server.start(0)
    joiner.start(0)
    server.receive_data(joiner.data_to_send(), 0)
    session = table.get(c.info.session_id)
    assert session is not None and session.live_streams == 2
    with pytest.raises(HandshakeTimeout):
        server.handle_timer(100.0)
    assert session.live_streams == 1 and c.info.session_id in table


# --------------------------------------------------------------------------------- errors and EOFs


def test_eof_while_waiting_is_a_connection_lost() -> None:
    server = _server(_table())
    server.start(0)
    server.receive_data(encode_frame(Frame(_hello()))[:10], 0)
    with pytest.raises(ConnectionLost, match="in the middle of a frame while waiting for HELLO"):
        server.receive_eof(0)
    assert server.state is State.FAILED and server.data_to_send() == b""


def test_garbage_is_a_protocol_error_reported_to_the_peer() -> None:
    server = _server(_table())
    server.start(0)
    with pytest.raises(ProtocolError) as info:
        server.receive_data(b"GET / HTTP/1.1\r\n\r\n", 0)
    assert info.value.what.value == "oversize"
    assert _error_sent(server).code == "protocol"


def test_no_common_version_gives_a_clear_error_on_both_sides() -> None:
    client, server = _client(versions=VersionRange(4, 5)), _server(_table(), versions=VersionRange(3, 3))
    server.start(0)
    client.start(0)
    with pytest.raises(VersionMismatch) as on_server:
        server.receive_data(client.data_to_send(), 0)
    assert on_server.value.message == "no common protocol version: ours 3..3, peer 4..5"
    with pytest.raises(VersionMismatch) as on_client:
        client.receive_data(server.data_to_send(), 0)
    assert on_client.value.message.startswith("no common protocol version: ours 4..5, peer 3..3")
    assert on_client.value.by_peer and on_client.value.context["step"] == "hello"
    assert client.state is State.FAILED and client.data_to_send() == b""  # no ERROR in reply to an ERROR


def test_hello_identity_must_match_the_client_certificate() -> None:
    table = _table()
    liar = NodeIdentity("dc1", "other-host", "agent")
    client, server = _client(claimed=liar), _server(table, client_cert=CLIENT_ID)
    server.start(0)
    client.start(0)
    with pytest.raises(IdentityMismatch) as info:
        server.receive_data(client.data_to_send(), 0)
    assert "other-host@dc1/agent" in info.value.message and "src-host@dc1/agent" in info.value.message
    assert info.value.context["claimed"] == "other-host@dc1/agent"
    assert len(table) == 0
    with pytest.raises(IdentityMismatch) as on_client:
        client.receive_data(server.data_to_send(), 0)
    assert on_client.value.by_peer


@pytest.mark.parametrize("field", ["cluster_id", "role"])
def test_cluster_and_role_are_part_of_the_identity(field: str) -> None:
    server = _server(_table())
    server.start(0)
    with pytest.raises(IdentityMismatch):
        server.receive_data(encode_frame(Frame(_hello(**{field: "zz"}))), 0)


def test_welcome_identity_must_match_the_server_certificate() -> None:
    table = _table()
    client, server = (
        _client(server_cert=SERVER_ID),
        _server(table, claimed=NodeIdentity("dc1", "imposter", "agent")),
    )
    server.start(0)
    client.start(0)
    server.receive_data(client.data_to_send(), 0)
    with pytest.raises(IdentityMismatch, match="imposter"):
        client.receive_data(server.data_to_send(), 0)
    assert _error_sent(client).code == "identity-mismatch"
    # The server learns it was refused, and the session it reserved is dropped.
    with pytest.raises(IdentityMismatch):
        server.receive_data(encode_frame(Frame(Error(code="identity-mismatch", reason="x"))), 0)
    assert len(table) == 0


def test_client_checks_the_expected_peer() -> None:
    client = _client(expect=ExpectedPeer(node_id="somebody-else"))
    with pytest.raises(IdentityMismatch, match="expected node id 'somebody-else'"):
        _run(client, _server(_table()))


@pytest.mark.parametrize(
    ("changes", "error", "needle"),
    [
        ({"min_version": 5, "max_version": 4}, NegotiationError, "invalid version range"),
        ({"mode": "warp"}, NegotiationError, "unknown mode"),
        ({"intent": "steal"}, NegotiationError, "unknown intent"),
        ({"intent": "join"}, NegotiationError, "needs session_id"),
        ({"max_frame_size": 1024}, NegotiationError, "max frame size"),
    ],
)
def test_bad_hello_contents_are_refused(
    changes: dict[str, object], error: type[Exception], needle: str
) -> None:
    table = _table()
    server = _server(table)
    server.start(0)
    with pytest.raises(error, match=needle):
        server.receive_data(encode_frame(Frame(_hello(**changes))), 0)
    assert server.state is State.FAILED and len(table) == 0
    assert _error_sent(server).code in ("negotiation", "protocol")


def test_peer_frame_size_above_the_hard_limit_is_clamped_not_refused() -> None:
    server = _server(_table())
    server.start(0)
    server.receive_data(encode_frame(Frame(_hello(max_frame_size=2**32 - 1))), 0)
    assert server.state is State.AWAIT_CONFIRM


def test_client_refuses_capabilities_it_did_not_offer() -> None:
    client = _client()
    client.start(0)
    welcome = WRONG_FRAMES["WELCOME"].body
    assert isinstance(welcome, Welcome)
    bad = dataclasses.replace(welcome, codecs=("brotli",))
    with pytest.raises(NegotiationError, match="did not offer"):
        client.receive_data(encode_frame(Frame(bad)), 0)


def test_client_refuses_a_version_outside_its_range() -> None:
    client = _client()
    client.start(0)
    welcome = WRONG_FRAMES["WELCOME"].body
    assert isinstance(welcome, Welcome)
    bad = dataclasses.replace(welcome, version=9, max_version=9)
    with pytest.raises(VersionMismatch, match="server chose protocol version 9"):
        client.receive_data(encode_frame(Frame(bad)), 0)


def test_confirm_for_another_session_is_refused() -> None:
    table = _table()
    client, server = _client(), _server(table)
    server.start(0)
    client.start(0)
    server.receive_data(client.data_to_send(), 0)
    with pytest.raises(PeerProtocolError, match="CONFIRM names session"):
        server.receive_data(encode_frame(Frame(Confirm(session_id=b"\xee" * 16))), 0)
    assert len(table) == 0


def test_session_table_capacity_is_reported() -> None:
    table = _table(max_sessions=1)
    _run(_client(), _server(table))
    client, server = _client(), _server(table)
    server.start(0)
    client.start(0)
    with pytest.raises(CapacityError, match="maximum of 1 sessions"):
        server.receive_data(client.data_to_send(), 0)
    assert _error_sent(server).code == "busy"


# ------------------------------------------------------------------------------------ join tokens


def _join(
    table: SessionTable, info: SessionInfo, nonce: bytes, *, cert: NodeIdentity = CLIENT_ID
) -> Established:
    joiner = _client(join=info, nonce=nonce, claimed=cert, caps=info.capabilities)
    server = _server(table, client_cert=cert)
    return _run(joiner, server)[1]


def test_join_token_is_single_use() -> None:
    table = _table()
    c, _ = _run(_client(), _server(table))
    _join(table, c.info, b"\x07" * 16)
    with pytest.raises(JoinRefused, match="already used"):
        _join(table, c.info, b"\x07" * 16)


def test_join_token_of_one_session_does_not_open_another() -> None:
    table = _table()
    a, _ = _run(_client(), _server(table))
    b, _ = _run(_client(), _server(table))
    # A's secret with B's session id: the token cannot match.
    forged = dataclasses.replace(a.info, session_id=b.info.session_id)
    with pytest.raises(JoinRefused, match="does not match"):
        _join(table, forged, b"\x08" * 16)


def test_join_after_the_session_ended_is_refused() -> None:
    table = _table()
    c, _ = _run(_client(), _server(table))
    assert table.end(c.info.session_id, "migration done")
    with pytest.raises(JoinRefused, match=r"session has ended \(migration done\)"):
        _join(table, c.info, b"\x09" * 16)


def test_join_from_another_node_is_refused() -> None:
    table = _table()
    c, _ = _run(_client(), _server(table))
    other = NodeIdentity("dc1", "third-host", "agent")
    with pytest.raises(JoinRefused, match="belongs to src-host@dc1/agent"):
        _join(table, c.info, b"\x0a" * 16, cert=other)


def test_join_of_an_unknown_session_is_refused() -> None:
    table = _table()
    c, _ = _run(_client(), _server(table))
    ghost = dataclasses.replace(c.info, session_id=b"\xab" * 16)
    with pytest.raises(JoinRefused, match="no such session"):
        _join(table, ghost, b"\x0b" * 16)


def test_join_respects_the_session_stream_limit() -> None:
    table = _table()
    c, _ = _run(_client(caps=Capabilities(max_streams=2)), _server(table))
    _join(table, c.info, b"\x01" * 16)
    with pytest.raises(JoinRefused, match="maximum of 2 streams"):
        _join(table, c.info, b"\x02" * 16)
    table.stream_closed(c.info.session_id, 1.0)
    _join(table, c.info, b"\x03" * 16)  # a slot became free


def test_join_token_is_bound_to_nonce_session_and_identity() -> None:
    secret, sid, nonce = b"k" * 32, b"s" * 16, b"n" * 16
    base = join_token(secret, sid, nonce, CLIENT_ID)
    assert len(base) == 32
    assert base != join_token(secret, b"t" * 16, nonce, CLIENT_ID)
    assert base != join_token(secret, sid, b"m" * 16, CLIENT_ID)
    assert base != join_token(secret, sid, nonce, NodeIdentity("dc1", "src-host", "gateway"))
    assert base != join_token(b"j" * 32, sid, nonce, CLIENT_ID)


def test_joining_needs_a_nonce() -> None:
    table = _table()
    c, _ = _run(_client(), _server(table))
    with pytest.raises(DwcpConfigError):
        ClientHandshake(Offer(identity=CLIENT_ID), SERVER_ID, join=c.info, join_nonce=b"short")
