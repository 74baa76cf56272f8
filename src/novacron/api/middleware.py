"""Pure ASGI middleware: request ids, latency metrics, the audit of writes, and the body size limit.

The audit record of a write is appended *before* the response starts, so a client that saw its write
acknowledged knows it is in the audit log (or, if the store failed, in the server's error log).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from novacron.api.context import (
    LOCAL_KEY,
    REQUEST_ID_HEADER,
    SCOPE_KEY,
    RequestContext,
    client_address,
    request_id_from,
)
from novacron.observability.audit import AuditLog, AuditRecord, clip, result_of
from novacron.observability.metrics import UNMATCHED_ROUTE, observe_api_request

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
UNAUDITED_ROUTES = frozenset({"node.heartbeat"})  # only when a node reports for itself, successfully


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value)
    return None


def _matched_route(scope: Scope) -> Any:
    route = scope.get("route")
    methods = getattr(route, "methods", None)
    if route is None or methods is None or scope["method"] not in methods:
        return None  # no route, or a 405 from a route of another method: nothing was attempted
    return route


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, audit: Callable[[], AuditLog]) -> None:
        self.app = app
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        ctx = RequestContext(
            request_id=request_id_from(_header(scope, REQUEST_ID_HEADER.encode())),
            client=client_address(scope),
            local=bool(scope.get(LOCAL_KEY)),
        )
        scope[SCOPE_KEY] = ctx
        status = 500
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = int(message["status"])
                started = True
                message["headers"] = [
                    *message.get("headers", ()),
                    (REQUEST_ID_HEADER.encode(), ctx.request_id.encode()),
                ]
                await self._audit(scope, ctx, status)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            if not started:
                ctx.error = ctx.error or "InternalError: unhandled exception"
                await self._audit(scope, ctx, 500)
            raise
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) if route is not None else None
            observe_api_request(scope["method"], template or UNMATCHED_ROUTE, status,
                                time.perf_counter() - start)  # fmt: skip

    async def _audit(self, scope: Scope, ctx: RequestContext, status: int) -> None:
        if scope["method"] not in WRITE_METHODS or status == 429:
            return  # reads are not audited; 429s did nothing and would let a flood fill the log
        route = _matched_route(scope)
        if route is None:
            return
        p = ctx.principal
        if (
            getattr(route, "name", None) in UNAUDITED_ROUTES
            and status < 400
            and p is not None
            and p.kind == "node"
        ):
            return  # a node's successful heartbeat every few seconds is liveness, not an action
        if p is not None:
            actor = p.actor
        elif ctx.presented_token_id is not None:
            actor = f"unverified-token:{ctx.presented_token_id}"
        else:
            actor = "anonymous"
        await self.audit().record(
            AuditRecord(
                time=time.time(),
                request_id=ctx.request_id,
                actor=actor,
                role=str(p.role) if p is not None else None,
                action=str(getattr(route, "name", "unknown")),
                method=scope["method"],
                path=clip(scope.get("path", "")) or "",
                target=clip(ctx.target),
                status=status,
                result=result_of(status),
                error=clip(ctx.error),
                client=ctx.client,
            )
        )


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413 before the app reads them (bounded buffer)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _refuse(self, send: Send, scope: Scope) -> None:
        ctx = scope.get(SCOPE_KEY)
        body: dict[str, Any] = {
            "error": {
                "kind": "PayloadTooLarge",
                "message": f"request body exceeds {self.max_bytes} bytes",
                "status": 413,
                "request_id": getattr(ctx, "request_id", None),
                "context": {"limit": str(self.max_bytes)},
                "fields": [],
            }
        }
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(data)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": data})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._refuse(send, scope)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # client went away: let the app see the disconnect
            chunk = bytes(message.get("body", b""))
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send, scope)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                if message["type"] != "http.request":
                    return message
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
