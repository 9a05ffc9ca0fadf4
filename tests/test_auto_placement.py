"""`placement: auto`: the layout is planned at start-up from the Ray cluster's GPUs, and the planned cluster serves
the transformers tokens."""
import dataclasses

import pytest

from cluster_helpers import config, references, workload, write_checkpoint
from splitserve.cluster.auto_placement import gpu_topology, hardware_name
from splitserve.cluster.cluster import Cluster
from splitserve.cluster.config import config_from_dict


def _node(gpus, kind=None, alive=True):
    resources = {"CPU": 8.0, "GPU": float(gpus)} if gpus else {"CPU": 8.0}
    if kind:
        resources[f"accelerator_type:{kind}"] = 1.0
    return {"Alive": alive, "Resources": resources}


def test_gpu_topology_skips_gpu_less_and_dead_nodes():
    nodes = [_node(0), _node(8, "H100"), _node(8, "H100"), _node(4, "H100"), _node(8, "H100", alive=False)]
    assert gpu_topology(nodes) == (2, 8, {"H100"})
    with pytest.raises(ValueError, match="no GPUs in the Ray cluster"):
        gpu_topology([_node(0)])


def test_hardware_from_ray_accelerator_type_or_config():
    cfg = config_from_dict({"device": "cuda", "placement": "auto"})
    assert hardware_name(cfg, cfg.auto_placement, {"H100"}) == "H100-80GB"
    assert hardware_name(cfg, cfg.auto_placement, {"A100-80G"}) == "A100-80GB"
    with pytest.raises(ValueError, match="placement.hardware"):
        hardware_name(cfg, cfg.auto_placement, set())
    with pytest.raises(ValueError, match="placement.hardware"):
        hardware_name(cfg, cfg.auto_placement, {"H100", "A100-80G"})
    cpu = config_from_dict({"device": "cpu", "placement": {"auto": {"hardware": None}}})
    assert hardware_name(cpu, cpu.auto_placement, {"H100"}) == "cpu"
    named = config_from_dict({"placement": {"auto": {"hardware": "L40S"}}})
    assert hardware_name(named, named.auto_placement, {"H100"}) == "L40S"


def test_auto_options_are_validated_by_name():
    with pytest.raises(ValueError, match="placement.auto.tpot"):
        config_from_dict({"placement": {"auto": {"tpot": 0.1}}})
    with pytest.raises(ValueError, match="placement.auto.requests"):
        config_from_dict({"placement": {"auto": {"requests": 5}}})
    with pytest.raises(ValueError, match="'placement' must be 'auto' or a mapping"):
        config_from_dict({"placement": "manual"})
    assert config_from_dict({"placement": {"cluster": "1x8xH100-80GB"}}).auto_placement is None


@pytest.fixture(scope="module")
def two_gpu_ray(own_ray):
    own_ray.init(num_cpus=2, num_gpus=3, include_dashboard=False, namespace="splitserve-tests", log_to_driver=False)
    yield own_ray


def test_auto_plan_launches_and_matches_transformers(two_gpu_ray, tmp_path):
    ckpt = write_checkpoint("llama", tmp_path / "llama", seed=61)
    auto = {"auto": {"ttft_s": 5.0, "tpot_s": 1.0, "rate": 0.5, "requests": 100}}
    # The configured layout (3 colocated instances) is replaced by the plan.
    cfg = config(ckpt, prefill={"instances": 0}, decode={"instances": 0}, colocated={"instances": 3},
                 placement=auto)
    prompts, params = workload(4, seed=2)
    # min_tokens = max_tokens bans eos, as the reference's min_new_tokens does (this checkpoint's greedy path would
    # otherwise pick eos in one prompt, which ignore_eos keeps but transformers' reference cannot produce).
    params = [dataclasses.replace(p, min_tokens=p.max_tokens, ignore_eos=False) for p in params]
    with Cluster(cfg) as cluster:
        planned = cluster.config
        assert planned.auto_placement is None and planned.placement["planned_at_startup"]["rate"] == 0.5
        assert planned.placement["cluster"] == "1x3xcpu"
        assert 1 <= planned.num_devices <= 3  # a light target needs few of the 3 devices
        assert len(cluster.instances) == (planned.prefill.instances + planned.decode.instances
                                          + planned.colocated.instances)
        outputs = cluster.generate(prompts, params, timeout=120)
    assert [o.token_ids for o in outputs] == references(ckpt, prompts, params)
