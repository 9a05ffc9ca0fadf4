"""Device memory accounting: weights per device, KV-cache capacity of an instance, and whether a layout fits."""

from __future__ import annotations

from splitserve.placement.hardware import HardwareSpec
from splitserve.placement.parallel import Parallel
from splitserve.placement.specs import ModelSpec

# Like vLLM's gpu_memory_utilization: leave headroom for the allocator, CUDA context and fragmentation.
MEMORY_UTILIZATION = 0.9
# Activation workspace as a fraction of device memory (transient buffers of the largest forward).
ACTIVATION_RESERVE = 0.05


def weight_bytes_per_device(model: ModelSpec, par: Parallel) -> float:
    # SP ranks hold full (TP-sharded) weights, so sp does not divide them.
    return model.weight_bytes() / (par.tp * par.pp)


def kv_bytes_per_token_per_device(model: ModelSpec, par: Parallel) -> float:
    # When tp exceeds the KV head count, KV heads are replicated: each rank still stores one whole head.
    kv_heads_per_rank = -(-model.num_kv_heads // par.tp)
    return 2 * (model.num_layers / par.pp) * kv_heads_per_rank * model.head_dim * model.dtype_bytes


def kv_capacity_tokens(model: ModelSpec, hardware: HardwareSpec, par: Parallel) -> int:
    """Tokens of KV cache an instance can hold; with SP the sequence is sharded, so capacity scales by sp."""
    free = hardware.memory_bytes * (MEMORY_UTILIZATION - ACTIVATION_RESERVE) - weight_bytes_per_device(model, par)
    if free <= 0:
        return 0
    return int(free / kv_bytes_per_token_per_device(model, par)) * par.sp


def memory_problem(model: ModelSpec, hardware: HardwareSpec, par: Parallel, min_tokens: int) -> str | None:
    """Why the layout does not fit in memory with room for `min_tokens` of KV cache, or None."""
    weights = weight_bytes_per_device(model, par)
    budget = hardware.memory_bytes * (MEMORY_UTILIZATION - ACTIVATION_RESERVE)
    if weights >= budget:
        return (f"weights need {weights / 1e9:.1f} GB per device with {par.label()}, "
                f"{hardware.name} has {budget / 1e9:.1f} GB usable")
    capacity = kv_capacity_tokens(model, hardware, par)
    if capacity < min_tokens:
        return (f"KV cache holds {capacity} tokens with {par.label()} on {hardware.name}, "
                f"a single request needs {min_tokens}")
    return None
