"""Triton paged attention: one program per (sequence, query tile, kv head, split) runs an online softmax over
its share of the sequence's cached keys, reading each key's block through the block table, so tables may be
ragged, unordered and full of holes. A program's rows are (query token, query head) pairs of one kv head, so
GQA/MQA read every key once per group. Long contexts split the keys over several programs (flash-decoding);
a second kernel merges their (output, log-sum-exp) pairs."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from splitserve.kernels.add_rmsnorm_triton import cast_rne
from splitserve.kernels.backend import interpreting
from splitserve.kernels.paged_attention import check_paged

INTERPRETED = interpreting()
# The interpreter's tl.dot gives garbage for bfloat16 operands (Triton 3.7); there the operands, already
# rounded to their dtype, are multiplied in float32, which is what the tensor cores do too.
_DOT_IN_F32 = tl.constexpr(INTERPRETED)
LOG2E = 1.4426950408889634
BLOCK_N = 64  # keys per inner step
MIN_PARTITION = 256  # keys per split at least: shorter splits cost more in merging than they save


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if _DOT_IN_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")  # float32 inputs: no TF32 rounding
    else:
        return tl.dot(a, b)


@triton.jit
def _paged_attention_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, qs_ptr, out_ptr, part_out_ptr, part_lse_ptr,
        qk_scale, window, partition, block_size, head_dim, group,
        stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
        stride_ot, stride_oh,
        DECODE: tl.constexpr, HAS_WINDOW: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS
    ctx = tl.load(ctx_ptr + seq)
    if DECODE:
        q_begin = seq
        n = 1
    else:
        q_begin = tl.load(qs_ptr + seq)
        n = tl.load(qs_ptr + seq + 1) - q_begin
    if tile * BLOCK_Q >= n:
        return

    rows = tl.arange(0, BLOCK_Q * BLOCK_G)
    token = tile * BLOCK_Q + rows // BLOCK_G
    head = kv_head * group + rows % BLOCK_G
    row_ok = (token < n) & (rows % BLOCK_G < group)
    q_pos = ctx - n + token
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q_rows = (q_begin + token).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    # Keys [lo, hi) are the union of what this tile's queries see; each split takes `partition` of them.
    hi = ctx - n + tl.minimum(n, (tile + 1) * BLOCK_Q)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, ctx - n + tile * BLOCK_Q - window + 1)
    start = lo
    end = hi
    if NUM_SPLITS > 1:
        start = lo + split * partition
        end = tl.minimum(hi, start + partition)

    m_i = tl.full([BLOCK_Q * BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], tl.float32)
    for first in range(start, end, BLOCK_N):
        keys = first + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        block = tl.load(bt_ptr + seq.to(tl.int64) * stride_bt + keys // block_size, mask=key_ok, other=0)
        slot = block.to(tl.int64) * stride_kb + (keys % block_size) * stride_kt + kv_head * stride_kh
        kt = tl.load(k_ptr + slot[None, :] + dims[:, None], mask=key_ok[None, :] & dim_ok[:, None], other=0.0)
        s = _dot(q, kt, IEEE) * qk_scale  # base 2: the scale includes log2(e)
        visible = key_ok[None, :] & (keys[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            visible &= keys[None, :] > q_pos[:, None] - window
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet stay at zero
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vslot = block.to(tl.int64) * stride_vb + (keys % block_size) * stride_vt + kv_head * stride_vh
        v = tl.load(v_ptr + vslot[:, None] + dims[None, :], mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(cast_rne(p, v.dtype), v, IEEE)
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        o_rows = (q_begin + token).to(tl.int64) * stride_ot + head * stride_oh
        tl.store(out_ptr + o_rows[:, None] + dims[None, :], cast_rne(o, out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & dim_ok[None, :])
    else:
        # partials are [tokens, heads, splits, BLOCK_D] float32; an empty split has lse -inf and weight 0
        heads = group * (tl.num_programs(2) // NUM_SPLITS)
        part = ((q_begin + token).to(tl.int64) * heads + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * BLOCK_D + dims[None, :], o, mask=row_ok[:, None])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, heads, head_dim, stride_ot, stride_oh,
                         NUM_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    row = token.to(tl.int64) * heads + head
    splits = tl.arange(0, NUM_SPLITS)
    lse = tl.load(part_lse_ptr + row * NUM_SPLITS + splits)
    weight = tl.exp2(lse - tl.max(lse, axis=0))
    weight = weight / tl.sum(weight, axis=0)
    dims = tl.arange(0, BLOCK_D)
    parts = tl.load(part_out_ptr + (row * NUM_SPLITS + splits)[:, None] * BLOCK_D + dims[None, :])
    o = tl.sum(parts * weight[:, None], axis=0)
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + head * stride_oh + dims, cast_rne(o, out_ptr.dtype.element_ty),
             mask=dims < head_dim)


@functools.cache
def _programs_wanted(device: torch.device) -> int:
    """Enough programs to fill the GPU twice over; under the interpreter, as few as possible."""
    if device.type != "cuda":
        return 1
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def launch_shape(decode: bool, group: int, head_dim: int) -> tuple[int, int, int]:
    """(query tokens per program, padded group, padded head_dim). tl.dot needs at least 16 rows: decode pads
    the group's heads to 16; prefill packs tokens x heads into 64 rows (32 for head_dim > 128, so the float32
    accumulator stays in registers)."""
    block_g = triton.next_power_of_2(group)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if decode:
        return 1, max(16, block_g), block_d
    return max(1, (64 if block_d <= 128 else 32) // block_g), block_g, block_d


def num_warps(block_d: int) -> int:
    """8 warps from head_dim 128 on: fewer registers per thread (no spills, more resident warps)."""
    return 8 if block_d >= 128 else 4


def choose_splits(programs: int, keys: int, wanted: int) -> int:
    """A power of two (few compiled variants): enough splits to fill the device, none shorter than
    MIN_PARTITION keys."""
    splits = 1
    while programs * splits < wanted and keys > 2 * splits * MIN_PARTITION:
        splits *= 2
    return splits


def paged_attention_triton(q, k_cache, v_cache, block_tables, context_lens, query_starts, max_query_len: int,
                           scale: float, window: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    check_paged(q, k_cache, v_cache, block_tables, context_lens, query_starts)
    if window is not None and window < 1:
        raise ValueError(f"window: must be >= 1 or None, got {window}")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("caches: the head_dim axis must be contiguous")
    q = q if q.stride(2) == 1 else q.contiguous()
    out = torch.empty_like(q)
    tokens, heads, head_dim = q.shape
    batch = context_lens.shape[0]
    if tokens == 0 or batch == 0:
        return out
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    decode = query_starts is None
    block_q, block_g, block_d = launch_shape(decode, group, head_dim)
    tiles = triton.cdiv(1 if decode else max_query_len, block_q)
    keys = block_tables.shape[1] * block_size  # a bound on every context, known without a sync
    if window is not None:
        keys = min(keys, window + block_q - 1)
    if num_splits is None:
        num_splits = choose_splits(batch * tiles * kv_heads, keys, _programs_wanted(q.device))
    if num_splits & (num_splits - 1) or num_splits < 1:
        raise ValueError(f"num_splits: must be a power of two, got {num_splits}")
    partition = triton.cdiv(triton.cdiv(keys, num_splits), BLOCK_N) * BLOCK_N
    if num_splits > 1:
        part_out = torch.empty(tokens, heads, num_splits, block_d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(tokens, heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    starts = context_lens if decode else query_starts
    _paged_attention_kernel[(batch, tiles, kv_heads * num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, starts, out, part_out, part_lse,
        scale * LOG2E, window or 0, partition, block_size, head_dim, group,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        DECODE=decode, HAS_WINDOW=window is not None, NUM_SPLITS=num_splits, IEEE=q.dtype == torch.float32,
        BLOCK_Q=block_q, BLOCK_G=block_g, BLOCK_N=BLOCK_N, BLOCK_D=block_d, num_warps=num_warps(block_d))
    if num_splits > 1:
        _merge_splits_kernel[(tokens, heads)](part_out, part_lse, out, heads, head_dim, out.stride(0), out.stride(1),
                                              NUM_SPLITS=num_splits, BLOCK_D=block_d, num_warps=1)
    return out
