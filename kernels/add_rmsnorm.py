"""Fused residual add + RMSNorm: `(norm(x + residual), x + residual)` with the add in the input dtype and the
statistics in float32. `rmsnorm_torch` is the project's one RMSNorm reference (the Hugging Face Llama
arithmetic); the model's norm layer and every kernel twin compute through it."""
from __future__ import annotations

import torch

from splitserve.kernels.backend import triton_module, use_triton


def check_rows(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> None:
    if x.shape != residual.shape:
        raise ValueError(f"residual: shape {tuple(residual.shape)} differs from x {tuple(x.shape)}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight: shape {tuple(weight.shape)}, expected ({x.shape[-1]},)")
    if not x.dtype == residual.dtype == weight.dtype:
        raise ValueError(f"dtype: x {x.dtype}, residual {residual.dtype} and weight {weight.dtype} must match")


def rmsnorm_torch(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Statistics in float32 and the cast back before the weight multiply: Hugging Face LlamaRMSNorm's order,
    # so half-precision results round exactly as transformers' do.
    f = h.float()
    f = f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)
    return weight * f.to(h.dtype)


def add_rmsnorm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """The twin: the reference semantics, in plain torch."""
    check_rows(x, residual, weight)
    summed = x + residual
    return rmsnorm_torch(summed, weight, eps), summed


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """Returns (normed, summed); Triton where it runs (CUDA, or CPU under the interpreter), else the twin."""
    if use_triton(x):
        return triton_module("add_rmsnorm_triton").add_rmsnorm_triton(x, residual, weight, eps)
    return add_rmsnorm_torch(x, residual, weight, eps)
