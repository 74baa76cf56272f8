"""Processes we do not own as children: liveness checks that survive pid reuse, and exit waiting."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot); None if gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = raw[raw.rfind(")") + 2 :].split()
    state = rest[0]
    if state in ("Z", "X"):
        return None
    return int(rest[19])


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_same_process(pid: int, start_time: int | None, marker: str) -> bool:
    """True if ``pid`` is alive, started at ``start_time`` and its command line mentions ``marker``."""
    started = proc_start_time(pid)
    if started is None or (start_time is not None and started != start_time):
        return False
    return any(marker in arg for arg in proc_cmdline(pid))


async def wait_pid_exit(pid: int, timeout_s: float) -> bool:
    """Wait until ``pid`` exits (pidfd readiness; works for processes that are not our children).

    Returns True if it exited within the timeout. A zombie counts as exited.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    exited = loop.create_future()

    def _ready() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, _ready)
    try:
        await asyncio.wait_for(exited, timeout_s)
        return True
    except TimeoutError:
        return proc_start_time(pid) is None
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def kill_quietly(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
