"""What a built guest image is: its files and its manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from novacron.errors import NovacronError, UserError
from novacron.image.profiles import WorkloadSettings


class ImageError(NovacronError):
    """Building or finding a guest image failed."""


class ImageSettingError(UserError):
    """A workload setting asked of an image is invalid (unknown, out of range)."""


MANIFEST_VERSION = 1

# Kernel arguments every test guest gets. init_on_free=1: pages the guest frees (the loaded initrd
# after unpacking, trimmed corpus files) read as zero instead of keeping stale bytes in "free" memory,
# so guest RAM holds exactly the content we describe. panic=-1 + QEMU's -no-reboot: a panic ends QEMU.
BASE_KERNEL_ARGS = "console=ttyS0,115200 init_on_free=1 panic=-1 loglevel=4 rdinit=/init"


class CorpusSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    program_files: int
    program_bytes: int
    text_files: int
    text_bytes: int


class ImageManifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    manifest_version: int
    profile: str
    content_hash: str
    built_at: float
    kernel_package: str
    kernel_version: str
    kernel_release: str
    busybox_version: str
    gcc_version: str
    memory_mib: int
    vcpus: int
    base_cmdline: str
    defaults: dict[str, int]
    corpus: CorpusSummary
    kernel_bytes: int
    initrd_bytes: int
    initrd_uncompressed_bytes: int


@dataclass(frozen=True)
class GuestImage:
    """A built image: kernel, compressed initramfs and the manifest describing them."""

    directory: Path
    manifest: ImageManifest

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.zst"

    @property
    def profile(self) -> str:
        return self.manifest.profile

    @property
    def memory_mib(self) -> int:
        return self.manifest.memory_mib

    @property
    def vcpus(self) -> int:
        return self.manifest.vcpus

    def workload(self, **overrides: int) -> WorkloadSettings:
        """The image's workload defaults with some fields replaced (e.g. ``data_mib=8``)."""
        values = dict(self.manifest.defaults)
        unknown = set(overrides) - set(values)
        if unknown:
            raise ImageSettingError("unknown workload setting", settings=",".join(sorted(unknown)))
        values.update(overrides)
        return WorkloadSettings(**values)

    def kernel_cmdline(self, **overrides: int) -> str:
        """Kernel command line for this image; ``overrides`` change workload settings at boot.

        ``data_mib`` cannot exceed what the image holds (the corpus is built for the profile's size);
        the guest silently keeps what exists, so we refuse here instead.
        """
        settings = self.workload(**overrides)
        limit = self.manifest.defaults["data_mib"]
        if settings.data_mib > limit:
            raise ImageSettingError(
                "data_mib exceeds what this image holds",
                requested=settings.data_mib,
                limit=limit,
                profile=self.profile,
            )
        for field in ("ws_mib", "dirty_bytes"):
            if getattr(settings, field) < 1:
                raise ImageSettingError("workload setting must be at least 1", setting=field)
        return f"{self.manifest.base_cmdline} {settings.boot_args()}"
