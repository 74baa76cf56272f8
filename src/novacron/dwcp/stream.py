"""A DWCP stream: one authenticated TLS connection carrying frames, after a completed handshake.

Thin asyncio wrapper around the sans-IO codec. ``send_frame`` writes header+body and payload without
copying the payload and waits for the transport to drain (backpressure, bounded by ``send_timeout``);
``recv_frame`` returns the next frame, except that the peer's GOODBYE raises :class:`StreamClosed` and
its ERROR raises :class:`RemoteError` (both end the stream). One reader at a time.

:func:`run_handshake` drives a handshake state machine over the connection; the client and server
drivers share it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from novacron.dwcp.errors import (
    ConnectionLost,
    DwcpConfigError,
    HandshakeError,
    PeerCertificateError,
    ProtocolError,
    RemoteError,
    StreamClosed,
    StreamError,
)
from novacron.dwcp.frames.codec import Frame, FrameDecoder, FrameEncoder
from novacron.dwcp.frames.messages import Error, Goodbye
from novacron.dwcp.handshake import ClientHandshake, Established, Role, ServerHandshake, _truncate
from novacron.dwcp.session import SessionInfo
from novacron.observability.log import log_event

logger = logging.getLogger("novacron.dwcp.stream")

KiB = 1024
DEFAULT_READ_CHUNK = 256 * KiB  # bytes asked from the socket per read
DEFAULT_READ_BUFFER = 1024 * KiB  # asyncio StreamReader limit: it pauses the socket above 2x this
DEFAULT_SEND_TIMEOUT = 60.0  # seconds a send may wait for the peer to take our bytes
DEFAULT_CLOSE_TIMEOUT = 2.0  # seconds for GOODBYE and the TLS close

SCOPE_STREAM = "stream"
SCOPE_SESSION = "session"

# What a failing socket raises under asyncio: OS errors (resets, broken pipes) and TLS alerts.
_IO_ERRORS = (OSError, ssl.SSLError, EOFError)


@dataclass(frozen=True, slots=True)
class StreamLimits:
    read_chunk: int = DEFAULT_READ_CHUNK
    read_buffer: int = DEFAULT_READ_BUFFER
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT

    def __post_init__(self) -> None:
        if self.read_chunk < 1 or self.read_buffer < 1:
            raise DwcpConfigError("stream read sizes must be positive", limits=repr(self))
        if not (self.send_timeout > 0 and self.close_timeout > 0):
            raise DwcpConfigError("stream timeouts must be positive", limits=repr(self))


CloseCallback = Callable[["Stream", bool], None]  # (stream, session ended) -> None, called once


class Stream:
    """One established, authenticated DWCP connection."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        established: Established,
        *,
        decoder: FrameDecoder,
        encoder: FrameEncoder,
        role: Role,
        address: str,
        limits: StreamLimits | None = None,
        on_close: CloseCallback | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.info: SessionInfo = established.info
        self.opened = established.opened  # this stream opened its session
        self.role = role
        self.address = address
        self.limits = limits or StreamLimits()
        self._decoder = decoder
        self._encoder = encoder
        self._on_close = on_close
        self._closed = False
        self._finished = False
        self._eof = False
        self._reading = False
        self.peer_goodbye: Goodbye | None = None

    def __repr__(self) -> str:
        return (
            f"Stream(session={self.info.name}, index={self.info.stream_index}, role={self.role.value}, "
            f"peer={self.info.peer}, address={self.address})"
        )

    @property
    def closed(self) -> bool:
        return self._closed

    def _ctx(self) -> dict[str, object]:
        return {
            "session": self.info.name,
            "stream": self.info.stream_index,
            "peer": str(self.info.peer),
            "address": self.address,
        }

    # -------------------------------------------------------------------------------------- send

    async def send_frame(self, frame: Frame) -> None:
        await self.send_frames((frame,))

    async def send_frames(self, frames: Iterable[Frame]) -> None:
        """Encode and write ``frames`` in order, then wait until the transport has taken them."""
        if self._closed:
            raise StreamClosed("stream is closed", **self._ctx())
        parts: list[bytes | bytearray | memoryview] = []
        for frame in frames:
            head, payload = self._encoder.encode_parts(frame)  # ProtocolError: our own frame is invalid
            parts.append(head)
            if payload:
                parts.append(payload)
        try:
            self._writer.writelines(parts)
            await asyncio.wait_for(self._writer.drain(), self.limits.send_timeout)
        except TimeoutError:
            self._abort()
            raise StreamError(
                f"peer took no data for {self.limits.send_timeout:g} s; stream aborted", **self._ctx()
            ) from None
        except _IO_ERRORS as exc:
            self._abort()
            raise StreamError(f"send failed: {exc}", **self._ctx()) from exc

    # ----------------------------------------------------------------------------------- receive

    async def recv_frame(self) -> Frame:
        """The next frame from the peer. Raises StreamClosed at the end of the stream.

        Safe to cancel (e.g. under ``asyncio.timeout``): no received byte is lost.
        """
        if self._reading:
            raise StreamError("another task is already reading this stream", **self._ctx())
        self._reading = True
        try:
            return await self._recv()
        finally:
            self._reading = False

    async def _recv(self) -> Frame:
        while True:
            try:
                frame = self._decoder.next_frame()
            except ProtocolError as exc:
                await self._fail_protocol(exc)
                raise
            if frame is not None:
                return self._inspect(frame)
            if self._eof or self._closed:
                self._finish(False)
                raise StreamClosed("peer closed the connection without GOODBYE", **self._ctx())
            try:
                data = await self._reader.read(self.limits.read_chunk)
            except _IO_ERRORS as exc:
                self._abort()
                raise StreamError(f"receive failed: {exc}", **self._ctx()) from exc
            if data:
                self._decoder.receive_data(data)
            else:
                self._eof = True
                self._decoder.receive_eof()

    def _inspect(self, frame: Frame) -> Frame:
        body = frame.body
        if isinstance(body, Goodbye):
            self.peer_goodbye = body
            self._abort(session_ended=body.scope == SCOPE_SESSION)
            raise StreamClosed(
                f"peer closed the {body.scope}: {body.reason or 'no reason given'}",
                scope=body.scope,
                **self._ctx(),
            )
        if isinstance(body, Error):
            self._abort()
            raise RemoteError(f"peer reported an error: {body.reason}", code=body.code, **self._ctx())
        return frame

    async def _fail_protocol(self, exc: ProtocolError) -> None:
        log_event(logger, "dwcp.stream.protocol_error", logging.WARNING, error=exc.message, **self._ctx())
        await self._send_final(Frame(Error(code="protocol", reason=_truncate(exc.message))))
        self._abort()

    # ------------------------------------------------------------------------------------- close

    async def close(self, reason: str = "", *, end_session: bool = False) -> None:
        """Say GOODBYE (for this stream, or the whole session) and close the connection."""
        if self._closed:
            return
        scope = SCOPE_SESSION if end_session else SCOPE_STREAM
        await self._send_final(Frame(Goodbye(scope=scope, reason=_truncate(reason) or None)))
        self._closed = True
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), self.limits.close_timeout)
        except (TimeoutError, *_IO_ERRORS) as exc:
            log_event(logger, "dwcp.stream.close_unclean", logging.DEBUG, error=str(exc), **self._ctx())
            self._writer.transport.abort()
        self._finish(end_session)

    async def _send_final(self, frame: Frame) -> None:
        """Best effort: the connection may already be gone, which is fine for a last word."""
        if self._closed:
            return
        try:
            self._writer.write(self._encoder.encode(frame))
            await asyncio.wait_for(self._writer.drain(), self.limits.close_timeout)
        except (TimeoutError, *_IO_ERRORS) as exc:
            log_event(logger, "dwcp.stream.last_frame_lost", logging.DEBUG, error=str(exc), **self._ctx())

    def abort(self) -> None:
        """Drop the connection at once, without GOODBYE."""
        self._abort()

    def _abort(self, session_ended: bool = False) -> None:
        if not self._closed:
            self._closed = True
            self._writer.transport.abort()
        self._finish(session_ended)

    def _finish(self, session_ended: bool) -> None:
        if self._finished:
            return
        self._finished = True
        self._closed = True
        if not self._writer.transport.is_closing():
            self._writer.transport.abort()
        if self._on_close is not None:
            self._on_close(self, session_ended)

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def describe_ssl_error(exc: ssl.SSLError) -> str:
    """The useful part of an OpenSSL error: the verification failure, or the alert received."""
    verify = getattr(exc, "verify_message", None)
    if verify:
        return f"certificate verify failed: {verify}"
    reason = exc.reason or str(exc)
    # e.g. SSLV3_ALERT_CERTIFICATE_EXPIRED -> "peer sent alert: certificate expired"
    for prefix in ("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_"):
        if reason.startswith(prefix):
            return "peer sent alert: " + reason[len(prefix) :].lower().replace("_", " ")
    return reason


