"""Settings of an API server: limits (every one bounded, with a named default) and local access."""

from __future__ import annotations

from dataclasses import dataclass, field

from novacron.errors import UserError
from novacron.security.rbac import Role


class ApiConfigError(UserError):
    """An API setting is invalid, or a route does not declare its access."""


@dataclass(frozen=True)
class ApiLimits:
    # Per token: a client polling a handful of VMs a second stays far below; a flood does not.
    token_rate_per_s: float = 50.0
    token_burst: int = 200
    # Per client address, for requests without a valid token (and public routes).
    address_rate_per_s: float = 5.0
    address_burst: int = 20
    max_tracked_keys: int = 4096  # buckets kept per limiter (least recently seen are forgotten)
    max_body_bytes: int = 1 << 20
    max_concurrent_requests: int = 256  # uvicorn answers 503 beyond this
    keepalive_timeout_s: float = 15.0
    graceful_shutdown_s: float = 10.0
    max_header_bytes: int = 16 << 10

    def __post_init__(self) -> None:
        for name in ("token_rate_per_s", "address_rate_per_s"):
            if not getattr(self, name) > 0:
                raise ApiConfigError("API rate limits must be > 0", setting=name, value=getattr(self, name))
        for name in ("token_burst", "address_burst", "max_tracked_keys", "max_body_bytes",
                     "max_concurrent_requests"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ApiConfigError("API limit must be >= 1", setting=name, value=getattr(self, name))


@dataclass(frozen=True)
class ApiConfig:
    limits: ApiLimits = field(default_factory=ApiLimits)
    # Role granted to clients of the unix socket that present no token: the socket's file mode
    # decides who can connect at all (like the Docker socket), so the default is admin.
    local_role: Role = Role.ADMIN
    # Role of another cluster node on the node listener (its certificate, verified against the
    # cluster CA, is the credential): it forwards VM creates, starts drain migrations, heartbeats.
    node_role: Role = Role.OPERATOR
    title: str = "NovaCron API"
