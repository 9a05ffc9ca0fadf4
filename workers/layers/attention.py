"""Attention over a paged KV cache: writes new K/V into their slots, then attends (torch reference paths)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.comm.sequence_parallel import sp_attention

if TYPE_CHECKING:
    from splitserve.workers.sp_prefill import SPContext


def group_by_length(lengths: list[int], ratio: float = 2.0, max_groups: int = 4) -> list[list[int]]:
    """Indices grouped longest first; a new group starts when a length is below 1/ratio of the current group's
    longest (at most max_groups), so padding to a group's longest wastes under half of it while each group adds
    only one more gather + attention call."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups = [[order[0]]]
    top = lengths[order[0]]
    for i in order[1:]:
        if len(groups) < max_groups and lengths[i] * ratio < top:
            groups.append([i])
            top = lengths[i]
        else:
            groups[-1].append(i)
    return groups


@dataclass
class AttentionMetadata:
    """Where each new token's K/V goes and what each sequence attends to; built once per forward."""

    slot_mapping: torch.Tensor  # [num_tokens] flat slot of every new token
    query_lens: list[int]  # new tokens per sequence (tokens are packed sequence after sequence)
    context_lens: list[int]  # tokens each sequence attends to, new ones included
    block_tables: torch.Tensor | None  # [num_seqs, max_blocks], padded with 0
    context_lens_t: torch.Tensor | None = None  # context_lens on the device, for the batched decode path
    on_kv_written: Callable[[torch.Tensor], None] | None = None  # called with each layer's cache once written
    sp: SPContext | None = None  # set when this rank holds a zigzag shard of whole prompts (SP prefill)
    _decode_groups: list | None = field(default=None, repr=False)  # built by the first layer, reused by the rest

    def decode_groups(self, block_size: int) -> list[tuple[torch.Tensor, int]]:
        """Decode rows grouped by context length, each group with the blocks its longest context needs: a batched
        decode pads every row to its group's longest context, not the batch's (see `group_by_length`)."""
        if self._decode_groups is None:
            device = self.block_tables.device
            self._decode_groups = [
                (torch.tensor(rows, device=device), -(-max(self.context_lens[i] for i in rows) // block_size))
                for rows in group_by_length(self.context_lens)]
        return self._decode_groups

    @property
    def is_fresh_prefill(self) -> bool:
        """No sequence has cached tokens: attention needs only this forward's K/V."""
        return self.query_lens == self.context_lens

    @property
    def is_decode(self) -> bool:
        return all(q == 1 for q in self.query_lens) and self.block_tables is not None


def _window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """True where a query may see a key: causal, and within the sliding window if there is one."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Copies whole blocks (contiguous rows) in one index_select; several times faster than advanced indexing."""
    return cache.view(cache.shape[0], -1).index_select(0, blocks.reshape(-1))


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window
        self.kernel = None  # the Triton path for reads of the cache, when engine.attention_backend picks it

    def forward(self, q, k, v, kv_cache: torch.Tensor | None, meta: AttentionMetadata) -> torch.Tensor:
        """q: [N, H, d], k/v: [N, Hkv, d]; kv_cache: [2, blocks, block_size, Hkv, d] or None. Returns [N, H*d]."""
        if meta.sp is not None:
            return self._sequence_parallel(q, k, v, kv_cache, meta)
        if kv_cache is not None:
            self._store(k, v, kv_cache, meta.slot_mapping)
            if meta.on_kv_written is not None:
                meta.on_kv_written(kv_cache)
        if meta.is_fresh_prefill or kv_cache is None:
            out = self._prefill(q, k, v, meta)
        elif self.kernel is not None:
            out = self.kernel(q, kv_cache, meta)
        elif meta.is_decode:
            out = self._decode_batch(q, kv_cache, meta)
        else:
            out = self._mixed(q, k, v, kv_cache, meta)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _sequence_parallel(self, q, k, v, kv_cache, meta):
        """This rank's zigzag shard against the whole prompts (ring / TokenRing); only real tokens are cached."""
        ctx = meta.sp
        if kv_cache is not None:
            self._store(k.index_select(0, ctx.rows), v.index_select(0, ctx.rows), kv_cache, meta.slot_mapping)
            if meta.on_kv_written is not None:
                meta.on_kv_written(kv_cache)
        out = sp_attention(q, k, v, ctx.layout, ctx.group, ctx.algorithm, causal=True, scale=self.scale,
                           window=self.sliding_window)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    @staticmethod
    def _store(k, v, kv_cache, slots):
        kv_cache[0].view(-1, *k.shape[1:]).index_copy_(0, slots, k)
        kv_cache[1].view(-1, *v.shape[1:]).index_copy_(0, slots, v)

    def _attend(self, q, k, v, mask):
        """One sequence: q [L, H, d], k/v [T, Hkv, d]; mask [L, T] bool or None for plain causal."""
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.squeeze(0).transpose(0, 1)

    def _prefill_one(self, q, k, v):
        n = q.shape[0]
        mask = None
        if self.sliding_window is not None and n > self.sliding_window:
            pos = torch.arange(n, device=q.device)
            mask = _window_mask(pos, pos, self.sliding_window)
        return self._attend(q, k, v, mask)

    def _prefill(self, q, k, v, meta):
        outs, start = [], 0
        for n in meta.query_lens:
            outs.append(self._prefill_one(q[start : start + n], k[start : start + n], v[start : start + n]))
            start += n
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _gather(self, kv_cache, block_table, length):
        block_size = kv_cache.shape[2]
        blocks = block_table[: -(-length // block_size)]
        k, v = (_gather_blocks(kv_cache[i], blocks).view(-1, self.num_kv_heads, self.head_dim)[:length] for i in (0, 1))
        return k, v

    def _mixed(self, q, k, v, kv_cache, meta):
        """Decode rows, fresh prompts and prompt chunks in one forward (chunked prefill): the decode rows are
        batched; a fresh prompt attends to its own K/V; a chunk gathers its cached prefix from the blocks."""
        out = torch.empty_like(q)
        starts, decode = [], []
        start = 0
        for i, (n, ctx) in enumerate(zip(meta.query_lens, meta.context_lens)):
            starts.append(start)
            if n == 1 and ctx > 1:
                decode.append(i)
            elif n == ctx:
                out[start : start + n] = self._prefill_one(q[start : start + n], k[start : start + n], v[start : start + n])
            else:
                kk, vv = self._gather(kv_cache, meta.block_tables[i], ctx)
                q_pos = torch.arange(ctx - n, ctx, device=q.device)
                mask = _window_mask(q_pos, torch.arange(ctx, device=q.device), self.sliding_window)
                out[start : start + n] = self._attend(q[start : start + n], kk, vv, mask)
            start += n
        if decode:
            idx = torch.tensor(decode, device=q.device)
            rows = torch.tensor([starts[i] for i in decode], device=q.device)
            out[rows] = self._decode(q[rows], kv_cache, meta.block_tables[idx], meta.context_lens_t[idx])
        return out

    def _decode_batch(self, q, kv_cache, meta):
        groups = meta.decode_groups(kv_cache.shape[2])
        if len(groups) == 1:
            return self._decode(q, kv_cache, meta.block_tables[:, :groups[0][1]], meta.context_lens_t)
        out = torch.empty_like(q)
        for rows, blocks in groups:
            out[rows] = self._decode(q[rows], kv_cache, meta.block_tables[rows, :blocks], meta.context_lens_t[rows])
        return out

    def _decode(self, q, kv_cache, bt, context_lens):
        """One new token per sequence: gather all contexts at once and attend in one batched call."""
        batch, max_blocks = bt.shape
        block_size = kv_cache.shape[2]
        k, v = (_gather_blocks(kv_cache[i], bt).view(batch, max_blocks * block_size, self.num_kv_heads, self.head_dim)
                for i in (0, 1))
        key_pos = torch.arange(max_blocks * block_size, device=q.device)
        lens = context_lens[:, None]
        mask = key_pos[None, :] < lens
        if self.sliding_window is not None:
            mask &= key_pos[None, :] >= lens - self.sliding_window
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [B, H, 1, d]
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask[:, None, None, :],
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.squeeze(2)
