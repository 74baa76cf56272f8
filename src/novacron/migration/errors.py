"""Typed errors of the migration control plane.

Every error of a running migration names the VM, the peer and the phase it happened in
(``MigrationError("destination refused", vm=..., peer=..., phase="prepare")``), so a log line, a
migration record or a CLI message says where it failed without a traceback.
"""

from __future__ import annotations

from novacron.errors import ConflictError, NotFoundError, NovacronError, UserError


class MigrationError(NovacronError):
    """A migration failed; context names ``vm``, ``peer``, ``phase`` and the reason."""


class MigrationRefused(MigrationError):
    """The destination refused the migration in prepare (``code`` says why: capacity, version ...)."""


class MigrationTimeout(MigrationError):
    """A phase did not finish within its timeout (the converge phase's timeout is the deadline)."""


class MigrationCancelled(MigrationError):
    """The operator (or the peer) cancelled the migration before commit."""


class MigrationDiverged(MigrationError):
    """Precopy could not converge and no allowed escalation was left before the deadline."""


class PeerLost(MigrationError):
    """The control channel to the peer broke (link cut, peer agent gone)."""


class IllegalPhaseTransition(MigrationError):
    """A phase change the phase table does not allow (a bug, or a message out of order)."""


class ControlProtocolError(MigrationError):
    """A control message is malformed, of an unknown type or version, or out of place."""


class MigrationInputError(UserError):
    """A migration request or setting is invalid; ``field`` names what is wrong."""


class MigrationConflict(ConflictError):
    """The migration cannot start now: the VM is migrating already, the host is at its limit ..."""


class SourceQemuStuck(MigrationConflict):
    """The VM's QEMU still holds an earlier migration that ended without its cleanup (a QEMU 7.2
    multifd bug, docs/hypervisor.md): it cannot migrate again until the VM is restarted."""


class MigrationNotFound(NotFoundError):
    """No migration with that id on this host."""


class UnknownPeer(NotFoundError):
    """The destination node is not among this agent's peers."""
