"""End-to-end live migration: DWCP through the agents against QEMU's own migration, same links, one run.

    python bench/migration.py [--json] [--repeats 3] [--quick] [--only TEXT] [--methods LIST]
                              [--profile default|test] [--rate PAGES_S] [--back-wait S] [--lock FILE]

Links (WAN emulator, docs/wan-emulator.md): ``100mbit`` 100 Mbit/s 50 ms RTT (the issue's goals),
``1gbit`` 1 Gbit/s 10 ms RTT, ``unshaped`` (a veth bridge, datacenter). Per link and repeat, one
emulator with three nodes, an agent on each (``novacron.testing.agents``), then:

* QEMU's own migration, QEMU to QEMU over TCP between the namespaces (no agent in the data path):
  ``qemu:plain`` precopy, ``qemu:multifd-zstd1`` and ``qemu:multifd-zstd3`` (4 channels; level 3 as
  ``-global migration.multifd-zstd-level=3``, QEMU 7.2 ignores it over QMP), ``qemu:xbzrle``
  (default 64 MiB cache). downtime-limit 300 ms; max-bandwidth unlimited (4 GiB/s): a cap at the
  link rate would only slow QEMU down (TCP already paces to the link), and "unlimited" is QEMU's best
  case. One guest hops hosta <-> hostb through the configurations.
* DWCP through the agents (``POST /v1/migrations``, mode ``auto``: the agent picks), a second guest:
  ``dwcp:cold`` hosta -> hostb (hostb holds nothing of it), ``dwcp:back`` hostb -> hosta after
  ``--back-wait`` s (60) of workload, ``dwcp:warm`` hosta -> hostc (once hostc's agent reports the
  sibling's memory indexed as baseline content), where a sibling booted from the
  same image runs (idle workload).

Columns: total time (request, or starting the destination QEMU, to QMP RESUME on the destination),
downtime (QMP STOP on the source to RESUME on the destination, host timestamps of one machine), bytes
on the link (emulator counters, both directions), ratios against QEMU's best configuration (fastest
median) of the same run and link, the issue's goals. After every migration the guest must answer
VERIFY with 0 corrupted pages, an unchanged CHECKSUM and a later heartbeat, and run exactly once; a
miss fails the row (shown, with the reason, never dropped). Medians over the successful repeats.

Each (link, repeat) takes /tmp/novacron-heavy.lock while it runs (``--lock``; '' for none): run this
command itself without flock. ``--quick``: 100mbit only, 1 repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass

from novacron.errors import NovacronError
from novacron.hypervisor.driver import StopMode
from novacron.testing import LinkSpec
from novacron.testing.agents import AgentProc, Cluster, agent_cluster, boot_vm
from novacron.testing.benchlock import DEFAULT_LOCK, heavy_lock
from novacron.testing.migration_runs import (
    GOALS,
    Row,
    Summary,
    check_via_agent,
    dwcp_migrate,
    summarize,
    with_ratios_and_goals,
)
from novacron.testing.qemu_migration import (
    QEMU_CONFIGS,
    ZSTD_DEFAULT_LEVEL,
    GuestCheck,
    NamespaceQemuDriver,
    boot_guest,
    qemu_migrate,
)

NODES = ("hosta", "hostb", "hostc")
QEMU_VM = "qg"
DWCP_VM = "g1"
SIBLING_VM = "sib"
BACK_WAIT_S = 60.0


@dataclass(frozen=True)
class Link:
    key: str
    name: str
    spec: LinkSpec | None
    backend: str


LINKS = (
    Link("100mbit", "100 Mbit/s 50 ms RTT", LinkSpec.for_rtt(50, rate_bps=100e6), "tun"),
    Link("1gbit", "1 Gbit/s 10 ms RTT", LinkSpec.for_rtt(10, rate_bps=1e9), "tun"),
    Link("unshaped", "unshaped (veth)", None, "veth"),
)
QEMU_METHODS = tuple(f"qemu:{name}" for name in QEMU_CONFIGS)
DWCP_METHODS = ("dwcp:cold", "dwcp:back", "dwcp:warm")
METHODS = QEMU_METHODS + DWCP_METHODS


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def describe(row: Row) -> str:
    if not row.ok:
        return f"{row.method}: FAILED ({'; '.join(row.problems)})"
    mib = (row.link_bytes or 0) / (1 << 20)
    path = f" [{row.mode}/{row.data_path}]" if row.mode else ""
    down = f"downtime {row.downtime_ms:.0f} ms"
    return f"{row.method}{path}: {row.total_s:.1f} s, {down}, {mib:.1f} MiB on the link"


# ------------------------------------------------------------------------------------------- QEMU


async def run_qemu(cluster: Cluster, methods: list[str], args: argparse.Namespace) -> list[Row]:
    """One guest hops hosta <-> hostb through QEMU's configurations (each destination QEMU is started
    with the zstd level its next hop sends with)."""
    configs = [QEMU_CONFIGS[m.split(":", 1)[1]] for m in methods]
    drivers = {
        n: NamespaceQemuDriver(cluster.root / "qemu" / n, namespace=cluster.wan.namespace(n))
        for n in ("hosta", "hostb")
    }
    rows: list[Row] = []
    say(f"QEMU: booting the {args.profile} guest on hosta")
    before: GuestCheck = await boot_guest(
        drivers["hosta"],
        QEMU_VM,
        args.profile,
        workload={"dirty_rate": args.rate},
        zstd_level=configs[0].zstd_level,
    )
    src, dst = "hosta", "hostb"
    for i, config in enumerate(configs):
        nxt = configs[i + 1].zstd_level if i + 1 < len(configs) else ZSTD_DEFAULT_LEVEL
        try:
            result = await qemu_migrate(
                cluster.wan, drivers[src], drivers[dst], QEMU_VM, config,
                before=before, src_node=src, dst_node=dst, next_zstd_level=nxt,
            )  # fmt: skip
        except NovacronError as exc:
            rows.append(Row.failed(f"qemu:{config.name}", f"{type(exc).__name__}: {exc}"))
            rows += [
                Row.failed(f"qemu:{c.name}", "not run: an earlier QEMU hop failed") for c in configs[i + 1 :]
            ]
            say(describe(rows[-1]))
            break
        rows.append(Row.from_qemu(result))
        say(describe(rows[-1]))
        before = result.check
        src, dst = dst, src
    for driver in drivers.values():  # free the CPU for DWCP: the guest is not needed any more
        with contextlib.suppress(NovacronError):
            if driver.is_defined(QEMU_VM):
                await driver.stop(QEMU_VM, mode=StopMode.FORCE)
    return rows


# ------------------------------------------------------------------------------------------- DWCP


async def run_dwcp(cluster: Cluster, methods: list[str], args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    a = cluster["hosta"]
    say(f"DWCP: booting the {args.profile} guest on hosta's agent")
    await boot_vm(a, DWCP_VM, profile=args.profile, dirty_rate=args.rate)
    before = await check_via_agent(a, DWCP_VM)
    at = "hosta"

    async def hop(method: str, dst: str) -> None:
        nonlocal before, at
        row, check = await dwcp_migrate(cluster, DWCP_VM, at, dst, method=method, before=before, mode="auto")
        rows.append(row)
        say(describe(row))
        if row.ok and check is not None:
            before, at = check, dst

    if "dwcp:cold" in methods or "dwcp:back" in methods:
        await hop("dwcp:cold", "hostb")
        if rows[-1].ok and "dwcp:back" in methods:
            say(f"DWCP: {args.back_wait:.0f} s of workload on hostb before migrating back")
            await asyncio.sleep(args.back_wait)  # the scenario's workload time, not synchronisation
            await hop("dwcp:back", "hosta")
        elif "dwcp:back" in methods:
            rows.append(Row.failed("dwcp:back", "not run: the cold migration failed"))
        if "dwcp:cold" not in methods:
            rows = [r for r in rows if r.method != "dwcp:cold"]
    if "dwcp:warm" in methods:
        say("DWCP: booting a sibling from the same image on hostc")
        await boot_vm(cluster["hostc"], SIBLING_VM, profile=args.profile, dirty_rate=0)
        waited = await sibling_indexed(cluster["hostc"], SIBLING_VM, args.sibling_wait)
        say(f"DWCP: hostc indexed the sibling's memory as baseline after {waited:.0f} s")
        if at == "hostc":
            rows.append(Row.failed("dwcp:warm", "not run: the guest is already on hostc"))
        else:
            await hop("dwcp:warm", "hostc")
    return rows


async def sibling_indexed(agent: AgentProc, vm: str, timeout_s: float) -> float:
    """Seconds until ``agent`` reports ``vm`` scanned into its baseline (GET /v1/node); "warm" means
    the destination already holds the sibling's content, as a host running it for a while would."""
    started = time.monotonic()
    async with asyncio.timeout(timeout_s):
        while True:
            node = await agent.api("GET", "/v1/node")
            if node.get("baseline_siblings", {}).get(vm, {}).get("scans", 0) >= 1:
                return time.monotonic() - started
            await asyncio.sleep(1.0)  # polling the agent's API for the indexer's progress


