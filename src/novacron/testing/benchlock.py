"""The machine-wide lock benchmarks and heavy tests take, so that they do not distort each other."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator

DEFAULT_LOCK = "/tmp/novacron-heavy.lock"


@contextlib.contextmanager
def heavy_lock(path: str | None = DEFAULT_LOCK) -> Iterator[None]:
    """Hold the exclusive ``flock`` on ``path`` (the same one `flock(1)` takes); ``None``/"" for none."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
