"""Symmetric memory: one equally sized region per rank of a group, mapped into every rank, so a kernel can
read and write peers' buffers through a table of addresses. CUDA uses `torch.distributed._symmetric_memory`;
CPU uses one file per rank in /dev/shm mapped by every process of the group (Triton's interpreter then
dereferences the same host addresses the table holds)."""
from __future__ import annotations

import mmap
import os
import tempfile
import uuid

import torch
import torch.distributed as dist

_ALIGN = 256


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _broadcast_token(group) -> str:
    """A name unique to this allocation, chosen by the group's first rank."""
    token = [uuid.uuid4().hex if dist.get_rank(group) == 0 else None]
    dist.broadcast_object_list(token, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return token[0]


class _HostRegions:
    """Every rank's region as an mmap of its /dev/shm file. Files are unlinked as soon as every rank has
    mapped them, so nothing is left behind even if a process dies; the memory goes with the last mapping."""

    def __init__(self, nbytes: int, group):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        token = _broadcast_token(group)
        paths = [os.path.join(_shm_dir(), f"splitserve-symm-{token}-{r}") for r in range(world)]
        fd = os.open(paths[rank], os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, nbytes)  # zero-filled: signal pads start clean
        finally:
            os.close(fd)
        dist.barrier(group=group)
        self.maps = []
        try:
            for path in paths:
                fd = os.open(path, os.O_RDWR)
                try:
                    self.maps.append(mmap.mmap(fd, nbytes))
                finally:
                    os.close(fd)
        finally:
            dist.barrier(group=group)
            os.unlink(paths[rank])
        self.bases = [torch.frombuffer(m, dtype=torch.uint8) for m in self.maps]

    def region(self, peer: int) -> torch.Tensor:
        return self.bases[peer]


class _CudaRegions:
    """Every rank's region through torch's CUDA symmetric memory (peer mappings set up by its rendezvous)."""

    def __init__(self, nbytes: int, group, device):
        from torch.distributed import _symmetric_memory as symm_mem

        local = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        local.zero_()
        torch.cuda.synchronize(device)
        self.handle = symm_mem.rendezvous(local, group if group is not None else dist.group.WORLD)
        self.bases = [local if p == self.handle.rank else self.handle.get_buffer(p, (nbytes,), torch.uint8, 0)
                      for p in range(self.handle.world_size)]
        dist.barrier(group=group)  # every rank's pads are zero before anyone signals

    def region(self, peer: int) -> torch.Tensor:
        return self.bases[peer]


def cuda_symmetric_available() -> bool:
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


class SymmetricMemory:
    """`nbytes` on every rank of `group` (collective: every rank calls with the same size)."""

    def __init__(self, nbytes: int, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu"):
        if nbytes < 1:
            raise ValueError(f"nbytes: must be positive, got {nbytes}")
        self.device = torch.device(device)
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.nbytes = nbytes
        if self.device.type == "cuda":
            self._regions = _CudaRegions(nbytes, group, self.device)
        elif self.device.type == "cpu":
            self._regions = _HostRegions(nbytes, group)
        else:
            raise ValueError(f"device: symmetric memory supports cpu and cuda, got {self.device}")

    def view(self, peer: int, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Peer's region bytes [offset, offset + size) as a tensor, addressable from this process."""
        assert offset % _ALIGN == 0, "views start on aligned offsets"
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        assert offset + size <= self.nbytes, "view past the end of the region"
        return self._regions.region(peer)[offset : offset + size].view(dtype).view(shape)

    def close(self) -> None:
        """Drops this object's mappings; views still alive keep their memory until they are freed."""
        self._regions = None


class Layout:
    """Packs named [rows, cols] arrays into one region at aligned offsets."""

    def __init__(self):
        self.entries: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        self.nbytes = 0

    def add(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        size = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        self.entries[name] = (self.nbytes, shape, dtype)
        self.nbytes += -(-size // _ALIGN) * _ALIGN

    def views(self, memory: SymmetricMemory, name: str) -> list[torch.Tensor]:
        offset, shape, dtype = self.entries[name]
        return [memory.view(p, offset, shape, dtype) for p in range(memory.world)]
