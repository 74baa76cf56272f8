"""Waiting for lines on a VM's serial console (console.log, written by QEMU)."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from pathlib import Path

from novacron.errors import NovacronError

CONSOLE_POLL_S = 0.05
MAX_PENDING_LINE = 64 << 10


class ConsoleTimeout(NovacronError):
    """The expected console line did not appear in time."""


@dataclass(frozen=True)
class ConsoleMatch:
    line: str
    match: re.Match[str]
    offset: int  # byte offset in console.log just after the matched line


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read()
    except FileNotFoundError:
        return b""


async def wait_for_line(
    path: Path, pattern: str | re.Pattern[str], *, timeout_s: float, since: int = 0, vm: str | None = None
) -> ConsoleMatch:
    """Wait until a line matching ``pattern`` appears in ``path`` at or after byte offset ``since``.

    QEMU appends to the file and offers no notification, so the file is read incrementally every
    CONSOLE_POLL_S; the wait ends on the first matching line, or with ConsoleTimeout.
    """
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    deadline = time.monotonic() + timeout_s
    offset = since
    pending = b""
    while True:
        chunk = _read_from(path, offset)
        if chunk:
            data = pending + chunk
            lines = data.split(b"\n")
            pending = lines.pop()[-MAX_PENDING_LINE:]
            consumed = offset - (len(data) - len(chunk))
            for raw in lines:
                consumed += len(raw) + 1
                line = raw.decode("utf-8", "replace").rstrip("\r")
                m = regex.search(line)
                if m:
                    return ConsoleMatch(line=line, match=m, offset=consumed)
            offset += len(chunk)
        if time.monotonic() >= deadline:
            raise ConsoleTimeout(
                "expected console line did not appear", vm=vm, pattern=regex.pattern, timeout_s=timeout_s
            )
        await asyncio.sleep(CONSOLE_POLL_S)
