"""The node registry in the cluster store.

Keys:

* ``/novacron/nodes/<node>``: the node's record (JSON): what its agent last reported (addresses,
  capacity, labels, QEMU version, roles, the VMs it runs) and what operators set (labels, cordon).
* ``/novacron/nodes-alive/<node>``: present while the node's heartbeats keep its lease alive.
* ``/novacron/placements/<vm>``: the placement constraints a VM was created with (selector,
  anti-affinity group), kept by the control node so they survive the VM's migrations.

Health: **ready** while the alive key exists (a heartbeat within the lease TTL), **not-ready** once the
lease lapsed (the store deletes the key), **maintenance** while cordoned (whatever the heartbeats).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from novacron.cluster.errors import ClusterSettingError, NodeConflict, NodeNotFound
from novacron.observability.log import log_event
from novacron.store.base import CasFailed, Delete, KeyValueStore, LeaseNotFound, StoreError

log = logging.getLogger("novacron.cluster.registry")

NODE_PREFIX = "/novacron/nodes/"
ALIVE_PREFIX = "/novacron/nodes-alive/"
PLACEMENT_PREFIX = "/novacron/placements/"
NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
LABEL_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$"
MAX_LABELS = 64
MAX_LABEL_VALUE = 63
MAX_NODES = 4096
MAX_VMS_PER_REPORT = 4096
MAX_CAS_RETRIES = 8

Health = Literal["ready", "not-ready", "maintenance"]
NodeRole = Literal["control", "worker"]


@dataclass(frozen=True)
class RegistryLimits:
    heartbeat_ttl_s: int = 6  # lease TTL: three heartbeats (2 s apart) may be missed
    max_nodes: int = MAX_NODES


def check_labels(labels: dict[str, str | None], field: str = "labels") -> None:
    if len(labels) > MAX_LABELS:
        raise ClusterSettingError("too many labels", field=field, limit=MAX_LABELS)
    for key, value in labels.items():
        if not re.match(LABEL_KEY_PATTERN, key):
            raise ClusterSettingError(
                "invalid label key", field=f"{field}.{key[:70]}", pattern=LABEL_KEY_PATTERN
            )
        if value is not None and (len(value) > MAX_LABEL_VALUE or not value.isprintable()):
            raise ClusterSettingError(
                "invalid label value (1..63 printable characters)", field=f"{field}.{key}"
            )


class VMSummary(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=63)]
    vcpus: Annotated[int, Field(ge=1, le=1024)]
    memory_mib: Annotated[int, Field(ge=1, le=1 << 24)]
    state: Annotated[str, Field(max_length=32)]


class NodeReport(BaseModel):
    """What an agent says about itself with each heartbeat."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    node: Annotated[str, Field(pattern=NODE_ID_PATTERN)]
    dwcp: Annotated[str, Field(max_length=300, description="host:port of the DWCP listener")]
    api: Annotated[str, Field(max_length=300, description="https URL of the node's mTLS API listener")]
    vcpus: Annotated[int, Field(ge=1, le=65536)]
    memory_mib: Annotated[int, Field(ge=64, le=1 << 30)]
    labels: Annotated[dict[str, str], Field(max_length=MAX_LABELS)] = Field(default_factory=dict)
    roles: Annotated[list[NodeRole], Field(min_length=1, max_length=2)] = Field(
        default_factory=lambda: list[NodeRole](["worker"])
    )
    qemu_version: Annotated[str, Field(max_length=64)] = ""
    version: Annotated[str, Field(max_length=64)] = ""
    vms: Annotated[list[VMSummary], Field(max_length=MAX_VMS_PER_REPORT)] = Field(default_factory=list)


class NodeRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    node: str
    joined_at: float
    report: NodeReport | None = None  # None between join and the first heartbeat
    heartbeat_at: float | None = None
    lease: int = 0
    labels: dict[str, str] = Field(default_factory=dict)  # set by operators, over the agent's own
    cordoned: bool = False
    cordoned_by: str | None = None
    revision: int = Field(default=0, exclude=True)

    def effective_labels(self) -> dict[str, str]:
        return {**(self.report.labels if self.report else {}), **self.labels}


