"""Triton kernels (run by Triton's interpreter on CPU) against their torch twins on random inputs.

Tolerances: float32 within 2e-6 relative (the row statistics are summed in a different order); float16 and
bfloat16 within 1 ulp (the same order effect can flip one rounding). The interpreter truncates float32 ->
bfloat16; the kernels round with integer ops there, so without that the bfloat16 error would compound.
"""
import os
import sys

import pytest
import torch

from splitserve.kernels import backend
from splitserve.kernels.add_rmsnorm import add_rmsnorm_torch
from splitserve.kernels.allreduce_rmsnorm import (MAX_PROGRAMS, SymmetricTensors, oneshot_torch,
                                                  reduce_scatter_torch)

pytestmark = pytest.mark.skipif(not backend.HAS_TRITON, reason="triton is not installed")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 7), (37, 65), (5, 200), (19, 1000)]


@pytest.fixture(scope="module")
def triton_kernels():
    """The Triton modules under the interpreter. The variable must be set before this process first imports
    triton, and is set only for this module's tests so that processes spawned by other tests do not inherit it."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set; run tests/test_kernels.py on its own")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield backend.triton_module("add_rmsnorm_triton"), backend.triton_module("allreduce_rmsnorm_triton")
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


def nonzero(shape, dtype, gen, scale=1.0):
    """Uniform magnitudes in [0.1, 1.1) with random signs: never zero."""
    mag = torch.rand(shape, generator=gen) + 0.1
    sign = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    return (scale * mag * sign).to(dtype)


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between same-dtype tensors."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    sign = torch.iinfo(bits).min

    def ordered(t):
        i = t.contiguous().view(bits).long()
        return torch.where(i < 0, sign - i, i)

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def assert_close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)
    else:
        assert ulps(got, want) <= 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rmsnorm_matches_twin(triton_kernels, dtype, shape):
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    x, residual = nonzero(shape, dtype, gen, 3.0), nonzero(shape, dtype, gen)
    weight = nonzero(shape[1:], dtype, gen)
    normed, summed = triton_kernels[0].add_rmsnorm_triton(x, residual, weight, 1e-5)
    want_normed, want_summed = add_rmsnorm_torch(x, residual, weight, 1e-5)
    assert torch.equal(summed, want_summed)  # the same float32 adds, rounded once
    assert_close(normed, want_normed)


def test_add_rmsnorm_keeps_leading_dims(triton_kernels):
    gen = torch.Generator().manual_seed(1)
    x, residual, weight = nonzero((2, 3, 24), torch.float32, gen), nonzero((2, 3, 24), torch.float32, gen), \
        nonzero((24,), torch.float32, gen)
    normed, summed = triton_kernels[0].add_rmsnorm_triton(x, residual, weight, 1e-6)
    assert normed.shape == summed.shape == (2, 3, 24)
    torch.testing.assert_close(normed, add_rmsnorm_torch(x, residual, weight, 1e-6)[0], rtol=2e-6, atol=1e-6)


def test_add_rmsnorm_rejects_mismatched_inputs():
    x = torch.ones(3, 8)
    with pytest.raises(ValueError, match="residual"):
        add_rmsnorm_torch(x, torch.ones(3, 9), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="weight"):
        add_rmsnorm_torch(x, x, torch.ones(9), 1e-6)
    with pytest.raises(ValueError, match="dtype"):
        add_rmsnorm_torch(x, x.half(), torch.ones(8), 1e-6)


def simulated_peers(world, rank, capacity, hidden, dtype, gen) -> SymmetricTensors:
    """W ranks' buffers in one process (no barriers: sync=False), the partials filled with random rows."""
    def buffers(fill):
        return [nonzero((capacity, hidden), dtype, gen) if fill else torch.zeros(capacity, hidden, dtype=dtype)
                for _ in range(world)]

    pads = [torch.zeros(MAX_PROGRAMS * world, dtype=torch.int32) for _ in range(world)]
    return SymmetricTensors(rank, buffers(True), buffers(False), buffers(False), pads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("world,rows,hidden", [(2, 11, 40), (3, 7, 129), (4, 1, 64)])
def test_oneshot_matches_twin(triton_kernels, dtype, world, rows, hidden):
    gen = torch.Generator().manual_seed(world * 100 + rows)
    peers = simulated_peers(world, world - 1, rows + 5, hidden, dtype, gen)
    residual, weight = nonzero((rows, hidden), dtype, gen, 2.0), nonzero((hidden,), dtype, gen)
    normed, summed = triton_kernels[1].oneshot_triton(peers, rows, residual, weight, 1e-5, max_programs=3, sync=False)
    want_normed, want_summed = oneshot_torch(peers, rows, residual, weight, 1e-5, sync=False)
    assert torch.equal(summed, want_summed)  # the same float32 adds, rounded once
    assert_close(normed, want_normed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("world,rows,hidden", [(2, 9, 40), (4, 10, 33)])
def test_reduce_scatter_matches_twin(triton_kernels, dtype, world, rows, hidden):
    """Each simulated rank writes its share of rows into every peer's outputs; together they cover all rows."""
    gen = torch.Generator().manual_seed(world * 10 + rows)
    peers = simulated_peers(world, 0, rows + 3, hidden, dtype, gen)
    twin = SymmetricTensors(0, peers.partial, [t.clone() for t in peers.normed], [t.clone() for t in peers.summed],
                            peers.pads)
    residual, weight = nonzero((rows, hidden), dtype, gen, 2.0), nonzero((hidden,), dtype, gen)
    for rank in range(world):
        peers.rank = twin.rank = rank
        triton_kernels[1].reduce_scatter_triton(peers, rows, residual, weight, 1e-5, max_programs=2, sync=False)
        reduce_scatter_torch(twin, rows, residual, weight, 1e-5, sync=False)
    for peer in range(world):
        assert torch.equal(peers.summed[peer][:rows], twin.summed[peer][:rows])
        assert_close(peers.normed[peer][:rows], twin.normed[peer][:rows])
    assert all(torch.equal(peers.normed[0], t) for t in peers.normed[1:])  # the all-gather gave everyone the same


def test_twin_is_used_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not backend.use_triton(torch.ones(1))


def test_kernels_compile_for_a_gpu_target():
    """The compiled (non-interpreted) path, down to PTX for sm_90, in a process without TRITON_INTERPRET."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "splitserve.kernels.compile_check", "90"], env=env,
                          capture_output=True, text=True, timeout=120)
    if done.returncode and "ptxas" in done.stderr.lower() and "not found" in done.stderr.lower():
        pytest.skip("this triton build has no ptxas")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "compiled 6 kernels" in done.stdout
