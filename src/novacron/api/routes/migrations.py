"""Migrations (``/v1/migrations``) and this node (``/v1/node``), served by the agent.

The agent mounts these routers with ``create_app(..., extra_routers=ROUTERS)`` and puts its
:class:`~novacron.migration.service.MigrationService` on ``app.state.migrations`` (and its
identity on ``app.state.agent_info``); an API server without an agent answers 503 here.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request, status
from pydantic import BaseModel, ConfigDict, Field

from novacron.api.deps import Operator, Viewer, set_target
from novacron.api.errors import ERROR_RESPONSES
from novacron.dwcp.mode import Mode
from novacron.errors import NovacronError
from novacron.hypervisor.spec import NAME_PATTERN
from novacron.migration.context import MigrationRequest
from novacron.migration.datapath import DataPathKind
from novacron.migration.service import MigrationService

router = APIRouter(prefix="/v1/migrations", tags=["migrations"], responses=ERROR_RESPONSES)
node_router = APIRouter(prefix="/v1/node", tags=["node"], responses=ERROR_RESPONSES)

IdArg = Annotated[str, Path(pattern=r"^[A-Za-z0-9._-]{1,64}$", description="migration id")]


class AgentUnavailable(NovacronError):
    """The API runs without an agent: there is no migration service here."""


class MigrationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vm: str = Field(pattern=NAME_PATTERN, max_length=63)
    to: str = Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    mode: Literal["auto", "datacenter", "hybrid", "internet"] = "auto"
    max_downtime_ms: int | None = Field(default=None, ge=1, le=60_000)
    deadline_s: float | None = Field(default=None, ge=1, le=86_400)
    allow_postcopy: bool = False
    data_path: Literal["direct", "tunnel", "passthrough"] | None = None


class CancelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(default="cancelled by the operator", max_length=200)


def _service(request: Request) -> MigrationService:
    service = getattr(request.app.state, "migrations", None)
    if not isinstance(service, MigrationService):
        raise AgentUnavailable("migrations are served by the agent (novacron agent run)")
    return service


@router.post("", name="migration.start", status_code=status.HTTP_202_ACCEPTED)
async def start_migration(body: MigrationIn, request: Request, _: Operator) -> dict[str, Any]:
    set_target(request, f"vm/{body.vm}")
    service = _service(request)
    run = await service.migrate(
        MigrationRequest(
            vm=body.vm,
            destination=body.to,
            mode=None if body.mode == "auto" else Mode(body.mode),
            max_downtime_ms=body.max_downtime_ms,
            deadline_s=body.deadline_s,
            allow_postcopy=body.allow_postcopy,
            data_path=DataPathKind(body.data_path) if body.data_path else None,
        )
    )
    return run.snapshot()


@router.get("", name="migration.list")
async def list_migrations(request: Request, _: Viewer) -> list[dict[str, Any]]:
    return await _service(request).list()


@router.get("/{migration_id}", name="migration.show")
async def show_migration(migration_id: IdArg, request: Request, _: Viewer) -> dict[str, Any]:
    return await _service(request).show(migration_id)


@router.post("/{migration_id}/cancel", name="migration.cancel")
async def cancel_migration(
    migration_id: IdArg, request: Request, _: Operator, body: CancelIn | None = None
) -> dict[str, Any]:
    set_target(request, f"migration/{migration_id}")
    reason = body.reason if body is not None else CancelIn().reason
    return await _service(request).cancel(migration_id, reason)


def _sibling_stats(request: Request) -> dict[str, dict[str, Any]]:
    stats = getattr(request.app.state, "sibling_stats", None)
    if stats is None:
        return {}
    return {vm: dataclasses.asdict(s) for vm, s in stats().items()}


@node_router.get("", name="node.show")
async def show_node(request: Request, _: Viewer) -> dict[str, Any]:
    info = getattr(request.app.state, "agent_info", None)
    service = _service(request)
    if info is None:
        raise AgentUnavailable("node information is served by the agent")
    runs = await service.list()
    live = [r for r in runs if r.get("live")]
    return {
        "node": info.node,
        "cluster": info.cluster,
        "version": info.version,
        "dwcp": f"{info.dwcp[0]}:{info.dwcp[1]}",
        "peers": info.peers,
        "data_paths": info.data_paths,
        "started_at": info.started_at,
        "migrations_live": len(live),
        # Local VMs indexed as HDE baseline content (docs/tunnel.md): what a warm migration can use.
        "baseline_siblings": _sibling_stats(request),
        "limits": {
            "max_incoming": service.host.config.max_incoming,
            "max_outgoing": service.host.config.max_outgoing,
        },
    }


ROUTERS: tuple[APIRouter, ...] = (router, node_router)
