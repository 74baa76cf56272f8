"""Typed errors of the migration tunnel (the data plane between the two QEMUs)."""

from __future__ import annotations

from novacron.migration.datapath import DataPathError


class TunnelError(DataPathError):
    """The tunnel failed: a QEMU connection, the transport, or the peer's records."""


class RecordError(TunnelError):
    """A ``qemu-pages`` or ``qemu-main`` record from the peer is malformed or out of place."""


class MultifdFormatError(TunnelError):
    """Bytes on a multifd connection are not a QEMU 7.2 multifd stream this parser understands.

    Never fatal on its own: the parser turns it into a fallback (the channel's remaining bytes are
    carried opaque), so it only surfaces to callers that use the format helpers directly.
    """


class PeerAborted(TunnelError):
    """The other side of the tunnel gave up; its reason is in the message."""
