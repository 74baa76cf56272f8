"""Typed errors of the AMST transport.

What an application sees on a channel: :class:`ChannelAborted` (the peer or we aborted it; the reason
travels in CHANNEL_CLOSE), :class:`ChannelClosedError` (writing after close), :class:`MessageTooLarge`.
What ends a whole session: :class:`SessionFailed` (no stream left and none could join, a protocol
violation by the peer, or a local close with data still unacknowledged). Bad settings are
:class:`TransportConfigError` (a :class:`~novacron.errors.UserError`).
"""

from __future__ import annotations

from novacron.dwcp.errors import DwcpConfigError, DwcpError


class TransportError(DwcpError):
    """Any failure of the multi-stream transport."""


class TransportConfigError(DwcpConfigError):
    """An AMST setting (window, budget, chunk size, timeout) is invalid."""


class ChannelError(TransportError):
    """A failure of one logical channel; the session and other channels carry on."""


class ChannelAborted(ChannelError):
    """The channel was aborted (by the peer or locally); unread and unsent data are gone."""


class ChannelClosedError(ChannelError):
    """The operation needs an open direction of the channel (e.g. write after close)."""


class MessageTooLarge(ChannelError):
    """A message exceeds the channel's message size limit (sending or receiving)."""


class SessionFailed(TransportError):
    """The session cannot go on: every channel fails with this error."""


class ChannelLimitError(TransportError):
    """The session holds its maximum number of channels."""
