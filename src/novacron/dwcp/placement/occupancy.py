"""Per-host usage as numpy arrays: the filters and the score, vectorised over all hosts at once.

Filter then score, for one VM:
- filters (in this order, for the rejection counts): maintenance, label selector, anti-affinity
  (no VM of the same group already on the host), capacity (vCPUs and memory both fit);
- score of a feasible host, with ``c`` and ``m`` its vCPU and memory utilisation *after* placing:
  ``(1 - max(c, m)) - BALANCE_WEIGHT * |c - m|``. The first term prefers the least-loaded host
  (spreading load, leaving headroom for growth and migrations); the second prefers hosts whose vCPU
  and memory stay in proportion, so neither runs out while the other idles. Ties go to the host
  listed first, so answers are deterministic.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import numpy.typing as npt

from novacron.dwcp.placement.model import VM, Cluster, Host, PlacementInputError

BALANCE_WEIGHT = 0.5
FILTERS = ("maintenance", "labels", "anti_affinity", "capacity")

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]


class Occupancy:
    """Mutable usage of every host; ``add``/``remove`` keep it in step with an assignment."""

    def __init__(self, cluster: Cluster, *, include_assigned: bool = True) -> None:
        self.hosts: tuple[Host, ...] = cluster.hosts
        self.index = {h.name: i for i, h in enumerate(cluster.hosts)}
        self.cap_cpu = np.array([h.vcpus for h in cluster.hosts], dtype=np.float64)
        self.cap_mem = np.array([h.mem_mib for h in cluster.hosts], dtype=np.float64)
        self.used_cpu = np.zeros(len(cluster.hosts))
        self.used_mem = np.zeros(len(cluster.hosts))
        self.maintenance = np.array([h.maintenance for h in cluster.hosts], dtype=np.bool_)
        self._selector_masks: dict[tuple[tuple[str, str], ...], BoolArray] = {}
        self._group_counts: dict[str, npt.NDArray[np.int32]] = {}
        if include_assigned and cluster.assignment:
            by_name = {v.name: v for v in cluster.vms}
            placed = [(by_name[vm], self.index[host]) for vm, host in cluster.assignment.items()]
            at = np.fromiter((i for _, i in placed), dtype=np.int64, count=len(placed))
            np.add.at(self.used_cpu, at, np.fromiter((v.vcpus for v, _ in placed), dtype=np.float64))
            np.add.at(self.used_mem, at, np.fromiter((v.mem_mib for v, _ in placed), dtype=np.float64))
            for vm, i in placed:
                if vm.anti_affinity is not None:
                    self._group(vm.anti_affinity)[i] += 1

    def add(self, vm: VM, i: int) -> None:
        self.used_cpu[i] += vm.vcpus
        self.used_mem[i] += vm.mem_mib
        if vm.anti_affinity is not None:
            self._group(vm.anti_affinity)[i] += 1

    def remove(self, vm: VM, i: int) -> None:
        self.used_cpu[i] -= vm.vcpus
        self.used_mem[i] -= vm.mem_mib
        if vm.anti_affinity is not None:
            self._group(vm.anti_affinity)[i] -= 1

    def _group(self, name: str) -> npt.NDArray[np.int32]:
        counts = self._group_counts.get(name)
        if counts is None:
            counts = np.zeros(len(self.hosts), dtype=np.int32)
            self._group_counts[name] = counts
        return counts

    def selector_mask(self, vm: VM) -> BoolArray:
        key = tuple(sorted(vm.selector.items()))
        mask = self._selector_masks.get(key)
        if mask is None:
            mask = np.array([all(h.labels.get(k) == v for k, v in key) for h in self.hosts], dtype=np.bool_)
            self._selector_masks[key] = mask
        return mask

    def static_mask(self, vm: VM) -> BoolArray:
        """Filters that do not depend on what else is placed: maintenance, labels, one VM's size."""
        return (
            ~self.maintenance
            & self.selector_mask(vm)
            & (self.cap_cpu >= vm.vcpus)
            & (self.cap_mem >= vm.mem_mib)
        )

    def feasible(self, vm: VM, exclude: int | None = None) -> BoolArray:
        mask = (
            ~self.maintenance
            & self.selector_mask(vm)
            & (self.used_cpu + vm.vcpus <= self.cap_cpu)
            & (self.used_mem + vm.mem_mib <= self.cap_mem)
        )
        if vm.anti_affinity is not None:
            mask &= self._group(vm.anti_affinity) == 0
        if exclude is not None:
            mask[exclude] = False
        return mask

    def rejections(self, vm: VM, exclude: int | None = None) -> dict[str, int]:
        """How many hosts each filter removed (a host counts for the first filter it fails)."""
        remaining = np.ones(len(self.hosts), dtype=np.bool_)
        if exclude is not None:
            remaining[exclude] = False
        stages: list[tuple[str, BoolArray]] = [
            ("maintenance", ~self.maintenance),
            ("labels", self.selector_mask(vm)),
            (
                "anti_affinity",
                self._group(vm.anti_affinity) == 0
                if vm.anti_affinity is not None
                else np.ones(len(self.hosts), dtype=np.bool_),
            ),
            (
                "capacity",
                (self.used_cpu + vm.vcpus <= self.cap_cpu) & (self.used_mem + vm.mem_mib <= self.cap_mem),
            ),
        ]
        counts: Counter[str] = Counter()
        for name, passes in stages:
            counts[name] = int(np.count_nonzero(remaining & ~passes))
            remaining &= passes
        return {k: v for k, v in counts.items() if v}

    def scores(self, vm: VM) -> FloatArray:
        c = (self.used_cpu + vm.vcpus) / self.cap_cpu
        m = (self.used_mem + vm.mem_mib) / self.cap_mem
        result: FloatArray = (1.0 - np.maximum(c, m)) - BALANCE_WEIGHT * np.abs(c - m)
        return result

    def best(self, vm: VM, exclude: int | None = None) -> int | None:
        """The best feasible host for ``vm`` (index), or None."""
        mask = self.feasible(vm, exclude)
        if not mask.any():
            return None
        scores = np.where(mask, self.scores(vm), -np.inf)
        return int(np.argmax(scores))

    def utilisation(self) -> FloatArray:
        """Per host: the larger of vCPU and memory utilisation."""
        result: FloatArray = np.maximum(self.used_cpu / self.cap_cpu, self.used_mem / self.cap_mem)
        return result

    def host_of(self, name: str) -> int:
        try:
            return self.index[name]
        except KeyError:
            raise PlacementInputError("unknown host", field="host", host=name) from None
