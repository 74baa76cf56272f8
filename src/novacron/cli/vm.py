"""``novacron vm``: create and run VMs and talk to the test guest inside them: on this host, or through
the REST API when ``NOVACRON_SERVER`` or a non-local context (``novacron config``) names a server."""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel
from rich.table import Table

from novacron.api.client import ApiClient
from novacron.api.clientconfig import LOCAL_CONTEXT, connect, current_context, load_config
from novacron.cli.output import console, emit_json, run_command
from novacron.errors import UserError
from novacron.vm import VMInfo, VMService, local_service

app = typer.Typer(no_args_is_help=True)
guest_app = typer.Typer(no_args_is_help=True, help="Talk to the test guest's workload (control channel).")
app.add_typer(guest_app, name="guest")

T = TypeVar("T")

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
NameArg = Annotated[str, typer.Argument(help="VM name.")]

_STATE_STYLE = {"running": "green", "paused": "yellow", "crashed": "bold red", "incoming": "cyan"}


def _remote() -> bool:
    """Talk to an API server (``NOVACRON_SERVER``, or a current context other than ``local``, as
    ``novacron config`` sets them) instead of driving this host's QEMU and store directly."""
    if os.environ.get("NOVACRON_SERVER"):
        return True
    name, _ = current_context(load_config())
    return name != LOCAL_CONTEXT


def _run(body: Callable[[Any], Awaitable[T]], as_json: bool) -> T:
    """Run ``body`` against the VM service: the API client (same method names) or the local one."""

    async def main() -> T:
        if _remote():
            async with connect() as client:
                return await body(client)
        async with local_service() as svc:
            return await body(svc)

    return run_command(lambda: asyncio.run(main()), as_json)


def _print_info(info: VMInfo, as_json: bool) -> None:
    data = info.as_dict()
    if as_json:
        emit_json(data)
        return
    state = data["state"]
    style = _STATE_STYLE.get(state, "white")
    console.print(f"[bold]{data['name']}[/]  [{style}]{state}[/]", highlight=False)
    for key in ("qemu_runstate", "desired_state", "pid", "accel", "vcpus", "memory_mib", "machine",
                "image_profile", "node", "run_dir", "detail"):  # fmt: skip
        if data.get(key) is not None:
            console.print(f"  {key:14} {data[key]}", highlight=False)
    for line in data["log_tail"]:
        console.print(f"  | {line}", highlight=False, markup=False)


