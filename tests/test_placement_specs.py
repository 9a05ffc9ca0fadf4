"""Model, hardware and cluster specs: presets, Hugging Face configs, and clear errors for bad input."""

import dataclasses
import json

import pytest

from splitserve.placement.hardware import HARDWARE, load_cluster
from splitserve.placement.memory import kv_capacity_tokens, memory_problem
from splitserve.placement.parallel import Parallel, check_layout
from splitserve.placement.presets import MODEL_PRESETS
from splitserve.placement.specs import SUPPORTED_MODEL_TYPES, load_model, model_from_hf_config


def test_project_presets_have_exact_dims():
    tiny, small = MODEL_PRESETS["tiny"], MODEL_PRESETS["small"]
    assert (tiny.architecture, tiny.hidden_size, tiny.intermediate_size, tiny.num_layers, tiny.num_heads,
            tiny.num_kv_heads, tiny.head_dim, tiny.vocab_size, tiny.max_positions) == \
        ("llama", 64, 128, 2, 4, 2, 16, 512, 4096)
    assert (small.architecture, small.hidden_size, small.intermediate_size, small.num_layers, small.num_heads,
            small.num_kv_heads, small.head_dim, small.vocab_size, small.max_positions) == \
        ("llama", 512, 1408, 8, 8, 2, 64, 512, 4096)


@pytest.mark.parametrize("name,billions", [("llama-2-7b", 6.7), ("llama-2-13b", 13.0), ("llama-3-8b", 8.0),
                                           ("llama-3-70b", 70.6), ("opt-13b", 12.9), ("opt-66b", 66.0),
                                           ("opt-175b", 175.0), ("mistral-7b", 7.2), ("qwen2-7b", 7.6)])
def test_public_presets_param_counts(name, billions):
    # Published sizes; within 3% (we count untied input and output embeddings, ignore norms and biases).
    assert load_model(name).param_count() / 1e9 == pytest.approx(billions, rel=0.03)


def test_llama_style_config_with_gqa_and_explicit_head_dim(tmp_path):
    config = {"model_type": "qwen3", "num_hidden_layers": 28, "hidden_size": 1024, "num_attention_heads": 16,
              "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072, "vocab_size": 151936,
              "max_position_embeddings": 40960, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = load_model(str(tmp_path))
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.dtype_bytes) == (28, 16, 8, 128, 2)
    assert spec.kv_bytes_per_token() == 2 * 28 * 8 * 128 * 2


def test_opt_and_gpt2_field_names():
    opt = model_from_hf_config({"model_type": "opt", "num_hidden_layers": 40, "hidden_size": 5120,
                                "num_attention_heads": 40, "ffn_dim": 20480, "vocab_size": 50272,
                                "max_position_embeddings": 2048, "torch_dtype": "float16"})
    assert (opt.num_kv_heads, opt.head_dim, opt.intermediate_size, opt.gated_mlp) == (40, 128, 20480, False)
    gpt2 = model_from_hf_config({"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "n_inner": None,
                                 "vocab_size": 50257, "n_positions": 1024})
    assert (gpt2.num_layers, gpt2.intermediate_size, gpt2.head_dim) == (12, 3072, 64)
    neox = model_from_hf_config({"model_type": "gpt_neox", "num_hidden_layers": 6, "hidden_size": 512,
                                 "num_attention_heads": 8, "intermediate_size": 2048, "vocab_size": 50304,
                                 "max_position_embeddings": 2048}, dtype="fp32")
    assert neox.dtype == "float32"


def test_unknown_model_type_lists_supported():
    with pytest.raises(ValueError, match="model_type") as info:
        model_from_hf_config({"model_type": "mamba"})
    assert all(name in str(info.value) for name in SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("config,field", [
    ({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 1, "vocab_size": 1,
      "max_position_embeddings": 1}, "num_hidden_layers"),
    ({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 0,
      "intermediate_size": 1, "vocab_size": 1, "max_position_embeddings": 1}, "num_attention_heads"),
    ({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
      "num_key_value_heads": 3, "intermediate_size": 1, "vocab_size": 1, "max_position_embeddings": 1},
     "num_kv_heads"),
    ({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
      "intermediate_size": 1, "vocab_size": 1, "max_position_embeddings": 1, "torch_dtype": "int3"}, "dtype"),
])
def test_bad_config_names_the_field(config, field):
    with pytest.raises(ValueError, match=field):
        model_from_hf_config(config)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="preset"):
        load_model("no-such-model")


