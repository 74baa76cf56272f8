"""The placement model built from the registry: hosts from node reports, VMs from what each node
runs (plus VMs just placed there and not yet reported), constraints from the placement records."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from novacron.cluster.registry import NodeView, PlacementRecord, VMSummary
from novacron.dwcp.placement import VM, Cluster, Host


def vm_of(summary: VMSummary, placement: PlacementRecord | None) -> VM:
    return VM(
        summary.name,
        summary.vcpus,
        summary.memory_mib,
        selector=dict(placement.selector) if placement else {},
        anti_affinity=placement.anti_affinity if placement else None,
    )


def build_cluster(
    nodes: Iterable[NodeView],
    placements: Mapping[str, PlacementRecord],
    reserved: Mapping[str, Iterable[VMSummary]] | None = None,
) -> Cluster:
    """Nodes that never reported are left out; not-ready and cordoned ones take no new VMs but their
    VMs still count (a drain plan needs them). A VM seen on two nodes (mid-migration) counts once,
    on the first node listed."""
    hosts: list[Host] = []
    vms: dict[str, VM] = {}
    assignment: dict[str, str] = {}
    reserved = reserved or {}
    for n in nodes:
        if n.vcpus is None or n.memory_mib is None:
            continue
        hosts.append(Host(n.node, n.vcpus, n.memory_mib, labels=dict(n.labels),
                          maintenance=n.health != "ready"))  # fmt: skip
        for s in [*n.vms, *reserved.get(n.node, ())]:
            if s.name in assignment:
                continue
            vms[s.name] = vm_of(s, placements.get(s.name))
            assignment[s.name] = n.node
    return Cluster(tuple(hosts), tuple(vms.values()), assignment)


__all__ = ["build_cluster", "vm_of"]
