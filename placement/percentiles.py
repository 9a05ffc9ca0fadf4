"""The one percentile definition of the project, shared by the planner's simulator reports and the cluster's
bench and batch reports, so a predicted and a measured p90 mean the same thing."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (q in [0, 100]) of `values`, interpolating linearly between the two closest ranks:
    numpy's default (`method="linear"`), i.e. position (n - 1) * q / 100 in the sorted values. ValueError without
    values: callers decide what an empty sample reports."""
    if len(values) == 0:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q: must be in [0, 100], got {q!r}")
    return float(np.percentile(np.asarray(values, dtype=float), q, method="linear"))
