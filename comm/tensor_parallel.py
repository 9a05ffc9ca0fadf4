"""The tensor-parallel group of one model instance and the collectives its parallel layers call."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    """Rank and size within an instance's tensor-parallel group; `group=None` with size 1 means no communication."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tp: rank {self.rank} is outside a group of size {self.size}")
        if self.size > 1 and self.group is None and not dist.is_initialized():
            raise ValueError("tp: size > 1 needs a process group (torch.distributed is not initialised)")

    @classmethod
    def from_group(cls, group: dist.ProcessGroup | None = None) -> "TPGroup":
        """The group's own rank and size (the default world when `group` is None and one exists)."""
        if group is None and not dist.is_initialized():
            return cls()
        return cls(dist.get_rank(group), dist.get_world_size(group), group)


SINGLE = TPGroup()


def all_reduce(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    if tp.size == 1:
        return x
    dist.all_reduce(x, group=tp.group)
    return x


def all_gather_last_dim(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Concatenate every rank's shard of the last dimension, in rank order."""
    if tp.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=-1)
