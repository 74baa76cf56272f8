"""The VM inventory: typed records on top of the key-value store (``/novacron/vms/<name>``)."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from novacron.errors import ConflictError, NotFoundError
from novacron.store.base import CasFailed, KeyValueStore, StoreError

VM_PREFIX = "/novacron/vms/"
MAX_CAS_RETRIES = 8

DesiredState = Literal["stopped", "running", "paused"]


class VMRecord(BaseModel):
    """What the inventory remembers about a VM. ``spec`` is the VMSpec as JSON (validated on use:
    the files it names may come and go while the record lives)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    spec: dict[str, Any]
    node: str
    desired_state: DesiredState = "stopped"
    image_profile: str | None = None
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    revision: int = Field(default=0, exclude=True)  # the store's mod_revision when read


class VMAlreadyExists(ConflictError):
    """A VM with this name is already in the inventory."""


class VMNotFound(NotFoundError):
    """No VM of that name in the inventory."""


def _key(name: str) -> str:
    return VM_PREFIX + name


def _decode(value: bytes, revision: int, key: str) -> VMRecord:
    try:
        record = VMRecord.model_validate_json(value)
    except ValidationError as exc:
        raise StoreError(
            "corrupt inventory record", key=key, reason=str(exc.errors()[0].get("msg"))
        ) from None
    return record.model_copy(update={"revision": revision})


class Inventory:
    def __init__(self, store: KeyValueStore) -> None:
        self.store = store

    async def create(self, record: VMRecord) -> VMRecord:
        try:
            rev = await self.store.put(
                _key(record.name), record.model_dump_json().encode(), expect_revision=0
            )
        except CasFailed:
            raise VMAlreadyExists(f"a VM named {record.name!r} already exists", vm=record.name) from None
        return record.model_copy(update={"revision": rev})

    async def get(self, name: str) -> VMRecord:
        entry = await self.store.get(_key(name))
        if entry is None:
            raise VMNotFound(f"no VM named {name!r}", vm=name)
        return _decode(entry.value, entry.mod_revision, entry.key)

    async def find(self, name: str) -> VMRecord | None:
        entry = await self.store.get(_key(name))
        return None if entry is None else _decode(entry.value, entry.mod_revision, entry.key)

    async def list(self) -> list[VMRecord]:
        return [_decode(e.value, e.mod_revision, e.key) for e in await self.store.range(VM_PREFIX)]

    async def update(self, name: str, **changes: Any) -> VMRecord:
        """Apply ``changes`` with compare-and-swap, re-reading on conflict (bounded retries)."""
        for _ in range(MAX_CAS_RETRIES):
            current = await self.get(name)
            updated = current.model_copy(update={**changes, "updated_at": time.time()})
            VMRecord.model_validate(updated.model_dump())  # the changed record must still be valid
            try:
                rev = await self.store.put(
                    _key(name), updated.model_dump_json().encode(), expect_revision=current.revision
                )
            except CasFailed:
                continue
            return updated.model_copy(update={"revision": rev})
        raise StoreError("inventory update kept conflicting", vm=name, retries=MAX_CAS_RETRIES)

    async def delete(self, name: str) -> None:
        if not await self.store.delete(_key(name)):
            raise VMNotFound(f"no VM named {name!r}", vm=name)
