"""Hypervisor layer: the driver protocol, VM specs and the QEMU driver."""

from novacron.hypervisor.console import ConsoleMatch, ConsoleTimeout, wait_for_line
from novacron.hypervisor.driver import HypervisorDriver, StopMode, VMState, VMStatus
from novacron.hypervisor.errors import HypervisorError, QMPError, SpecError, VMNotDefinedError, VMStateError
from novacron.hypervisor.host import HostLimits, detect_host_limits
from novacron.hypervisor.qemu import QemuDriver, QemuLimits
from novacron.hypervisor.spec import VMSpec, parse_spec

__all__ = [
    "ConsoleMatch",
    "ConsoleTimeout",
    "HostLimits",
    "HypervisorDriver",
    "HypervisorError",
    "QMPError",
    "QemuDriver",
    "QemuLimits",
    "SpecError",
    "StopMode",
    "VMNotDefinedError",
    "VMSpec",
    "VMState",
    "VMStateError",
    "VMStatus",
    "detect_host_limits",
    "parse_spec",
    "wait_for_line",
]
