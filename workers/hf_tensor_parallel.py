"""Shards a transformers model over an instance's TP group with DeepSpeed AutoTP (no kernel injection): q/k/v and
MLP up projections column-parallel, output and MLP down projections row-parallel with an all-reduce.

AutoTP's row-parallel all-reduce goes through torch.distributed: DeepSpeed's JIT-built CPU shared-memory
all-reduce op segfaults with two gloo ranks on one host, so it is never built."""
from __future__ import annotations

import copy
import importlib

import torch
import torch.distributed as dist
from torch import nn

from splitserve.comm.tensor_parallel import TPGroup


def _torch_all_reduce_only() -> None:
    """DeepSpeed's torch comm backend uses its shm op when one is built; without one its `inference_all_reduce`
    is torch.distributed.all_reduce on the given group."""
    # `import deepspeed.comm.torch` would bind torch itself: deepspeed.comm's namespace shadows the submodule.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def shard_with_autotp(hf: nn.Module, architecture: str, tp: TPGroup, dtype: torch.dtype) -> nn.Module:
    """This rank's shard of `hf`; each rank then holds num_kv_heads / tp consecutive KV heads (rank r the r-th
    slice), the layout the KV transfer plans assume."""
    import deepspeed
    import deepspeed.comm as ds_comm

    _torch_all_reduce_only()
    if not ds_comm.is_initialized():
        ds_comm.init_distributed(dist_backend=dist.get_backend(tp.group), auto_mpi_discovery=False)
    group = tp.group if tp.group is not None else dist.group.WORLD
    try:
        engine = deepspeed.init_inference(hf, tensor_parallel={"tp_size": tp.size, "tp_group": group}, dtype=dtype,
                                          replace_with_kernel_inject=False)
    except (AssertionError, ValueError, NotImplementedError) as e:
        raise ValueError(f"model: architecture {architecture}: DeepSpeed AutoTP cannot shard it over {tp.size} "
                         f"ranks: {e}") from None
    _localize_head_counts(engine.module, engine.module.config, tp.size)
    return engine.module


def _localize_head_counts(model: nn.Module, config, tp: int) -> None:
    """AutoTP divides head-count attributes of the modules it shards, but some attention code reads the counts from
    the shared config at forward time (Phi-3 splits its fused qkv at num_attention_heads · head_dim): those modules
    get a copy of the config with this rank's counts."""
    local = copy.copy(config)
    local.num_attention_heads = config.num_attention_heads // tp
    if getattr(config, "num_key_value_heads", None):
        local.num_key_value_heads = config.num_key_value_heads // tp
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and getattr(module, "config", None) is config:
            module.config = local
