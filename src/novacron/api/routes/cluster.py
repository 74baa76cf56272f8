"""Cluster membership (``/v1/cluster``): the CA to pin, bootstrap tokens, joins. Served by control
nodes (``app.state.control``); elsewhere these routes answer 404 NotControlNode."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from novacron.api.deps import PUBLIC_ROUTE, Admin, Viewer, set_target
from novacron.api.errors import ERROR_RESPONSES
from novacron.cluster.control import ControlPlane, JoinRequest, JoinResponse
from novacron.cluster.errors import NotControlNode
from novacron.cluster.jointokens import JoinTokenLimits

router = APIRouter(prefix="/v1/cluster", tags=["cluster"], responses=ERROR_RESPONSES)

_LIM = JoinTokenLimits()


def control_plane(request: Request) -> ControlPlane:
    control = getattr(request.app.state, "control", None)
    if not isinstance(control, ControlPlane):
        raise NotControlNode("this API server is not a cluster control node")
    return control


class CaOut(BaseModel):
    cluster: str
    sha256: str = Field(description="SHA-256 of the CA certificate's DER: what bootstrap tokens pin")
    ca_pem: str


class JoinTokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl_s: Annotated[float, Field(ge=_LIM.min_ttl_s, le=_LIM.max_ttl_s)] = _LIM.default_ttl_s


class JoinTokenOut(BaseModel):
    id: str
    token: str = Field(description="shown once: nvcj1.<id>.<secret>.<ca sha256>")
    expires_at: float
    ca_sha256: str


@router.get("/ca", name="cluster.ca", dependencies=[PUBLIC_ROUTE])
async def cluster_ca(request: Request) -> CaOut:
    control = control_plane(request)
    return CaOut(cluster=control._ca().cluster_id, sha256=control.ca_sha256, ca_pem=control.ca_pem())


@router.get("", name="cluster.show")
async def cluster_show(request: Request, _: Viewer) -> dict[str, Any]:
    control = control_plane(request)
    nodes = await control.registry.list()
    return {
        "cluster": control._ca().cluster_id if control.ca else None,
        "ca_sha256": control.ca_sha256 if control.ca else None,
        "node": control.node,
        "store": control.store_info,
        "nodes": len(nodes),
        "ready": sum(1 for n in nodes if n.health == "ready"),
        "control": [n.api for n in nodes if "control" in n.roles and n.api],
    }


@router.post("/tokens", name="cluster.token.create", status_code=201)
async def create_join_token(body: JoinTokenIn, request: Request, who: Admin) -> JoinTokenOut:
    control = control_plane(request)
    issued = await control.create_join_token(ttl_s=body.ttl_s, by=who.actor)
    set_target(request, f"join-token/{issued.record.id}")
    return JoinTokenOut(id=issued.record.id, token=str(issued.token), expires_at=issued.record.expires_at,
                        ca_sha256=issued.token.ca_sha256)  # fmt: skip


@router.post("/join", name="cluster.join", dependencies=[PUBLIC_ROUTE])
async def join(body: JoinRequest, request: Request) -> JoinResponse:
    """Authenticated by the bootstrap token in the body (single use); answers the signed certificate."""
    set_target(request, f"node/{body.node}")
    return await control_plane(request).join(body)


__all__ = ["control_plane", "router"]
