"""The orchestrators' conversation over the ``migration-control`` channel.

A :class:`ControlChannel` wraps one transport channel (anything shaped like
:class:`~novacron.migration.datapath.DataChannel`): a reader task decodes messages into a bounded
inbox, so an orchestrator can wait for "the next message or a QEMU event or a timeout" without
owning the read side. When the channel breaks (EOF, transport failure, a malformed message) every
waiter learns it as :class:`PeerLost` with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable
from typing import TypeVar

from novacron.errors import NovacronError
from novacron.migration.datapath import DataChannel
from novacron.migration.errors import ControlProtocolError, MigrationTimeout, PeerLost
from novacron.migration.messages import Abort, Message, decode, encode
from novacron.observability.log import log_event

log = logging.getLogger("novacron.migration.control")

MAX_INBOX = 64  # messages decoded but not yet taken; the peer sends a handful per migration
SEND_TIMEOUT_S = 30.0

M = TypeVar("M", bound=Message)


async def call_maybe_async(fn: Callable[..., object], *args: object) -> None:
    """AMST's channel close/abort are plain calls, the DataChannel Protocol's are coroutines: both."""
    result = fn(*args)
    if inspect.isawaitable(result):
        await result


class ControlChannel:
    def __init__(self, channel: DataChannel, *, vm: str, peer: str, migration_id: str) -> None:
        self.channel = channel
        self.vm = vm
        self.peer = peer
        self.migration_id = migration_id
        self.phase = "prepare"  # for error context; the orchestrator keeps it current
        self._inbox: asyncio.Queue[Message] = asyncio.Queue(MAX_INBOX)
        self._lost: str | None = None
        self._lost_event = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self.aborted: Abort | None = None  # the peer's ABORT, once received

    def start(self) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_loop(), name=f"control-{self.migration_id}")

    @property
    def lost(self) -> bool:
        return self._lost is not None

    @property
    def lost_reason(self) -> str | None:
        return self._lost

    async def wait_lost(self) -> None:
        await self._lost_event.wait()

    def _ctx(self) -> dict[str, str]:
        return {"vm": self.vm, "peer": self.peer, "phase": self.phase, "migration": self.migration_id}

    def _mark_lost(self, reason: str) -> None:
        if self._lost is None:
            self._lost = reason
            self._lost_event.set()
            log_event(log, "migration.control_lost", logging.WARNING, reason=reason, **self._ctx())

    async def _read_loop(self) -> None:
        try:
            while True:
                raw = await self.channel.recv_message()
                if raw is None:
                    self._mark_lost("the peer closed the control channel")
                    return
                message = decode(raw)
                if message.migration_id != self.migration_id:
                    raise ControlProtocolError(
                        "control message for another migration", got=message.migration_id, **self._ctx()
                    )
                if isinstance(message, Abort):
                    self.aborted = message
                if self._inbox.full():
                    raise ControlProtocolError(
                        "peer flooded the control channel", limit=MAX_INBOX, **self._ctx()
                    )
                self._inbox.put_nowait(message)
        except ControlProtocolError as exc:
            self._mark_lost(str(exc))
            with contextlib.suppress(NovacronError, OSError):
                await call_maybe_async(self.channel.abort, exc.message)
        except (NovacronError, OSError, EOFError) as exc:
            self._mark_lost(str(exc) or type(exc).__name__)

    async def send(self, message: Message) -> None:
        if self._lost is not None:
            raise PeerLost("control channel to the peer is gone", reason=self._lost, **self._ctx())
        try:
            await asyncio.wait_for(self.channel.send_message(encode(message)), SEND_TIMEOUT_S)
        except TimeoutError:
            self._mark_lost(f"sending {message.TYPE} took over {SEND_TIMEOUT_S:g} s")
            raise PeerLost("control channel stalled", reason=self._lost, **self._ctx()) from None
        except (NovacronError, OSError) as exc:
            if isinstance(exc, ControlProtocolError):
                raise
            self._mark_lost(str(exc) or type(exc).__name__)
            raise PeerLost("control channel to the peer broke", reason=self._lost, **self._ctx()) from None

    async def try_send(self, message: Message) -> bool:
        """Send if possible (rollback paths); False if the channel is gone."""
        try:
            await self.send(message)
        except (PeerLost, ControlProtocolError):
            return False
        return True

    async def recv(self, timeout_s: float) -> Message:
        """The next message; PeerLost when the channel is gone, MigrationTimeout after ``timeout_s``."""
        if not self._inbox.empty():
            return self._inbox.get_nowait()
        if self._lost is not None:
            raise PeerLost("control channel to the peer is gone", reason=self._lost, **self._ctx())
        getter = asyncio.ensure_future(self._inbox.get())
        lost = asyncio.ensure_future(self._lost_event.wait())
        try:
            done, _ = await asyncio.wait(
                {getter, lost}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            lost.cancel()
            if not getter.done():
                getter.cancel()
        if getter in done and not getter.cancelled():
            return getter.result()
        if self._lost is not None:
            raise PeerLost("control channel to the peer is gone", reason=self._lost, **self._ctx())
        raise MigrationTimeout(f"no message from the peer within {timeout_s:g} s", **self._ctx())

    async def expect(self, kinds: tuple[type[M], ...], timeout_s: float) -> Message:
        """The next message, which must be one of ``kinds`` or an Abort (returned as is)."""
        message = await self.recv(timeout_s)
        if isinstance(message, (*kinds, Abort)):
            return message
        raise ControlProtocolError(
            f"unexpected {message.TYPE} message", expected=",".join(k.TYPE for k in kinds), **self._ctx()
        )

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        with contextlib.suppress(NovacronError, OSError):
            await call_maybe_async(self.channel.close)
