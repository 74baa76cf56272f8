"""The C allocator's settings for the agent process (glibc's ``mallopt``).

A migration moves hundreds of MiB through short-lived buffers of 128 KiB to a few MiB: QEMU reads,
records, page batches and their copies. With glibc's defaults such buffers are mapped fresh from the
kernel and unmapped on free (the mmap threshold adapts only up to the largest block freed so far),
and the heap's free top is handed back to the kernel above 128 KiB; either way the next buffer is
fresh memory again, and every 4 KiB page of it costs a page fault on first touch. Measured on this
project's 2-core TCG host over a 100 Mbit/s tunnelled migration of the 768 MiB guest: 390 k minor
faults per agent, 110-120 k with the settings below (the rest: first use of the session cache, the
zstd windows and the heap's growth). The benchmark's migration times moved within their spread
(docs/migration.md, "Sixth run").

Blocks up to ``MMAP_THRESHOLD`` therefore come from the heap, and at most ``TRIM_THRESHOLD`` of free
heap top is kept for reuse before it goes back to the kernel: a bounded amount of memory held in
exchange for not faulting it in again. On a C library without ``mallopt`` nothing changes.
"""

from __future__ import annotations

import ctypes
import logging

from novacron.observability.log import log_event

log = logging.getLogger("novacron.agent.allocator")

# glibc's malloc.h parameter numbers
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its adaptive threshold on 64-bit hosts
TRIM_THRESHOLD = 128 << 20


def tune_allocator(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Apply the settings; returns whether the C library took them."""
    try:
        # The symbols already loaded in this process (its C library among them): no library search,
        # which on Linux would run ldconfig in a subprocess at every agent start.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log_event(log, "allocator.untuned", reason="no mallopt in the C library")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
    log_event(
        log,
        "allocator.tuned" if ok else "allocator.untuned",
        mmap_threshold=mmap_threshold,
        trim_threshold=trim_threshold,
    )
    return ok
