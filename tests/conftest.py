"""Fixtures shared by the in-process migration tests (two hosts side by side, short run paths)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from test_migration_support import SimHost, two_hosts


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: keep run directories short.
    path = Path(tempfile.mkdtemp(prefix="nvo", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def hosts(short_tmp: Path) -> AsyncIterator[tuple[SimHost, SimHost]]:
    """Two in-process hosts."""
    async with two_hosts(short_tmp) as pair:
        yield pair