# ------------------------------------------------------------------------------------------- runs


async def run_link(link: Link, repeat: int, methods: list[str], args: argparse.Namespace) -> list[Row]:
    say(f"== {link.name}, repeat {repeat + 1}")
    nodes = NODES if "dwcp:warm" in methods else NODES[:2]
    rows: list[Row] = []
    async with agent_cluster(link.spec, nodes=nodes, backend=link.backend) as cluster:
        qemu = [m for m in methods if m.startswith("qemu:")]
        dwcp = [m for m in methods if m.startswith("dwcp:")]
        if qemu:
            rows += await run_qemu(cluster, qemu, args)
        if dwcp:
            try:
                rows += await run_dwcp(cluster, dwcp, args)
            except NovacronError as exc:
                done = {r.method for r in rows}
                rows += [Row.failed(m, f"{type(exc).__name__}: {exc}") for m in dwcp if m not in done]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per link (medians are shown)")
    parser.add_argument("--quick", action="store_true", help="100mbit only, 1 repeat")
    parser.add_argument("--only", help="run only links whose key or name contains this text")
    parser.add_argument("--methods", help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument(
        "--profile", default="default", choices=["default", "test"], help="test guest profile"
    )
    parser.add_argument("--rate", type=int, default=2250, help="pages/s the guest's workload dirties")
    parser.add_argument("--back-wait", type=float, default=BACK_WAIT_S, help="workload seconds before 'back'")
    parser.add_argument(
        "--sibling-wait", type=float, default=300, help="at most this long for hostc to index its sibling"
    )
    parser.add_argument("--lock", default=DEFAULT_LOCK, help="lock file taken around each run ('' for none)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--save", help="also write the JSON output to this file")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.only = 1, args.only or "100mbit"
    methods = list(METHODS)
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",")]
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            parser.error(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    links = [lk for lk in LINKS if not args.only or args.only in lk.key or args.only in lk.name]
    if not links:
        parser.error(f"--only {args.only!r} matches no link ({', '.join(lk.key for lk in LINKS)})")

    started = time.monotonic()
    raw: dict[str, list[Row]] = {}
    for link in links:
        for repeat in range(args.repeats):
            try:
                with heavy_lock(args.lock):
                    rows = asyncio.run(run_link(link, repeat, methods, args))
            except NovacronError as exc:  # e.g. an agent or a guest that would not start: every row fails
                say(f"{link.name} repeat {repeat + 1} failed: {type(exc).__name__}: {exc}")
                rows = [Row.failed(m, f"run failed: {type(exc).__name__}: {exc}") for m in methods]
            for row in rows:
                raw.setdefault(f"{link.key}|{row.method}", []).append(row)
    summaries = with_ratios_and_goals(
        [summarize(key.split("|")[0], key.split("|")[1], rows) for key, rows in raw.items()]
    )
    elapsed = time.monotonic() - started
    out = {
        "profile": args.profile,
        "rate": args.rate,
        "repeats": args.repeats,
        "elapsed_s": elapsed,
        "summaries": [s.as_dict() for s in summaries],
        "runs": {k: [r.as_dict() for r in v] for k, v in raw.items()},
    }
    if args.save:
        with open(args.save, "w") as f:
            json.dump(out, f, indent=2, default=str)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return
    print_table(summaries, links, args, elapsed, raw)


def print_table(
    summaries: list[Summary],
    links: list[Link],
    args: argparse.Namespace,
    elapsed: float,
    raw: dict[str, list[Row]],
) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(v: float | None, digits: int = 1, suffix: str = "") -> str:
        return "-" if v is None else f"{v:,.{digits}f}{suffix}"

    names = {lk.key: lk.name for lk in links}
    table = Table(
        title=f"live migration, {args.profile} guest at {args.rate} pages/s: medians of {args.repeats} "
        f"(ratios vs QEMU's fastest configuration on the same link; run took {elapsed / 60:.1f} min)"
    )
    for col in (
        "link",
        "method",
        "ok",
        "time s",
        "downtime ms (max)",
        "link MiB",
        "time x",
        "bytes x",
        "goals",
    ):
        table.add_column(col, justify="left" if col in ("link", "method", "goals") else "right")
    for s in summaries:
        goals = ", ".join(
            f"{text}: " + ("[green]met[/]" if met else "[red]missed[/]" if met is False else "n/a")
            for text, met in s.goals
        )
        down = f"{fmt(s.downtime_ms, 0)} ({fmt(s.downtime_max_ms, 0)})"
        table.add_row(
            names.get(s.link, s.link),
            s.method,
            f"{s.runs - s.failed}/{s.runs}",
            fmt(s.total_s),
            down,
            fmt(None if s.link_bytes is None else s.link_bytes / (1 << 20)),
            fmt(s.time_ratio, 2, "x"),
            fmt(s.bytes_ratio, 2, "x"),
            goals,
        )
    console = Console(width=max(160, Console().width))
    console.print(table)
    for s in summaries:
        for problem in dict.fromkeys(s.problems):
            console.print(f"[red]{s.link} {s.method}[/]: {problem}", highlight=False)
    for key, rows in raw.items():
        for i, row in enumerate(rows):
            if row.phases:
                spent = ", ".join(f"{phase} {sec:.1f}" for phase, sec in row.phases)
                console.print(f"{key} #{i + 1} seconds per phase: {spent}", highlight=False)
            if row.switchover:
                marks = ", ".join(f"{name} {ms:.0f}" for name, ms in row.switchover)
                console.print(f"{key} #{i + 1} ms after STOP: {marks}", highlight=False)
    judged = [met for s in summaries for _, met in s.goals if met is not None]
    console.print(f"goals met: {sum(judged)} of {len(judged)} judged ({len(GOALS)} defined)")


if __name__ == "__main__":
    main()
