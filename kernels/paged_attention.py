"""Attention of new tokens over a paged KV cache that already holds them: decode (one query per sequence) and
prefill against a cached prefix (causal within the new tokens, full over the prefix), with GQA/MQA and an
optional sliding window. `paged_attention_torch` is the twin of the Triton kernel: one sequence at a time,
float32 softmax, the reference semantics."""
from __future__ import annotations

import torch

from splitserve.kernels.backend import triton_module, use_triton


def check_paged(q, k_cache, v_cache, block_tables, context_lens, query_starts) -> None:
    """q [N, H, d]; caches [blocks, block_size, Hkv, d]; block_tables [B, width]; context_lens [B];
    query_starts [B + 1] (None: decode, one query per sequence)."""
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q: expected [tokens, heads, head_dim] and caches [blocks, block_size, kv_heads, "
                         f"head_dim], got {tuple(q.shape)} and {tuple(k_cache.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"v_cache: shape {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"dtype: q {q.dtype} and caches {k_cache.dtype}/{v_cache.dtype} must match")
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    if q.shape[2] != k_cache.shape[3] or heads % kv_heads:
        raise ValueError(f"heads: {heads} query heads of dim {q.shape[2]} cannot share {kv_heads} kv heads of "
                         f"dim {k_cache.shape[3]}")
    batch = context_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables: expected [{batch}, blocks], got {tuple(block_tables.shape)}")
    if query_starts is None and q.shape[0] != batch:
        raise ValueError(f"q: decode takes one query per sequence ({batch}), got {q.shape[0]}")
    if query_starts is not None and query_starts.shape != (batch + 1,):
        raise ValueError(f"query_starts: expected [{batch + 1}], got {tuple(query_starts.shape)}")


def paged_attention_torch(q, k_cache, v_cache, block_tables, context_lens, query_starts, max_query_len: int,
                          scale: float, window: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    """The twin. Sequence b's queries are rows query_starts[b]:query_starts[b + 1] of q (row b when
    query_starts is None) at the last positions of its context_lens[b] tokens. `max_query_len` and
    `num_splits` only shape the kernel's launch."""
    check_paged(q, k_cache, v_cache, block_tables, context_lens, query_starts)
    out = torch.empty_like(q)
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // kv_heads
    lens = context_lens.tolist()
    starts = list(range(len(lens) + 1)) if query_starts is None else query_starts.tolist()
    for b, ctx in enumerate(lens):
        rows = slice(starts[b], starts[b + 1])
        n = rows.stop - rows.start
        blocks = block_tables[b, : -(-ctx // block_size)].long()
        k, v = (c[blocks].reshape(-1, kv_heads, c.shape[3])[:ctx].float().repeat_interleave(group, 1)
                for c in (k_cache, v_cache))
        q_pos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        scores = torch.einsum("qhd,khd->hqk", q[rows].float(), k) * scale
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out[rows] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


def paged_attention(q, k_cache, v_cache, block_tables, context_lens, query_starts, max_query_len: int,
                    scale: float, window: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Triton where it runs (CUDA, or CPU under the interpreter), else the twin."""
    if use_triton(q):
        return triton_module("paged_attention_triton").paged_attention_triton(
            q, k_cache, v_cache, block_tables, context_lens, query_starts, max_query_len, scale, window, num_splits)
    return paged_attention_torch(q, k_cache, v_cache, block_tables, context_lens, query_starts, max_query_len,
                                 scale, window, num_splits)
