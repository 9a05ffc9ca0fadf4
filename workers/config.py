"""Model configuration read from a Hugging Face `config.json`, validated once at load time."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (`rope_scaling.rope_type == "llama3"`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    qkv_bias: bool
    o_proj_bias: bool
    tie_word_embeddings: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str
    # A Llama-family checkpoint with a feature the native model lacks: why (the transformers backend runs it).
    native_refusal: str | None = None

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V bytes per token over all layers at 4-byte elements; scale by dtype size / 4."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 4


class NativeUnsupported(ValueError):
    """A well-formed Llama-family config with a feature the native model does not implement."""


def _require(raw: dict, key: str, kind=int):
    if key not in raw or raw[key] is None:
        raise ValueError(f"config.json: missing required field '{key}'")
    value = raw[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"config.json: field '{key}' must be a positive integer, got {value!r}")
    if kind is float and (not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0):
        raise ValueError(f"config.json: field '{key}' must be a positive number, got {value!r}")
    return value


def is_native(raw: dict) -> bool:
    """Whether the native (Llama-family) model covers this config.json's architecture."""
    archs = raw.get("architectures") or []
    if archs:
        return any(arch in SUPPORTED_ARCHITECTURES for arch in archs)
    return raw.get("model_type") in SUPPORTED_ARCHITECTURES.values()


def _architecture(raw: dict) -> str:
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    by_type = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
    if not archs and raw.get("model_type") in by_type:
        return by_type[raw["model_type"]]
    found = archs or [raw.get("model_type")]
    raise ValueError(
        f"config.json: unsupported architecture {found}; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
    )


def _rope_scaling(raw: dict) -> RopeScaling | None:
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise NativeUnsupported(f"config.json: rope_scaling type '{kind}' is not supported (supported: llama3)")
    try:
        return RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ValueError(f"config.json: rope_scaling is missing field {e.args[0]!r}") from None


def _rope_theta(raw: dict) -> float:
    params = raw.get("rope_parameters") or {}
    theta = raw.get("rope_theta", params.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ValueError(f"config.json: field 'rope_theta' must be a positive number, got {theta!r}")
    return float(theta)


def _eos_ids(raw: dict) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _sliding_window(raw: dict, arch: str) -> int | None:
    window = raw.get("sliding_window")
    if arch == "Qwen2ForCausalLM" and not raw.get("use_sliding_window", False):
        return None
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"config.json: field 'sliding_window' must be a positive integer or null, got {window!r}")
    return window


def parse_config(raw: dict) -> ModelConfig:
    arch = _architecture(raw)
    hidden = _require(raw, "hidden_size")
    heads = _require(raw, "num_attention_heads")
    kv_heads = raw.get("num_key_value_heads") or heads
    head_dim = raw.get("head_dim") or hidden // heads
    if heads % kv_heads:
        raise ValueError(f"config.json: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
    if raw.get("hidden_act", "silu") != "silu":
        raise NativeUnsupported(f"config.json: hidden_act '{raw['hidden_act']}' is not supported (supported: silu)")
    if raw.get("mlp_bias"):
        raise NativeUnsupported("config.json: mlp_bias=true is not supported")
    dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    return ModelConfig(
        architecture=arch,
        vocab_size=_require(raw, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_require(raw, "intermediate_size"),
        num_layers=_require(raw, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=_rope_theta(raw),
        rope_scaling=_rope_scaling(raw),
        # Qwen2 always has q/k/v biases and none on o_proj; Llama's attention_bias covers all four.
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
        o_proj_bias=arch != "Qwen2ForCausalLM" and bool(raw.get("attention_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        sliding_window=_sliding_window(raw, arch),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw),
        torch_dtype=dtype if dtype in DTYPES else "float32",
    )


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"model: no config.json in {model_dir}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"model: {path} is not valid JSON: {e}") from None
    generation = Path(model_dir) / "generation_config.json"
    if generation.is_file():  # generation stops at its eos ids too (chat models end a turn with their own token)
        try:
            extra = _eos_ids(json.loads(generation.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"model: {generation} is not usable: {e}") from None
        raw = {**raw, "eos_token_id": list(dict.fromkeys([*_eos_ids(raw), *extra]))}
    from splitserve.workers.hf_config import parse_hf_config

    if not is_native(raw):  # any other decoder is described by transformers' config (the transformers backend)
        return parse_hf_config(model_dir, raw)
    try:
        return parse_config(raw)
    except NativeUnsupported as e:  # the checkpoint's own transformers class can still run it
        try:
            hf = parse_hf_config(model_dir, raw)
        except ValueError:
            raise e from None
        return dataclasses.replace(hf, native_refusal=str(e))
