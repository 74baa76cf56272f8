"""VMs: inventory and lifecycle on this host (the VMService), and the test guest's control channel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, status

from novacron.api.deps import Operator, Services, Viewer, set_target
from novacron.api.errors import ERROR_RESPONSES, RequestFieldError
from novacron.api.models import ConsoleOut, DeletedOut, GuestDirtyIn, VMCreate, VMOut
from novacron.cluster.control import ControlPlane
from novacron.guest.control import ChecksumResult, DirtyAck, GuestStatus, VerifyResult
from novacron.hypervisor.spec import NAME_PATTERN
from novacron.image import PROFILES, ImageSettingError
from novacron.security.rbac import PermissionDenied, Principal, Role
from novacron.vm.service import VMInfo, VMService

router = APIRouter(prefix="/v1/vms", tags=["vms"], responses=ERROR_RESPONSES)

NameArg = Annotated[str, Path(pattern=NAME_PATTERN, max_length=63, description="VM name")]
MAX_CONSOLE_LINES = 2000
MAX_STOP_TIMEOUT_S = 600.0
MIN_PLACEMENT_MIB = 64  # a kernel-path VM without memory_mib: QEMU's default is 128 MiB


def _out(info: VMInfo) -> VMOut:
    return VMOut.model_validate(info.as_dict())


def spec_from_request(req: VMCreate, principal: Principal) -> tuple[dict[str, Any], str | None]:
    """The VM spec a create request asks for, and its image profile (None for a host kernel)."""
    if req.kernel is not None:
        # A host path makes QEMU (running as the agent's user) open that file: admins only.
        if not principal.role.allows(Role.ADMIN):
            raise PermissionDenied("booting a host kernel path needs role admin", needed="admin",
                                   role=str(principal.role), field="kernel")  # fmt: skip
        spec: dict[str, Any] = {"name": req.name, "kernel": req.kernel, "machine": req.machine,
                                "accel": req.accel}  # fmt: skip
        for key in ("initrd", "cmdline", "vcpus", "memory_mib"):
            value = getattr(req, key)
            if value is not None:
                spec[key] = value
        return spec, None
    profile = req.profile or "test"
    if profile not in PROFILES:
        raise RequestFieldError(f"unknown image profile {profile!r}", field="profile",
                                known=",".join(sorted(PROFILES)))  # fmt: skip
    workload = req.workload.model_dump(exclude_none=True) if req.workload else {}
    try:
        spec = VMService.spec_from_image(
            req.name, profile, workload=workload, vcpus=req.vcpus, memory_mib=req.memory_mib,
            machine=req.machine, accel=req.accel,
        )  # fmt: skip
    except ImageSettingError as exc:
        raise RequestFieldError(exc.message, field="workload", **exc.context) from None
    return spec, profile


@router.get("", name="vm.list")
async def list_vms(svc: Services, _: Viewer) -> list[VMOut]:
    return [_out(i) for i in await svc.vms.list()]


@router.post("", name="vm.create", status_code=status.HTTP_201_CREATED)
async def create_vm(req: VMCreate, request: Request, svc: Services, who: Operator) -> VMOut:
    """Create on this node, or (on a control node, without ``node`` or naming another one) on the
    node the placer chooses over the registry: the request is forwarded to that node's agent."""
    set_target(request, f"vm/{req.name}")
    spec, profile = spec_from_request(req, who)
    control = getattr(request.app.state, "control", None)
    placed_here = False
    if isinstance(control, ControlPlane) and req.node != svc.node:
        node, api = await control.place(
            req.name, int(spec.get("vcpus") or 1), int(spec.get("memory_mib") or 0) or MIN_PLACEMENT_MIB,
            selector=req.selector, anti_affinity=req.anti_affinity, node=req.node,
        )  # fmt: skip
        if node != svc.node:
            set_target(request, f"vm/{req.name}@{node}")
            forwarded = await control.create_on(node, api, req.model_dump(mode="json", exclude_none=True))
            return VMOut.model_validate(forwarded)
        placed_here = True
    elif req.node is not None and req.node != svc.node:
        raise RequestFieldError("this node is not a control node: it creates VMs only on itself",
                                field="node", node=svc.node)  # fmt: skip
    try:
        info = await svc.vms.create(spec, image_profile=profile)
    except BaseException:
        if placed_here and isinstance(control, ControlPlane):
            control.release(svc.node, req.name)  # the reserved capacity goes back
        raise
    if req.start:
        info = await svc.vms.start(req.name, wait_ready=req.wait)
    return _out(info)


