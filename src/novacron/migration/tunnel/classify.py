"""Tell QEMU's migration connections apart by their first bytes (sans-IO).

QEMU opens one connection for the main stream and one per multifd channel, all to the same socket,
in an order that is not guaranteed. The main stream starts with the magic ``QEVM`` (then its version,
3), a multifd channel with its init message (be32 0x11223344). The classifier keeps what it was fed so
the caller can hand those bytes on: nothing read is ever lost.
"""

from __future__ import annotations

import enum

from novacron.migration.tunnel.multifd import MULTIFD_MAGIC

MAIN_MAGIC = b"QEVM"
MULTIFD_MAGIC_BYTES = MULTIFD_MAGIC.to_bytes(4, "big")
CLASSIFY_BYTES = 4


class ConnectionKind(enum.StrEnum):
    MAIN = "main"
    MULTIFD = "multifd"
    UNKNOWN = "unknown"


class ConnectionClassifier:
    def __init__(self) -> None:
        self._buf = bytearray()
        self.kind: ConnectionKind | None = None

    def feed(self, data: bytes) -> ConnectionKind | None:
        """Add bytes; returns the kind once :data:`CLASSIFY_BYTES` have arrived (and from then on)."""
        self._buf += data
        if self.kind is None and len(self._buf) >= CLASSIFY_BYTES:
            head = bytes(self._buf[:CLASSIFY_BYTES])
            if head == MAIN_MAGIC:
                self.kind = ConnectionKind.MAIN
            elif head == MULTIFD_MAGIC_BYTES:
                self.kind = ConnectionKind.MULTIFD
            else:
                self.kind = ConnectionKind.UNKNOWN
        return self.kind

    @property
    def head(self) -> bytes:
        """Everything fed so far (to be passed on to whoever handles the connection)."""
        return bytes(self._buf)
