"""Client side of DWCP: open a session with a server, or join one more stream to it.

    stream = await open_session("10.0.0.2", 7400, tls, capabilities=caps, mode=Mode.INTERNET)
    more = await join_session("10.0.0.2", 7400, stream.info, tls)

Each call makes one TCP connection, runs TLS 1.3 with mutual authentication against ``tls.bundle``,
reads the server's identity from its certificate and runs the handshake (handshake.py). Every step
has a deadline; every failure raises a typed HandshakeError (or ProtocolError) with the step, the
address and the identities involved, and is logged as a ``dwcp.handshake.failed`` event.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl

from novacron.dwcp.errors import (
    ConnectionLost,
    DwcpError,
    HandshakeError,
    HandshakeTimeout,
    PeerCertificateError,
    error_fields,
)
from novacron.dwcp.frames.messages import JOIN_NONCE_BYTES
from novacron.dwcp.handshake import ClientHandshake, ExpectedPeer, HandshakeTimeouts, Offer, Role
from novacron.dwcp.negotiation import (
    DEFAULT_CAPABILITIES,
    SUPPORTED_VERSIONS,
    Capabilities,
    Mode,
    VersionRange,
)
from novacron.dwcp.session import SessionInfo
from novacron.dwcp.stream import Stream, StreamLimits, describe_ssl_error, run_handshake
from novacron.observability.log import log_event
from novacron.security.errors import CertificateError
from novacron.security.identity import NodeIdentity
from novacron.security.tls import TlsConfig, peer_identity

logger = logging.getLogger("novacron.dwcp.client")


async def _connect(
    host: str,
    port: int,
    tls: TlsConfig,
    *,
    timeouts: HandshakeTimeouts,
    limits: StreamLimits,
    local_address: str | None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, NodeIdentity]:
    address = f"{host}:{port}"
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host,
                port,
                ssl=tls.client,
                server_hostname=host,
                limit=limits.read_buffer,
                local_addr=(local_address, 0) if local_address else None,
            ),
            timeouts.tls,
        )
    except TimeoutError:
        raise HandshakeTimeout(
            f"no TCP+TLS connection within {timeouts.tls:g} s", step="tls", address=address
        ) from None
    except ssl.SSLError as exc:
        raise PeerCertificateError(
            f"TLS handshake failed: {describe_ssl_error(exc)}",
            step="tls",
            address=address,
            tls_error=str(exc),
        ) from exc
    except (ConnectionResetError, ConnectionAbortedError, EOFError) as exc:
        raise ConnectionLost(
            f"server closed the connection during the TLS handshake ({exc}); "
            "it may be at capacity or rate-limiting this address",
            step="tls",
            address=address,
        ) from exc
    except OSError as exc:
        raise ConnectionLost(f"cannot connect: {exc}", step="connect", address=address) from exc
    ssl_object = writer.get_extra_info("ssl_object")
    try:
        ssl_object.getpeercert(binary_form=True)
    except ValueError:
        # The server's alert (it refused our certificate) arrived right behind its handshake and
        # already broke the session: read it to say why.
        failure = await _refusal_after_tls(reader, address, timeouts.welcome)
        writer.transport.abort()
        raise failure from None
    try:
        peer = peer_identity(ssl_object, tls.bundle)
    except CertificateError as exc:
        writer.transport.abort()
        raise PeerCertificateError(
            f"server certificate is not acceptable: {exc.message}", step="tls", address=address, **exc.context
        ) from exc
    return reader, writer, peer


async def _refusal_after_tls(reader: asyncio.StreamReader, address: str, seconds: float) -> HandshakeError:
    try:
        async with asyncio.timeout(seconds):
            data = await reader.read(1)
    except ssl.SSLError as exc:
        return PeerCertificateError(
            f"TLS session rejected: {describe_ssl_error(exc)}",
            step="welcome",
            address=address,
            tls_error=str(exc),
        )
    except (OSError, TimeoutError) as exc:
        return ConnectionLost(
            f"TLS session failed right after the handshake: {exc}", step="welcome", address=address
        )
    return ConnectionLost(
        f"TLS session failed right after the handshake ({len(data)} bytes readable)",
        step="welcome",
        address=address,
    )


async def _handshake(
    host: str,
    port: int,
    tls: TlsConfig,
    offer: Offer,
    *,
    join: SessionInfo | None,
    join_nonce: bytes | None,
    expect: ExpectedPeer | None,
    timeouts: HandshakeTimeouts | None,
    limits: StreamLimits | None,
    local_address: str | None,
) -> Stream:
    timeouts = timeouts or HandshakeTimeouts()
    limits = limits or StreamLimits()
    address = f"{host}:{port}"
    try:
        reader, writer, peer = await _connect(
            host, port, tls, timeouts=timeouts, limits=limits, local_address=local_address
        )
        machine = ClientHandshake(
            offer, peer, join=join, join_nonce=join_nonce, expect=expect, timeouts=timeouts, address=address
        )
        try:
            established = await run_handshake(
                machine, reader, writer, read_chunk=limits.read_chunk, address=address
            )
        except BaseException:
            writer.transport.abort()
            raise
    except DwcpError as exc:
        fields = {"role": "client", "address": address, **error_fields(exc)}
        log_event(logger, "dwcp.handshake.failed", logging.WARNING, **fields)
        raise
    stream = Stream(
        reader,
        writer,
        established,
        decoder=machine.decoder,
        encoder=machine.encoder,
        role=Role.CLIENT,
        address=address,
        limits=limits,
    )
    info = established.info
    log_event(
        logger,
        "dwcp.session.opened" if established.opened else "dwcp.stream.joined",
        role="client",
        session=info.name,
        stream=info.stream_index,
        peer=str(info.peer),
        address=address,
        version=info.version,
        peer_mode=info.peer_mode.value,
    )
    return stream


async def open_session(
    host: str,
    port: int,
    tls: TlsConfig,
    *,
    capabilities: Capabilities = DEFAULT_CAPABILITIES,
    mode: Mode = Mode.AUTO,
    versions: VersionRange = SUPPORTED_VERSIONS,
    expect: ExpectedPeer | None = None,
    timeouts: HandshakeTimeouts | None = None,
    limits: StreamLimits | None = None,
    local_address: str | None = None,
    claimed_identity: NodeIdentity | None = None,
) -> Stream:
    """Open a new session with the server at ``host:port``; returns its first stream (index 0).

    ``stream.info`` holds the session (id, version, capabilities, peer identity and mode) and what
    :func:`join_session` needs. ``claimed_identity`` overrides the identity sent in HELLO (tests of
    the server's identity check only); normally it is the one in our certificate.
    """
    offer = Offer(
        identity=claimed_identity or tls.identity, capabilities=capabilities, mode=mode, versions=versions
    )
    return await _handshake(
        host,
        port,
        tls,
        offer,
        join=None,
        join_nonce=None,
        expect=expect,
        timeouts=timeouts,
        limits=limits,
        local_address=local_address,
    )


async def join_session(
    host: str,
    port: int,
    session: SessionInfo,
    tls: TlsConfig,
    *,
    capabilities: Capabilities | None = None,
    mode: Mode = Mode.AUTO,
    versions: VersionRange = SUPPORTED_VERSIONS,
    timeouts: HandshakeTimeouts | None = None,
    limits: StreamLimits | None = None,
    local_address: str | None = None,
    join_nonce: bytes | None = None,
) -> Stream:
    """Join one more stream to ``session`` (from a stream this node opened with :func:`open_session`).

    Each join uses a fresh random nonce, so its token is single-use; ``join_nonce`` fixes it (tests of
    replay protection only). The server must be the one that opened the session.
    """
    offer = Offer(
        identity=tls.identity,
        capabilities=capabilities or session.capabilities,
        mode=mode,
        versions=versions,
    )
    return await _handshake(
        host,
        port,
        tls,
        offer,
        join=session,
        join_nonce=join_nonce or os.urandom(JOIN_NONCE_BYTES),
        expect=None,
        timeouts=timeouts,
        limits=limits,
        local_address=local_address,
    )
