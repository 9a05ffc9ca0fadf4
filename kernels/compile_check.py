"""Compiles every Triton kernel for a GPU target without a GPU (Triton ships its own ptxas), so the compiled
path is checked on CPU-only machines: `python -m splitserve.kernels.compile_check [sm]`."""
from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from splitserve.kernels import add_rmsnorm_triton, allreduce_rmsnorm_triton


def _compile(fn, args: dict, constexprs: dict, target: GPUTarget, warps: int):
    signature = {**args, **{name: "constexpr" for name in constexprs}}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=target, options={"num_warps": warps})


def compile_all(sm: int = 90) -> list[str]:
    """Returns the PTX of each kernel (bfloat16 and float16, one-shot and reduce-scatter forms)."""
    target = GPUTarget("cuda", sm, 32)
    rows = {"n_rows": "i32", "n_cols": "i32"}
    out = []
    for dt in ("bf16", "fp16"):
        ptr = "*" + dt
        out.append(_compile(add_rmsnorm_triton._add_rmsnorm_kernel, {
            "x_ptr": ptr, "r_ptr": ptr, "w_ptr": ptr, "out_ptr": ptr, "sum_ptr": ptr, **rows, "stride_x": "i32",
            "stride_r": "i32", "stride_o": "i32", "stride_s": "i32", "eps": "fp32"},
            {"ROWS": 1, "BLOCK": 8192}, target, 8).asm["ptx"])
        out.append(_compile(allreduce_rmsnorm_triton._oneshot_kernel, {
            "partial_table": "*i64", "pad_table": "*i64", "r_ptr": ptr, "w_ptr": ptr, "out_ptr": ptr, "sum_ptr": ptr,
            **rows, "eps": "fp32", "rank": "i32"},
            {"WORLD": 4, "ROWS": 1, "BLOCK": 8192, "SYNC": True}, target, 8).asm["ptx"])
        out.append(_compile(allreduce_rmsnorm_triton._reduce_scatter_kernel, {
            "partial_table": "*i64", "normed_table": "*i64", "summed_table": "*i64", "pad_table": "*i64",
            "r_ptr": ptr, "w_ptr": ptr, **rows, "per_rank": "i32", "eps": "fp32", "rank": "i32"},
            {"WORLD": 8, "ROWS": 4, "BLOCK": 512, "SYNC": True}, target, 4).asm["ptx"])
    return out


if __name__ == "__main__":
    ptx = compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
    barriers = sum(p.count("atom.global.release.sys.cas") for p in ptx)
    print(f"compiled {len(ptx)} kernels; {barriers} release CAS sites")