@router.get("/{name}", name="vm.show")
async def show_vm(name: NameArg, svc: Services, _: Viewer) -> VMOut:
    return _out(await svc.vms.show(name))


@router.delete("/{name}", name="vm.delete")
async def delete_vm(
    name: NameArg,
    request: Request,
    svc: Services,
    _: Operator,
    force: Annotated[bool, Query(description="stop it first if it runs")] = False,
) -> DeletedOut:
    set_target(request, f"vm/{name}")
    await svc.vms.delete(name, force=force)
    return DeletedOut(deleted=name)


@router.post("/{name}/start", name="vm.start")
async def start_vm(
    name: NameArg,
    request: Request,
    svc: Services,
    _: Operator,
    wait: Annotated[bool, Query(description="wait for the test guest's READY marker")] = False,
) -> VMOut:
    set_target(request, f"vm/{name}")
    return _out(await svc.vms.start(name, wait_ready=wait))


@router.post("/{name}/stop", name="vm.stop")
async def stop_vm(
    name: NameArg,
    request: Request,
    svc: Services,
    _: Operator,
    force: Annotated[bool, Query(description="kill QEMU instead of an ACPI power-off")] = False,
    timeout_s: Annotated[float | None, Query(gt=0, le=MAX_STOP_TIMEOUT_S)] = None,
) -> VMOut:
    set_target(request, f"vm/{name}")
    return _out(await svc.vms.stop(name, force=force, timeout_s=timeout_s))


@router.post("/{name}/pause", name="vm.pause")
async def pause_vm(name: NameArg, request: Request, svc: Services, _: Operator) -> VMOut:
    set_target(request, f"vm/{name}")
    return _out(await svc.vms.pause(name))


@router.post("/{name}/resume", name="vm.resume")
async def resume_vm(name: NameArg, request: Request, svc: Services, _: Operator) -> VMOut:
    set_target(request, f"vm/{name}")
    return _out(await svc.vms.resume(name))


@router.get("/{name}/console", name="vm.console")
async def console_vm(
    name: NameArg,
    svc: Services,
    _: Viewer,
    lines: Annotated[int, Query(ge=1, le=MAX_CONSOLE_LINES)] = 50,
) -> ConsoleOut:
    text = await svc.vms.console(name, tail_lines=lines)
    return ConsoleOut(name=name, lines=text.splitlines())


# ----- the test guest's control channel -----


@router.get("/{name}/guest/status", name="vm.guest.status")
async def guest_status(name: NameArg, svc: Services, _: Viewer) -> GuestStatus:
    async with await svc.vms.guest(name) as ctl:
        return await ctl.status()


@router.get("/{name}/guest/checksum", name="vm.guest.checksum")
async def guest_checksum(name: NameArg, svc: Services, _: Viewer) -> ChecksumResult:
    async with await svc.vms.guest(name) as ctl:
        return await ctl.checksum()


@router.get("/{name}/guest/verify", name="vm.guest.verify")
async def guest_verify(name: NameArg, svc: Services, _: Viewer) -> VerifyResult:
    async with await svc.vms.guest(name) as ctl:
        return await ctl.verify()


@router.post("/{name}/guest/dirty", name="vm.guest.dirty")
async def guest_dirty(
    name: NameArg, body: GuestDirtyIn, request: Request, svc: Services, _: Operator
) -> DirtyAck:
    set_target(request, f"vm/{name}")
    async with await svc.vms.guest(name) as ctl:
        return await ctl.dirty(body.rate, body.bytes_per_page, body.rewrite_rate)


__all__ = ["router", "spec_from_request"]
