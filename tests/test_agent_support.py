"""Test support: real agent processes in the WAN emulator's namespaces (``novacron.testing.agents``,
shared with the migration benchmark and the demo), plus what only pytest needs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from novacron.errors import NovacronError
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
    wait_record,
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
    "wait_record",
    "where_it_runs",
]


async def expect_done(m: dict[str, Any], dst: AgentProc | None = None) -> None:
    """Fail with the record's whole error and events (pytest would cut a long assertion message), and
    the destination's record when ``dst`` is given: its error keeps the guest's console tail, which
    says why a guest died after resume."""
    if m.get("phase") != "done":
        detail: dict[str, Any] = {k: m.get(k) for k in ("phase", "error", "events")}
        if dst is not None:
            try:
                theirs = await dst.api("GET", f"/v1/migrations/{m.get('id')}")
                detail["destination"] = {k: theirs.get(k) for k in ("phase", "error", "events")}
            except (NovacronError, OSError) as exc:
                detail["destination"] = f"not readable: {exc}"
        pytest.fail("migration did not finish:\n" + json.dumps(detail, indent=1, default=str), pytrace=False)
