"""`placement: auto`: at start-up, plan each phase's layout and instance counts for the Ray cluster's actual GPUs with
the placement planner (DistServe search over the simulator), then launch that plan.

The devices come from Ray: the GPU count of the nodes that have GPUs (the planner models identical nodes: the most
common count, and the nodes with at least that many), and the device kind from Ray's `accelerator_type:<kind>`
resource (or `placement.hardware`; `cpu` when `device: cpu`)."""
from __future__ import annotations

import collections
import logging
import time

from splitserve.cluster.config import AutoPlacement, ClusterConfig, config_from_dict
from splitserve.placement.hardware import ClusterSpec, get_hardware
from splitserve.placement.latency import AnalyticLatency
from splitserve.placement.metrics import SLO
from splitserve.placement.plan import plan_from_result
from splitserve.placement.profile import Profile, ProfileLatency
from splitserve.placement.search import Planner, SearchOptions
from splitserve.placement.specs import load_model
from splitserve.placement.workload import load_workload, make_trace

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


def plan_config(config: ClusterConfig, model_dir: str, ray_nodes: list[dict]) -> ClusterConfig:
    """The config with prefill/decode/colocated replaced by the planner's choice for these nodes."""
    auto = config.auto_placement
    if auto is None:
        return config
    nodes, per_node, kinds = gpu_topology(ray_nodes)
    cluster = ClusterSpec(nodes, per_node, get_hardware(hardware_name(config, auto, kinds)))
    model = load_model(model_dir, config.dtype)
    latency = AnalyticLatency(model, cluster)
    if auto.profile:
        latency = ProfileLatency(Profile.load(auto.profile), fallback=latency)
    trace = make_trace(load_workload(auto.workload), auto.requests, auto.seed, "poisson", 1.0, model.max_positions)
    slo = SLO(auto.ttft_s, auto.tpot_s, auto.attainment)
    # Pipeline parallelism is not implemented by the launcher, so the search leaves it out.
    options = SearchOptions(num_requests=auto.requests, seed=auto.seed, max_pp=1)
    start = time.perf_counter()
    result = Planner(model, cluster, latency, trace, slo, options).search(auto.rate)
    plan = plan_from_result(result, config.model, model.dtype, cluster.name, slo, auto.workload, auto.rate)
    data = config.to_dict()
    for role in ("prefill", "decode", "colocated"):
        data[role] = {**data[role], **plan.to_dict()[role]}
    # Kept for the record under another key: the planned config launches as it is and is not planned again.
    data["placement"] = {**plan.placement.to_dict(), "planned_at_startup": auto.to_dict()}
    planned = config_from_dict(data)
    log.info("placement: auto planned %s on %s in %.1fs: prefill %s, decode %s, colocated %s",
             result.mode, cluster.name, time.perf_counter() - start, data["prefill"], data["decode"],
             data["colocated"])
    if planned.num_devices > cluster.num_devices:
        raise ValueError(f"placement: auto planned {planned.num_devices} devices but the cluster has "
                         f"{cluster.num_devices}")
    return planned
