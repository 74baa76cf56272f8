"""A QEMU that closes its monitor in the middle of our connect (killed, or quitting) is a QMPError
like any other lost monitor, never the QMP library's internal assertion."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from novacron.guest.boot import guest_spec
from novacron.hypervisor import QemuDriver
from novacron.hypervisor.errors import QMPError
from novacron.image import find_image

GREETING = {
    "QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}, "capabilities": []}
}


async def serve_then_close(path: Path, accepted: list[int]) -> asyncio.Server:
    """Greets, accepts qmp_capabilities, and closes at once: QEMU being killed right then."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writer.write(json.dumps(GREETING).encode() + b"\r\n")
        await writer.drain()
        await reader.read(1 << 16)  # qmp_capabilities (the client sends no newline after it)
        writer.write(b'{"return": {}}\r\n')
        writer.close()

    return await asyncio.start_unix_server(handle, str(path))


async def test_monitor_closed_during_connect_is_a_qmp_error(tmp_path: Path) -> None:
    driver = QemuDriver(tmp_path / "vms")
    await driver.define(guest_spec("gone", find_image("test"), accel="tcg"))
    accepted: list[int] = []
    server = await serve_then_close(driver.run_dir("gone").qmp_socket, accepted)
    async with server:
        for _ in range(5):
            with pytest.raises(QMPError, match="cannot connect to QEMU's QMP socket"):
                await driver.execute("gone", "query-status")
    assert len(accepted) == 5  # each failure came from our peer, not a socket that never answered
