"""Machine types: resolve an alias such as ``pc`` or ``q35`` to the versioned type QEMU will run.

A migration destination must start the identical machine, so specs store the versioned name.
"""

from __future__ import annotations

import re
import subprocess
from functools import lru_cache

from novacron.hypervisor.errors import HypervisorError, SpecError

QUERY_TIMEOUT_S = 30.0


@lru_cache(maxsize=4)  # a binary's machine list is fixed (resolve_machine assumes it too); a spawn is 30+ ms
def machine_types(qemu_binary: str) -> dict[str, str]:
    """Every machine type this QEMU knows, mapped to what it resolves to (itself unless an alias)."""
    try:
        out = subprocess.run(
            [qemu_binary, "-machine", "help"],
            capture_output=True,
            text=True,
            timeout=QUERY_TIMEOUT_S,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise HypervisorError("cannot list QEMU machine types", qemu=qemu_binary, reason=str(exc)) from None
    types: dict[str, str] = {}
    for line in out.splitlines()[1:]:
        parts = line.split(None, 1)
        if not parts:
            continue
        alias = re.search(r"\(alias of ([^)]+)\)", line)
        types[parts[0]] = alias.group(1) if alias else parts[0]
    return types


def resolve_machine(qemu_binary: str, machine: str) -> str:
    types = machine_types(qemu_binary)
    if machine not in types:
        raise SpecError(
            f"unknown machine type {machine!r}",
            field="machine",
            reason="not known to this QEMU",
        )
    return types[machine]
