"""Search: agrees with brute force on small spaces, explains infeasibility, and produces a valid plan YAML."""

import io
import json
import sys

import pytest

from splitserve.placement import cli
from splitserve.placement.hardware import load_cluster
from splitserve.placement.latency import AnalyticLatency
from splitserve.placement.metrics import SLO
from splitserve.placement.plan import Plan, plan_from_result
from splitserve.placement.goodput import SimSettings
from splitserve.placement.search import NoFeasiblePlan, Planner, SearchOptions, brute_force
from splitserve.placement.specs import load_model
from splitserve.placement.workload import load_workload, make_trace


def _planner(rate_slo=SLO(0.25, 0.05, 0.9), cluster="1x4xA100-80GB", model="llama-2-7b", requests=240, **kw):
    m, c = load_model(model), load_cluster(cluster)
    trace = make_trace(load_workload("fixed:512:24"), requests, seed=3, max_tokens=m.max_positions)
    # A batch cap well below the request count, so overload shows as queueing in a short trace.
    options = SearchOptions(num_requests=requests, sp_degrees=(1, 2), max_pp=2,
                            settings=SimSettings(max_batch=16), **kw)
    return Planner(m, c, AnalyticLatency(m, c), trace, rate_slo, options)


@pytest.mark.parametrize("rate", [9.0, 30.0])
def test_search_matches_brute_force(rate):
    planner = _planner()
    result = planner.search(rate, verify=False)
    devices, optimal_pairs = brute_force(_planner(), rate, start=1.0)
    assert result.algorithm == "high_affinity"
    assert result.devices == devices
    assert (result.prefill.par, result.decode.par) in optimal_pairs
    assert result.prefill_instances * result.prefill.goodput >= rate
    assert result.decode_instances * result.decode.goodput >= rate


def test_cluster_fill_and_end_to_end_check():
    result = _planner().search(None)
    assert result.devices <= 4 and result.prefill_instances >= 1 and result.decode_instances >= 1
    # The end-to-end simulation of the chosen deployment should roughly hold the target (joint SLO, so lower).
    assert result.verified_attainment >= 0.8
    roles = [p.role for p in result.placements]
    if result.mode == "disaggregated":
        assert roles.count("prefill") == result.prefill_instances and roles.count("decode") == result.decode_instances
        used = [(node, d) for p in result.placements for node, devs in p.stages for d in devs]
        assert len(used) == len(set(used)) == result.devices


def test_low_affinity_keeps_kv_inside_nodes():
    result = _planner(cluster="2x4xA100-80GB", affinity="low").search(None, verify=False)
    assert result.algorithm == "low_affinity"
    nodes_by_stage = {}
    for p in result.placements:
        for stage, (node, _) in enumerate(p.stages):
            nodes_by_stage.setdefault((p.role, p.index), []).append(node)
    # every decode stage shares its node with some prefill instance's same stage
    prefill_nodes = {tuple(v) for (role, _), v in nodes_by_stage.items() if role == "prefill"}
    for (role, _), nodes in nodes_by_stage.items():
        if role == "decode":
            assert tuple(nodes) in prefill_nodes


def test_affinity_follows_inter_node_bandwidth(tmp_path):
    fast = _planner(cluster="2x4xA100-80GB")
    assert fast.affinity() == "high"
    path = tmp_path / "slow.yaml"
    path.write_text("nodes: 2\ndevices_per_node: 4\nhardware: A100-80GB\noverrides: {inter_node_bandwidth: 3.125e8}\n")
    m = load_model("llama-2-7b")
    slow = Planner(m, load_cluster(str(path)), AnalyticLatency(m, load_cluster(str(path))), fast.trace, fast.slo)
    assert slow.affinity() == "low"


def test_impossible_ttft_is_explained():
    with pytest.raises(NoFeasiblePlan, match="no feasible plan.*TTFT SLO 0.001s is below"):
        _planner(SLO(0.001, 0.05, 0.9)).search(None)


def test_rate_beyond_cluster_is_explained():
    with pytest.raises(NoFeasiblePlan, match="needs .* devices"):
        _planner(SLO(0.25, 0.05, 0.9)).search(10_000.0)


def test_model_that_fits_nowhere_is_explained():
    with pytest.raises(NoFeasiblePlan, match="weights need"):
        _planner(model="opt-175b", cluster="1x2xA100-80GB").search(None)


def test_plan_yaml_round_trip_and_keys():
    planner = _planner()
    result = planner.search(9.0)
    plan = plan_from_result(result, "llama-2-7b", "float16", "1x4xA100-80GB", planner.slo, "fixed:512:24", 9.0)
    data = plan.to_dict()
    assert list(data) == ["model", "dtype", "prefill", "decode", "colocated", "placement"]
    assert set(data["prefill"]) == {"instances", "tp", "sp", "pp", "sp_algorithm"}
    assert set(data["decode"]) == {"instances", "tp", "pp"}
    assert set(data["colocated"]) == {"instances", "tp"}
    assert Plan.from_yaml(plan.to_yaml()) == plan


