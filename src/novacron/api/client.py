"""Async client of the API (httpx), over the local unix socket or HTTPS, with typed errors.

An error answer becomes the NovaCron error its ``kind`` and status stand for (404 -> NotFoundError,
401 -> AuthError, 429 -> RateLimited ...), with the server's message and context, so CLI code handles
remote failures exactly like local ones. VM methods mirror :class:`novacron.vm.VMService` and return
objects with ``as_dict()``, so ``cli/vm.py`` can switch from the in-process service to this client.
"""

from __future__ import annotations

import builtins
import ssl
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from novacron.api.models import ImageOut, TokenIssued, TokenOut, VMOut, WhoAmI
from novacron.api.ratelimit import RateLimited
from novacron.errors import ConflictError, NotFoundError, NovacronError, UserError
from novacron.guest.control import ChecksumResult, DirtyAck, GuestStatus, VerifyResult
from novacron.observability.audit import AuditEntry
from novacron.security.rbac import AuthError, PermissionDenied

DEFAULT_TIMEOUT_S = 30.0
LONG_TIMEOUT_S = 300.0  # start --wait, stop (graceful power-off), guest verify
MAX_RESPONSE_BYTES = 32 << 20


class ApiClientError(NovacronError):
    """The API could not be reached, or answered something that is not a NovaCron answer."""


class ApiServerError(NovacronError):
    """The API server failed while handling the request (5xx)."""


class ApiRequestError(UserError):
    """The server refused the request (4xx not covered by a more specific class)."""


_BY_STATUS: dict[int, type[NovacronError]] = {
    401: AuthError,
    403: PermissionDenied,
    404: NotFoundError,
    409: ConflictError,
    422: ApiRequestError,
}


@dataclass(frozen=True)
class ServerAddress:
    """``unix:///path/to/api.sock`` or ``https://host:port`` (``http://`` for loopback tests)."""

    url: str

    def transport(
        self, ca_file: Path | None, ssl_context: ssl.SSLContext | None = None
    ) -> tuple[str, httpx.AsyncHTTPTransport]:
        parts = urlsplit(self.url)
        # No TLS on a unix socket or plain http: verify=False spares building a default SSL context
        # (certifi's bundle, ~45 ms of CPU per client; a progress display polling every 0.2 s spent
        # a fifth of a core on it).
        if parts.scheme == "unix":
            return "http://novacron", httpx.AsyncHTTPTransport(uds=parts.path, verify=False)
        if parts.scheme in ("http", "https"):
            verify: ssl.SSLContext | bool = parts.scheme == "https"
            if parts.scheme == "https" and ssl_context is not None:
                verify = ssl_context  # a node's mTLS context (cluster calls between nodes)
            elif parts.scheme == "https" and ca_file is not None:
                ctx = ssl.create_default_context(cafile=str(ca_file))
                # Node certificates name a SPIFFE identity, not a host name; the cluster CA is pinned.
                ctx.check_hostname = False
                verify = ctx
            return self.url.rstrip("/"), httpx.AsyncHTTPTransport(verify=verify)
        raise UserError("API server must be unix:///path, https://host:port or http://host:port",
                        server=self.url)  # fmt: skip


def error_from_response(response: httpx.Response) -> NovacronError:
    try:
        body = response.json()
        err = body["error"]
        kind, message = str(err["kind"]), str(err["message"])
        context: dict[str, Any] = dict(err.get("context") or {})
        fields = err.get("fields") or []
    except (ValueError, KeyError, TypeError):
        return ApiClientError(
            "the server's answer is not a NovaCron error body",
            status=response.status_code,
            body=response.text[:200],
        )
    context.pop("status", None)
    context["kind"] = kind
    if fields:
        context["field"] = fields[0].get("location")
    if response.status_code == 429:
        retry = int(response.headers.get("retry-after", "1") or 1)
        context.pop("retry_after_s", None)
        return RateLimited(message, retry_after_s=retry, **context)
    cls = _BY_STATUS.get(response.status_code)
    if cls is None:
        cls = ApiRequestError if response.status_code < 500 else ApiServerError
    return cls(message, status=response.status_code, **context)


