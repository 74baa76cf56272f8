"""Where NovaCron keeps its files. One place decides every default directory.

Environment overrides make tests and side-by-side agents (one per network namespace) independent:
``NOVACRON_STATE_DIR`` (inventory, run directories, PKI) and ``NOVACRON_CACHE_DIR`` (built images).
"""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    env = os.environ.get("NOVACRON_STATE_DIR")
    if env:
        return Path(env)
    return Path("/var/lib/novacron") if os.geteuid() == 0 else Path.home() / ".local/share/novacron"


def cache_dir() -> Path:
    env = os.environ.get("NOVACRON_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "novacron"
