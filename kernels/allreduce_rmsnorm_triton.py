"""Triton AllReduce + residual add + RMSNorm over symmetric buffers reached through tables of peer
addresses (int64, cast to pointers in the kernel); one-shot and reduce-scatter forms."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.add_rmsnorm_triton import cast_rne, launch_shape, rmsnorm_rows
from splitserve.kernels.allreduce_rmsnorm import SymmetricTensors, check_call, default_max_programs, num_programs
from splitserve.kernels.backend import interpreting

INTERPRETED = interpreting()


@triton.jit
def _signal_barrier(pad_table, slot, rank, WORLD: tl.constexpr):
    """Program `slot` meets program `slot` of every rank. Sending waits for the previous flag to be consumed,
    so back-to-back barriers on the same slot are safe and each flag ends at 0."""
    tl.debug_barrier()  # all threads of this program are done with the memory the barrier publishes
    for peer in tl.static_range(WORLD):
        pad = tl.load(pad_table + peer).to(tl.pointer_type(tl.int32))
        while tl.atomic_cas(pad + slot * WORLD + rank, 0, 1, sem="release", scope="sys") != 0:
            pass
    own = tl.load(pad_table + rank).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        while tl.atomic_cas(own + slot * WORLD + peer, 1, 0, sem="acquire", scope="sys") != 1:
            pass
    tl.debug_barrier()


@triton.jit
def _reduce_add_norm(partial_table, r_ptr, w_ptr, rows, n_rows, n_cols, eps, WORLD: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Sums rows [R] of every rank's partial in rank order (float32), adds the residual, normalises."""
    dtype = r_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows[:, None] < n_rows) & (cols < n_cols)
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols
    acc = tl.zeros(mask.shape, tl.float32)
    for peer in tl.static_range(WORLD):
        buf = tl.load(partial_table + peer).to(tl.pointer_type(dtype))
        acc += tl.load(buf + offsets, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offsets, mask=mask, other=0.0)
    h = cast_rne(cast_rne(acc, dtype).to(tl.float32) + r.to(tl.float32), dtype)  # the all-reduce result is in dtype
    w = tl.load(w_ptr + tl.arange(0, BLOCK), mask=tl.arange(0, BLOCK) < n_cols, other=0.0)
    return rmsnorm_rows(h, w, n_cols, eps), h, offsets, mask


@triton.jit
def _oneshot_kernel(partial_table, pad_table, r_ptr, w_ptr, out_ptr, sum_ptr, n_rows, n_cols, eps, rank,
                    WORLD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                    SYNC: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * ROWS
    if SYNC:
        _signal_barrier(pad_table, pid, rank, WORLD)  # every peer's partial is written
    for start in range(pid * ROWS, n_rows, step):
        rows = start + tl.arange(0, ROWS)
        normed, h, offsets, mask = _reduce_add_norm(partial_table, r_ptr, w_ptr, rows, n_rows, n_cols, eps,
                                                    WORLD, BLOCK)
        tl.store(sum_ptr + offsets, h, mask=mask)
        tl.store(out_ptr + offsets, normed, mask=mask)
    if SYNC:
        _signal_barrier(pad_table, pid, rank, WORLD)  # every peer is done reading our partial


@triton.jit
def _reduce_scatter_kernel(partial_table, normed_table, summed_table, pad_table, r_ptr, w_ptr, n_rows, n_cols,
                           per_rank, eps, rank, WORLD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                    SYNC: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * ROWS
    first = rank * per_rank
    end = tl.minimum(first + per_rank, n_rows)
    dtype = r_ptr.dtype.element_ty
    if SYNC:
        _signal_barrier(pad_table, pid, rank, WORLD)
    for start in range(first + pid * ROWS, end, step):
        rows = start + tl.arange(0, ROWS)
        normed, h, offsets, mask = _reduce_add_norm(partial_table, r_ptr, w_ptr, rows, end, n_cols, eps,
                                                    WORLD, BLOCK)
        for peer in tl.static_range(WORLD):  # the all-gather: our rows into every peer's outputs
            tl.store(tl.load(normed_table + peer).to(tl.pointer_type(dtype)) + offsets, normed, mask=mask)
            tl.store(tl.load(summed_table + peer).to(tl.pointer_type(dtype)) + offsets, h, mask=mask)
    if SYNC:
        _signal_barrier(pad_table, pid, rank, WORLD)  # every peer's rows have landed in our outputs


def _launch_shape(peers: SymmetricTensors, rows: int, max_programs: int | None):
    per_program, block, warps = launch_shape(peers.partial[0].shape[1])
    limit = max_programs or default_max_programs(peers.partial[0].device)
    return num_programs(triton.cdiv(rows, per_program), limit), per_program, block, warps


def oneshot_triton(peers: SymmetricTensors, num_rows: int, residual, weight, eps: float,
                   max_programs: int | None = None, sync: bool = True):
    check_call(peers, num_rows, residual, weight)
    residual = residual.contiguous()
    out, summed = torch.empty_like(residual), torch.empty_like(residual)
    grid, rows, block, warps = _launch_shape(peers, num_rows, max_programs)
    _oneshot_kernel[(grid,)](peers.table("partial"), peers.table("pads"), residual, weight.contiguous(), out,
                             summed, num_rows, residual.shape[1], eps, peers.rank, WORLD=peers.world, ROWS=rows,
                             BLOCK=block, SYNC=sync, num_warps=warps)
    return out, summed


def reduce_scatter_triton(peers: SymmetricTensors, num_rows: int, residual, weight, eps: float,
                          max_programs: int | None = None, sync: bool = True):
    check_call(peers, num_rows, residual, weight)
    residual = residual.contiguous()
    per_rank = -(-num_rows // peers.world)
    grid, rows, block, warps = _launch_shape(peers, per_rank, max_programs)
    _reduce_scatter_kernel[(grid,)](
        peers.table("partial"), peers.table("normed"), peers.table("summed"), peers.table("pads"), residual,
        weight.contiguous(), num_rows, residual.shape[1], per_rank, eps, peers.rank, WORLD=peers.world, ROWS=rows,
        BLOCK=block, SYNC=sync, num_warps=warps)
    me = peers.rank
    return peers.normed[me][:num_rows].clone(), peers.summed[me][:num_rows].clone()
