"""Shared test setup: one preset cache per checkout, single-threaded torch (2 cores are shared)."""
import os
from pathlib import Path

os.environ.setdefault("SPLITSERVE_CACHE", str(Path(__file__).resolve().parent.parent / ".splitserve-cache"))

import torch  # noqa: E402

torch.set_num_threads(1)
