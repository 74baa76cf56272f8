"""Server side of DWCP: a listener that authenticates peers and hands established streams to the app.

    async with DwcpServer(tls, capabilities=caps, mode=Mode.DATACENTER) as server:
        await server.start("0.0.0.0", 7400)
        event = await server.next_event()      # SessionOpened(stream) or StreamJoined(stream)

or pass ``handler=`` (an async callable) to have each event run in its own task.

Admission happens before TLS, so a flood costs us an accept and a close, not a TLS handshake: a
connection is dropped at once (and logged) if the server is closing, at its connection cap, at its
cap of handshakes in progress, if its peer address already has too many handshakes in progress, or if
that address has used up its handshake attempts (token bucket). Admitted connections get a deadline
for TLS and one for every handshake step, so a silent peer is dropped without blocking anyone else.
No failure of one connection reaches the listener; each is logged as a structured event with the peer
address, the claimed identity and the step.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field

from novacron.dwcp.errors import (
    ConnectionLost,
    DwcpConfigError,
    DwcpError,
    HandshakeTimeout,
    PeerCertificateError,
    error_fields,
)
from novacron.dwcp.frames.codec import Frame, FrameEncoder
from novacron.dwcp.frames.limits import HANDSHAKE_MAX_FRAME_SIZE
from novacron.dwcp.frames.messages import Error
from novacron.dwcp.handshake import HandshakeTimeouts, Offer, Role, ServerHandshake, _truncate
from novacron.dwcp.negotiation import (
    DEFAULT_CAPABILITIES,
    SUPPORTED_VERSIONS,
    Capabilities,
    Mode,
    VersionRange,
)
from novacron.dwcp.ratelimit import (
    DEFAULT_ATTEMPT_BURST,
    DEFAULT_ATTEMPTS_PER_SECOND,
    DEFAULT_MAX_TRACKED_PEERS,
    AttemptLimiter,
)
from novacron.dwcp.session import SessionLimits, SessionTable
from novacron.dwcp.stream import (
    DEFAULT_CLOSE_TIMEOUT,
    Stream,
    StreamLimits,
    describe_ssl_error,
    run_handshake,
)
from novacron.dwcp.tls_accept import accept_tls
from novacron.observability.log import log_event
from novacron.security.errors import CertificateError
from novacron.security.tls import TlsConfig, peer_identity

logger = logging.getLogger("novacron.dwcp.server")

DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_MAX_HANDSHAKES = 64
DEFAULT_MAX_HANDSHAKES_PER_PEER = 8
DEFAULT_BACKLOG = 128
ACCEPT_ERROR_BACKOFF = 0.1  # seconds to wait after a failed accept() (e.g. no free file descriptor)


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # established streams + handshakes
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES  # handshakes in progress, all peers
    max_handshakes_per_peer: int = DEFAULT_MAX_HANDSHAKES_PER_PEER  # in progress, per peer address
    attempts_per_second: float = DEFAULT_ATTEMPTS_PER_SECOND  # per peer address, after the burst
    attempt_burst: int = DEFAULT_ATTEMPT_BURST
    max_tracked_peers: int = DEFAULT_MAX_TRACKED_PEERS
    backlog: int = DEFAULT_BACKLOG

    def __post_init__(self) -> None:
        if min(self.max_connections, self.max_handshakes, self.max_handshakes_per_peer, self.backlog) < 1:
            raise DwcpConfigError("server limits must be at least 1", limits=repr(self))


@dataclass(frozen=True, slots=True)
class SessionOpened:
    """A client opened a new session; ``stream`` is its first stream (index 0)."""

    stream: Stream


@dataclass(frozen=True, slots=True)
class StreamJoined:
    """A further stream joined the session ``stream.info.session_id``."""

    stream: Stream


ServerEvent = SessionOpened | StreamJoined
Handler = Callable[[ServerEvent], Coroutine[object, object, None]]


@dataclass(slots=True)
class ServerStats:
    """Counters since start (tests and metrics read them)."""

    accepted: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # admission refusals by reason
    tls_failed: int = 0
    handshake_failed: dict[str, int] = field(default_factory=dict)  # by error code
    sessions_opened: int = 0
    streams_joined: int = 0
    connections: int = 0  # current
    handshakes: int = 0  # current


class DwcpServer:
    """Accepts DWCP connections: TLS 1.3 mutual auth, handshake, sessions. See the module docstring."""

    def __init__(
        self,
        tls: TlsConfig,
        *,
        capabilities: Capabilities = DEFAULT_CAPABILITIES,
        mode: Mode = Mode.AUTO,
        versions: VersionRange = SUPPORTED_VERSIONS,
        timeouts: HandshakeTimeouts | None = None,
        limits: ServerLimits | None = None,
        session_limits: SessionLimits | None = None,
        stream_limits: StreamLimits | None = None,
        handler: Handler | None = None,
    ) -> None:
        self._tls = tls
        self.offer = Offer(identity=tls.identity, capabilities=capabilities, mode=mode, versions=versions)
        self.timeouts = timeouts or HandshakeTimeouts()
        self.limits = limits or ServerLimits()
        self.stream_limits = stream_limits or StreamLimits()
        self.sessions = SessionTable(session_limits)
        self.stats = ServerStats()
        self._handler = handler
        self._attempts = AttemptLimiter(
            self.limits.attempts_per_second, self.limits.attempt_burst, self.limits.max_tracked_peers
        )
        self._per_peer: dict[str, int] = {}
        # Every queued event holds a connection, so the connection cap bounds the queue.
        self._events: asyncio.Queue[ServerEvent] = asyncio.Queue(self.limits.max_connections)
        self._handshake_tasks: set[asyncio.Task[None]] = set()
        self._handler_tasks: set[asyncio.Task[None]] = set()
        self._streams: set[Stream] = set()
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._closing = False

    # ------------------------------------------------------------------------------------ control

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen on ``host:port`` (port 0: any free port); returns the bound address."""
        if self._listener is not None:
            raise DwcpConfigError("server already started")
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            sock = socket.create_server((host, port), family=family, backlog=self.limits.backlog)
        except OSError as exc:
            raise DwcpError(f"cannot listen on {host}:{port}: {exc}", host=host, port=port) from exc
        sock.setblocking(False)
        self._listener = sock
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(sock))
        addr = self.address
        log_event(logger, "dwcp.server.listening", host=addr[0], port=addr[1], node=str(self._tls.identity))
        return addr

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            raise DwcpConfigError("server is not listening")
        sockname = self._listener.getsockname()
        return str(sockname[0]), int(sockname[1])

    def reload_tls(self, tls: TlsConfig) -> None:
        """Use new credentials/trust bundle for new connections (CA rotation); the identity must stay."""
        if tls.identity != self._tls.identity:
            raise DwcpConfigError(
                "reloaded TLS identity differs from the server's",
                old=str(self._tls.identity),
                new=str(tls.identity),
            )
        self._tls = tls

    async def next_event(self) -> ServerEvent:
        """The next opened session or joined stream (when no ``handler`` was given)."""
        return await self._events.get()

    def end_session(self, session_id: bytes, why: str = "ended by server") -> bool:
        """End a session: no more joins. Its streams stay open until closed. False if not open."""
        ended = self.sessions.end(session_id, why)
        if ended:
            log_event(logger, "dwcp.session.ended", session=session_id[:8].hex(), why=why)
        return ended

    async def close(self) -> None:
        """Stop listening, cancel handshakes in progress, close established streams and handlers."""
        if self._closing:
            return
        self._closing = True
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        for task in list(self._handshake_tasks):
            task.cancel()
        await asyncio.gather(*self._handshake_tasks, return_exceptions=True)
        await asyncio.gather(*(s.close("server shutting down") for s in list(self._streams)))
        while not self._events.empty():
            self._events.get_nowait().stream.abort()
        for task in list(self._handler_tasks):
            task.cancel()
        await asyncio.gather(*self._handler_tasks, return_exceptions=True)
        log_event(logger, "dwcp.server.closed", node=str(self._tls.identity))

    async def __aenter__(self) -> DwcpServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------------------------- admission

    def _admit(self, ip: str, now: float) -> str | None:
        """Why a new connection from ``ip`` is refused, or None to admit it."""
        if self._closing:
            return "closing"
        if self.stats.connections >= self.limits.max_connections:
            return "max-connections"
        if self.stats.handshakes >= self.limits.max_handshakes:
            return "max-handshakes"
        if self._per_peer.get(ip, 0) >= self.limits.max_handshakes_per_peer:
            return "peer-handshakes"
        if not self._attempts.allow(ip, now):
            return "rate-limited"
        return None

    async def _accept_loop(self, sock: socket.socket) -> None:
        # Our own accept loop (not asyncio.start_server with ssl=) so admission runs before TLS.
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peername = await loop.sock_accept(sock)
            except OSError as exc:  # e.g. out of file descriptors: log, let connections drain, retry
                log_event(logger, "dwcp.server.accept_failed", logging.ERROR, error=str(exc))
                await asyncio.sleep(ACCEPT_ERROR_BACKOFF)
                continue
            ip, port = str(peername[0]), int(peername[1])
            refusal = self._admit(ip, loop.time())
            if refusal is not None:
                conn.close()
                self.stats.refused[refusal] = self.stats.refused.get(refusal, 0) + 1
                log_event(
                    logger,
                    "dwcp.connection.refused",
                    logging.WARNING,
                    address=f"{ip}:{port}",
                    reason=refusal,
                    step="accept",
                )
                continue
            self.stats.accepted += 1
            self.stats.connections += 1
            self.stats.handshakes += 1
            self._per_peer[ip] = self._per_peer.get(ip, 0) + 1
            task = loop.create_task(self._serve(conn, ip, port))
            self._handshake_tasks.add(task)
            task.add_done_callback(self._handshake_done)

    def _handshake_done(self, task: asyncio.Task[None]) -> None:
        self._handshake_tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # A bug, not a peer's fault: make it visible; the listener carries on.
            log_event(
                logger,
                "dwcp.server.connection_crashed",
                logging.ERROR,
                error=repr(exc),
                kind=type(exc).__name__,
            )

    async def _serve(self, conn: socket.socket, ip: str, port: int) -> None:
        address = f"{ip}:{port}"
        stream: Stream | None = None
        transport: asyncio.Transport | None = None
        try:
            transport, stream = await self._accept(conn, address)
        except DwcpError as exc:
            self._record_failure(exc, address)
        finally:
            self.stats.handshakes -= 1
            left = self._per_peer.pop(ip, 1) - 1
            if left > 0:
                self._per_peer[ip] = left
            if stream is None:
                self.stats.connections -= 1
                if transport is not None:
                    transport.abort()
                conn.close()
        if stream is not None:
            self._deliver(stream)

    async def _accept(self, conn: socket.socket, address: str) -> tuple[asyncio.Transport, Stream]:
        tls = self._tls
        t = self.timeouts.tls
        try:
            reader, writer = await accept_tls(
                conn, tls.server, seconds=t, read_buffer=self.stream_limits.read_buffer
            )
        except TimeoutError:
            raise HandshakeTimeout(f"no TLS handshake within {t:g} s", step="tls", address=address) from None
        except ssl.SSLError as exc:
            raise PeerCertificateError(
                f"TLS handshake failed: {describe_ssl_error(exc)}",
                step="tls",
                address=address,
                tls_error=str(exc),
            ) from exc
        except (OSError, EOFError) as exc:
            raise ConnectionLost(f"connection lost during TLS: {exc}", step="tls", address=address) from exc
        transport = writer.transport
        try:
            return transport, await self._handshake(reader, writer, address, tls)  # type: ignore[return-value]
        except BaseException:
            transport.abort()
            raise

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str, tls: TlsConfig
    ) -> Stream:
        try:
            peer = peer_identity(writer.get_extra_info("ssl_object"), tls.bundle)
        except CertificateError as exc:
            await self._send_error(writer, "certificate", exc.message, "tls")
            raise PeerCertificateError(
                f"client certificate is not acceptable: {exc.message}",
                step="tls",
                address=address,
                **exc.context,
            ) from exc
        machine = ServerHandshake(self.offer, peer, self.sessions, timeouts=self.timeouts, address=address)
        established = await run_handshake(
            machine, reader, writer, read_chunk=self.stream_limits.read_chunk, address=address
        )
        return Stream(
            reader,
            writer,
            established,
            decoder=machine.decoder,
            encoder=machine.encoder,
            role=Role.SERVER,
            address=address,
            limits=self.stream_limits,
            on_close=self._stream_closed,
        )

    async def _send_error(self, writer: asyncio.StreamWriter, code: str, reason: str, step: str) -> None:
        frame = Frame(Error(code=code, reason=_truncate(reason), step=step))
        try:
            writer.write(FrameEncoder(HANDSHAKE_MAX_FRAME_SIZE).encode(frame))
            await asyncio.wait_for(writer.drain(), DEFAULT_CLOSE_TIMEOUT)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            log_event(logger, "dwcp.handshake.error_frame_lost", logging.DEBUG, error=str(exc))

    def _record_failure(self, exc: DwcpError, address: str) -> None:
        fields = {"role": "server", "address": address, **error_fields(exc)}
        code = str(fields.get("code", "error"))
        if fields.get("step") == "tls":
            self.stats.tls_failed += 1
        self.stats.handshake_failed[code] = self.stats.handshake_failed.get(code, 0) + 1
        log_event(logger, "dwcp.handshake.failed", logging.WARNING, **fields)

    # ------------------------------------------------------------------------------------ streams

    def _deliver(self, stream: Stream) -> None:
        info = stream.info
        event: ServerEvent
        if stream.opened:
            self.stats.sessions_opened += 1
            event = SessionOpened(stream)
        else:
            self.stats.streams_joined += 1
            event = StreamJoined(stream)
        self._streams.add(stream)
        log_event(
            logger,
            "dwcp.session.opened" if stream.opened else "dwcp.stream.joined",
            role="server",
            session=info.name,
            stream=info.stream_index,
            peer=str(info.peer),
            address=stream.address,
            version=info.version,
            peer_mode=info.peer_mode.value,
            codecs=",".join(info.capabilities.codecs),
            max_streams=info.capabilities.max_streams,
        )
        if self._handler is not None:
            task: asyncio.Task[None] = asyncio.get_running_loop().create_task(self._handler(event))
            self._handler_tasks.add(task)
            task.add_done_callback(self._handler_done)
        else:
            self._events.put_nowait(event)  # cannot be full: bounded by the connection cap

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handler_tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log_event(
                logger, "dwcp.server.handler_failed", logging.ERROR, error=repr(exc), kind=type(exc).__name__
            )

    def _stream_closed(self, stream: Stream, session_ended: bool) -> None:
        self._streams.discard(stream)
        self.stats.connections -= 1
        info = stream.info
        if session_ended:
            self.end_session(info.session_id, f"closed by {info.peer}" if stream.peer_goodbye else "closed")
        else:
            self.sessions.stream_closed(info.session_id, asyncio.get_running_loop().time())
        log_event(
            logger, "dwcp.stream.closed", session=info.name, stream=info.stream_index, address=stream.address
        )
