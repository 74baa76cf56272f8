"""Per-request context: what the middleware, the auth dependency and the handlers share.

It lives in the ASGI scope (not in ``request.state``) so a pure ASGI middleware can read what the
handlers filled in (principal, audit target, error) after the response has been produced.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from novacron.security.rbac import Principal

SCOPE_KEY = "novacron.request"
LOCAL_KEY = "novacron.local"  # set by the unix-socket listener's wrapper
NODE_KEY = "novacron.node"  # the verified node id of a node-listener connection (mutual TLS)
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass
class RequestContext:
    request_id: str
    client: str
    local: bool
    principal: Principal | None = None
    presented_token_id: str | None = None  # a token id seen in a request that failed to authenticate
    target: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def request_id_from(header: bytes | None) -> str:
    """The client's request id if it is a sane one, else a fresh one."""
    if header is not None:
        text = header.decode("latin-1")
        if _REQUEST_ID_RE.match(text):
            return text
    return uuid.uuid4().hex


def client_address(scope: MutableMapping[str, Any]) -> str:
    if scope.get(LOCAL_KEY):
        return "unix"
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def context_of(request: Request) -> RequestContext:
    ctx = request.scope.get(SCOPE_KEY)
    if not isinstance(ctx, RequestContext):  # the app was mounted without its middleware
        ctx = RequestContext(
            request_id=uuid.uuid4().hex,
            client=client_address(request.scope),
            local=bool(request.scope.get(LOCAL_KEY)),
        )
        request.scope[SCOPE_KEY] = ctx
    return ctx
