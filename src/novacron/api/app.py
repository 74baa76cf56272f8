"""The app factory: routers, the access check on every route, error handlers and middleware.

``create_app`` refuses to build an app in which any route lacks an access declaration, so a route
added later cannot be reachable without authentication by accident.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

from novacron import __version__
from novacron.api.config import ApiConfig, ApiConfigError
from novacron.api.deps import ApiServices, AppState, route_access
from novacron.api.errors import install_error_handlers
from novacron.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from novacron.api.ratelimit import RequestLimiter
from novacron.api.routes import ROUTERS
from novacron.hypervisor.qemu import QemuDriver
from novacron.observability.audit import AuditLog
from novacron.observability.metrics import TimedStore
from novacron.security.rbac import ROLES, RouteAccess
from novacron.security.tokens import TokenStore
from novacron.store.base import KeyValueStore
from novacron.vm.service import VMService, local_node_name

API_DESCRIPTION = """\
NovaCron's control API. Authenticate with `Authorization: Bearer <token>`; roles viewer < operator <
admin, each route naming the minimal one. Every write is audited. Errors share one body:
`{"error": {"kind", "message", "status", "request_id", "context", "fields"}}`.
"""


@dataclass(frozen=True)
class RouteInfo:
    method: str
    path: str
    name: str
    access: RouteAccess


def _declared(app: FastAPI) -> list[APIRoute]:
    # Newer FastAPI versions keep included routers as lazy wrappers in app.routes; the routers we
    # mounted hold the APIRoute objects themselves (paths include each router's own prefix, which is
    # why routers take their prefix in APIRouter(prefix=...), never in include_router).
    routes = [r for r in app.routes if isinstance(r, APIRoute)]
    state = getattr(app.state, "novacron", None)
    if isinstance(state, AppState | _RoutersOnly):
        routes += [r for router in state.routers for r in router.routes if isinstance(r, APIRoute)]
    unique: dict[int, APIRoute] = {id(r): r for r in routes}
    return list(unique.values())


def api_routes(app: FastAPI) -> list[RouteInfo]:
    """Every (method, path) of the app's API routes with its declared access, sorted by path."""
    out: list[RouteInfo] = []
    for route in _declared(app):
        access = route_access(route)
        if access is None:
            raise ApiConfigError(
                "route declares no access (or conflicting ones): add Viewer/Operator/Admin or PUBLIC_ROUTE",
                path=route.path,
                name=route.name,
            )
        out += [RouteInfo(m, route.path, route.name, access) for m in sorted(route.methods or ())]
    return sorted(out, key=lambda r: (r.path, r.method))


def build_services(
    store: KeyValueStore,
    driver: QemuDriver | None = None,
    *,
    backend: str = "sqlite",
    node: str | None = None,
) -> ApiServices:
    """The services of one API server on ``store`` (timed for the store latency metrics)."""
    node = node or local_node_name()
    timed = TimedStore(store, backend)
    return ApiServices(
        store=timed,
        vms=VMService(timed, driver or QemuDriver(), node=node),
        tokens=TokenStore(timed),
        audit=AuditLog(timed, node=node),
        node=node,
    )


def create_app(
    services: ApiServices,
    config: ApiConfig | None = None,
    *,
    extra_routers: Iterable[APIRouter] = (),
) -> FastAPI:
    config = config or ApiConfig()
    app = FastAPI(
        title=config.title,
        version=__version__,
        description=API_DESCRIPTION,
        docs_url="/docs",
        redoc_url=None,
    )
    routers: Sequence[APIRouter] = (*ROUTERS, *extra_routers)
    app.state.novacron = AppState(
        services=services, config=config, limiter=RequestLimiter(config.limits), routers=routers
    )
    for router in routers:
        app.include_router(router)
    api_routes(app)  # raises if any route lacks an access declaration
    install_error_handlers(app)
    # Added last = outermost: the context (request id, metrics, audit) wraps the body limit.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.limits.max_body_bytes)
    app.add_middleware(RequestContextMiddleware, audit=lambda: services.audit)
    return app


def route_matrix(extra_routers: Iterable[APIRouter] = ()) -> list[RouteInfo]:
    """The routes ``create_app`` would serve, with their access, without building any service."""
    app = FastAPI()
    routers = (*ROUTERS, *extra_routers)
    for router in routers:
        app.include_router(router)
    app.state.novacron = _RoutersOnly(routers)
    return api_routes(app)


@dataclass(frozen=True)
class _RoutersOnly:
    routers: Sequence[APIRouter]


def access_table_markdown(routes: Sequence[RouteInfo]) -> str:
    """The authorization matrix as a Markdown table (docs/api.md embeds it)."""
    lines = [
        "| method | path | action | minimal role | " + " | ".join(ROLES) + " |",
        "|---|---|---|---|" + "---|" * len(ROLES),
    ]
    for r in routes:
        cells = ["yes" if r.access.permits(role) else "-" for role in ROLES]
        lines.append(f"| {r.method} | `{r.path}` | {r.name} | {r.access.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = [
    "ApiServices",
    "RouteInfo",
    "access_table_markdown",
    "api_routes",
    "build_services",
    "create_app",
    "route_matrix",
]
