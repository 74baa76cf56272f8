"""The demo's side-by-side summary: each migration's time, downtime and bytes on the link, against
QEMU's own best migration over the same link, and whether the guest came through intact."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from novacron.demo.settings import DemoSettings
from novacron.testing.migration_runs import Row

LABELS = {
    "dwcp:out": "DWCP hosta -> hostb (cold)",
    "dwcp:back": "DWCP hostb -> hosta (back)",
    "qemu:multifd-zstd3": "QEMU multifd x4 + zstd-3",
}


@dataclass
class DemoResult:
    settings: DemoSettings
    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    def qemu(self) -> Row | None:
        return next((r for r in self.rows if r.method.startswith("qemu:") and r.ok), None)

    def ratios(self, row: Row) -> tuple[float | None, float | None]:
        """(time, bytes) of ``row`` as a multiple of QEMU's (None without a successful QEMU row)."""
        q = self.qemu()
        if q is None or not row.ok:
            return None, None
        t = row.total_s / q.total_s if row.total_s and q.total_s else None
        b = row.link_bytes / q.link_bytes if row.link_bytes is not None and q.link_bytes else None
        return t, b


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def summary_table(result: DemoResult) -> Table:
    s = result.settings
    table = Table(
        title=f"summary: {s.profile} guest, workload {s.rate} pages/s, link {s.link.label}, "
        f"downtime limit {s.max_downtime_ms} ms"
    )
    for col in (
        "migration",
        "path",
        "time",
        "downtime",
        "on the link",
        "time vs QEMU",
        "bytes vs QEMU",
        "guest",
    ):
        table.add_column(col, justify="left" if col in ("migration", "path", "guest") else "right")
    for row in result.rows:
        t, b = result.ratios(row)
        path = f"{row.mode}/{row.data_path}" if row.mode else "QEMU to QEMU (TCP)"
        down = "-" if row.downtime_ms is None else f"{row.downtime_ms:.0f} ms"
        if row.downtime_ms is not None and row.max_downtime_ms and row.downtime_ms > row.max_downtime_ms:
            down = f"[red]{down}[/]"
        table.add_row(
            LABELS.get(row.method, row.method),
            path,
            "-" if row.total_s is None else f"{row.total_s:.1f} s",
            down,
            "-" if row.link_bytes is None else f"{row.link_bytes / (1 << 20):.1f} MiB",
            _x(t),
            _x(b),
            "[green]intact[/]" if row.ok else "[bold red]FAILED[/]",
        )
    return table


def print_summary(result: DemoResult, console: Console) -> None:
    console.print(summary_table(result))
    out = next((r for r in result.rows if r.method == "dwcp:out" and r.ok), None)
    back = next((r for r in result.rows if r.method == "dwcp:back" and r.ok), None)
    if out and back and out.link_bytes and back.link_bytes is not None:
        console.print(
            f"baseline saving: the way back carried {back.link_bytes / (1 << 20):.1f} MiB against "
            f"{out.link_bytes / (1 << 20):.1f} MiB out ({back.link_bytes / out.link_bytes:.2f}x)"
        )
    for row in result.rows:
        for problem in row.problems:
            console.print(f"[red]{LABELS.get(row.method, row.method)}[/]: {problem}", highlight=False)
