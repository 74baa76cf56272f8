"""The audit log (admin): write requests in key (time) order, paged with a cursor."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from novacron.api.deps import Admin, Services
from novacron.api.errors import ERROR_RESPONSES
from novacron.api.models import AuditPageOut
from novacron.observability.audit import CURSOR_PATTERN, AuditLimits

router = APIRouter(prefix="/v1/audit", tags=["audit"], responses=ERROR_RESPONSES)

_MAX_PAGE = AuditLimits().max_page
_MAX_EPOCH_S = 1e11  # year 5138: the key format's end


@router.get("", name="audit.read")
async def read_audit(
    svc: Services,
    _: Admin,
    since: Annotated[float | None, Query(ge=0, le=_MAX_EPOCH_S, description="epoch seconds")] = None,
    until: Annotated[float | None, Query(ge=0, le=_MAX_EPOCH_S, description="epoch seconds")] = None,
    after: Annotated[str | None, Query(pattern=CURSOR_PATTERN, description="next_cursor of a page")] = None,
    limit: Annotated[int, Query(ge=1, le=_MAX_PAGE)] = 100,
) -> AuditPageOut:
    page = await svc.audit.read(since=since, until=until, after=after, limit=limit)
    return AuditPageOut(entries=page.entries, next_cursor=page.next_cursor)
