"""What placement reasons about: hosts, VMs, and where each VM is now.

Plain frozen dataclasses (10,000 VMs must load in milliseconds); every field is checked on
construction and a bad one raises PlacementInputError naming it. Capacities and demands are whole
vCPUs and MiB, so the CP-SAT model can use them as they are.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from novacron.errors import NovacronError, UserError

MAX_NAME_LEN = 253
MAX_LABELS = 64
MAX_LABEL_LEN = 63
MAX_HOSTS = 100_000
MAX_VMS = 1_000_000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class PlacementError(NovacronError):
    """Placement could not produce an answer."""


class PlacementInputError(UserError):
    """A host, VM or assignment given to placement is invalid (the field is named)."""


class NoFeasibleHost(PlacementError):
    """No host passes the filters for this VM; ``context['rejected']`` counts hosts per reason."""


def _check_name(kind: str, name: str) -> None:
    if not (0 < len(name) <= MAX_NAME_LEN) or not _NAME.match(name):
        raise PlacementInputError(f"invalid {kind} name", field=f"{kind}.name", value=name[:80])


def _check_labels(kind: str, owner: str, labels: Mapping[str, str], what: str) -> None:
    if len(labels) > MAX_LABELS:
        raise PlacementInputError(f"too many {what}", field=f"{kind}.{what}", name=owner, limit=MAX_LABELS)
    for k, v in labels.items():
        if not k or len(k) > MAX_LABEL_LEN or len(v) > MAX_LABEL_LEN:
            raise PlacementInputError(
                f"{what} key/value must be 1..{MAX_LABEL_LEN} characters",
                field=f"{kind}.{what}",
                name=owner,
                key=k[:80],
            )


@dataclass(frozen=True)
class Host:
    name: str
    vcpus: int  # schedulable vCPUs (any overcommit already applied by the operator)
    mem_mib: int
    labels: Mapping[str, str] = field(default_factory=dict)
    maintenance: bool = False  # takes no new VMs (drain target or operator-set)

    def __post_init__(self) -> None:
        _check_name("host", self.name)
        if self.vcpus <= 0 or self.mem_mib <= 0:
            raise PlacementInputError(
                "host capacity must be positive", field="host.vcpus/mem_mib", name=self.name
            )
        _check_labels("host", self.name, self.labels, "labels")


@dataclass(frozen=True)
class VM:
    name: str
    vcpus: int
    mem_mib: int
    selector: Mapping[str, str] = field(default_factory=dict)  # host labels that must all match
    anti_affinity: str | None = None  # VMs of one group never share a host

    def __post_init__(self) -> None:
        _check_name("vm", self.name)
        if self.vcpus <= 0 or self.mem_mib <= 0:
            raise PlacementInputError("VM demand must be positive", field="vm.vcpus/mem_mib", name=self.name)
        _check_labels("vm", self.name, self.selector, "selector")
        if self.anti_affinity is not None:
            _check_name("anti_affinity", self.anti_affinity)

    @property
    def kind(self) -> tuple[int, int, tuple[tuple[str, str], ...], str | None]:
        """VMs of one kind are interchangeable for placement (same demand, selector and group)."""
        return (self.vcpus, self.mem_mib, tuple(sorted(self.selector.items())), self.anti_affinity)


@dataclass(frozen=True)
class Cluster:
    """Hosts, the VMs already running, and where each runs (``assignment``: VM name -> host name)."""

    hosts: tuple[Host, ...]
    vms: tuple[VM, ...] = ()
    assignment: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.hosts) > MAX_HOSTS or len(self.vms) > MAX_VMS:
            raise PlacementInputError(
                "cluster too large", field="hosts/vms", hosts=len(self.hosts), vms=len(self.vms)
            )
        _unique("host", (h.name for h in self.hosts))
        _unique("vm", (v.name for v in self.vms))
        hosts = {h.name for h in self.hosts}
        vms = {v.name for v in self.vms}
        for vm, host in self.assignment.items():
            if vm not in vms:
                raise PlacementInputError("assignment names an unknown VM", field="assignment", vm=vm)
            if host not in hosts:
                raise PlacementInputError(
                    "assignment names an unknown host", field="assignment", vm=vm, host=host
                )

    @staticmethod
    def of(
        hosts: Iterable[Host], vms: Iterable[VM] = (), assignment: Mapping[str, str] | None = None
    ) -> Cluster:
        return Cluster(tuple(hosts), tuple(vms), dict(assignment or {}))


def _unique(kind: str, names: Iterable[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise PlacementInputError(f"duplicate {kind} name", field=f"{kind}.name", name=name)
        seen.add(name)
