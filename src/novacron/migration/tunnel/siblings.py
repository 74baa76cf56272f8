"""Local siblings as HDE baseline: the memory of VMs this host runs, indexed into its baseline store.

A VM migrating here from another host often shares most of its memory with a VM already running here
that was booted from the same image (kernel, initramfs, libraries, the image's data). Once that
sibling's pages are in the host's ``BaselineStore`` as address-less content, the summary the
destination sends in READY lists their fingerprints and the source sends such pages as BASE_CONTENT
references (24 bytes instead of a compressed page).

**How the memory is read.** The QEMU driver backs the guest RAM of PC machines with a shared memfd
(``-object memory-backend-memfd,id=pc.ram,share=on``; the RAM block keeps QEMU's default name, so the
migration stream is unchanged). As root (or QEMU's user) the agent opens that memfd through
``/proc/<pid>/fd/<n>`` read-only and reads it with ``preadv`` into one reusable buffer of
``read_bytes``. That is the cheapest way there is: no QEMU command, no pause, no copy of the guest into
a file; holes (memory the guest never touched) read as zeros without being allocated, and the
guest keeps running. ``pmemsave`` would stop QEMU's main loop for the whole dump and write a file of
the guest's size; ``/proc/<pid>/mem`` needs the RAM's host address, which QEMU does not report.

**When.** Off the migration's critical path: a background task looks at the running VMs every
``discover_s``, scans each (once it has run ``min_uptime_s``) chunk by chunk in a worker thread,
pacing itself to ``cpu_fraction`` of one core, and pauses while any migration runs on this host
(``busy``). The first scan of a VM stores its non-zero pages; later
scans (every ``refresh_s``) store only pages that changed since the scan before and then stayed the
same for a whole interval, so the store grows with the VMs' stable content, not their working sets
(a page rewritten every second would add a record per scan, and no incoming VM would share it).
Per scan at most ``max_new_pages_per_scan`` records are added. Memory: the buffer, plus 16 bytes per
page of each sibling (its last two fingerprints per page), about 0.4 % of the sibling's RAM.

``SiblingTracker`` is the pure decision (which pages of a chunk to store); ``SiblingIndexer`` runs it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from novacron.dwcp.encoding import BaselineStore, BaselineStoreError
from novacron.dwcp.encoding.limits import PAGE_SIZE
from novacron.errors import NovacronError, UserError
from novacron.hypervisor import QemuDriver, VMState
from novacron.observability.log import log_event
from novacron.store.inventory import Inventory

log = logging.getLogger("novacron.migration.tunnel.siblings")

MiB = 1 << 20
MEMFD_LINK_PREFIX = "/memfd:memory-backend-memfd"  # what QEMU names a memory-backend-memfd's file

U64Array = npt.NDArray[np.uint64]
BoolArray = npt.NDArray[np.bool_]


class SiblingConfigError(UserError):
    """A sibling-indexer limit is out of range."""


class SiblingReadError(NovacronError):
    """A sibling's memory cannot be read (QEMU gone, no shared memfd, permission)."""


@dataclass(frozen=True)
class SiblingLimits:
    read_bytes: int = 8 * MiB  # one read of a sibling's memory (the only buffer)
    cpu_fraction: float = 0.25  # of one core, averaged over a scan (the rest waits between chunks)
    refresh_s: float = 300.0  # between scans of the same VM
    discover_s: float = 10.0  # how often the list of running VMs is looked at (new VMs, stopped ones)
    min_uptime_s: float = 20.0  # a VM is first scanned once it has run this long (boot settled)
    idle_poll_s: float = 1.0  # how often a paused scan checks whether the migration is over
    max_new_pages_per_scan: int = 1 << 18  # records added by one scan of one VM (1 GiB)
    max_vm_bytes: int = 64 << 30  # larger siblings are not indexed (tracker memory: 16 B per page)
    max_siblings: int = 64  # VMs tracked at once

    def __post_init__(self) -> None:
        if self.read_bytes < PAGE_SIZE or self.read_bytes % PAGE_SIZE:
            raise SiblingConfigError("read_bytes must be a positive multiple of 4096", value=self.read_bytes)
        if not 0 < self.cpu_fraction <= 1:
            raise SiblingConfigError("cpu_fraction must be in (0, 1]", value=self.cpu_fraction)
        if min(self.refresh_s, self.idle_poll_s, self.discover_s) <= 0 or self.min_uptime_s < 0:
            raise SiblingConfigError("refresh_s, discover_s and idle_poll_s must be positive")
        if self.max_new_pages_per_scan < 1 or self.max_vm_bytes < PAGE_SIZE or self.max_siblings < 1:
            raise SiblingConfigError("sibling limits must be positive")


@dataclass(frozen=True)
class SiblingVM:
    """A running VM whose memory can serve as baseline: its name, QEMU pid and image profile."""

    name: str
    pid: int
    profile: str | None = None
    started_at: float | None = None  # wall clock (time.time()) of the QEMU start, if known


