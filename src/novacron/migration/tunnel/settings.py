"""The QEMU migration settings of each tunnel path, by mode (``docs/tunnel.md``, "Settings").

* **tunnel** (internet, hybrid): multifd with QEMU's compression off, so the tunnel sees raw pages and
  HDE does the compression (deltas, baseline references, the codec the link can afford);
* **pass-through** (datacenter comparison): multifd, every connection relayed as plain bytes; QEMU may
  compress (``multifd-compression`` zstd/zlib) since the tunnel does not look inside.

The orchestrator adds its policy (auto-converge, bandwidth, downtime) with
:meth:`QemuMigrationSettings.with_policy`; a policy cannot change what these settings fix.
"""

from __future__ import annotations

from novacron.dwcp.mode import Mode
from novacron.migration.datapath import DataPathKind, QemuMigrationSettings
from novacron.migration.tunnel.errors import TunnelError

DEFAULT_MULTIFD_CHANNELS = 4  # QEMU's best configuration measured on this project's links
MAX_MULTIFD_CHANNELS = 64
COMPRESSIONS = ("none", "zstd", "zlib")


def tunnel_settings(channels: int = DEFAULT_MULTIFD_CHANNELS) -> QemuMigrationSettings:
    _check_channels(channels)
    return QemuMigrationSettings(
        capabilities={"multifd": True},
        parameters={"multifd-channels": channels, "multifd-compression": "none"},
    )


def passthrough_settings(
    channels: int = DEFAULT_MULTIFD_CHANNELS, compression: str = "none"
) -> QemuMigrationSettings:
    _check_channels(channels)
    if compression not in COMPRESSIONS:
        raise TunnelError(
            "unknown multifd compression", compression=compression, known=",".join(COMPRESSIONS)
        )
    return QemuMigrationSettings(
        capabilities={"multifd": True},
        parameters={"multifd-channels": channels, "multifd-compression": compression},
    )


def path_for(mode: Mode) -> DataPathKind:
    """The tunnel variant for a mode (for datacenter the orchestrator may pick the direct path)."""
    return DataPathKind.PASSTHROUGH if mode is Mode.DATACENTER else DataPathKind.TUNNEL


def settings_for(path: DataPathKind, channels: int = DEFAULT_MULTIFD_CHANNELS) -> QemuMigrationSettings:
    if path is DataPathKind.TUNNEL:
        return tunnel_settings(channels)
    if path is DataPathKind.PASSTHROUGH:
        return passthrough_settings(channels)
    raise TunnelError("the tunnel has no settings for this path", path=path.value)


def _check_channels(channels: int) -> None:
    if not 1 <= channels <= MAX_MULTIFD_CHANNELS:
        raise TunnelError("multifd channel count out of range", channels=channels, limit=MAX_MULTIFD_CHANNELS)
