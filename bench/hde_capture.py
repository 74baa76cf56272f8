"""Capture real memory of the test guest for bench/hde.py (cached, so benchmark runs are fast).

Four images of guest RAM, taken with QMP ``pmemsave`` while the guest is paused (``stop``/``cont``) so
each image is one consistent instant:

* ``a-boot``: guest A right after READY (the first full pass);
* ``a-10s`` / ``a-60s``: guest A after 10 s and 60 s of its workload dirtying memory at the profile's
  rate (~2,250 pages/s, 128 bytes each, plus full-page rewrites);
* ``b-boot``: guest B, booted from the same image, right after READY (a sibling of A).

Guest RAM below 4 GiB is one block (``pc.ram``) starting at guest-physical address 0, so the image's
byte offset is the RAM block offset QEMU's migration stream would carry.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from novacron.guest.boot import BootedGuest, boot_test_guest
from novacron.image import find_image
from novacron.paths import cache_dir

CAPTURES = ("a-boot", "a-10s", "a-60s", "b-boot")
WORKLOAD_SECONDS = (10.0, 60.0)
BOOT_TIMEOUT_S = 300.0  # the default guest fills 320 MiB under TCG before READY


@dataclass(frozen=True)
class Capture:
    name: str
    path: Path
    memory_bytes: int


def capture_dir(profile: str) -> Path:
    image = find_image(profile)
    return cache_dir() / "bench" / "hde" / f"{profile}-{image.manifest.content_hash[:16]}"


async def _snapshot(guest: BootedGuest, path: Path) -> None:
    size = guest.spec.memory_mib << 20
    tmp = path.with_suffix(".part")
    await guest.driver.execute(guest.name, "stop")
    try:
        await guest.driver.execute(guest.name, "pmemsave", {"val": 0, "size": size, "filename": str(tmp)})
    finally:
        await guest.driver.execute(guest.name, "cont")
    if tmp.stat().st_size != size:
        raise RuntimeError(f"pmemsave wrote {tmp.stat().st_size} bytes, expected {size}")
    tmp.rename(path)


async def capture(profile: str = "default", *, log: bool = True) -> dict[str, Capture]:
    """Return the four captures, booting guests only for those not cached yet."""
    out_dir = capture_dir(profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"{name}.ram" for name in CAPTURES}
    meta_path = out_dir / "capture.json"
    if not all(p.exists() for p in paths.values()):
        info: dict[str, object] = {"profile": profile, "memory_mib": find_image(profile).memory_mib}
        with tempfile.TemporaryDirectory(prefix="hde-bench-") as tmp:
            root = Path(tmp)
            async with boot_test_guest(
                "hde-a", root=root, profile=profile, ready_timeout_s=BOOT_TIMEOUT_S
            ) as a:
                await _snapshot(a, paths["a-boot"])
                started = time.monotonic()
                status0 = await a.control.status()
                for seconds, name in zip(WORKLOAD_SECONDS, ("a-10s", "a-60s"), strict=True):
                    # The workload runs for a set time: this wait is the experiment, not synchronisation.
                    await asyncio.sleep(max(0.0, started + seconds - time.monotonic()))
                    await _snapshot(a, paths[name])
                    status = await a.control.status()
                    info[name] = {
                        "seconds": round(time.monotonic() - started, 2),
                        "pages_dirtied": status.pages_dirtied - status0.pages_dirtied,
                        "pages_rewritten": status.pages_rewritten - status0.pages_rewritten,
                        "achieved_rate": status.achieved_rate,
                    }
                    if log:
                        print(f"captured {name}: {info[name]}")
            async with boot_test_guest(
                "hde-b", root=root, profile=profile, ready_timeout_s=BOOT_TIMEOUT_S
            ) as b:
                await _snapshot(b, paths["b-boot"])
        meta_path.write_text(json.dumps(info, indent=2))
    return {name: Capture(name, p, p.stat().st_size) for name, p in paths.items()}


def capture_info(profile: str = "default") -> dict[str, object]:
    path = capture_dir(profile) / "capture.json"
    return json.loads(path.read_text()) if path.exists() else {}


if __name__ == "__main__":
    caps = asyncio.run(capture())
    for c in caps.values():
        print(c.name, c.path, c.memory_bytes)
