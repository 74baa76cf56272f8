"""Which data paths a host can run, and building them for a migration (the DataPathFactory)."""

from __future__ import annotations

import dataclasses

from novacron.migration.context import DataPathPlan, MigrationHost, PeerSession
from novacron.migration.datapath import DataPathKind, DestinationDataPath, SourceDataPath
from novacron.migration.direct import DirectConfig, DirectDestinationPath, DirectSourcePath
from novacron.migration.errors import MigrationInputError


class HostDataPaths:
    """The direct path always; the tunnel when its package is importable and the session can carry it."""

    def __init__(self, host: MigrationHost, *, tunnel: bool = True) -> None:
        self.host = host
        self._tunnel = tunnel

    def kinds(self) -> frozenset[DataPathKind]:
        return frozenset({DataPathKind.DIRECT})

    def _direct_config(self, plan: DataPathPlan) -> DirectConfig:
        return dataclasses.replace(
            self.host.config.direct, multifd_channels=plan.multifd_channels, compression=plan.compression
        )

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
        raise MigrationInputError(f"data path {plan.kind} is not available on this host", field="data_path")

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
        raise MigrationInputError(f"data path {plan.kind} is not available on this host", field="data_path")
