"""The control plane of a control-role node: joins (bootstrap token + CSR), the registry, placement
of new VMs (filter/score over the registry, forwarded to the chosen node's agent) and drains."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from pydantic import BaseModel, ConfigDict, Field

from novacron.cluster.calls import NodeCaller
from novacron.cluster.csr import MAX_CSR_BYTES, sign_csr
from novacron.cluster.drain import Drains, DrainSettings
from novacron.cluster.errors import ClusterError, NodeConflict, NodeNotFound, NotControlNode
from novacron.cluster.jointokens import IssuedJoinToken, JoinTokenStore, parse_join_token
from novacron.cluster.placing import build_cluster, vm_of
from novacron.cluster.registry import NODE_ID_PATTERN, NodeRegistry, PlacementRecord, VMSummary
from novacron.dwcp.placement import place_one
from novacron.observability.log import log_event
from novacron.security.pki import CertificateAuthority, fingerprint

log = logging.getLogger("novacron.cluster.control")

MAX_RESERVATIONS = 4096  # VMs placed but not yet in their node's report


class JoinRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=200, description="the bootstrap token (nvcj1....)")
    node: str = Field(pattern=NODE_ID_PATTERN, description="the joining node's id")
    csr_pem: str = Field(min_length=1, max_length=MAX_CSR_BYTES, description="PEM CSR of the node's own key")


class JoinResponse(BaseModel):
    cluster: str
    node: str
    certificate_pem: str
    ca_pem: str
    cluster_key_hex: str | None = Field(description="the cluster's HDE key (shared by every node)")
    control: list[str] = Field(description="https URLs of the control nodes' node listeners")
    peers: dict[str, str] = Field(description="node id -> DWCP address of every registered node")
    store: dict[str, Any] = Field(description="the cluster store (backend, and etcd endpoints)")


@dataclass
class ControlPlane:
    node: str
    registry: NodeRegistry
    join_tokens: JoinTokenStore
    caller: NodeCaller
    ca: CertificateAuthority | None = None
    cluster_key: bytes | None = None
    store_info: dict[str, Any] = field(default_factory=lambda: {"backend": "sqlite"})
    drain_settings: DrainSettings = field(default_factory=DrainSettings)
    drains: Drains = field(init=False)
    _place_lock: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)
    _reserved: dict[str, dict[str, VMSummary]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.drains = Drains(self.registry, self.caller, self.drain_settings)

    # ----- joins -----

    def _ca(self) -> CertificateAuthority:
        if self.ca is None:
            raise NotControlNode(
                "this node does not hold the cluster CA key (not a control node)", node=self.node
            )
        return self.ca

    @property
    def ca_sha256(self) -> str:
        return fingerprint(self._ca().certificate)

    def ca_pem(self) -> str:
        return self._ca().certificate.public_bytes(serialization.Encoding.PEM).decode()

    async def create_join_token(self, *, ttl_s: float | None, by: str) -> IssuedJoinToken:
        return await self.join_tokens.create(ca_sha256=self.ca_sha256, ttl_s=ttl_s, created_by=by)

    async def join(self, req: JoinRequest) -> JoinResponse:
        ca = self._ca()
        parse_join_token(req.token)  # a malformed token is refused before anything else is looked at
        cert = sign_csr(ca, req.csr_pem.encode(), req.node)  # a bad CSR does not burn the token
        try:
            await self.registry.record(req.node)
        except NodeNotFound:
            pass
        else:
            raise NodeConflict(f"a node named {req.node!r} is already registered", node=req.node)
        used = await self.join_tokens.consume(req.token, node=req.node)
        await self.registry.admit(req.node)
        views = await self.registry.list()
        log_event(log, "cluster.node_joined", node=req.node, token=used.id, fingerprint=fingerprint(cert))
        return JoinResponse(
            cluster=ca.cluster_id,
            node=req.node,
            certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            ca_pem=self.ca_pem(),
            cluster_key_hex=self.cluster_key.hex() if self.cluster_key else None,
            control=[v.api for v in views if v.api and "control" in v.roles],
            peers={v.node: v.dwcp for v in views if v.dwcp},
            store=self.store_info,
        )

    # ----- placement -----

    async def place(self, name: str, vcpus: int, memory_mib: int, *, selector: dict[str, str] | None,
                    anti_affinity: str | None, node: str | None = None) -> tuple[str, str]:  # fmt: skip
        """Choose a node for a new VM (or check the asked one) and reserve the capacity there;
        returns (node, its API URL). ``release`` undoes the reservation if the create fails."""
        placement = PlacementRecord(vm=name, selector=selector or {}, anti_affinity=anti_affinity)
        async with self._place_lock:
            views = await self.registry.list()
            reported = {s.name for v in views for s in v.vms}
            for reserved in self._reserved.values():
                for vm in [n for n in reserved if n in reported]:
                    del reserved[vm]
            if name in reported or any(name in r for r in self._reserved.values()):
                raise NodeConflict(f"a VM named {name!r} already runs in the cluster", vm=name)
            if sum(len(r) for r in self._reserved.values()) >= MAX_RESERVATIONS:
                raise ClusterError("too many VMs being placed at once", limit=MAX_RESERVATIONS)
            placements = await self.registry.placements()
            cluster = build_cluster(
                views, placements, {k: list(v.values()) for k, v in self._reserved.items()}
            )
            summary = VMSummary(name=name, vcpus=vcpus, memory_mib=memory_mib, state="placing")
            if node is None:
                node = place_one(cluster, vm_of(summary, placement)).host
            api = next((v.api for v in views if v.node == node), None)
            if api is None:
                raise NodeNotFound(f"node {node!r} is not registered or never reported", node=node)
            self._reserved.setdefault(node, {})[name] = summary
            await self.registry.set_placement(placement)
        log_event(log, "cluster.vm_placed", vm=name, node=node)
        return node, api

    def release(self, node: str, name: str) -> None:
        self._reserved.get(node, {}).pop(name, None)

    async def create_on(self, node: str, api: str, body: dict[str, Any]) -> Any:
        """Forward a VM create to the chosen node's agent (node listener, mTLS)."""
        try:
            return await self.caller.call(api, "POST", "/v1/vms", {**body, "node": node})
        except BaseException:
            self.release(node, str(body.get("name")))
            raise

    async def close(self) -> None:
        await self.drains.close()


Role = Literal["control", "worker"]

__all__ = ["ControlPlane", "JoinRequest", "JoinResponse"]
