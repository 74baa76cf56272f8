"""The VM inventory on the SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest

from novacron.store import SqliteStore
from novacron.store.inventory import Inventory, VMAlreadyExists, VMNotFound, VMRecord


@pytest.fixture
async def inventory(tmp_path: Path):
    store = SqliteStore(tmp_path / "inv.db")
    yield Inventory(store)
    await store.close()


def _record(name: str) -> VMRecord:
    return VMRecord(name=name, spec={"name": name, "vcpus": 1}, node="n1")


async def test_create_get_list_delete(inventory: Inventory) -> None:
    await inventory.create(_record("b"))
    await inventory.create(_record("a"))
    assert [r.name for r in await inventory.list()] == ["a", "b"]
    got = await inventory.get("a")
    assert got.node == "n1" and got.revision > 0
    await inventory.delete("a")
    with pytest.raises(VMNotFound):
        await inventory.get("a")
    with pytest.raises(VMNotFound):
        await inventory.delete("a")


async def test_duplicate_name_refused(inventory: Inventory) -> None:
    await inventory.create(_record("web"))
    with pytest.raises(VMAlreadyExists) as exc:
        await inventory.create(_record("web"))
    assert exc.value.context["vm"] == "web"


async def test_update_uses_cas_and_survives_a_concurrent_writer(inventory: Inventory) -> None:
    created = await inventory.create(_record("db"))
    # Someone else writes in between: update must re-read, not overwrite blindly.
    await inventory.store.put(
        "/novacron/vms/db", created.model_copy(update={"node": "n2"}).model_dump_json().encode()
    )
    updated = await inventory.update("db", desired_state="running")
    assert updated.desired_state == "running" and updated.node == "n2"
    assert updated.revision > created.revision
