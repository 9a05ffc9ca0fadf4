"""`placement: auto`: the layout is planned at start-up from the Ray cluster's GPUs (pipeline stages included, and
only layouts the cluster launches), and the planned cluster serves the transformers tokens."""
import dataclasses

import pytest
import yaml

from cluster_helpers import config, references, workload, write_checkpoint
from splitserve.cluster.auto_placement import (backend_problem, gpu_topology, hardware_name, hardware_spec,
                                               launch_problem, launcher_node_index, plan_config)
from splitserve.cluster.cluster import Cluster
from splitserve.cluster.config import config_from_dict
from splitserve.placement.parallel import Parallel
from splitserve.placement.specs import load_model
from splitserve.workers.config import load_config as load_model_config


def _node(gpus, kind=None, alive=True, address=None):
    resources = {"CPU": 8.0, "GPU": float(gpus)} if gpus else {"CPU": 8.0}
    if kind:
        resources[f"accelerator_type:{kind}"] = 1.0
    node = {"Alive": alive, "Resources": resources}
    return {**node, "NodeManagerAddress": address} if address else node


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


def test_plan_node_indices_follow_the_launchers_numbering():
    # The planner models the two 8-GPU nodes; the launcher numbers every GPU node by address, the 4-GPU one too.
    nodes = [_node(4, address="10.0.0.1"), _node(8, address="10.0.0.3"), _node(8, address="10.0.0.2"),
             _node(0, address="10.0.0.0")]
    assert launcher_node_index(nodes, 8) == {0: 1, 1: 2}
    assert launcher_node_index([_node(8), _node(8)], 8) is None  # no addresses: no node hints


def _small_heads_checkpoint(directory, seed):
    """3 attention heads: TP cannot split them over 2 or 4 devices (as Falcon-7B's 71 heads over 8)."""
    return write_checkpoint("llama", directory, seed=seed, hidden_size=48, num_attention_heads=3,
                            num_key_value_heads=1)


def test_launch_problem_mirrors_the_clusters_checks(tmp_path):
    ckpt = _small_heads_checkpoint(tmp_path / "m", 1)
    cfg, spec = load_model_config(ckpt), load_model(str(ckpt))
    assert launch_problem(spec, cfg, "native", Parallel(pp=2)) is None
    assert "3 attention heads" in launch_problem(spec, cfg, "native", Parallel(tp=2))
    assert launch_problem(spec, cfg, "native", Parallel(pp=3)).startswith("pp: 3 stages for 2 layers")
    assert "native model backend" in launch_problem(spec, cfg, "transformers", Parallel(pp=2))
    # The shape part is the planner's own check; the backend part stays here.
    assert backend_problem(cfg, "native", Parallel(tp=2)) is None
    assert backend_problem(cfg, "transformers", Parallel(sp=2, sp_algorithm="ring")) is None
    assert "AutoTP" in backend_problem(cfg, "transformers", Parallel(tp=2))


def test_hardware_file_overrides_a_catalog_entry(tmp_path):
    cfg = config_from_dict({"device": "cpu", "placement": {"auto": {"hardware": str(tmp_path / "hw.yaml")}}})
    (tmp_path / "hw.yaml").write_text(yaml.safe_dump({"hardware": "L40S", "overrides": {"memory_bytes": 24e9}}))
    hw = hardware_spec(cfg, cfg.auto_placement, set())
    assert hw.name == "L40S" and hw.memory_bytes == 24e9
    (tmp_path / "hw.yaml").write_text(yaml.safe_dump({"hardware": "L40S", "overrides": {"memory": 1}}))
    with pytest.raises(ValueError, match="placement.hardware: .*overrides.memory: unknown field"):
        hardware_spec(cfg, cfg.auto_placement, set())
    (tmp_path / "hw.yaml").write_text(yaml.safe_dump({"overrides": {}}))
    with pytest.raises(ValueError, match="placement.hardware: .*'hardware'"):
        hardware_spec(cfg, cfg.auto_placement, set())


