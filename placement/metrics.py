"""Latency SLOs and per-request simulation results: TTFT, TPOT and SLO attainment."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from splitserve.placement.percentiles import percentile


@dataclass(frozen=True)
class SLO:
    """A request attains the SLO when its TTFT and its TPOT are both within bounds (seconds)."""

    ttft: float
    tpot: float
    attainment: float = 0.9

    def __post_init__(self) -> None:
        for field in ("ttft", "tpot"):
            value = getattr(self, field)
            # inf is allowed: it leaves that phase unconstrained (prefill-only or decode-only goodput).
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{field}: SLO must be a positive number of seconds, got {value!r}")
        if not 0 < self.attainment <= 1:
            raise ValueError(f"attainment: must be in (0, 1] (e.g. 0.9), got {self.attainment!r}")


def _fraction_within(values: Sequence[float], bound: float) -> float:
    return sum(1 for v in values if v <= bound) / len(values) if values else 0.0


@dataclass(frozen=True)
class SimResult:
    """Per-request TTFT and TPOT (seconds). TPOT of a one-token output is 0: it has no decode steps."""

    ttft: tuple[float, ...]
    tpot: tuple[float, ...]

    def ttft_attainment(self, slo: SLO) -> float:
        return _fraction_within(self.ttft, slo.ttft)

    def tpot_attainment(self, slo: SLO) -> float:
        return _fraction_within(self.tpot, slo.tpot)

    def attainment(self, slo: SLO) -> float:
        if not self.ttft:
            return 0.0
        ok = sum(1 for f, p in zip(self.ttft, self.tpot) if f <= slo.ttft and p <= slo.tpot)
        return ok / len(self.ttft)

    def mean_ttft(self) -> float:
        return sum(self.ttft) / len(self.ttft) if self.ttft else math.nan

    def mean_tpot(self) -> float:
        return sum(self.tpot) / len(self.tpot) if self.tpot else math.nan

    def summary(self) -> dict[str, float]:
        """Means and p90s in seconds (NaN without requests); attainment stays a fraction of requests."""
        return {"mean_ttft_s": self.mean_ttft(), "p90_ttft_s": _p90(self.ttft),
                "mean_tpot_s": self.mean_tpot(), "p90_tpot_s": _p90(self.tpot)}


def _p90(values: Sequence[float]) -> float:
    return percentile(values, 90) if values else math.nan
