"""Tensor-parallel linear layers; each owns a weight loader that cuts its slice of the full checkpoint tensor."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.comm.kv_plan import local_kv_heads
from splitserve.comm.tensor_parallel import TPGroup, all_reduce


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"tp: {what} ({total}) is not divisible by the tensor-parallel size ({parts})")
    return total // parts


def _copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"weight '{name}': expected shape {tuple(param.shape)}, checkpoint has {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def _check_full(loaded: torch.Tensor, shape: tuple, name: str) -> None:
    if tuple(loaded.shape) != tuple(shape):
        raise ValueError(f"weight '{name}': expected shape {tuple(shape)}, checkpoint has {tuple(loaded.shape)}")


class _ParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPGroup, dtype, device):
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )


class ColumnParallelLinear(_ParallelLinear):
    """Output features split across ranks; no communication in forward."""

    def __init__(self, in_features, out_features, bias, tp: TPGroup, dtype=None, device=None):
        self.full_out = out_features
        super().__init__(in_features, _divide(out_features, tp.size, "output features"), bias, tp, dtype, device)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id=None) -> None:
        _check_full(loaded, (self.full_out, *param.shape[1:]), name)
        size = param.shape[0]
        _copy_checked(param, loaded.narrow(0, self.tp.rank * size, size), name)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input fused into one matmul (gate and up)."""

    def __init__(self, in_features, out_sizes: list[int], bias, tp: TPGroup, dtype=None, device=None):
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias, tp, dtype, device)

    def weight_loader(self, param, loaded, name, shard_id=None):
        full = self.out_sizes[shard_id]
        _check_full(loaded, (full, *param.shape[1:]), name)
        size = full // self.tp.size
        offset = sum(self.out_sizes[:shard_id]) // self.tp.size
        _copy_checked(param.narrow(0, offset, size), loaded.narrow(0, self.tp.rank * size, size), name)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q, k, v projection; q heads split across ranks, KV heads split or replicated when TP > kv heads."""

    def __init__(self, hidden, head_dim, num_heads, num_kv_heads, bias, tp: TPGroup, dtype=None, device=None):
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp.size, "num_attention_heads")
        # The KV transfer plans route heads by the same rule, so a rank's cache holds what the plans expect.
        self.kv_head_start, self.num_kv_heads = local_kv_heads(num_kv_heads, tp.size, tp.rank)
        self.full_sizes = {"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim}
        local = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        nn.Module.__init__(self)
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(local, hidden, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(local, dtype=dtype, device=device), requires_grad=False) if bias else None

    @property
    def split_sizes(self) -> list[int]:
        d = self.head_dim
        return [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d]

    def weight_loader(self, param, loaded, name, shard_id=None):
        _check_full(loaded, (self.full_sizes[shard_id], *param.shape[1:]), name)
        q, kv = self.split_sizes[0], self.split_sizes[1]
        if shard_id == "q":
            dst, src_start = param.narrow(0, 0, q), self.tp.rank * q
        else:
            dst_offset = q if shard_id == "k" else q + kv
            dst, src_start = param.narrow(0, dst_offset, kv), self.kv_head_start * self.head_dim
        _copy_checked(dst, loaded.narrow(0, src_start, dst.shape[0]), name)


class RowParallelLinear(_ParallelLinear):
    """Input features split across ranks; forward all-reduces the partial outputs, then adds the bias once.
    `reduce=False` returns this rank's partial (bias on rank 0 only) for a caller that fuses the reduction."""

    def __init__(self, in_features, out_features, bias, tp: TPGroup, dtype=None, device=None):
        self.full_in = in_features
        super().__init__(_divide(in_features, tp.size, "input features"), out_features, bias, tp, dtype, device)

    def weight_loader(self, param, loaded, name, shard_id=None):
        if param.dim() == 1:  # the bias is not sharded
            _copy_checked(param, loaded, name)
            return
        _check_full(loaded, (param.shape[0], self.full_in), name)
        size = param.shape[1]
        _copy_checked(param, loaded.narrow(1, self.tp.rank * size, size), name)

    def forward(self, x, reduce: bool = True):
        if not reduce:
            return F.linear(x, self.weight, self.bias if self.tp.rank == 0 else None)
        y = all_reduce(F.linear(x, self.weight), self.tp)
        return y if self.bias is None else y + self.bias
