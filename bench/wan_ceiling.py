"""The WAN emulator's own ceiling: what it forwards with TCP, and whether TCP sees the link it was given.

For each emulated link (unlimited forwarder, unshaped veth, and the shaped links the AMST benchmark
uses) this pushes bulk TCP (kernel BBR, plain sockets, no TLS) from node a to node b with 1 and with
``--streams`` connections for ``--seconds``, ``--repeats`` times, and prints medians of:

* goodput at the receiver, and as a share of the configured rate;
* the wire rate the forwarder delivered (IP bytes, from its counters);
* the smallest RTT TCP measured (TCP_INFO min_rtt) against the configured RTT;
* the sender's retransmission ratio and the loss ratio the forwarder applied, against the configured
  loss; drops outside the model (TUN queue overflow) which must stay 0;
* CPU seconds of the forwarder per GB carried.

No benchmark should run a link above the ceiling measured here. ``--json`` prints the raw results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import asdict, dataclass
from typing import Any

from novacron.testing import LinkSpec, WanEmulator
from novacron.testing.traffic import tcp_transfer


@dataclass(frozen=True)
class Setting:
    name: str
    backend: str
    rate_bps: float | None
    rtt_ms: float
    loss: float

    def spec(self) -> LinkSpec | None:
        if self.backend == "veth":
            return None
        return LinkSpec.for_rtt(self.rtt_ms, rate_bps=self.rate_bps, loss=self.loss)


SETTINGS = [
    Setting("veth (unshaped)", "veth", None, 0, 0.0),
    Setting("forwarder, no limits", "tun", None, 0, 0.0),
    Setting("1 Gbit/s 10 ms", "tun", 1e9, 10, 0.0),
    Setting("1 Gbit/s 100 ms 0.1%", "tun", 1e9, 100, 0.001),
    Setting("100 Mbit/s 50 ms 1%", "tun", 100e6, 50, 0.01),
]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_once(setting: Setting, streams: int, seconds: float, offload: bool) -> dict[str, Any]:
    spec = setting.spec()
    with WanEmulator(["a", "b"], link=spec, backend=setting.backend, offload=offload) as wan:
        before = wan.stats_blocking()
        pid = wan.forwarder_pid
        cpu0 = cpu_seconds(pid) if pid else 0.0
        result = tcp_transfer(wan, "a", "b", seconds=seconds, streams=streams)
        cpu = cpu_seconds(pid) - cpu0 if pid else None
        after = wan.stats_blocking()
    out: dict[str, Any] = {
        "goodput_bps": result.goodput_bps,
        "min_rtt_ms": None if result.min_rtt_s is None else result.min_rtt_s * 1e3,
        "retransmit_ratio": result.retransmit_ratio,
        "drops_outside_model": after.interfaces["a"].tx_dropped - before.interfaces["a"].tx_dropped,
    }
    if after.links:
        fwd, prev = after.link("a", "b"), before.link("a", "b")
        carried = fwd.fwd_bytes - prev.fwd_bytes
        offered = fwd.offered_pkts - prev.offered_pkts
        out["wire_bps"] = carried * 8 / result.seconds
        out["applied_loss"] = (fwd.loss_pkts - prev.loss_pkts) / offered if offered else 0.0
        out["queue_drops"] = fwd.qdrop_pkts - prev.qdrop_pkts
        out["forwarder_cpu_s_per_gb"] = None if cpu is None or carried == 0 else cpu / (carried / 1e9)
    return out


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each transfer")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting (medians are printed)")
    parser.add_argument("--streams", type=int, default=4, help="connections of the multi-stream run")
    parser.add_argument("--only", help="run only settings whose name contains this text")
    parser.add_argument(
        "--no-offload",
        action="store_true",
        help="forward MTU-sized packets only (no TSO super-packets), to see what offload buys",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable results")
    args = parser.parse_args()

    results = []
    for setting in SETTINGS:
        if args.only and args.only not in setting.name:
            continue
        for streams in sorted({1, args.streams}):
            if args.no_offload and setting.backend == "veth":
                continue
            runs = [
                run_once(setting, streams, args.seconds, not args.no_offload) for _ in range(args.repeats)
            ]
            row: dict[str, Any] = {"setting": asdict(setting), "streams": streams, "runs": runs}
            for key in runs[0]:
                row[key] = median_of(runs, key)
            results.append(row)
            if not args.json:
                print(f"done: {setting.name}, {streams} stream(s)", file=sys.stderr)

    if args.json:
        meta = {"seconds": args.seconds, "repeats": args.repeats, "offload": not args.no_offload}
        print(json.dumps({**meta, "results": results}, indent=2))
        return
    print_table(results, args)


def print_table(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    def fmt(value: float | None, scale: float = 1.0, digits: int = 1, suffix: str = "") -> str:
        return "-" if value is None else f"{value / scale:.{digits}f}{suffix}"

    table = Table(
        title=f"WAN emulator ceiling (medians of {args.repeats} x {args.seconds:g} s, TCP BBR, no TLS)"
    )
    for col in (
        "link",
        "streams",
        "goodput Mbit/s",
        "of rate",
        "wire Mbit/s",
        "min RTT ms (cfg)",
        "retrans",
        "loss applied (cfg)",
        "q drops",
        "outside drops",
        "fwd CPU s/GB",
    ):
        table.add_column(col, justify="right" if col != "link" else "left")
    for row in results:
        s = row["setting"]
        share = None if s["rate_bps"] is None else row["goodput_bps"] / s["rate_bps"] * 100
        table.add_row(
            s["name"],
            str(row["streams"]),
            fmt(row["goodput_bps"], 1e6),
            fmt(share, digits=1, suffix="%"),
            fmt(row.get("wire_bps"), 1e6),
            f"{fmt(row['min_rtt_ms'], digits=3)} ({s['rtt_ms']:g})",
            fmt(row["retransmit_ratio"], 0.01, 2, "%"),
            f"{fmt(row.get('applied_loss'), 0.01, 2, '%')} ({s['loss'] * 100:g}%)",
            fmt(row.get("queue_drops"), digits=0),
            fmt(row["drops_outside_model"], digits=0),
            fmt(row.get("forwarder_cpu_s_per_gb"), digits=2),
        )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