def test_plan_leaves_out_layouts_the_backend_refuses(tmp_path):
    """The same small devices as the launch test below: only pipeline stages fit them, and the transformers backend
    refuses stages, so the plan fails (naming why) rather than handing the launcher a layout it refuses."""
    ckpt = _small_heads_checkpoint(tmp_path / "m", 2)
    hw = _small_device(tmp_path, ckpt)
    nodes = [_node(4, address="127.0.0.1")]
    auto = {"auto": {"ttft_s": 5.0, "tpot_s": 1.0, "rate": 0.5, "requests": 100, "workload": "fixed:32:8",
                     "hardware": hw}}
    native = plan_config(config_from_dict(config(ckpt, placement=auto)), str(ckpt), nodes)
    assert (native.prefill.pp, native.decode.pp) == (2, 2)
    with pytest.raises(ValueError, match="pp: pipeline stages run on the native model backend only"):
        plan_config(config_from_dict(config(ckpt, placement=auto, engine={"backend": "transformers"})), str(ckpt),
                    nodes)


def test_planned_stages_name_the_launchers_nodes(tmp_path):
    """The planner models the two 4-GPU nodes; the plan's stage nodes are renumbered among all GPU nodes by address,
    as the launcher counts them (the 2-GPU node sorts first)."""
    ckpt = _small_heads_checkpoint(tmp_path / "m", 3)
    nodes = [_node(4, address="10.0.0.3"), _node(2, address="10.0.0.1"), _node(4, address="10.0.0.2")]
    auto = {"auto": {"ttft_s": 5.0, "tpot_s": 1.0, "rate": 0.5, "requests": 100, "workload": "fixed:32:8",
                     "hardware": _small_device(tmp_path, ckpt)}}
    planned = plan_config(config_from_dict(config(ckpt, placement=auto)), str(ckpt), nodes)
    assert planned.placement["cluster"] == "2x4xcpu" and planned.prefill.pp == 2
    used = {s["node"] for inst in planned.placement["instances"] for s in inst["stages"]}
    assert used and used <= {1, 2}


def _small_device(tmp_path, ckpt) -> str:
    """A device holding 80 % of the model's weights: one device cannot serve the model, two stages can."""
    weights = load_model(str(ckpt), "float32").weight_bytes()
    path = tmp_path / "small_device.yaml"
    path.write_text(yaml.safe_dump({"hardware": "cpu", "overrides": {"memory_bytes": 0.8 * weights}}))
    return str(path)


@pytest.fixture(scope="module")
def four_gpu_ray(own_ray):
    own_ray.init(num_cpus=2, num_gpus=4, include_dashboard=False, namespace="splitserve-tests", log_to_driver=False)
    yield own_ray


def test_auto_plan_launches_and_matches_transformers(four_gpu_ray, tmp_path):
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
        assert planned.placement["cluster"] == "1x4xcpu"
        assert 1 <= planned.num_devices <= 3  # a light target needs few of the 4 devices
        assert len(cluster.instances) == (planned.prefill.instances + planned.decode.instances
                                          + planned.colocated.instances)
        outputs = cluster.generate(prompts, params, timeout=120)
    assert [o.token_ids for o in outputs] == references(ckpt, prompts, params)


def test_auto_plan_with_pipeline_stages_launches_and_matches_transformers(four_gpu_ray, tmp_path):
    """Devices too small for the model and heads TP cannot split: the planner's only layouts are pipelines, and the
    planned prefill PP2 -> decode PP2 (stages pinned to the plan's node) serves the transformers tokens."""
    ckpt = _small_heads_checkpoint(tmp_path / "llama3h", seed=62)
    auto = {"auto": {"ttft_s": 5.0, "tpot_s": 1.0, "rate": 0.5, "requests": 100, "workload": "fixed:32:8",
                     "hardware": _small_device(tmp_path, ckpt)}}
    cfg = config(ckpt, placement=auto)
    prompts, params = workload(4, seed=4)
    params = [dataclasses.replace(p, min_tokens=p.max_tokens, ignore_eos=False) for p in params]
    with Cluster(cfg) as cluster:
        planned = cluster.config
        assert planned.placement["mode"] == "disaggregated"
        assert (planned.prefill.pp, planned.decode.pp) == (2, 2) and planned.prefill.tp == planned.decode.tp == 1
        assert planned.num_devices == 4
        stages = {(i["role"], i["index"]): i["stages"] for i in planned.placement["instances"]}
        assert [s["node"] for s in stages[("prefill", 0)] + stages[("decode", 0)]] == [0, 0, 0, 0]
        assert sorted(inst.spec.pp for inst in cluster.launcher.instances) == [2, 2]
        outputs = cluster.generate(prompts, params, timeout=120)
    assert [o.token_ids for o in outputs] == references(ckpt, prompts, params)
