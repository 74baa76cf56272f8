"""The VM service: inventory + hypervisor driver, with the state rules in one place."""

from novacron.vm.local import local_service
from novacron.vm.service import VMInfo, VMService, VMServiceLimits

__all__ = ["VMInfo", "VMService", "VMServiceLimits", "local_service"]
