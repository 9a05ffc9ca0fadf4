"""Pieces every sequence-parallel attention variant shares: the (out, lse) merge, block attention, the ring
communication object and the zigzag layout of a packed batch across the SP ranks."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist
import torch.nn.functional as F

from splitserve.placement.sp_cost import result_bytes

NEG_INF = float("-inf")
# Scores of one q tile against its keys are materialised in float32; this bounds that tile (elements).
_TILE_ELEMENTS = 1 << 24


# ---------------------------------------------------------------- merge of partial results


def merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor):
    """Combine two softmax-normalised partial attentions over disjoint key sets.

    out/block_out [T, H, d], lse/block_lse [T, H]; returns float32 (out, lse). A row with lse = -inf saw no key
    (its out must be finite, normally 0) and contributes nothing; two such rows stay (out, -inf) without NaN.
    """
    out, lse = out.float(), lse.float()
    block_out, block_lse = block_out.float(), block_lse.float()
    diff = block_lse - lse
    diff = torch.where(torch.isnan(diff), NEG_INF, diff)  # both empty: -inf - -inf
    # sigmoid(diff) is the share of the combined softmax mass that the block holds.
    new_out = out - torch.sigmoid(diff).unsqueeze(-1) * (out - block_out)
    # logaddexp(lse, block_lse) written around the larger term, so an empty side (-inf) gives no NaN.
    new_lse = torch.maximum(lse, block_lse) - F.logsigmoid(diff.abs())
    return new_out, new_lse


def empty_result(rows: int, heads: int, head_dim: int, device=None):
    """The identity of `merge`: zero output, lse = -inf (no keys seen yet)."""
    out = torch.zeros(rows, heads, head_dim, dtype=torch.float32, device=device)
    return out, torch.full((rows, heads), NEG_INF, dtype=torch.float32, device=device)


# ---------------------------------------------------------------- block attention


def block_attention(q, k, v, scale: float, causal: bool = False, q_offset: int = 0, key_valid=None,
                    window: int | None = None, q_pos=None, k_pos=None):
    """Attention of one q block over one kv block, returning float32 (out [Lq, H, d], lse [Lq, H]).

    q [Lq, H, d], k/v [Lk, Hkv, d] with H a multiple of Hkv (query head h reads kv head h // (H // Hkv)).
    Masks come from positions in the prompt: q_pos [Lq], k_pos [Lk], each ascending (default: keys 0..Lk−1, q rows
    shifted by q_offset, so q_offset = 0 is the diagonal block). causal: a row sees keys with k_pos <= q_pos;
    window W (causal only) also needs k_pos > q_pos − W, the sliding window of `workers/layers/attention.py`.
    key_valid [Lk] bool masks padding keys. Rows that see no key get out = 0 and lse = -inf, so `merge` skips them.
    """
    lq, heads, d = q.shape
    lk, kv_heads = k.shape[0], k.shape[1]
    group = heads // kv_heads
    if causal:
        q_pos = torch.arange(lq, device=q.device) + q_offset if q_pos is None else q_pos
        k_pos = torch.arange(lk, device=q.device) if k_pos is None else k_pos
    # [Hkv, group, Lq, d]: each kv head's query heads side by side, so K/V are never repeated for GQA.
    qg = q.float().reshape(lq, kv_heads, group, d).permute(1, 2, 0, 3).contiguous()
    kt = k.float().permute(1, 2, 0)  # [Hkv, d, Lk]
    vh = v.float().transpose(0, 1)  # [Hkv, Lk, d]
    out = torch.empty(kv_heads, group, lq, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(kv_heads, group, lq, dtype=torch.float32, device=q.device)
    tile = max(1, _TILE_ELEMENTS // max(1, heads * lk))
    for start in range(0, lq, tile):
        stop = min(lq, start + tile)
        first, last, mask = 0, lk, None
        if causal:
            rows = q_pos[start:stop]
            # Keys ascend, so the columns no row of this tile may see are cut off rather than masked.
            last = int(torch.searchsorted(k_pos, rows.max().reshape(1), right=True))
            if window is not None:
                first = min(last, int(torch.searchsorted(k_pos, (rows.min() - window).reshape(1), right=True)))
            keys = k_pos[first:last]
            mask = keys[None, :] <= rows[:, None]
            if window is not None:
                mask &= keys[None, :] > rows[:, None] - window
        if key_valid is not None:
            valid = key_valid[first:last][None, :]
            mask = valid if mask is None else mask & valid
        o, s = _attend_tile(qg[:, :, start:stop], kt[..., first:last], vh[:, first:last], scale, mask)
        out[:, :, start:stop], lse[:, :, start:stop] = o, s
    return out.permute(2, 0, 1, 3).reshape(lq, heads, d), lse.permute(2, 0, 1).reshape(lq, heads)


def _attend_tile(q, kt, v, scale, mask):
    """q [Hkv, g, t, d] against kt [Hkv, d, Lk]; mask [t, Lk] or None. Returns out [Hkv, g, t, d], lse [Hkv, g, t]."""
    hkv, g, t, d = q.shape
    lk = kt.shape[-1]
    if lk == 0:
        return torch.zeros_like(q), torch.full((hkv, g, t), NEG_INF, device=q.device)
    scores = torch.matmul(q.reshape(hkv, g * t, d), kt).mul_(scale).view(hkv, g, t, lk)
    if mask is not None:
        scores.masked_fill_(~mask, NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isinf(lse), 0.0, lse)  # rows with no visible key: exp(-inf) = 0, not NaN
    probs = scores.sub_(safe.unsqueeze(-1)).exp_()
    out = torch.matmul(probs.view(hkv, g * t, lk), v).view(hkv, g, t, d)
    return out, lse


@dataclass(frozen=True)
class Block:
    """Local q rows of one rank attending to local kv rows of another (same prompt), causally or in full."""

    q_rows: slice
    kv_rows: slice
    causal: bool

    @property
    def rows(self) -> int:
        return self.q_rows.stop - self.q_rows.start


def zigzag_blocks(layout: "ZigzagLayout", q_rank: int, kv_rank: int, causal: bool) -> list[Block]:
    """The work of q from `q_rank` against kv from `kv_rank`, one block per prompt (none are empty under zigzag).

    q holds chunks (q_rank, 2N−1−q_rank), kv holds (kv_rank, 2N−1−kv_rank). Same rank: both chunks, causal.
    kv_rank < q_rank: the kv front chunk precedes both q chunks, its back chunk follows both → all q, kv front.
    kv_rank > q_rank: both kv chunks follow the q front chunk and precede the q back chunk → q back, all kv.
    """
    blocks = []
    for lo, c in zip(layout.local_cu_seqlens, layout.chunk_lens):
        mid, hi = lo + c, lo + 2 * c
        if not causal:
            blocks.append(Block(slice(lo, hi), slice(lo, hi), False))
        elif kv_rank == q_rank:
            blocks.append(Block(slice(lo, hi), slice(lo, hi), True))
        elif kv_rank < q_rank:
            blocks.append(Block(slice(lo, hi), slice(lo, mid), False))
        else:
            blocks.append(Block(slice(mid, hi), slice(lo, hi), False))
    return blocks


def attend_blocks(q, k, v, blocks: list[Block], scale: float, key_valid=None, window: int | None = None,
                  q_pos=None, kv_pos=None) -> list[tuple]:
    """`block_attention` of every block. key_valid [local tokens] masks the kv side's padding (non-causal); a
    sliding window needs q_pos and kv_pos, the local positions of the q and kv owners (`ZigzagLayout.positions`)."""
    def pos(p, rows):
        return None if window is None else p[rows]

    return [block_attention(q[b.q_rows], k[b.kv_rows], v[b.kv_rows], scale, b.causal or window is not None,
                            key_valid=None if key_valid is None else key_valid[b.kv_rows], window=window,
                            q_pos=pos(q_pos, b.q_rows), k_pos=pos(kv_pos, b.kv_rows))
            for b in blocks]


def merge_blocks(out, lse, blocks: list[Block], results) -> None:
    """Merge each block's (out, lse) into the accumulator rows it belongs to, in place."""
    for block, (block_out, block_lse) in zip(blocks, results):
        rows = block.q_rows
        out[rows], lse[rows] = merge(out[rows], lse[rows], block_out, block_lse)


# ---------------------------------------------------------------- ring communication


class RingComm:
    """Point-to-point transfers over one process group, in the shape *issue send/recv → compute → wait*.

    Queue transfers with `send`/`recv` (or `send_recv` to the ring neighbours), start them with `commit`, compute,
    then `wait`. Buffers passed in must not be touched until `wait` returns.
    """

    def __init__(self, group: dist.ProcessGroup | None, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size
        self.next_rank, self.prev_rank = (rank + 1) % size, (rank - 1) % size
        self._pending: list[tuple[str, torch.Tensor, int, int]] = []
        self._requests: list = []

    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> None:
        self._pending.append(("send", tensor.contiguous(), dst, tag))

    def recv(self, buffer: torch.Tensor, src: int, tag: int = 0) -> torch.Tensor:
        assert buffer.is_contiguous()
        self._pending.append(("recv", buffer, src, tag))
        return buffer

    def send_recv(self, tensor: torch.Tensor, buffer: torch.Tensor | None = None, tag: int = 0) -> torch.Tensor:
        """Send `tensor` to the next rank and receive the previous rank's tensor of the same shape."""
        buffer = torch.empty_like(tensor) if buffer is None else buffer
        self.send(tensor, self.next_rank, tag)
        return self.recv(buffer, self.prev_rank, tag)

    def commit(self) -> None:
        assert not self._requests, "wait() before committing the next transfers"
        for kind, tensor, peer, tag in self._pending:
            peer = dist.get_global_rank(self.group, peer) if self.group is not None else peer
            start = dist.isend if kind == "send" else dist.irecv
            # Keep the tensor referenced until wait(): a packed send buffer has no other owner.
            self._requests.append((start(tensor, peer, group=self.group, tag=tag), tensor))
        self._pending = []

    def wait(self) -> None:
        for request, _ in self._requests:
            request.wait()
        self._requests = []


def pack_result(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One byte message holding a partial result: lse in float32 first (keeps alignment), then out in `dtype`."""
    return torch.cat([lse.float().reshape(-1).view(torch.uint8), out.to(dtype).reshape(-1).view(torch.uint8)])


def result_nbytes(rows: int, heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return result_bytes(rows, heads, head_dim, dtype.itemsize)


def unpack_result(buffer: torch.Tensor, rows: int, heads: int, head_dim: int, dtype: torch.dtype):
    split = rows * heads * 4
    lse = buffer[:split].view(torch.float32).view(rows, heads)
    return buffer[split:].view(dtype).view(rows, heads, head_dim), lse


# ---------------------------------------------------------------- zigzag layout


@dataclass(frozen=True)
class ZigzagLayout:
    """How a packed batch of prompts is split over `world` SP ranks.

    Each prompt is padded at its end to a multiple of 2·world and cut into 2·world equal chunks; rank r holds
    chunks r and 2·world−1−r, so every rank gets the same causal work. A rank's local tokens are packed prompt
    after prompt, each prompt as [front chunk, back chunk] (`local_cu_seqlens`). Padding keys only ever sit after
    every real query of their prompt, so causal attention never sees them; non-causal attention masks them.
    """

    seq_lens: tuple[int, ...]
    world: int

    def __post_init__(self):
        if self.world < 1:
            raise ValueError(f"world: must be >= 1, got {self.world}")
        if not self.seq_lens or any(int(n) < 1 for n in self.seq_lens):
            raise ValueError(f"seq_lens: need at least one prompt and every length >= 1, got {self.seq_lens}")
        object.__setattr__(self, "seq_lens", tuple(int(n) for n in self.seq_lens))

    @cached_property
    def chunk_lens(self) -> tuple[int, ...]:
        return tuple(-(-n // (2 * self.world)) for n in self.seq_lens)

    @cached_property
    def local_cu_seqlens(self) -> tuple[int, ...]:
        """Offsets of each prompt's 2·chunk local tokens; identical on every rank."""
        cu = [0]
        for c in self.chunk_lens:
            cu.append(cu[-1] + 2 * c)
        return tuple(cu)

    @property
    def local_tokens(self) -> int:
        return self.local_cu_seqlens[-1]

    @property
    def padded_total(self) -> int:
        """Tokens of the whole batch after padding (what the ranks hold together)."""
        return self.world * self.local_tokens

    @cached_property
    def cu_seqlens(self) -> tuple[int, ...]:
        """Offsets of each prompt in the unpadded packed batch."""
        cu = [0]
        for n in self.seq_lens:
            cu.append(cu[-1] + n)
        return tuple(cu)

    def chunks_of(self, rank: int) -> tuple[int, int]:
        return rank, 2 * self.world - 1 - rank

    def positions(self, rank: int) -> torch.Tensor:
        """Position within its prompt of every local token (for rotary; padding continues past the prompt)."""
        self._check_rank(rank)
        parts = []
        for c in self.chunk_lens:
            for chunk in self.chunks_of(rank):
                parts.append(torch.arange(chunk * c, (chunk + 1) * c))
        return torch.cat(parts)

    def seq_ids(self, rank: int) -> torch.Tensor:
        """Index of the prompt each local token belongs to."""
        self._check_rank(rank)
        return torch.repeat_interleave(torch.arange(len(self.seq_lens)), torch.tensor(self.chunk_lens) * 2)

    def valid(self, rank: int) -> torch.Tensor:
        """False for padding tokens (whose K/V must not be written to a cache)."""
        return self.positions(rank) < torch.tensor(self.seq_lens)[self.seq_ids(rank)]

    def global_index(self, rank: int) -> torch.Tensor:
        """Index of every local token in the unpadded packed batch; -1 for padding."""
        start = torch.tensor(self.cu_seqlens[:-1])[self.seq_ids(rank)]
        return torch.where(self.valid(rank), start + self.positions(rank), -1)

    def shard(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """This rank's tokens of a packed unpadded batch x [total, ...]; padding rows are zero."""
        if x.shape[0] != self.cu_seqlens[-1]:
            raise ValueError(f"x: expected {self.cu_seqlens[-1]} packed tokens in dim 0, got {x.shape[0]}")
        index = self.global_index(rank)
        out = x.new_zeros((index.numel(), *x.shape[1:]))
        keep = index >= 0
        out[keep] = x[index[keep]]
        return out

    def unshard(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of `shard`: the packed unpadded batch from every rank's local tokens, in rank order."""
        if len(shards) != self.world:
            raise ValueError(f"shards: expected {self.world} (one per rank), got {len(shards)}")
        first = shards[0]
        out = first.new_empty((self.cu_seqlens[-1], *first.shape[1:]))
        for rank, shard in enumerate(shards):
            if shard.shape[0] != self.local_tokens:
                raise ValueError(f"shards[{rank}]: expected {self.local_tokens} rows, got {shard.shape[0]}")
            index = self.global_index(rank)
            keep = index >= 0
            out[index[keep]] = shard[keep]
        return out

    def locate(self, seq: int, position: int) -> tuple[int, int]:
        """(rank, local index) holding token `position` of prompt `seq`, e.g. the last token to sample from."""
        if not 0 <= seq < len(self.seq_lens) or not 0 <= position < self.seq_lens[seq]:
            raise ValueError(f"seq/position: ({seq}, {position}) is outside the batch")
        c = self.chunk_lens[seq]
        chunk, offset = divmod(position, c)
        rank = chunk if chunk < self.world else 2 * self.world - 1 - chunk
        half = 0 if chunk < self.world else 1
        return rank, self.local_cu_seqlens[seq] + half * c + offset

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank: {rank} is outside a layout of {self.world} ranks")
