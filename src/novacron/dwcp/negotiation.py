"""What two DWCP peers agree on: protocol version, capabilities and the announced mode.

Version: each side has a supported range; the highest version in both ranges wins. Capabilities: the
session uses the intersection (sets intersect, numbers take the minimum), with codecs kept in the
client's order of preference. Mode: each side only *announces* one; the mode detector decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from novacron.dwcp.errors import DwcpConfigError
from novacron.dwcp.frames.limits import (
    DEFAULT_MAX_FRAME_SIZE,
    HARD_MAX_FRAME_SIZE,
    MAX_U16,
    MIN_MAX_FRAME_SIZE,
)
from novacron.dwcp.frames.messages import MAX_CAPABILITY_ITEMS, NAME_BYTES

PROTOCOL_VERSION = 3

DEFAULT_CODECS = ("zstd", "lz4")
DEFAULT_MAX_STREAMS = 16
MAX_STREAMS_LIMIT = 256


@dataclass(frozen=True, slots=True)
class VersionRange:
    low: int
    high: int

    def __post_init__(self) -> None:
        if not (0 <= self.low <= self.high <= MAX_U16):
            raise DwcpConfigError(
                f"invalid protocol version range {self.low}..{self.high}", low=self.low, high=self.high
            )

    def negotiate(self, other: VersionRange) -> int | None:
        """The highest version in both ranges, or None if they do not overlap."""
        best = min(self.high, other.high)
        return best if best >= max(self.low, other.low) else None

    def __contains__(self, version: object) -> bool:
        return isinstance(version, int) and self.low <= version <= self.high

    def __str__(self) -> str:
        return f"{self.low}..{self.high}"


SUPPORTED_VERSIONS = VersionRange(PROTOCOL_VERSION, PROTOCOL_VERSION)


class Mode(StrEnum):
    DATACENTER = "datacenter"
    INTERNET = "internet"
    HYBRID = "hybrid"
    AUTO = "auto"


def parse_mode(value: str) -> Mode | None:
    try:
        return Mode(value)
    except ValueError:
        return None


def _check_names(values: tuple[str, ...] | frozenset[str], what: str) -> None:
    if len(values) > MAX_CAPABILITY_ITEMS:
        raise DwcpConfigError(f"at most {MAX_CAPABILITY_ITEMS} {what}", count=len(values))
    for v in values:
        if not isinstance(v, str) or not 1 <= len(v.encode("utf-8", "replace")) <= NAME_BYTES:
            raise DwcpConfigError(f"each of {what} must be 1..{NAME_BYTES} bytes of text", value=v)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What one side can do, or (after :meth:`intersect`) what a session uses."""

    codecs: tuple[str, ...] = DEFAULT_CODECS
    max_streams: int = DEFAULT_MAX_STREAMS
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    features: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        _check_names(self.codecs, "codecs")
        if len(set(self.codecs)) != len(self.codecs):
            raise DwcpConfigError("codecs must not repeat", codecs=",".join(self.codecs))
        _check_names(self.features, "features")
        if not isinstance(self.max_streams, int) or not 1 <= self.max_streams <= MAX_STREAMS_LIMIT:
            raise DwcpConfigError(f"max streams must be 1..{MAX_STREAMS_LIMIT}", value=self.max_streams)
        if not isinstance(self.max_frame_size, int) or not (
            MIN_MAX_FRAME_SIZE <= self.max_frame_size <= HARD_MAX_FRAME_SIZE
        ):
            raise DwcpConfigError(
                f"max frame size must be {MIN_MAX_FRAME_SIZE}..{HARD_MAX_FRAME_SIZE}",
                value=self.max_frame_size,
            )

    def intersect(self, other: Capabilities) -> Capabilities:
        """What both sides support; codec order is ours (our preference)."""
        return Capabilities(
            codecs=tuple(c for c in self.codecs if c in other.codecs),
            max_streams=min(self.max_streams, other.max_streams),
            max_frame_size=min(self.max_frame_size, other.max_frame_size),
            features=self.features & other.features,
        )

    def covers(self, other: Capabilities) -> bool:
        """True if ``other`` asks for nothing beyond what we offered."""
        return (
            set(other.codecs) <= set(self.codecs)
            and other.features <= self.features
            and other.max_streams <= self.max_streams
            and other.max_frame_size <= self.max_frame_size
        )

    @classmethod
    def from_wire(
        cls, codecs: tuple[str, ...], max_streams: int, max_frame_size: int, features: tuple[str, ...]
    ) -> Capabilities:
        """A peer's offer. Numbers above our hard limits are clamped (the intersection would cut them
        anyway); values below the minimums or repeated names are refused."""
        return cls(
            codecs=tuple(dict.fromkeys(codecs)),
            max_streams=min(max_streams, MAX_STREAMS_LIMIT),
            max_frame_size=min(max_frame_size, HARD_MAX_FRAME_SIZE),
            features=frozenset(features),
        )


DEFAULT_CAPABILITIES = Capabilities()
