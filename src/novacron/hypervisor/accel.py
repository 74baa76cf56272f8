"""Choosing the accelerator: ``auto`` uses KVM only where it can really run a guest.

On some hosts /dev/kvm exists but guests hang right after the firmware (the QEMU process spins in the
kernel). So ``auto`` boots the VM's own kernel under KVM for a few seconds and waits for the kernel's
first console line ("Linux version"); anything else, including a timeout, means TCG. The probe process
is always killed and reaped, and the verdict is cached per boot of the host, QEMU binary and kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from novacron.hypervisor.errors import HypervisorError
from novacron.observability.log import log_event

KVM_DEVICE = Path("/dev/kvm")
PROBE_TIMEOUT_S = 6.0
PROBE_KILL_WAIT_S = 5.0
PROBE_POLL_S = 0.05
PROBE_MEMORY_MIB = 128
PROBE_MARKER = b"Linux version"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

log = logging.getLogger("novacron.hypervisor.accel")


@dataclass(frozen=True)
class AccelVerdict:
    accel: str  # "kvm" or "tcg"
    reason: str


def kvm_device_usable() -> bool:
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


class AccelChooser:
    def __init__(self, qemu_binary: str, cache_file: Path, timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self._qemu = qemu_binary
        self._cache_file = cache_file
        self._timeout_s = timeout_s
        self._lock = asyncio.Lock()

    async def choose(self, requested: str, kernel: Path | None, cpu_model: str | None = None) -> AccelVerdict:
        if requested == "tcg":
            return AccelVerdict("tcg", "requested")
        if requested == "kvm":
            if not kvm_device_usable():
                raise HypervisorError(
                    "KVM was requested but /dev/kvm cannot be opened", device=str(KVM_DEVICE)
                )
            return AccelVerdict("kvm", "requested")
        if not kvm_device_usable():
            return AccelVerdict("tcg", "no usable /dev/kvm")
        if kernel is None:
            return AccelVerdict("tcg", "no kernel to probe KVM with")
        async with self._lock:
            key = f"{self._cache_key(kernel)}|cpu={cpu_model or 'default'}"
            cached = self._read_cache().get(key)
            if cached is not None:
                return AccelVerdict(**cached)
            verdict = await self._probe(kernel, cpu_model)
            cache = self._read_cache()
            cache[key] = asdict(verdict)
            self._write_cache(cache)
            log_event(log, "accel.probed", accel=verdict.accel, reason=verdict.reason)
            return verdict

    def _cache_key(self, kernel: Path) -> str:
        boot = BOOT_ID.read_text().strip() if BOOT_ID.is_file() else "unknown-boot"
        qst = Path(self._qemu).stat() if Path(self._qemu).exists() else None
        qemu_id = f"{self._qemu}:{qst.st_size}:{qst.st_mtime_ns}" if qst else self._qemu
        kst = kernel.stat()
        return f"{boot}|{qemu_id}|{kernel}:{kst.st_size}:{kst.st_mtime_ns}"

    def _read_cache(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self._cache_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_cache(self, cache: dict[str, dict[str, str]]) -> None:
        # Only the newest few entries matter (one per boot x kernel); keep the file small.
        entries = list(cache.items())[-16:]
        self._cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(entries), indent=2))
        os.replace(tmp, self._cache_file)

    async def _probe(self, kernel: Path, cpu_model: str | None) -> AccelVerdict:
        with tempfile.TemporaryDirectory(prefix="novacron-kvm-probe-") as tmp:
            serial = Path(tmp) / "serial.log"
            argv = [
                self._qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-machine", "pc,accel=kvm", "-m", str(PROBE_MEMORY_MIB),
                "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1",
                "-serial", f"file:{serial}",
            ]  # fmt: skip
            # Probe with the CPU model the VM will use: it decides whether KVM can run it.
            if cpu_model:
                argv += ["-cpu", cpu_model]
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            started = time.monotonic()
            try:
                while time.monotonic() - started < self._timeout_s:
                    if serial.is_file() and PROBE_MARKER in serial.read_bytes():
                        return AccelVerdict(
                            "kvm", f"kernel booted under KVM in {time.monotonic() - started:.1f}s"
                        )
                    if proc.returncode is not None:
                        return AccelVerdict("tcg", f"KVM probe exited early (code {proc.returncode})")
                    # Polling a file the probe writes: there is no event to wait on.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.wait(), PROBE_POLL_S)
                return AccelVerdict("tcg", f"no kernel output under KVM within {self._timeout_s:.0f}s")
            finally:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    try:
                        await asyncio.wait_for(proc.wait(), PROBE_KILL_WAIT_S)
                    except TimeoutError:
                        log_event(log, "accel.probe_unkillable", logging.ERROR, pid=proc.pid)
