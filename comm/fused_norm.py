"""The all-reduce that ends a row-parallel layer fused with the residual add + RMSNorm that follows it:
one entry point, several methods (plain all-reduce, RS -> norm -> AG, symmetric-memory kernels)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from splitserve.comm.symmetric import Layout, SymmetricMemory, cuda_symmetric_available
from splitserve.comm.tensor_parallel import TPGroup
from splitserve.kernels.add_rmsnorm import add_rmsnorm
from splitserve.kernels.allreduce_rmsnorm import (MAX_PROGRAMS, SymmetricTensors, oneshot_allreduce_add_rmsnorm,
                                                  reduce_scatter_allreduce_add_rmsnorm)

METHODS = ("reference", "rs_ag", "symmetric", "symmetric_oneshot", "symmetric_rs", "auto")
ONESHOT_MAX_BYTES = 512 << 10  # below this one-shot wins on GPUs (fewer steps); above, each rank reduces 1/W
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"tp_norm_method: must be one of {', '.join(METHODS)}, got {method!r}")
    return method


class Pending:
    """An issued reduction; `wait()` returns (normed, summed). `finish` runs after the collective completes."""

    def __init__(self, work, finish):
        self._work, self._finish = work, finish

    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._work is not None:
            self._work.wait()
        return self._finish()


def _done(result) -> Pending:
    return Pending(None, lambda: result)


def _reference(x, residual, weight, eps, tp: TPGroup) -> Pending:
    work = dist.all_reduce(x, group=tp.group, async_op=True)
    return Pending(work, lambda: add_rmsnorm(x, residual, weight, eps))


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _rs_ag(x, residual, weight, eps, tp: TPGroup) -> Pending:
    """Each rank normalises 1/W of the tokens (padded to a multiple of W), then one all-gather of
    [normed | summed] gives every rank all rows."""
    tokens, hidden = x.shape
    per_rank = -(-tokens // tp.size)
    mine = torch.empty(per_rank, hidden, dtype=x.dtype, device=x.device)
    work = _reduce_scatter(mine, _pad_rows(x, per_rank * tp.size), group=tp.group, async_op=True)

    def finish():
        own = _pad_rows(residual[tp.rank * per_rank : (tp.rank + 1) * per_rank], per_rank)
        normed, summed = add_rmsnorm(mine, own, weight, eps)
        gathered = torch.empty(tp.size * per_rank, 2 * hidden, dtype=x.dtype, device=x.device)
        _all_gather(gathered, torch.cat([normed, summed], dim=1), group=tp.group)
        return gathered[:tokens, :hidden], gathered[:tokens, hidden:]

    return Pending(work, finish)


class _Workspace:
    """Symmetric partial / normed / summed buffers plus signal pads for one (group, hidden, dtype, device)."""

    def __init__(self, tp: TPGroup, capacity: int, hidden: int, dtype, device):
        layout = Layout()
        layout.add("pads", (MAX_PROGRAMS * tp.size,), torch.int32)
        for name in ("partial", "normed", "summed"):
            layout.add(name, (capacity, hidden), dtype)
        self.memory = SymmetricMemory(layout.nbytes, tp.group, device)
        self.group, self.capacity = tp.group, capacity
        self.tensors = SymmetricTensors(tp.rank, *(layout.views(self.memory, n)
                                                   for n in ("partial", "normed", "summed", "pads")))


_workspaces: dict[tuple, _Workspace] = {}


def workspace(tp: TPGroup, rows: int, hidden: int, dtype, device) -> SymmetricTensors:
    """The group's buffers, grown (collectively: every rank asks for the same rows) to a power of two."""
    key = (id(tp.group), hidden, dtype, torch.device(device))
    ws = _workspaces.get(key)
    if ws is None or ws.group is not tp.group or ws.capacity < rows:
        capacity = max(64, 1 << (rows - 1).bit_length())
        _workspaces[key] = ws = _Workspace(tp, capacity, hidden, dtype, device)
    return ws.tensors


def release_workspaces() -> None:
    for ws in _workspaces.values():
        ws.memory.close()
    _workspaces.clear()


def _symmetric(x, residual, weight, eps, tp: TPGroup, form: str) -> Pending:
    tokens, hidden = x.shape
    peers = workspace(tp, tokens, hidden, x.dtype, x.device)
    peers.partial[tp.rank][:tokens].copy_(x)
    if form == "symmetric":
        form = "symmetric_oneshot" if x.numel() * x.element_size() <= ONESHOT_MAX_BYTES else "symmetric_rs"
    fused = oneshot_allreduce_add_rmsnorm if form == "symmetric_oneshot" else reduce_scatter_allreduce_add_rmsnorm
    return _done(fused(peers, tokens, residual.contiguous(), weight, eps))


def resolve_method(method: str, x: torch.Tensor) -> str:
    """`auto`: the fused symmetric kernels where CUDA symmetric memory exists, else a plain all-reduce
    (on gloo the all-reduce already runs as reduce-scatter + all-gather internally)."""
    if method != "auto":
        return method
    return "symmetric" if x.is_cuda and cuda_symmetric_available() else "reference"


def allreduce_add_rmsnorm_async(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                                group: TPGroup, method: str = "reference") -> Pending:
    """Issues the reduction of `x` (this rank's partial [tokens, hidden], consumed) over `group`; the returned
    handle's `wait()` gives (norm(sum + residual), sum + residual), identical on every rank."""
    check_method(method)
    if group.size == 1:  # nothing to reduce (a TP = 1 model): only the fused add + RMSNorm
        return _done(add_rmsnorm(x, residual, weight, eps))
    method = resolve_method(method, x)
    if x.dim() != 2:
        raise ValueError(f"x: expected [tokens, hidden], got shape {tuple(x.shape)}")
    if method == "reference":
        return _reference(x, residual, weight, eps, group)
    if method == "rs_ag":
        return _rs_ag(x, residual, weight, eps, group)
    return _symmetric(x, residual, weight, eps, group, method)


def allreduce_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                          group: TPGroup, method: str = "reference") -> tuple[torch.Tensor, torch.Tensor]:
    return allreduce_add_rmsnorm_async(x, residual, weight, eps, group, method).wait()
