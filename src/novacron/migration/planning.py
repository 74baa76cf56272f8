"""How the source plans a migration's data path (sent to the destination in PREPARE).

Precedence: the operator's ``data_path``; post-copy (direct, one connection: QEMU 7.2 cannot combine
it with multifd); a forced ``mode`` keeps that mode's path (datacenter: the configured
``datacenter_path``, else the HDE tunnel); otherwise the cost model (``pathcost.py``) picks the path
that moves the guest fastest over the measured link with the CPU the host has left.

The link as the source sees it at PREPARE time: the operator's hint if configured, else what the
session measured (goodput is a lower bound and an idle control session measures little), raised to
the nominal rate of the link's RTT class when lower (RTT below 2 ms: a LAN, 10 Gbit/s; below 30 ms:
a regional link, 1 Gbit/s; else 100 Mbit/s). Underestimating only ever favours the tunnel, which
wins on slow links; the classes keep a fast link from being mistaken for a slow one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from novacron.dwcp.mode import Mode
from novacron.migration.context import DataPathPlan, MigrationHost, MigrationRequest
from novacron.migration.datapath import DataPathKind
from novacron.migration.errors import MigrationInputError
from novacron.migration.pathcost import LinkView, PathChoice, PathCosts, choose_path
from novacron.observability.log import log_event

log = logging.getLogger("novacron.migration.planning")

DEFAULT_PATH_COSTS = PathCosts()


@dataclass(frozen=True)
class RttClass:
    max_rtt_s: float
    nominal_bps: float


# Nominal bandwidth by RTT when nothing better is known (see the module docstring).
RTT_CLASSES = (RttClass(0.002, 10e9), RttClass(0.030, 1e9), RttClass(float("inf"), 100e6))
UNKNOWN_RTT_BPS = 100e6  # no RTT sample at all: assume a slow link (the tunnel is the safe side)


def link_view(
    *, hint_bps: float | None, measured_bps: float | None, rtt_s: float | None, guest_vcpus: int,
    host_cores: int | None = None,
) -> LinkView:  # fmt: skip
    """The planning inputs from what the session knows and this host's CPU."""
    if hint_bps is not None:
        bandwidth = hint_bps
    else:
        nominal = UNKNOWN_RTT_BPS
        if rtt_s is not None:
            nominal = next(c.nominal_bps for c in RTT_CLASSES if rtt_s < c.max_rtt_s)
        bandwidth = max(measured_bps or 0.0, nominal)
    cores = host_cores if host_cores is not None else (os.cpu_count() or 1)
    spare = max(0.5, cores - guest_vcpus)  # a running vCPU takes a core (TCG always, KVM when busy)
    return LinkView(bandwidth_bps=bandwidth, rtt_s=rtt_s, spare_cores=spare)


def choose_plan(
    mode: Mode, request: MigrationRequest, kinds: frozenset[DataPathKind], host: MigrationHost,
    *, link: LinkView | None = None, costs: PathCosts = DEFAULT_PATH_COSTS,
) -> DataPathPlan:  # fmt: skip
    """The data path (docs/migration.md section 5, docs/tunnel.md "Choosing the path")."""
    cfg = host.config
    kind = request.data_path
    channels = 0 if request.allow_postcopy else cfg.direct.multifd_channels
    if kind is None and not request.allow_postcopy and request.mode is None and link is not None:
        choice = choose_path(link, costs, kinds - {DataPathKind.PASSTHROUGH})
        if choice is not None and channels > 0:
            _log_choice(request, link, choice)
            return DataPathPlan(choice.best.kind, mode, channels, choice.best.compression)
    if kind is None:
        if request.allow_postcopy:
            kind = DataPathKind.DIRECT
        elif mode is Mode.DATACENTER:
            kind = cfg.datacenter_path
        else:
            kind = DataPathKind.TUNNEL
        if kind not in kinds:
            kind = DataPathKind.DIRECT
    if kind not in kinds:
        raise MigrationInputError(
            f"this host cannot run the {kind} data path", field="data_path", known=",".join(sorted(kinds))
        )
    if kind is DataPathKind.DIRECT:
        compression = cfg.direct.compression if mode is Mode.DATACENTER else cfg.direct_wan_compression
        return DataPathPlan(kind, mode, channels, compression if channels else "none")
    if channels == 0:
        raise MigrationInputError(
            "post-copy runs on the direct path only", field="data_path", asked=str(kind)
        )
    return DataPathPlan(kind, mode, channels, "none")


def _log_choice(request: MigrationRequest, link: LinkView, choice: PathChoice) -> None:
    log_event(
        log,
        "migration.path_chosen",
        vm=request.vm,
        path=choice.best.label,
        bandwidth_mbit=round(link.bandwidth_bps / 1e6, 1),
        rtt_ms=None if link.rtt_s is None else round(link.rtt_s * 1000, 2),
        spare_cores=link.spare_cores,
        candidates=choice.describe(),
    )
