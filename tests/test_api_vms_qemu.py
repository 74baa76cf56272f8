"""A VM's whole life through the API, on a real TCG guest: create, start and wait for READY, talk to
the guest, pause, resume, stop, delete. Client and server talk over a real unix socket."""

from __future__ import annotations

from pathlib import Path

import pytest

from novacron.api.client import ApiClient
from novacron.api.harness import api_harness
from novacron.api.server import Listen, running_api
from novacron.errors import ConflictError
from novacron.security.rbac import Role

pytestmark = pytest.mark.qemu


async def test_vm_lifecycle_through_the_api(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    async with (
        api_harness(tmp_path) as h,
        running_api(h.app, Listen(unix=sock)),
        ApiClient(f"unix://{sock}", token=h.tokens[Role.OPERATOR]) as api,
    ):
        vm = await api.create(
            {"name": "api-vm", "profile": "test", "workload": {"dirty_rate": 50}, "start": True, "wait": True}
        )
        assert (vm.state, vm.desired_state, vm.image_profile) == ("running", "running", "test")
        try:
            guest = api.guest("api-vm")
            status = await guest.status()
            assert status.requested_rate == 50 and status.heartbeats > 0
            before = await guest.checksum()
            assert (await guest.verify()).corrupted == 0
            ack = await guest.dirty(0, 64)
            assert ack.rate == 0

            paused = await api.pause("api-vm")
            assert (paused.state, paused.desired_state) == ("paused", "paused")
            resumed = await api.resume("api-vm")
            assert resumed.state == "running"
            assert (await guest.checksum()).checksum == before.checksum

            with pytest.raises(ConflictError):  # deleting a running VM
                await api.delete("api-vm")
            assert [v.name for v in await api.list()] == ["api-vm"]
            assert "NOVACRON-READY" in await api.console("api-vm", tail_lines=500)
        finally:
            stopped = await api.stop("api-vm", force=True)
        assert stopped.state == "defined"
        await api.delete("api-vm")
        assert await api.list() == []

        async with ApiClient(f"unix://{sock}") as local:  # the socket's local admin reads the audit log
            entries, _ = await local.audit()
        actions = [e.record.action for e in entries]
        assert actions == ["vm.create", "vm.guest.dirty", "vm.pause", "vm.resume", "vm.delete", "vm.stop",
                           "vm.delete"]  # fmt: skip
        assert [e.record.status for e in entries] == [201, 200, 200, 200, 409, 200, 200]
