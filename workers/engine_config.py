"""Typed options of one engine and of its KV transfers, with one set of defaults, validated once at the edge.
The cluster configuration embeds them; the in-process `LLM` builds them from its keyword arguments. No torch."""
from __future__ import annotations

import math
from dataclasses import dataclass

TRANSPORTS = ("p2p", "shm")
TRANSFER_MODES = ("layerwise", "after_prefill")
# Kept free of torch here; a test checks it equals splitserve.comm.fused_norm.METHODS.
TP_NORM_METHODS = ("reference", "rs_ag", "symmetric", "symmetric_oneshot", "symmetric_rs", "auto")
# native: the hand-written Llama family; transformers: the checkpoint's own transformers class on our paged cache
# (sharded by DeepSpeed AutoTP); auto: native for the Llama family, transformers otherwise.
MODEL_BACKENDS = ("auto", "native", "transformers")
# How attention over the paged cache runs: auto is the Triton kernel on CUDA and torch on CPU
# (see workers/layers/attention_backend.py).
ATTENTION_BACKENDS = ("auto", "triton", "torch")


def _where(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def positive_int(path: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config: '{path}' must be an integer >= {minimum}, got {value!r}")
    return value


def positive_float(path: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"config: '{path}' must be a positive number, got {value!r}")
    return float(value)


def choice(path: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"config: '{path}' must be one of {list(options)}, got {value!r}")
    return value


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_bytes: int = 64 << 20  # per rank, on CPU
    gpu_memory_fraction: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    tp_norm_method: str = "reference"  # how TP all-reduce + RMSNorm run (see comm/fused_norm.py)
    overlap_min_tokens: int | None = None  # split forwards of at least this many tokens to overlap TP comm
    prefix_caching: bool = True  # reuse the KV of cached full blocks of earlier requests (see block_manager.py)
    backend: str = "auto"  # model backend, one of MODEL_BACKENDS
    attention_backend: str = "auto"  # one of ATTENTION_BACKENDS
    # A decode instance with pipeline stages keeps this many batches in flight, one per stage at most
    # (DistServe's inter-op decode); None: as many as stages. 1: every step runs through all stages alone.
    decode_batches_in_flight: int | None = None

    def validate(self, path: str = "") -> "EngineConfig":
        positive_int(_where(path, "block_size"), self.block_size)
        if not isinstance(self.prefix_caching, bool):
            raise ValueError(f"config: '{_where(path, 'prefix_caching')}' must be true or false, "
                             f"got {self.prefix_caching!r}")
        choice(_where(path, "tp_norm_method"), self.tp_norm_method, TP_NORM_METHODS)
        choice(_where(path, "backend"), self.backend, MODEL_BACKENDS)
        choice(_where(path, "attention_backend"), self.attention_backend, ATTENTION_BACKENDS)
        if self.overlap_min_tokens is not None:
            positive_int(_where(path, "overlap_min_tokens"), self.overlap_min_tokens, 2)
        if self.decode_batches_in_flight is not None:
            positive_int(_where(path, "decode_batches_in_flight"), self.decode_batches_in_flight)
        positive_int(_where(path, "kv_cache_bytes"), self.kv_cache_bytes)
        positive_float(_where(path, "gpu_memory_fraction"), self.gpu_memory_fraction)
        if self.gpu_memory_fraction > 1:
            raise ValueError(f"config: '{_where(path, 'gpu_memory_fraction')}' must be <= 1, "
                             f"got {self.gpu_memory_fraction}")
        positive_int(_where(path, "max_num_seqs"), self.max_num_seqs)
        positive_int(_where(path, "max_num_batched_tokens"), self.max_num_batched_tokens)
        if self.max_model_len is not None:
            positive_int(_where(path, "max_model_len"), self.max_model_len)
        return self

    def context_len(self, max_position_embeddings: int) -> int:
        """The longest sequence (prompt + output) an engine accepts: the one context-length rule."""
        if self.max_model_len is None:
            return max_position_embeddings
        if self.max_model_len > max_position_embeddings:
            raise ValueError(f"config: 'max_model_len' ({self.max_model_len}) exceeds the model's "
                             f"max_position_embeddings ({max_position_embeddings})")
        return self.max_model_len


@dataclass(frozen=True)
class TransferConfig:
    transport: str = "p2p"  # p2p: gloo/NCCL send/recv over links; shm: same-host shared memory
    mode: str = "layerwise"  # layerwise: push layer l while layer l+1 computes; after_prefill: push at the end
    timeout_s: float = 30.0
    retries: int = 1

    def validate(self, path: str = "") -> "TransferConfig":
        choice(_where(path, "transport"), self.transport, TRANSPORTS)
        choice(_where(path, "mode"), self.mode, TRANSFER_MODES)
        positive_float(_where(path, "timeout_s"), self.timeout_s)
        positive_int(_where(path, "retries"), self.retries, 0)
        return self