@app.command()
def create(  # noqa: PLR0917 - typer maps each parameter to a command-line option
    name: NameArg,
    profile: Annotated[str, typer.Option(help="Test guest image profile to boot (test|default).")] = "test",
    vcpus: Annotated[int | None, typer.Option(help="vCPUs (default: the profile's).")] = None,
    memory_mib: Annotated[
        int | None, typer.Option("--memory", help="Memory in MiB (default: the profile's).")
    ] = None,
    kernel: Annotated[Path | None, typer.Option(help="Boot this kernel instead of the test image.")] = None,
    initrd: Annotated[Path | None, typer.Option(help="Initrd to go with --kernel.")] = None,
    cmdline: Annotated[str | None, typer.Option(help="Kernel command line to go with --kernel.")] = None,
    machine: Annotated[str, typer.Option(help="QEMU machine type (resolved to a versioned one).")] = "pc",
    accel: Annotated[str, typer.Option(help="auto|kvm|tcg")] = "auto",
    data_mib: Annotated[int | None, typer.Option(help="Test guest: MiB of data in its tmpfs.")] = None,
    ws_mib: Annotated[int | None, typer.Option(help="Test guest: working-set MiB.")] = None,
    dirty_rate: Annotated[
        int | None, typer.Option(help="Test guest: pages dirtied per second at boot.")
    ] = None,
    dirty_bytes: Annotated[
        int | None, typer.Option(help="Test guest: bytes changed per dirtied page.")
    ] = None,
    start: Annotated[bool, typer.Option("--start", help="Start it right away.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="With --start: wait for the guest's READY.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Define a VM (by default booting the test guest image)."""

    async def body(svc: Any) -> Any:
        if isinstance(svc, ApiClient):
            return await svc.create(_create_request())
        spec: dict[str, Any]
        image_profile: str | None
        if kernel is not None:
            if any(v is not None for v in (data_mib, ws_mib, dirty_rate, dirty_bytes)):
                raise UserError("workload options apply to the test image only, not to --kernel", vm=name)
            spec = {"name": name, "kernel": str(kernel), "machine": machine, "accel": accel}
            for key, value in (
                ("initrd", initrd),
                ("cmdline", cmdline),
                ("vcpus", vcpus),
                ("memory_mib", memory_mib),
            ):
                if value is not None:
                    spec[key] = str(value) if isinstance(value, Path) else value
            image_profile = None
        else:
            if initrd is not None or cmdline is not None:
                raise UserError("--initrd and --cmdline need --kernel", vm=name)
            workload = {
                k: v
                for k, v in (
                    ("data_mib", data_mib),
                    ("ws_mib", ws_mib),
                    ("dirty_rate", dirty_rate),
                    ("dirty_bytes", dirty_bytes),
                )
                if v is not None
            }
            spec = VMService.spec_from_image(
                name,
                profile,
                workload=workload,
                vcpus=vcpus,
                memory_mib=memory_mib,
                machine=machine,
                accel=accel,
            )
            image_profile = profile
        info = await svc.create(spec, image_profile=image_profile)
        if start:
            info = await svc.start(name, wait_ready=wait)
        return info

    def _create_request() -> dict[str, Any]:
        """The same VM as an API request; the server resolves images and validates it."""
        request: dict[str, Any] = {"name": name, "machine": machine, "accel": accel, "start": start,
                                   "wait": wait}  # fmt: skip
        fields = {"kernel": kernel, "initrd": initrd, "cmdline": cmdline, "vcpus": vcpus,
                  "memory_mib": memory_mib}  # fmt: skip
        request.update({k: str(v) if isinstance(v, Path) else v for k, v in fields.items() if v is not None})
        if kernel is None:
            request["profile"] = profile
            workload = {"data_mib": data_mib, "ws_mib": ws_mib, "dirty_rate": dirty_rate,
                        "dirty_bytes": dirty_bytes}  # fmt: skip
            if any(v is not None for v in workload.values()):
                request["workload"] = {k: v for k, v in workload.items() if v is not None}
        return request

    _print_info(_run(body, as_json), as_json)


@app.command()
def start(
    name: NameArg,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the test guest's READY marker.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Start a VM."""
    _print_info(_run(lambda svc: svc.start(name, wait_ready=wait), as_json), as_json)


@app.command()
def stop(
    name: NameArg,
    force: Annotated[bool, typer.Option("--force", help="Kill QEMU (SIGTERM, then SIGKILL).")] = False,
    timeout: Annotated[float | None, typer.Option(help="Seconds to wait for a graceful power-off.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop a VM: ACPI power-off (graceful, the default) or --force."""
    _print_info(_run(lambda svc: svc.stop(name, force=force, timeout_s=timeout), as_json), as_json)


@app.command()
def pause(name: NameArg, as_json: JsonOpt = False) -> None:
    """Pause a running VM (its vCPUs stop)."""
    _print_info(_run(lambda svc: svc.pause(name), as_json), as_json)


@app.command()
def resume(name: NameArg, as_json: JsonOpt = False) -> None:
    """Resume a paused VM."""
    _print_info(_run(lambda svc: svc.resume(name), as_json), as_json)


@app.command()
def show(name: NameArg, as_json: JsonOpt = False) -> None:
    """Show one VM: inventory record and live state."""
    _print_info(_run(lambda svc: svc.show(name), as_json), as_json)


@app.command("list")
def list_vms(as_json: JsonOpt = False) -> None:
    """List the VMs in the inventory with their live state."""
    infos = _run(lambda svc: svc.list(), as_json)
    if as_json:
        emit_json([i.as_dict() for i in infos])
        return
    table = Table("name", "state", "desired", "vcpus", "memory", "accel", "pid", "node")
    for info in infos:
        d = info.as_dict()
        style = _STATE_STYLE.get(d["state"], "white")
        table.add_row(
            d["name"],
            f"[{style}]{d['state']}[/]",
            d["desired_state"],
            str(d["vcpus"]),
            f"{d['memory_mib']} MiB",
            d["accel"] or "-",
            str(d["pid"] or "-"),
            d["node"],
        )
    console.print(table)


@app.command()
def delete(
    name: NameArg,
    force: Annotated[bool, typer.Option("--force", help="Stop it first if it is running.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete a VM (it must be stopped unless --force)."""
    _run(lambda svc: svc.delete(name, force=force), as_json)
    if as_json:
        emit_json({"deleted": name})
    else:
        console.print(f"deleted {name}")


@app.command("console")
def console_cmd(
    name: NameArg,
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many of the last lines.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Print the end of a VM's serial console log."""
    text = _run(lambda svc: svc.console(name, tail_lines=lines), as_json)
    if as_json:
        emit_json({"name": name, "lines": text.splitlines()})
    else:
        console.print(text, highlight=False, markup=False)


# ----- guest -----


def _guest(name: str, as_json: bool, action: Callable[[Any], Awaitable[dict[str, Any]]]) -> None:
    async def body(svc: Any) -> dict[str, Any]:
        guest = svc.guest(name)  # the local service opens the channel (awaitable); the client does not
        async with await guest if inspect.isawaitable(guest) else guest as ctl:
            return await action(ctl)

    result = _run(body, as_json)
    if as_json:
        emit_json(result)
    else:
        for key, value in result.items():
            console.print(f"{key:16} {value}", highlight=False)


def _asdict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, BaseModel):  # answers through the API
        return obj.model_dump()
    return asdict(obj)


@guest_app.command("status")
def guest_status(name: NameArg, as_json: JsonOpt = False) -> None:
    """Workload status: uptime, heartbeats, requested and achieved dirty rate."""

    async def act(ctl: Any) -> dict[str, Any]:
        return _asdict(await ctl.status())

    _guest(name, as_json, act)


@guest_app.command("verify")
def guest_verify(name: NameArg, as_json: JsonOpt = False) -> None:
    """Verify every working-set page against its checksum (exit 1 if any is corrupted)."""
    result: dict[str, Any] = {}

    async def act(ctl: Any) -> dict[str, Any]:
        result.update(_asdict(await ctl.verify()))
        return result

    _guest(name, as_json, act)
    if result.get("corrupted"):
        raise SystemExit(1)


@guest_app.command("checksum")
def guest_checksum(name: NameArg, as_json: JsonOpt = False) -> None:
    """Checksum of the guest's static tmpfs data (equal before and after a migration)."""

    async def act(ctl: Any) -> dict[str, Any]:
        return _asdict(await ctl.checksum())

    _guest(name, as_json, act)


@guest_app.command("dirty")
def guest_dirty(
    name: NameArg,
    rate: Annotated[int, typer.Option(help="Pages per second (0 stops).")],
    bytes_per_page: Annotated[int, typer.Option("--bytes", help="Bytes changed per dirtied page.")] = 128,
    rewrite: Annotated[int | None, typer.Option(help="Full page rewrites per second.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Set the workload's dirty rate."""

    async def act(ctl: Any) -> dict[str, Any]:
        return _asdict(await ctl.dirty(rate, bytes_per_page, rewrite))

    _guest(name, as_json, act)
