"""Named model specs: the project's own test models and well-known public checkpoints."""

from __future__ import annotations

from splitserve.placement.specs import ModelSpec


def _llama(name, layers, hidden, heads, kv_heads, ffn, vocab, positions, dtype="float16", head_dim=None):
    return ModelSpec(name=name, architecture="llama", num_layers=layers, hidden_size=hidden, num_heads=heads,
                     num_kv_heads=kv_heads, head_dim=head_dim or hidden // heads, intermediate_size=ffn,
                     vocab_size=vocab, max_positions=positions, dtype=dtype, gated_mlp=True)


def _opt(name, layers, hidden, heads, ffn):
    return ModelSpec(name=name, architecture="opt", num_layers=layers, hidden_size=hidden, num_heads=heads,
                     num_kv_heads=heads, head_dim=hidden // heads, intermediate_size=ffn, vocab_size=50272,
                     max_positions=2048, dtype="float16", gated_mlp=False)


_PRESETS = [
    # The project's own models run in float32 on CPU (the correctness contract), hence the dtype.
    _llama("tiny", 2, 64, 4, 2, 128, 512, 4096, dtype="float32", head_dim=16),
    _llama("small", 8, 512, 8, 2, 1408, 512, 4096, dtype="float32", head_dim=64),
    _llama("llama-2-7b", 32, 4096, 32, 32, 11008, 32000, 4096),
    _llama("llama-2-13b", 40, 5120, 40, 40, 13824, 32000, 4096),
    _llama("llama-3-8b", 32, 4096, 32, 8, 14336, 128256, 8192, dtype="bfloat16"),
    _llama("llama-3-70b", 80, 8192, 64, 8, 28672, 128256, 8192, dtype="bfloat16"),
    _opt("opt-13b", 40, 5120, 40, 20480),
    _opt("opt-66b", 64, 9216, 72, 36864),
    _opt("opt-175b", 96, 12288, 96, 49152),
    ModelSpec(name="mistral-7b", architecture="mistral", num_layers=32, hidden_size=4096, num_heads=32,
              num_kv_heads=8, head_dim=128, intermediate_size=14336, vocab_size=32000, max_positions=32768,
              dtype="bfloat16"),
    ModelSpec(name="qwen2-7b", architecture="qwen2", num_layers=28, hidden_size=3584, num_heads=28,
              num_kv_heads=4, head_dim=128, intermediate_size=18944, vocab_size=152064, max_positions=32768,
              dtype="bfloat16"),
]

MODEL_PRESETS: dict[str, ModelSpec] = {spec.name: spec for spec in _PRESETS}
