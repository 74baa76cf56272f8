"""Serve the API with uvicorn on a unix socket (local, file-mode protected) and/or TCP (remote, tokens).

Sockets are bound here, before uvicorn starts, so the socket file gets its mode atomically (umask
around ``bind``) instead of uvicorn's world-writable default, and so a caller knows the server is
reachable as soon as :func:`bind_listeners` returns: connections queue in the listen backlog until
uvicorn accepts them. Plain TCP is refused on non-loopback addresses unless TLS is configured or the
caller insists (bearer tokens must not cross a network in clear).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from novacron.api.config import ApiConfigError, ApiLimits
from novacron.api.context import LOCAL_KEY, NODE_KEY
from novacron.api.middleware import ASGIApp, Receive, Send
from novacron.observability.log import log_event
from novacron.paths import state_dir
from novacron.security.errors import CertificateError
from novacron.security.pki import TrustBundle
from novacron.security.tls import TlsConfig, peer_identity

log = logging.getLogger("novacron.api.server")

DEFAULT_TCP_PORT = 7480
DEFAULT_NODE_PORT = 7481
LISTEN_BACKLOG = 128
DEFAULT_SOCKET_MODE = 0o600


def default_socket_path() -> Path:
    return state_dir() / "api.sock"


class ApiServerError(ApiConfigError):
    """The API server cannot listen as asked (address in use, socket already served, bad TLS files)."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Listen:
    unix: Path | None = None
    socket_mode: int = DEFAULT_SOCKET_MODE
    socket_gid: int | None = None  # with mode 0o660: the group whose members may use the API locally
    tcp_host: str | None = None
    tcp_port: int = DEFAULT_TCP_PORT  # 0: any free port (tests)
    tls: TlsFiles | None = None
    allow_plain_remote: bool = False
    limits: ApiLimits = field(default_factory=ApiLimits)
    # The node listener: mutual TLS with the node's own credentials; a peer's verified certificate
    # is its credential (role ApiConfig.node_role), no bearer token needed.
    node_tcp_host: str | None = None
    node_tcp_port: int = DEFAULT_NODE_PORT
    node_tls: TlsConfig | None = None


class LocalMark:
    """Marks every request of the unix listener as local (no token needed: the file mode decides)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        scope[LOCAL_KEY] = True
        await self.app(scope, receive, send)


def _bind_unix(path: Path, mode: int, gid: int | None) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: nobody listens on it
        else:
            raise ApiServerError("another server already listens on the API socket", socket=str(path))
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ApiServerError("cannot bind the API socket", socket=str(path), reason=exc.strerror) from None
    finally:
        os.umask(old)
    if gid is not None:
        os.chown(path, -1, gid)
    os.chmod(path, mode)
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted sockets only when it does, and
    # without it uvicorn's separate header and body writes meet Nagle + delayed ACK (+40 ms each).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        hint = "address in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ApiServerError("cannot bind the API address", host=host, port=port, reason=hint) from None
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


@dataclass
class BoundListeners:
    unix: socket.socket | None = None
    tcp: socket.socket | None = None
    node: socket.socket | None = None

    @property
    def tcp_port(self) -> int | None:
        return None if self.tcp is None else int(self.tcp.getsockname()[1])

    @property
    def node_port(self) -> int | None:
        return None if self.node is None else int(self.node.getsockname()[1])

    def close(self) -> None:
        for sock in (self.unix, self.tcp, self.node):
            if sock is not None:
                sock.close()


def bind_listeners(listen: Listen) -> BoundListeners:
    if listen.node_tcp_host is not None and listen.node_tls is None:
        raise ApiServerError("the node listener needs the node's TLS credentials")
    if listen.unix is None and listen.tcp_host is None and listen.node_tcp_host is None:
        raise ApiServerError("the API needs a unix socket or a TCP address to listen on")
    if (
        listen.tcp_host is not None
        and listen.tls is None
        and not listen.allow_plain_remote
        and not _is_loopback(listen.tcp_host)
    ):
        raise ApiServerError(
            "refusing plain HTTP on a non-loopback address: give TLS files (or allow it explicitly)",
            host=listen.tcp_host,
        )
    bound = BoundListeners()
    try:
        if listen.unix is not None:
            bound.unix = _bind_unix(listen.unix, listen.socket_mode, listen.socket_gid)
        if listen.tcp_host is not None:
            bound.tcp = _bind_tcp(listen.tcp_host, listen.tcp_port)
        if listen.node_tcp_host is not None:
            bound.node = _bind_tcp(listen.node_tcp_host, listen.node_tcp_port)
    except BaseException:
        bound.close()
        raise
    return bound


def _config(app: ASGIApp, limits: ApiLimits, tls: TlsFiles | None) -> uvicorn.Config:
    kwargs: dict[str, Any] = {}
    if tls is not None:
        for path in (tls.cert, tls.key):
            if not path.is_file():
                raise ApiServerError("TLS file missing", path=str(path))
        kwargs.update(ssl_certfile=str(tls.cert), ssl_keyfile=str(tls.key))
    config = uvicorn.Config(
        app,
        lifespan="off",
        access_log=False,
        log_config=None,
        limit_concurrency=limits.max_concurrent_requests,
        timeout_keep_alive=int(limits.keepalive_timeout_s),
        timeout_graceful_shutdown=int(limits.graceful_shutdown_s),
        h11_max_incomplete_event_size=limits.max_header_bytes,
        server_header=False,
        **kwargs,
    )
    if tls is not None:
        config.load()
        if config.ssl is not None:
            config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
    return config


class NodeMark:
    """Marks every request of one node-listener connection with the peer's verified node id."""

    def __init__(self, app: ASGIApp, node: str) -> None:
        self.app = app
        self.node = node

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        scope[NODE_KEY] = self.node
        await self.app(scope, receive, send)


