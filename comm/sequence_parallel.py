"""Sequence-parallel attention for prefill: one entry point over ring and TokenRing, and the SP group description.
What each variant sends is `placement.sp_cost` (re-exported here), the formula the planner charges too."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from splitserve.comm.ring_attention import ring_attention
from splitserve.comm.sp_common import RingComm, ZigzagLayout
from splitserve.comm.token_ring import token_ring_attention
# The cost formulas are public here, next to the algorithms they describe; their one definition is torch-free.
from splitserve.placement.sp_cost import (ALGORITHMS, bytes_per_layer, fewer_bytes,  # noqa: F401
                                          messages_per_layer, step_link_bytes)


@dataclass(frozen=True)
class SPGroup:
    """This rank's place in a sequence-parallel group. `group` carries ring K/V and TokenRing's Q; TokenRing sends
    results back on `reverse_group`, a second group over the same ranks so both directions move at once."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    reverse_group: dist.ProcessGroup | None = None

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"sp: rank {self.rank} is outside a group of size {self.size}")
        if self.size > 1 and self.group is None and not dist.is_initialized():
            raise ValueError("sp: size > 1 needs a process group (torch.distributed is not initialised)")

    @classmethod
    def create(cls, rank_sets: list[list[int]] | None = None) -> "SPGroup":
        """Build the two groups of every SP rank set and return this process's SPGroup.

        Collective over the default group: every process calls it with the same `rank_sets` (global ranks; e.g.
        [[0, 2], [1, 3]] for SP 2 × TP 2). None means one SP group over the whole world.
        """
        me = dist.get_rank()
        rank_sets = rank_sets or [list(range(dist.get_world_size()))]
        mine = None
        for ranks in rank_sets:
            forward, backward = dist.new_group(ranks), dist.new_group(ranks)
            if me in ranks:
                mine = cls(ranks.index(me), len(ranks), forward, backward)
        if mine is None:
            raise ValueError(f"rank_sets: global rank {me} is in none of {rank_sets}")
        return mine


SINGLE = SPGroup()


def sp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ZigzagLayout, sp: SPGroup,
                 algorithm: str = "ring", causal: bool = True, scale: float | None = None,
                 window: int | None = None) -> torch.Tensor:
    """Attention of this rank's zigzag shard of a packed batch against the whole batch's keys.

    q [T, H, d], k/v [T, Hkv, d] with T = layout.local_tokens, rows ordered as `layout.positions(sp.rank)`.
    window: causal sliding window (a query sees keys with position > its own − window). Returns [T, H, d] in q's
    dtype; rows of padding tokens hold unspecified values. Every rank of the group calls it with the same layout
    and arguments.
    """
    _check(q, k, v, layout, sp, algorithm)
    if window is not None and (not causal or window < 1):
        raise ValueError(f"window: needs causal=True and a positive size, got window={window}, causal={causal}")
    if algorithm == "ring":
        return ring_attention(q, k, v, layout, RingComm(sp.group, sp.rank, sp.size), causal, scale, window)
    return token_ring_attention(q, k, v, layout, RingComm(sp.group, sp.rank, sp.size),
                                RingComm(sp.reverse_group, sp.rank, sp.size), causal, scale, window)


def _check(q, k, v, layout, sp, algorithm) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {ALGORITHMS}, got {algorithm!r}")
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"q/k/v: expected q [T, H, d] and k, v [T, Hkv, d], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q/k: tokens and head_dim must match and H a multiple of Hkv, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q/k/v: dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if layout.world != sp.size:
        raise ValueError(f"layout: built for {layout.world} ranks but the SP group has {sp.size}")
    if q.shape[0] != layout.local_tokens:
        raise ValueError(f"q: layout gives {layout.local_tokens} local tokens, got {q.shape[0]}")
    if algorithm == "token_ring" and sp.size > 1 and sp.reverse_group is None:
        raise ValueError("sp: token_ring needs reverse_group, a second group for the results (SPGroup.create)")
