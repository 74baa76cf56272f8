"""Test and benchmark ground: the packet-level WAN emulator (network namespaces + a TUN forwarder)."""

from novacron.testing.emulator import WAN_HOST_SYSCTLS, Backend, WanEmulator
from novacron.testing.errors import WanConfigError, WanError, WanUnavailableError
from novacron.testing.leftovers import cleanup_leftovers, find_instances
from novacron.testing.link import InterfaceStats, LinkSpec, LinkStats, WanStats
from novacron.testing.netns import in_namespace, missing_requirements

__all__ = [
    "WAN_HOST_SYSCTLS",
    "Backend",
    "InterfaceStats",
    "LinkSpec",
    "LinkStats",
    "WanConfigError",
    "WanEmulator",
    "WanError",
    "WanStats",
    "WanUnavailableError",
    "cleanup_leftovers",
    "find_instances",
    "in_namespace",
    "missing_requirements",
]
