"""The migration demo: two hosts, one WAN link, a running guest moved across and back, QEMU alongside.

1. Two network namespaces joined by the WAN emulator (``--link``), a ``novacron agent`` in each
   (``novacron.testing.agents``: own state directory, store, certificates, cluster key).
2. The test guest boots on hosta through its agent, its workload dirtying memory.
3. It migrates to hostb (DWCP, the mode the agent picks) with the live display of ``novacron migrate``;
   afterwards the guest proves its memory (VERIFY, CHECKSUM, heartbeat) and runs exactly once.
4. After ``dwell_s`` of workload on hostb it migrates back: hosta recorded its memory as it left, so
   only what changed since crosses the link (the baseline saving).
5. Unless skipped, QEMU's own best migration (multifd x4 + zstd-3, no agent in the data path) moves a
   fresh guest of the same profile over the same link (``novacron.testing.qemu_migration``).
6. A side-by-side summary (``novacron.demo.summary``).

Everything lives below one temporary directory and inside the emulator's namespaces: leaving (done,
failed, Ctrl-C) stops the agents and tears the emulator down, which kills every QEMU it holds.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console

from novacron.cli.migrate import follow, report
from novacron.demo.settings import DemoSettings
from novacron.demo.summary import DemoResult
from novacron.errors import NovacronError, UserError
from novacron.image import find_image
from novacron.testing import cleanup_leftovers, missing_requirements
from novacron.testing.agents import AgentProc, agent_cluster, boot_vm
from novacron.testing.migration_runs import Row, check_via_agent, dwcp_migrate
from novacron.testing.qemu_migration import (
    QEMU_CONFIGS,
    NamespaceQemuDriver,
    boot_guest,
    qemu_migrate,
)

DEMO_VM = "demo"
QEMU_VM = "demo-qemu"
QEMU_BEST = "multifd-zstd3"


class DemoPrerequisiteError(UserError):
    """The demo cannot run on this machine (not root, a tool or the guest image missing)."""


def check_prerequisites(settings: DemoSettings) -> None:
    """Fail before anything starts, naming what is missing and how to get it."""
    missing = []
    if os.geteuid() != 0:
        missing.append(
            "root privileges (network namespaces, TUN devices): run it as root, e.g. sudo make demo"
        )
    missing += [m for m in missing_requirements() if not m.startswith("root")]
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (Debian package {package})")
    if settings.link.backend == "tun" and shutil.which("gcc") is None:
        missing.append("gcc (Debian package gcc; builds the WAN emulator's forwarder)")
    try:
        find_image(settings.profile)
    except NovacronError as exc:
        missing.append(f"the {settings.profile} guest image ({exc.message}; `make image` builds it)")
    if missing:
        raise DemoPrerequisiteError("the demo cannot run: missing " + "; ".join(missing), missing=missing)


def _live_follow(console: Console) -> Callable[[AgentProc, str], Any]:
    async def run(agent: AgentProc, migration_id: str) -> dict[str, Any]:
        async with agent.client() as client:
            m: dict[str, Any] = await follow(client, migration_id, live=True)
        console.print(report(m))
        return m

    return run


def _checks(console: Console, row: Row) -> None:
    if row.ok:
        console.print(
            "[green]verified[/]: 0 corrupted pages, data checksum unchanged, heartbeat goes on, one QEMU"
        )
    else:
        for problem in row.problems:
            console.print(f"[bold red]FAILED[/]: {problem}", highlight=False)


async def run_demo(settings: DemoSettings, console: Console) -> DemoResult:
    check_prerequisites(settings)
    removed = cleanup_leftovers()  # namespaces of an earlier demo or test that was killed outright
    if removed:
        console.print(f"removed {len(removed)} namespaces left by an earlier run that was killed")
    result = DemoResult(settings=settings)
    console.rule(f"[bold]NovaCron live migration demo[/]: two hosts, {settings.link.label}")
    workload = {"dirty_rate": settings.rate}
    async with agent_cluster(settings.link.spec, backend=settings.link.backend) as cluster:
        a, b = cluster["hosta"], cluster["hostb"]
        console.print(
            f"agents up: hosta {cluster.wan.address('hosta')}, hostb {cluster.wan.address('hostb')} "
            f"(mTLS, static peers); emulated link {settings.link.label}"
        )
        console.print(f"booting the [bold]{settings.profile}[/] test guest on hosta ...")
        started = time.monotonic()
        await boot_vm(a, DEMO_VM, profile=settings.profile, **workload)
        before = await check_via_agent(a, DEMO_VM)
        console.print(
            f"READY after {time.monotonic() - started:.1f} s; data checksum {before.checksum}, "
            f"workload dirtying {settings.rate} pages/s"
        )
        options: dict[str, Any] = {"mode": "auto", "max_downtime_ms": settings.max_downtime_ms}
        live = _live_follow(console)

        console.rule("DWCP: hosta -> hostb (the destination holds nothing)")
        out, check = await dwcp_migrate(
            cluster, DEMO_VM, "hosta", "hostb", method="dwcp:out", before=before, follow=live, **options
        )
        result.rows.append(out)
        _checks(console, out)
        if out.ok and check is not None:
            if settings.dwell_s:
                console.print(f"the guest works on hostb for {settings.dwell_s:.0f} s, then goes back ...")
                await _dwell(console, b, settings.dwell_s)
            console.rule("DWCP: hostb -> hosta (hosta kept the memory it sent: only changes cross)")
            back, _ = await dwcp_migrate(
                cluster, DEMO_VM, "hostb", "hosta", method="dwcp:back", before=check, follow=live, **options
            )
            result.rows.append(back)
            _checks(console, back)
        # Free the CPU before QEMU's turn: the demo's guest has shown what it had to.
        for agent in (a, b):
            vms = await agent.api("GET", "/v1/vms")
            if any(v["name"] == DEMO_VM for v in vms):
                async with agent.client() as client:
                    await client.request("DELETE", f"/v1/vms/{DEMO_VM}", params={"force": "true"})

        if not settings.skip_qemu:
            console.rule("QEMU's own best: multifd x4 + zstd-3, QEMU to QEMU over the same link")
            drivers = {
                n: NamespaceQemuDriver(cluster.root / "qemu" / n, namespace=cluster.wan.namespace(n))
                for n in ("hosta", "hostb")
            }
            config = QEMU_CONFIGS[QEMU_BEST]
            console.print(f"booting a {settings.profile} guest for QEMU on hosta ...")
            ref = await boot_guest(
                drivers["hosta"], QEMU_VM, settings.profile, workload=workload, zstd_level=config.zstd_level
            )
            console.print("migrating (QEMU reports no progress we could show live; waiting for RESUME) ...")
            q = await qemu_migrate(
                cluster.wan, drivers["hosta"], drivers["hostb"], QEMU_VM, config,
                before=ref, src_node="hosta", dst_node="hostb",
            )  # fmt: skip
            row = Row.from_qemu(q)
            result.rows.append(row)
            console.print(
                f"done: {q.total_s:.1f} s, downtime {q.downtime_ms:.0f} ms (QEMU's own figure "
                f"{q.qemu_downtime_ms} ms), {q.link_bytes / (1 << 20):.1f} MiB on the link"
            )
            _checks(console, row)
    return result


async def _dwell(console: Console, agent: AgentProc, seconds: float) -> None:
    """Let the workload run ``seconds`` on the destination, showing it is alive meanwhile."""
    status0 = await agent.api("GET", f"/v1/vms/{DEMO_VM}/guest/status")
    await asyncio.sleep(seconds)  # the demo's chosen workload time, not a synchronisation
    status1 = await agent.api("GET", f"/v1/vms/{DEMO_VM}/guest/status")
    dirtied = int(status1["pages_dirtied"]) - int(status0["pages_dirtied"])
    console.print(f"{dirtied:,} pages dirtied on hostb meanwhile ({status1['heartbeats']} heartbeats so far)")
