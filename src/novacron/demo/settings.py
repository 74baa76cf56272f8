"""What the demo is asked to do: guest profile, workload, the emulated link. Pure, checked input."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from novacron.errors import UserError
from novacron.testing import LinkSpec

DEFAULT_LINK = "100mbit/50ms"  # internet-like: the goals are set on this link
DEFAULT_RATE = 2250  # pages/s, as in the migration measurements (shared/QEMU-MIGRATION-NOTES.md)
DEFAULT_DWELL_S = 20.0  # workload seconds on the destination before migrating back
MAX_DWELL_S = 3600.0
MAX_RATE = 1_000_000
UNSHAPED = "unshaped"

_LINK = re.compile(r"^(?P<rate>\d+(?:\.\d+)?)(?P<unit>kbit|mbit|gbit)/(?P<rtt>\d+(?:\.\d+)?)ms$")
_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


class DemoInputError(UserError):
    """A demo option is wrong (the message names the option and what is accepted)."""


@dataclass(frozen=True)
class DemoLink:
    text: str
    spec: LinkSpec | None  # None: unshaped (a veth bridge, no forwarder)
    backend: str

    @property
    def label(self) -> str:
        if self.spec is None or self.spec.rate_bps is None:
            return "unshaped (datacenter)"
        rate = self.spec.rate_bps
        shown = f"{rate / 1e9:g} Gbit/s" if rate >= 1e9 else f"{rate / 1e6:g} Mbit/s"
        return f"{shown}, {2 * self.spec.delay_ms:g} ms RTT"


def parse_link(text: str) -> DemoLink:
    """``100mbit/50ms`` (rate / round-trip time), ``1gbit/10ms``, or ``unshaped``."""
    value = text.strip().lower()
    if value == UNSHAPED:
        return DemoLink(value, None, "veth")
    m = _LINK.match(value)
    if m is None:
        raise DemoInputError(
            f"invalid --link {text!r}: expected RATE/RTT such as 100mbit/50ms or 1gbit/10ms, or 'unshaped'",
            option="--link",
            value=text,
        )
    rate = float(m["rate"]) * _UNITS[m["unit"]]
    rtt = float(m["rtt"])
    if not (1e5 <= rate <= 10e9) or not (0 < rtt <= 2000):
        raise DemoInputError(
            f"--link {text!r} out of range: rate 100kbit..10gbit, RTT above 0 up to 2000 ms",
            option="--link",
            value=text,
        )
    return DemoLink(value, LinkSpec.for_rtt(rtt, rate_bps=rate), "tun")


@dataclass(frozen=True)
class DemoSettings:
    profile: str = "default"
    rate: int = DEFAULT_RATE
    link: DemoLink = field(default_factory=lambda: parse_link(DEFAULT_LINK))
    dwell_s: float = DEFAULT_DWELL_S
    skip_qemu: bool = False
    max_downtime_ms: int = 300

    def __post_init__(self) -> None:
        if self.profile not in ("test", "default"):
            raise DemoInputError(f"unknown --profile {self.profile!r}: test or default", option="--profile")
        if not 0 <= self.rate <= MAX_RATE:
            raise DemoInputError(f"--rate must be 0..{MAX_RATE} pages/s", option="--rate", value=self.rate)
        if not 0 <= self.dwell_s <= MAX_DWELL_S:
            raise DemoInputError(
                f"--dwell must be 0..{MAX_DWELL_S:g} s", option="--dwell", value=self.dwell_s
            )
