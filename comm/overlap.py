"""TokenWeave-style overlap inside a tensor-parallel forward: the batch's tokens are split in two parts and
each part's all-reduce (+ residual add + RMSNorm) runs while the other part computes attention or MLP.

A split inside a sequence is allowed only when there is a paged KV cache: the second part then attends as a
continuation of the first, whose K/V the same layer has already written into the cache."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable

import torch

from splitserve.comm.fused_norm import allreduce_add_rmsnorm, allreduce_add_rmsnorm_async
from splitserve.comm.tensor_parallel import TPGroup

ALIGN = 16  # part sizes stay multiples of this where possible, so both parts' GEMMs keep full tiles


@dataclass(frozen=True)
class Part:
    rows: slice
    positions: torch.Tensor
    meta: object  # attention metadata restricted to these rows


@dataclass(frozen=True)
class Stage:
    """One row-parallel block: `compute(normed rows, part)` -> this rank's partial output; then the reduction
    with the residual add + RMSNorm of `weight` (the next norm) and `eps`."""

    compute: Callable[[torch.Tensor, Part], torch.Tensor]
    weight: torch.Tensor
    eps: float


def choose_split(query_lens: list[int], can_cut_sequences: bool, align: int = ALIGN) -> int | None:
    """Token index splitting the batch into two near-equal parts, or None. Prefers a sequence boundary
    within 1/8 of the middle (aligned if one is); otherwise cuts a sequence at an aligned index."""
    total = sum(query_lens)
    half = total / 2
    bounds = list(accumulate(query_lens))[:-1]
    near = [b for b in bounds if abs(b - half) <= total / 8]
    for step in (align, align // 2, 1):  # the best-aligned boundary near the middle
        aligned = [b for b in near if b % step == 0]
        if aligned:
            return min(aligned, key=lambda b: abs(b - half))
    if can_cut_sequences:
        cut = int(round(half / align)) * align or align
        return cut if 0 < cut < total else None
    return min(bounds, key=lambda b: abs(b - half)) if bounds else None


def _sequence_blocks(slots: torch.Tensor, start: int, length: int, block_size: int) -> torch.Tensor:
    """A fresh sequence's block table, read off its slots: token j sits in block slot[j] // block_size."""
    return slots[start : start + length : block_size] // block_size


def _restrict(meta, lo: int, hi: int, block_size: int):
    """`meta` for tokens [lo, hi): sequences cut at `hi` lose their later tokens from the context."""
    query_lens, context_lens, rows = [], [], []
    start = 0
    for i, (q, ctx) in enumerate(zip(meta.query_lens, meta.context_lens)):
        end = start + q
        n = min(end, hi) - max(start, lo)
        if n > 0:
            query_lens.append(n)
            context_lens.append(ctx - (end - min(end, hi)))
            rows.append(i)
        start = end
    fresh = query_lens == context_lens
    tables = None
    if not fresh:
        if meta.block_tables is not None:
            tables = meta.block_tables[rows]
        else:  # the whole batch was fresh: derive tables from the slots
            starts = [0, *accumulate(meta.query_lens)]
            blocks = [_sequence_blocks(meta.slot_mapping, starts[i], meta.query_lens[i], block_size) for i in rows]
            tables = torch.nn.utils.rnn.pad_sequence(blocks, batch_first=True)
    device = meta.slot_mapping.device
    return dataclasses.replace(
        meta, slot_mapping=meta.slot_mapping[lo:hi], query_lens=query_lens, context_lens=context_lens,
        block_tables=tables,
        context_lens_t=None if fresh else torch.tensor(context_lens, dtype=torch.long, device=device))


def restrict_rows(meta, lo: int, hi: int, block_size: int):
    """Attention metadata for token rows [lo, hi) of a batch (a pipeline micro-batch, cut at sequence boundaries)."""
    return _restrict(meta, lo, hi, block_size)


def plan_parts(positions: torch.Tensor, meta, min_tokens: int | None, block_size: int | None) -> list[Part]:
    """One part (no overlap) below `min_tokens`, else two; `block_size` is None without a paged KV cache."""
    total = positions.shape[0]
    whole = [Part(slice(0, total), positions, meta)]
    if min_tokens is None or total < min_tokens:
        return whole
    cut = choose_split(meta.query_lens, can_cut_sequences=block_size is not None)
    if cut is None:
        return whole
    first, second = _restrict(meta, 0, cut, block_size), _restrict(meta, cut, total, block_size)
    if getattr(first, "on_kv_written", None) is not None:  # a layer's cache is complete only after the second part
        first = dataclasses.replace(first, on_kv_written=None)
    return [Part(slice(0, cut), positions[:cut], first), Part(slice(cut, total), positions[cut:], second)]


def run_stages(stages: list[Stage], hidden: torch.Tensor, residual: torch.Tensor, parts: list[Part],
               tp: TPGroup, method: str, with_residual: bool = False):
    """Runs the stages over the parts; with two parts, part i's reduction of stage s is in flight while the
    other part computes, and is waited for only just before part i computes stage s + 1. Returns the last
    normed output, and with `with_residual` (a pipeline stage hands the residual stream on) (normed, residual)."""
    if len(parts) == 1:
        for st in stages:
            hidden, residual = allreduce_add_rmsnorm(st.compute(hidden, parts[0]), residual, st.weight, st.eps,
                                                     tp, method)
        return (hidden, residual) if with_residual else hidden
    hs = [hidden[p.rows] for p in parts]
    rs = [residual[p.rows] for p in parts]
    pending = [None] * len(parts)
    for st in stages:
        for i, part in enumerate(parts):
            if pending[i] is not None:
                hs[i], rs[i] = pending[i].wait()
            pending[i] = allreduce_add_rmsnorm_async(st.compute(hs[i], part), rs[i], st.weight, st.eps, tp, method)
    outs = [p.wait() for p in pending]
    hidden = torch.cat([o[0] for o in outs])
    return (hidden, torch.cat([o[1] for o in outs])) if with_residual else hidden
