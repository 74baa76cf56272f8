"""API tokens (admin): issue (the secret is in this one answer only), list, show, revoke; and whoami."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Path, Request, status

from novacron.api.deps import Admin, Services, Viewer, set_target
from novacron.api.errors import ERROR_RESPONSES
from novacron.api.models import TokenCreate, TokenIssued, TokenOut, WhoAmI
from novacron.security.tokens import ID_PATTERN, TokenRecord

router = APIRouter(tags=["tokens"], responses=ERROR_RESPONSES)

TokenIdArg = Annotated[str, Path(pattern=ID_PATTERN, description="token id (not the secret)")]


def _out(record: TokenRecord) -> TokenOut:
    return TokenOut.model_validate(record.public_view(time.time()))


@router.get("/v1/whoami", name="auth.whoami")
async def whoami(who: Viewer) -> WhoAmI:
    """The caller as the server sees it (checks a token without changing anything)."""
    return WhoAmI(kind=who.kind, name=who.name, role=who.role, token_id=who.token_id)


@router.post("/v1/tokens", name="token.create", status_code=status.HTTP_201_CREATED)
async def create_token(body: TokenCreate, request: Request, svc: Services, who: Admin) -> TokenIssued:
    issued = await svc.tokens.create(body.name, body.role, ttl_s=body.ttl_s, created_by=who.actor)
    set_target(request, f"token/{issued.record.id}")
    return TokenIssued(token=issued.token, record=_out(issued.record))


@router.get("/v1/tokens", name="token.list")
async def list_tokens(svc: Services, _: Admin) -> list[TokenOut]:
    return [_out(r) for r in await svc.tokens.list()]


@router.get("/v1/tokens/{token_id}", name="token.show")
async def show_token(token_id: TokenIdArg, svc: Services, _: Admin) -> TokenOut:
    return _out(await svc.tokens.get(token_id))


@router.delete("/v1/tokens/{token_id}", name="token.revoke")
async def revoke_token(token_id: TokenIdArg, request: Request, svc: Services, who: Admin) -> TokenOut:
    """Revoke a token (it keeps its record, marked revoked, until it is pruned)."""
    set_target(request, f"token/{token_id}")
    return _out(await svc.tokens.revoke(token_id, revoked_by=who.actor))