class NodeView(BaseModel):
    """A node as the API shows it: the record, its health and its effective labels."""

    node: str
    health: Health
    alive: bool
    cordoned: bool
    roles: list[str]
    dwcp: str | None
    api: str | None
    vcpus: int | None
    memory_mib: int | None
    labels: dict[str, str]
    qemu_version: str | None
    version: str | None
    vms: list[VMSummary]
    joined_at: float
    heartbeat_at: float | None


class PlacementRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    vm: str
    selector: dict[str, str] = Field(default_factory=dict)
    anti_affinity: str | None = None


def _decode_node(value: bytes, key: str, revision: int) -> NodeRecord:
    try:
        return NodeRecord.model_validate_json(value).model_copy(update={"revision": revision})
    except ValidationError as exc:
        raise StoreError("corrupt node record", key=key, reason=str(exc.errors()[0].get("msg"))) from None


def view(record: NodeRecord, alive: bool) -> NodeView:
    r = record.report
    health: Health = "maintenance" if record.cordoned else ("ready" if alive else "not-ready")
    return NodeView(
        node=record.node,
        health=health,
        alive=alive,
        cordoned=record.cordoned,
        roles=list(r.roles) if r else [],
        dwcp=r.dwcp if r else None,
        api=r.api if r else None,
        vcpus=r.vcpus if r else None,
        memory_mib=r.memory_mib if r else None,
        labels=record.effective_labels(),
        qemu_version=r.qemu_version if r else None,
        version=r.version if r else None,
        vms=list(r.vms) if r else [],
        joined_at=record.joined_at,
        heartbeat_at=record.heartbeat_at,
    )


