"""Recording a migrated VM's copy into the baseline store (what both agents do after every migration).

    python bench/baseline_record.py [--json] [--repeat 3] [--pages 120000]

``--pages`` distinct pages (120 k is the non-zero memory of the ``default`` guest, 470 MiB), in the
1,024-page batches a session cache hands out, recorded with ``record_copy`` into a fresh store in a
fresh temporary directory: ``first`` (every page new to the store), then ``again`` (the same content,
as after a migration back: nothing new is written). The process takes the agent's allocator settings
(``novacron.agent.allocator``) first. Columns: wall seconds, CPU seconds of the whole process (the
recording runs in a worker thread), and pages per CPU second; medians of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

from novacron.agent.allocator import tune_allocator
from novacron.dwcp.encoding import BaselineStore, DefaultPageHasher, PageBatch
from novacron.dwcp.encoding.limits import PAGE_SIZE
from novacron.migration.tunnel.baseline import record_copy

BATCH = 1024


def make_pages(n: int) -> npt.NDArray[np.uint8]:
    """Distinct, compressible-looking pages (random head, zero tail)."""
    pages = np.zeros((n, PAGE_SIZE), dtype=np.uint8)
    pages[:, :256] = np.random.default_rng(1).integers(0, 256, (n, 256), dtype=np.uint8)
    return pages


def batches(pages: npt.NDArray[np.uint8]) -> Iterator[PageBatch]:
    index = np.arange(pages.shape[0], dtype=np.uint64)
    for start in range(0, pages.shape[0], BATCH):
        sel = slice(start, start + BATCH)
        yield PageBatch("pc.ram", index[sel] * np.uint64(PAGE_SIZE), pages[sel].tobytes())


def one_run(pages: npt.NDArray[np.uint8]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="nvbr") as tmp:
        store = BaselineStore(Path(tmp), DefaultPageHasher(b"k" * 32))
        try:
            for case in ("first", "again"):
                t0, c0 = time.perf_counter(), time.process_time()
                n = asyncio.run(record_copy(store, "vm", batches(pages)))
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                if n != pages.shape[0]:
                    raise SystemExit(f"{case}: recorded {n} of {pages.shape[0]} pages")
                out[case] = {"wall_s": wall, "cpu_s": cpu, "pages_per_cpu_s": n / cpu if cpu else 0.0}
        finally:
            store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs (medians are shown)")
    parser.add_argument("--pages", type=int, default=120_000, help="distinct pages recorded")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.repeat < 1 or not 1 <= args.pages <= 4_000_000:
        parser.error("--repeat must be >= 1 and --pages in 1..4000000")
    tune_allocator()
    pages = make_pages(args.pages)
    runs = [one_run(pages) for _ in range(args.repeat)]
    result = {
        case: {k: statistics.median(r[case][k] for r in runs) for k in runs[0][case]}
        for case in ("first", "again")
    }
    if args.json:
        print(json.dumps({"pages": args.pages, "repeat": args.repeat, "medians": result, "runs": runs}))
        return
    mib = args.pages * PAGE_SIZE / 2**20
    print(f"recording {args.pages:,} pages ({mib:.0f} MiB), medians of {args.repeat}")
    print(f"{'case':8} {'wall s':>8} {'CPU s':>8} {'pages/CPU s':>12}")
    for case, m in result.items():
        print(f"{case:8} {m['wall_s']:8.2f} {m['cpu_s']:8.2f} {m['pages_per_cpu_s']:12,.0f}")


if __name__ == "__main__":
    main()
