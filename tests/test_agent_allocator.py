"""The agent's C allocator settings (``novacron.agent.allocator``): buffers freed and allocated again
reuse memory instead of faulting fresh pages in (each first touch is a page fault; about 15 us a
page on this project's hosts)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Rounds of 8 live buffers of 4 MiB, written, then all freed: the shape of a migration's QEMU reads,
# records and page batches. Prints the minor faults of rounds 2..10 (round 1 faults in any case).
CHURN = """
import sys
from novacron.agent.allocator import tune_allocator
if sys.argv[1] == "tuned" and not tune_allocator():
    raise SystemExit("mallopt refused")
def minflt():
    stat = open("/proc/self/stat").read()
    return int(stat[stat.rindex(")") + 2 :].split()[7])
def round_():
    bufs = [bytes([i + 1]) * (4 << 20) for i in range(8)]
    del bufs
round_()
before = minflt()
for _ in range(9):
    round_()
print(minflt() - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, timeout=60, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc")
def test_tuned_allocator_reuses_freed_buffers_instead_of_faulting_fresh_pages() -> None:
    untuned, tuned = _faults("default"), _faults("tuned")
    pages = 9 * 8 * (4 << 20) // 4096  # what nine rounds would fault if nothing were reused
    # glibc's defaults hand the 32 MiB freed at the heap's top back to the kernel every round.
    assert untuned > pages // 2
    assert tuned < pages // 20
