"""ITP placement: filter-then-score for one VM, CP-SAT batch placement and rebalancing with a greedy
fallback, and drain planning. Pure logic over plain data (see docs/placement.md)."""

from novacron.dwcp.placement.cpsat import CpSatLimits, cpsat_place, cpsat_rebalance
from novacron.dwcp.placement.drain import DrainLimits, DrainPlan, DrainProgress, DrainRun, plan_drain
from novacron.dwcp.placement.greedy import (
    Decision,
    Move,
    PlacementResult,
    Quality,
    greedy_place,
    greedy_rebalance,
    place_one,
)
from novacron.dwcp.placement.model import (
    VM,
    Cluster,
    Host,
    NoFeasibleHost,
    PlacementError,
    PlacementInputError,
)

__all__ = [
    "VM",
    "Cluster",
    "CpSatLimits",
    "Decision",
    "DrainLimits",
    "DrainPlan",
    "DrainProgress",
    "DrainRun",
    "Host",
    "Move",
    "NoFeasibleHost",
    "PlacementError",
    "PlacementInputError",
    "PlacementResult",
    "Quality",
    "cpsat_place",
    "cpsat_rebalance",
    "greedy_place",
    "greedy_rebalance",
    "place_one",
    "plan_drain",
]
