"""Typed errors of HDE (hierarchical delta encoding).

Decoding never returns bytes it cannot prove correct: anything wrong with a batch (format, limits,
references, checksum) raises :class:`HdeDecodeError` or a subclass, and leaves the decoder's state as it
was before the batch, so the caller can ask for the batch again (see ``docs/hde.md``, "Failure").
"""

from __future__ import annotations

from novacron.errors import NovacronError, UserError


class HdeError(NovacronError):
    """Base of every HDE failure."""


class HdeInputError(UserError):
    """The caller handed the encoder something it cannot encode (bad page batch, oversize chunk)."""


class HdeConfigError(UserError):
    """Inconsistent limits or options (e.g. a session cache smaller than two batches)."""


class HdeDecodeError(HdeError):
    """A batch cannot be decoded to exactly the bytes that were encoded."""


class HdeStreamBroken(HdeDecodeError):
    """A streamed body could not be decoded: the zstd stream is out of step; the session must restart."""


class HdeReferenceMissing(HdeDecodeError):
    """A batch refers to baseline content the decoder does not hold (any more).

    Recoverable: the sender re-encodes the same input with :meth:`HdeEncoder.encode_repair`, which
    uses no references, and the decoder accepts it under the same sequence number.
    """


class BaselineStoreError(HdeError):
    """The baseline store's files are missing, corrupt or do not fit its limits."""
