"""Boot artefacts of a migrating VM (kernel, initrd, disk image): describe, find, ship.

The destination must start the identical VM, so it needs the same boot files. The source describes
each by path, size and BLAKE3 digest; the destination uses its own file at the same path if the
digest matches, else a copy it received earlier (``<cache>/<digest>/<role>``), else asks the source to
ship it over the control channel in bounded chunks. A received file is checked against its digest
before it is used, and written under a temporary name first, so a broken transfer leaves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import blake3

from novacron.hypervisor.spec import VMSpec
from novacron.migration.errors import MigrationError
from novacron.migration.messages import MAX_ARTEFACT_CHUNK, ArtefactRef

READ_CHUNK = 1 << 20
DIGEST_CACHE_ENTRIES = 64
MAX_ARTEFACT_BYTES = 4 << 30  # a shipped file larger than this is refused
ROLES = ("kernel", "initrd", "disk")


class ArtefactError(MigrationError):
    """A boot artefact is missing, too large, or arrived with the wrong content."""


@dataclass(frozen=True)
class _Key:
    path: str
    size: int
    mtime_ns: int
    inode: int


_digests: OrderedDict[_Key, str] = OrderedDict()


def _file_key(path: Path) -> _Key:
    st = path.stat()
    return _Key(str(path), st.st_size, st.st_mtime_ns, st.st_ino)


def _digest_blocking(path: Path) -> str:
    h = blake3.blake3()
    with path.open("rb") as fh:
        while chunk := fh.read(READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


async def file_digest(path: Path) -> str:
    """BLAKE3 of a file, cached by (path, size, mtime, inode) so repeated migrations pay once."""
    key = _file_key(path)
    cached = _digests.get(key)
    if cached is not None:
        _digests.move_to_end(key)
        return cached
    digest = await asyncio.to_thread(_digest_blocking, path)
    _digests[key] = digest
    while len(_digests) > DIGEST_CACHE_ENTRIES:
        _digests.popitem(last=False)
    return digest


def spec_artefacts(spec: VMSpec) -> dict[str, Path]:
    found = {"kernel": spec.kernel, "initrd": spec.initrd, "disk": spec.disk}
    return {role: path for role, path in found.items() if path is not None}


async def describe(spec: VMSpec) -> list[ArtefactRef]:
    refs = []
    for role, path in spec_artefacts(spec).items():
        refs.append(
            ArtefactRef(role=role, path=str(path), size=path.stat().st_size, digest=await file_digest(path))  # type: ignore[arg-type]
        )
    return refs


async def find_local(ref: ArtefactRef, cache: Path, *, same_path: bool = True) -> Path | None:
    """A file on this host with the artefact's content: the same path (if ``same_path``), or a
    received copy."""
    candidates = [Path(ref.path)] if same_path else []
    for candidate in (*candidates, cache / ref.digest / ref.role):
        try:
            if (
                candidate.is_file()
                and candidate.stat().st_size == ref.size
                and await file_digest(candidate) == ref.digest
            ):
                return candidate
        except OSError:
            continue
    return None


async def read_chunks(path: Path, chunk: int = MAX_ARTEFACT_CHUNK) -> AsyncIterator[tuple[int, bytes, bool]]:
    """(offset, data, last) pieces of a file, read off the event loop."""
    size = (await asyncio.to_thread(path.stat)).st_size
    offset = 0
    with path.open("rb") as fh:
        while True:
            data = await asyncio.to_thread(fh.read, chunk)
            last = offset + len(data) >= size or not data
            yield offset, data, last
            offset += len(data)
            if last:
                return


class ArtefactReceiver:
    """Writes one shipped artefact into the cache and checks its digest at the end."""

    def __init__(self, ref: ArtefactRef, cache: Path, *, max_bytes: int = MAX_ARTEFACT_BYTES) -> None:
        if ref.size > max_bytes:
            raise ArtefactError("artefact too large to ship", role=ref.role, size=ref.size, limit=max_bytes)
        self.ref = ref
        self.final = cache / ref.digest / ref.role
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.with_name(f".{ref.role}.part")
        self._fh = self.tmp.open("wb")
        self._hash = blake3.blake3()
        self.received = 0

    def add(self, offset: int, data: bytes) -> None:
        if offset != self.received:
            raise ArtefactError(
                "artefact chunk out of order", role=self.ref.role, offset=offset, expected=self.received
            )
        if self.received + len(data) > self.ref.size:
            raise ArtefactError("artefact longer than announced", role=self.ref.role, size=self.ref.size)
        self._fh.write(data)
        self._hash.update(data)
        self.received += len(data)

    def finish(self) -> Path:
        self._fh.close()
        if self.received != self.ref.size or self._hash.hexdigest() != self.ref.digest:
            self.discard()
            raise ArtefactError(
                "shipped artefact does not match its digest",
                role=self.ref.role,
                received=self.received,
                size=self.ref.size,
            )
        os.replace(self.tmp, self.final)
        return self.final

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()
        self.tmp.unlink(missing_ok=True)
