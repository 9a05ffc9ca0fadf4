"""`placement: auto`: at start-up, plan each phase's layout and instance counts for the Ray cluster's actual GPUs with
the placement planner (DistServe search over the simulator), then launch that plan.

The devices come from Ray: the GPU count of the nodes that have GPUs (the planner models identical nodes: the most
common count, and the nodes with at least that many), and the device kind from Ray's `accelerator_type:<kind>`
resource (or `placement.hardware`: a catalog name, or a YAML file with a catalog name and overrides; `cpu` when
`device: cpu`). The search covers pipeline parallelism as `splitserve plan` does, and only layouts the cluster
launches: layouts the model's heads, MLP width or backend refuse are left out before they are simulated."""
from __future__ import annotations

import collections
import logging
import os
import time
from typing import Sequence

from splitserve.cluster.config import AutoPlacement, ClusterConfig, config_from_dict
from splitserve.placement.hardware import ClusterSpec, HardwareSpec, cluster_from_mapping, get_hardware
from splitserve.placement.latency import AnalyticLatency, LatencyModel
from splitserve.placement.launch_checks import launch_shape_problem
from splitserve.placement.metrics import SLO
from splitserve.placement.parallel import Parallel
from splitserve.placement.plan import plan_from_result
from splitserve.placement.profile import Profile, ProfileLatency
from splitserve.placement.search import Planner, SearchOptions
from splitserve.placement.specs import ModelSpec, load_model
from splitserve.placement.workload import load_workload, make_trace
from splitserve.workers.config import ModelConfig
from splitserve.workers.config import load_config as load_model_config
from splitserve.workers.hf_config import autotp_problem, resolve_backend

log = logging.getLogger(__name__)

# Ray's accelerator_type resource names -> the planner's hardware catalog.
ACCELERATORS = {"H100": "H100-80GB", "H200": "H200", "A100-80G": "A100-80GB", "A100-40G": "A100-40GB",
                "A100": "A100-40GB", "L40S": "L40S"}


