"""Guest image profiles: how big a guest is and what its workload does by default.

A profile fixes the corpus an image holds (the most data it can serve) and the defaults written into
its kernel command line. Every amount can be lowered at boot with ``novacron.<key>=`` arguments, so one
image serves several sizes (see :meth:`novacron.image.GuestImage.kernel_cmdline`).
"""

from __future__ import annotations

from dataclasses import dataclass

from novacron.errors import UserError

# Share of the tmpfs data per content class (percent); the rest is generated heap-like records.
PROGRAM_PERCENT = 55
TEXT_PERCENT = 30
RANDOM_PERCENT = 10


@dataclass(frozen=True)
class WorkloadSettings:
    """What the guest workload does; each field is also a ``novacron.<field>=`` boot argument."""

    data_mib: int
    ws_mib: int
    dirty_rate: int
    dirty_bytes: int
    rewrite_rate: int

    def boot_args(self) -> str:
        return (
            f"novacron.data_mib={self.data_mib} novacron.ws_mib={self.ws_mib} "
            f"novacron.dirty_rate={self.dirty_rate} novacron.dirty_bytes={self.dirty_bytes} "
            f"novacron.rewrite_rate={self.rewrite_rate}"
        )


@dataclass(frozen=True)
class Profile:
    name: str
    memory_mib: int
    vcpus: int
    workload: WorkloadSettings

    @property
    def corpus_program_bytes(self) -> int:
        return self.workload.data_mib * PROGRAM_PERCENT * (1 << 20) // 100

    @property
    def corpus_text_bytes(self) -> int:
        return self.workload.data_mib * TEXT_PERCENT * (1 << 20) // 100


PROFILES: dict[str, Profile] = {
    # Small and fast: for tests. Boots to READY in a few seconds under TCG.
    "test": Profile(
        name="test",
        memory_mib=192,
        vcpus=1,
        workload=WorkloadSettings(data_mib=24, ws_mib=8, dirty_rate=200, dirty_bytes=128, rewrite_rate=16),
    ),
    # Many at once (the 3-host cluster test runs 20 under TCG on two cores): a small corpus keeps the
    # initramfs (unpacked at every boot) and the memory to migrate small; same workload and checks.
    "tiny": Profile(
        name="tiny",
        memory_mib=96,
        vcpus=1,
        workload=WorkloadSettings(data_mib=4, ws_mib=2, dirty_rate=20, dirty_bytes=128, rewrite_rate=4),
    ),
    # The realistic guest of the benchmarks and the demo (figures in shared/QEMU-MIGRATION-NOTES.md).
    "default": Profile(
        name="default",
        memory_mib=768,
        vcpus=1,
        workload=WorkloadSettings(data_mib=320, ws_mib=64, dirty_rate=2250, dirty_bytes=128, rewrite_rate=64),
    ),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UserError("unknown image profile", profile=name, known=",".join(sorted(PROFILES))) from None
