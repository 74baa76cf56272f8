"""Control messages of a migration (the ``migration-control`` channel), versioned. *(wire)*

Each message is one msgpack map with ``type`` (a string naming the message) and ``v`` (the message's
schema version), plus its fields. Decoding ignores unknown fields (a newer peer may add optional ones)
and refuses an unknown ``type``, a ``v`` other than the one we speak for that type, invalid msgpack,
and fields of the wrong type or out of bounds, with a :class:`ControlProtocolError` that says which.
A message's schema version changes only when its meaning changes incompatibly; new optional fields
keep the version. docs/migration.md section 4 lists every message.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from novacron.dwcp.encoding.summary import SUMMARY_VERSION_DIGEST
from novacron.migration.errors import ControlProtocolError

MAX_MESSAGE_BYTES = 16 << 20  # the AMST channel's default message limit; READY's summary is the big one
MAX_SUMMARY_BYTES = 15 << 20  # ~28 B per page held: a 768 MiB guest's went past 3 MiB; chunk for > 2 GiB
MAX_ARTEFACT_CHUNK = 1 << 20
MAX_REASON = 1024
MAX_ARTEFACTS = 8
MAX_SPEC_FIELDS = 32
MAX_SETTINGS = 64

Id = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
Name = Annotated[str, Field(min_length=1, max_length=253)]
Reason = Annotated[str, Field(max_length=MAX_REASON)]
Phase = Annotated[str, Field(min_length=1, max_length=32)]
Timestamp = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(ge=0, le=2**63)]


class Message(BaseModel):
    """Base of every control message. ``TYPE`` and ``VERSION`` are the wire identity."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

    migration_id: Id


class ArtefactRef(BaseModel):
    """A boot file of the VM: where the source has it and what it holds (blake3 of the content)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    role: Literal["kernel", "initrd", "disk"]
    path: Annotated[str, Field(min_length=1, max_length=4096)]
    size: Count
    digest: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class Prepare(Message):
    """source -> destination: everything the destination needs to decide and to start its QEMU."""

    TYPE: ClassVar[str] = "prepare"
    vm: Name
    source_node: Name
    spec: Annotated[dict[str, Any], Field(max_length=MAX_SPEC_FIELDS)]  # VMSpec as JSON
    image_profile: Annotated[str, Field(max_length=64)] | None = None
    qemu_version: Annotated[str, Field(max_length=64)]
    machine: Annotated[str, Field(max_length=64)]
    accel: Annotated[str, Field(max_length=16)]
    memory_mib: Annotated[int, Field(ge=1)]
    vcpus: Annotated[int, Field(ge=1)]
    artefacts: Annotated[list[ArtefactRef], Field(max_length=MAX_ARTEFACTS)]
    mode: Annotated[str, Field(max_length=32)]
    data_path: Annotated[str, Field(max_length=32)]
    capabilities: Annotated[dict[str, bool], Field(max_length=MAX_SETTINGS)]
    parameters: Annotated[dict[str, Any], Field(max_length=MAX_SETTINGS)]
    max_downtime_ms: Annotated[int, Field(ge=1)]
    deadline_s: Annotated[float, Field(gt=0)]
    allow_postcopy: bool = False
    # BLAKE3 (hex) of the source's stored copy of the VM: a destination holding the same copy names
    # it by this digest in READY's summary instead of listing its tags (docs/hde.md, "Baseline store").
    baseline_copy: Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")] = ""
    # The newest baseline summary version the source reads (3: a named copy's fingerprints left out).
    summary_version: Annotated[int, Field(ge=1, le=255)] = SUMMARY_VERSION_DIGEST


class Ready(Message):
    """destination -> source: QEMU started paused and listening; here is how to reach it."""

    TYPE: ClassVar[str] = "ready"
    incoming_uri: Annotated[str, Field(max_length=512)] | None = None  # direct path: tcp:host:port
    tls_hostname: Annotated[str, Field(max_length=253)] | None = None
    summary: Annotated[bytes, Field(max_length=MAX_SUMMARY_BYTES)] = b""
    qemu_version: Annotated[str, Field(max_length=64)] = ""


class Refuse(Message):
    """destination -> source: it will not take the VM (``code``: capacity, busy, version, machine,
    artefact, exists, invalid, internal)."""

    TYPE: ClassVar[str] = "refuse"
    code: Annotated[str, Field(max_length=32)]
    reason: Reason


class NeedArtefacts(Message):
    """destination -> source: ship these boot files (it has none with the right digest)."""

    TYPE: ClassVar[str] = "need-artefacts"
    roles: Annotated[list[Literal["kernel", "initrd", "disk"]], Field(min_length=1, max_length=MAX_ARTEFACTS)]


class ArtefactChunk(Message):
    """source -> destination: a piece of a boot file; ``last`` closes the file."""

    TYPE: ClassVar[str] = "artefact-chunk"
    role: Literal["kernel", "initrd", "disk"]
    offset: Count
    data: Annotated[bytes, Field(max_length=MAX_ARTEFACT_CHUNK)]
    last: bool = False


class PhaseNotice(Message):
    """source -> destination: the source entered ``phase`` (the destination records it)."""

    TYPE: ClassVar[str] = "phase"
    phase: Phase
    iteration: Count = 0


class Completed(Message):
    """source -> destination: the source QEMU is paused and its migration completed.

    Only after this may the destination resume (``cont``) its QEMU."""

    TYPE: ClassVar[str] = "completed"
    stop_ts: Timestamp | None = None  # QMP STOP event of the source (host clock)
    qemu_downtime_ms: Count | None = None
    total_time_ms: Count | None = None


class PostcopyStarted(Message):
    """source -> destination: the source is paused in post-copy; the destination must run the VM."""

    TYPE: ClassVar[str] = "postcopy-started"
    stop_ts: Timestamp | None = None


class Resumed(Message):
    """destination -> source: the destination resumed the VM and its checks passed."""

    TYPE: ClassVar[str] = "resumed"
    resume_ts: Timestamp | None = None  # QMP RESUME event of the destination (host clock)
    checks: Annotated[list[Annotated[str, Field(max_length=128)]], Field(max_length=16)] = []


class Commit(Message):
    """source -> destination: ownership moved to the destination and the source QEMU is gone."""

    TYPE: ClassVar[str] = "commit"
    owner_epoch: Count = 0


class Committed(Message):
    """destination -> source: recorded; the VM is the destination's."""

    TYPE: ClassVar[str] = "committed"


