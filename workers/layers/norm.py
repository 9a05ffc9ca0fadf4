"""RMSNorm as a layer: owns the weight and its loader; the arithmetic is the kernels' one torch reference."""
from __future__ import annotations

import torch
from torch import nn

from splitserve.kernels.add_rmsnorm import rmsnorm_torch


class RMSNorm(nn.Module):
    """Holds `weight` and `eps`. A norm that follows a residual add runs inside `comm.fused_norm` (the fused
    add + RMSNorm dispatch) with these same two values; `forward` serves only the first layer's input norm."""

    def __init__(self, hidden: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype, device=device), requires_grad=False)

    def weight_loader(self, param, loaded, name, shard_id=None):
        if param.shape != loaded.shape:
            raise ValueError(f"weight '{name}': expected shape {tuple(param.shape)}, checkpoint has {tuple(loaded.shape)}")
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm_torch(x, self.weight, self.eps)
