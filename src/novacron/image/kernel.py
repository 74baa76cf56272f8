"""The guest kernel: Debian's cloud kernel, found through the ``linux-image-cloud-amd64`` metapackage.

The metapackage's dependency names the current versioned kernel package, so kernel version bumps in
Debian do not break the build. The package is downloaded with ``apt-get download`` (never installed)
and unpacked with ``dpkg-deb``; we keep the kernel and the two modules the guest loads.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from novacron.image.model import ImageError

METAPACKAGE = "linux-image-cloud-amd64"
# Modules the guest's ACPI power button needs (both are modules in the cloud kernel).
GUEST_MODULES = ("kernel/drivers/input/evdev.ko", "kernel/drivers/acpi/button.ko")
APT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class KernelPackage:
    name: str
    version: str


@dataclass(frozen=True)
class KernelFiles:
    package: KernelPackage
    release: str
    vmlinuz: Path
    modules: tuple[Path, ...]


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=APT_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise ImageError(f"{cmd[0]} is not installed (run `make deps`)", step=what) from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"{cmd[0]} timed out", step=what, timeout_s=APT_TIMEOUT_S) from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ImageError(f"{what} failed", command=" ".join(cmd), detail=" | ".join(detail))
    return proc.stdout


def _candidate_dependency() -> KernelPackage | None:
    out = _run(["apt-cache", "depends", METAPACKAGE], "resolving the kernel package")
    names = re.findall(r"Depends:\s*(linux-image-\S+)", out)
    if not names:
        return None
    name = names[0]
    policy = _run(["apt-cache", "policy", name], "resolving the kernel version")
    match = re.search(r"Candidate:\s*(\S+)", policy)
    if not match or match.group(1) == "(none)":
        return None
    return KernelPackage(name=name, version=match.group(1))


def resolve_kernel_package() -> KernelPackage:
    """The versioned kernel package the metapackage depends on (apt lists refreshed once if needed)."""
    try:
        found = _candidate_dependency()
    except ImageError:
        found = None
    if found is None and os.geteuid() == 0:
        _run(["apt-get", "update", "-q"], "apt-get update (no package lists for the kernel)")
        found = _candidate_dependency()
    if found is None:
        raise ImageError(
            "cannot resolve the Debian cloud kernel package; run `apt-get update` as root",
            metapackage=METAPACKAGE,
        )
    return found


def download_kernel_deb(pkg: KernelPackage, debs_dir: Path) -> Path:
    debs_dir.mkdir(parents=True, exist_ok=True)
    arch_version = pkg.version.replace(":", "%3a")
    existing = sorted(debs_dir.glob(f"{pkg.name}_{arch_version}_*.deb"))
    if existing:
        return existing[0]
    with tempfile.TemporaryDirectory(dir=debs_dir) as tmp:
        try:
            _run(
                ["apt-get", "download", "-q", f"{pkg.name}={pkg.version}"],
                "downloading the kernel",
                cwd=Path(tmp),
            )
        except ImageError as exc:
            raise ImageError(
                "cannot download the kernel package from the Debian mirror (network or apt sources?)",
                package=f"{pkg.name}={pkg.version}",
                detail=exc.context.get("detail"),
            ) from None
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise ImageError("apt-get download produced no package", package=pkg.name)
        # apt-get download runs unsandboxed as root here; make the file readable to later steps.
        final = debs_dir / debs[0].name
        shutil.move(debs[0], final)
    return final


def extract_kernel(pkg: KernelPackage, deb: Path, out_dir: Path) -> KernelFiles:
    """Unpack the kernel and the guest's modules from ``deb`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        root = Path(tmp)
        _run(["dpkg-deb", "-x", str(deb), str(root)], "unpacking the kernel package")
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if len(kernels) != 1:
            raise ImageError("kernel package holds no single vmlinuz", package=pkg.name)
        release = kernels[0].name.removeprefix("vmlinuz-")
        vmlinuz = out_dir / "vmlinuz"
        shutil.copyfile(kernels[0], vmlinuz)
        modules: list[Path] = []
        mod_root = root / "lib/modules" / release
        for rel in GUEST_MODULES:
            src = mod_root / rel
            if not src.is_file():
                raise ImageError("kernel package lacks a module the guest needs", module=rel)
            dst = out_dir / Path(rel).name
            shutil.copyfile(src, dst)
            modules.append(dst)
    return KernelFiles(package=pkg, release=release, vmlinuz=vmlinuz, modules=tuple(modules))
