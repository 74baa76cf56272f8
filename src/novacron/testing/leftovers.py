"""Names of the emulator's namespaces, and removal of what crashed runs left behind.

Every namespace is named ``ncwan-<owner pid>-<token>-<node>``. The owner pid makes leftovers
recognisable without any state file: a namespace whose owner process is gone belongs to nobody.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from dataclasses import dataclass

from novacron.testing.netns import delete_namespace, list_namespaces, namespace_pids

NAMESPACE_PREFIX = "ncwan"
_NAME = re.compile(rf"^{NAMESPACE_PREFIX}-(\d+)-([0-9a-f]{{6}})-(.+)$")


def namespace_name(owner_pid: int, token: str, node: str) -> str:
    return f"{NAMESPACE_PREFIX}-{owner_pid}-{token}-{node}"


@dataclass(frozen=True)
class InstanceNamespaces:
    """The namespaces of one emulator instance as found on the machine."""

    owner_pid: int
    token: str
    namespaces: dict[str, str]  # node -> namespace name

    @property
    def owner_alive(self) -> bool:
        return pid_alive(self.owner_pid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_instances() -> list[InstanceNamespaces]:
    found: dict[tuple[int, str], dict[str, str]] = {}
    for name in list_namespaces():
        m = _NAME.match(name)
        if m:
            found.setdefault((int(m[1]), m[2]), {})[m[3]] = name
    return [InstanceNamespaces(pid, token, nss) for (pid, token), nss in sorted(found.items())]


def kill_namespace_processes(namespace: str) -> list[int]:
    """SIGKILL every process still running inside `namespace` (they were started by its emulator)."""
    pids = [p for p in namespace_pids(namespace) if p != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def cleanup_leftovers(include_live: bool = False) -> list[str]:
    """Delete the namespaces of emulator instances whose owner died; returns the names removed.

    With `include_live`, also those of running instances (their owners will then fail). Processes
    inside the namespaces are killed first; the forwarder of a dead owner has already exited (it
    stops on EOF of its control pipe), taking the TUN devices with it.
    """
    removed = []
    for inst in find_instances():
        if inst.owner_alive and not include_live:
            continue
        for ns in inst.namespaces.values():
            kill_namespace_processes(ns)
            delete_namespace(ns)
            removed.append(ns)
    return removed
