"""Pieces both tunnel sides share: task supervision, a wake-up signal, stats arithmetic, unix sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any

from novacron.dwcp.encoding import PageKind
from novacron.errors import NovacronError
from novacron.migration.datapath import DataChannel, PageCounts
from novacron.migration.tunnel.errors import TunnelError
from novacron.migration.tunnel.records import pack_abort
from novacron.observability.log import log_event

MAX_SOCKET_PATH = 107  # sun_path minus its terminating NUL

_REF_KINDS = (
    PageKind.UNCHANGED,
    PageKind.SESSION_REF,
    PageKind.BATCH_DUP,
    PageKind.BASE_SAME_ADDR,
    PageKind.BASE_CONTENT,
)
_BASELINE_KINDS = (PageKind.BASE_SAME_ADDR, PageKind.BASE_CONTENT, PageKind.BASE_DELTA)

# What a task of the tunnel may fail with; anything else is a bug and propagates as such.
TASK_ERRORS = (NovacronError, OSError, EOFError, asyncio.IncompleteReadError, TimeoutError)


def page_counts(by_kind: list[int], opaque: int = 0) -> PageCounts:
    """HDE's per-kind page counts folded into the progress display's four kinds."""
    return PageCounts(
        zero=by_kind[PageKind.ZERO],
        ref=sum(by_kind[k] for k in _REF_KINDS),
        delta=by_kind[PageKind.DELTA] + by_kind[PageKind.BASE_DELTA],
        literal=by_kind[PageKind.LITERAL],
        baseline=sum(by_kind[k] for k in _BASELINE_KINDS),
        opaque=opaque,
    )


def codec_batches(totals: Mapping[Any, Any]) -> dict[str, int]:
    return {codec.name: int(t.batches) for codec, t in totals.items() if t.batches}


def socket_path(workdir: Path, name: str) -> Path:
    path = workdir / name
    if len(str(path)) > MAX_SOCKET_PATH:
        raise TunnelError("socket path too long for a unix socket", path=str(path), limit=MAX_SOCKET_PATH)
    return path


class Signal:
    """Wakes every waiter when state changed; waiters re-check their own condition (no lost wake-ups)."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float | None = None) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                fut = asyncio.get_running_loop().create_future()
                self._waiters.append(fut)
                await fut


class TaskGroup:
    """The tasks of one data path: the first failure is reported once; ``cancel`` stops them all."""

    def __init__(
        self, name: str, on_failure: Callable[[BaseException], Awaitable[None]], log: logging.Logger
    ) -> None:
        self._name = name
        self._on_failure = on_failure
        self._log = log
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None], what: str) -> asyncio.Task[None]:
        task = asyncio.create_task(self._guard(coro, what), name=f"{self._name}:{what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A task cancelled before its first step never awaits ``coro``: close it (a no-op once it ran).
        task.add_done_callback(lambda t: coro.close() if t.cancelled() else None)
        return task

    async def _guard(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        try:
            await coro
        except TASK_ERRORS as exc:
            log_event(self._log, "tunnel.task_failed", logging.WARNING, task=what, error=str(exc))
            await self._on_failure(exc)
        except Exception as exc:  # noqa: BLE001 - a bug: still fail the migration (it rolls back), never hang it
            self._log.exception("tunnel task %s crashed", what)
            await self._on_failure(exc)

    async def cancel(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, *TASK_ERRORS):
                await t


def abort_channels(channels: Iterable[DataChannel | None], reason: str) -> None:
    for ch in channels:
        if ch is not None:
            with contextlib.suppress(*TASK_ERRORS):
                ch.abort(reason)


def describe(exc: BaseException) -> str:
    if isinstance(exc, NovacronError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


PEER_REASON_WAIT_S = 1.0  # how long a failing side waits to learn (or to tell) the other side's reason


async def wait_for_peer_reason(reader: asyncio.Task[None] | None) -> None:
    """Let the task reading the peer's records finish (it raises with the peer's ABORT reason)."""
    if reader is not None and not reader.done() and reader is not asyncio.current_task():
        await asyncio.wait({reader}, timeout=PEER_REASON_WAIT_S)


async def tell_peer(channel: DataChannel | None, lock: asyncio.Lock, reason: str) -> None:
    """Best effort: send an ABORT record with our reason and wait until it is acknowledged."""
    if channel is None:
        return
    with contextlib.suppress(*TASK_ERRORS):
        async with asyncio.timeout(PEER_REASON_WAIT_S), lock:
            await channel.send_message(pack_abort(reason))
            await channel.drain()
