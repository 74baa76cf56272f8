"""Test support: real agent processes in the WAN emulator's namespaces (``novacron.testing.agents``,
shared with the migration benchmark and the demo), plus what only pytest needs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from novacron.testing.agents import (
    AGENT_READY_S,
    DWCP_PORT,
    FINAL,
    NOVACRON,
    AgentProc,
    Cluster,
    agent_cluster,
    boot_vm,
    guest,
    migrate,
    qemu_processes,
    start_agent,
    stop_agent,
    wait_migration,
    where_it_runs,
)

__all__ = [
    "AGENT_READY_S",
    "DWCP_PORT",
    "FINAL",
    "NOVACRON",
    "AgentProc",
    "Cluster",
    "agent_cluster",
    "boot_vm",
    "expect_done",
    "guest",
    "migrate",
    "qemu_processes",
    "start_agent",
    "stop_agent",
    "wait_migration",
    "where_it_runs",
]


def expect_done(m: dict[str, Any]) -> None:
    """Fail with the record's whole error and events (pytest would cut a long assertion message)."""
    if m.get("phase") != "done":
        detail = {k: m.get(k) for k in ("phase", "error", "events")}
        pytest.fail("migration did not finish:\n" + json.dumps(detail, indent=1, default=str), pytrace=False)
