"""Triton fused residual add + RMSNorm: one read of x and residual, one write of each output."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.add_rmsnorm import check_rows
from splitserve.kernels.backend import interpreting

INTERPRETED = interpreting()
# The interpreter truncates float32 -> bfloat16 where GPUs round to nearest even; rounding with integer ops
# there keeps interpreted results comparable bit for bit with torch.
_ROUND_BY_BITS = tl.constexpr(INTERPRETED)


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """float32 -> `dtype`, rounding to nearest even on every backend."""
    if _ROUND_BY_BITS and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def rmsnorm_rows(h, w, n_cols, eps):
    """h: [R, B] rows in the activation dtype (columns past n_cols are zero); w: [B]. Float32 statistics,
    normalised rows cast to the activation dtype before the weight multiply, as the reference does."""
    hf = h.to(tl.float32)
    var = tl.sum(hf * hf, axis=1) / n_cols
    inv = tl.div_rn(1.0, tl.sqrt_rn(var + eps))  # correctly rounded, like torch's rsqrt on CPU
    y = cast_rne(hf * inv[:, None], h.dtype)
    return cast_rne(w.to(tl.float32)[None, :] * y.to(tl.float32), h.dtype)


@triton.jit
def _add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, n_rows, n_cols, stride_x, stride_r, stride_o,
                        stride_s, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    x = tl.load(x_ptr + rows * stride_x + cols, mask=mask, other=0.0)
    r = tl.load(r_ptr + rows * stride_r + cols, mask=mask, other=0.0)
    h = cast_rne(x.to(tl.float32) + r.to(tl.float32), x.dtype)
    tl.store(sum_ptr + rows * stride_s + cols, h, mask=mask)
    w = tl.load(w_ptr + tl.arange(0, BLOCK), mask=tl.arange(0, BLOCK) < n_cols, other=0.0)
    tl.store(out_ptr + rows * stride_o + cols, rmsnorm_rows(h, w, n_cols, eps), mask=mask)


def launch_shape(n_cols: int) -> tuple[int, int, int]:
    """(rows per program, column block, warps): whole rows in registers; short rows share a program."""
    block = triton.next_power_of_2(n_cols)
    if block > 65536:
        raise ValueError(f"hidden size {n_cols} is larger than the fused norm kernels support (65536)")
    rows = max(1, min(16, 2048 // block))
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    return rows, block, warps


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def add_rmsnorm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    check_rows(x, residual, weight)
    x2, r2 = _rows(x), _rows(residual)
    out, summed = torch.empty_like(x2), torch.empty_like(x2)
    n_rows, n_cols = x2.shape
    if n_rows:
        rows, block, warps = launch_shape(n_cols)
        _add_rmsnorm_kernel[(triton.cdiv(n_rows, rows),)](
            x2, r2, weight.contiguous(), out, summed, n_rows, n_cols, x2.stride(0), r2.stride(0), out.stride(0),
            summed.stride(0), eps, ROWS=rows, BLOCK=block, num_warps=warps)
    return out.view(x.shape), summed.view(x.shape)