def test_cluster_strings_and_yaml(tmp_path):
    c = load_cluster("4x8xA100-80GB")
    assert (c.nodes, c.devices_per_node, c.num_devices, c.hardware.name) == (4, 8, 32, "A100-80GB")
    assert load_cluster("8xH100-80GB").nodes == 1
    path = tmp_path / "c.yaml"
    path.write_text("nodes: 2\ndevices_per_node: 4\nhardware: L40S\noverrides: {inter_node_bandwidth: 3.0e9}\n")
    c = load_cluster(str(path))
    assert (c.num_devices, c.hardware.inter_node_bandwidth, c.hardware.intra_node_link) == (8, 3.0e9, "PCIe")
    assert set(HARDWARE) >= {"A100-40GB", "A100-80GB", "H100-80GB", "H200", "L40S", "cpu"}


@pytest.mark.parametrize("text,field", [("4x8xB200", "hardware"), ("4by8", "cluster"), ("0x8xA100-80GB", "nodes")])
def test_bad_cluster_strings(text, field):
    with pytest.raises(ValueError, match=field):
        load_cluster(text)


def test_bad_cluster_yaml_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("nodes: 1\ndevices_per_node: 8\nhardware: H200\noverrides: {flops: 1}\n")
    with pytest.raises(ValueError, match="overrides.flops"):
        load_cluster(str(path))


def test_layout_errors_name_the_cause():
    model, cluster = load_model("opt-13b"), load_cluster("1x8xA100-80GB")
    with pytest.raises(ValueError, match="tp: 3 does not divide num_heads 40"):
        check_layout(model, cluster, Parallel(tp=3))
    with pytest.raises(ValueError, match="pp: 3 does not divide num_layers 40"):
        check_layout(model, cluster, Parallel(pp=3))
    with pytest.raises(ValueError, match="sp_algorithm"):
        Parallel(sp=2)
    with pytest.raises(ValueError, match="tp"):
        Parallel(tp=0)


def test_memory_fit():
    hw = HARDWARE["A100-80GB"]
    big = load_model("opt-175b")
    assert "weights need" in memory_problem(big, hw, Parallel(tp=1), 1)
    assert memory_problem(big, hw, Parallel(tp=8), 2048) is None
    # KV capacity grows with TP (weights shrink per device, KV per device shrinks)
    model = load_model("llama-2-13b")
    assert kv_capacity_tokens(model, hw, Parallel(tp=2)) > 2 * kv_capacity_tokens(model, hw, Parallel(tp=1))


def test_tp_and_pp_problems_mirror_the_native_model_code():
    """The shape checks the launcher runs: heads, MLP width and KV heads (split or evenly replicated), layers."""
    from splitserve.placement.launch_checks import launch_shape_problem

    small = MODEL_PRESETS["small"]  # 8 heads, 2 KV heads, MLP 1408, 8 layers
    assert small.tp_problem(1) is None and small.tp_problem(4) is None and small.tp_problem(8) is None
    assert "8 attention heads" in small.tp_problem(3)
    odd_mlp = dataclasses.replace(small, intermediate_size=1410)
    assert odd_mlp.tp_problem(2) is None
    assert odd_mlp.tp_problem(4) == "4 ranks do not divide the model's MLP width (1410)"
    six_kv = dataclasses.replace(small, num_heads=12, num_kv_heads=6, intermediate_size=1440)
    assert "neither split nor evenly replicate the model's 6 KV heads" in six_kv.tp_problem(4)
    assert six_kv.tp_problem(12) is None  # 6 KV heads, each held by 2 ranks
    assert launch_shape_problem(odd_mlp, Parallel(tp=4)).startswith("tp: 4 ranks do not divide")
    assert launch_shape_problem(small, Parallel(pp=9)) == "pp: 9 stages for 8 layers"
    assert launch_shape_problem(small, Parallel(tp=2, pp=8, sp=2, sp_algorithm="ring")) is None
