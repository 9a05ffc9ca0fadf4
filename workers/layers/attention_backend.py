"""How attention over the paged cache runs (`engine.attention_backend`): the Triton paged-attention kernel, or
the torch reference path of `attention.py`. `auto` is Triton on CUDA and torch on CPU. Prompts without a cached
prefix keep scaled_dot_product_attention (flash attention on GPUs) on either backend."""
from __future__ import annotations

import weakref

import torch
from torch import nn

from splitserve.kernels.backend import triton_module, use_triton
from splitserve.workers.engine_config import ATTENTION_BACKENDS as BACKENDS
from splitserve.workers.layers.attention import AttentionMetadata, PagedAttention


def resolve_backend(name: str, device: torch.device) -> str:
    """`triton` or `torch` for this device; forcing `triton` where it cannot run is refused."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend: must be one of {list(BACKENDS)}, got {name!r}")
    runs = use_triton(torch.empty(0, device=device))
    if name == "auto":
        return "triton" if device.type == "cuda" and runs else "torch"
    if name == "triton" and not runs:
        raise ValueError("attention_backend: 'triton' needs triton and a CUDA device, or TRITON_INTERPRET=1 "
                         f"on CPU (device {device})")
    return name


class QueryStarts:
    """The [B + 1] query offsets of the current forward, built once and shared by every layer."""

    def __init__(self):
        self._meta = None
        self._starts: torch.Tensor | None = None

    def __call__(self, meta: AttentionMetadata, device: torch.device) -> torch.Tensor:
        if self._meta is None or self._meta() is not meta:
            offsets = [0]
            for n in meta.query_lens:
                offsets.append(offsets[-1] + n)
            self._starts = torch.tensor(offsets, dtype=torch.long, device=device)
            self._meta = weakref.ref(meta)
        return self._starts


class TritonPagedAttention:
    """One layer's attention through the kernel, for every forward that reads the cache: decode steps, prompt
    chunks after a cached prefix, and mixed batches (every new token's K/V is in the cache by then)."""

    def __init__(self, attn: PagedAttention, starts: QueryStarts):
        self.scale, self.window = attn.scale, attn.sliding_window
        self.starts = starts
        self.kernel = triton_module("paged_attention_triton").paged_attention_triton

    def __call__(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if meta.is_decode:
            starts, longest = None, 1
        else:
            starts, longest = self.starts(meta, q.device), max(meta.query_lens)
        return self.kernel(q, kv_cache[0], kv_cache[1], meta.block_tables, meta.context_lens_t, starts, longest,
                           self.scale, self.window)


def configure_attention(model: nn.Module, backend: str, device: torch.device) -> str:
    """Points every PagedAttention of `model` at the chosen path; returns the backend that runs."""
    resolved = resolve_backend(backend, torch.device(device))
    starts = QueryStarts()
    for module in model.modules():
        if isinstance(module, PagedAttention):
            module.kernel = TritonPagedAttention(module, starts) if resolved == "triton" else None
    return resolved
