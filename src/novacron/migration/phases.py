"""The phases of a migration: one table of legal transitions, and a sans-IO machine with timeouts.

Two rules, as in h11's state module: everything that decides whether a phase change is legal lives in
:data:`TRANSITIONS`; and this module does not know which side (source or destination) it runs on:
both sides walk the same phases, the destination following the source's announcements.

Theory of operation
-------------------
::

    prepare -> connect -> precopy -> converge -> switchover -> verify -> commit -> done
                             |           |                       ^
                             |           +-> postcopy -----------+   (no way back once started)
    any phase before commit ---------------------------------> rollback -> failed | cancelled
    switchover, postcopy, verify, commit -> in-doubt -> commit | rollback

``in-doubt`` is where a side waits when the peer cannot be reached at a moment where neither rolling
back nor committing is safe on its own (the source QEMU completed, so the destination may hold the
only complete state, or already run it): the side keeps its QEMU as it is and asks the peer again.

Time is an argument: :meth:`PhaseMachine.advance` takes ``now``, :meth:`PhaseMachine.expires_at`
says when the current phase times out and :meth:`PhaseMachine.timed_out` checks it. ``precopy`` and
``converge`` also end at the migration deadline (``converge``'s timeout *is* the deadline).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType

from novacron.migration.errors import IllegalPhaseTransition, MigrationInputError


class Phase(enum.StrEnum):
    PREPARE = "prepare"
    CONNECT = "connect"
    PRECOPY = "precopy"
    CONVERGE = "converge"
    POSTCOPY = "postcopy"
    SWITCHOVER = "switchover"
    VERIFY = "verify"
    COMMIT = "commit"
    DONE = "done"
    IN_DOUBT = "in-doubt"
    ROLLBACK = "rollback"
    FAILED = "failed"
    CANCELLED = "cancelled"


P = Phase
TRANSITIONS: Mapping[Phase, frozenset[Phase]] = MappingProxyType(
    {
        P.PREPARE: frozenset({P.CONNECT, P.ROLLBACK}),
        P.CONNECT: frozenset({P.PRECOPY, P.ROLLBACK}),
        # A small or idle VM can finish within the first pass: precopy -> switchover directly.
        P.PRECOPY: frozenset({P.CONVERGE, P.SWITCHOVER, P.ROLLBACK}),
        P.CONVERGE: frozenset({P.SWITCHOVER, P.POSTCOPY, P.ROLLBACK}),
        # Post-copy moves the running VM to the destination before all its memory: no rollback.
        P.POSTCOPY: frozenset({P.VERIFY, P.IN_DOUBT}),
        P.SWITCHOVER: frozenset({P.VERIFY, P.ROLLBACK, P.IN_DOUBT}),
        P.VERIFY: frozenset({P.COMMIT, P.ROLLBACK, P.IN_DOUBT}),
        P.COMMIT: frozenset({P.DONE, P.IN_DOUBT}),
        P.IN_DOUBT: frozenset({P.COMMIT, P.ROLLBACK, P.DONE}),
        P.ROLLBACK: frozenset({P.FAILED, P.CANCELLED}),
        P.DONE: frozenset(),
        P.FAILED: frozenset(),
        P.CANCELLED: frozenset(),
    }
)

FINAL_PHASES = frozenset({P.DONE, P.FAILED, P.CANCELLED})
# Phases in which an operator's cancel is honoured: everything before commit that can still go back.
CANCELLABLE_PHASES = frozenset({P.PREPARE, P.CONNECT, P.PRECOPY, P.CONVERGE, P.SWITCHOVER, P.VERIFY})
# Phases whose timeout is also capped by the migration deadline.
DEADLINE_PHASES = frozenset({P.PRECOPY, P.CONVERGE})
# The source QEMU may have completed: the destination can hold the only complete copy.
PAST_SWITCHOVER = frozenset({P.SWITCHOVER, P.POSTCOPY, P.VERIFY, P.COMMIT, P.IN_DOUBT})


@dataclass(frozen=True)
class PhaseTimeouts:
    """Seconds each phase may take. ``deadline_s`` bounds the whole migration up to switchover."""

    prepare_s: float = 120.0  # destination checks, artefact shipping, QEMU start (TCG, busy host)
    connect_s: float = 30.0  # sessions, capabilities on both QEMUs, migrate-incoming
    precopy_s: float = 3600.0  # the first pass; also capped by the deadline
    deadline_s: float = 600.0  # migration start until switchover: converge's timeout
    postcopy_s: float = 600.0
    switchover_s: float = 60.0  # the last pass after the source stopped, both sides completed
    verify_s: float = 30.0  # destination resumed and answering
    commit_s: float = 30.0
    in_doubt_s: float = math.inf  # waiting for the peer is bounded by the peer, not by us
    rollback_s: float = 60.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, int | float) and value > 0):
                raise MigrationInputError("phase timeouts must be positive", field=f.name, value=value)

    def of(self, phase: Phase) -> float:
        return {
            P.PREPARE: self.prepare_s,
            P.CONNECT: self.connect_s,
            P.PRECOPY: self.precopy_s,
            P.CONVERGE: self.deadline_s,
            P.POSTCOPY: self.postcopy_s,
            P.SWITCHOVER: self.switchover_s,
            P.VERIFY: self.verify_s,
            P.COMMIT: self.commit_s,
            P.IN_DOUBT: self.in_doubt_s,
            P.ROLLBACK: self.rollback_s,
        }.get(phase, math.inf)


@dataclass(frozen=True)
class PhaseChange:
    old: Phase
    new: Phase
    at: float


@dataclass
class PhaseMachine:
    """The current phase, its history and its timer. Illegal moves raise and change nothing."""

    started_at: float
    timeouts: PhaseTimeouts = field(default_factory=PhaseTimeouts)
    phase: Phase = Phase.PREPARE
    entered_at: float = field(init=False)
    history: list[PhaseChange] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.entered_at = self.started_at

    @property
    def final(self) -> bool:
        return self.phase in FINAL_PHASES

    @property
    def cancellable(self) -> bool:
        return self.phase in CANCELLABLE_PHASES

    @property
    def deadline(self) -> float:
        return self.started_at + self.timeouts.deadline_s

    def allowed(self, new: Phase) -> bool:
        return new in TRANSITIONS[self.phase]

    def advance(self, new: Phase, now: float) -> PhaseChange:
        if new not in TRANSITIONS[self.phase]:
            raise IllegalPhaseTransition(
                f"a migration cannot go from {self.phase} to {new}", phase=str(self.phase), to=str(new)
            )
        change = PhaseChange(self.phase, new, now)
        self.phase = new
        self.entered_at = now
        self.history.append(change)
        return change

    def expires_at(self) -> float:
        """When the current phase times out (``inf`` for final phases and in-doubt)."""
        end = self.entered_at + self.timeouts.of(self.phase)
        if self.phase in DEADLINE_PHASES:
            end = min(end, self.deadline)
        return end

    def remaining(self, now: float) -> float:
        return max(0.0, self.expires_at() - now)

    def timed_out(self, now: float) -> bool:
        return now >= self.expires_at()


__all__ = [
    "CANCELLABLE_PHASES",
    "FINAL_PHASES",
    "PAST_SWITCHOVER",
    "TRANSITIONS",
    "Phase",
    "PhaseChange",
    "PhaseMachine",
    "PhaseTimeouts",
]
