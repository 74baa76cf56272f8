"""Convergence steering of a precopy migration. Sans-IO: samples and ``now`` in, actions out.

Theory of operation
-------------------
QEMU switches over when what is left (``remaining``) fits in ``downtime-limit`` at the bandwidth it
measured over the last 100 ms. Three things decide whether that ever happens, and this module steers
each of them from what QEMU reports (``query-migrate``) and what the transport measured:

* **downtime-limit**: the operator's maximum downtime minus what the switchover costs us beyond
  QEMU's own estimate (the COMPLETED message to the destination and its ``cont``: about one one-way
  delay plus a few ms), times a safety factor, because QEMU overshoots its own limit (331 and 368 ms
  were seen here against 300).
* **max-bandwidth**: QEMU's default cap is 128 MiB/s (about 1 Gbit/s), far too low for a datacenter
  link, so it is raised. On the direct path, where QEMU writes straight into a TCP socket, a known
  link bandwidth caps QEMU near it, so the kernel's socket buffers do not fill with seconds of data
  that would all have to drain during the downtime. Through the tunnel the tunnel's own bounded
  buffer applies backpressure, so QEMU is left uncapped.
* **the dirty rate against the bandwidth**: watched once per pass (``dirty-sync-count``). When the
  guest dirties memory about as fast as the link carries it, or ``remaining`` stops shrinking over
  several passes, steering escalates: first auto-converge (enabled at the start with the highest
  trigger threshold and gentle steps, so it stays idle on a converging migration; escalation lowers
  the threshold and steepens the steps through ``migrate-set-parameters``, since capabilities cannot
  change during a migration in QEMU 7.2); then post-copy, if the operator allowed it and the
  migration was started with ``postcopy-ram`` (which in 7.2 means without multifd).

* **no switchover straight after the first pass**: while QEMU is in its first pass the limit is
  held at its minimum. At the end of the bulk pass the socket buffers between the QEMUs are full
  (megabytes the destination must still read, decrypt and place, in faulting memory), and QEMU's
  estimate knows nothing of them: its last writes wait for them, then the destination drains them,
  all inside the downtime. A second pass sends what the guest dirtied during the first while the
  buffers drain. Measured on the direct path, paired runs (docs/migration.md, tenth run): unshaped,
  downtime median 219 ms against 763 (over 300 ms in 3 of 10 runs against 8), 1 Gbit/s 178 ms
  against 362; no time lost.

At the deadline the migration is aborted with a reason that says what was left, how fast the guest
dirtied memory and how fast the link carried it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from novacron.migration.errors import MigrationInputError

UNCAPPED_BANDWIDTH = 1 << 40  # bytes/s: "no cap" without relying on 0's meaning across versions
MIN_DOWNTIME_LIMIT_MS = 10


@dataclass(frozen=True)
class SteeringConfig:
    downtime_safety: float = 0.5  # fraction of the budget handed to QEMU as downtime-limit
    switchover_overhead_ms: float = 15.0  # our COMPLETED message + cont beyond one one-way delay
    # Uncompressed paths into TCP: QEMU may use this fraction of the link, so the kernel's socket
    # buffers drain instead of filling with data that would all cross during the downtime.
    bandwidth_headroom: float = 0.9
    measure_after_s: float = 1.0  # link rates count only after TCP ramped up this long
    min_rate_samples: int = 5  # ... and QEMU is capped as soon as this many were taken
    # Of the pass-1 rates (what the link delivered, else QEMU's own): the link's rate. Zero-page
    # stretches are slower, so a high quantile rather than the mean.
    rate_quantile: float = 0.9
    drain_headroom: float = 0.6  # QEMU's share of the drain rate while a backlog eats the budget
    drain_window_s: float = 1.0  # the drain rate is measured over this window
    idle_trigger_threshold: int = 100  # auto-converge idle: triggers only when dirtying outruns sending
    idle_throttle_initial: int = 5
    idle_throttle_increment: int = 5
    active_trigger_threshold: int = 30
    active_throttle_initial: int = 30
    active_throttle_increment: int = 20
    max_cpu_throttle: int = 99
    escalate_after_passes: int = 4  # passes that show no convergence before auto-converge
    stall_passes: int = 3  # ... "remaining did not shrink" is judged over this many passes
    stall_shrink: float = 0.9  # remaining must fall below this fraction of its value stall_passes ago
    dirty_vs_bandwidth: float = 0.8  # dirtying at this fraction of the bandwidth counts as not converging
    postcopy_after_passes: int = 4  # further passes under auto-converge before post-copy
    history: int = 64

    def __post_init__(self) -> None:
        if not (
            0 < self.downtime_safety <= 1
            and 0 < self.stall_shrink <= 1
            and 0 < self.bandwidth_headroom <= 2
            and 0 < self.rate_quantile <= 1
        ):
            raise MigrationInputError("steering fractions out of range", config=repr(self))
        for name in ("idle_trigger_threshold", "active_trigger_threshold"):
            if not 1 <= getattr(self, name) <= 100:
                raise MigrationInputError("throttle trigger threshold must be 1..100", field=name)


@dataclass(frozen=True)
class SteeringPolicy:
    """What the operator asked for, and what the data path allows."""

    max_downtime_ms: int
    deadline_at: float  # absolute time (same clock as the samples' ``now``)
    allow_postcopy: bool = False
    postcopy_capable: bool = False  # the migration was started with postcopy-ram
    cap_bandwidth: bool = True  # direct path: cap QEMU near the link bandwidth when known
    cap_from_measurement: bool = True  # ... also when only measured in pass 1 (not configured)
    one_way_delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.max_downtime_ms < 1:
            raise MigrationInputError("max downtime must be at least 1 ms", field="max_downtime_ms")


@dataclass(frozen=True)
class Sample:
    """One ``query-migrate`` answer of the source, reduced to what steering needs."""

    status: str
    iteration: int  # ram.dirty-sync-count: 1 during the first pass
    remaining: int  # bytes
    transferred: int  # bytes QEMU counted (before multifd compression)
    dirty_pages_rate: float  # pages/s over the last pass
    page_size: int = 4096
    mbps: float = 0.0  # QEMU's raw send rate over its last 100 ms window
    wire_bps: float | None = None  # what the link delivered lately (the data path's counters)
    buffered_bytes: int = 0  # taken from QEMU, not yet delivered (socket buffers, tunnel window)
    throttle_pct: int = 0
    expected_downtime_ms: int = 0

    @classmethod
    def from_query(cls, info: dict[str, Any]) -> Sample:
        ram = info.get("ram") or {}
        return cls(
            status=str(info.get("status", "")),
            iteration=int(ram.get("dirty-sync-count", 0)),
            remaining=int(ram.get("remaining", 0)),
            transferred=int(ram.get("transferred", 0)),
            dirty_pages_rate=float(ram.get("dirty-pages-rate", 0)),
            page_size=int(ram.get("page-size", 4096)) or 4096,
            mbps=float(ram.get("mbps", 0.0)),
            throttle_pct=int(info.get("cpu-throttle-percentage", 0)),
            expected_downtime_ms=int(info.get("expected-downtime", 0)),
        )

    @property
    def dirty_bps(self) -> float:
        return self.dirty_pages_rate * self.page_size * 8


@dataclass(frozen=True)
class SetParameters:
    parameters: dict[str, Any]
    why: str
    routine: bool = False  # a continuous adjustment (not worth a line in the migration's record)


@dataclass(frozen=True)
class StartPostcopy:
    why: str


@dataclass(frozen=True)
class Abort:
    reason: str


Action = SetParameters | StartPostcopy | Abort


@dataclass
class _Pass:
    iteration: int
    remaining: int
    dirty_bps: float
    bandwidth_bps: float


@dataclass
class ConvergenceSteering:
    """One migration's steering. Call :meth:`initial_parameters` before ``migrate``, then
    :meth:`observe` for every sample; apply the returned actions in order."""

    policy: SteeringPolicy
    config: SteeringConfig = field(default_factory=SteeringConfig)
    level: int = 0  # 0 precopy as is, 1 auto-converge steering, 2 post-copy requested
    events: list[str] = field(default_factory=list)
    _passes: deque[_Pass] = field(init=False)
    _last_iteration: int = field(default=0, init=False)
    _escalated_at_pass: int = field(default=0, init=False)
    _link_bps: float | None = field(default=None, init=False)
    _aborted: bool = field(default=False, init=False)
    _first_at: float | None = field(default=None, init=False)
    _limit_set: int = field(default=0, init=False)
    _cap_factor: float = field(default=0.0, init=False)
    _drain_capped: bool = field(default=False, init=False)
    _delivered: deque[tuple[float, int]] = field(default_factory=deque, init=False)
    backlog_ms: float = field(default=0.0, init=False)
    _pass1_rates: list[float] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self._passes = deque(maxlen=self.config.history)
        self._limit_set = MIN_DOWNTIME_LIMIT_MS
        self._cap_factor = self.config.bandwidth_headroom

    # ----- parameters -----

    def downtime_limit_ms(self, backlog_ms: float = 0.0) -> int:
        c = self.config
        overhead = self.policy.one_way_delay_s * 1000 + c.switchover_overhead_ms + backlog_ms
        budget = (self.policy.max_downtime_ms - overhead) * c.downtime_safety
        return max(MIN_DOWNTIME_LIMIT_MS, int(budget))

    def bandwidth_cap(self, factor: float | None = None) -> int:
        if not self.policy.cap_bandwidth or self._link_bps is None:
            return UNCAPPED_BANDWIDTH
        share = self.config.bandwidth_headroom if factor is None else factor
        return max(1 << 20, int(self._link_bps / 8 * share))

    def initial_parameters(self, link_bps: float | None = None) -> dict[str, Any]:
        """Parameters for ``migrate-set-parameters`` before ``migrate`` (auto-converge idle)."""
        if link_bps is not None and link_bps > 0:
            self._link_bps = link_bps
        c = self.config
        self._limit_set = MIN_DOWNTIME_LIMIT_MS  # no switchover at the end of the first pass
        self._cap_factor = c.bandwidth_headroom
        return {
            "downtime-limit": self._limit_set,
            "max-bandwidth": self.bandwidth_cap(),
            "throttle-trigger-threshold": c.idle_trigger_threshold,
            "cpu-throttle-initial": c.idle_throttle_initial,
            "cpu-throttle-increment": c.idle_throttle_increment,
            "max-cpu-throttle": c.max_cpu_throttle,
        }

    def link_measured(self, link_bps: float) -> list[Action]:
        """The transport measured the link's bandwidth: re-cap QEMU if it changed by over 10 %."""
        if not (link_bps > 0 and math.isfinite(link_bps)):
            return []
        old = self._link_bps
        self._link_bps = link_bps
        if not self.policy.cap_bandwidth or (old is not None and abs(link_bps - old) < 0.1 * old):
            return []
        return [
            SetParameters(
                {"max-bandwidth": self.bandwidth_cap()}, f"link measured at {link_bps / 1e6:.0f} Mbit/s"
            )
        ]

    # ----- the loop -----

    def observe(self, sample: Sample, now: float) -> list[Action]:
        if self._aborted or sample.status not in ("active", "setup"):
            return []
        if now >= self.policy.deadline_at:
            self._aborted = True
            return [Abort(self._deadline_reason(sample))]
        if self._first_at is None:
            self._first_at = now
        measuring = self._link_bps is None and now - self._first_at >= self.config.measure_after_s
        rate = sample.wire_bps if sample.wire_bps is not None else sample.mbps * 1e6
        if measuring and rate > 0 and len(self._pass1_rates) < self.config.history:
            self._pass1_rates.append(rate)
        backlog = self._cap_when_measured() + self._follow_backlog(sample, now)
        if sample.iteration <= self._last_iteration:
            return backlog
        # A new pass began: judge the one that just ended.
        self._last_iteration = sample.iteration
        actions: list[Action] = backlog
        bandwidth = self._link_bps or sample.mbps * 1e6
        self._passes.append(_Pass(sample.iteration, sample.remaining, sample.dirty_bps, bandwidth))
        if sample.iteration < 2:
            return actions
        return actions + self._escalate_if_needed(sample)

    def _follow_backlog(self, sample: Sample, now: float) -> list[Action]:
        """What sits between the QEMUs (socket buffers, the tunnel's window and queues) crosses during
        the downtime too. Its drain time (the backlog over the rate at which bytes reach the
        destination QEMU, measured) comes off QEMU's downtime-limit; and while it alone eats half the
        budget, QEMU is held below that drain rate so it shrinks (a fast producer with a slow
        consumer: a tunnel whose compression lets raw bytes in faster than the destination can
        rebuild them, or TCP buffers filled before the link was known)."""
        c = self.config
        delivered = sample.transferred - sample.buffered_bytes
        self._delivered.append((now, delivered))
        while len(self._delivered) > 2 and now - self._delivered[1][0] >= c.drain_window_s:
            self._delivered.popleft()
        t0, d0 = self._delivered[0]
        drain_bps = (delivered - d0) * 8 / (now - t0) if now - t0 >= c.drain_window_s / 2 else 0.0
        backlog_ms = sample.buffered_bytes * 8 / drain_bps * 1000 if drain_bps > 0 else 0.0
        self.backlog_ms = backlog_ms
        actions: list[Action] = []
        first_pass = sample.iteration < 2
        limit = MIN_DOWNTIME_LIMIT_MS if first_pass else self.downtime_limit_ms(backlog_ms)
        if abs(limit - self._limit_set) > max(5, 0.1 * self._limit_set):
            self._limit_set = limit
            actions.append(
                SetParameters({"downtime-limit": limit}, f"backlog {backlog_ms:.0f} ms", routine=True)
            )
        draining = drain_bps > 0 and backlog_ms > self.policy.max_downtime_ms / 2
        if draining:
            cap = max(1 << 20, int(drain_bps / 8 * c.drain_headroom))
        elif self._cap_factor != c.bandwidth_headroom or self._drain_capped:
            cap = self.bandwidth_cap()
        else:
            return actions
        if draining != self._drain_capped or (not draining and self._cap_factor != c.bandwidth_headroom):
            self._drain_capped = draining
            self._cap_factor = c.bandwidth_headroom
            actions.append(
                SetParameters({"max-bandwidth": cap}, f"backlog {backlog_ms:.0f} ms", routine=True)
            )
        return actions

    def _cap_when_measured(self) -> list[Action]:
        """Without a configured link rate, measure it while QEMU runs uncapped into TCP (early in the
        first pass), then cap QEMU below it before the socket buffers fill with seconds of data."""
        c = self.config
        if (
            not (self.policy.cap_bandwidth and self.policy.cap_from_measurement)
            or self._link_bps is not None
            or len(self._pass1_rates) < c.min_rate_samples
        ):
            return []
        rates = sorted(self._pass1_rates)
        self._link_bps = rates[min(len(rates) - 1, int(c.rate_quantile * len(rates)))]
        cap = self.bandwidth_cap()
        link, capped = self._link_bps / 1e6, cap * 8 / 1e6
        why = f"link measured at {link:.0f} Mbit/s: QEMU capped at {capped:.0f} Mbit/s"
        self.events.append(why)
        return [SetParameters({"max-bandwidth": cap}, why)]

    def _not_converging(self) -> str | None:
        c = self.config
        last = self._passes[-1]
        if last.bandwidth_bps > 0 and last.dirty_bps >= c.dirty_vs_bandwidth * last.bandwidth_bps:
            dirty, bandwidth = last.dirty_bps / 1e6, last.bandwidth_bps / 1e6
            return f"dirty rate {dirty:.0f} Mbit/s vs bandwidth {bandwidth:.0f} Mbit/s"
        if len(self._passes) > c.stall_passes:
            before = self._passes[-1 - c.stall_passes]
            if before.remaining > 0 and last.remaining > c.stall_shrink * before.remaining:
                return f"remaining {last.remaining >> 20} MiB did not shrink over {c.stall_passes} passes"
        return None

    def _escalate_if_needed(self, sample: Sample) -> list[Action]:
        c = self.config
        why = self._not_converging()
        if why is None:
            return []
        passes = sample.iteration
        if self.level == 0 and passes >= c.escalate_after_passes:
            self.level = 1
            self._escalated_at_pass = passes
            self.events.append(f"auto-converge at pass {passes}: {why}")
            return [
                SetParameters(
                    {
                        "throttle-trigger-threshold": c.active_trigger_threshold,
                        "cpu-throttle-initial": c.active_throttle_initial,
                        "cpu-throttle-increment": c.active_throttle_increment,
                    },
                    f"auto-converge: {why}",
                )
            ]
        if (
            self.level == 1
            and passes >= self._escalated_at_pass + c.postcopy_after_passes
            and self.policy.allow_postcopy
            and self.policy.postcopy_capable
        ):
            self.level = 2
            self.events.append(f"post-copy at pass {passes}: {why} (throttle {sample.throttle_pct}%)")
            return [StartPostcopy(f"post-copy: {why} under {sample.throttle_pct}% throttle")]
        return []

    def _deadline_reason(self, sample: Sample) -> str:
        last = self._passes[-1] if self._passes else None
        bandwidth = (last.bandwidth_bps if last else 0.0) or sample.mbps * 1e6
        return (
            f"did not converge by the deadline: {sample.remaining >> 20} MiB left after "
            f"{sample.iteration} passes, guest dirties {sample.dirty_bps / 1e6:.0f} Mbit/s, "
            f"link carries {bandwidth / 1e6:.0f} Mbit/s, throttle {sample.throttle_pct}%"
            + ("" if self.policy.allow_postcopy else "; post-copy not allowed")
        )


def eta_seconds(sample: Sample) -> float | None:
    """Rough time to finish: what is left at the current raw rate (None before a rate is known)."""
    rate = sample.mbps * 1e6 / 8
    if rate <= 0:
        return None
    return sample.remaining / rate


__all__ = [
    "UNCAPPED_BANDWIDTH",
    "Abort",
    "Action",
    "ConvergenceSteering",
    "Sample",
    "SetParameters",
    "StartPostcopy",
    "SteeringConfig",
    "SteeringPolicy",
    "eta_seconds",
]
