"""TokenRing attention on a zigzag-sharded packed batch: K/V stay put, Q travels forward around the ring on one
process group while each block's (out, lse) goes straight back to the Q's owner on a second group, so both
directions carry traffic at once."""
from __future__ import annotations

import torch

from splitserve.comm.sp_common import (RingComm, ZigzagLayout, attend_blocks, empty_result, merge_blocks,
                                       pack_result, result_nbytes, unpack_result, zigzag_blocks)


def token_ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ZigzagLayout,
                         forward: RingComm, backward: RingComm, causal: bool = True,
                         scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """q [T, H, d], k/v [T, Hkv, d]: this rank's zigzag shard. Returns [T, H, d] in q's dtype.

    At step s this rank holds the Q of rank (rank − s) mod N. Under causal zigzag it computes all of that Q
    against its front K/V chunk when the owner's index is higher, else only the Q back chunk against all its K/V,
    so results going back are full or half size. A result sent at step s is merged by its owner after computing
    step s + 1, overlapping the return trip with compute.
    """
    rank, world = forward.rank, forward.size
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    heads, head_dim = q.shape[1], q.shape[2]
    out, lse = empty_result(q.shape[0], heads, head_dim, q.device)
    key_valid = None if causal else layout.valid(rank).to(q.device)
    kv_pos = layout.positions(rank).to(q.device) if window is not None else None
    q_held, spare = q.contiguous(), (torch.empty_like(q) if world > 1 else None)
    inbox = None  # (buffer, blocks) of the result on its way back to this rank
    for step in range(world):
        if step + 1 < world:
            forward.send_recv(q_held, spare, tag=step)
            forward.commit()
        owner = (rank - step) % world
        blocks = zigzag_blocks(layout, owner, rank, causal)
        q_pos = layout.positions(owner).to(q.device) if window is not None else None
        results = attend_blocks(q_held, k, v, blocks, scale, key_valid, window, q_pos, kv_pos)
        if step == 0:
            merge_blocks(out, lse, blocks, results)
        else:
            if inbox is not None:
                backward.wait()
                _merge_inbox(out, lse, inbox, q.dtype)
            holder = (rank + step) % world  # the rank computing this rank's Q in this step
            their_blocks = zigzag_blocks(layout, rank, holder, causal)
            rows = sum(b.rows for b in their_blocks)
            buffer = torch.empty(result_nbytes(rows, heads, head_dim, q.dtype), dtype=torch.uint8, device=q.device)
            outs, lses = zip(*results)
            backward.send(pack_result(torch.cat(outs), torch.cat(lses), q.dtype), owner, tag=step)
            backward.recv(buffer, holder, tag=step)
            backward.commit()
            inbox = (buffer, their_blocks)
        if step + 1 < world:
            forward.wait()
            q_held, spare = spare, q_held
    if inbox is not None:
        backward.wait()
        _merge_inbox(out, lse, inbox, q.dtype)
    return out.to(q.dtype)


def _merge_inbox(out, lse, inbox, dtype) -> None:
    buffer, blocks = inbox
    rows = sum(b.rows for b in blocks)
    block_out, block_lse = unpack_result(buffer, rows, out.shape[1], out.shape[2], dtype)
    sizes = [b.rows for b in blocks]
    merge_blocks(out, lse, blocks, zip(block_out.split(sizes), block_lse.split(sizes)))
