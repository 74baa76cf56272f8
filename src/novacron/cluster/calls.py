"""Calls from one node to another node's API over mutual TLS (the node listener: the caller is
authenticated by its node certificate, never by a bearer token)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from novacron.api.client import ApiClient
from novacron.security.tls import TlsConfig

NODE_CALL_TIMEOUT_S = 120.0  # creating and booting a guest (start + wait) under TCG fits in this


class NodeCaller(Protocol):
    async def call(
        self, api: str, method: str, path: str, body: Any = None, *, timeout_s: float | None = None
    ) -> Any:
        """Send one request to the node API at ``api``; the decoded answer or the typed error."""
        ...


@dataclass(frozen=True)
class MtlsCaller:
    tls: TlsConfig
    timeout_s: float = NODE_CALL_TIMEOUT_S

    async def call(
        self, api: str, method: str, path: str, body: Any = None, *, timeout_s: float | None = None
    ) -> Any:
        async with ApiClient(api, ssl_context=self.tls.client, timeout_s=self.timeout_s) as client:
            return await client.request(method, path, json=body, timeout_s=timeout_s)


__all__ = ["NODE_CALL_TIMEOUT_S", "MtlsCaller", "NodeCaller"]
