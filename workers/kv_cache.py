"""KV cache tensors, one [2, blocks, block_size, kv_heads, head_dim] tensor per layer, sized from a byte budget."""
from __future__ import annotations

import torch


def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def num_blocks_for_budget(budget_bytes: int, num_layers, block_size, kv_heads, head_dim, dtype) -> int:
    per_block = bytes_per_block(num_layers, block_size, kv_heads, head_dim, dtype)
    blocks = budget_bytes // per_block
    if blocks < 1:
        raise ValueError(f"kv_cache_bytes: {budget_bytes} bytes is less than one block ({per_block} bytes)")
    return int(blocks)


def cuda_budget(memory_fraction: float, device) -> int:
    """Bytes left for the cache on a GPU once `memory_fraction` of its memory is the process's share."""
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"gpu_memory_fraction: must be in (0, 1], got {memory_fraction}")
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    return max(0, int(total * memory_fraction) - used)


def allocate_kv_cache(num_layers, num_blocks, block_size, kv_heads, head_dim, dtype, device) -> list[torch.Tensor]:
    return [
        torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)
        for _ in range(num_layers)
    ]
