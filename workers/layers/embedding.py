"""Vocab-parallel token embedding and LM head: each rank holds a contiguous range of the (padded) vocabulary."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.comm.tensor_parallel import TPGroup, all_gather_last_dim, all_reduce


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup, dtype=None, device=None):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.shard = -(-vocab_size // tp.size)  # ceil: the last rank's range is padded
        self.start = tp.rank * self.shard
        self.weight = nn.Parameter(torch.empty(self.shard, hidden, dtype=dtype, device=device), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str, shard_id=None) -> None:
        if tuple(loaded.shape) != (self.vocab_size, param.shape[1]):
            raise ValueError(
                f"weight '{name}': expected shape {(self.vocab_size, param.shape[1])}, checkpoint has {tuple(loaded.shape)}"
            )
        rows = max(0, min(self.shard, self.vocab_size - self.start))
        param.data.zero_()
        param.data[:rows].copy_(loaded[self.start : self.start + rows])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.shard)
        out = F.embedding(local.clamp(0, self.shard - 1), self.weight)
        out = out * inside.unsqueeze(-1).to(out.dtype)
        return all_reduce(out, self.tp)


class ParallelLMHead(VocabParallelEmbedding):
    """Column-parallel over the vocabulary; every rank gets the full float32 logits."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight).float()
        return all_gather_last_dim(logits, self.tp)[..., : self.vocab_size]
