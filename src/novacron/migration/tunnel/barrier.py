"""The SYNC barrier that merges QEMU's multifd channels into one ordered stream (sans-IO).

docs/migration.md section 3: once a channel's SYNC packet has entered the merged stream, nothing more
of that channel may enter it until every channel's SYNC of the same round has. Otherwise the
destination could hold a later round's data of one channel behind an earlier round's data of another,
which QEMU's receiving threads (each blocked in the sync until all channels reach it) could wait for.

The barrier counts ``expected`` channels per round (the multifd channel count QEMU was given), not the
channels seen so far: QEMU's first sync comes before its slowest channel may have connected to us.
A channel that ends or is diverted leaves the barrier (its SYNCs are no longer visible), and the round
size shrinks with it.
"""

from __future__ import annotations

from novacron.migration.tunnel.errors import TunnelError


class SyncBarrier:
    def __init__(self, expected: int) -> None:
        if expected < 0:
            raise TunnelError("expected channel count must be >= 0", expected=expected)
        self._expected = expected
        self._joined: set[int] = set()
        self._left: set[int] = set()  # channels that ended or were diverted
        self._parked: set[int] = set()
        self.rounds = 0

    @property
    def round_size(self) -> int:
        return max(self._expected, len(self._joined)) - len(self._left)

    def parked(self, channel: int) -> bool:
        return channel in self._parked

    def join(self, channel: int) -> None:
        """A channel connected (more than ``expected`` may: then every one of them counts)."""
        self._joined.add(channel)

    def took_sync(self, channel: int) -> set[int]:
        """``channel``'s SYNC entered the stream; returns the channels released (empty: park it)."""
        if channel in self._left:
            raise TunnelError("SYNC from a channel that left the barrier", channel=channel)
        if channel in self._parked:
            raise TunnelError("second SYNC from a parked channel", channel=channel)
        self._joined.add(channel)
        self._parked.add(channel)
        return self._release_if_complete()

    def leave(self, channel: int) -> set[int]:
        """``channel`` sends no more SYNCs (ended, diverted); returns channels the smaller round frees."""
        self._joined.add(channel)
        self._left.add(channel)
        self._parked.discard(channel)
        return self._release_if_complete()

    def _release_if_complete(self) -> set[int]:
        if self._parked and len(self._parked) >= self.round_size:
            released, self._parked = self._parked, set()
            self.rounds += 1
            return released
        return set()
