"""Least squares by the normal equations, in pure Python (small systems; no need for numpy here)."""

from __future__ import annotations

import math
from typing import Sequence


def solve(matrix: Sequence[Sequence[float]], rhs: Sequence[float]) -> list[float]:
    """Solve a small dense square system by Gaussian elimination with partial pivoting."""
    n = len(matrix)
    a = [list(map(float, row)) + [float(rhs[i])] for i, row in enumerate(matrix)]
    assert all(len(row) == n + 1 for row in a), "matrix must be square and match rhs"
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            raise ValueError("samples: the fit is singular (too few distinct measurements for the coefficients)")
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            factor = a[r][col] / a[col][col]
            if factor:
                for c in range(col, n + 1):
                    a[r][c] -= factor * a[col][c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (a[r][n] - sum(a[r][c] * x[c] for c in range(r + 1, n))) / a[r][r]
    return x


def least_squares(rows: Sequence[Sequence[float]], targets: Sequence[float],
                  weights: Sequence[float] | None = None) -> list[float]:
    """Coefficients minimising Σ w·(row·x − target)² (w = 1 without `weights`). Columns are scaled to unit max
    first: Σl² reaches 1e7 while the intercept column is 1, and unscaled normal equations would lose most of their
    digits."""
    if len(rows) != len(targets):
        raise ValueError(f"samples: {len(rows)} feature rows but {len(targets)} measurements")
    if not rows:
        raise ValueError("samples: no measurements to fit")
    k = len(rows[0])
    if len(rows) < k:
        raise ValueError(f"samples: need at least {k} measurements to fit {k} coefficients, got {len(rows)}")
    w = [1.0] * len(rows) if weights is None else weights
    scale = [max(abs(row[j]) for row in rows) or 1.0 for j in range(k)]
    scaled = [[row[j] / scale[j] for j in range(k)] for row in rows]
    normal = [[sum(wi * r[i] * r[j] for r, wi in zip(scaled, w)) for j in range(k)] for i in range(k)]
    moment = [sum(wi * r[i] * y for r, y, wi in zip(scaled, targets, w)) for i in range(k)]
    x = solve(normal, moment)
    return [x[j] / scale[j] for j in range(k)]


def nonnegative_least_squares(rows: Sequence[Sequence[float]], targets: Sequence[float],
                              weights: Sequence[float] | None = None) -> list[float]:
    """Least squares with every coefficient >= 0, for the few coefficients of a latency fit: the best of the
    unconstrained fits over each subset of columns (the others held at 0) whose coefficients are all >= 0. A time
    model with a negative term would predict negative times on shapes outside the measured ones."""
    k = len(rows[0]) if rows else 0
    w = [1.0] * len(rows) if weights is None else weights
    best, best_error = None, math.inf
    for mask in range(1, 1 << k):
        cols = [j for j in range(k) if mask >> j & 1]
        try:
            sub = least_squares([[row[j] for j in cols] for row in rows], targets, weights)
        except ValueError:
            continue
        if min(sub) < 0:
            continue
        x = [0.0] * k
        for j, v in zip(cols, sub):
            x[j] = v
        error = sum(wi * (sum(r[j] * x[j] for j in range(k)) - y) ** 2 for r, y, wi in zip(rows, targets, w))
        if error < best_error:
            best, best_error = x, error
    if best is None:
        raise ValueError("samples: no fit with non-negative coefficients (are the measured times positive?)")
    return best
