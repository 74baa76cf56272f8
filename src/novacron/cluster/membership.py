"""An agent's side of membership: it reports itself to the control nodes every few seconds (which
keeps its registry lease alive) and learns its peers from the answer.

The report is cheap to build: the VM list comes from the inventory and the run directories (no QMP
round-trip per VM). A control node reports to its own registry directly; other nodes try the control
nodes' node listeners in turn (mutual TLS: the node certificate is the credential).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
from typing import Any

from novacron import __version__
from novacron.agent.config import AgentConfig
from novacron.agent.peers import ClusterPeers
from novacron.api.deps import ApiServices
from novacron.cluster.calls import NodeCaller
from novacron.cluster.control import ControlPlane
from novacron.cluster.registry import NodeReport, VMSummary
from novacron.errors import NovacronError
from novacron.observability import metrics
from novacron.observability.log import log_event

log = logging.getLogger("novacron.cluster.membership")

HEARTBEAT_TIMEOUT_S = 5.0  # one report to one control node
QEMU_VERSION_TIMEOUT_S = 10.0
RESERVED_HOST_MIB = 512  # RAM the host keeps for itself when no capacity is configured
MAX_REPORTED_VMS = 4096


def qemu_version() -> str:
    binary = shutil.which("qemu-system-x86_64")
    if binary is None:
        return ""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=QEMU_VERSION_TIMEOUT_S, check=False).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ""
    words = out.split()
    return words[3] if len(words) > 3 and words[2] == "version" else out.strip()[:64]


def host_memory_mib() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20))


class Membership:
    def __init__(
        self,
        cfg: AgentConfig,
        *,
        node_port: int,
        dwcp_port: int,
        services: ApiServices,
        peers: ClusterPeers,
        caller: NodeCaller,
        control: ControlPlane | None,
    ) -> None:
        if cfg.cluster is None:
            raise ValueError("membership needs the [cluster] section")
        self.cfg = cfg
        self.cluster = cfg.cluster
        self.services = services
        self.peers = peers
        self.caller = caller
        self.control = control
        host = self.cluster.advertise
        shown = f"[{host}]" if ":" in host else host
        self.dwcp = f"{shown}:{dwcp_port}"
        self.api = f"https://{shown}:{node_port}"
        self.qemu = qemu_version()
        self.memory_mib = (
            self.cluster.memory_mib
            or cfg.migration.capacity_mib
            or max(64, host_memory_mib() - RESERVED_HOST_MIB)
        )
        self.vcpus = self.cluster.vcpus or os.cpu_count() or 1
        self.healthy = False

    async def report(self) -> NodeReport:
        vms: list[VMSummary] = []
        driver = self.services.vms.driver
        for record in await self.services.vms.inventory.list():
            if record.node != self.cfg.node_id or not driver.is_defined(record.name):
                continue
            vms.append(
                VMSummary(
                    name=record.name,
                    vcpus=int(record.spec.get("vcpus") or 1),
                    memory_mib=int(record.spec.get("memory_mib") or 128),
                    state=record.desired_state,
                )
            )
        return NodeReport(
            node=self.cfg.node_id,
            dwcp=self.dwcp,
            api=self.api,
            vcpus=self.vcpus,
            memory_mib=self.memory_mib,
            labels=dict(self.cluster.labels),
            roles=list(self.cluster.roles),
            qemu_version=self.qemu,
            version=__version__,
            vms=vms[:MAX_REPORTED_VMS],
        )

    async def beat_once(self) -> bool:
        """One report; True when a control node took it. Failures are logged, never raised."""
        try:
            report = await self.report()
        except NovacronError as exc:
            log_event(log, "cluster.report_failed", logging.WARNING, error=str(exc))
            return False
        answer: dict[str, Any] | None = None
        errors: list[str] = []
        if self.control is not None:
            try:
                await self.control.registry.heartbeat(report)
                views = await self.control.registry.list()
                answer = {"peers": {v.node: v.dwcp for v in views if v.dwcp}}
            except NovacronError as exc:
                errors.append(f"local registry: {exc}")
        for url in [] if answer is not None else self.cluster.control:
            try:
                answer = await self.caller.call(
                    url, "PUT", f"/v1/nodes/{self.cfg.node_id}/heartbeat", report.model_dump(mode="json"),
                    timeout_s=HEARTBEAT_TIMEOUT_S,
                )  # fmt: skip
                break
            except (NovacronError, OSError) as exc:
                errors.append(f"{url}: {exc}")
        metrics.HEARTBEATS.labels("ok" if answer is not None else "failed").inc()
        if answer is None:
            log_event(
                log,
                "cluster.heartbeat_failed",
                logging.WARNING,
                errors="; ".join(errors) or "no control node",
            )
            self.healthy = False
            return False
        if not self.healthy:
            log_event(log, "cluster.heartbeat_ok", node=self.cfg.node_id, vms=len(report.vms))
        self.healthy = True
        peers = answer.get("peers") if isinstance(answer, dict) else None
        if isinstance(peers, dict):
            self.peers.update_from_registry({str(k): str(v) for k, v in peers.items()}, own=self.cfg.node_id)
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.cluster.heartbeat_s)  # the heartbeat period itself
            await self.beat_once()


__all__ = ["Membership", "host_memory_mib", "qemu_version"]
