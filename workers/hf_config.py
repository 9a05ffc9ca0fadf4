"""`ModelConfig` of an architecture the native model does not cover, read through transformers' own config class,
and the start-up refusals of what the transformers backend cannot serve (each naming the architecture and why)."""
from __future__ import annotations

from pathlib import Path

from splitserve.workers.config import DTYPES, SUPPORTED_ARCHITECTURES, ModelConfig
from splitserve.workers.engine_config import MODEL_BACKENDS
# transformers model types whose attention adds an ALiBi bias inside the module: the paged path has no bias term.
_ALIBI_MODEL_TYPES = ("bloom", "mpt")
# GPT-2-style layers (Conv1D with fused qkv) that AutoTP refuses to shard ("use kernel injection").
NO_AUTOTP_ARCHITECTURES = ("GPT2LMHeadModel",)


def architecture_of(raw: dict) -> str:
    archs = raw.get("architectures") or []
    return archs[0] if archs else str(raw.get("model_type"))


def resolve_backend(backend: str, model) -> str:
    """`native` or `transformers` for `model` (a `ModelConfig`, or an architecture name); `auto` is native for the
    Llama family, unless the checkpoint uses a feature the native model lacks (`ModelConfig.native_refusal`)."""
    if backend not in MODEL_BACKENDS:
        raise ValueError(f"engine.backend: must be one of {list(MODEL_BACKENDS)}, got {backend!r}")
    architecture = model if isinstance(model, str) else model.architecture
    refusal = None if isinstance(model, str) else model.native_refusal
    native = architecture in SUPPORTED_ARCHITECTURES and not refusal
    if backend == "native" and refusal:
        raise ValueError(f"engine.backend: native cannot run this {architecture} checkpoint ({refusal}); use backend "
                         "transformers (or auto)")
    if backend == "native" and not native:
        raise ValueError(f"engine.backend: native runs only {sorted(SUPPORTED_ARCHITECTURES)}; {architecture} "
                         "needs backend transformers (or auto)")
    if backend == "auto":
        return "native" if native else "transformers"
    return backend


def hf_config(model_dir: str | Path, architecture: str):
    """transformers' config object of the checkpoint, or a ValueError naming the architecture."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"model: architecture {architecture}: transformers cannot load it: {e}") from None


def unsupported_reason(config) -> str | None:
    """Why the paged attention path cannot run this model (None if it can), from its config alone."""
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not served (decoder-only language models only)"
    if getattr(config, "alibi", False) or config.model_type in _ALIBI_MODEL_TYPES:
        return "ALiBi position biases are not supported by the paged attention path"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention logit softcapping is not supported by the paged attention path"
    for name in ("logit_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"output logit scaling ({name}) is not supported"
    return None


def autotp_problem(cfg: ModelConfig, tp: int) -> str | None:
    """Why DeepSpeed AutoTP cannot shard this model over `tp` ranks the way the KV transfer plans expect (None if
    it can, and always at TP 1): every rank must hold heads / tp query heads and kv_heads / tp KV heads."""
    if tp == 1:
        return None
    arch = cfg.architecture
    if arch in NO_AUTOTP_ARCHITECTURES:
        return (f"{arch}: DeepSpeed AutoTP cannot shard GPT-2-style (Conv1D) layers (it asks for kernel injection, "
                "which has no paged KV cache); serve it with tp 1")
    if cfg.num_heads % tp or cfg.num_kv_heads % tp:
        return (f"{arch}: AutoTP would split {cfg.num_heads} attention heads and {cfg.num_kv_heads} KV heads "
                f"unevenly over {tp} ranks; use a TP degree that divides {cfg.num_kv_heads}")
    return None


def _first(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def parse_hf_config(model_dir: str | Path, raw: dict) -> ModelConfig:
    """The fields the engines need, from transformers' config (its attribute maps cover GPT-2's `n_head` and the
    like); eos ids come from `raw`, which already merges generation_config.json."""
    arch = architecture_of(raw)
    config = hf_config(model_dir, arch)
    reason = unsupported_reason(config)
    if reason:
        raise ValueError(f"model: architecture {arch}: {reason}")
    try:
        hidden, heads, layers, vocab = (config.hidden_size, config.num_attention_heads, config.num_hidden_layers,
                                        config.vocab_size)
    except AttributeError as e:  # e.g. a multimodal config whose language model sits in a sub-config
        raise ValueError(f"model: architecture {arch}: not a decoder-only language model config ({e})") from None
    eos = raw.get("eos_token_id", config.eos_token_id)
    window = getattr(config, "sliding_window", None)
    dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    return ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_first(config, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=_first(config, "num_key_value_heads", default=heads),
        head_dim=_first(config, "head_dim", default=hidden // heads),
        max_position_embeddings=_first(config, "max_position_embeddings", "n_positions", default=2048),
        rms_norm_eps=float(_first(config, "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", default=1e-5)),
        rope_theta=10000.0,  # the model's own rotary code runs; these fields serve the native model only
        rope_scaling=None,
        qkv_bias=False,
        o_proj_bias=False,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        sliding_window=window if isinstance(window, int) and not isinstance(window, bool) else None,
        bos_token_id=config.bos_token_id,
        eos_token_ids=() if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),),
        torch_dtype=dtype if dtype in DTYPES else "float32",
    )
