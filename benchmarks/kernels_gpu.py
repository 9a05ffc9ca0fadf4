"""Speed of the fused norm kernels on one GPU, in one call: fused add + RMSNorm on [8192, 8192] bfloat16 as a
fraction of the device's measured copy bandwidth (target >= 0.85) and against torch's unfused ops (target >=
1.5x); the one-shot AllReduce + add + RMSNorm kernel over W = 2, 4, 8 peer buffers placed on the one GPU
(barriers off: one process plays every peer) against torch (sum of the W buffers + add + RMSNorm). Medians of
`triton.testing.do_bench`. Prints a table and saves JSON.

`--cpu-check` runs without a GPU: every kernel under Triton's interpreter against its torch twin on small
shapes, then the benchmark code paths on tiny shapes with a wall-clock timer (their numbers mean nothing).
Multimem / NVLink SHARP variants are not implemented: they need NVSwitch multicast hardware.

    python benchmarks/kernels_gpu.py [--cpu-check] [--out benchmarks/results/kernels_gpu.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--cpu-check" in sys.argv:  # must precede the first import of triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from splitserve.kernels.add_rmsnorm import add_rmsnorm, add_rmsnorm_torch  # noqa: E402
from splitserve.kernels.backend import ulps  # noqa: E402
from splitserve.kernels.allreduce_rmsnorm import (MAX_PROGRAMS, SymmetricTensors,  # noqa: E402
                                                  oneshot_allreduce_add_rmsnorm, oneshot_torch)

EPS = 1e-5


def gpu_bench(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, return_mode="median") * 1e-3


def cpu_bench(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rand(shape, dtype, device, gen=None):
    """Never zero: magnitudes in [0.1, 1.1) with random signs."""
    mag = torch.rand(shape, device=device, generator=gen) + 0.1
    return (mag * (torch.randint(0, 2, shape, device=device, generator=gen) * 2 - 1)).to(dtype)


def peers_on_one_device(world, rows, hidden, dtype, device, gen=None) -> SymmetricTensors:
    bufs = [rand((rows, hidden), dtype, device, gen) for _ in range(world)]
    outs = [torch.empty(rows, hidden, dtype=dtype, device=device) for _ in range(2)]
    pads = [torch.zeros(MAX_PROGRAMS * world, dtype=torch.int32, device=device) for _ in range(world)]
    return SymmetricTensors(0, bufs, [outs[0]] * world, [outs[1]] * world, pads)


def copy_bandwidth(bench, nbytes: int, device) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / bench(lambda: dst.copy_(src))


def bench_add_rmsnorm(bench, rows, hidden, dtype, device, copy_bw) -> dict:
    x, r, w = rand((rows, hidden), dtype, device), rand((rows, hidden), dtype, device), rand((hidden,), dtype, device)
    fused = bench(lambda: add_rmsnorm(x, r, w, EPS))
    unfused = bench(lambda: add_rmsnorm_torch(x, r, w, EPS))
    size = x.element_size()
    moved = (4 * rows * hidden + hidden) * size  # read x, residual, weight; write normed, summed
    return {"kernel": "add_rmsnorm", "shape": [rows, hidden], "dtype": str(dtype), "t_fused_us": fused * 1e6,
            "t_torch_us": unfused * 1e6, "speedup": unfused / fused, "GBps": moved / fused / 1e9,
            "fraction_of_copy_bw": moved / fused / copy_bw}


def bench_oneshot(bench, world, rows, hidden, dtype, device, copy_bw) -> dict:
    peers = peers_on_one_device(world, rows, hidden, dtype, device)
    r, w = rand((rows, hidden), dtype, device), rand((hidden,), dtype, device)
    fused = bench(lambda: oneshot_allreduce_add_rmsnorm(peers, rows, r, w, EPS, sync=False))

    def torch_version():
        acc = peers.partial[0].float()
        for b in peers.partial[1:]:
            acc = acc + b.float()
        return add_rmsnorm_torch(acc.to(dtype), r, w, EPS)

    unfused = bench(torch_version)
    moved = ((world + 3) * rows * hidden + hidden) * r.element_size()
    return {"kernel": f"oneshot_allreduce_add_rmsnorm W={world}", "shape": [rows, hidden], "dtype": str(dtype),
            "t_fused_us": fused * 1e6, "t_torch_us": unfused * 1e6, "speedup": unfused / fused,
            "GBps": moved / fused / 1e9, "fraction_of_copy_bw": moved / fused / copy_bw}


def matches(got, want) -> bool:
    """(normed, summed) of a kernel against its twin: the sums bit-identical (the same float32 adds, rounded once);
    the normed rows within 2e-6 relative in float32 (row statistics summed in another order) and within 2 ulps in
    half precision: that order can flip the rounding of a normalised value by one ulp, which the rounded weight
    multiply can widen to two."""
    (normed, summed), (normed_ref, summed_ref) = got, want
    if not torch.equal(summed, summed_ref):
        return False
    if normed.dtype == torch.float32:
        return torch.allclose(normed, normed_ref, rtol=2e-6, atol=1e-6)
    return ulps(normed, normed_ref) <= 2


def correctness(device) -> list[str]:
    """Triton (compiled, or interpreted on CPU) against the twins on seeded inputs; returns failures."""
    failures = []
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for rows, hidden in ((37, 65), (8, 1000)):
            x, r, w = (rand(s, dtype, device, gen) for s in ((rows, hidden), (rows, hidden), (hidden,)))
            if not matches(add_rmsnorm(x, r, w, EPS), add_rmsnorm_torch(x, r, w, EPS)):
                failures.append(f"add_rmsnorm {dtype} {rows}x{hidden}")
            for world in (2, 4, 8):
                peers = peers_on_one_device(world, rows, hidden, dtype, device, gen)
                if not matches(oneshot_allreduce_add_rmsnorm(peers, rows, r, w, EPS, sync=False),
                               oneshot_torch(peers, rows, r, w, EPS, sync=False)):
                    failures.append(f"oneshot W={world} {dtype} {rows}x{hidden}")
    return failures


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-check", action="store_true", help="no GPU: interpreter correctness + tiny dry run")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "kernels_gpu.json")
    args = ap.parse_args()
    if args.cpu_check:
        device, bench, big, shapes = torch.device("cpu"), cpu_bench, (64, 256), [(16, 256)]
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --cpu-check")
        device, bench, big, shapes = torch.device("cuda"), gpu_bench, (8192, 8192), [(128, 8192), (4096, 8192)]
    failures = correctness(device)
    print("correctness vs torch twins:", "ok" if not failures else f"FAILED {failures}")
    copy_bw = copy_bandwidth(bench, 1 << (30 if device.type == "cuda" else 20), device)
    rows = [bench_add_rmsnorm(bench, *big, torch.bfloat16, device, copy_bw)]
    rows += [bench_oneshot(bench, w, r, h, torch.bfloat16, device, copy_bw) for r, h in shapes for w in (2, 4, 8)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter: timings meaningless)"
    print(f"device: {name}; copy bandwidth {copy_bw / 1e9:.1f} GB/s")
    print(f"{'kernel':<38} {'shape':>12} {'fused us':>10} {'torch us':>10} {'speedup':>8} {'GB/s':>8} {'of copy':>8}")
    for row in rows:
        print(f"{row['kernel']:<38} {'x'.join(map(str, row['shape'])):>12} {row['t_fused_us']:10.1f} "
              f"{row['t_torch_us']:10.1f} {row['speedup']:7.2f}x {row['GBps']:8.1f} {row['fraction_of_copy_bw']:8.2f}")
    print("targets: add_rmsnorm >= 0.85 of copy bandwidth and >= 1.5x torch; multimem variants: not implemented")
    if device.type == "cuda":
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(device), "copy_bw_GBps": copy_bw / 1e9,
                                        "results": rows, "correctness_failures": failures}, indent=2) + "\n")
        print(f"saved {args.out}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
