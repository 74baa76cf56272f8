"""Builds the test guest image: Debian cloud kernel + busybox initramfs + corpus + workload.

Artefacts live in ``cache_dir()/images/<profile>-<content hash>/`` (vmlinuz, initrd.zst,
manifest.json). The content hash covers every input (profile, kernel package version, busybox,
gcc, the guest sources, the corpus file list with sizes and mtimes), so an unchanged build is reused
and any change rebuilds. ``<profile>.current`` names the directory :func:`find_image` returns; builds
older than the previous one are removed, so the cache holds at most two images per profile.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import zstandard

from novacron.errors import NotFoundError
from novacron.image.corpus import Corpus, select_corpus
from novacron.image.cpio import CpioWriter
from novacron.image.kernel import (
    KernelPackage,
    download_kernel_deb,
    extract_kernel,
    resolve_kernel_package,
)
from novacron.image.model import (
    BASE_KERNEL_ARGS,
    MANIFEST_VERSION,
    CorpusSummary,
    GuestImage,
    ImageError,
    ImageManifest,
)
from novacron.image.profiles import Profile, get_profile
from novacron.paths import cache_dir

# Bump when the archive layout or anything else not captured by the inputs below changes.
BUILDER_VERSION = "1"
BUSYBOX = Path("/bin/busybox")
ZSTD_LEVEL = 3  # decompression speed (what boot time sees) barely depends on the level
GCC_TIMEOUT_S = 120.0
KEEP_PREVIOUS_BUILDS = 1
GUEST_SOURCES = ("init", "workload.c", "acpi/PWRF/00000080")

Progress = Callable[[str, int, int], None]
"""progress(step, done, total): total 0 means the step has no measurable size."""


def _no_progress(step: str, done: int, total: int) -> None:
    return None


def images_dir() -> Path:
    return cache_dir() / "images"


def guest_source_dir() -> Path:
    """Where the guest's sources live: ``$NOVACRON_GUEST_SRC`` or ``guest/`` of the source tree."""
    env = os.environ.get("NOVACRON_GUEST_SRC")
    path = Path(env) if env else Path(__file__).resolve().parents[3] / "guest"
    missing = [name for name in GUEST_SOURCES if not (path / name).is_file()]
    if missing:
        raise ImageError(
            "guest sources not found (set NOVACRON_GUEST_SRC to the repository's guest/ directory)",
            directory=str(path),
            missing=",".join(missing),
        )
    return path


def _tool_version(cmd: list[str], what: str) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except FileNotFoundError:
        raise ImageError(f"{what} is not installed (run `make deps`)", command=cmd[0]) from None
    except subprocess.CalledProcessError as exc:
        raise ImageError(f"{what} does not work", command=" ".join(cmd), detail=exc.stderr) from None
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def _busybox_version() -> str:
    if not BUSYBOX.is_file():
        raise ImageError("busybox is missing: install the Debian package busybox-static", path=str(BUSYBOX))
    head = _tool_version([str(BUSYBOX)], "busybox")
    # A dynamically linked busybox would fail inside the initramfs, which has no libc.
    try:
        status = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", "busybox-static"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
    except FileNotFoundError:
        status = ""
    if "install ok installed" not in status:
        raise ImageError("the guest needs a static busybox: install the Debian package busybox-static")
    return head


@dataclass(frozen=True)
class _BuildInputs:
    """Everything an image is made from; its hash names the image directory."""

    profile: Profile
    package: KernelPackage
    busybox: str
    gcc: str
    src: Path
    corpus: Corpus

    def content_hash(self) -> str:
        h = hashlib.sha256()
        h.update(f"builder {BUILDER_VERSION}\nargs {BASE_KERNEL_ARGS}\n".encode())
        h.update(json.dumps(asdict(self.profile), sort_keys=True).encode())
        h.update(f"\n{self.package.name}={self.package.version}\n{self.busybox}\n{self.gcc}\n".encode())
        h.update(BUSYBOX.read_bytes())
        for name in GUEST_SOURCES:
            h.update(name.encode() + b"\0" + (self.src / name).read_bytes())
        for line in self.corpus.fingerprint_lines():
            h.update(line.encode())
        return h.hexdigest()[:16]


