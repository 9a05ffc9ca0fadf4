"""Built-in models: `tiny` and `small` have random weights from a fixed seed, saved in Hugging Face format on first
use; real checkpoints fetched from the package registry are in `fetched_models`."""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

PRESETS = {
    # tiny: a few layers for tests; small: ~23M parameters with GQA for benchmarks.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64),
}
VOCAB_SIZE = 512
BOS, EOS = "<s>", "</s>"
_VERSION = "v1"
_SEED = 1234
_WORDS = (
    "the a of to and in is that for it on with as at by from this be are was or an not have which one all "
    "prefill decode cache token model request serve layer head batch block rank ring attention tensor "
    "parallel latency throughput cluster placement transfer stream prompt sample greedy split weave "
    "language large small fast slow first next time step queue memory bandwidth compute kernel"
).split()


def cache_dir() -> Path:
    return Path(os.environ.get("SPLITSERVE_CACHE", Path.home() / ".cache" / "splitserve"))


def _corpus(seed: int, lines: int = 400) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = rng.choices(_WORDS, k=rng.randint(4, 14))
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"]))
    out.append("0123456789 ()[]{}<>+-*/=_#@$%&'\"`~^|\\ éüñ 日本語 😀")
    return out


def build_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE tokenizer trained on a fixed corpus; <s> is prepended to every encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(_SEED), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def _config(name: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "torch_dtype": "float32",
        "initializer_range": 0.02, **PRESETS[name],
    }


def _weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h, inter, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d

    def normal(*shape):
        return torch.randn(*shape, generator=gen) * cfg["initializer_range"]

    w = {"model.embed_tokens.weight": normal(VOCAB_SIZE, h), "model.norm.weight": torch.ones(h),
         "lm_head.weight": normal(VOCAB_SIZE, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {p + "self_attn.q_proj.weight": normal(q, h), p + "self_attn.k_proj.weight": normal(kv, h),
              p + "self_attn.v_proj.weight": normal(kv, h), p + "self_attn.o_proj.weight": normal(h, q),
              p + "mlp.gate_proj.weight": normal(inter, h), p + "mlp.up_proj.weight": normal(inter, h),
              p + "mlp.down_proj.weight": normal(h, inter),
              p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h)}
    return w


def write_preset(name: str, directory: Path) -> None:
    cfg = _config(name)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(_weights(cfg, _SEED), str(directory / "model.safetensors"), metadata={"format": "pt"})
    build_tokenizer().save(str(directory / "tokenizer.json"))


def model_names() -> list[str]:
    from splitserve.workers.fetched_models import FETCHED_MODELS

    return sorted(PRESETS) + sorted(FETCHED_MODELS)


def resolve_model(model: str | os.PathLike) -> Path:
    """A preset name (random presets built once into the cache; real ones fetched from the package registry and
    converted once), a local checkpoint directory, or a GGUF file (converted once into the cache)."""
    from splitserve.workers.fetched_models import FETCHED_MODELS, resolve_fetched

    if str(model) in FETCHED_MODELS:
        return resolve_fetched(str(model), cache_dir())
    if str(model).endswith(".gguf"):
        from splitserve.workers.gguf_checkpoint import resolve_gguf

        return resolve_gguf(model, cache_dir())
    if str(model) in PRESETS:
        target = cache_dir() / f"{model}-{_VERSION}"
        if not (target / "model.safetensors").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{model}-"))
            write_preset(str(model), tmp)
            try:
                tmp.rename(target)
            except OSError:  # another process finished first; its copy is identical
                shutil.rmtree(tmp, ignore_errors=True)
        return target
    path = Path(model)
    if not path.is_dir():
        raise ValueError(f"model: {str(model)!r} is neither a preset ({model_names()}), a local checkpoint directory "
                         f"nor a .gguf file")
    return path
