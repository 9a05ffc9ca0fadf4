"""Chooses between a kernel's Triton version and its torch twin: Triton on CUDA, and on CPU only under
Triton's interpreter (`TRITON_INTERPRET=1`); the twin whenever Triton cannot be imported."""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # Triton is an optional extra
    HAS_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    if not HAS_TRITON:
        return False
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def triton_module(name: str) -> ModuleType:
    """Imports a kernel module on first use, so `TRITON_INTERPRET` is read when a kernel is first needed
    rather than when the package is imported; refuses to mix modes within one process."""
    module = importlib.import_module(f"splitserve.kernels.{name}")
    if module.INTERPRETED != interpreting():
        raise RuntimeError(f"kernels.{name} was built with TRITON_INTERPRET={int(module.INTERPRETED)}; "
                           f"it cannot change within a process")
    return module
