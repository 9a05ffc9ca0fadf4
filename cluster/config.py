"""The cluster configuration: a frozen dataclass tree built from YAML (or a dict), validated once, unknown keys
rejected with the offending key's full path."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from splitserve.cluster.router import ROUTING_POLICIES
from splitserve.workers.engine_config import (TP_NORM_METHODS, TRANSFER_MODES, TRANSPORTS,  # noqa: F401 (re-exported)
                                              EngineConfig, TransferConfig, choice, positive_float, positive_int)

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
SP_ALGORITHMS = ("ring", "token_ring")


@dataclass(frozen=True)
class PrefillConfig:
    instances: int = 1
    tp: int = 1
    sp: int = 1
    sp_algorithm: str = "ring"
    pp: int = 1

    def validate(self, path: str) -> None:
        positive_int(f"{path}.instances", self.instances, 0)
        positive_int(f"{path}.tp", self.tp)
        positive_int(f"{path}.sp", self.sp)
        positive_int(f"{path}.pp", self.pp)
        choice(f"{path}.sp_algorithm", self.sp_algorithm, SP_ALGORITHMS)

    @property
    def world_size(self) -> int:
        return self.tp * self.sp * self.pp


@dataclass(frozen=True)
class DecodeConfig:
    instances: int = 1
    tp: int = 1
    pp: int = 1

    def validate(self, path: str) -> None:
        positive_int(f"{path}.instances", self.instances, 0)
        positive_int(f"{path}.tp", self.tp)
        positive_int(f"{path}.pp", self.pp)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp


@dataclass(frozen=True)
class ColocatedConfig(DecodeConfig):
    instances: int = 0


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: start a local Ray on 127.0.0.1
    num_cpus: int | None = None  # local Ray only
    num_gpus: int | None = None  # local Ray only; on CPU these are logical GPUs, one per rank
    placement_timeout_s: float = 60.0
    # Each rank also asks for one unit of the custom resource `splitserve_<role>` (prefill, decode, colocated), so
    # an instance lands only on nodes that advertise its role (`ray start --resources`; the Helm chart does).
    role_resources: bool = False
    # The Ray cluster grows on demand (KubeRay's autoscaler): a scale request waits for new nodes (up to
    # placement_timeout_s) instead of being refused for want of free GPUs.
    autoscaler: bool = False

    def validate(self, path: str) -> None:
        if not isinstance(self.autoscaler, bool):
            raise ValueError(f"config: '{path}.autoscaler' must be true or false, got {self.autoscaler!r}")
        if not isinstance(self.role_resources, bool):
            raise ValueError(f"config: '{path}.role_resources' must be true or false, got {self.role_resources!r}")
        if self.num_cpus is not None:
            positive_int(f"{path}.num_cpus", self.num_cpus)
        if self.num_gpus is not None:
            positive_int(f"{path}.num_gpus", self.num_gpus, 0)
        positive_float(f"{path}.placement_timeout_s", self.placement_timeout_s)


@dataclass(frozen=True)
class RoutingConfig:
    """How requests are placed on instances (see cluster/router.py)."""

    policy: str = "kv_aware"  # kv_aware: load against prefix-cache overlap; least_loaded: load only
    overlap_weight: float = 1.0  # a cached prompt token counts as this many pending tokens (blocks on decode) saved

    def validate(self, path: str) -> None:
        choice(f"{path}.policy", self.policy, ROUTING_POLICIES)
        w = self.overlap_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"config: '{path}.overlap_weight' must be a number >= 0, got {w!r}")


@dataclass(frozen=True)
class FaultToleranceConfig:
    restart: bool = True  # relaunch an instance whose rank died or whose loop stopped
    max_restarts: int = 5  # per instance, over the cluster's life; then it stays dead
    restart_backoff_s: float = 1.0  # before the first relaunch; doubles with each failed attempt
    health_interval_s: float = 1.0  # how often every rank is checked; a dead rank is noticed within about this
    migration_limit: int = 3  # how often one request may be moved off a dead instance
    unavailable_timeout_s: float = 60.0  # how long a request waits for a role with no live instance

    def validate(self, path: str) -> None:
        if not isinstance(self.restart, bool):
            raise ValueError(f"config: '{path}.restart' must be true or false, got {self.restart!r}")
        positive_int(f"{path}.max_restarts", self.max_restarts, 0)
        positive_float(f"{path}.restart_backoff_s", self.restart_backoff_s)
        positive_float(f"{path}.health_interval_s", self.health_interval_s)
        positive_int(f"{path}.migration_limit", self.migration_limit, 0)
        positive_float(f"{path}.unavailable_timeout_s", self.unavailable_timeout_s)


@dataclass(frozen=True)
class AutoPlacement:
    """`placement: auto` (these defaults) or `placement: {auto: {...}}`: plan the layout at start-up."""

    ttft_s: float = 1.0
    tpot_s: float = 0.1
    attainment: float = 0.9
    workload: str = "sharegpt"     # sharegpt | humaneval | longbench | fixed:P:O | trace.jsonl
    rate: float | None = None      # requests/s to serve; None: the plan fills the cluster
    hardware: str | None = None    # planner catalog name; default from Ray's accelerator_type (cpu on CPU)
    profile: str | None = None     # fitted latency profile JSON (`splitserve profile`)
    requests: int = 400            # simulated requests per evaluation
    seed: int = 0

    def validate(self, path: str) -> None:
        positive_float(f"{path}.ttft_s", self.ttft_s)
        positive_float(f"{path}.tpot_s", self.tpot_s)
        positive_float(f"{path}.attainment", self.attainment)
        if self.attainment > 1:
            raise ValueError(f"config: '{path}.attainment' must be <= 1, got {self.attainment}")
        if self.rate is not None:
            positive_float(f"{path}.rate", self.rate)
        positive_int(f"{path}.requests", self.requests, 20)
        positive_int(f"{path}.seed", self.seed, 0)
        for name in ("workload", "hardware", "profile"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"config: '{path}.{name}' must be a non-empty string, got {value!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class OnlinePlanner:
    """`placement: {online: {...}}`: every `interval_s`, the planner takes the arrival rate and lengths observed over
    `window_s`, simulates each (prefill, decode) instance count within the bounds for the current layouts, and
    scales towards the cheapest that meets the SLOs; scaling down waits `down_intervals` agreeing intervals, and no
    change follows another within `cooldown_s`."""

    ttft_s: float = 1.0
    tpot_s: float = 0.1
    attainment: float = 0.9
    interval_s: float = 10.0
    window_s: float = 60.0
    cooldown_s: float = 30.0
    down_intervals: int = 3
    min_requests: int = 20  # no decision on fewer requests observed in the window
    min_prefill: int = 1
    max_prefill: int = 4
    min_decode: int = 1
    max_decode: int = 4
    hardware: str | None = None  # planner catalog name for the latency model; cpu with device: cpu
    profile: str | None = None  # fitted latency profile JSON (`splitserve profile [--server]`)
    requests: int = 300  # simulated requests per evaluation
    seed: int = 0
    # Scale the latency model per phase by the median of (timed step / modelled step) over the steps the instances
    # ran within the window, once at least calibration_steps decode steps (a fifth as many prefill batches) are there.
    live_calibration: bool = True
    calibration_steps: int = 50

    def validate(self, path: str) -> None:
        for name in ("ttft_s", "tpot_s", "interval_s", "window_s", "cooldown_s"):
            positive_float(f"{path}.{name}", getattr(self, name))
        positive_float(f"{path}.attainment", self.attainment)
        if self.attainment > 1:
            raise ValueError(f"config: '{path}.attainment' must be <= 1, got {self.attainment}")
        if not isinstance(self.live_calibration, bool):
            raise ValueError(f"config: '{path}.live_calibration' must be true or false, got {self.live_calibration!r}")
        for name in ("down_intervals", "min_requests", "min_prefill", "min_decode", "requests", "calibration_steps"):
            positive_int(f"{path}.{name}", getattr(self, name))
        positive_int(f"{path}.seed", self.seed, 0)
        for role in ("prefill", "decode"):
            low, high = getattr(self, f"min_{role}"), getattr(self, f"max_{role}")
            if positive_int(f"{path}.max_{role}", high) < low:
                raise ValueError(f"config: '{path}.max_{role}' ({high}) is below '{path}.min_{role}' ({low})")
        for name in ("hardware", "profile"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"config: '{path}.{name}' must be a non-empty string, got {value!r}")


def _online_planner(placement) -> OnlinePlanner | None:
    if not isinstance(placement, dict) or not placement.get("online"):
        return None
    options = placement["online"]
    online = OnlinePlanner() if options is True else _build(OnlinePlanner, options, "placement.online")
    online.validate("placement.online")
    return online


def _auto_placement(placement) -> AutoPlacement | None:
    if placement == "auto":
        return AutoPlacement()
    if not isinstance(placement, dict) or not placement.get("auto"):
        return None
    options = placement["auto"]
    if options is True:
        return AutoPlacement()
    auto = _build(AutoPlacement, options, "placement.auto")
    auto.validate("placement.auto")
    return auto


@dataclass(frozen=True)
class ClusterConfig:
    model: str = "tiny"
    dtype: str = "float32"
    device: str = "auto"
    prefill: PrefillConfig = field(default_factory=PrefillConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    colocated: ColocatedConfig = field(default_factory=ColocatedConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    kv_transfer: TransferConfig = field(default_factory=TransferConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    max_queued_requests: int = 1024
    max_prompt_bytes: int = 1 << 20  # text prompts longer than this are refused before tokenising
    # `auto` (or {auto: {...}}): plan the layout at start-up from Ray's GPUs; a mapping without `auto` is what
    # `splitserve plan` writes (devices, predictions) and is informational.
    placement: dict | str | None = None

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"config: 'model' must be a preset name or a directory, got {self.model!r}")
        choice("dtype", self.dtype, DTYPES)
        choice("device", self.device, DEVICES)
        for f in ("prefill", "decode", "colocated", "engine", "kv_transfer", "ray", "fault_tolerance", "routing"):
            getattr(self, f).validate(f)
        positive_int("max_queued_requests", self.max_queued_requests)
        positive_int("max_prompt_bytes", self.max_prompt_bytes)
        if self.placement is not None and not isinstance(self.placement, dict) and self.placement != "auto":
            raise ValueError(f"config: 'placement' must be 'auto' or a mapping, got {self.placement!r}")
        object.__setattr__(self, "_auto", _auto_placement(self.placement))
        object.__setattr__(self, "_online", _online_planner(self.placement))
        if self._online is not None and self.colocated.instances:
            raise ValueError("config: 'placement.online' scales prefill and decode instances; this layout is "
                             "colocated")
        disaggregated = self.prefill.instances > 0 or self.decode.instances > 0
        if disaggregated and (self.prefill.instances == 0 or self.decode.instances == 0):
            raise ValueError("config: 'prefill.instances' and 'decode.instances' must both be > 0 "
                             "(or both 0 with 'colocated.instances' > 0)")
        if not disaggregated and self.colocated.instances == 0:
            raise ValueError("config: no instances: set 'prefill'/'decode' instances or 'colocated.instances'")
        if self.prefill.sp > 1 and self.prefill.instances == 0:
            raise ValueError("config: 'prefill.sp' > 1 needs prefill instances; colocated instances do not run "
                             "sequence-parallel prefill")

    @property
    def auto_placement(self) -> AutoPlacement | None:
        """The planner's options when the layout is to be planned at start-up."""
        return self._auto

    @property
    def online_planner(self) -> OnlinePlanner | None:
        """The online planner's options, when it is on."""
        return self._online

    @property
    def num_devices(self) -> int:
        """Devices (GPUs, or logical GPUs on CPU) the layout needs: one per rank."""
        return (self.prefill.instances * self.prefill.world_size + self.decode.instances * self.decode.world_size
                + self.colocated.instances * self.colocated.world_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, data: Any, path: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ValueError(f"config: '{path or 'top level'}' must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = f"{path}." if path else ""
        raise ValueError(f"config: unknown key '{where}{unknown[0]}' (known: {sorted(known)})")
    kwargs = {}
    for name, value in data.items():
        sub = _SECTIONS.get(name) if cls is ClusterConfig else None
        kwargs[name] = _build(sub, value, f"{path}.{name}" if path else name) if sub else value
    return cls(**kwargs)


_SECTIONS = {"prefill": PrefillConfig, "decode": DecodeConfig, "colocated": ColocatedConfig, "engine": EngineConfig,
             "kv_transfer": TransferConfig, "ray": RayConfig, "fault_tolerance": FaultToleranceConfig,
             "routing": RoutingConfig}

DEFAULT_YAML = """\
model: smollm2-135m      # preset (smollm2-135m, tiny, small), a Hugging Face checkpoint directory, or a .gguf file
dtype: float32           # float32 | bfloat16 | float16
device: auto             # auto | cpu | cuda
prefill: {instances: 1, tp: 1, sp: 1}
decode: {instances: 1, tp: 1}
colocated: {instances: 0, tp: 1}
"""


def config_from_dict(data: dict | None) -> ClusterConfig:
    return _build(ClusterConfig, data or {}, "")


def load_config(source: str | Path | None = None) -> ClusterConfig:
    """From a YAML file path; None gives the embedded default (local Ray, smollm2-135m, 1 prefill + 1 decode, CPU)."""
    if source is None:
        return config_from_dict(yaml.safe_load(DEFAULT_YAML))
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"config: no such file {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"config: {path} is not valid YAML: {e}") from None
    return config_from_dict(data)
