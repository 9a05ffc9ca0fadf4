"""Per-phase parallel layout (TP, PP, prefill SP) and its validation against a model and a cluster."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.placement.hardware import ClusterSpec
from splitserve.placement.specs import ModelSpec

SP_ALGORITHMS = ("none", "ring", "token_ring")


@dataclass(frozen=True)
class Parallel:
    """One instance's layout: `tp * sp` ranks per pipeline stage, `pp` stages."""

    tp: int = 1
    pp: int = 1
    sp: int = 1
    sp_algorithm: str = "none"

    def __post_init__(self) -> None:
        for field in ("tp", "pp", "sp"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{field}: must be a positive integer, got {value!r}")
        if self.sp_algorithm not in SP_ALGORITHMS:
            raise ValueError(f"sp_algorithm: {self.sp_algorithm!r} is not one of {SP_ALGORITHMS}")
        if (self.sp > 1) != (self.sp_algorithm != "none"):
            raise ValueError(f"sp_algorithm: {self.sp_algorithm!r} does not match sp={self.sp} "
                             "(sp > 1 needs ring or token_ring; sp = 1 needs none)")

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.sp

    @property
    def stage_devices(self) -> int:
        return self.tp * self.sp

    def label(self) -> str:
        text = f"tp{self.tp} pp{self.pp}"
        return text + (f" sp{self.sp} {self.sp_algorithm}" if self.sp > 1 else "")


def layout_problem(model: ModelSpec, cluster: ClusterSpec, par: Parallel) -> str | None:
    """Why `par` cannot run `model` on `cluster` (shape rules only; memory is checked in memory.py), or None."""
    if model.num_heads % par.tp:
        return f"tp: {par.tp} does not divide num_heads {model.num_heads}"
    if model.num_kv_heads % par.tp and par.tp % model.num_kv_heads:
        return f"tp: {par.tp} and num_kv_heads {model.num_kv_heads} must divide one another"
    if model.num_layers % par.pp:
        return f"pp: {par.pp} does not divide num_layers {model.num_layers}"
    if par.tp > cluster.devices_per_node:
        return f"tp: {par.tp} exceeds devices_per_node {cluster.devices_per_node} (TP stays inside a node)"
    if par.devices > cluster.num_devices:
        return f"layout needs {par.devices} devices, cluster has {cluster.num_devices}"
    return None


def check_layout(model: ModelSpec, cluster: ClusterSpec, par: Parallel) -> None:
    problem = layout_problem(model, cluster, par)
    if problem:
        raise ValueError(problem)


def stage_crosses_nodes(cluster: ClusterSpec, par: Parallel) -> bool:
    return par.stage_devices > cluster.devices_per_node


def pipeline_crosses_nodes(cluster: ClusterSpec, par: Parallel) -> bool:
    return par.devices > cluster.devices_per_node
