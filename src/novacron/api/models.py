"""Request and response bodies of the API (pydantic). Requests forbid unknown fields."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from novacron.hypervisor.host import MIN_VM_MEMORY_MIB
from novacron.hypervisor.spec import MACHINE_PATTERN, MAX_CMDLINE_BYTES, MAX_VCPUS, NAME_PATTERN
from novacron.observability.audit import AuditEntry
from novacron.security.rbac import Role
from novacron.security.tokens import NAME_PATTERN as TOKEN_NAME_PATTERN
from novacron.security.tokens import TokenLimits

MAX_MEMORY_MIB = 1 << 20  # 1 TiB: the schema's bound; the host's own limit is checked on create
MAX_PATH_CHARS = 4095  # PATH_MAX less the terminator
MAX_NAME_BYTES = 255  # NAME_MAX
ProfileName = Literal["test", "tiny", "default"]  # the image profiles (a test checks this against PROFILES)
HOST_PATH_PATTERN = r"^/[\x21-\x7e]*$"  # absolute: a server has no useful working directory
_TOKEN_LIMITS = TokenLimits()


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkloadIn(_Request):
    """Test guest workload settings at boot (the image profile's defaults for those left out)."""

    data_mib: int | None = Field(default=None, ge=0, le=1 << 16)
    ws_mib: int | None = Field(default=None, ge=0, le=1 << 16)
    dirty_rate: int | None = Field(default=None, ge=0, le=10_000_000)
    dirty_bytes: int | None = Field(default=None, ge=1, le=4096)
    rewrite_rate: int | None = Field(default=None, ge=0, le=10_000_000)


class VMCreate(_Request):
    """A new VM: the test guest image of ``profile`` (the default), or a ``kernel`` of the host."""

    name: str = Field(pattern=NAME_PATTERN, max_length=63)
    profile: ProfileName | None = Field(default=None, description="test guest image profile (test)")
    kernel: str | None = Field(
        default=None,
        max_length=MAX_PATH_CHARS,
        pattern=HOST_PATH_PATTERN,
        description="absolute host path; needs admin",
    )
    initrd: str | None = Field(default=None, max_length=MAX_PATH_CHARS, pattern=HOST_PATH_PATTERN)
    cmdline: str | None = Field(default=None, max_length=MAX_CMDLINE_BYTES - 1, pattern=r"^[\x20-\x7e]*$")
    vcpus: int | None = Field(default=None, ge=1, le=MAX_VCPUS)
    memory_mib: int | None = Field(default=None, ge=MIN_VM_MEMORY_MIB, le=MAX_MEMORY_MIB)
    machine: str = Field(default="pc", pattern=MACHINE_PATTERN)
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    workload: WorkloadIn | None = None
    start: bool = False
    wait: bool = Field(default=False, description="with start: wait for the guest's READY marker")
    node: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        description="the node to create it on; omitted on a control node: placed by the scheduler",
    )
    selector: dict[str, str] | None = Field(
        default=None, max_length=64, description="node labels the VM's node must carry (placement)"
    )
    anti_affinity: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        description="VMs of one group never share a node (placement)",
    )  # fmt: skip

    @field_validator("kernel")
    @classmethod
    def _kernel_or_profile(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("profile") is not None:
            raise ValueError("give either an image profile or a kernel, not both")
        return value

    @field_validator("kernel", "initrd")
    @classmethod
    def _path_fits_the_filesystem(cls, value: str | None) -> str | None:
        # Longer names cannot exist; checking here keeps the OS's ENAMETOOLONG out of the spec check.
        if value is not None and any(len(part.encode()) > MAX_NAME_BYTES for part in value.split("/")):
            raise ValueError(f"a path component is longer than {MAX_NAME_BYTES} bytes")
        return value

    @field_validator("initrd", "cmdline")
    @classmethod
    def _needs_kernel(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("kernel") is None:
            raise ValueError(f"{info.field_name} needs a kernel")
        return value

    @field_validator("workload")
    @classmethod
    def _workload_needs_image(cls, value: WorkloadIn | None, info: ValidationInfo) -> WorkloadIn | None:
        if value is not None and info.data.get("kernel") is not None:
            raise ValueError("workload settings apply to the test image only, not to a kernel")
        return value


class VMOut(BaseModel):
    name: str
    state: str
    desired_state: str
    node: str
    pid: int | None = None
    accel: str | None = None
    qemu_runstate: str | None = None
    vcpus: int | None = None
    memory_mib: int | None = None
    machine: str | None = None
    image_profile: str | None = None
    run_dir: str | None = None
    detail: str | None = None
    log_tail: list[str] = Field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Same shape as VMInfo.as_dict(), so CLI printing works on either."""
        return self.model_dump(mode="json")


class ConsoleOut(BaseModel):
    name: str
    lines: list[str]


class DeletedOut(BaseModel):
    deleted: str


class GuestDirtyIn(_Request):
    rate: int = Field(ge=0, le=10_000_000, description="pages per second (0 stops)")
    bytes_per_page: int = Field(default=128, ge=1, le=4096)
    rewrite_rate: int | None = Field(default=None, ge=0, le=10_000_000)


class ImageOut(BaseModel):
    profile: str
    built: bool
    memory_mib: int
    vcpus: int
    directory: str | None = None
    content_hash: str | None = None
    built_at: float | None = None
    kernel: str | None = None
    initrd_bytes: int | None = None
    workload_defaults: dict[str, int] = Field(default_factory=dict)


class TokenCreate(_Request):
    name: str = Field(pattern=TOKEN_NAME_PATTERN, max_length=64)
    role: Role
    ttl_s: float | None = Field(
        default=None,
        ge=_TOKEN_LIMITS.min_ttl_s,
        le=_TOKEN_LIMITS.max_ttl_s,
        description=f"lifetime in seconds (default {_TOKEN_LIMITS.default_ttl_s:.0f})",
    )


class TokenOut(BaseModel):
    id: str
    name: str
    role: Role
    state: Literal["active", "expired", "revoked"]
    created_at: float
    expires_at: float
    created_by: str
    revoked_at: float | None = None
    revoked_by: str | None = None


class TokenIssued(BaseModel):
    token: str = Field(description="the secret: shown this once, stored only as a hash")
    record: TokenOut


class WhoAmI(BaseModel):
    kind: Literal["token", "local", "node"]
    name: str
    role: Role
    token_id: str | None = None


class AuditPageOut(BaseModel):
    entries: list[AuditEntry]
    next_cursor: str | None


class HealthOut(BaseModel):
    status: Literal["ok"]
    node: str
    version: str


class ReadyOut(BaseModel):
    status: Literal["ready"]
    store_revision: int
