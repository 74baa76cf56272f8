"""The VM service of this host, wired to the default store and the QEMU driver."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from novacron.hypervisor.qemu import QemuDriver
from novacron.store import open_default_store
from novacron.vm.service import VMService


@asynccontextmanager
async def local_service() -> AsyncIterator[VMService]:
    store = open_default_store()
    try:
        yield VMService(store, QemuDriver())
    finally:
        await store.close()
