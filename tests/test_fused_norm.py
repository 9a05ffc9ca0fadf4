"""allreduce_add_rmsnorm across spawned gloo processes: the symmetric-buffer kernels (Triton under the
interpreter, on /dev/shm buffers shared by the processes) and the rs_ag method equal the reference, every
rank gets identical bits, and the signal pads are clean after each of many calls."""
import glob

import pytest
import torch

from distributed import run_distributed
from splitserve.comm.fused_norm import check_method
from splitserve.kernels import backend

EPS = 1e-5


def _inputs(step: int, world: int, dtype):
    """Every rank builds the same partials, residual and weight; sizes vary per call, never zero values."""
    g = torch.Generator().manual_seed(1000 + step)
    rows, hidden = [1, 13, 8, 30, 5, 17, 64, 3][step % 8], [40, 96, 33][step % 3]

    def rand(*shape):
        return ((torch.rand(shape, generator=g) + 0.1) * (torch.randint(0, 2, shape, generator=g) * 2 - 1)).to(dtype)

    return [rand(rows, hidden) for _ in range(world)], rand(rows, hidden), rand(hidden)


def _expected(partials, residual, weight):
    """Peers summed in rank order in float32, then the reference add + RMSNorm."""
    from splitserve.kernels.add_rmsnorm import add_rmsnorm_torch

    acc = partials[0].to(torch.float32, copy=True)
    for p in partials[1:]:
        acc += p.float()
    return add_rmsnorm_torch(acc.to(residual.dtype), residual, weight, EPS)


def _ulps(a, b) -> int:
    bits = torch.int32 if a.dtype == torch.float32 else torch.int16
    lo = torch.iinfo(bits).min
    ia, ib = (torch.where(t.view(bits) < 0, lo - t.view(bits).long(), t.view(bits).long()) for t in (a, b))
    return int((ia - ib).abs().max())


def _run_methods(rank, world, methods, steps):
    """Per method and call: (ulps of normed vs the rank-order expectation, max |summed - expected|, digest)."""
    from splitserve.comm import fused_norm
    from splitserve.comm.tensor_parallel import TPGroup

    tp = TPGroup.from_group()
    out = {}
    for method in methods:
        rows = []
        for step in range(steps):
            dtype = torch.bfloat16 if step % 2 else torch.float32
            partials, residual, weight = _inputs(step, world, dtype)
            normed, summed = fused_norm.allreduce_add_rmsnorm(partials[rank].clone(), residual, weight, EPS, tp, method)
            want_normed, want_summed = _expected(partials, residual, weight)
            rows.append((_ulps(normed, want_normed), float((summed.float() - want_summed.float()).abs().max()),
                         normed.float().numpy().tobytes() + summed.float().numpy().tobytes()))
        out[method] = rows
    torch.distributed.barrier()  # peers may still be consuming our last signals
    pads_clean = all(int(ws.tensors.pads[p].abs().sum()) == 0 for ws in fused_norm._workspaces.values()
                     for p in range(world))
    fused_norm.release_workspaces()
    return out, pads_clean


def _assert_all_match(results, world, exact_methods, loose_methods):
    per_rank = [r[0] for r in results]
    assert all(r[1] for r in results), "signal pads must be back to zero after every call"
    for method in exact_methods + loose_methods:
        for step, row in enumerate(per_rank[0][method]):
            assert all(r[method][step][2] == row[2] for r in per_rank), f"{method} step {step}: ranks differ"
            ulps, summed_err = row[0], row[1]
            if method in exact_methods:  # the same float32 adds in the same order: identical sums
                allowed = 8 if step % 2 == 0 else 1  # float32 row statistics summed in another order; bfloat16
                assert summed_err == 0 and ulps <= allowed, f"{method} step {step}: {ulps} ulps"
            else:  # gloo sums in its own order (and in bfloat16 for bfloat16)
                assert ulps <= 64 and summed_err <= 0.05, f"{method} step {step}: {ulps} ulps, sum err {summed_err}"


@pytest.mark.skipif(not backend.HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("world", [2, 4])
def test_symmetric_kernels_interpreted(monkeypatch, world):
    """The Triton kernels themselves, repeated: each call's barriers must leave the pads ready for the next."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by the spawned ranks only
    methods = ["symmetric_oneshot", "symmetric_rs"]
    results = run_distributed(_run_methods, world, methods, 8 if world == 2 else 6)
    _assert_all_match(results, world, methods, [])


def test_methods_on_gloo(monkeypatch):
    """Without the interpreter: rs_ag, the torch twins of the symmetric kernels and auto against reference."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    exact = ["symmetric_oneshot", "symmetric_rs", "symmetric"]
    loose = ["reference", "rs_ag", "auto"]
    results = run_distributed(_run_methods, 2, exact + loose, 8)
    _assert_all_match(results, 2, exact, loose)


def test_no_shared_memory_files_left():
    assert glob.glob("/dev/shm/splitserve-symm-*") == []


def test_unknown_method_names_the_option():
    with pytest.raises(ValueError, match="tp_norm_method"):
        check_method("nccl")
