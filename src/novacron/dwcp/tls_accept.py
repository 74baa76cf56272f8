"""Server-side TLS on an accepted socket that tells a refused client why.

Under TLS 1.3 the server verifies the client's certificate after the client has already finished its
side of the handshake, so the client learns of a rejection only from the alert OpenSSL sends (unknown
CA, certificate expired ...). asyncio's TLS layer drops that alert: on a failed handshake it closes the
socket without writing what OpenSSL queued, and the client sees a bare EOF. This module runs the same
asyncio TLS protocol but flushes the queued alert first, so the client gets a clear error on its first
read. It relies on ``asyncio.sslproto.SSLProtocol`` internals that are stable from Python 3.11 to
3.13; if they change, the flush is skipped (the handshake still fails closed, only the alert is lost).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from asyncio import sslproto

from novacron.observability.log import log_event

logger = logging.getLogger("novacron.dwcp.tls")


class _AlertingSSLProtocol(sslproto.SSLProtocol):
    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            flush = getattr(self, "_process_outgoing", None)
            if flush is not None:
                try:
                    flush()  # the alert OpenSSL queued for the peer
                except (OSError, RuntimeError, AttributeError) as exc:
                    log_event(logger, "dwcp.tls.alert_lost", logging.DEBUG, error=str(exc))
        super()._on_handshake_complete(handshake_exc)


async def accept_tls(
    conn: socket.socket, context: ssl.SSLContext, *, seconds: float, read_buffer: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Run the server side of TLS on ``conn``; raises ssl.SSLError, OSError or TimeoutError."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=read_buffer)
    app_protocol = asyncio.StreamReaderProtocol(reader)
    handshake_done: asyncio.Future[None] = loop.create_future()
    tls_protocol = _AlertingSSLProtocol(
        loop,
        app_protocol,
        context,
        handshake_done,
        server_side=True,
        ssl_handshake_timeout=int(seconds * 2) + 1,  # our own deadline below fires first
    )
    raw_transport, _ = await loop.connect_accepted_socket(lambda: tls_protocol, conn)
    try:
        await asyncio.wait_for(handshake_done, seconds)
    except BaseException:
        raw_transport.abort()
        raise
    transport = tls_protocol._app_transport
    return reader, asyncio.StreamWriter(transport, app_protocol, reader, loop)