# ------------------------------------------------------------------------------------- pure decision


class SiblingTracker:
    """What one sibling's scans have seen: per page the fingerprint of the previous scan and the one
    last stored. Decides which pages of a chunk go to the store (see the module docstring)."""

    ZERO = np.uint64(0)  # stands for "zero page" (an XXH3-64 of 0 for real content costs a miss only)

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.scans = 0  # completed scans
        self._seen = np.zeros(pages, dtype=np.uint64)  # fingerprint at the previous scan
        self._stored = np.zeros(pages, dtype=np.uint64)  # fingerprint last handed to the store

    def choose(self, first: int, fps: U64Array, nonzero: BoolArray, budget: int) -> BoolArray:
        """Rows of the chunk starting at page ``first`` to store, at most ``budget`` of them; updates
        what the tracker saw (call :meth:`stored` with the rows actually stored)."""
        end = first + fps.shape[0]
        if first < 0 or end > self.pages:
            raise SiblingConfigError("chunk outside the sibling's memory", first=first, pages=fps.shape[0])
        fps = np.where(nonzero, fps, self.ZERO)
        new = nonzero & (fps != self._stored[first:end])
        if self.scans > 0:
            new &= fps == self._seen[first:end]  # stable for a whole interval
        self._seen[first:end] = fps
        rows = np.flatnonzero(new)
        if rows.shape[0] > budget:
            new[rows[max(budget, 0) :]] = False
        return np.asarray(new)

    def stored(self, first: int, fps: U64Array, rows: BoolArray) -> None:
        self._stored[first : first + fps.shape[0]][rows] = fps[rows]

    def scan_done(self) -> None:
        self.scans += 1


# ------------------------------------------------------------------------------------- reading memory


