"""Per-token and per-address request limits, on the token bucket the DWCP handshake uses.

A valid token is limited by its id; anything else (no token, a bad token, public routes) by the client
address, with a smaller budget. When a bucket is empty the caller is told to retry after ``1/rate``
seconds: the bucket holds less than one token then, and refills at ``rate`` per second, so that is an
upper bound on the wait (rounded up to whole seconds for ``Retry-After``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Literal

from novacron.api.config import ApiLimits
from novacron.dwcp.ratelimit import AttemptLimiter
from novacron.errors import UserError
from novacron.observability.metrics import API_RATE_LIMITED

KeyedBy = Literal["token", "address"]


class RateLimited(UserError):
    """Too many requests from one token or address; ``retry_after_s`` says when to come back."""

    def __init__(self, message: str, *, retry_after_s: int, **context: object) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **context)
        self.retry_after_s = retry_after_s


class RequestLimiter:
    def __init__(self, limits: ApiLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._by: dict[KeyedBy, tuple[AttemptLimiter, int]] = {
            "token": (
                AttemptLimiter(limits.token_rate_per_s, limits.token_burst, limits.max_tracked_keys),
                max(1, math.ceil(1.0 / limits.token_rate_per_s)),
            ),
            "address": (
                AttemptLimiter(limits.address_rate_per_s, limits.address_burst, limits.max_tracked_keys),
                max(1, math.ceil(1.0 / limits.address_rate_per_s)),
            ),
        }

    def take(self, keyed_by: KeyedBy, key: str) -> None:
        """Spend one request of ``key``'s budget, or raise RateLimited."""
        limiter, retry_after = self._by[keyed_by]
        if not limiter.allow(key, self.clock()):
            API_RATE_LIMITED.labels(keyed_by).inc()
            raise RateLimited("too many requests: slow down", retry_after_s=retry_after, keyed_by=keyed_by)
