"""What this host can give a VM, read from /proc. Used to validate specs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# Memory left to the host (agent, page cache, QEMU's own overhead) when checking a VM's size.
HOST_RESERVED_MIB = 512
MIN_VM_MEMORY_MIB = 64


@dataclass(frozen=True)
class HostLimits:
    cpus: int
    memory_mib: int

    @property
    def max_vm_memory_mib(self) -> int:
        return max(MIN_VM_MEMORY_MIB, self.memory_mib - HOST_RESERVED_MIB)


def _meminfo_total_mib(path: Path = Path("/proc/meminfo")) -> int:
    for line in path.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


@lru_cache(maxsize=1)
def detect_host_limits() -> HostLimits:
    return HostLimits(cpus=os.cpu_count() or 1, memory_mib=_meminfo_total_mib())