@pytest.mark.parametrize("text,field", [
    ("model: m\ndtype: float16\nprefill: {instances: 1, tp: 0}\ndecode: {instances: 1}\n", "prefill.tp"),
    ("model: m\ndtype: float16\nprefill: {instances: 1, sp: 2, sp_algorithm: none}\ndecode: {instances: 1}\n",
     "prefill.sp_algorithm"),
    ("model: m\ndtype: float16\nprefill: {instances: 1}\ndecode: {instances: 1, ep: 2}\n", "decode"),
    ("model: m\ndtype: float16\nprefill: {instances: 1}\n", "decode.instances"),
    ("model: m\ndtype: int3\ncolocated: {instances: 1}\n", "dtype"),
    ("model: m\ndtype: float16\ncolocated: {instances: 0}\n", "instances"),
])
def test_bad_plan_yaml(text, field):
    with pytest.raises(ValueError, match=field):
        Plan.from_yaml(text)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


PLAN_ARGS = ["--model", "llama-2-7b", "--cluster", "1x4xA100-80GB", "--workload", "fixed:512:24", "--ttft", "250ms",
             "--tpot", "0.05", "--attainment", "90", "--rate", "9", "--requests", "100", "--no-sp", "--max-pp", "1"]


def test_cli_writes_plan(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    code = cli.main(PLAN_ARGS + ["--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0
    assert "req/s per device" in captured.out and "colocated" in captured.out
    assert captured.err == ""  # no progress bar when stderr is not a terminal
    plan = Plan.load(str(out))
    assert plan.model == "llama-2-7b" and plan.placement.cluster == "1x4xA100-80GB"


def test_cli_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli.main(PLAN_ARGS + ["--output", str(tmp_path / "a.yaml")]) == 0
    assert "layout" in terminal.getvalue() and "/" in terminal.getvalue()  # tqdm's "n/total layout"
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert cli.main(PLAN_ARGS + ["--output", str(tmp_path / "b.yaml"), "--quiet"]) == 0
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("args,message", [
    (["--model", "mamba-1", "--cluster", "1x4xA100-80GB"], "model"),
    (["--model", "tiny", "--cluster", "1x4xTPU"], "hardware"),
    (["--model", "tiny", "--cluster", "1x4xA100-80GB", "--workload", "fixed:1"], "workload"),
    (["--model", "tiny", "--cluster", "1x4xA100-80GB", "--rate", "-1"], "rate"),
])
def test_cli_bad_input(args, message, capsys):
    assert cli.main(args + ["--ttft", "1", "--tpot", "1", "--quiet"]) == 2
    assert message in capsys.readouterr().err


def _llama_7b_with_mlp_width(tmp_path, width):
    """Llama-2-7B's shape with another MLP width: 32 heads and 32 KV heads split over 4 ranks, the MLP may not."""
    spec = load_model("llama-2-7b")
    config = {"model_type": "llama", "num_hidden_layers": spec.num_layers, "hidden_size": spec.hidden_size,
              "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
              "intermediate_size": width, "vocab_size": spec.vocab_size,
              "max_position_embeddings": spec.max_positions, "torch_dtype": "float16"}
    path = tmp_path / f"mlp-{width}" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(config))
    return str(path)


def test_plan_never_holds_a_tp_degree_that_cannot_split_the_mlp(tmp_path, capsys):
    """TP 4 divides the heads but not an MLP width of 11010 (= 2 x 5505): the launcher refuses it, so the search
    leaves it out of every role (`plan` and `placement: auto` share this search), while TP 2 and the real width's
    TP 4 stay in."""
    cluster = load_cluster("1x4xA100-80GB")
    trace = make_trace(load_workload("fixed:512:24"), 100, seed=3, max_tokens=4096)
    for width, degrees in ((11008, {1, 2, 4}), (11010, {1, 2})):
        model = load_model(_llama_7b_with_mlp_width(tmp_path, width))
        planner = Planner(model, cluster, AnalyticLatency(model, cluster), trace, SLO(0.25, 0.05, 0.9),
                          SearchOptions(num_requests=100, sp_degrees=(1, 2), max_pp=2))
        for role in ("prefill", "decode"):
            assert {p.tp for p in planner.layouts(role)} == degrees, (width, role)
    (tmp_path / "cli").mkdir()
    args = ["--model", _llama_7b_with_mlp_width(tmp_path / "cli", 11010), *PLAN_ARGS[2:]]
    assert cli.main(args + ["--output", str(tmp_path / "plan.yaml")]) == 0
    printed = capsys.readouterr().out
    assert "tp2 pp1" in printed and "tp4" not in printed
    plan = Plan.load(str(tmp_path / "plan.yaml"))
    assert all(section.tp in (1, 2) for section in (plan.prefill, plan.decode, plan.colocated))
