"""One error body for every failure, and the map from NovaCron's typed errors to HTTP status codes.

Every error answer is ``{"error": {"kind", "message", "status", "request_id", "context", "fields"}}``.
``kind`` is the error class (``VMNotFound``, ``TokenExpired``, ``ValidationError`` ...); validation
failures (422) list each bad field in ``fields`` with its location (``body.vcpus``, ``query.limit``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from novacron.api.client import ApiClientError, ApiServerError
from novacron.api.context import context_of
from novacron.api.ratelimit import RateLimited
from novacron.cluster.errors import CaPinMismatch, ClusterError, ClusterSettingError, JoinRefused
from novacron.dwcp.placement import NoFeasibleHost, PlacementInputError
from novacron.errors import ConflictError, NotFoundError, NovacronError, UserError
from novacron.guest.control import GuestControlError
from novacron.hypervisor.errors import SpecError
from novacron.image import ImageSettingError
from novacron.observability.audit import AuditQueryError
from novacron.observability.log import log_event
from novacron.observability.metrics import count_error
from novacron.security.rbac import AuthError, PermissionDenied
from novacron.store.base import StoreError, StoreLimitError

log = logging.getLogger("novacron.api")

MAX_CONTEXT_VALUE = 300


class RequestFieldError(UserError):
    """A request field is valid on its own but not acceptable here (422, ``field`` names it)."""


class ErrorField(BaseModel):
    field: str = Field(description="the name of the offending field (last element of location)")
    location: str = Field(description="where it is: body.<path>, query.<name>, path.<name>, header.<name>")
    message: str


class ErrorDetail(BaseModel):
    kind: str
    message: str
    status: int
    request_id: str | None = None
    context: dict[str, str] = Field(default_factory=dict)
    fields: list[ErrorField] = Field(default_factory=list)


class ErrorBody(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (400, "Bad request"),
        (401, "Missing, invalid, expired or revoked token"),
        (403, "Role too low for this route"),
        (404, "Not found"),
        (409, "Conflict with the current state"),
        (413, "Request body too large"),
        (422, "Validation failed; fields names each bad field"),
        (429, "Rate limited; see Retry-After"),
    )
}


def _status_for(exc: NovacronError) -> int:
    # Most specific first: these are subclasses of the broader UserError / NovacronError.
    table: tuple[tuple[type[NovacronError], int], ...] = (
        (RateLimited, 429),
        (AuthError, 401),
        (PermissionDenied, 403),
        (SpecError, 422),
        (RequestFieldError, 422),
        (AuditQueryError, 422),
        (ImageSettingError, 422),
        (StoreLimitError, 422),
        (ClusterSettingError, 422),
        (PlacementInputError, 422),
        (JoinRefused, 422),
        (CaPinMismatch, 422),
        (NotFoundError, 404),
        (NoFeasibleHost, 409),
        (ConflictError, 409),
        (UserError, 400),
        (StoreError, 503),
        (GuestControlError, 502),
        (ClusterError, 502),
        (ApiClientError, 502),
        (ApiServerError, 502),
    )
    for cls, status in table:
        if isinstance(exc, cls):
            return status
    return 500


def error_response(
    request: Request,
    status: int,
    kind: str,
    message: str,
    *,
    context: dict[str, Any] | None = None,
    fields: list[ErrorField] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    ctx = context_of(request)
    ctx.error = f"{kind}: {message}"
    detail = ErrorDetail(
        kind=kind,
        message=message,
        status=status,
        request_id=ctx.request_id,
        context={k: str(v)[:MAX_CONTEXT_VALUE] for k, v in (context or {}).items()},
        fields=fields or [],
    )
    return JSONResponse(ErrorBody(error=detail).model_dump(mode="json"), status, headers=headers)


async def _novacron_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, NovacronError):
        raise exc
    status = _status_for(exc)
    headers: dict[str, str] = {}
    context = dict(exc.context)
    fields: list[ErrorField] = []
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, AuthError):
        headers["WWW-Authenticate"] = 'Bearer realm="novacron"'
    if status == 422 and "field" in context:
        name = str(context["field"])
        where = str(context.pop("location", f"body.{name}"))
        fields.append(ErrorField(field=name.rsplit(".", 1)[-1], location=where, message=exc.message))
    if status >= 500:
        count_error("api", exc)
        log_event(log, "api.error", logging.ERROR, kind=type(exc).__name__, error=str(exc),
                  request_id=context_of(request).request_id)  # fmt: skip
    return error_response(request, status, type(exc).__name__, exc.message, context=context,
                          fields=fields, headers=headers)  # fmt: skip


def _location(loc: tuple[Any, ...] | list[Any]) -> tuple[str, str]:
    parts = [str(p) for p in loc]
    named = [str(p) for p in loc if isinstance(p, str) and p not in ("body", "query", "path", "header")]
    return (named[-1] if named else (parts[-1] if parts else "request")), ".".join(parts) or "request"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RequestValidationError):
        raise exc
    fields = []
    for err in exc.errors():
        name, where = _location(err.get("loc", ()))
        fields.append(ErrorField(field=name, location=where, message=str(err.get("msg", "invalid"))))
    first = fields[0] if fields else ErrorField(field="request", location="request", message="invalid")
    return error_response(
        request, 422, "ValidationError", f"invalid request: {first.location}: {first.message}", fields=fields
    )


_HTTP_KINDS = {404: "NotFound", 405: "MethodNotAllowed", 413: "PayloadTooLarge"}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, StarletteHTTPException):
        raise exc
    kind = _HTTP_KINDS.get(exc.status_code, f"HTTP{exc.status_code}")
    return error_response(request, exc.status_code, kind, str(exc.detail), headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    count_error("api", exc)
    rid = context_of(request).request_id
    log.error("api.unhandled request_id=%s", rid, exc_info=exc)
    return error_response(request, 500, "InternalError", "internal error; see the server log", context={})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(NovacronError, _novacron_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
