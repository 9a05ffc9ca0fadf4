"""Latency fits that survive a noisy machine: repeated measurements per shape reduced to their median, a
non-negative least-squares fit on relative errors with outliers down-weighted (Huber, by iteratively reweighted
least squares), and bootstrap confidence intervals per coefficient."""
from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from typing import Sequence

from splitserve.placement.linalg import least_squares, nonnegative_least_squares

HUBER_K = 1.345  # 95 % efficiency under Gaussian noise
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class Shape:
    """One measured shape: its feature row and every repeat's time (seconds)."""

    features: tuple[float, ...]
    times: tuple[float, ...]


@dataclass(frozen=True)
class FitReport:
    coefficients: tuple[float, ...]
    low: tuple[float, ...]  # bootstrap percentile interval; equal to the fit when not bootstrapped
    high: tuple[float, ...]
    level: float
    shapes: int
    samples: int
    relative_residual: float  # robust spread (1.4826·MAD) of (fit − median) / median over the shapes
    resamples: int
    draws: tuple[tuple[float, ...], ...] = ()  # the bootstrap fits, to carry the uncertainty into predictions


def group(rows: Sequence[Sequence[float]], times: Sequence[float]) -> list[Shape]:
    """Measurements of the same feature row (repeats) put together, in first-seen order."""
    shapes: dict[tuple[float, ...], list[float]] = {}
    for row, t in zip(rows, times):
        shapes.setdefault(tuple(float(v) for v in row), []).append(float(t))
    return [Shape(k, tuple(v)) for k, v in shapes.items()]


def _relative_residuals(x: Sequence[float], rows, targets) -> list[float]:
    return [(sum(r * c for r, c in zip(row, x)) - y) / y for row, y in zip(rows, targets)]


def robust_nonnegative_fit(rows: Sequence[Sequence[float]], targets: Sequence[float],
                           iterations: int = 30) -> list[float]:
    """Non-negative coefficients minimising the Huber loss of the relative errors (fit − t) / t. Relative: a step
    of 10 ms and one of 100 ms are measured with about the same relative noise, and a plain fit would let the
    largest shapes decide the smallest ones' times. Huber: a shape the machine slowed down is down-weighted
    rather than followed."""
    if any(t <= 0 for t in targets):
        raise ValueError("samples: measured times must be positive")
    base = [1.0 / (t * t) for t in targets]
    x = nonnegative_least_squares(rows, targets, base)
    for _ in range(iterations):
        residuals = _relative_residuals(x, rows, targets)
        sigma = MAD_TO_SIGMA * statistics.median(abs(r) for r in residuals)
        if sigma <= 1e-12:
            break  # (nearly) exact: nothing to down-weight
        cut = HUBER_K * sigma
        weights = [b * (1.0 if abs(r) <= cut else cut / abs(r)) for b, r in zip(base, residuals)]
        new = nonnegative_least_squares(rows, targets, weights)
        done = all(abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1e-300) for a, b in zip(new, x))
        x = new
        if done:
            break
    return x


def fit_shapes(shapes: Sequence[Shape], resamples: int = 200, level: float = 0.95, seed: int = 0) -> FitReport:
    """The robust fit over each shape's median time, and a percentile interval per coefficient from a two-stage
    bootstrap: shapes drawn with replacement, and for each drawn shape its repeats drawn with replacement (so the
    interval holds both the noise of the repeats and how far the shapes stray from the functional form)."""
    if not shapes:
        raise ValueError("samples: no measurements to fit")
    rows = [s.features for s in shapes]
    medians = [statistics.median(s.times) for s in shapes]
    x = robust_nonnegative_fit(rows, medians)
    residuals = _relative_residuals(x, rows, medians)
    spread = MAD_TO_SIGMA * statistics.median(abs(r) for r in residuals)
    draws = []
    rng = random.Random(seed)
    for _ in range(resamples):
        picked = [shapes[rng.randrange(len(shapes))] for _ in shapes]
        sub_rows = [s.features for s in picked]
        sub_times = [statistics.median(rng.choice(s.times) for _ in s.times) for s in picked]
        try:
            least_squares(sub_rows, sub_times)  # raises if the drawn shapes cannot tell the coefficients apart
            draws.append(robust_nonnegative_fit(sub_rows, sub_times))
        except ValueError:
            continue  # such a draw says nothing about the coefficients (e.g. one shape drawn every time)
    low, high = tuple(x), tuple(x)
    if draws:
        tail = (1 - level) / 2
        columns = [sorted(d[j] for d in draws) for j in range(len(x))]
        low = tuple(_quantile(c, tail) for c in columns)
        high = tuple(_quantile(c, 1 - tail) for c in columns)
    return FitReport(tuple(x), low, high, level, len(shapes), sum(len(s.times) for s in shapes), spread,
                     len(draws), tuple(tuple(d) for d in draws))


def _quantile(ordered: Sequence[float], q: float) -> float:
    position = (len(ordered) - 1) * q
    lo = int(position)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)
