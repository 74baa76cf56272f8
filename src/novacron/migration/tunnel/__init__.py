"""The migration tunnel: QEMU's migration connections carried over AMST, multifd pages HDE-encoded.

``SourceTunnel`` and ``DestinationTunnel`` implement the data-path Protocols of
``novacron.migration.datapath`` (``docs/migration.md`` section 7); ``settings_for`` gives the QEMU
migration settings of each path; ``docs/tunnel.md`` specifies the records on the wire.
"""

from novacron.migration.tunnel.destination import DestinationTunnel
from novacron.migration.tunnel.errors import MultifdFormatError, RecordError, TunnelError
from novacron.migration.tunnel.limits import TunnelConfigError, TunnelLimits
from novacron.migration.tunnel.settings import passthrough_settings, path_for, settings_for, tunnel_settings
from novacron.migration.tunnel.source import SourceTunnel, amst_bandwidth, amst_rtt

__all__ = [
    "DestinationTunnel",
    "MultifdFormatError",
    "RecordError",
    "SourceTunnel",
    "TunnelConfigError",
    "TunnelError",
    "TunnelLimits",
    "amst_bandwidth",
    "amst_rtt",
    "passthrough_settings",
    "path_for",
    "settings_for",
    "tunnel_settings",
]
