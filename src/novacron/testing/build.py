"""Compile the C forwarder on first use into the cache directory, keyed by a hash of its source.

A changed source gets a new binary; concurrent first uses each compile to a private file and rename it
into place atomically, so nobody ever runs a half-written binary.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from novacron.paths import cache_dir
from novacron.testing.errors import WanError, WanUnavailableError

FORWARDER_SOURCE = "wanfwd.c"
COMPILE_TIMEOUT_S = 120.0
CFLAGS = ("-O2", "-Wall", "-Wextra", "-std=gnu11")


def _source() -> bytes:
    return resources.files("novacron.testing").joinpath(FORWARDER_SOURCE).read_bytes()


def forwarder_binary() -> Path:
    """Path of the compiled forwarder, compiling it first if this source was never built here."""
    source = _source()
    digest = hashlib.sha256(source + " ".join(CFLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / "wanfwd" / f"wanfwd-{digest}"
    if target.exists():
        return target
    gcc = shutil.which("gcc")
    if gcc is None:
        raise WanUnavailableError(
            "the WAN emulator's forwarder must be compiled but gcc is missing "
            "(install the Debian packages gcc and libc6-dev, e.g. `make deps`)",
            missing=["gcc"],
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    src_path = target.parent / f".wanfwd-{digest}-{os.getpid()}.c"
    tmp_bin = target.parent / f".wanfwd-{digest}-{os.getpid()}"
    try:
        src_path.write_bytes(source)
        try:
            done = subprocess.run(
                [gcc, *CFLAGS, "-o", str(tmp_bin), str(src_path)],
                capture_output=True,
                text=True,
                timeout=COMPILE_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise WanError("compiling the WAN forwarder timed out", timeout_s=COMPILE_TIMEOUT_S) from None
        if done.returncode != 0:
            raise WanError("compiling the WAN forwarder failed", compiler=gcc, stderr=done.stderr.strip())
        os.replace(tmp_bin, target)
    finally:
        src_path.unlink(missing_ok=True)
        tmp_bin.unlink(missing_ok=True)
    return target
