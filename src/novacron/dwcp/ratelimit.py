"""Per-peer limit on handshake attempts: a token bucket per peer address, in a bounded table (sans-IO)."""

from __future__ import annotations

from collections import OrderedDict

from novacron.dwcp.errors import DwcpConfigError

DEFAULT_ATTEMPTS_PER_SECOND = 5.0
DEFAULT_ATTEMPT_BURST = 20
DEFAULT_MAX_TRACKED_PEERS = 4096


class AttemptLimiter:
    """Allows ``burst`` attempts at once and ``rate`` per second after that, per peer key.

    The table keeps the most recently seen ``max_peers`` keys; a forgotten key starts with a full
    bucket again, which only matters to a peer that rotates through more addresses than that.
    """

    def __init__(
        self,
        rate: float = DEFAULT_ATTEMPTS_PER_SECOND,
        burst: int = DEFAULT_ATTEMPT_BURST,
        max_peers: int = DEFAULT_MAX_TRACKED_PEERS,
    ) -> None:
        if not rate > 0 or burst < 1 or max_peers < 1:
            raise DwcpConfigError(
                "rate limit needs rate > 0, burst >= 1, max_peers >= 1", rate=rate, burst=burst
            )
        self.rate = rate
        self.burst = burst
        self.max_peers = max_peers
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def allow(self, key: str, now: float) -> bool:
        """Take one attempt for ``key`` at time ``now``; False if its bucket is empty."""
        tokens, at = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - at) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_peers:
            self._buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)