def find_guest_ram(pid: int) -> Path | None:
    """``/proc/<pid>/fd/<n>`` of QEMU's shared RAM memfd, None when it has none (or is gone)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return None
    for entry in entries:
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith(MEMFD_LINK_PREFIX):
            return entry
    return None


class GuestRam:
    """Read-only access to a running guest's RAM memfd, one bounded buffer."""

    def __init__(self, vm: SiblingVM, read_bytes: int) -> None:
        path = find_guest_ram(vm.pid)
        if path is None:
            raise SiblingReadError("the VM's QEMU has no shared RAM memfd", vm=vm.name, pid=vm.pid)
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SiblingReadError("cannot open the VM's RAM", vm=vm.name, reason=exc.strerror) from None
        self.size = os.fstat(self._fd).st_size
        self.vm = vm.name
        self._buf = np.empty((read_bytes // PAGE_SIZE, PAGE_SIZE), dtype=np.uint8)

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    def read(self, first_page: int) -> npt.NDArray[np.uint8]:
        """Pages from ``first_page`` on (a view of the shared buffer, valid until the next read)."""
        count = min(self._buf.shape[0], self.pages - first_page)
        view = self._buf[:count]
        try:
            got = os.preadv(self._fd, [view.data.cast("B")], first_page * PAGE_SIZE)
        except OSError as exc:
            raise SiblingReadError("reading the VM's RAM failed", vm=self.vm, reason=exc.strerror) from None
        return view[: got // PAGE_SIZE]

    def close(self) -> None:
        os.close(self._fd)


# ------------------------------------------------------------------------------------- the service


@dataclass
class SiblingStats:
    scans: int = 0
    pages_read: int = 0
    pages_stored: int = 0
    records_written: int = 0
    cpu_s: float = 0.0
    last_scan_at: float = 0.0
    profile: str | None = None
    error: str | None = None


@dataclass
class _Entry:
    tracker: SiblingTracker
    stats: SiblingStats
    pid: int
    next_scan_at: float = 0.0


@dataclass
class SiblingIndexer:
    """Indexes the memory of this host's running VMs into ``store`` in the background.

    ``candidates()`` lists the VMs that may serve (the agent: its running VMs with an image profile);
    ``busy()`` is true while a migration runs here (scanning waits). :meth:`run` loops until
    cancelled; :meth:`scan` scans one VM once (tests and the first scan call it directly).
    """

    store: BaselineStore
    candidates: Callable[[], Awaitable[list[SiblingVM]]]
    busy: Callable[[], bool] = lambda: False
    limits: SiblingLimits = field(default_factory=SiblingLimits)
    _entries: dict[str, _Entry] = field(default_factory=dict, init=False)
    _round: asyncio.Condition = field(default_factory=asyncio.Condition, init=False)
    rounds: int = field(default=0, init=False)

    def stats(self) -> dict[str, SiblingStats]:
        return {name: e.stats for name, e in self._entries.items()}

    async def run(self) -> None:
        while True:
            await self.run_once()
            await asyncio.sleep(self.limits.discover_s)  # a schedule, not a synchronisation

    async def run_once(self) -> None:
        """Scan every candidate that is due; forget VMs that stopped."""
        vms = await self.candidates()
        alive = {vm.name for vm in vms}
        for name in [n for n in self._entries if n not in alive]:
            del self._entries[name]
        for vm in vms[: self.limits.max_siblings]:
            entry = self._entries.get(vm.name)
            if entry is not None and entry.next_scan_at > time.monotonic() and entry.pid == vm.pid:
                continue
            if vm.started_at is not None and time.time() - vm.started_at < self.limits.min_uptime_s:
                continue  # still booting: its memory is about to change anyway
            try:
                await self.scan(vm)
            except (SiblingReadError, BaselineStoreError, OSError) as exc:
                log_event(log, "siblings.scan_failed", logging.WARNING, vm=vm.name, error=str(exc))
        async with self._round:
            self.rounds += 1
            self._round.notify_all()

    async def wait_rounds(self, rounds: int, timeout_s: float) -> None:
        """Until :meth:`run_once` completed ``rounds`` times in total."""
        async with asyncio.timeout(timeout_s), self._round:
            await self._round.wait_for(lambda: self.rounds >= rounds)

    async def scan(self, vm: SiblingVM) -> SiblingStats:
        """Read ``vm``'s memory once and add what qualifies to the store (paced, paused while busy)."""
        ram = await asyncio.to_thread(GuestRam, vm, self.limits.read_bytes)
        try:
            if ram.size > self.limits.max_vm_bytes:
                raise SiblingReadError("sibling larger than max_vm_bytes", vm=vm.name, size=ram.size)
            entry = self._entries.get(vm.name)
            if entry is None or entry.pid != vm.pid or entry.tracker.pages != ram.pages:
                entry = _Entry(SiblingTracker(ram.pages), SiblingStats(profile=vm.profile), vm.pid)
                self._entries[vm.name] = entry
            budget = self.limits.max_new_pages_per_scan
            first = 0
            while first < ram.pages:
                # Polled: the migration service offers no "idle" event to wait for.
                while self.busy():  # noqa: ASYNC110
                    await asyncio.sleep(self.limits.idle_poll_s)
                cpu, stored, count = await asyncio.to_thread(self._chunk, ram, entry, first, budget)
                budget -= stored
                first += max(count, 1)
                # Pace to cpu_fraction of a core: wait as long as the chunk's CPU time asks.
                await asyncio.sleep(cpu * (1 / self.limits.cpu_fraction - 1))
            entry.tracker.scan_done()
            entry.stats.scans += 1
            entry.stats.last_scan_at = time.time()
            entry.next_scan_at = time.monotonic() + self.limits.refresh_s
            await asyncio.to_thread(self.store.flush)
        finally:
            ram.close()
        log_event(
            log,
            "siblings.scanned",
            vm=vm.name,
            scans=entry.stats.scans,
            pages_stored=entry.stats.pages_stored,
            records=entry.stats.records_written,
            cpu_s=round(entry.stats.cpu_s, 2),
        )
        return entry.stats

    def _chunk(self, ram: GuestRam, entry: _Entry, first: int, budget: int) -> tuple[float, int, int]:
        t0 = time.thread_time()
        pages = ram.read(first)
        count = pages.shape[0]
        stored = 0
        if count:
            nonzero: BoolArray = np.asarray(pages.view(np.uint64).any(axis=1))
            fps = np.zeros(count, dtype=np.uint64)
            if nonzero.any():
                fps[nonzero] = self.store.hasher.fingerprints(pages[nonzero])
            rows = entry.tracker.choose(first, fps, nonzero, budget)
            # Content the store already holds (by fingerprint) needs no tag: skip it cheaply.
            held = rows.copy()
            held[rows] = self.store.holds_fingerprints(fps[rows])
            todo = rows & ~held
            if todo.any():
                entry.stats.records_written += self.store.add_content(pages[todo], fps[todo])
            entry.tracker.stored(first, fps, rows)
            stored = int(rows.sum())
            entry.stats.pages_read += count
            entry.stats.pages_stored += stored
        cpu = time.thread_time() - t0
        entry.stats.cpu_s += cpu
        return cpu, stored, count


def host_siblings(
    driver: QemuDriver, inventory: Inventory, node: str
) -> Callable[[], Awaitable[list[SiblingVM]]]:
    """The agent's candidates: VMs running here whose record (this node's) names an image profile."""

    async def candidates() -> list[SiblingVM]:
        out: list[SiblingVM] = []
        for name in driver.defined():
            try:
                status = await driver.status(name)
                record = await inventory.find(name)
            except NovacronError:
                continue
            if status.state is not VMState.RUNNING or status.pid is None:
                continue
            if record is None or record.node != node or record.image_profile is None:
                continue
            out.append(SiblingVM(name, status.pid, record.image_profile, status.started_at))
        return out

    return candidates
