"""Greedy tokens and logits equal Hugging Face transformers for every supported architecture (float32, CPU)."""
import pytest
import torch

from hf_checkpoints import VARIANTS, hf_greedy, hf_model, random_prompts, write_checkpoint
from splitserve.workers.layers.attention import AttentionMetadata
from splitserve.workers.llm import LLM
from splitserve.workers.loader import load_model
from splitserve.workers.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
LENGTHS = [5, 17, 40, 3, 29]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {k: write_checkpoint(k, tmp_path_factory.mktemp(k), seed=i) for i, k in enumerate(VARIANTS)}


def _full_logits(model, ids):
    meta = AttentionMetadata(torch.empty(0, dtype=torch.long), [len(ids)], [len(ids)], None)
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), None, meta))


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_logits_match_transformers(checkpoints, kind):
    ids = random_prompts([50], seed=7)[0]
    ours = _full_logits(load_model(checkpoints[kind]), ids)
    with torch.no_grad():
        ref = hf_model(checkpoints[kind])(torch.tensor([ids])).logits[0]
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", list(VARIANTS))
def test_greedy_tokens_match_transformers_batched(checkpoints, kind):
    prompts = random_prompts(LENGTHS, seed=3)
    llm = LLM(str(checkpoints[kind]), device="cpu", block_size=8)
    outs = llm.generate(prompts, GREEDY)
    hf = hf_model(checkpoints[kind])
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens), f"{kind}: prompt of {len(prompt)} tokens"
        assert out.finish_reason == "length"
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


def test_preset_matches_transformers_with_eos_rules():
    llm = LLM("tiny", device="cpu")
    prompts = ["Hello prefill and decode", "The cache", "ring attention is fast because"]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32))
    hf = hf_model(llm.model_dir)
    for prompt, out in zip(prompts, outs):
        ids = llm.tokenizer.encode(prompt).ids
        assert out.prompt_token_ids == ids and ids[0] == 0  # the tokenizer prepends <s>
        ref = hf_greedy(hf, ids, 32, min_new_tokens=0)
        if 1 in ref:  # HF stops after eos too, and keeps it
            ref = ref[: ref.index(1) + 1]
        assert out.token_ids == ref[: len(out.token_ids)] and len(out.token_ids) == len(ref)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_logits_close_to_float32(checkpoints, dtype):
    ids = random_prompts([30], seed=11)[0]
    ref = _full_logits(load_model(checkpoints["llama"]), ids)
    low = _full_logits(load_model(checkpoints["llama"], dtype=dtype), ids)
    assert low.dtype == torch.float32  # logits are always float32
    rel = (low - ref).norm() / ref.norm()
    assert rel < 3e-2, f"{dtype}: relative error {rel:.2e}"


def test_sharded_checkpoint_loads(tmp_path):
    directory = write_checkpoint("llama", tmp_path, seed=5, max_shard_size="100KB")
    assert (directory / "model.safetensors.index.json").is_file()
    ids = random_prompts([20], seed=1)[0]
    with torch.no_grad():
        ref = hf_model(directory)(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_full_logits(load_model(directory), ids), ref, rtol=1e-5, atol=1e-5)


def test_tp1_forward_runs_the_fused_add_rmsnorm_dispatch(checkpoints, monkeypatch):
    """TP = 1 takes the TP path: each residual add + RMSNorm (two per layer, the last being the final norm) goes
    through the kernel dispatch, and the logits still equal transformers'."""
    from splitserve.comm import fused_norm

    calls, dispatch = [], fused_norm.add_rmsnorm

    def counting(*args):
        calls.append(args[0].shape)
        return dispatch(*args)

    monkeypatch.setattr(fused_norm, "add_rmsnorm", counting)
    ids = random_prompts([20], seed=2)[0]
    model = load_model(checkpoints["qwen2"])
    ours = _full_logits(model, ids)
    assert calls == [(len(ids), model.cfg.hidden_size)] * (2 * model.cfg.num_layers)
    with torch.no_grad():
        ref = hf_model(checkpoints["qwen2"])(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
