"""asyncio client of the guest control channel: QEMU exposes the guest's ttyS1 as a unix socket.

Requests carry ids; a reader task matches replies to waiting calls, so a late reply to a call that
timed out is recognised and dropped. :meth:`GuestControl.reconnect` moves the client to another socket
(after a live migration the guest answers on the destination QEMU's socket).
QEMU's socket chardev serves one client at a time: a second client waits until the first leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from novacron.errors import NovacronError
from novacron.guest.protocol import MAX_REPLY_BYTES, ProtocolViolation, Reply, encode_request, parse_reply
from novacron.observability.log import log_event

log = logging.getLogger("novacron.guest.control")


@dataclass(frozen=True)
class GuestControlLimits:
    connect_timeout_s: float = 5.0
    call_timeout_s: float = 10.0  # VERIFY/CHECKSUM of the default profile take ~1-3 s under TCG
    max_pending: int = 64


class GuestControlError(NovacronError):
    """The control channel failed (cannot connect, timeout, connection lost, garbled reply)."""


class GuestCommandError(GuestControlError):
    """The guest refused a command (ERR reply)."""


@dataclass(frozen=True)
class DirtyAck:
    rate: int
    bytes_per_page: int
    rewrite_rate: int


@dataclass(frozen=True)
class VerifyResult:
    corrupted: int
    pages: int
    retries: int
    elapsed_ms: int

    @property
    def ok(self) -> bool:
        return self.corrupted == 0


@dataclass(frozen=True)
class ChecksumResult:
    checksum: str
    bytes: int
    files: int
    elapsed_ms: int


@dataclass(frozen=True)
class GuestStatus:
    uptime_s: float
    heartbeats: int
    requested_rate: int
    bytes_per_page: int
    rewrite_rate: int
    achieved_rate: float  # pages/s over the guest's last one-second window
    pages_dirtied: int
    pages_rewritten: int
    ticks: int  # ping-pong round trips (address-space switches)
    ws_pages: int
    data_mib: int
    data_bytes: int
    ready_ms: int  # guest uptime when READY was printed


class GuestControl:
    def __init__(
        self, socket_path: Path, *, vm: str | None = None, limits: GuestControlLimits | None = None
    ) -> None:
        self.socket_path = socket_path
        self.vm = vm
        self.limits = limits or GuestControlLimits()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self._ids = itertools.count(1)
        self._send_lock = asyncio.Lock()

    async def __aenter__(self) -> GuestControl:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _error(self, message: str, **ctx: object) -> GuestControlError:
        return GuestControlError(message, vm=self.vm, socket=str(self.socket_path), **ctx)

    async def connect(self) -> None:
        if self._writer is not None:
            return
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.socket_path), limit=MAX_REPLY_BYTES * 4),
                self.limits.connect_timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            raise self._error(
                "cannot connect to the guest control channel", reason=str(exc) or "timeout"
            ) from None
        self._reader_task = asyncio.create_task(self._read_loop(), name=f"guest-control-{self.vm}")

    async def reconnect(self, socket_path: Path | None = None) -> None:
        """Close the current connection and connect again (to ``socket_path`` if given)."""
        await self.close()
        if socket_path is not None:
            self.socket_path = socket_path
        await self.connect()

    async def close(self) -> None:
        task, self._reader_task = self._reader_task, None
        writer, self._writer = self._writer, None
        self._reader = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        self._fail_pending(self._error("control connection closed"))

    def _fail_pending(self, exc: GuestControlError) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    async def _read_loop(self) -> None:
        reader = self._reader
        if reader is None:
            return
        try:
            while True:
                try:
                    raw = await reader.readline()
                except ValueError:  # a line longer than the stream limit: skip it
                    log_event(log, "guest.control.oversized_line", logging.WARNING, vm=self.vm)
                    continue
                if not raw:
                    self._fail_pending(self._error("guest control channel closed by QEMU"))
                    return
                line = raw.decode("ascii", "replace").strip()
                if not line:
                    continue
                try:
                    reply = parse_reply(line)
                except ProtocolViolation:
                    log_event(log, "guest.control.garbage", logging.DEBUG, vm=self.vm, line=line[:80])
                    continue
                fut = self._pending.pop(reply.request_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(reply)
                elif reply.request_id == "-":
                    log_event(log, "guest.control.error", logging.WARNING, vm=self.vm, text=reply.text)
        except OSError as exc:
            self._fail_pending(self._error("guest control channel failed", reason=str(exc)))

    async def call(self, command: str, *args: int | str, timeout_s: float | None = None) -> Reply:
        """Send one command and wait for its reply; raises GuestCommandError on an ERR reply."""
        if self._writer is None:
            await self.connect()
        writer = self._writer
        if writer is None:
            raise self._error("not connected")
        if len(self._pending) >= self.limits.max_pending:
            raise self._error("too many pending guest commands", limit=self.limits.max_pending)
        request_id = f"r{next(self._ids)}"
        line = encode_request(request_id, command, *args)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = fut
        timeout = timeout_s if timeout_s is not None else self.limits.call_timeout_s
        try:
            async with self._send_lock:
                writer.write(line)
                await writer.drain()
            reply = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise self._error("guest did not answer in time", command=command, timeout_s=timeout) from None
        except OSError as exc:
            raise self._error("cannot send to the guest", command=command, reason=str(exc)) from None
        finally:
            self._pending.pop(request_id, None)
        if not reply.ok:
            raise GuestCommandError(
                "guest refused the command", vm=self.vm, command=command, reply=reply.text
            )
        return reply

    # ----- typed commands -----

    def _int(self, reply: Reply, key: str) -> int:
        try:
            return int(reply.fields[key])
        except (KeyError, ValueError):
            raise self._error("malformed guest reply", field=key, reply=reply.text) from None

    def _float(self, reply: Reply, key: str) -> float:
        try:
            return float(reply.fields[key])
        except (KeyError, ValueError):
            raise self._error("malformed guest reply", field=key, reply=reply.text) from None

    async def ping(self, timeout_s: float | None = None) -> None:
        await self.call("PING", timeout_s=timeout_s)

    async def dirty(self, rate: int, bytes_per_page: int, rewrite_rate: int | None = None) -> DirtyAck:
        args: list[int] = [rate, bytes_per_page] + ([rewrite_rate] if rewrite_rate is not None else [])
        r = await self.call("DIRTY", *args)
        return DirtyAck(self._int(r, "rate"), self._int(r, "bytes"), self._int(r, "rewrite"))

    async def stop_dirtying(self) -> None:
        await self.call("STOP")

    async def verify(self, timeout_s: float | None = None) -> VerifyResult:
        r = await self.call("VERIFY", timeout_s=timeout_s)
        return VerifyResult(
            self._int(r, "corrupted"), self._int(r, "pages"), self._int(r, "retries"), self._int(r, "ms")
        )

    async def checksum(self, timeout_s: float | None = None) -> ChecksumResult:
        r = await self.call("CHECKSUM", timeout_s=timeout_s)
        return ChecksumResult(
            r.fields.get("checksum", ""), self._int(r, "bytes"), self._int(r, "files"), self._int(r, "ms")
        )

    async def status(self) -> GuestStatus:
        r = await self.call("STATUS")
        return GuestStatus(
            uptime_s=self._float(r, "uptime"),
            heartbeats=self._int(r, "heartbeats"),
            requested_rate=self._int(r, "rate"),
            bytes_per_page=self._int(r, "bytes"),
            rewrite_rate=self._int(r, "rewrite"),
            achieved_rate=self._float(r, "achieved"),
            pages_dirtied=self._int(r, "dirtied"),
            pages_rewritten=self._int(r, "rewritten"),
            ticks=self._int(r, "ticks"),
            ws_pages=self._int(r, "ws_pages"),
            data_mib=self._int(r, "data_mib"),
            data_bytes=self._int(r, "data_bytes"),
            ready_ms=self._int(r, "ready_ms"),
        )