def _node_protocol(bundle: TrustBundle) -> type[H11Protocol]:
    """uvicorn's h11 protocol, wrapping the app per connection with the peer's identity (uvicorn has
    no ASGI TLS extension). The handshake, with a client certificate required, is complete here."""

    class NodeH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            try:
                if ssl_object is None:
                    raise CertificateError("not a TLS connection")
                identity = peer_identity(ssl_object, bundle)
            except CertificateError as exc:
                log_event(log, "api.node_peer_refused", logging.WARNING, reason=str(exc))
                transport.close()
                return
            self.app = NodeMark(self.app, identity.node_id)

    return NodeH11Protocol


def _node_config(app: ASGIApp, limits: ApiLimits, tls: TlsConfig) -> uvicorn.Config:
    config = uvicorn.Config(
        app,
        lifespan="off",
        access_log=False,
        log_config=None,
        http=_node_protocol(tls.bundle),
        ssl_context_factory=lambda _config, _default: tls.server,
        limit_concurrency=limits.max_concurrent_requests,
        timeout_keep_alive=int(limits.keepalive_timeout_s),
        timeout_graceful_shutdown=int(limits.graceful_shutdown_s),
        h11_max_incomplete_event_size=limits.max_header_bytes,
        server_header=False,
    )
    config.load()
    return config


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the owner (agent, CLI) handles signals
        return


@contextlib.asynccontextmanager
async def running_api(app: ASGIApp, listen: Listen) -> AsyncIterator[BoundListeners]:
    """Serve ``app`` while the block runs; the listeners accept connections as soon as it is entered."""
    bound = bind_listeners(listen)
    servers: list[tuple[_Server, socket.socket]] = []
    if bound.unix is not None:
        servers.append((_Server(_config(LocalMark(app), listen.limits, None)), bound.unix))
    if bound.tcp is not None:
        servers.append((_Server(_config(app, listen.limits, listen.tls)), bound.tcp))
    if bound.node is not None and listen.node_tls is not None:
        servers.append((_Server(_node_config(app, listen.limits, listen.node_tls)), bound.node))
    tasks = [asyncio.create_task(s.serve(sockets=[sock])) for s, sock in servers]
    try:
        yield bound
    finally:
        for server, _ in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        bound.close()
        if listen.unix is not None:
            with contextlib.suppress(FileNotFoundError):
                listen.unix.unlink()


async def serve_api(app: ASGIApp, listen: Listen, stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (or forever)."""
    async with running_api(app, listen):
        await (stop or asyncio.Event()).wait()