class NodeRegistry:
    def __init__(
        self,
        store: KeyValueStore,
        *,
        limits: RegistryLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.limits = limits or RegistryLimits()
        self.clock = clock

    # ----- reads -----

    async def record(self, node: str) -> NodeRecord:
        if not re.match(NODE_ID_PATTERN, node):
            raise NodeNotFound(f"no node named {node[:70]!r}", node=node[:70])
        entry = await self.store.get(NODE_PREFIX + node)
        if entry is None:
            raise NodeNotFound(f"no node named {node!r} in the registry", node=node)
        return _decode_node(entry.value, entry.key, entry.mod_revision)

    async def get(self, node: str) -> NodeView:
        record = await self.record(node)
        return view(record, await self.store.get(ALIVE_PREFIX + node) is not None)

    async def list(self) -> list[NodeView]:
        entries = await self.store.range(NODE_PREFIX, limit=self.limits.max_nodes)
        alive = {e.key.removeprefix(ALIVE_PREFIX) for e in await self.store.range(ALIVE_PREFIX)}
        records = [_decode_node(e.value, e.key, e.mod_revision) for e in entries]
        return [view(r, r.node in alive) for r in records]

    async def peers(self, *, exclude: str | None = None) -> dict[str, str]:
        """DWCP addresses of every reported node (any health: a cordoned node still sends)."""
        return {v.node: v.dwcp for v in await self.list() if v.dwcp and v.node != exclude}

    # ----- writes -----

    async def admit(self, node: str) -> NodeRecord:
        """A node joined: its record exists from now on (not ready until its first heartbeat)."""
        if len(await self.store.range(NODE_PREFIX, limit=self.limits.max_nodes)) >= self.limits.max_nodes:
            raise NodeConflict("the registry is full", limit=self.limits.max_nodes)
        record = NodeRecord(node=node, joined_at=self.clock())
        try:
            rev = await self.store.put(
                NODE_PREFIX + node, record.model_dump_json().encode(), expect_revision=0
            )
        except CasFailed:
            raise NodeConflict(
                f"a node named {node!r} is already registered (an admin can remove it first)", node=node
            ) from None
        log_event(log, "cluster.node_admitted", node=node)
        return record.model_copy(update={"revision": rev})

    async def _update(self, node: str, change: Callable[[NodeRecord], NodeRecord]) -> NodeRecord:
        for _ in range(MAX_CAS_RETRIES):
            current = await self.record(node)
            updated = change(current)
            try:
                rev = await self.store.put(
                    NODE_PREFIX + node, updated.model_dump_json().encode(), expect_revision=current.revision
                )
            except CasFailed:
                continue
            return updated.model_copy(update={"revision": rev})
        raise StoreError("node record update kept conflicting", node=node, retries=MAX_CAS_RETRIES)

    async def heartbeat(self, report: NodeReport) -> NodeRecord:
        """Record a report and keep the node's lease alive (a new lease if the old one lapsed)."""
        check_labels(dict(report.labels), "labels")
        now = self.clock()
        record = await self.record(report.node)  # only admitted (joined or initialised) nodes
        lease = record.lease
        alive = await self.store.get(ALIVE_PREFIX + report.node)
        try:
            if lease == 0 or alive is None:
                raise LeaseNotFound("no live lease", node=report.node)
            await self.store.lease_keepalive(lease)
        except LeaseNotFound:
            lease = (await self.store.lease_grant(self.limits.heartbeat_ttl_s)).id
            await self.store.put(ALIVE_PREFIX + report.node, str(now).encode(), lease=lease)
            log_event(log, "cluster.node_ready", node=report.node, lease=lease)
        return await self._update(
            report.node,
            lambda r: r.model_copy(update={"report": report, "heartbeat_at": now, "lease": lease}),
        )

    async def set_labels(self, node: str, labels: dict[str, str | None]) -> NodeRecord:
        """Set (value) or remove (None) operator labels."""
        check_labels(labels)

        def change(r: NodeRecord) -> NodeRecord:
            merged = {**r.labels, **{k: v for k, v in labels.items() if v is not None}}
            for k in [k for k, v in labels.items() if v is None]:
                merged.pop(k, None)
            if len(merged) > MAX_LABELS:
                raise ClusterSettingError("too many labels", field="labels", limit=MAX_LABELS)
            return r.model_copy(update={"labels": merged})

        return await self._update(node, change)

    async def cordon(self, node: str, *, on: bool, by: str) -> NodeRecord:
        record = await self._update(
            node, lambda r: r.model_copy(update={"cordoned": on, "cordoned_by": by if on else None})
        )
        log_event(log, "cluster.node_cordoned" if on else "cluster.node_uncordoned", node=node, by=by)
        return record

    async def remove(self, node: str) -> None:
        record = await self.record(node)
        await self.store.txn([], [Delete(NODE_PREFIX + node), Delete(ALIVE_PREFIX + node)])
        if record.lease:
            with contextlib.suppress(LeaseNotFound):
                await self.store.lease_revoke(record.lease)
        log_event(log, "cluster.node_removed", node=node)

    # ----- placement constraints of VMs -----

    async def set_placement(self, placement: PlacementRecord) -> None:
        await self.store.put(PLACEMENT_PREFIX + placement.vm, placement.model_dump_json().encode())

    async def placements(self) -> dict[str, PlacementRecord]:
        out: dict[str, PlacementRecord] = {}
        for e in await self.store.range(PLACEMENT_PREFIX):
            try:
                p = PlacementRecord.model_validate_json(e.value)
            except ValidationError:
                log_event(log, "cluster.placement_corrupt", logging.WARNING, key=e.key)
                continue
            out[p.vm] = p
        return out


__all__ = [
    "ALIVE_PREFIX",
    "NODE_PREFIX",
    "PLACEMENT_PREFIX",
    "Health",
    "NodeRecord",
    "NodeRegistry",
    "NodeReport",
    "NodeView",
    "PlacementRecord",
    "RegistryLimits",
    "VMSummary",
    "check_labels",
    "view",
]