class ApiClient:
    def __init__(
        self,
        server: str,
        *,
        token: str | None = None,
        ca_file: Path | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        base, transport = ServerAddress(server).transport(ca_file, ssl_context)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.server = server
        self._http = httpx.AsyncClient(base_url=base, transport=transport, headers=headers, timeout=timeout_s)

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        """Send a request; the decoded JSON answer, or the typed error of an error answer."""
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = await self._http.request(
                method,
                path,
                json=json,
                params=clean,
                timeout=timeout_s if timeout_s is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TransportError as exc:
            raise ApiClientError("cannot reach the API server", server=self.server,
                                 reason=str(exc) or type(exc).__name__) from None  # fmt: skip
        if len(response.content) > MAX_RESPONSE_BYTES:
            raise ApiClientError("API answer too large", bytes=len(response.content))
        if response.status_code >= 400:
            raise error_from_response(response)
        content_type = response.headers.get("content-type", "")
        return response.json() if content_type.startswith("application/json") else response.text

    # ----- VMs (mirrors VMService) -----

    async def create(self, request: dict[str, Any], *, timeout_s: float | None = None) -> VMOut:
        """Create a VM from an API create request (see VMCreate: name, profile or kernel, ...)."""
        long = request.get("start") and request.get("wait")
        data = await self.request("POST", "/v1/vms", json=request,
                                  timeout_s=timeout_s or (LONG_TIMEOUT_S if long else None))  # fmt: skip
        return VMOut.model_validate(data)

    async def list(self) -> builtins.list[VMOut]:
        return [VMOut.model_validate(v) for v in await self.request("GET", "/v1/vms")]

    async def show(self, name: str) -> VMOut:
        return VMOut.model_validate(await self.request("GET", f"/v1/vms/{quote(name)}"))

    async def start(self, name: str, *, wait_ready: bool = False) -> VMOut:
        data = await self.request("POST", f"/v1/vms/{quote(name)}/start", params={"wait": wait_ready},
                                  timeout_s=LONG_TIMEOUT_S)  # fmt: skip
        return VMOut.model_validate(data)

    async def stop(self, name: str, *, force: bool = False, timeout_s: float | None = None) -> VMOut:
        data = await self.request("POST", f"/v1/vms/{quote(name)}/stop",
                                  params={"force": force, "timeout_s": timeout_s},
                                  timeout_s=LONG_TIMEOUT_S)  # fmt: skip
        return VMOut.model_validate(data)

    async def pause(self, name: str) -> VMOut:
        return VMOut.model_validate(await self.request("POST", f"/v1/vms/{quote(name)}/pause"))

    async def resume(self, name: str) -> VMOut:
        return VMOut.model_validate(await self.request("POST", f"/v1/vms/{quote(name)}/resume"))

    async def delete(self, name: str, *, force: bool = False) -> None:
        await self.request("DELETE", f"/v1/vms/{quote(name)}", params={"force": force},
                           timeout_s=LONG_TIMEOUT_S)  # fmt: skip

    async def console(self, name: str, *, tail_lines: int | None = None) -> str:
        data = await self.request("GET", f"/v1/vms/{quote(name)}/console", params={"lines": tail_lines})
        return "\n".join(data["lines"])

    def guest(self, name: str) -> RemoteGuest:
        return RemoteGuest(self, name)

    # ----- images, tokens, audit, identity -----

    async def images(self) -> builtins.list[ImageOut]:
        return [ImageOut.model_validate(i) for i in await self.request("GET", "/v1/images")]

    async def whoami(self) -> WhoAmI:
        return WhoAmI.model_validate(await self.request("GET", "/v1/whoami"))

    async def create_token(self, name: str, role: str, *, ttl_s: float | None = None) -> TokenIssued:
        body: dict[str, Any] = {"name": name, "role": role}
        if ttl_s is not None:
            body["ttl_s"] = ttl_s
        return TokenIssued.model_validate(await self.request("POST", "/v1/tokens", json=body))

    async def list_tokens(self) -> builtins.list[TokenOut]:
        return [TokenOut.model_validate(t) for t in await self.request("GET", "/v1/tokens")]

    async def revoke_token(self, token_id: str) -> TokenOut:
        return TokenOut.model_validate(await self.request("DELETE", f"/v1/tokens/{quote(token_id)}"))

    async def audit(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> tuple[builtins.list[AuditEntry], str | None]:
        data = await self.request(
            "GET", "/v1/audit", params={"since": since, "until": until, "after": after, "limit": limit}
        )
        return [AuditEntry.model_validate(e) for e in data["entries"]], data["next_cursor"]

    async def metrics(self) -> str:
        return str(await self.request("GET", "/metrics"))


class RemoteGuest:
    """The test guest's control channel through the API (same methods as GuestControl)."""

    def __init__(self, client: ApiClient, name: str) -> None:
        self.client = client
        self.path = f"/v1/vms/{quote(name)}/guest"

    async def __aenter__(self) -> RemoteGuest:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def status(self) -> GuestStatus:
        return GuestStatus(**await self.client.request("GET", f"{self.path}/status"))

    async def checksum(self) -> ChecksumResult:
        data = await self.client.request("GET", f"{self.path}/checksum", timeout_s=LONG_TIMEOUT_S)
        return ChecksumResult(**data)

    async def verify(self) -> VerifyResult:
        data = await self.client.request("GET", f"{self.path}/verify", timeout_s=LONG_TIMEOUT_S)
        return VerifyResult(**data)

    async def dirty(self, rate: int, bytes_per_page: int, rewrite_rate: int | None = None) -> DirtyAck:
        body = {"rate": rate, "bytes_per_page": bytes_per_page, "rewrite_rate": rewrite_rate}
        return DirtyAck(**await self.client.request("POST", f"{self.path}/dirty", json=body))
