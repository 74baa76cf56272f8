"""``novacron image``: build and inspect the test guest image."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TaskID, TextColumn

from novacron.cli.output import console, emit_json, err_console, run_command
from novacron.image import PROFILES, GuestImage, build_image, find_image

app = typer.Typer(no_args_is_help=True)

ProfileOpt = Annotated[str, typer.Option("--profile", "-p", help=f"One of: {', '.join(PROFILES)}, all.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _profiles(profile: str) -> list[str]:
    return list(PROFILES) if profile == "all" else [profile]


def _summary(img: GuestImage) -> dict[str, object]:
    m = img.manifest
    return {
        "profile": m.profile,
        "directory": str(img.directory),
        "kernel": f"{m.kernel_package} {m.kernel_version}",
        "memory_mib": m.memory_mib,
        "defaults": m.defaults,
        "corpus_mib": round((m.corpus.program_bytes + m.corpus.text_bytes) / 2**20, 1),
        "initrd_mib": round(m.initrd_bytes / 2**20, 1),
        "content_hash": m.content_hash,
    }


def _print(images: list[GuestImage], as_json: bool) -> None:
    if as_json:
        emit_json([_summary(i) for i in images] if len(images) != 1 else _summary(images[0]))
        return
    for img in images:
        for key, value in _summary(img).items():
            console.print(f"{key:13} {value}", highlight=False)


@app.command()
def build(
    profile: ProfileOpt = "test",
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even if the cached image is current.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build the test guest image (cached: unchanged inputs reuse the last build)."""

    def body() -> list[GuestImage]:
        built = []
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            console=err_console, transient=True, disable=as_json,
        ) as progress:  # fmt: skip
            for name in _profiles(profile):
                task = progress.add_task(f"[{name}] starting", total=None)

                def report(
                    step: str, done: int, total: int, task_id: TaskID = task, prof: str = name
                ) -> None:
                    progress.update(task_id, description=f"[{prof}] {step}", completed=done,
                                    total=total or None)  # fmt: skip

                built.append(build_image(name, force=force, progress=report))
                progress.remove_task(task)
        return built

    _print(run_command(body, as_json), as_json)


@app.command()
def show(profile: ProfileOpt = "test", as_json: JsonOpt = False) -> None:
    """Show the current image of a profile."""
    _print(run_command(lambda: [find_image(p) for p in _profiles(profile)], as_json), as_json)
