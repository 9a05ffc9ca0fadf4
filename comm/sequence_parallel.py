"""Sequence-parallel attention for prefill: one entry point over ring and TokenRing, the SP group description,
and the analytic communication cost of each variant that the placement planner uses.

Cost per attention layer (S = tokens of the packed batch after zigzag padding, T = S/N per rank, b = bytes per
element of q/k/v, lse always float32, all ranks together; a message is one isend):

    ring        bytes    (N−1)·S·2·Hkv·d·b                              messages N(N−1)   (K and V in one message)
    token_ring  bytes    (N−1)·S·H·d·b  +  f·(N−1)·S·H·(d·b + 4)       messages 2N(N−1)  (Q out, (out, lse) back)
                f = 3/4 causal (under zigzag half of the results cover only the Q back chunk), 1 non-causal
    all-gather  bytes    (N−1)·S·2·Hkv·d·b as a ring all-gather; no overlap with compute, full K/V held per rank

Per token and step, ring moves 2·Hkv·d·b while causal TokenRing moves H·d·b + ¾·H·(d·b + 4), so TokenRing moves
fewer bytes only when H/Hkv < 2·d·b / (1.75·d·b + 3) ≈ 8/7: plain multi-head attention. For any GQA ratio ≥ 2
(and always non-causal) ring moves fewer. On a full-duplex link TokenRing's busiest direction per step carries
T·H·(d·b + 4) against ring's T·2·Hkv·d·b, so its step is shorter only for MHA too; GQA 2 is roughly a tie.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from splitserve.comm.ring_attention import ring_attention
from splitserve.comm.sp_common import RingComm, ZigzagLayout
from splitserve.comm.token_ring import token_ring_attention

ALGORITHMS = ("ring", "token_ring")
_COST_ALGORITHMS = ALGORITHMS + ("all_gather",)


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


# ---------------------------------------------------------------- analytic communication cost


def _check_cost_args(algorithm, n, s) -> None:
    if algorithm not in _COST_ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {_COST_ALGORITHMS}, got {algorithm!r}")
    if n < 1 or s < 0 or s % (2 * n):
        raise ValueError(f"S: the padded batch ({s} tokens) must be a multiple of 2·N = {2 * n}")


def bytes_per_layer(algorithm: str, N: int, S: int, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int,
                    causal: bool = True) -> int:
    """Bytes all N ranks send together in one attention layer; S counts the batch after zigzag padding."""
    _check_cost_args(algorithm, N, S)
    if algorithm in ("ring", "all_gather"):
        return (N - 1) * S * 2 * kv_heads * head_dim * dtype_bytes
    q_bytes = (N - 1) * S * heads * head_dim * dtype_bytes
    result_rows = (N - 1) * S * 3 // 4 if causal else (N - 1) * S
    return q_bytes + result_rows * heads * (head_dim * dtype_bytes + 4)


def messages_per_layer(algorithm: str, N: int, S: int = 0, heads: int = 0, kv_heads: int = 0, head_dim: int = 0,
                       dtype_bytes: int = 0, causal: bool = True) -> int:
    """Point-to-point messages all ranks send in one layer (the shape arguments do not change the count)."""
    _check_cost_args(algorithm, N, S)
    return (2 if algorithm == "token_ring" else 1) * N * (N - 1)


def step_link_bytes(algorithm: str, N: int, S: int, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int,
                    causal: bool = True) -> int:
    """Bytes on the busiest one-way link in one ring step (what bounds a step's transfer time)."""
    _check_cost_args(algorithm, N, S)
    if N == 1:
        return 0
    t = S // N
    if algorithm != "token_ring":
        return t * 2 * kv_heads * head_dim * dtype_bytes
    # Some rank sends a full-size result in every step (rank 0 from step 1 on); Q goes the other way.
    return max(t * heads * head_dim * dtype_bytes, t * heads * (head_dim * dtype_bytes + 4))


def fewer_bytes(N: int, S: int, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int,
                causal: bool = True) -> str:
    """The SP algorithm that moves fewer bytes per layer for this shape (ring on a tie)."""
    args = (N, S, heads, kv_heads, head_dim, dtype_bytes, causal)
    return min(ALGORITHMS, key=lambda a: bytes_per_layer(a, *args))
