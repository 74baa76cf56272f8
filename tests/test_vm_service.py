"""VM service rules that need no running guest (real driver, real store; nothing is started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from novacron.hypervisor import QemuDriver, SpecError, VMState, VMStateError
from novacron.store import SqliteStore
from novacron.store.inventory import VMAlreadyExists, VMNotFound
from novacron.vm import VMService


@pytest.fixture
async def service(tmp_path: Path):
    store = SqliteStore(tmp_path / "store.db")
    yield VMService(store, QemuDriver(tmp_path / "vms"), node="n1")
    await store.close()


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "vmlinuz"
    k.write_bytes(b"kernel")
    return k


async def test_create_resolves_machine_and_refuses_duplicates(service: VMService, kernel: Path) -> None:
    info = await service.create({"name": "a1", "kernel": str(kernel)})
    assert info.status.state == VMState.DEFINED
    assert info.record.spec["machine"].startswith("pc-i440fx-") and info.record.node == "n1"
    with pytest.raises(VMAlreadyExists):
        await service.create({"name": "a1", "kernel": str(kernel), "memory_mib": 128})
    assert [i.name for i in await service.list()] == ["a1"]
    assert (await service.show("a1")).record.spec["memory_mib"] == 256


async def test_failed_define_leaves_nothing_behind(service: VMService, kernel: Path) -> None:
    with pytest.raises(SpecError) as exc:
        await service.create({"name": "b1", "kernel": str(kernel), "machine": "no-such-machine"})
    assert exc.value.context["field"] == "machine"
    assert await service.list() == []
    assert service.driver.defined() == []
    # The name is free again.
    await service.create({"name": "b1", "kernel": str(kernel)})


async def test_state_rules(service: VMService, kernel: Path) -> None:
    await service.create({"name": "c1", "kernel": str(kernel)})
    for op in (service.pause, service.resume, service.stop):
        with pytest.raises(VMStateError):
            await op("c1")
    with pytest.raises(VMNotFound):
        await service.start("ghost")
    with pytest.raises(VMNotFound):
        await service.delete("ghost")
    await service.delete("c1")
    assert await service.list() == [] and service.driver.defined() == []
