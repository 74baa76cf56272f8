"""``novacron token``: API bearer tokens. ``bootstrap`` writes the first admin token into this host's
store directly (no server needed, root/state-dir access is the authority); the rest go through the API.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.table import Table

from novacron.api.client import ApiClient
from novacron.api.clientconfig import connect
from novacron.cli.output import console, emit_json, run_command
from novacron.errors import UserError
from novacron.security.rbac import parse_role
from novacron.security.tokens import TokenStore
from novacron.store import open_default_store

app = typer.Typer(no_args_is_help=True)

T = TypeVar("T")
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
TtlOpt = Annotated[str | None, typer.Option("--ttl", help="Lifetime: 3600, 90m, 12h, 30d.")]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if m is None:
        raise UserError("invalid duration: use seconds or a number with s, m, h or d", value=text)
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _remote(body: Callable[[ApiClient], Awaitable[T]], as_json: bool) -> T:
    async def main() -> T:
        async with connect() as client:
            return await body(client)

    return run_command(lambda: asyncio.run(main()), as_json)


def _print_secret(token: str, record: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json({"token": token, "record": record})
        return
    console.print(f"token id   {record['id']}  ({record['name']}, role {record['role']})", highlight=False)
    console.print(f"expires    {time.strftime('%Y-%m-%d %H:%M', time.localtime(record['expires_at']))}")
    console.print("secret     (shown once; store it now)")
    console.print(token, highlight=False, markup=False)


@app.command()
def bootstrap(
    name: Annotated[str, typer.Option(help="Token name.")] = "admin",
    ttl: TtlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an admin token in this host's store (first start; `cluster init` does the same)."""

    async def main() -> dict[str, Any]:
        store = open_default_store()
        try:
            issued = await TokenStore(store).bootstrap_admin(
                name, ttl_s=parse_duration(ttl) if ttl else None, created_by="cli:bootstrap"
            )
        finally:
            await store.close()
        return {"token": issued.token, "record": issued.record.public_view(time.time())}

    out = run_command(lambda: asyncio.run(main()), as_json)
    _print_secret(out["token"], out["record"], as_json)


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="Token name (who or what uses it).")],
    role: Annotated[str, typer.Option(help="viewer | operator | admin")] = "viewer",
    ttl: TtlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Issue a token through the API (needs admin)."""
    role_value = run_command(lambda: parse_role(role), as_json)
    ttl_s = run_command(lambda: parse_duration(ttl), as_json) if ttl else None
    issued = _remote(lambda c: c.create_token(name, role_value, ttl_s=ttl_s), as_json)
    _print_secret(issued.token, issued.record.model_dump(mode="json"), as_json)


@app.command("list")
def list_tokens(as_json: JsonOpt = False) -> None:
    """List tokens (never their secrets)."""
    tokens = _remote(lambda c: c.list_tokens(), as_json)
    if as_json:
        emit_json([t.model_dump(mode="json") for t in tokens])
        return
    table = Table("id", "name", "role", "state", "expires", "created by")
    for t in tokens:
        style = {"active": "green", "expired": "yellow", "revoked": "red"}[t.state]
        expires = time.strftime("%Y-%m-%d %H:%M", time.localtime(t.expires_at))
        table.add_row(t.id, t.name, t.role, f"[{style}]{t.state}[/]", expires, t.created_by)
    console.print(table)


@app.command()
def revoke(
    token_id: Annotated[str, typer.Argument(help="Token id (from `token list`).")],
    as_json: JsonOpt = False,
) -> None:
    """Revoke a token: it stops working at once on every API server of the cluster."""
    record = _remote(lambda c: c.revoke_token(token_id), as_json)
    if as_json:
        emit_json(record.model_dump(mode="json"))
    else:
        console.print(f"revoked {record.id} ({record.name})", highlight=False)
