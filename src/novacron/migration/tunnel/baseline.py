"""Recording a migrated VM's memory into the host's baseline store, for the next migration back.

After a successful migration both sides hold the same pages in their HDE session caches (mirrored):
the last version of every page that crossed. The source records it as "this VM's memory as it left
this host", the destination as "as it arrived here"; since both copies are equal, a later migration
back can send unchanged pages as a bare reference and changed ones as a delta against that copy.
Recording hashes and stores every page (1.4-4 s of CPU for a 768 MiB guest on this project's hosts,
most of it keyed BLAKE3 and new file pages), so it runs after commit, in a worker thread: the event
loop serves the host's other migrations and its API meanwhile. The store's writers take its lock,
and a migration's cleanup awaits the recording, so the next migration of this VM sees all of it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable

from novacron.dwcp.encoding import BaselineStore, BaselineStoreError, PageBatch
from novacron.observability.log import log_event

log = logging.getLogger("novacron.migration.tunnel.baseline")


async def record_copy(store: BaselineStore, vm: str, batches: Iterable[PageBatch]) -> int:
    """Replace ``vm``'s copy in ``store`` with ``batches``; returns the pages recorded.

    The store is a cache of what crossed: a failure here is logged, never raised (the migration
    itself already succeeded). Cancelled, the thread stops after the batch it is on (a partial copy
    only means fewer references next time), and this returns (raising ``CancelledError``) only once
    it has: the batches are views of the session's cache, which the caller hands to the next session
    right after.
    """
    stop = threading.Event()
    work = asyncio.ensure_future(asyncio.to_thread(_record, store, vm, batches, stop))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait([work])  # one batch at most; a second cancel does not wait further
        raise


def _record(store: BaselineStore, vm: str, batches: Iterable[PageBatch], stop: threading.Event) -> int:
    t0 = time.monotonic()
    pages = written = 0
    try:
        store.drop_copy(vm)
        for batch in batches:
            if stop.is_set():
                break
            written += store.add_batch(vm, batch)
            pages += batch.count
        store.flush()
    except (BaselineStoreError, OSError) as exc:
        log_event(log, "baseline.record_failed", logging.WARNING, vm=vm, error=str(exc))
        return pages
    log_event(
        log,
        "baseline.recorded" if not stop.is_set() else "baseline.record_stopped",
        vm=vm,
        pages=pages,
        new_records=written,
        seconds=round(time.monotonic() - t0, 3),
    )
    return pages
