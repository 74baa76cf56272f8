"""A 3-member etcd cluster loses its leader during a stream of VM creations and ownership changes.

Writers create VMs (inventory record + owner claim in one transaction) and move their ownership, all
through one EtcdStore that knows the three members and talks to the leader. Once writes are flowing, the
Raft leader is killed with SIGKILL; once writes flow again on the two survivors, it is restarted on its
data directory; once writes flow a third time, the writers stop. Then every acknowledged write must be
there: each created VM with its record, each acknowledged transfer as a version of the VM's owner key
(etcd's MVCC history), and every owner history a gap-free chain of epochs, so no VM ever had two owners.
Writes whose answer was lost (StoreOutcomeUnknown) may or may not have landed; they are counted, not
checked.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from dataclasses import dataclass, field

import pytest

from novacron.store import Put, StoreOutcomeUnknown, StoreUnavailable
from novacron.store.etcd import EtcdLimits, EtcdStore
from novacron.store.inventory import VM_PREFIX, Inventory, VMRecord
from novacron.store.ownership import Ownership, OwnershipConflict, OwnershipRegistry, owner_key
from novacron.testing.etcd import EtcdCluster

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

NODES = [f"host{i}" for i in range(4)]
MOVERS = 6
PHASE_WRITES = 40  # acknowledged writes to see in each phase before moving to the next


@dataclass
class Ledger:
    created: list[str] = field(default_factory=list)
    transfers: dict[str, dict[int, str]] = field(
        default_factory=lambda: defaultdict(dict)
    )  # vm -> epoch -> op_id
    acked: int = 0
    unknown: int = 0
    unavailable: int = 0
    progress: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def ack(self) -> None:
        async with self.progress:
            self.acked += 1
            self.progress.notify_all()

    async def wait_for(self, count: int) -> None:
        async with self.progress:
            await asyncio.wait_for(self.progress.wait_for(lambda: self.acked >= count), 60)


async def _creator(owners: OwnershipRegistry, ledger: Ledger, stop: asyncio.Event) -> None:
    i = 0
    while not stop.is_set():
        name = f"vm-{i:04d}"
        i += 1
        record = VMRecord(name=name, spec={"name": name}, node=NODES[0])
        try:
            await owners.claim(
                name, NODES[0], with_puts=[Put(VM_PREFIX + name, record.model_dump_json().encode())]
            )
        except StoreOutcomeUnknown:
            ledger.unknown += 1
            continue
        except StoreUnavailable:
            ledger.unavailable += 1
            continue
        ledger.created.append(name)
        await ledger.ack()


async def _mover(seed: int, owners: OwnershipRegistry, ledger: Ledger, stop: asyncio.Event) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        if not ledger.created:
            await ledger.wait_for(1)
            continue
        vm = rng.choice(ledger.created)
        try:
            current = await owners.require(vm)
            target = rng.choice([n for n in NODES if n != current.node])
            moved = await owners.transfer(vm, current.node, target, expect_revision=current.revision)
        except OwnershipConflict:
            continue
        except StoreOutcomeUnknown:
            ledger.unknown += 1
            continue
        except StoreUnavailable:
            ledger.unavailable += 1
            continue
        ledger.transfers[vm][moved.epoch] = moved.op_id
        await ledger.ack()


async def test_killing_the_leader_loses_no_acknowledged_write() -> None:
    async with EtcdCluster(3) as cluster:
        # The client talks to the leader first, so the kill cuts its connection as well as Raft's
        # leadership: it must fail over to a survivor while the survivors elect a new leader.
        victim = await cluster.leader_index()
        endpoints = [cluster.endpoints[victim]] + [e for i, e in enumerate(cluster.endpoints) if i != victim]
        store = EtcdStore(endpoints, EtcdLimits(request_timeout_s=3.0, max_attempts=12))
        owners = OwnershipRegistry(store)
        ledger = Ledger()
        stop = asyncio.Event()
        writers = [asyncio.create_task(_creator(owners, ledger, stop))]
        writers += [asyncio.create_task(_mover(i, owners, ledger, stop)) for i in range(MOVERS)]
        try:
            await ledger.wait_for(PHASE_WRITES)
            assert await cluster.leader_index() == victim
            await cluster.kill(victim)
            killed_at = ledger.acked
            await ledger.wait_for(killed_at + PHASE_WRITES)  # the survivors elect and serve
            await cluster.restart(victim)
            restarted_at = ledger.acked
            await ledger.wait_for(restarted_at + PHASE_WRITES)
        finally:
            stop.set()
            await asyncio.gather(*writers)

        assert ledger.created and sum(len(t) for t in ledger.transfers.values()) > 0
        assert store.stats.failovers > 0, "the client never left the killed member"
        # Read back through the restarted member first (reads are linearizable: served via the leader).
        verify = EtcdStore([cluster.members[victim].endpoint, *cluster.endpoints])
        inventory = Inventory(verify)
        try:
            for vm in ledger.created:
                assert (await inventory.get(vm)).name == vm
                history = await verify.history(owner_key(vm))
                versions = [Ownership.model_validate_json(e.value) for e in history]
                assert [v.epoch for v in versions] == list(range(1, len(versions) + 1)), vm
                by_epoch = {v.epoch: v.op_id for v in versions}
                for epoch, op_id in ledger.transfers.get(vm, {}).items():
                    assert by_epoch.get(epoch) == op_id, f"{vm}: acknowledged transfer of epoch {epoch} lost"
        finally:
            await verify.close()
            await store.close()
        print(
            f"acked={ledger.acked} created={len(ledger.created)} unknown={ledger.unknown} "
            f"unavailable={ledger.unavailable} killed_member={victim} client={store.stats}"
        )
