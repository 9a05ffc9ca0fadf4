"""Assembles the engine of one role from typed options: sizes the KV cache, picks the block manager and the
engine class. The in-process `LLM` and every instance leader use this one builder, so they share one set of
defaults and one context-length rule.

Every engine offers the same small interface: `add(seq)`, `step() -> [EngineOutput]`, `abort(seq_id)`,
`has_unfinished()`, plus `check_fits(seq)`, `num_waiting`, `num_running` and `blocks`."""
from __future__ import annotations

import torch

from splitserve.workers.block_manager import BlockManager, cache_salt  # noqa: F401 (cache_salt re-exported)
from splitserve.workers.engine_config import EngineConfig
from splitserve.workers.decode_engine import PipelinedDecodeEngine
from splitserve.workers.engine_core import EngineCore
from splitserve.workers.kv_cache import cuda_budget, num_blocks_for_budget
from splitserve.workers.prefill_engine import PrefillEngine
from splitserve.workers.splitfuse_engine import SplitFuseEngine
from splitserve.workers.sp_block_manager import SPBlockManager

ROLES = ("prefill", "decode", "colocated")


def kv_cache_blocks(config: EngineConfig, model, device: torch.device, dtype: torch.dtype) -> int:
    """How many blocks this rank's cache holds: the byte budget on CPU, the free share of the GPU on CUDA."""
    budget = (cuda_budget(config.gpu_memory_fraction, device) if device.type == "cuda" else config.kv_cache_bytes)
    cfg = model.cfg
    layers = len(getattr(model, "layer_range", range(cfg.num_layers)))  # a pipeline stage caches its layers only
    return num_blocks_for_budget(budget, layers, config.block_size, model.num_kv_heads, cfg.head_dim, dtype)


def build_engine(role: str, runner, num_blocks: int, config: EngineConfig, context_len: int, sp: int = 1,
                 chunked_prefill: bool = True, cache_salt: str = "", pipeline=None):
    """prefill: prompts only (KV leaves for decode); decode: admits transferred sequences and recomputes preempted
    ones; colocated: both on one cache, as Dynamic SplitFuse (`chunked_prefill`) or alternating prompt batches and
    decode steps. `cache_salt` names what else the KV depends on (the model, its dtype) in the prefix cache's hashes.
    `pipeline`: (launch, collect, stages) of a decode instance's pipeline, whose decode then keeps up to
    `engine.decode_batches_in_flight` (default: one per stage) batches in flight."""
    if role not in ROLES:
        raise ValueError(f"role: must be one of {ROLES}, got {role!r}")
    # Each SP rank's cache is its own pool: the instance holds SP times the tokens (and caches no prefixes).
    blocks = (SPBlockManager(num_blocks, config.block_size, sp) if sp > 1
              else BlockManager(num_blocks, config.block_size, config.prefix_caching, cache_salt))
    seqs, tokens = config.max_num_seqs, config.max_num_batched_tokens
    if role == "prefill":
        return PrefillEngine(runner, blocks, tokens, seqs, context_len)
    if role == "colocated" and chunked_prefill:
        return SplitFuseEngine(runner, blocks, seqs, tokens, context_len)
    decode = None
    if role == "decode" and pipeline is not None:
        launch, collect, stages = pipeline
        depth = min(config.decode_batches_in_flight or stages, stages)
        if depth > 1:
            decode = PipelinedDecodeEngine(runner, blocks, seqs, context_len, launch, collect, depth)
    return EngineCore(runner, blocks, seqs, tokens, context_len, decode)
