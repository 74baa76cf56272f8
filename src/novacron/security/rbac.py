"""Role-based access control: three ordered roles and the check every API route makes.

Roles are cumulative: a viewer reads, an operator also changes VMs (and later nodes and migrations),
an admin also manages tokens and reads the audit log. Each route declares the *minimal* role it needs
(:class:`RouteAccess`); the matrix of routes and roles is generated from those declarations, so the
documentation and the tests cannot drift from what is enforced.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

from novacron.errors import UserError


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        """True if this role may do what ``needed`` may do."""
        return self.rank >= needed.rank


_RANK = {Role.VIEWER: 1, Role.OPERATOR: 2, Role.ADMIN: 3}
ROLES: tuple[Role, ...] = tuple(sorted(Role, key=lambda r: r.rank))


class AuthError(UserError):
    """The request's credentials are missing or not valid (HTTP 401)."""


class PermissionDenied(UserError):
    """The caller is authenticated but its role is below what the operation needs (HTTP 403)."""


PrincipalKind = Literal["token", "local", "node"]  # node: a cluster node over mutual TLS


@dataclass(frozen=True)
class Principal:
    """Who is calling: a bearer token, or a local client on the permission-protected unix socket."""

    kind: PrincipalKind
    name: str
    role: Role
    token_id: str | None = None

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        if self.kind == "token":
            return f"token:{self.token_id}({self.name})"
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True)
class RouteAccess:
    """What a route needs: a minimal role, or nothing at all (``minimum=None``: public)."""

    minimum: Role | None

    @property
    def public(self) -> bool:
        return self.minimum is None

    @property
    def label(self) -> str:
        return "public" if self.minimum is None else str(self.minimum)

    def permits(self, role: Role) -> bool:
        return self.minimum is None or role.allows(self.minimum)


PUBLIC = RouteAccess(None)


def authorize(principal: Principal, access: RouteAccess, *, action: str) -> None:
    """Raise PermissionDenied unless ``principal`` may perform ``action`` under ``access``."""
    if not access.permits(principal.role):
        raise PermissionDenied(
            f"{action} needs role {access.label}, the caller has {principal.role}",
            action=action,
            needed=access.label,
            role=str(principal.role),
        )


def parse_role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        raise UserError(f"unknown role {text!r}: use one of {', '.join(ROLES)}", role=text) from None


__all__ = [
    "PUBLIC",
    "ROLES",
    "AuthError",
    "PermissionDenied",
    "Principal",
    "Role",
    "RouteAccess",
    "authorize",
    "parse_role",
]
