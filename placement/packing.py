"""Assigning instances to nodes and device indices: one pipeline stage (tp·sp ranks) always sits on one node;
low node-affinity plans put the same stage of a unit's prefill and decode instances on one node."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.placement.hardware import ClusterSpec
from splitserve.placement.parallel import Parallel


@dataclass(frozen=True)
class InstancePlacement:
    role: str
    index: int
    stages: tuple[tuple[int, tuple[int, ...]], ...]  # per pipeline stage: (node, device indices on that node)


class _Nodes:
    def __init__(self, cluster: ClusterSpec):
        self.free = [list(range(cluster.devices_per_node)) for _ in range(cluster.nodes)]

    def best_fit(self, size: int) -> int | None:
        fitting = [n for n, devices in enumerate(self.free) if len(devices) >= size]
        return min(fitting, key=lambda n: (len(self.free[n]), n)) if fitting else None

    def take(self, node: int, size: int) -> tuple[int, ...]:
        taken, self.free[node] = self.free[node][:size], self.free[node][size:]
        return tuple(taken)


def pack_instances(cluster: ClusterSpec, groups: list[tuple[str, int, Parallel]]) -> tuple[InstancePlacement, ...]:
    """Best-fit-decreasing over stages; raises ValueError when the instances do not fit the nodes."""
    nodes = _Nodes(cluster)
    order = sorted(((role, i, par) for role, count, par in groups for i in range(count)),
                   key=lambda item: -item[2].stage_devices)
    placed = []
    for role, index, par in order:
        stages = []
        for _ in range(par.pp):
            node = nodes.best_fit(par.stage_devices)
            if node is None:
                raise ValueError(f"placement: no node has {par.stage_devices} free devices for {role} {index} "
                                 f"({par.label()}) on {cluster.name}")
            stages.append((node, nodes.take(node, par.stage_devices)))
        placed.append(InstancePlacement(role, index, tuple(stages)))
    return tuple(sorted(placed, key=lambda p: (p.role != "prefill", p.role, p.index)))


def pack_units(cluster: ClusterSpec, units: int, prefill: Parallel, prefill_per_unit: int, decode: Parallel,
               decode_per_unit: int) -> tuple[InstancePlacement, ...]:
    """Low node-affinity: stage s of every instance in a unit shares one node, so KV moves inside the node."""
    assert prefill.pp == decode.pp, "a unit's phases share the pipeline depth"
    nodes = _Nodes(cluster)
    segment = prefill_per_unit * prefill.stage_devices + decode_per_unit * decode.stage_devices
    stages: dict[tuple[str, int], list] = {}
    for unit in range(units):
        for _ in range(prefill.pp):
            node = nodes.best_fit(segment)
            if node is None:
                raise ValueError(f"placement: no node has {segment} free devices for a stage segment of unit {unit}")
            for j in range(prefill_per_unit):
                stages.setdefault(("prefill", unit * prefill_per_unit + j), []).append(
                    (node, nodes.take(node, prefill.stage_devices)))
            for j in range(decode_per_unit):
                stages.setdefault(("decode", unit * decode_per_unit + j), []).append(
                    (node, nodes.take(node, decode.stage_devices)))
    placed = [InstancePlacement(role, index, tuple(s)) for (role, index), s in stages.items()]
    return tuple(sorted(placed, key=lambda p: (p.role != "prefill", p.index)))
