"""Model specs: the shape numbers the planner needs, read from a Hugging Face `config.json` or a preset.

Hardware and cluster specs live in `hardware.py`; they are re-exported here so callers have one import.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
                  "fp8": "float8", "float8_e4m3fn": "float8", "float": "float32"}


def normalize_dtype(value: Any, field: str = "dtype") -> str:
    name = str(value).replace("torch.", "").lower()
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        raise ValueError(f"{field}: unknown dtype {value!r}; expected one of {sorted(DTYPE_BYTES)}")
    return name


def tp_split_problem(num_heads: int, num_kv_heads: int, intermediate_size: int, tp: int) -> str | None:
    """Why `tp` ranks cannot split a model's layers (None if they can): attention heads, MLP width and KV heads (split
    when there are at least `tp`, else replicated, which needs `tp` to be a multiple of them). The one rule of the
    planner and the launcher."""
    if num_heads % tp:
        return (f"{tp} ranks do not divide the model's {num_heads} attention heads ({num_kv_heads} KV heads); use a "
                f"TP degree that divides {num_heads}")
    if intermediate_size % tp:
        return f"{tp} ranks do not divide the model's MLP width ({intermediate_size})"
    kv = num_kv_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        return f"{tp} ranks can neither split nor evenly replicate the model's {kv} KV heads ({num_heads} heads)"
    return None


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer, reduced to what costs time and memory."""

    name: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_positions: int
    dtype: str = "float16"
    gated_mlp: bool = True  # SwiGLU-style MLPs have three matrices, GELU/ReLU MLPs two

    def __post_init__(self) -> None:
        for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                      "intermediate_size", "vocab_size", "max_positions"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{field}: must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads: {self.num_kv_heads} does not divide num_heads {self.num_heads}")
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    def layer_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attention = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        return attention + mlp

    def param_count(self) -> int:
        # Input and output embeddings counted separately: tied or not, the LM head matmul costs the same.
        return self.num_layers * self.layer_params() + 2 * self.vocab_size * self.hidden_size

    def weight_bytes(self) -> int:
        return self.param_count() * self.dtype_bytes

    def kv_bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def tp_problem(self, tp: int) -> str | None:
        """Why `tp` ranks cannot split this model's layers as the native model code does (None if they can); see
        `tp_split_problem`. The launcher refuses such a layout, so the planner never proposes it."""
        return tp_split_problem(self.num_heads, self.num_kv_heads, self.intermediate_size, tp)

    def pp_problem(self, pp: int) -> str | None:
        """Why `pp` pipeline stages cannot split this model's layers (None if they can): each stage needs a layer."""
        if pp > self.num_layers:
            return f"{pp} stages for {self.num_layers} layers"
        return None

    def with_dtype(self, dtype: str) -> "ModelSpec":
        return ModelSpec(**{**self.__dict__, "dtype": normalize_dtype(dtype)})


# model_type -> field names, so adding an architecture is one table row.
_LLAMA_FIELDS = dict(layers="num_hidden_layers", hidden="hidden_size", heads="num_attention_heads",
                     kv_heads="num_key_value_heads", ffn="intermediate_size", positions="max_position_embeddings")
_FAMILIES: dict[str, tuple[dict[str, str], bool]] = {
    "llama": (_LLAMA_FIELDS, True),
    "mistral": (_LLAMA_FIELDS, True),
    "mixtral": (_LLAMA_FIELDS, True),
    "qwen2": (_LLAMA_FIELDS, True),
    "qwen3": (_LLAMA_FIELDS, True),
    "gemma": (_LLAMA_FIELDS, True),
    "gemma2": (_LLAMA_FIELDS, True),
    "phi3": (_LLAMA_FIELDS, True),
    "olmo": (_LLAMA_FIELDS, True),
    "starcoder2": (_LLAMA_FIELDS, False),
    "opt": (dict(layers="num_hidden_layers", hidden="hidden_size", heads="num_attention_heads",
                 ffn="ffn_dim", positions="max_position_embeddings"), False),
    "gpt_neox": (dict(layers="num_hidden_layers", hidden="hidden_size", heads="num_attention_heads",
                      ffn="intermediate_size", positions="max_position_embeddings"), False),
    "gpt2": (dict(layers="n_layer", hidden="n_embd", heads="n_head", ffn="n_inner", positions="n_positions"), False),
    "gpt_bigcode": (dict(layers="n_layer", hidden="n_embd", heads="n_head", ffn="n_inner",
                         positions="n_positions"), False),
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_FAMILIES))


def _int_field(config: Mapping[str, Any], key: str) -> int:
    if key not in config or config[key] is None:
        raise ValueError(f"config.json: missing field {key!r}")
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"config.json: field {key!r} must be a positive integer, got {value!r}")
    return value


def model_from_hf_config(config: Mapping[str, Any], name: str | None = None, dtype: str | None = None) -> ModelSpec:
    """Build a ModelSpec from the parsed contents of a Hugging Face `config.json`."""
    if not isinstance(config, Mapping):
        raise ValueError(f"config.json: expected a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type not in _FAMILIES:
        raise ValueError(f"model_type: unsupported {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    fields, gated = _FAMILIES[model_type]
    hidden = _int_field(config, fields["hidden"])
    heads = _int_field(config, fields["heads"])
    kv_heads = heads
    if "kv_heads" in fields and config.get(fields["kv_heads"]) is not None:
        kv_heads = _int_field(config, fields["kv_heads"])
    if model_type == "gpt_bigcode" and config.get("multi_query", True):
        kv_heads = 1
    head_dim = config.get("head_dim") or hidden // heads
    if config.get("head_dim") is None and hidden % heads:
        raise ValueError(f"config.json: {fields['hidden']}={hidden} is not divisible by {fields['heads']}={heads}")
    ffn = config.get(fields["ffn"]) or 4 * hidden  # gpt2's n_inner=None means 4·hidden
    raw_dtype = dtype or config.get("torch_dtype") or config.get("dtype") or "float16"
    return ModelSpec(
        name=name or config.get("_name_or_path") or model_type,
        architecture=model_type,
        num_layers=_int_field(config, fields["layers"]),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        intermediate_size=int(ffn),
        vocab_size=_int_field(config, "vocab_size"),
        max_positions=_int_field(config, fields["positions"]),
        dtype=normalize_dtype(raw_dtype, "dtype"),
        gated_mlp=gated,
    )


def load_model(name_or_path: str, dtype: str | None = None) -> ModelSpec:
    """A preset name, a `config.json` path, or a checkpoint directory holding one."""
    from splitserve.placement.presets import MODEL_PRESETS

    if name_or_path in MODEL_PRESETS:
        spec = MODEL_PRESETS[name_or_path]
        return spec.with_dtype(dtype) if dtype else spec
    path = os.path.join(name_or_path, "config.json") if os.path.isdir(name_or_path) else name_or_path
    if not os.path.isfile(path):
        raise ValueError(f"model: {name_or_path!r} is neither a preset ({', '.join(sorted(MODEL_PRESETS))}) "
                         "nor a config.json path")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"model: {path} is not valid JSON ({exc})") from exc
    name = os.path.basename(os.path.dirname(os.path.abspath(path))) or None
    return model_from_hf_config(config, name=name, dtype=dtype)


from splitserve.placement.hardware import ClusterSpec, HardwareSpec, load_cluster  # noqa: E402  re-export
