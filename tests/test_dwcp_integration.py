"""DWCP over real TLS 1.3 on loopback: authenticated sessions and streams, and every refusal.

Under TLS 1.3 a client whose certificate the server rejects sees its own handshake succeed; the
rejection arrives as an alert on the first read. The client driver reads WELCOME before returning, so
these tests assert on ``open_session`` (which includes that first read), never on the bare connect.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

import pytest

from novacron.dwcp.client import join_session, open_session
from novacron.dwcp.errors import (
    ConnectionLost,
    IdentityMismatch,
    JoinRefused,
    PeerCertificateError,
    ProtocolError,
    RemoteError,
    StreamClosed,
    VersionMismatch,
)
from novacron.dwcp.frames import (
    HANDSHAKE_MAX_FRAME_SIZE,
    DataChunk,
    Error,
    Frame,
    FrameDecoder,
    Ping,
    Pong,
)
from novacron.dwcp.handshake import ExpectedPeer, HandshakeTimeouts
from novacron.dwcp.negotiation import Capabilities, Mode, VersionRange
from novacron.dwcp.server import DwcpServer, ServerEvent, ServerLimits, SessionOpened, StreamJoined
from novacron.dwcp.stream import Stream
from novacron.security import pki
from novacron.security.identity import NodeIdentity
from novacron.security.tls import TlsConfig

MiB = 1024 * 1024
NOW = dt.datetime.now(dt.UTC)
FAST = HandshakeTimeouts(tls=1.0, hello=1.0, welcome=2.0, confirm=1.0)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return pki.create_ca("dc1")


@pytest.fixture(scope="module")
def server_tls(ca: pki.CertificateAuthority) -> TlsConfig:
    return TlsConfig(pki.issue_node_cert(ca, "dst-host", "agent"))


@pytest.fixture(scope="module")
def client_tls(ca: pki.CertificateAuthority) -> TlsConfig:
    return TlsConfig(pki.issue_node_cert(ca, "src-host", "agent"))


@pytest.fixture
async def server(server_tls: TlsConfig) -> AsyncIterator[DwcpServer]:
    async with DwcpServer(
        server_tls,
        capabilities=Capabilities(codecs=("zstd", "lz4"), max_streams=4, features=frozenset({"sack"})),
        mode=Mode.DATACENTER,
        timeouts=FAST,
    ) as srv:
        await srv.start("127.0.0.1", 0)
        yield srv


def _failures(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    return [
        dict(r.novacron_fields)  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "dwcp.handshake.failed" and r.novacron_fields.get("role") == "server"  # type: ignore[attr-defined]
    ]


async def _still_serves(server: DwcpServer, tls: TlsConfig) -> None:
    """A correct peer can still open a session (the listener survived whatever came before)."""
    host, port = server.address
    stream = await open_session(host, port, tls, timeouts=FAST)
    while True:  # events of earlier sessions may be queued before ours
        event = await server.next_event()
        if event.stream.info.session_id == stream.info.session_id:
            break
        await event.stream.close()
    assert isinstance(event, SessionOpened)
    await stream.close()
    await event.stream.close()


# ------------------------------------------------------------------------------------------ success


async def test_open_join_and_exchange_frames(server: DwcpServer, client_tls: TlsConfig) -> None:
    host, port = server.address
    caps = Capabilities(codecs=("lz4", "zstd", "hde1"), max_streams=8, features=frozenset({"sack", "bbr"}))
    first = await open_session(host, port, client_tls, capabilities=caps, mode=Mode.INTERNET)
    opened = await server.next_event()
    assert isinstance(opened, SessionOpened)
    info, sinfo = first.info, opened.stream.info
    assert info.session_id == sinfo.session_id and info.stream_index == 0
    assert info.peer == NodeIdentity("dc1", "dst-host", "agent") and sinfo.peer == NodeIdentity(
        "dc1", "src-host", "agent"
    )
    assert info.peer_mode is Mode.DATACENTER and sinfo.peer_mode is Mode.INTERNET
    assert (
        info.capabilities
        == sinfo.capabilities
        == Capabilities(codecs=("lz4", "zstd"), max_streams=4, features=frozenset({"sack"}))
    )

    second = await join_session(host, port, info, client_tls)
    joined = await server.next_event()
    assert isinstance(joined, StreamJoined)
    assert (
        joined.stream.info.session_id == info.session_id
        and second.info.stream_index == joined.stream.info.stream_index == 1
    )

    # A 1 MiB data chunk (above the handshake frame limit) each way, and control frames.
    payload = bytes(range(256)) * 4096
    await second.send_frame(Frame(DataChunk(seq=42), channel=3, payload=payload))
    got = await joined.stream.recv_frame()
    assert got.body == DataChunk(seq=42) and got.channel == 3 and bytes(got.payload) == payload
    await joined.stream.send_frames(
        [Frame(Ping(ping_id=1, sent_ns=5)), Frame(DataChunk(seq=0), channel=1, payload=b"back")]
    )
    assert (await second.recv_frame()).body == Ping(ping_id=1, sent_ns=5)
    assert bytes((await second.recv_frame()).payload) == b"back"

    # Closing one stream leaves the session; closing with end_session ends it for good.
    await second.close("done with this stream")
    with pytest.raises(StreamClosed, match="done with this stream"):
        await joined.stream.recv_frame()
    assert info.session_id in server.sessions
    await first.close("migration complete", end_session=True)
    with pytest.raises(StreamClosed, match="peer closed the session"):
        await opened.stream.recv_frame()
    assert info.session_id not in server.sessions
    assert server.stats.connections == 0


async def test_handler_mode_echo_server(server_tls: TlsConfig, client_tls: TlsConfig) -> None:
    async def echo(event: ServerEvent) -> None:
        stream = event.stream
        while True:
            try:
                frame = await stream.recv_frame()
            except StreamClosed:
                return
            if isinstance(frame.body, Ping):
                await stream.send_frame(Frame(Pong(ping_id=frame.body.ping_id, sent_ns=frame.body.sent_ns)))
            else:
                raise RuntimeError("handler bug: unexpected frame")  # must not take the listener down

    async with DwcpServer(server_tls, handler=echo, timeouts=FAST) as srv:
        host, port = await srv.start()
        stream = await open_session(host, port, client_tls)
        for i in range(20):
            await stream.send_frame(Frame(Ping(ping_id=i, sent_ns=i * 10)))
            assert (await stream.recv_frame()).body == Pong(ping_id=i, sent_ns=i * 10)
        await stream.send_frame(Frame(DataChunk(seq=0), channel=1, payload=b"x"))  # crashes the handler
        again = await open_session(host, port, client_tls)
        await again.send_frame(Frame(Ping(ping_id=99, sent_ns=0)))
        assert (await again.recv_frame()).body == Pong(ping_id=99, sent_ns=0)
        await again.close()
        await stream.close()


async def test_server_shutdown_closes_streams_cleanly(server_tls: TlsConfig, client_tls: TlsConfig) -> None:
    srv = DwcpServer(server_tls, timeouts=FAST)
    host, port = await srv.start()
    stream = await open_session(host, port, client_tls)
    await srv.next_event()
    await srv.close()
    with pytest.raises(StreamClosed, match="server shutting down"):
        await stream.recv_frame()
    with pytest.raises(ConnectionLost):
        await open_session(host, port, client_tls, timeouts=FAST)


# -------------------------------------------------------------------------------------- certificates


async def test_certificate_from_another_ca_is_refused(
    server: DwcpServer, client_tls: TlsConfig, caplog: pytest.LogCaptureFixture
) -> None:
    rogue_ca = pki.create_ca("dc1")  # same cluster name, different key: not in the server's bundle
    rogue = pki.issue_node_cert(rogue_ca, "src-host", "agent")
    # The rogue trusts the real CA, so it can verify the server; only its own certificate is wrong.
    rogue_tls = TlsConfig(pki.NodeCredentials(rogue.certificate, rogue.private_key, client_tls.bundle))
    host, port = server.address
    with pytest.raises(PeerCertificateError) as info:
        await open_session(host, port, rogue_tls, timeouts=FAST)
    assert "unknown ca" in info.value.message
    assert info.value.step == "welcome"  # seen on the first read, after the client's TLS handshake
    failure = next(f for f in _failures(caplog) if f["kind"] == "PeerCertificateError")
    assert failure["step"] == "tls" and "unable to get local issuer certificate" in str(failure["error"])
    await _still_serves(server, client_tls)


async def test_expired_client_certificate_is_refused(
    server: DwcpServer, ca: pki.CertificateAuthority, client_tls: TlsConfig
) -> None:
    expired = pki.issue_node_cert(
        ca, "src-host", "agent", not_before=NOW - dt.timedelta(days=30), not_after=NOW - dt.timedelta(days=1)
    )
    host, port = server.address
    with pytest.raises(PeerCertificateError, match="certificate expired"):
        await open_session(host, port, TlsConfig(expired), timeouts=FAST)
    assert server.stats.tls_failed == 1
    await _still_serves(server, client_tls)


async def test_expired_server_certificate_is_refused_by_the_client(
    ca: pki.CertificateAuthority, client_tls: TlsConfig
) -> None:
    expired = pki.issue_node_cert(
        ca, "dst-host", "agent", not_before=NOW - dt.timedelta(days=30), not_after=NOW - dt.timedelta(days=1)
    )
    async with DwcpServer(TlsConfig(expired), timeouts=FAST) as srv:
        host, port = await srv.start()
        with pytest.raises(PeerCertificateError, match="certificate has expired") as info:
            await open_session(host, port, client_tls, timeouts=FAST)
        assert info.value.step == "tls"


# -------------------------------------------------------------------------------- handshake refusals


async def test_identity_mismatch_is_refused(
    server: DwcpServer, client_tls: TlsConfig, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = server.address
    with pytest.raises(IdentityMismatch) as info:
        await open_session(
            host,
            port,
            client_tls,
            claimed_identity=NodeIdentity("dc1", "someone-else", "agent"),
            timeouts=FAST,
        )
    assert info.value.by_peer and "someone-else" in info.value.message
    failure = next(f for f in _failures(caplog) if f["code"] == "identity-mismatch")
    assert failure["claimed"] == "someone-else@dc1/agent" and failure["peer"] == "src-host@dc1/agent"
    assert str(failure["address"]).startswith("127.0.0.1:") and failure["step"] == "hello"
    # The client also checks whom it reached.
    with pytest.raises(IdentityMismatch, match="expected node id 'dst-host-2'"):
        await open_session(host, port, client_tls, expect=ExpectedPeer(node_id="dst-host-2"), timeouts=FAST)
    await _still_serves(server, client_tls)


async def test_no_common_version_is_a_clear_error_on_both_sides(
    server: DwcpServer, client_tls: TlsConfig, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = server.address
    with pytest.raises(VersionMismatch) as info:
        await open_session(host, port, client_tls, versions=VersionRange(4, 5), timeouts=FAST)
    assert info.value.message.startswith("no common protocol version: ours 4..5, peer 3..3")
    failure = next(f for f in _failures(caplog) if f["code"] == "version-mismatch")
    assert failure["error"] == "no common protocol version: ours 3..3, peer 4..5"
    await _still_serves(server, client_tls)


async def test_join_tokens_cannot_be_replayed(server: DwcpServer, client_tls: TlsConfig) -> None:
    host, port = server.address
    a = await open_session(host, port, client_tls)
    b = await open_session(host, port, client_tls)
    nonce = b"\x42" * 16
    joined = await join_session(host, port, a.info, client_tls, join_nonce=nonce)
    with pytest.raises(JoinRefused, match="already used"):
        await join_session(host, port, a.info, client_tls, join_nonce=nonce)
    # A's credentials presented for session B.
    import dataclasses

    with pytest.raises(JoinRefused, match="does not match"):
        await join_session(host, port, dataclasses.replace(a.info, session_id=b.info.session_id), client_tls)
    # After the session ended, even a fresh token is refused.
    await a.close(end_session=True)
    events = [await server.next_event() for _ in range(3)]
    opened_a = next(e for e in events if e.stream.info.session_id == a.info.session_id and e.stream.opened)
    with pytest.raises(StreamClosed):
        await opened_a.stream.recv_frame()
    with pytest.raises(JoinRefused, match="session has ended"):
        await join_session(host, port, a.info, client_tls)
    assert server.stats.handshake_failed["join-refused"] == 3
    for s in (joined, b):
        await s.close()


# ------------------------------------------------------------------------------- silence and floods


async def test_silent_peers_are_dropped_without_blocking_others(
    server_tls: TlsConfig, client_tls: TlsConfig, caplog: pytest.LogCaptureFixture
) -> None:
    slow = HandshakeTimeouts(tls=3.0, hello=3.0, welcome=3.0, confirm=3.0)
    async with DwcpServer(server_tls, timeouts=slow) as server:
        await server.start()
        await _silent_peers(server, client_tls, caplog)


async def _silent_peers(server: DwcpServer, client_tls: TlsConfig, caplog: pytest.LogCaptureFixture) -> None:
    host, port = server.address
    # 1. Connects over TCP and never starts TLS.
    tcp_reader, tcp_writer = await asyncio.open_connection(host, port)
    # 2. Completes TLS, then never sends HELLO.
    tls_reader, tls_writer = await asyncio.open_connection(
        host, port, ssl=client_tls.client, server_hostname=host
    )
    # Both are pending on the server; a correct peer is served meanwhile.
    await _still_serves(server, client_tls)
    assert server.stats.handshakes == 2
    # The TLS-silent peer gets an ERROR frame saying why, then the connection closes.
    dec = FrameDecoder(HANDSHAKE_MAX_FRAME_SIZE)
    while (data := await tls_reader.read(4096)) != b"":
        dec.receive_data(data)
    (frame,) = dec.frames()
    assert isinstance(frame.body, Error) and (frame.body.code, frame.body.step) == ("timeout", "hello")
    assert await tcp_reader.read() == b""  # dropped at the TLS deadline
    for w in (tcp_writer, tls_writer):
        w.close()
    steps = sorted(str(f["step"]) for f in _failures(caplog) if f["code"] == "timeout")
    assert steps == ["hello", "tls"]
    assert server.stats.handshakes == 0


async def test_flood_of_connections_is_refused_while_a_correct_peer_connects(
    server_tls: TlsConfig, client_tls: TlsConfig
) -> None:
    limits = ServerLimits(max_handshakes_per_peer=8, attempt_burst=100, attempts_per_second=100.0)
    # Deadlines long enough that the correct peer is served while the flood is still pending, even
    # on a loaded machine; the test then waits for them to expire.
    timeouts = HandshakeTimeouts(tls=4.0, hello=4.0, welcome=4.0, confirm=4.0)
    async with DwcpServer(server_tls, limits=limits, timeouts=timeouts) as srv:
        host, port = await srv.start()
        flood = [await asyncio.open_connection(host, port, local_addr=("127.0.0.2", 0)) for _ in range(60)]
        reads = [asyncio.ensure_future(r.read()) for r, _ in flood]
        # The refused ones are closed at once: wait for exactly those 52 to end.
        for done, fut in enumerate(asyncio.as_completed(reads), start=1):
            assert await fut == b""
            if done == 52:
                break
        assert srv.stats.refused == {"peer-handshakes": 52} and srv.stats.handshakes == 8
        # The admitted ones are still pending; a correct peer from another address gets through.
        stream = await open_session(host, port, client_tls, timeouts=timeouts)
        assert isinstance(await srv.next_event(), SessionOpened)  # the server side has finished too
        assert srv.stats.handshakes == 8
        await stream.close()
        assert [await f for f in reads] == [b""] * 60  # the 8 are dropped at their TLS deadline
        assert srv.stats.handshake_failed == {"timeout": 8}
        for _, w in flood:
            w.close()


async def test_handshake_attempts_are_rate_limited_per_peer(
    server_tls: TlsConfig, client_tls: TlsConfig
) -> None:
    limits = ServerLimits(attempt_burst=3, attempts_per_second=0.01)
    async with DwcpServer(server_tls, limits=limits, timeouts=FAST) as srv:
        host, port = await srv.start()
        for _ in range(3):
            s = await open_session(host, port, client_tls, local_address="127.0.0.3")
            await s.close()
        with pytest.raises(ConnectionLost, match="rate-limiting") as info:
            await open_session(host, port, client_tls, local_address="127.0.0.3", timeouts=FAST)
        assert info.value.step == "tls"
        assert srv.stats.refused == {"rate-limited": 1}
        await _still_serves(srv, client_tls)  # other addresses are unaffected


async def test_connection_cap(server_tls: TlsConfig, client_tls: TlsConfig) -> None:
    async with DwcpServer(server_tls, limits=ServerLimits(max_connections=2), timeouts=FAST) as srv:
        host, port = await srv.start()
        s1 = await open_session(host, port, client_tls)
        s2 = await open_session(host, port, client_tls)
        with pytest.raises(ConnectionLost):
            await open_session(host, port, client_tls, timeouts=FAST)
        assert srv.stats.refused == {"max-connections": 1}
        await s1.close()
        ev = await srv.next_event()
        with pytest.raises(StreamClosed):
            await ev.stream.recv_frame()  # the server notices the close: one slot frees up
        s3 = await open_session(host, port, client_tls)
        for s in (s2, s3):
            await s.close()


# ------------------------------------------------------------------------------ established streams


async def _pair(server: DwcpServer, tls: TlsConfig) -> tuple[Stream, Stream]:
    host, port = server.address
    client = await open_session(host, port, tls)
    return client, (await server.next_event()).stream


async def test_garbage_on_an_established_stream_is_a_protocol_error_both_sides_see(
    server: DwcpServer, client_tls: TlsConfig
) -> None:
    client, srv_stream = await _pair(server, client_tls)
    client._writer.write(b"\x00\x00\x00\x20\x09" + b"\x00" * 27)  # frame format version 9
    with pytest.raises(ProtocolError, match="unsupported frame format version 9"):
        await srv_stream.recv_frame()
    with pytest.raises(RemoteError, match="unsupported frame format version 9") as info:
        await client.recv_frame()
    assert info.value.code == "protocol"


async def test_frames_above_the_negotiated_size_are_refused_locally(
    server: DwcpServer, client_tls: TlsConfig
) -> None:
    host, port = server.address
    client = await open_session(host, port, client_tls, capabilities=Capabilities(max_frame_size=MiB))
    assert client.info.capabilities.max_frame_size == MiB
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        await client.send_frame(Frame(DataChunk(seq=0), channel=1, payload=b"x" * MiB))
    await client.send_frame(Frame(DataChunk(seq=0), channel=1, payload=b"x" * (MiB - 64)))
    ev = await server.next_event()
    assert len((await ev.stream.recv_frame()).payload) == MiB - 64
    await client.close()


async def test_ca_rotation_without_downtime(ca: pki.CertificateAuthority, server_tls: TlsConfig) -> None:
    new_ca = pki.create_ca("dc1")
    both = pki.TrustBundle((ca.certificate, new_ca.certificate))
    old_server = server_tls.credentials
    srv_creds = pki.NodeCredentials(old_server.certificate, old_server.private_key, both)
    async with DwcpServer(TlsConfig(srv_creds), timeouts=FAST) as srv:
        host, port = await srv.start()
        old_client = pki.issue_node_cert(ca, "old-node", "agent")
        new_client = pki.issue_node_cert(new_ca, "new-node", "agent")
        for creds in (old_client, new_client):
            stream = await open_session(
                host, port, TlsConfig(pki.NodeCredentials(creds.certificate, creds.private_key, both))
            )
            await stream.close()
        # Final step: the server moves to a new-CA certificate and drops the old CA.
        moved = pki.issue_node_cert(new_ca, "dst-host", "agent")
        only_new = pki.TrustBundle((new_ca.certificate,))
        srv.reload_tls(TlsConfig(pki.NodeCredentials(moved.certificate, moved.private_key, only_new)))
        with pytest.raises(PeerCertificateError):
            await open_session(
                host,
                port,
                TlsConfig(pki.NodeCredentials(old_client.certificate, old_client.private_key, both)),
                timeouts=FAST,
            )
        stream = await open_session(
            host,
            port,
            TlsConfig(pki.NodeCredentials(new_client.certificate, new_client.private_key, only_new)),
        )
        await stream.close()
