"""An API on a temporary store with one token per role: for tests and benchmarks of the API and of
routers added later (nodes, migrations). The services are real (SQLite store, QEMU driver on a
private run directory); only where they live is temporary.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from fastapi import APIRouter, FastAPI

from novacron.api.app import build_services, create_app
from novacron.api.config import ApiConfig, ApiLimits
from novacron.api.deps import ApiServices
from novacron.cluster.calls import MtlsCaller
from novacron.cluster.control import ControlPlane
from novacron.cluster.jointokens import JoinTokenStore
from novacron.cluster.registry import NodeRegistry
from novacron.hypervisor.qemu import QemuDriver
from novacron.security.pki import create_ca, issue_node_cert
from novacron.security.rbac import Role
from novacron.security.tls import TlsConfig
from novacron.security.tokens import TokenStore
from novacron.store.base import KeyValueStore
from novacron.store.sqlite import SqliteStore

# Generous enough that tests firing many requests with one token are not throttled; tests of the
# limiter pass their own limits.
UNTHROTTLED = ApiLimits(token_rate_per_s=1e6, token_burst=1_000_000, address_rate_per_s=1e6,
                        address_burst=1_000_000)  # fmt: skip


@dataclass
class ApiHarness:
    app: FastAPI
    services: ApiServices
    tokens: dict[Role, str]  # a valid token of each role

    def client(self, token: str | None = None, *, local: bool = False) -> httpx.AsyncClient:
        """An in-process client (ASGI transport); ``local`` makes requests look like the unix socket's."""
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        app = self.app
        if local:
            from novacron.api.server import LocalMark  # noqa: PLC0415

            app = LocalMark(self.app)  # type: ignore[assignment]
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        return httpx.AsyncClient(transport=transport, base_url="http://api.test", headers=headers)


def test_control_plane(store: KeyValueStore, *, clock: Callable[[], float] | None = None) -> ControlPlane:
    """A control plane on ``store`` with a new CA (cluster ``test``) whose node is ``test-node``."""
    ca = create_ca("test")
    tls = TlsConfig(issue_node_cert(ca, "test-node", "agent"))
    now = clock or time.time
    return ControlPlane(
        node="test-node",
        registry=NodeRegistry(store, clock=now),
        join_tokens=JoinTokenStore(store, clock=now),
        caller=MtlsCaller(tls),
        ca=ca,
    )


@asynccontextmanager
async def api_harness(
    root: Path,
    *,
    limits: ApiLimits | None = None,
    store: KeyValueStore | None = None,
    backend: str = "sqlite",
    clock: Callable[[], float] | None = None,
    extra_routers: Iterable[APIRouter] = (),
    control: bool = False,
) -> AsyncIterator[ApiHarness]:
    """``control``: the app is a control node (registry, joins, placement) with a fresh test CA."""
    own = store is None
    kv: KeyValueStore = store if store is not None else SqliteStore(root / "store.db")
    try:
        services = build_services(kv, QemuDriver(root / "vms"), backend=backend, node="test-node")
        if clock is not None:
            services.tokens = TokenStore(services.store, clock=clock)
        app = create_app(services, ApiConfig(limits=limits or UNTHROTTLED), extra_routers=extra_routers)
        if control:
            app.state.control = test_control_plane(services.store, clock=clock)
        tokens = {}
        for role in Role:
            issued = await services.tokens.create(f"test-{role}", role, created_by="harness")
            tokens[role] = issued.token
        yield ApiHarness(app=app, services=services, tokens=tokens)
    finally:
        if own:
            await kv.close()
