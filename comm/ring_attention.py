"""Ring attention on a zigzag-sharded packed batch: K/V rotate around the SP ring, each step's block attention runs
while the next K/V are in flight, and partial results are merged in float32."""
from __future__ import annotations

import torch

from splitserve.comm.sp_common import RingComm, ZigzagLayout, attend_blocks, empty_result, merge_blocks, zigzag_blocks


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ZigzagLayout, comm: RingComm,
                   causal: bool = True, scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """q [T, H, d], k/v [T, Hkv, d]: this rank's zigzag shard. Returns [T, H, d] in q's dtype.

    Each of the N−1 steps sends the K/V it holds to the next rank as one message (K and V stacked) and receives
    the previous rank's; step s attends to the K/V of rank (rank − s) mod N.
    """
    rank, world = comm.rank, comm.size
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = empty_result(q.shape[0], q.shape[1], q.shape[2], q.device)
    q_pos = layout.positions(rank).to(q.device) if window is not None else None
    kv = torch.stack([k, v])
    spare = torch.empty_like(kv) if world > 1 else None
    for step in range(world):
        if step + 1 < world:
            comm.send_recv(kv, spare)
            comm.commit()
        source = (rank - step) % world
        # Padding keys follow every real query of their prompt, so only non-causal attention must mask them.
        key_valid = None if causal else layout.valid(source).to(q.device)
        blocks = zigzag_blocks(layout, rank, source, causal)
        kv_pos = layout.positions(source).to(q.device) if window is not None else None
        results = attend_blocks(q, kv[0], kv[1], blocks, scale, key_valid, window, q_pos, kv_pos)
        merge_blocks(out, lse, blocks, results)
        if step + 1 < world:
            comm.wait()
            kv, spare = spare, kv
    return out.to(q.dtype)
