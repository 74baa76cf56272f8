"""The VM spec: what a VM is made of, validated before anything touches QEMU.

Every rejection names the field and the reason (:func:`parse_spec` turns pydantic's report into a
:class:`SpecError`). Host limits come from :func:`detect_host_limits` unless the caller passes other
limits in the validation context (``VMSpec.model_validate(data, context={"limits": ...})``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from novacron.hypervisor.errors import SpecError
from novacron.hypervisor.host import MIN_VM_MEMORY_MIB, HostLimits, detect_host_limits

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
MACHINE_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
MAX_CMDLINE_BYTES = 2048  # x86 boot protocol limit is 2048 including the terminator
MAX_VCPUS = 64
MAX_PATH_BYTES = 4095  # PATH_MAX - 1; longer paths fail in the kernel with ENAMETOOLONG
MAX_NAME_BYTES = 255  # NAME_MAX for one path component
UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"

Accel = Literal["auto", "kvm", "tcg"]


def _limits(info: ValidationInfo) -> HostLimits:
    ctx = info.context or {}
    limits = ctx.get("limits")
    return limits if isinstance(limits, HostLimits) else detect_host_limits()


def _existing_file(value: Path | None, what: str) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if len(str(path).encode()) > MAX_PATH_BYTES or any(len(p.encode()) > MAX_NAME_BYTES for p in path.parts):
        raise ValueError(f"{what} path is longer than the file system allows")
    if not path.exists():
        raise ValueError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{what} {path} is not a regular file")
    return path.resolve()


class VMSpec(BaseModel):
    """A VM definition. Paths are resolved to absolute paths when validated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="lowercase letters, digits and '-', starting with a letter, 1-63 chars")
    vcpus: int = Field(default=1, ge=1, le=MAX_VCPUS)
    memory_mib: int = Field(default=256, ge=MIN_VM_MEMORY_MIB)
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = Field(default="", max_length=MAX_CMDLINE_BYTES - 1)
    disk: Path | None = None
    machine: str = Field(default="pc", pattern=MACHINE_PATTERN)
    accel: Accel = "auto"
    cpu_model: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    # The VM's identity as QEMU sees it (-uuid). Set once when the VM is defined and carried with the
    # spec, so a migration destination starts with the same UUID (multifd channels check it).
    uuid: str | None = Field(default=None, pattern=UUID_PATTERN)

    @field_validator("name")
    @classmethod
    def _name_pattern(cls, value: str) -> str:
        if not re.match(NAME_PATTERN, value):
            raise ValueError(
                f"{value!r} is not a valid name: use 1-63 lowercase letters, digits and '-', "
                "starting with a letter"
            )
        return value

    @field_validator("vcpus")
    @classmethod
    def _vcpus_within_host(cls, value: int, info: ValidationInfo) -> int:
        limit = _limits(info).cpus
        if value > limit:
            raise ValueError(f"{value} vCPUs exceed the host's {limit} CPUs")
        return value

    @field_validator("memory_mib")
    @classmethod
    def _memory_within_host(cls, value: int, info: ValidationInfo) -> int:
        limit = _limits(info).max_vm_memory_mib
        if value > limit:
            raise ValueError(f"{value} MiB exceed the host limit of {limit} MiB")
        return value

    @field_validator("kernel")
    @classmethod
    def _kernel_exists(cls, value: Path | None) -> Path | None:
        return _existing_file(value, "kernel")

    @field_validator("initrd")
    @classmethod
    def _initrd_exists(cls, value: Path | None) -> Path | None:
        return _existing_file(value, "initrd")

    @field_validator("disk")
    @classmethod
    def _disk_exists(cls, value: Path | None) -> Path | None:
        return _existing_file(value, "disk image")

    @field_validator("cmdline")
    @classmethod
    def _cmdline_printable(cls, value: str) -> str:
        if not re.fullmatch(r"[\x20-\x7e]*", value):
            raise ValueError("kernel command line must be printable ASCII on one line")
        return value

    @model_validator(mode="after")
    def _bootable(self) -> VMSpec:
        if self.kernel is None and self.disk is None:
            raise ValueError("a VM needs a kernel or a disk image to boot from")
        if self.kernel is None and (self.initrd is not None or self.cmdline):
            raise ValueError("initrd and cmdline need a kernel")
        return self


def _describe(error: Any) -> tuple[str, str]:
    loc = ".".join(str(p) for p in error.get("loc", ())) or "spec"
    msg = str(error.get("msg", "invalid"))
    return loc, msg.removeprefix("Value error, ")


def parse_spec(data: dict[str, Any], limits: HostLimits | None = None) -> VMSpec:
    """Validate ``data`` into a VMSpec; a SpecError names the (first) bad field and why."""
    try:
        context = {"limits": limits} if limits is not None else None
        return VMSpec.model_validate(data, context=context)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        field, reason = problems[0]
        others = "; ".join(f"{f}: {r}" for f, r in problems[1:])
        raise SpecError(
            f"invalid VM spec: {field}: {reason}", field=field, vm=data.get("name"), also=others or None
        ) from None
