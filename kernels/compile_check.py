"""Compiles every Triton kernel for a GPU target without a GPU (Triton ships its own ptxas), so the compiled
path is checked on CPU-only machines: `python -m splitserve.kernels.compile_check [sm]`."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from splitserve.kernels import add_rmsnorm_triton, allreduce_rmsnorm_triton, paged_attention_triton


def _compile(fn, args: dict, constexprs: dict, target: GPUTarget, warps: int, aligned: tuple = ()):
    """`aligned`: arguments divisible by 16, as Triton's launcher specialises them at run time (pointers from
    torch, strides and sizes that are multiples of 16), which is what lets loads vectorise."""
    signature = {**args, **{name: "constexpr" for name in constexprs}}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": warps})


def spilled_bytes(ptx: str, sm: int) -> int:
    """Register spill stores ptxas reports for `ptx` (Triton's bundled ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas

    arch = re.search(r"^\.target (sm_\w+)", ptx, re.M).group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        done = subprocess.run([get_ptxas(sm).path, "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True)
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", done.stderr))


def _paged_attention(dt: str, decode: bool, splits: int, target: GPUTarget):
    """Llama-shaped: group of 4 query heads per kv head, head_dim 128, with a sliding window."""
    pa = paged_attention_triton
    block_q, block_g, block_d = pa.launch_shape(decode, 4, 128)
    ptr, index = "*" + dt, "*i64"
    ints = ("window", "partition", "block_size", "head_dim", "group", "stride_qt", "stride_qh", "stride_kb",
            "stride_kt", "stride_kh", "stride_vb", "stride_vt", "stride_vh", "stride_bt", "stride_ot", "stride_oh")
    pointers = ("q_ptr", "k_ptr", "v_ptr", "bt_ptr", "ctx_ptr", "qs_ptr", "out_ptr", "part_out_ptr", "part_lse_ptr")
    return _compile(pa._paged_attention_kernel, {
        "q_ptr": ptr, "k_ptr": ptr, "v_ptr": ptr, "bt_ptr": index, "ctx_ptr": index, "qs_ptr": index, "out_ptr": ptr,
        "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "qk_scale": "fp32", **{name: "i32" for name in ints}},
        {"DECODE": decode, "HAS_WINDOW": True, "NUM_SPLITS": splits, "IEEE": False, "BLOCK_Q": block_q,
         "BLOCK_G": block_g, "BLOCK_N": pa.BLOCK_N, "BLOCK_D": block_d}, target, pa.num_warps(block_d),
        aligned=pointers + tuple(n for n in ints if n not in ("window", "group", "stride_bt"))).asm["ptx"]


def compile_all(sm: int = 90) -> list[str]:
    """Returns the PTX of each kernel (bfloat16 and float16; one-shot and reduce-scatter forms; paged attention
    for decode with split-K and its merge, and for prefill over a cached prefix)."""
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
        out.append(_paged_attention(dt, decode=True, splits=8, target=target))
        out.append(_paged_attention(dt, decode=False, splits=1, target=target))
        out.append(_compile(paged_attention_triton._merge_splits_kernel, {
            "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": ptr, "heads": "i32", "head_dim": "i32",
            "stride_ot": "i32", "stride_oh": "i32"}, {"NUM_SPLITS": 8, "BLOCK_D": 128}, target, 1).asm["ptx"])
    return out


if __name__ == "__main__":
    ptx = compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
    barriers = sum(p.count("atom.global.release.sys.cas") for p in ptx)
    mma = sum("mma.sync" in p or "wgmma" in p for p in ptx)
    print(f"compiled {len(ptx)} kernels; {barriers} release CAS sites; {mma} with tensor-core MMA")
    attention = [p for p in ptx if "_paged_attention_kernel" in p]
    spills = sum(spilled_bytes(p, int(sys.argv[1]) if len(sys.argv) > 1 else 90) for p in attention)
    print(f"paged attention: {len(attention)} variants, {spills} bytes of register spills")