class Abort(Message):
    """either side: stop and roll back (sent before or instead of the sender's own rollback)."""

    TYPE: ClassVar[str] = "abort"
    phase: Phase
    code: Annotated[str, Field(max_length=32)] = "failed"  # failed | cancelled | timeout | verify
    reason: Reason


class Query(Message):
    """either side (recovery, in-doubt): what is your state of this migration?"""

    TYPE: ClassVar[str] = "query"
    role: Literal["source", "destination"]  # the asker's role


QemuState = Literal["none", "incoming", "completed-paused", "running", "paused", "gone"]


class State(Message):
    """Answer to :class:`Query`: the answering side's phase and what its QEMU is doing."""

    TYPE: ClassVar[str] = "state"
    known: bool = True  # False: the side has no record of this migration
    phase: Phase = "none"
    qemu: QemuState = "none"
    resumed: bool = False  # destination: it resumed the VM at some point
    # A live run on the answering host still drives this migration and will decide on its own (it
    # ends, or goes in-doubt and then answers without this flag): the asker must not act, ask again.
    driving: bool = False


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Prepare,
        Ready,
        Refuse,
        NeedArtefacts,
        ArtefactChunk,
        PhaseNotice,
        Completed,
        PostcopyStarted,
        Resumed,
        Commit,
        Committed,
        Abort,
        Query,
        State,
    )
}


def encode(message: Message) -> bytes:
    body = message.model_dump(mode="python")
    body["type"] = message.TYPE
    body["v"] = message.VERSION
    data: bytes = msgpack.packb(body, use_bin_type=True)
    if len(data) > MAX_MESSAGE_BYTES:
        raise ControlProtocolError(
            "control message too large", type=message.TYPE, bytes=len(data), limit=MAX_MESSAGE_BYTES
        )
    return data


def decode(data: bytes) -> Message:
    if len(data) > MAX_MESSAGE_BYTES:
        raise ControlProtocolError("control message too large", bytes=len(data), limit=MAX_MESSAGE_BYTES)
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=MAX_MESSAGE_BYTES)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ControlProtocolError("control message is not valid msgpack", reason=str(exc)[:200]) from None
    if not isinstance(body, dict):
        raise ControlProtocolError("control message is not a map", got=type(body).__name__)
    kind = body.get("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ControlProtocolError("unknown control message type", type=str(kind)[:40])
    version = body.get("v")
    if version != cls.VERSION:
        raise ControlProtocolError(
            "unsupported control message version", type=kind, version=version, supported=cls.VERSION
        )
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "message"
        raise ControlProtocolError(
            f"invalid {kind} message: {where}: {err.get('msg')}", type=kind, field=where
        ) from None


__all__ = [
    "MESSAGE_TYPES",
    "Abort",
    "ArtefactChunk",
    "ArtefactRef",
    "Commit",
    "Committed",
    "Completed",
    "Message",
    "NeedArtefacts",
    "PhaseNotice",
    "PostcopyStarted",
    "Prepare",
    "Query",
    "Ready",
    "Refuse",
    "Resumed",
    "State",
    "decode",
    "encode",
]