def _tls_failure(exc: BaseException, step: str, address: str) -> HandshakeError:
    """What a socket error during the handshake means for the user."""
    if isinstance(exc, ssl.SSLError):
        # Under TLS 1.3 a client learns that the server rejected its certificate only here, on the
        # first read after the (apparently successful) TLS handshake.
        return PeerCertificateError(
            f"TLS session rejected: {describe_ssl_error(exc)}", step=step, address=address, tls_error=str(exc)
        )
    return ConnectionLost(f"connection failed: {exc}", step=step, address=address)


async def run_handshake(
    machine: ClientHandshake | ServerHandshake,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    read_chunk: int,
    address: str,
) -> Established:
    """Drive ``machine`` over the connection until it is established; raise its failure otherwise.

    On failure the ERROR frame the machine queued is sent (best effort) before the error propagates;
    the caller closes the connection.
    """
    loop = asyncio.get_running_loop()
    machine.start(loop.time())
    try:
        while True:
            out = machine.data_to_send()
            if out:
                writer.write(out)
                await writer.drain()
            event = machine.next_event()
            if event is not None:
                return event
            deadline = machine.get_timer()
            if deadline is None:  # cannot happen while waiting; guards against a silent hang
                raise HandshakeError("handshake stopped without a result", address=address)
            try:
                data = await asyncio.wait_for(reader.read(read_chunk), max(0.0, deadline - loop.time()))
            except TimeoutError:
                machine.handle_timer(max(loop.time(), deadline))
                continue
            if data:
                machine.receive_data(data, loop.time())
            else:
                machine.receive_eof(loop.time())
    except _IO_ERRORS as exc:
        raise _tls_failure(exc, machine.step, address) from exc
    except (HandshakeError, ProtocolError):
        out = machine.data_to_send()
        if out:
            try:
                writer.write(out)
                await asyncio.wait_for(writer.drain(), DEFAULT_CLOSE_TIMEOUT)
            except (TimeoutError, *_IO_ERRORS) as exc:
                log_event(
                    logger, "dwcp.handshake.error_frame_lost", logging.DEBUG, error=str(exc), address=address
                )
        raise
    finally:
        if not machine.done:  # I/O failure or cancellation: undo what the machine had reserved
            machine.connection_lost(loop.time())
