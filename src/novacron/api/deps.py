"""Dependencies handed to the routes: the services, and the access check every route declares.

Each route names its minimal role with one of the annotated parameter types below (``Viewer``,
``Operator``, ``Admin``) or with ``dependencies=[PUBLIC_ROUTE]``. The check authenticates the bearer
token (or grants the local role on the unix socket), spends one request of the caller's rate budget,
and raises PermissionDenied if the role is too low. :func:`route_access` reads the declaration back,
so the app refuses to start with a route that has none, and the docs and tests enumerate them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.params import Depends as DependsParam
from fastapi.routing import APIRoute

from novacron.api.config import ApiConfig
from novacron.api.context import NODE_KEY, context_of
from novacron.api.ratelimit import RequestLimiter
from novacron.observability.audit import AuditLog
from novacron.security.rbac import PUBLIC, AuthError, Principal, Role, RouteAccess, authorize
from novacron.security.tokens import TokenStore, token_id_of
from novacron.store.base import KeyValueStore
from novacron.vm.service import VMService

BEARER = "bearer"


@dataclass
class ApiServices:
    """What the routes work on. The agent builds one per host; tests build one on a temporary store."""

    store: KeyValueStore
    vms: VMService
    tokens: TokenStore
    audit: AuditLog
    node: str


@dataclass
class AppState:
    services: ApiServices
    config: ApiConfig
    limiter: RequestLimiter
    routers: Sequence[APIRouter] = ()


def app_state(request: Request) -> AppState:
    state = request.app.state.novacron
    if not isinstance(state, AppState):
        raise RuntimeError("the API app was not built by create_app")
    return state


def services(request: Request) -> ApiServices:
    return app_state(request).services


Services = Annotated[ApiServices, Depends(services)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != BEARER or not value.strip():
        raise AuthError("Authorization header must be 'Bearer <token>'")
    return value.strip()


class AccessCheck:
    """The dependency a route declares; ``access`` says what it needs."""

    def __init__(self, access: RouteAccess) -> None:
        self.access = access

    def __repr__(self) -> str:
        return f"AccessCheck({self.access.label})"

    async def __call__(self, request: Request) -> Principal | None:
        state = app_state(request)
        ctx = context_of(request)
        limiter = state.limiter
        if self.access.public:
            limiter.take("address", ctx.client)
            return None
        try:
            presented = _bearer(request)
            node = request.scope.get(NODE_KEY)
            if presented is None and isinstance(node, str):
                # The node listener verified this peer's certificate against the cluster CA.
                principal = Principal(kind="node", name=node, role=state.config.node_role)
            elif presented is None:
                if not ctx.local:
                    raise AuthError("this route needs a bearer token", needed=self.access.label)
                principal = Principal(kind="local", name="unix-socket", role=state.config.local_role)
            else:
                ctx.presented_token_id = token_id_of(presented)
                record = await state.services.tokens.authenticate(presented)
                principal = Principal(kind="token", name=record.name, role=record.role, token_id=record.id)
        except AuthError:
            # Failed attempts spend the address's (small) budget: guessing is throttled per source.
            limiter.take("address", ctx.client)
            raise
        if principal.kind == "token" and principal.token_id is not None:
            limiter.take("token", principal.token_id)
        elif principal.kind == "node":
            limiter.take("token", f"node:{principal.name}")
        ctx.principal = principal
        route = request.scope.get("route")
        authorize(principal, self.access, action=getattr(route, "name", request.url.path))
        return principal


_CHECKS = {role: AccessCheck(RouteAccess(role)) for role in Role}
_PUBLIC_CHECK = AccessCheck(PUBLIC)

Viewer = Annotated[Principal, Depends(_CHECKS[Role.VIEWER])]
Operator = Annotated[Principal, Depends(_CHECKS[Role.OPERATOR])]
Admin = Annotated[Principal, Depends(_CHECKS[Role.ADMIN])]
PUBLIC_ROUTE: DependsParam = Depends(_PUBLIC_CHECK)


def _checks_in(dependant: Dependant) -> list[AccessCheck]:
    found = [dependant.call] if isinstance(dependant.call, AccessCheck) else []
    for sub in dependant.dependencies:
        found += _checks_in(sub)
    return found


def route_access(route: APIRoute) -> RouteAccess | None:
    """The access a route declares, or None if it declares none (or several different ones)."""
    accesses = {c.access for c in _checks_in(route.dependant)}
    return accesses.pop() if len(accesses) == 1 else None


def set_target(request: Request, target: str) -> None:
    """Name the object a write acts on, for the audit record."""
    context_of(request).target = target
