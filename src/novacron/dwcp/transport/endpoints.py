"""Where AMST sessions come from: :func:`connect_session` (opener) and :class:`AmstListener` (acceptor).

    async with AmstListener(tls, capabilities=caps) as listener:
        host, port = await listener.start("0.0.0.0", 7400)
        session = await listener.accept()

    session = await connect_session(host, port, tls, options=SessionOptions(link_bps=1e9))

The opener's session joins further streams itself (``join_session`` with the session's secret); the
listener routes every joined stream to its session by id and refuses streams of sessions it does not
know (ended, or never accepted).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from novacron.dwcp.client import join_session, open_session
from novacron.dwcp.handshake import ExpectedPeer, HandshakeTimeouts
from novacron.dwcp.negotiation import DEFAULT_CAPABILITIES, Capabilities
from novacron.dwcp.negotiation import Mode as AnnouncedMode
from novacron.dwcp.server import DwcpServer, ServerEvent, ServerLimits, SessionOpened
from novacron.dwcp.session import SessionLimits
from novacron.dwcp.stream import Stream, StreamLimits
from novacron.dwcp.transport.core import Role
from novacron.dwcp.transport.errors import SessionFailed
from novacron.dwcp.transport.session import AmstSession, SessionOptions
from novacron.observability.log import log_event
from novacron.security.tls import TlsConfig

logger = logging.getLogger("novacron.dwcp.transport")

DEFAULT_MAX_PENDING_SESSIONS = 64  # opened sessions waiting for accept(); more are refused


async def connect_session(
    host: str,
    port: int,
    tls: TlsConfig,
    *,
    capabilities: Capabilities = DEFAULT_CAPABILITIES,
    mode: AnnouncedMode = AnnouncedMode.AUTO,
    expect: ExpectedPeer | None = None,
    timeouts: HandshakeTimeouts | None = None,
    limits: StreamLimits | None = None,
    local_address: str | None = None,
    options: SessionOptions | None = None,
) -> AmstSession:
    """Open a session with the DWCP server at ``host:port`` and start its transport."""
    first = await open_session(
        host,
        port,
        tls,
        capabilities=capabilities,
        mode=mode,
        expect=expect,
        timeouts=timeouts,
        limits=limits,
        local_address=local_address,
    )

    async def join() -> Stream:
        return await join_session(
            host,
            port,
            first.info,
            tls,
            mode=mode,
            timeouts=timeouts,
            limits=limits,
            local_address=local_address,
        )

    return AmstSession(first, Role.OPENER, options=options, joiner=join)


class AmstListener:
    """A DWCP server whose sessions run the AMST transport."""

    def __init__(
        self,
        tls: TlsConfig,
        *,
        capabilities: Capabilities = DEFAULT_CAPABILITIES,
        mode: AnnouncedMode = AnnouncedMode.AUTO,
        timeouts: HandshakeTimeouts | None = None,
        limits: ServerLimits | None = None,
        session_limits: SessionLimits | None = None,
        stream_limits: StreamLimits | None = None,
        options: SessionOptions | None = None,
        max_pending_sessions: int = DEFAULT_MAX_PENDING_SESSIONS,
    ) -> None:
        self.options = options or SessionOptions()
        self.server = DwcpServer(
            tls,
            capabilities=capabilities,
            mode=mode,
            timeouts=timeouts,
            limits=limits,
            session_limits=session_limits,
            stream_limits=stream_limits,
            handler=self._on_event,
        )
        self._sessions: dict[bytes, AmstSession] = {}
        self._pending: deque[AmstSession] = deque()
        self._max_pending = max_pending_sessions
        self._arrived = asyncio.Event()
        self._closed = False

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        return await self.server.start(host, port)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    @property
    def sessions(self) -> tuple[AmstSession, ...]:
        return tuple(self._sessions.values())

    async def accept(self) -> AmstSession:
        """The next session a peer opened."""
        while not self._pending:
            if self._closed:
                raise SessionFailed("listener is closed")
            self._arrived.clear()
            await self._arrived.wait()
        return self._pending.popleft()

    async def _on_event(self, event: ServerEvent) -> None:
        stream = event.stream
        sid = stream.info.session_id
        if isinstance(event, SessionOpened):
            if self._closed or len(self._pending) >= self._max_pending:
                log_event(
                    logger,
                    "dwcp.transport.session_refused",
                    logging.WARNING,
                    session=stream.info.name,
                    reason="closing" if self._closed else "too many sessions waiting for accept()",
                )
                await stream.close("not accepting sessions", end_session=True)
                return
            session = AmstSession(stream, Role.ACCEPTOR, options=self.options, on_end=self._session_ended)
            self._sessions[sid] = session
            self._pending.append(session)
            self._arrived.set()
            return
        owner = self._sessions.get(sid)
        if owner is None or owner.closed:
            log_event(
                logger,
                "dwcp.transport.join_refused",
                logging.WARNING,
                session=stream.info.name,
                reason="unknown",
            )
            await stream.close("no such transport session")
            return
        owner.add_stream(stream)

    def _session_ended(self, session: AmstSession) -> None:
        sid = session.info.session_id
        if self._sessions.get(sid) is session:
            del self._sessions[sid]
            self.server.end_session(sid, "transport session ended")

    async def close(self) -> None:
        self._closed = True
        self._arrived.set()
        for session in list(self._sessions.values()):
            session.abort("listener closing")
        await self.server.close()

    async def __aenter__(self) -> AmstListener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
