"""The node registry (``/v1/nodes``): list, show, labels, cordon, remove, heartbeats, drains.
Served by control nodes (``app.state.control``)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Request, status
from pydantic import BaseModel, ConfigDict, Field

from novacron.api.deps import Admin, Operator, Viewer, set_target
from novacron.api.errors import ERROR_RESPONSES
from novacron.api.routes.cluster import control_plane
from novacron.cluster.drain import DrainJob
from novacron.cluster.errors import NodeNotFound
from novacron.cluster.registry import MAX_LABELS, NODE_ID_PATTERN, NodeReport, NodeView
from novacron.dwcp.placement.drain import MAX_PARALLEL_LIMIT
from novacron.security.rbac import PermissionDenied

router = APIRouter(prefix="/v1/nodes", tags=["nodes"], responses=ERROR_RESPONSES)

NodeArg = Annotated[str, Path(pattern=NODE_ID_PATTERN, description="node id")]


class LabelsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    labels: Annotated[dict[str, str | None], Field(max_length=MAX_LABELS)] = Field(
        description="label -> value to set, or null to remove"
    )


class DrainIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    parallel: Annotated[int, Field(ge=1, le=MAX_PARALLEL_LIMIT)] = 2
    mode: Literal["auto", "datacenter", "hybrid", "internet"] = Field(
        default="auto", description="migration mode of every move (auto: each session's mode detector)"
    )
    data_path: Literal["direct", "tunnel", "passthrough"] | None = Field(
        default=None, description="data path of every move (default: the source agent's policy)"
    )


class HeartbeatOut(BaseModel):
    peers: dict[str, str] = Field(description="node id -> DWCP address of the other registered nodes")
    control: list[str]
    health: str


@router.get("", name="node.list")
async def list_nodes(request: Request, _: Viewer) -> list[NodeView]:
    return await control_plane(request).registry.list()


@router.get("/{node}", name="node.registry.show")
async def show_node(node: NodeArg, request: Request, _: Viewer) -> NodeView:
    return await control_plane(request).registry.get(node)


@router.put("/{node}/labels", name="node.labels")
async def set_labels(node: NodeArg, body: LabelsIn, request: Request, _: Operator) -> NodeView:
    set_target(request, f"node/{node}")
    registry = control_plane(request).registry
    await registry.set_labels(node, body.labels)
    return await registry.get(node)


@router.post("/{node}/cordon", name="node.cordon")
async def cordon(node: NodeArg, request: Request, who: Operator) -> NodeView:
    set_target(request, f"node/{node}")
    registry = control_plane(request).registry
    await registry.cordon(node, on=True, by=who.actor)
    return await registry.get(node)


@router.post("/{node}/uncordon", name="node.uncordon")
async def uncordon(node: NodeArg, request: Request, who: Operator) -> NodeView:
    set_target(request, f"node/{node}")
    registry = control_plane(request).registry
    await registry.cordon(node, on=False, by=who.actor)
    return await registry.get(node)


@router.delete("/{node}", name="node.remove")
async def remove_node(node: NodeArg, request: Request, _: Admin) -> dict[str, str]:
    set_target(request, f"node/{node}")
    await control_plane(request).registry.remove(node)
    return {"removed": node}


@router.put("/{node}/heartbeat", name="node.heartbeat")
async def heartbeat(node: NodeArg, body: NodeReport, request: Request, who: Operator) -> HeartbeatOut:
    """An agent's report (sent over the node listener every few seconds); keeps its lease alive."""
    if body.node != node:
        raise PermissionDenied("the report names another node", field="node", node=node)
    if who.kind == "node" and who.name != node:
        raise PermissionDenied("a node may only report for itself", node=node, caller=who.name)
    control = control_plane(request)
    record = await control.registry.heartbeat(body)
    views = await control.registry.list()
    me = next((v for v in views if v.node == node), None)
    return HeartbeatOut(
        peers={v.node: v.dwcp for v in views if v.dwcp and v.node != node},
        control=[v.api for v in views if v.api and "control" in v.roles],
        health=me.health if me else ("maintenance" if record.cordoned else "ready"),
    )


@router.post("/{node}/drain", name="node.drain", status_code=status.HTTP_202_ACCEPTED)
async def drain(
    node: NodeArg, request: Request, who: Operator, body: DrainIn | None = None
) -> dict[str, Any]:
    """Cordon the node and move its VMs away by live migration, ``parallel`` at a time."""
    set_target(request, f"node/{node}")
    req = body or DrainIn()
    job: DrainJob = await control_plane(request).drains.start(
        node, parallel=req.parallel, by=who.actor, mode=req.mode, data_path=req.data_path
    )
    return job.as_dict()


@router.get("/{node}/drain", name="node.drain.show")
async def drain_status(node: NodeArg, request: Request, _: Viewer) -> dict[str, Any]:
    job = control_plane(request).drains.get(node)
    if job is None:
        raise NodeNotFound(f"no drain of node {node!r} on this control node", node=node)
    return job.as_dict()


__all__ = ["router"]
