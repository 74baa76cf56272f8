"""Errors of cluster membership, the registry and drains."""

from __future__ import annotations

from novacron.errors import ConflictError, NotFoundError, NovacronError, UserError
from novacron.security.rbac import AuthError


class ClusterError(NovacronError):
    """A cluster operation failed (a node unreachable, a drain move failed, files unwritable)."""


class ClusterSettingError(UserError):
    """A cluster setting or request field is invalid; ``field`` names it."""


class JoinTokenInvalid(AuthError):
    """A bootstrap token that is malformed, unknown or whose secret does not match."""


class JoinTokenExpired(AuthError):
    """A bootstrap token past its expiry."""


class JoinTokenUsed(AuthError):
    """A bootstrap token that was already used by a join (they are single-use)."""


class JoinRefused(UserError):
    """The control node refused the join request (bad CSR, node id taken)."""


class CaPinMismatch(UserError):
    """The server's cluster CA is not the one the bootstrap token pins."""


class NodeNotFound(NotFoundError):
    """No node of that id in the registry."""


class NodeConflict(ConflictError):
    """The request conflicts with the node's state (id taken, drain already running)."""


class NotControlNode(NotFoundError):
    """This API server does not hold the control role (no registry, no CA key)."""


__all__ = [
    "CaPinMismatch",
    "ClusterError",
    "ClusterSettingError",
    "JoinRefused",
    "JoinTokenExpired",
    "JoinTokenInvalid",
    "JoinTokenUsed",
    "NodeConflict",
    "NodeNotFound",
    "NotControlNode",
]
