"""Typed errors of the WAN emulator."""

from __future__ import annotations

from novacron.errors import NovacronError, UserError


class WanError(NovacronError):
    """The emulator failed to start, to answer, or to tear down."""


class WanUnavailableError(WanError):
    """This machine cannot run the emulator (not root, no /dev/net/tun, no `ip`, no gcc)."""


class WanConfigError(UserError):
    """A topology or link specification is wrong (unknown node, negative delay, loss above 1, ...)."""