@contextmanager
def _build_lock() -> Iterator[None]:
    images_dir().mkdir(parents=True, exist_ok=True)
    with (images_dir() / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _pointer(profile: str) -> Path:
    return images_dir() / f"{profile}.current"


def _load(directory: Path) -> GuestImage | None:
    manifest = directory / "manifest.json"
    if not (
        manifest.is_file() and (directory / "vmlinuz").is_file() and (directory / "initrd.zst").is_file()
    ):
        return None
    try:
        data = ImageManifest.model_validate_json(manifest.read_bytes())
    except ValueError:
        return None
    if data.manifest_version != MANIFEST_VERSION:
        return None
    return GuestImage(directory=directory, manifest=data)


def find_image(profile: str = "test") -> GuestImage:
    """The current built image of ``profile``; a NotFoundError says how to build it when there is none."""
    get_profile(profile)
    pointer = _pointer(profile)
    image = _load(images_dir() / pointer.read_text().strip()) if pointer.is_file() else None
    if image is None:
        raise NotFoundError(
            f"no guest image for profile {profile!r}: run `novacron image build --profile {profile}`",
            profile=profile,
            cache=str(images_dir()),
        )
    return image


def _compile_workload(src: Path, out: Path) -> None:
    cmd = ["gcc", "-O2", "-static", "-Wall", "-o", str(out), str(src / "workload.c")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=GCC_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise ImageError("gcc is not installed (Debian packages gcc and libc6-dev)") from None
    if proc.returncode != 0:
        raise ImageError(
            "compiling the guest workload failed",
            command=" ".join(cmd),
            detail=" | ".join(proc.stderr.strip().splitlines()[-5:]),
        )


def _write_initramfs(
    out_path: Path, inputs: _BuildInputs, workload: Path, modules: tuple[Path, ...], progress: Progress
) -> int:
    src, corpus = inputs.src, inputs.corpus
    total = corpus.program_bytes + corpus.text_bytes
    done = 0
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1)
    with out_path.open("wb") as raw, cctx.stream_writer(raw, closefd=False) as zout:
        cpio = CpioWriter(zout)
        for d in (
            "bin",
            "dev",
            "proc",
            "sys",
            "tmp",
            "etc",
            "etc/acpi",
            "etc/acpi/PWRF",
            "lib",
            "lib/modules",
            "corpus",
            "corpus/prog",
            "corpus/text",
        ):
            cpio.directory(d)
        # The kernel opens /dev/console for /init before anything is mounted.
        cpio.char_device("dev/console", 5, 1)
        cpio.char_device("dev/null", 1, 3, 0o666)
        cpio.file("bin/busybox", BUSYBOX, 0o755)
        cpio.symlink("bin/sh", "busybox")
        cpio.file("init", src / "init", 0o755)
        cpio.file("etc/acpi/PWRF/00000080", src / "acpi/PWRF/00000080", 0o755)
        cpio.file("bin/nc-workload", workload, 0o755)
        for module in modules:
            cpio.file(f"lib/modules/{module.name}", module)
        for cls, files in (("prog", corpus.programs), ("text", corpus.texts)):
            for index, f in enumerate(files):
                try:
                    done += cpio.file(f"corpus/{cls}/{index:05d}", f.path)
                except OSError as exc:
                    raise ImageError("cannot read a corpus file", path=str(f.path), reason=str(exc)) from None
                progress("packing corpus", done, total)
        cpio.finish()
        uncompressed = cpio.bytes_written
    return uncompressed


def build_image(
    profile: str = "test", *, force: bool = False, progress: Progress = _no_progress
) -> GuestImage:
    """Build (or reuse) the image of ``profile`` and make it the current one."""
    prof = get_profile(profile)
    src = guest_source_dir()
    with _build_lock():
        progress("resolving inputs", 0, 0)
        inputs = _BuildInputs(
            profile=prof,
            package=resolve_kernel_package(),
            busybox=_busybox_version(),
            gcc=_tool_version(["gcc", "-dumpfullversion"], "gcc"),
            src=src,
            corpus=select_corpus(prof.corpus_program_bytes, prof.corpus_text_bytes),
        )
        digest = inputs.content_hash()
        final = images_dir() / f"{profile}-{digest}"
        image = None if force else _load(final)
        if image is None:
            image = _build_into(final, inputs, digest, progress)
        _pointer(profile).write_text(final.name + "\n")
        # Keep the previous build too: VMs defined from it (and migration destinations, which need
        # the same kernel and initrd files) keep working until the next rebuild.
        older = sorted(
            (p for p in images_dir().glob(f"{profile}-*") if p.is_dir() and p != final),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for old in older[KEEP_PREVIOUS_BUILDS:]:
            shutil.rmtree(old, ignore_errors=True)
        progress("done", 1, 1)
        return image


def _build_into(final: Path, inputs: _BuildInputs, digest: str, progress: Progress) -> GuestImage:
    prof, pkg, corpus = inputs.profile, inputs.package, inputs.corpus
    work = Path(tempfile.mkdtemp(prefix=f".{prof.name}-", dir=images_dir()))
    try:
        progress("downloading kernel", 0, 0)
        deb = download_kernel_deb(pkg, cache_dir() / "debs")
        kernel = extract_kernel(pkg, deb, work)
        progress("compiling workload", 0, 0)
        workload = work / "nc-workload"
        _compile_workload(inputs.src, workload)
        progress("packing corpus", 0, corpus.program_bytes + corpus.text_bytes)
        uncompressed = _write_initramfs(work / "initrd.zst", inputs, workload, kernel.modules, progress)
        for leftover in (*kernel.modules, workload):
            leftover.unlink()
        w = prof.workload
        manifest = ImageManifest(
            manifest_version=MANIFEST_VERSION,
            profile=prof.name,
            content_hash=digest,
            built_at=time.time(),
            kernel_package=pkg.name,
            kernel_version=pkg.version,
            kernel_release=kernel.release,
            busybox_version=inputs.busybox,
            gcc_version=inputs.gcc,
            memory_mib=prof.memory_mib,
            vcpus=prof.vcpus,
            base_cmdline=BASE_KERNEL_ARGS,
            defaults={
                "data_mib": w.data_mib,
                "ws_mib": w.ws_mib,
                "dirty_rate": w.dirty_rate,
                "dirty_bytes": w.dirty_bytes,
                "rewrite_rate": w.rewrite_rate,
            },
            corpus=CorpusSummary(
                program_files=len(corpus.programs),
                program_bytes=corpus.program_bytes,
                text_files=len(corpus.texts),
                text_bytes=corpus.text_bytes,
            ),
            kernel_bytes=(work / "vmlinuz").stat().st_size,
            initrd_bytes=(work / "initrd.zst").stat().st_size,
            initrd_uncompressed_bytes=uncompressed,
        )
        (work / "manifest.json").write_text(manifest.model_dump_json(indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return GuestImage(directory=final, manifest=manifest)
