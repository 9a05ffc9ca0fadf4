"""Tiny random Hugging Face checkpoints of each supported architecture, written with `transformers`."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from splitserve.workers.presets import resolve_model

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1)

VARIANTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    # llama3 rope scaling and a head_dim that is not hidden / heads
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        head_dim=24, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64))),
    # a sliding window shorter than the test prompts
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=12, head_dim=16)),
    # qkv biases and tied embeddings
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    # one KV head: replicated when TP > 1
    "llama_mqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1)),
}

# Architectures the native model does not cover (served by the transformers backend): full configs, not BASE.
_HF_BASE = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=1024, bos_token_id=0, eos_token_id=1)
HF_VARIANTS = {
    # learned positions, pre-scaled queries (scaling=1.0 through the interface)
    "opt": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=128, word_embed_proj_dim=64, pad_token_id=1)),
    # fused qkv and gate_up projections, GQA
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(intermediate_size=128, num_key_value_heads=2, pad_token_id=2)),
    # partial rotary, parallel attention + MLP residual
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(intermediate_size=128, rotary_pct=0.5)),
    # q/k norms, head_dim != hidden / heads, a sliding window on the second layer only
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        intermediate_size=128, num_key_value_heads=2, head_dim=24, use_sliding_window=True, sliding_window=12,
        max_window_layers=1)),
    # scaled embeddings, one KV head
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(intermediate_size=128, num_key_value_heads=1, head_dim=16,
                                                      pad_token_id=2)),
    # Conv1D layers, tied embeddings (AutoTP cannot shard it: TP 1 only)
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_inner=128)),
}


def write_checkpoint(kind: str, directory: Path, seed: int = 0, max_shard_size: str | None = None, **overrides) -> Path:
    import transformers

    if kind in HF_VARIANTS:
        config_cls, model_cls, extra = HF_VARIANTS[kind]
        cfg = getattr(transformers, config_cls)(**{**_HF_BASE, **extra, **overrides})
    else:
        config_cls, model_cls, extra = VARIANTS[kind]
        cfg = getattr(transformers, config_cls)(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # larger than the default init so logits have clear winners
        for name, p in model.named_parameters():
            if "norm" not in name and ".ln_" not in name:
                p.normal_(0, 0.08)
            elif p.dim() == 1:
                p.uniform_(0.5, 1.5)
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    shutil.copy(resolve_model("tiny") / "tokenizer.json", directory / "tokenizer.json")
    return directory


def hf_model(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, min_new_tokens: int | None = None) -> list[int]:
    """Reference tokens: one prompt at a time, so no padding enters the comparison; eos is ignored unless
    `min_new_tokens` is given."""
    min_new_tokens = max_new_tokens if min_new_tokens is None else min_new_tokens
    with torch.no_grad():
        ids = torch.tensor([prompt_ids])
        # An explicit mask: otherwise a prompt token equal to the pad id would be masked out.
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=min_new_tokens, do_sample=False, pad_token_id=1)
    return out[0, len(prompt_ids):].tolist()


def random_prompts(lengths, vocab=512, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]