def gpu_topology(nodes: list[dict]) -> tuple[int, int, set[str]]:
    """(nodes, GPUs per node, accelerator kinds) from `ray.nodes()`; nodes without GPUs (e.g. a head with
    num-gpus 0) are left out."""
    counts, kinds = [], set()
    for node in nodes:
        if not node.get("Alive", node.get("alive", True)):
            continue
        resources = node.get("Resources", {})
        gpus = int(resources.get("GPU", 0))
        if gpus <= 0:
            continue
        counts.append(gpus)
        kinds |= {k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")}
    if not counts:
        raise ValueError("placement: auto found no GPUs in the Ray cluster (`ray status` lists them); on a CPU-only "
                         "machine give the local Ray logical GPUs with ray.num_gpus")
    per_node = collections.Counter(counts).most_common(1)[0][0]
    return sum(1 for c in counts if c >= per_node), per_node, kinds


def hardware_name(config: ClusterConfig, auto: AutoPlacement, kinds: set[str]) -> str:
    if auto.hardware:
        return auto.hardware
    if config.device == "cpu" or not kinds:
        if config.device == "cuda":
            raise ValueError("placement.hardware: Ray reports no accelerator_type for the GPU nodes; name the GPU "
                             f"kind (one of {sorted(set(ACCELERATORS.values()))})")
        return "cpu"
    known = {ACCELERATORS[k] for k in kinds if k in ACCELERATORS}
    if len(known) != 1:
        raise ValueError(f"placement.hardware: Ray reports accelerators {sorted(kinds)}; name one kind the planner "
                         f"knows ({sorted(set(ACCELERATORS.values()))})")
    return known.pop()


def hardware_spec(config: ClusterConfig, auto: AutoPlacement, kinds: set[str]) -> HardwareSpec:
    """The device model: a catalog entry, or `placement.hardware` as a YAML file `{hardware: NAME, overrides: {...}}`
    (the fields of a `splitserve plan --cluster` file's overrides) for a device the catalog lacks."""
    name = hardware_name(config, auto, kinds)
    if not (name.endswith((".yaml", ".yml")) or os.path.isfile(name)):
        return get_hardware(name)
    import yaml

    try:
        with open(name, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ValueError(f"placement.hardware: cannot read {name!r} ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"placement.hardware: {name} is not valid YAML ({exc})") from None
    if not isinstance(data, dict) or not set(data) <= {"hardware", "overrides"} or "hardware" not in data:
        raise ValueError(f"placement.hardware: {name} must hold a mapping with 'hardware' (a catalog name) and "
                         "optional 'overrides'")
    try:
        return cluster_from_mapping({"nodes": 1, "devices_per_node": 1, **data}).hardware
    except ValueError as exc:
        raise ValueError(f"placement.hardware: {name}: {exc}") from None


def backend_problem(model: ModelConfig, backend: str, par: Parallel) -> str | None:
    """Why `backend` cannot run `par` for this model though its shape allows it (DeepSpeed AutoTP's head split,
    pipeline stages on the transformers backend), or None."""
    if backend != "transformers":
        return None
    problem = autotp_problem(model, par.tp)
    if problem:
        return f"tp: {problem}"
    if par.pp > 1:
        return f"pp: pipeline stages run on the native model backend only ({model.architecture})"
    return None


def launch_problem(spec: ModelSpec, model: ModelConfig, backend: str, par: Parallel) -> str | None:
    """Why the cluster would refuse `par` for this model at launch (the checks `Cluster` runs before any process
    starts), or None: the model's shape (`placement.launch_checks`, which the planner's search applies itself),
    then the backend."""
    return launch_shape_problem(spec, par) or backend_problem(model, backend, par)


class LaunchableLatency:
    """A latency model that also answers `layout_problem` (which the search consults before simulating a layout)
    with the backend's launch checks (the search leaves out layouts the model's shape refuses itself), so that the
    plan never holds a layout the launcher refuses."""

    def __init__(self, latency: LatencyModel, model: ModelConfig, backend: str):
        self.latency, self.model, self.backend = latency, model, backend
        self._inner_problem = getattr(latency, "layout_problem", None)

    def layout_problem(self, par: Parallel) -> str | None:
        return backend_problem(self.model, self.backend, par) or (
            self._inner_problem(par) if self._inner_problem else None)

    def prefill_time(self, lengths: Sequence[int], par: Parallel, prefixes: Sequence[int] | None = None) -> float:
        return self.latency.prefill_time(lengths, par, prefixes)

    def decode_time(self, batch: int, total_context: int, par: Parallel) -> float:
        return self.latency.decode_time(batch, total_context, par)

    def mixed_time(self, lengths: Sequence[int], prefixes: Sequence[int], batch: int, total_context: int,
                   par: Parallel) -> float:
        return self.latency.mixed_time(lengths, prefixes, batch, total_context, par)

    def kv_transfer_time(self, tokens: int, src: Parallel, dst: Parallel, same_node: bool) -> float:
        return self.latency.kv_transfer_time(tokens, src, dst, same_node)


def launcher_node_index(ray_nodes: list[dict], per_node: int) -> dict[int, int] | None:
    """Planner node index -> the launcher's node index (its i-th GPU node by address). The planner counts only the
    nodes with at least `per_node` GPUs, so the two differ when a smaller GPU node sorts first. None when Ray did
    not report addresses (or two nodes share one), where node hints cannot be mapped."""
    gpu_nodes = []
    for node in ray_nodes:
        gpus = node.get("Resources", {}).get("GPU", 0)
        if node.get("Alive", node.get("alive", True)) and gpus > 0:
            gpu_nodes.append((node.get("NodeManagerAddress"), gpus))
    addresses = [address for address, _ in gpu_nodes]
    if None in addresses or len(set(addresses)) != len(addresses):
        return None
    launcher = sorted(addresses)
    planner = sorted(address for address, gpus in gpu_nodes if gpus >= per_node)
    return {i: launcher.index(address) for i, address in enumerate(planner)}


def _pin_stages(placement: dict, node_index: dict[int, int] | None) -> dict:
    """The plan's placement with each stage's node renumbered for the launcher, or without node hints when they
    cannot be mapped (the launcher then places stages where Ray finds room)."""
    if node_index is None:
        return {**placement, "instances": []}
    return {**placement, "instances": [
        {**inst, "stages": [{**stage, "node": node_index[stage["node"]]} for stage in inst["stages"]]}
        for inst in placement.get("instances", [])]}


def plan_config(config: ClusterConfig, model_dir: str, ray_nodes: list[dict]) -> ClusterConfig:
    """The config with prefill/decode/colocated replaced by the planner's choice for these nodes."""
    auto = config.auto_placement
    if auto is None:
        return config
    nodes, per_node, kinds = gpu_topology(ray_nodes)
    cluster = ClusterSpec(nodes, per_node, hardware_spec(config, auto, kinds))
    model = load_model(model_dir, config.dtype)
    model_config = load_model_config(model_dir)
    latency: LatencyModel = AnalyticLatency(model, cluster)
    if auto.profile:
        latency = ProfileLatency(Profile.load(auto.profile), fallback=latency)
    latency = LaunchableLatency(latency, model_config, resolve_backend(config.engine.backend, model_config))
    trace = make_trace(load_workload(auto.workload), auto.requests, auto.seed, "poisson", 1.0, model.max_positions)
    slo = SLO(auto.ttft_s, auto.tpot_s, auto.attainment)
    # The same space as `splitserve plan` (no --max-pp): pipeline depths up to the model's layers.
    options = SearchOptions(num_requests=auto.requests, seed=auto.seed)
    start = time.perf_counter()
    result = Planner(model, cluster, latency, trace, slo, options).search(auto.rate)
    plan = plan_from_result(result, config.model, model.dtype, cluster.name, slo, auto.workload, auto.rate)
    data = config.to_dict()
    for role in ("prefill", "decode", "colocated"):
        data[role] = {**data[role], **plan.to_dict()[role]}
    # Kept for the record under another key: the planned config launches as it is and is not planned again.
    placement = _pin_stages(plan.placement.to_dict(), launcher_node_index(ray_nodes, per_node))
    data["placement"] = {**placement, "planned_at_startup": auto.to_dict()}
    planned = config_from_dict(data)
    log.info("placement: auto planned %s on %s in %.1fs: prefill %s, decode %s, colocated %s",
             result.mode, cluster.name, time.perf_counter() - start, data["prefill"], data["decode"],
             data["colocated"])
    if planned.num_devices > cluster.num_devices:
        raise ValueError(f"placement: auto planned {planned.num_devices} devices but the cluster has "
                         f"{cluster.num_devices}")
    return planned
