"""Liveness and readiness: public, so probes need no token."""

from __future__ import annotations

from fastapi import APIRouter

from novacron import __version__
from novacron.api.deps import PUBLIC_ROUTE, Services
from novacron.api.errors import ERROR_RESPONSES
from novacron.api.models import HealthOut, ReadyOut

router = APIRouter(tags=["health"], responses=ERROR_RESPONSES)


@router.get("/healthz", name="health.live", dependencies=[PUBLIC_ROUTE])
async def live(svc: Services) -> HealthOut:
    """The server answers."""
    return HealthOut(status="ok", node=svc.node, version=__version__)


@router.get("/readyz", name="health.ready", dependencies=[PUBLIC_ROUTE])
async def ready(svc: Services) -> ReadyOut:
    """The server can reach its state store (503 with a StoreError body if not)."""
    return ReadyOut(status="ready", store_revision=await svc.store.revision())
