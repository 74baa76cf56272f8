"""Migration records in the store: ``/novacron/migrations/<id>/<role>``, one per side.

A record is written at every phase change, *before* the side effects of the new phase, so an agent
that restarts knows what was in flight and can settle it (``recovery.py``). Each side keeps its own
record under its role, so the same id on a shared store (etcd) holds both sides without collision.
Updates are compare-and-swap on the entry's revision (re-read on conflict, bounded retries).
"""

from __future__ import annotations

import builtins
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from novacron.migration.errors import MigrationNotFound
from novacron.migration.phases import FINAL_PHASES, Phase
from novacron.store.base import CasFailed, KeyValueStore, StoreError

MIGRATION_PREFIX = "/novacron/migrations/"
MAX_CAS_RETRIES = 8
MAX_HISTORY = 32  # phases per migration are a dozen at most; escalations and retries add a few
MAX_EVENTS = 32
MAX_LIST = 1000

Role = Literal["source", "destination"]
Outcome = Literal["done", "failed", "cancelled"]


class PhaseEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    phase: Phase
    at: float


class ErrorInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    kind: str
    message: str
    phase: str
    context: dict[str, str] = Field(default_factory=dict)


class Progress(BaseModel):
    """What the progress display and the final report show (source's view; the destination fills
    what it knows)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    at: float = 0.0
    qemu_status: str = ""
    iteration: int = 0
    ram_total: int = 0
    ram_remaining: int = 0
    bytes_raw: int = 0  # bytes QEMU produced (before our encoding / QEMU's compression)
    bytes_wire: int = 0  # bytes on the link (data path's transport bytes, or QEMU's own count)
    rate_bps: float = 0.0  # on the wire, recent
    dirty_pages_rate: float = 0.0
    page_size: int = 4096
    throttle_pct: int = 0
    expected_downtime_ms: int = 0
    eta_s: float | None = None
    buffered_bytes: int = 0

    @property
    def ratio(self) -> float:
        return self.bytes_raw / self.bytes_wire if self.bytes_wire else 1.0


class MigrationRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    vm: str
    role: Role
    source: str
    destination: str
    phase: Phase = Phase.PREPARE
    outcome: Outcome | None = None
    mode: str = ""  # datacenter | hybrid | internet (decided or forced)
    mode_forced: bool = False
    data_path: str = ""  # direct | tunnel | passthrough
    max_downtime_ms: int = 300
    deadline_s: float = 600.0
    allow_postcopy: bool = False
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    finished_at: float | None = None
    history: list[PhaseEntry] = Field(default_factory=list)
    events: list[str] = Field(default_factory=list)  # escalations, retries, notable decisions
    error: ErrorInfo | None = None
    progress: Progress = Field(default_factory=Progress)
    stop_ts: float | None = None  # source QMP STOP
    resume_ts: float | None = None  # destination QMP RESUME
    completed_ts: float | None = None  # this side's QMP MIGRATION "completed" (arrival, on the destination)
    downtime_ms: float | None = None  # resume_ts - stop_ts (same host clock in tests; NTP otherwise)
    qemu_downtime_ms: int | None = None  # QEMU's own figure (source side, excludes the destination)
    resumed: bool = False  # destination: it ran `cont` (the VM may be running here)
    source_completed: bool = False  # the source QEMU reported completed (paused, state sent)
    source_was_paused: bool = False  # source: the VM was paused before (rollback leaves it paused)
    owner_epoch: int | None = None
    revision: int = Field(default=0, exclude=True)

    @property
    def final(self) -> bool:
        return self.phase in FINAL_PHASES

    @property
    def duration_s(self) -> float:
        return (self.finished_at or time.time()) - self.created_at


def record_key(migration_id: str, role: str) -> str:
    return f"{MIGRATION_PREFIX}{migration_id}/{role}"


def _decode(value: bytes, revision: int, key: str) -> MigrationRecord:
    try:
        rec = MigrationRecord.model_validate_json(value)
    except ValidationError as exc:
        raise StoreError(
            "corrupt migration record", key=key, reason=str(exc.errors()[0].get("msg"))
        ) from None
    return rec.model_copy(update={"revision": revision})


class MigrationRecords:
    """Typed access to the migration records of one store."""

    def __init__(self, store: KeyValueStore) -> None:
        self.store = store

    async def create(self, record: MigrationRecord) -> MigrationRecord:
        key = record_key(record.id, record.role)
        entry = record.model_copy(update={"history": [PhaseEntry(phase=record.phase, at=record.created_at)]})
        try:
            rev = await self.store.put(key, entry.model_dump_json().encode(), expect_revision=0)
        except CasFailed:
            raise StoreError("a migration record with this id already exists", key=key) from None
        return entry.model_copy(update={"revision": rev})

    async def find(self, migration_id: str, role: str) -> MigrationRecord | None:
        key = record_key(migration_id, role)
        entry = await self.store.get(key)
        return None if entry is None else _decode(entry.value, entry.mod_revision, key)

    async def get(self, migration_id: str, role: str) -> MigrationRecord:
        rec = await self.find(migration_id, role)
        if rec is None:
            raise MigrationNotFound(f"no {role} record of migration {migration_id!r}", migration=migration_id)
        return rec

    async def any_role(self, migration_id: str) -> builtins.list[MigrationRecord]:
        return [r for r in await self.list(prefix_id=migration_id) if r.id == migration_id]

    async def list(self, *, prefix_id: str = "", limit: int = MAX_LIST) -> list[MigrationRecord]:
        entries = await self.store.range(MIGRATION_PREFIX + prefix_id, limit=limit)
        return [_decode(e.value, e.mod_revision, e.key) for e in entries]

    async def unfinished(self) -> builtins.list[MigrationRecord]:
        return [r for r in await self.list() if not r.final]

    async def update(self, migration_id: str, role: str, **changes: Any) -> MigrationRecord:
        """Apply ``changes``; a new ``phase`` is appended to the history. CAS with bounded retries."""
        key = record_key(migration_id, role)
        for _ in range(MAX_CAS_RETRIES):
            current = await self.get(migration_id, role)
            now = time.time()
            update = {**changes, "updated_at": now}
            new_phase = changes.get("phase")
            if new_phase is not None and new_phase != current.phase:
                history = [*current.history, PhaseEntry(phase=new_phase, at=now)][-MAX_HISTORY:]
                update["history"] = history
                if Phase(new_phase) in FINAL_PHASES:
                    update.setdefault("finished_at", now)
            if "events" in changes:
                update["events"] = list(changes["events"])[-MAX_EVENTS:]
            updated = current.model_copy(update=update)
            MigrationRecord.model_validate(updated.model_dump())  # still a valid record
            try:
                rev = await self.store.put(
                    key, updated.model_dump_json().encode(), expect_revision=current.revision
                )
            except CasFailed:
                continue
            return updated.model_copy(update={"revision": rev})
        raise StoreError("migration record update kept conflicting", key=key, retries=MAX_CAS_RETRIES)

    async def add_event(self, migration_id: str, role: str, event: str) -> MigrationRecord:
        current = await self.get(migration_id, role)
        return await self.update(migration_id, role, events=[*current.events, event])

    async def delete(self, migration_id: str, role: str) -> bool:
        return await self.store.delete(record_key(migration_id, role))


__all__ = [
    "MIGRATION_PREFIX",
    "ErrorInfo",
    "MigrationRecord",
    "MigrationRecords",
    "Outcome",
    "PhaseEntry",
    "Progress",
    "Role",
    "record_key",
]
