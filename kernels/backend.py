"""Chooses between a kernel's Triton version and its torch twin: Triton on CUDA, and on CPU only under
Triton's interpreter (`TRITON_INTERPRET=1`); the twin whenever Triton cannot be imported."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch

# Triton is imported only when a kernel first needs it: the interpreter works only if TRITON_INTERPRET is
# set before the first `import triton` in the process.
HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # an optional extra; a broken install falls back to the twins too
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    if not HAS_TRITON or not (t.is_cuda or (t.device.type == "cpu" and interpreting())):
        return False
    return _importable()


def triton_module(name: str) -> ModuleType:
    """Imports a kernel module on first use and refuses to mix interpreted and compiled kernels in one process."""
    module = importlib.import_module(f"splitserve.kernels.{name}")
    if module.INTERPRETED != interpreting():
        raise RuntimeError(f"kernels.{name} was built with TRITON_INTERPRET={int(module.INTERPRETED)}; "
                           f"it cannot change within a process")
    return module


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between same-dtype float tensors (kernel-vs-twin checks)."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[a.dtype]
    low = torch.iinfo(bits).min

    def ordered(t):
        i = t.contiguous().view(bits).long()
        return torch.where(i < 0, low - i, i)

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0
