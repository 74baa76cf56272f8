"""Typed errors of the hypervisor layer."""

from __future__ import annotations

from novacron.errors import ConflictError, NotFoundError, NovacronError, UserError


class HypervisorError(NovacronError):
    """QEMU could not do what was asked (start failed, QMP broke, process would not die...)."""


class SpecError(UserError):
    """A VM spec is invalid; ``field`` and ``reason`` say what is wrong."""


class VMNotDefinedError(NotFoundError):
    """The driver has no VM of that name."""


class VMStateError(ConflictError):
    """The VM is in the wrong state for the operation (e.g. pausing a stopped VM)."""


class QMPError(HypervisorError):
    """A QMP connection or command failed."""
