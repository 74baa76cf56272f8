"""Which data paths a host can run, and building them for a migration (the DataPathFactory).

* direct: always (QEMU's TLS with this node's credentials);
* tunnel (HDE) and pass-through: when the session is an AMST session (the tunnel opens its channels
  on it) and, for the tunnel, the cluster key is known (it keys HDE's content tags). The baseline
  store, if the host has one, lets pages the destination already holds travel as references.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from novacron.dwcp.encoding import ArenaPool, BaselineStore
from novacron.dwcp.transport import AmstSession
from novacron.migration.context import DataPathPlan, MigrationHost, PeerSession
from novacron.migration.datapath import DataPathKind, DestinationDataPath, SourceDataPath
from novacron.migration.direct import DirectConfig, DirectDestinationPath, DirectSourcePath
from novacron.migration.errors import MigrationInputError


class HostDataPaths:
    def __init__(
        self,
        host: MigrationHost,
        *,
        cluster_key: bytes | None = None,
        baseline: BaselineStore | None = None,
        corrupt_batch: int | None = None,
        arenas: ArenaPool | None = None,
    ) -> None:
        self.host = host
        self.cluster_key = cluster_key
        self.baseline = baseline
        self.arenas = arenas  # warm HDE session caches, lent to one tunnel each
        self.corrupt_batch = corrupt_batch  # fault injection for tests: corrupt this HDE batch

    def kinds(self) -> frozenset[DataPathKind]:
        kinds = {DataPathKind.DIRECT, DataPathKind.PASSTHROUGH}
        if self.cluster_key is not None:
            kinds.add(DataPathKind.TUNNEL)
        return frozenset(kinds)

    def _direct_config(self, plan: DataPathPlan) -> DirectConfig:
        return dataclasses.replace(
            self.host.config.direct, multifd_channels=plan.multifd_channels, compression=plan.compression
        )

    def _tunnel_settings(self, plan: DataPathPlan) -> Any:
        from novacron.migration.tunnel import settings_for  # noqa: PLC0415 - the tunnel loads numpy/HDE

        if plan.multifd_channels < 1:
            raise MigrationInputError(
                "the tunnel needs multifd (post-copy runs on the direct path)", field="data_path"
            )
        return settings_for(plan.kind, plan.multifd_channels)

    def source(
        self, plan: DataPathPlan, *, migration_id: str, vm: str, peer_node: str, peer_host: str,
        session: PeerSession,
    ) -> SourceDataPath:  # fmt: skip
        if plan.kind is DataPathKind.DIRECT:
            return DirectSourcePath(
                self.host.credentials,
                self.host.workdir / migration_id,
                migration_id,
                self._direct_config(plan),
                peer_node,
                peer_host,
            )
        from novacron.migration.tunnel import SourceTunnel, amst_bandwidth, amst_rtt  # noqa: PLC0415

        amst = session.data
        if not isinstance(amst, AmstSession):
            raise MigrationInputError("the tunnel needs an AMST data session", field="data_path")
        return SourceTunnel(
            amst,
            vm=vm,
            workdir=self.host.workdir / migration_id,
            settings=self._tunnel_settings(plan),
            passthrough=plan.kind is DataPathKind.PASSTHROUGH,
            cluster_key=self.cluster_key,
            baseline=self.baseline,
            bandwidth=amst_bandwidth(amst),
            rtt=amst_rtt(amst),
            corrupt_batch=self.corrupt_batch,
            arenas=self.arenas,
        )

    def destination(
        self, plan: DataPathPlan, *, migration_id: str, vm: str, session: PeerSession
    ) -> DestinationDataPath:
        if plan.kind is DataPathKind.DIRECT:
            return DirectDestinationPath(
                self.host.credentials,
                self.host.workdir / migration_id,
                migration_id,
                self._direct_config(plan),
            )
        from novacron.migration.tunnel import DestinationTunnel  # noqa: PLC0415

        if session.router is None:
            raise MigrationInputError("the tunnel needs an AMST session", field="data_path")
        return DestinationTunnel(
            session.router,
            vm=vm,
            workdir=self.host.workdir / migration_id,
            settings=self._tunnel_settings(plan),
            passthrough=plan.kind is DataPathKind.PASSTHROUGH,
            baseline=self.baseline,
            arenas=self.arenas,
        )
