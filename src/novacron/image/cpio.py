"""A minimal writer of the ``newc`` cpio format the kernel unpacks as an initramfs.

Writing the archive ourselves lets the builder stream host files straight into the compressor with no
staging copy, with fixed owners and timestamps so that equal inputs give equal archives.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import BinaryIO

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
COPY_CHUNK = 1 << 20


class CpioWriter:
    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1
        self.bytes_written = 0

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self.bytes_written += len(data)

    def _pad(self) -> None:
        if self.bytes_written % 4:
            self._write(b"\0" * (4 - self.bytes_written % 4))

    def _header(self, name: str, mode: int, size: int, rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,
            0,
            1,
            0,
            size,
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        )
        self._ino += 1
        self._write(NEWC_MAGIC + b"".join(b"%08X" % f for f in fields) + encoded)
        self._pad()

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._header(name, stat.S_IFDIR | perm, 0)

    def symlink(self, name: str, target: str) -> None:
        data = target.encode()
        self._header(name, stat.S_IFLNK | 0o777, len(data))
        self._write(data)
        self._pad()

    def char_device(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._header(name, stat.S_IFCHR | perm, 0, (major, minor))

    def data(self, name: str, content: bytes, perm: int = 0o644) -> None:
        self._header(name, stat.S_IFREG | perm, len(content))
        self._write(content)
        self._pad()

    def file(self, name: str, source: Path, perm: int = 0o644) -> int:
        """Copy ``source`` into the archive; returns its size (read once, so size and bytes agree)."""
        with source.open("rb") as fh:
            content = fh.read()
        self.data(name, content, perm)
        return len(content)

    def finish(self) -> None:
        self._header(TRAILER, 0, 0)
