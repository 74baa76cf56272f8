"""The authorization matrix: every route x every role x valid / expired / revoked / missing token.

Routes are enumerated from the app itself, so a route added later is covered without editing this
file (unless it introduces a path parameter this file has no sample value for, which fails loudly).
Requests carry harmless inputs (an unknown VM name, an empty body): an authorized request must get
past authentication and authorization (no 401/403) and must not fail on the server (no 5xx); the VM
service behind it is the real one (SQLite store, QEMU driver), nothing is faked.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest

from novacron.api.app import RouteInfo, api_routes, route_matrix
from novacron.api.harness import api_harness
from novacron.security.rbac import ROLES, Role

SAMPLE_PATH_PARAMS = {
    "name": "no-such-vm",  # a valid VM name that does not exist
    "token_id": "aaaaaaaaaaaaaaaa",  # a well-formed token id that does not exist
    "profile": "test",
    "node": "no-such-node",  # a valid node id that is not registered
}
WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
# The expected order, written out here rather than taken from Role, so a broken comparison in the
# code under test cannot also bend the expectation.
RANK = {"viewer": 1, "operator": 2, "admin": 3}
ROUTES = route_matrix()


def _url(route: RouteInfo) -> str:
    names = re.findall(r"{(\w+)(?::\w+)?}", route.path)
    missing = [n for n in names if n not in SAMPLE_PATH_PARAMS]
    assert not missing, f"add a sample value for path parameter(s) {missing} of {route.path}"
    return re.sub(r"{(\w+)(?::\w+)?}", lambda m: SAMPLE_PATH_PARAMS[m.group(1)], route.path)


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def test_every_served_route_is_in_the_matrix_and_the_spec(tmp_path: Path) -> None:
    from novacron.api.app import build_services, create_app
    from novacron.store.sqlite import SqliteStore

    store = SqliteStore(tmp_path / "s.db")
    app = create_app(build_services(store, node="n"))
    served = {(r.method, r.path) for r in api_routes(app)}
    spec = app.openapi()
    published = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert served == published
    assert served == {(r.method, r.path) for r in ROUTES}
    assert len(served) >= 20


@pytest.mark.parametrize("route", ROUTES, ids=[f"{r.method} {r.path}" for r in ROUTES])
async def test_authorization_matrix(route: RouteInfo, tmp_path: Path) -> None:
    clock = Clock()
    async with api_harness(tmp_path, clock=clock, control=True) as h:
        tokens = h.services.tokens
        # Expired: issued an hour in the past with the shortest lifetime.
        clock.offset = -3600.0
        expired = {r: (await tokens.create(f"old-{r}", r, ttl_s=60, created_by="t")).token for r in Role}
        clock.offset = 0.0
        revoked = {}
        for r in Role:
            issued = await tokens.create(f"gone-{r}", r, created_by="t")
            await tokens.revoke(issued.record.id, revoked_by="t")
            revoked[r] = issued.token

        cases: list[tuple[str, str | None, Role | None]] = [("missing", None, None)]
        cases.append(("garbage", "nvc1.aaaaaaaaaaaaaaaa." + "A" * 43, None))
        for r in ROLES:
            cases += [("valid", h.tokens[r], r), ("expired", expired[r], r), ("revoked", revoked[r], r)]

        url = _url(route)
        problems: list[str] = []
        for state, token, role in cases:
            async with h.client(token) as c:
                kwargs: dict[str, Any] = {"json": {}} if route.method in WRITE_METHODS else {}
                resp = await c.request(route.method, url, **kwargs)
            kind = (
                resp.json()["error"]["kind"]
                if resp.status_code >= 400
                and resp.headers.get("content-type", "").startswith("application/json")
                else None
            )
            label = f"{state}/{role or '-'}: {resp.status_code} {kind or ''}"
            if resp.status_code >= 500:
                problems.append(f"{label} server error")
            elif route.access.public:
                if resp.status_code in (401, 403):
                    problems.append(f"{label} (public route refused)")
            elif state == "valid" and role is not None and RANK[role] >= RANK[str(route.access.minimum)]:
                if resp.status_code in (401, 403, 429):
                    problems.append(f"{label} (authorized caller refused)")
            elif state == "valid":
                if (resp.status_code, kind) != (403, "PermissionDenied"):
                    problems.append(f"{label} (expected 403 PermissionDenied)")
            else:
                want = {"missing": "AuthError", "garbage": "TokenInvalid",
                        "expired": "TokenExpired", "revoked": "TokenRevoked"}[state]  # fmt: skip
                if (resp.status_code, kind) != (401, want):
                    problems.append(f"{label} (expected 401 {want})")
                elif "bearer" not in resp.headers.get("www-authenticate", "").lower():
                    problems.append(f"{label} (401 without WWW-Authenticate)")
        assert not problems, f"{route.method} {route.path} ({route.access.label}):\n" + "\n".join(problems)


async def test_unix_socket_clients_get_the_local_role_without_a_token(tmp_path: Path) -> None:
    async with api_harness(tmp_path) as h:
        async with h.client(local=True) as c:
            who = (await c.get("/v1/whoami")).json()
            assert who == {"kind": "local", "name": "unix-socket", "role": "admin", "token_id": None}
            assert (await c.get("/v1/tokens")).status_code == 200
        # A token presented on the socket is checked like anywhere else.
        async with h.client("nvc1.aaaaaaaaaaaaaaaa." + "A" * 43, local=True) as c:
            assert (await c.get("/v1/whoami")).status_code == 401
        async with h.client(h.tokens[Role.VIEWER], local=True) as c:
            assert (await c.get("/v1/whoami")).json()["role"] == "viewer"
            assert (await c.get("/v1/tokens")).status_code == 403
        # Over TCP (no local mark) the same request without a token is refused.
        async with h.client() as c:
            assert (await c.get("/v1/whoami")).status_code == 401


async def test_a_route_without_an_access_declaration_is_refused(tmp_path: Path) -> None:
    from fastapi import APIRouter

    from novacron.api.config import ApiConfigError

    rogue = APIRouter()

    @rogue.get("/v1/rogue")
    async def handler() -> dict[str, str]:
        return {}

    with pytest.raises(ApiConfigError, match="declares no access") as info:
        async with api_harness(tmp_path, extra_routers=[rogue]):
            pass
    assert info.value.context["path"] == "/v1/rogue"


def test_docs_matrix_is_current() -> None:
    """docs/api.md embeds the matrix; regenerate it with `novacron api routes --markdown`."""
    from novacron.api.app import access_table_markdown

    doc = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    embedded = doc.split("<!-- matrix:begin -->\n", 1)[1].split("<!-- matrix:end -->", 1)[0]
    assert embedded == access_table_markdown(ROUTES)
