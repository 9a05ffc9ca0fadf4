"""The Plan: instances and parallelism per role plus where they sit, in the YAML form the cluster config accepts.

A role with `instances: 0` is not launched: a disaggregated plan has `colocated.instances: 0`, a colocated plan has
zero prefill and decode instances. The `placement` section is informational (device assignment and predictions).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from splitserve.placement.metrics import SLO
from splitserve.placement.packing import InstancePlacement
from splitserve.placement.parallel import SP_ALGORITHMS
from splitserve.placement.search import SearchResult
from splitserve.placement.specs import normalize_dtype


def _count(data: Mapping[str, Any], key: str, path: str, minimum: int, default: int | None = None) -> int:
    if key not in data:
        if default is None:
            raise ValueError(f"{path}.{key}: missing")
        return default
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{path}.{key}: must be an integer >= {minimum}, got {value!r}")
    return value


def _only(data: Any, keys: set[str], path: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping, got {type(data).__name__}")
    unknown = set(data) - keys
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected {sorted(keys)}")
    return data


@dataclass(frozen=True)
class PrefillLayout:
    instances: int
    tp: int = 1
    sp: int = 1
    pp: int = 1
    sp_algorithm: str = "ring"  # ignored at sp=1; "ring" there because the cluster config only knows ring/token_ring

    @classmethod
    def from_dict(cls, data: Any, path: str = "prefill") -> "PrefillLayout":
        data = _only(data, {"instances", "tp", "sp", "pp", "sp_algorithm"}, path)
        algorithm = data.get("sp_algorithm", "ring")
        if algorithm not in SP_ALGORITHMS:
            raise ValueError(f"{path}.sp_algorithm: {algorithm!r} is not one of {SP_ALGORITHMS}")
        sp = _count(data, "sp", path, 1, 1)
        if sp > 1 and algorithm == "none":
            raise ValueError(f"{path}.sp_algorithm: sp={sp} needs ring or token_ring, got 'none'")
        return cls(_count(data, "instances", path, 0), _count(data, "tp", path, 1, 1), sp,
                   _count(data, "pp", path, 1, 1), algorithm)


@dataclass(frozen=True)
class DecodeLayout:
    instances: int
    tp: int = 1
    pp: int = 1

    @classmethod
    def from_dict(cls, data: Any, path: str = "decode") -> "DecodeLayout":
        data = _only(data, {"instances", "tp", "pp"}, path)
        return cls(_count(data, "instances", path, 0), _count(data, "tp", path, 1, 1), _count(data, "pp", path, 1, 1))


@dataclass(frozen=True)
class ColocatedLayout:
    instances: int
    tp: int = 1

    @classmethod
    def from_dict(cls, data: Any, path: str = "colocated") -> "ColocatedLayout":
        data = _only(data, {"instances", "tp"}, path)
        return cls(_count(data, "instances", path, 0), _count(data, "tp", path, 1, 1))


@dataclass(frozen=True)
class Placement:
    """Where each instance sits and what the planner predicts; not needed to launch, kept for humans and checks."""

    cluster: str = ""
    mode: str = ""
    algorithm: str = ""
    instances: tuple[InstancePlacement, ...] = ()
    predicted: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "mode": self.mode, "algorithm": self.algorithm,
                "instances": [{"role": p.role, "index": p.index,
                               "stages": [{"node": node, "devices": list(devices)} for node, devices in p.stages]}
                              for p in self.instances],
                "predicted": dict(self.predicted)}

    @classmethod
    def from_dict(cls, data: Any, path: str = "placement") -> "Placement":
        data = _only(data, {"cluster", "mode", "algorithm", "instances", "predicted"}, path)
        instances = []
        for i, raw in enumerate(data.get("instances") or []):
            where = f"{path}.instances[{i}]"
            raw = _only(raw, {"role", "index", "stages"}, where)
            stages = []
            for j, stage in enumerate(raw.get("stages") or []):
                stage = _only(stage, {"node", "devices"}, f"{where}.stages[{j}]")
                devices = stage.get("devices")
                if not isinstance(devices, list) or not all(isinstance(d, int) for d in devices):
                    raise ValueError(f"{where}.stages[{j}].devices: expected a list of device indices")
                stages.append((_count(stage, "node", f"{where}.stages[{j}]", 0), tuple(devices)))
            instances.append(InstancePlacement(str(raw.get("role", "")), _count(raw, "index", where, 0),
                                               tuple(stages)))
        predicted = data.get("predicted") or {}
        if not isinstance(predicted, Mapping):
            raise ValueError(f"{path}.predicted: expected a mapping")
        return cls(str(data.get("cluster", "")), str(data.get("mode", "")), str(data.get("algorithm", "")),
                   tuple(instances), tuple(predicted.items()))


@dataclass(frozen=True)
class Plan:
    model: str
    dtype: str
    prefill: PrefillLayout
    decode: DecodeLayout
    colocated: ColocatedLayout
    placement: Placement = Placement()

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        if (self.prefill.instances == 0) != (self.decode.instances == 0):
            raise ValueError("prefill.instances / decode.instances: a disaggregated deployment needs both roles")
        if self.prefill.instances == 0 and self.colocated.instances == 0:
            raise ValueError("instances: the plan launches nothing (all roles have instances: 0)")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "dtype": self.dtype, "prefill": dataclasses.asdict(self.prefill),
                "decode": dataclasses.asdict(self.decode), "colocated": dataclasses.asdict(self.colocated),
                "placement": self.placement.to_dict()}

    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        data = _only(data, {"model", "dtype", "prefill", "decode", "colocated", "placement"}, "plan")
        for key in ("model", "dtype"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise ValueError(f"{key}: expected a non-empty string, got {data.get(key)!r}")
        zero = {"instances": 0}
        return cls(model=data["model"], dtype=data["dtype"],
                   prefill=PrefillLayout.from_dict(data.get("prefill", zero)),
                   decode=DecodeLayout.from_dict(data.get("decode", zero)),
                   colocated=ColocatedLayout.from_dict(data.get("colocated", zero)),
                   placement=Placement.from_dict(data.get("placement") or {}))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_yaml(cls, text: str) -> "Plan":
        import yaml

        try:
            return cls.from_dict(yaml.safe_load(text))
        except yaml.YAMLError as exc:
            raise ValueError(f"plan: not valid YAML ({exc})") from exc

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_yaml())

    @classmethod
    def load(cls, path: str) -> "Plan":
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_yaml(f.read())
        except FileNotFoundError as exc:
            raise ValueError(f"plan: file {path!r} not found") from exc


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def plan_from_result(result: SearchResult, model_name: str, dtype: str, cluster_name: str, slo: SLO,
                     workload: str, rate: float | None) -> Plan:
    disaggregated = result.mode == "disaggregated"
    p, d, c = result.prefill, result.decode, result.colocated
    prefill = PrefillLayout(result.prefill_instances if disaggregated else 0, p.par.tp if p else 1,
                            p.par.sp if p else 1, p.par.pp if p else 1,
                            p.par.sp_algorithm if p and p.par.sp > 1 else "ring")
    decode = DecodeLayout(result.decode_instances if disaggregated else 0, d.par.tp if d else 1, d.par.pp if d else 1)
    colocated = ColocatedLayout(0 if disaggregated else result.colocated_instances, c.par.tp if c else 1)
    predicted = {
        "workload": workload, "rate": rate, "slo": {"ttft_s": slo.ttft, "tpot_s": slo.tpot,
                                                    "attainment": slo.attainment},
        "disaggregated": None if p is None else {
            "goodput_rps": _r(result.goodput), "devices": result.devices,
            "goodput_per_device": _r(result.goodput_per_device),
            "prefill_instance_goodput_rps": _r(p.goodput), "decode_instance_goodput_rps": _r(d.goodput),
            "verified_attainment": _r(result.verified_attainment), "verified_rate": _r(result.verified_rate)},
        "colocated": None if c is None else {
            "tp": c.par.tp, "instances": result.colocated_instances,
            "goodput_rps": _r(result.colocated_instances * c.goodput),
            "devices": result.colocated_instances * c.devices, "goodput_per_device": _r(c.per_device)},
    }
    placement = Placement(cluster_name, result.mode, result.algorithm, result.placements, tuple(predicted.items()))
    return Plan(model_name, dtype, prefill, decode, colocated, placement)
