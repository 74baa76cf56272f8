"""Recording a migrated VM's memory into the host's baseline store, for the next migration back.

After a successful migration both sides hold the same pages in their HDE session caches (mirrored):
the last version of every page that crossed. The source records it as "this VM's memory as it left
this host", the destination as "as it arrived here"; since both copies are equal, a later migration
back can send unchanged pages as a bare reference and changed ones as a delta against that copy.
Recording hashes and stores every page, so it runs after commit in small slices that let the event
loop serve other work between them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from novacron.dwcp.encoding import BaselineStore, BaselineStoreError, PageBatch
from novacron.observability.log import log_event

log = logging.getLogger("novacron.migration.tunnel.baseline")


async def record_copy(store: BaselineStore, vm: str, batches: Iterable[PageBatch]) -> int:
    """Replace ``vm``'s copy in ``store`` with ``batches``; returns the pages recorded.

    The store is a cache of what crossed: a failure here is logged, never raised (the migration
    itself already succeeded).
    """
    t0 = time.monotonic()
    pages = written = 0
    try:
        store.drop_copy(vm)
        for batch in batches:
            written += store.add_batch(vm, batch)
            pages += batch.count
            await asyncio.sleep(0)  # yield between slices: other migrations share this loop
        store.flush()
    except (BaselineStoreError, OSError) as exc:
        log_event(log, "baseline.record_failed", logging.WARNING, vm=vm, error=str(exc))
        return pages
    log_event(
        log,
        "baseline.recorded",
        vm=vm,
        pages=pages,
        new_records=written,
        seconds=round(time.monotonic() - t0, 3),
    )
    return pages
