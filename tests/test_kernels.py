"""Triton kernels, run by Triton's interpreter on CPU, against their torch twins on random inputs (never zero).

The interpreter works only if TRITON_INTERPRET=1 is set before a process first imports triton, which other
tests in a pytest run may already have done; so one subprocess (this file run as a script) runs every Triton
case and the comparisons happen here. Tolerances: float32 within 2e-6 relative (row statistics summed in
another order); float16 and bfloat16 within 1 ulp (the same order effect can flip one rounding). Sums of the
same float32 adds must be bit-identical. The interpreter truncates float32 -> bfloat16; the kernels round with
integer ops there, without which bfloat16 errors would compound to several ulps.
"""
import os
import subprocess
import sys

import pytest
import torch

from splitserve.kernels import backend
from splitserve.kernels.add_rmsnorm import add_rmsnorm_torch
from splitserve.kernels.allreduce_rmsnorm import (MAX_PROGRAMS, SymmetricTensors, oneshot_torch,
                                                  reduce_scatter_torch)

EPS = 1e-5
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
NORM_SHAPES = [(1, 7), (37, 65), (5, 200), (19, 1000)]
ONESHOT = [(2, 11, 40), (3, 7, 129), (4, 1, 64)]
REDUCE_SCATTER = [(2, 9, 40), (4, 10, 33)]


def nonzero(shape, dtype, gen, scale=1.0):
    """Uniform magnitudes in [0.1, 1.1) with random signs."""
    mag = torch.rand(shape, generator=gen) + 0.1
    return (scale * mag * (torch.randint(0, 2, shape, generator=gen) * 2 - 1)).to(dtype)


def simulated_peers(world, rank, capacity, hidden, dtype, gen) -> SymmetricTensors:
    """W ranks' buffers in one process (barriers off: sync=False), partials filled with random rows."""
    def zeros():
        return [torch.zeros(capacity, hidden, dtype=dtype) for _ in range(world)]

    partial = [nonzero((capacity, hidden), dtype, gen) for _ in range(world)]
    pads = [torch.zeros(MAX_PROGRAMS * world, dtype=torch.int32) for _ in range(world)]
    return SymmetricTensors(rank, partial, zeros(), zeros(), pads)


def make_cases() -> dict:
    cases = {}
    for name, dtype in DTYPES.items():
        for rows, hidden in NORM_SHAPES:
            gen = torch.Generator().manual_seed(rows * 1000 + hidden)
            cases[f"norm-{name}-{rows}x{hidden}"] = ("norm", (nonzero((rows, hidden), dtype, gen, 3.0),
                                                             nonzero((rows, hidden), dtype, gen),
                                                             nonzero((hidden,), dtype, gen)))
        for world, rows, hidden in ONESHOT + REDUCE_SCATTER:
            gen = torch.Generator().manual_seed(world * 100 + rows)
            peers = simulated_peers(world, world - 1, rows + 5, hidden, dtype, gen)
            kind = "oneshot" if (world, rows, hidden) in ONESHOT else "rs"
            cases[f"{kind}-{name}-W{world}-{rows}x{hidden}"] = (kind, (
                peers, rows, nonzero((rows, hidden), dtype, gen, 2.0), nonzero((hidden,), dtype, gen)))
    gen = torch.Generator().manual_seed(1)
    cases["norm-3d"] = ("norm", (nonzero((2, 3, 24), torch.float32, gen), nonzero((2, 3, 24), torch.float32, gen),
                                 nonzero((24,), torch.float32, gen)))
    return cases


def run_triton(kind, args):
    """In the interpreted subprocess: one case through the Triton version."""
    if kind == "norm":
        return backend.triton_module("add_rmsnorm_triton").add_rmsnorm_triton(*args, EPS)
    module = backend.triton_module("allreduce_rmsnorm_triton")
    peers, rows, residual, weight = args
    if kind == "oneshot":
        return module.oneshot_triton(peers, rows, residual, weight, EPS, max_programs=3, sync=False)
    for rank in range(peers.world):  # each simulated rank stores its share of rows into every peer
        peers.rank = rank
        module.reduce_scatter_triton(peers, rows, residual, weight, EPS, max_programs=2, sync=False)
    return peers.normed, peers.summed


def run_twin(kind, args):
    if kind == "norm":
        return add_rmsnorm_torch(*args, EPS)
    peers, rows, residual, weight = args
    if kind == "oneshot":
        return oneshot_torch(peers, rows, residual, weight, EPS, sync=False)
    for rank in range(peers.world):
        peers.rank = rank
        reduce_scatter_torch(peers, rows, residual, weight, EPS, sync=False)
    return peers.normed, peers.summed


CASES = make_cases()


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    if not backend.HAS_TRITON:
        pytest.skip("triton is not installed")
    out = tmp_path_factory.mktemp("kernels") / "triton.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


def assert_close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    else:
        assert backend.ulps(got, want) <= 1


@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_matches_twin(interpreted, case):
    kind, args = CASES[case]
    normed, summed = interpreted[case]
    want_normed, want_summed = run_twin(kind, args)
    if kind == "rs":  # every rank's output buffers hold all rows, identical across ranks
        rows = args[1]
        for got_n, got_s, n, s in zip(normed, summed, want_normed, want_summed):
            assert torch.equal(got_s[:rows], s[:rows])
            assert_close(got_n[:rows], n[:rows])
        assert all(torch.equal(normed[0], t) for t in normed[1:])
    else:
        assert torch.equal(summed, want_summed)  # the same float32 adds, rounded once
        assert_close(normed, want_normed)


def test_add_rmsnorm_rejects_mismatched_inputs():
    x = torch.ones(3, 8)
    with pytest.raises(ValueError, match="residual"):
        add_rmsnorm_torch(x, torch.ones(3, 9), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="weight"):
        add_rmsnorm_torch(x, x, torch.ones(9), 1e-6)
    with pytest.raises(ValueError, match="dtype"):
        add_rmsnorm_torch(x, x.half(), torch.ones(8), 1e-6)


def test_twin_is_used_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not backend.use_triton(torch.ones(1))


@pytest.mark.skipif(not backend.HAS_TRITON, reason="triton is not installed")
def test_kernels_compile_for_a_gpu_target():
    """The compiled (non-interpreted) path, down to PTX for sm_90, in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "splitserve.kernels.compile_check", "90"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "compiled 12 kernels" in done.stdout
    assert "4 with tensor-core MMA" in done.stdout  # paged attention's dots, bfloat16 and float16
    assert "paged attention: 4 variants, 0 bytes of register spills" in done.stdout


if __name__ == "__main__":  # the interpreted side of `interpreted`
    assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules
    torch.set_num_threads(1)
    torch.save({name: run_triton(kind, args) for name, (kind, args) in make_cases().items()}, sys.argv[1])
