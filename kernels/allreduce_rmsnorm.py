"""AllReduce + residual add + RMSNorm over symmetric buffers (every rank can address every peer's buffer).

Peers' partial rows are summed in rank order in float32, so every rank gets bitwise-identical rows. One-shot:
every rank reduces all rows. Reduce-scatter form: each rank reduces and normalises its 1/W of the rows and
stores them into every peer's output buffers (RS -> add + RMSNorm -> AG in one kernel). Ranks meet at
signal-pad barriers: slot [program, peer] of a rank's pad goes 0 -> 1 when the peer arrives and back to 0
when the rank consumes it, so the pads are clean after every call."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from splitserve.kernels.add_rmsnorm import add_rmsnorm_torch, check_rows
from splitserve.kernels.backend import triton_module, use_triton

MAX_PROGRAMS = 256  # signal-pad slots per peer; a launch uses at most this many programs


@dataclass
class SymmetricTensors:
    """Each rank's buffers as mapped in this process: `partial`, `normed`, `summed` are [capacity, hidden]
    in the activation dtype; `pads` are int32 [MAX_PROGRAMS * world], zero when idle."""

    rank: int
    partial: list[torch.Tensor]
    normed: list[torch.Tensor]
    summed: list[torch.Tensor]
    pads: list[torch.Tensor]
    _tables: dict = field(default_factory=dict, repr=False)

    @property
    def world(self) -> int:
        return len(self.partial)

    @property
    def capacity(self) -> int:
        return self.partial[0].shape[0]

    def table(self, name: str) -> torch.Tensor:
        """int64 addresses of every rank's `name` buffer, on the buffers' device (built once)."""
        if name not in self._tables:
            ptrs = [t.data_ptr() for t in getattr(self, name)]
            self._tables[name] = torch.tensor(ptrs, dtype=torch.int64, device=self.partial[0].device)
        return self._tables[name]


def num_programs(rows: int, max_programs: int) -> int:
    """Same on every rank for the same call, so program i always meets program i of each peer."""
    return max(1, min(rows, max_programs, MAX_PROGRAMS))


def default_max_programs(device: torch.device) -> int:
    if device.type == "cuda":  # every program resident at once, so a barrier never waits on an unscheduled one
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def check_call(peers: SymmetricTensors, num_rows: int, residual, weight) -> None:
    if not 0 <= num_rows <= peers.capacity:
        raise ValueError(f"num_rows: {num_rows} is outside the symmetric buffers' capacity {peers.capacity}")
    if residual.dim() != 2 or residual.shape[0] != num_rows:
        raise ValueError(f"residual: expected [{num_rows}, hidden], got {tuple(residual.shape)}")
    check_rows(peers.partial[peers.rank][:num_rows], residual, weight)


# --- the torch twins ---------------------------------------------------------------------------------

def _spin_until(pad: torch.Tensor, index: int, value: int) -> None:
    while int(pad[index]) != value:
        time.sleep(0)  # yield the core: peers may share it


def signal_barrier_torch(pads: list[torch.Tensor], rank: int, slot: int = 0) -> None:
    """The kernels' barrier with plain loads and stores: each flag has one writer per direction (the peer
    sets 0 -> 1, the owner 1 -> 0), which is enough on CPUs whose stores become visible in order (x86)."""
    world = len(pads)
    for peer in range(world):
        index = slot * world + rank
        _spin_until(pads[peer], index, 0)
        pads[peer][index] = 1
    for peer in range(world):
        index = slot * world + peer
        _spin_until(pads[rank], index, 1)
        pads[rank][index] = 0


def _reduce_rows(buffers: list[torch.Tensor], rows: slice, dtype) -> torch.Tensor:
    acc = buffers[0][rows].to(torch.float32, copy=True)  # never accumulate into a peer's buffer
    for b in buffers[1:]:  # fixed rank order: identical bits on every rank
        acc += b[rows].float()
    return acc.to(dtype)


def oneshot_torch(peers: SymmetricTensors, num_rows: int, residual, weight, eps: float,
                  max_programs: int | None = None, sync: bool = True):
    check_call(peers, num_rows, residual, weight)
    if sync:
        signal_barrier_torch(peers.pads, peers.rank)
    x = _reduce_rows(peers.partial, slice(0, num_rows), residual.dtype)
    if sync:
        signal_barrier_torch(peers.pads, peers.rank)  # peers are done reading our partial
    return add_rmsnorm_torch(x, residual, weight, eps)


def reduce_scatter_torch(peers: SymmetricTensors, num_rows: int, residual, weight, eps: float,
                         max_programs: int | None = None, sync: bool = True):
    check_call(peers, num_rows, residual, weight)
    per_rank = -(-num_rows // peers.world)
    start = min(num_rows, peers.rank * per_rank)
    mine = slice(start, min(num_rows, start + per_rank))
    if sync:
        signal_barrier_torch(peers.pads, peers.rank)
    normed, summed = add_rmsnorm_torch(_reduce_rows(peers.partial, mine, residual.dtype), residual[mine], weight, eps)
    for peer in range(peers.world):
        peers.normed[peer][mine] = normed
        peers.summed[peer][mine] = summed
    if sync:
        signal_barrier_torch(peers.pads, peers.rank)  # every peer's rows are in our buffers
    return peers.normed[peers.rank][:num_rows].clone(), peers.summed[peers.rank][:num_rows].clone()


# --- dispatch ----------------------------------------------------------------------------------------

def oneshot_allreduce_add_rmsnorm(peers: SymmetricTensors, num_rows: int, residual, weight, eps: float,
                                  max_programs: int | None = None, sync: bool = True):
    """Every rank reduces all `num_rows` rows of the peers' `partial` buffers; returns (normed, summed).
    `sync=False` skips the barriers: only for buffers that are ready and stay unchanged (single-process
    measurements and tests with simulated peers)."""
    if use_triton(residual):
        return triton_module("allreduce_rmsnorm_triton").oneshot_triton(peers, num_rows, residual, weight, eps,
                                                                        max_programs, sync)
    return oneshot_torch(peers, num_rows, residual, weight, eps, max_programs, sync)


def reduce_scatter_allreduce_add_rmsnorm(peers: SymmetricTensors, num_rows: int, residual, weight, eps: float,
                                         max_programs: int | None = None, sync: bool = True):
    """Each rank reduces its ceil(num_rows / W) rows and stores them to every peer; returns (normed, summed)."""
    if use_triton(residual):
        return triton_module("allreduce_rmsnorm_triton").reduce_scatter_triton(peers, num_rows, residual, weight,
                                                                               eps, max_programs, sync)
    return reduce_scatter_torch(peers, num_rows, residual, weight, eps, max_programs, sync)
