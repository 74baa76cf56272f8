"""Roles are ordered viewer < operator < admin; access checks name what was needed."""

from __future__ import annotations

import pytest

from novacron.errors import UserError
from novacron.security.rbac import (
    PUBLIC,
    ROLES,
    PermissionDenied,
    Principal,
    Role,
    RouteAccess,
    authorize,
    parse_role,
)


def test_roles_are_cumulative() -> None:
    assert [str(r) for r in ROLES] == ["viewer", "operator", "admin"]
    expected = {
        (Role.VIEWER, Role.VIEWER): True, (Role.VIEWER, Role.OPERATOR): False,
        (Role.VIEWER, Role.ADMIN): False, (Role.OPERATOR, Role.VIEWER): True,
        (Role.OPERATOR, Role.OPERATOR): True, (Role.OPERATOR, Role.ADMIN): False,
        (Role.ADMIN, Role.VIEWER): True, (Role.ADMIN, Role.OPERATOR): True, (Role.ADMIN, Role.ADMIN): True,
    }  # fmt: skip
    assert {(h, n): h.allows(n) for h in Role for n in Role} == expected


def test_authorize_names_the_missing_role() -> None:
    viewer = Principal(kind="token", name="ci", role=Role.VIEWER, token_id="a" * 16)
    authorize(viewer, RouteAccess(Role.VIEWER), action="vm.list")
    authorize(viewer, PUBLIC, action="health.live")
    with pytest.raises(PermissionDenied) as info:
        authorize(viewer, RouteAccess(Role.ADMIN), action="token.create")
    assert info.value.context == {"action": "token.create", "needed": "admin", "role": "viewer"}


def test_actor_names() -> None:
    assert Principal("token", "ci", Role.VIEWER, "abc").actor == "token:abc(ci)"
    assert Principal("local", "unix-socket", Role.ADMIN).actor == "local:unix-socket"


def test_parse_role() -> None:
    assert parse_role("operator") is Role.OPERATOR
    with pytest.raises(UserError, match="unknown role"):
        parse_role("root")
