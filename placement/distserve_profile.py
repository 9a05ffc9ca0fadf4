"""DistServe's own published latency profiles (OPT-13B/66B/175B on A100-80GB, fitted by its authors) as a
LatencyModel, so the planner can be checked against the placements DistServe reported.

The times follow DistServe's simulator: prefill `a + b·Σl + c·Σl²` ms and decode `a + b·Σctx + c·batch` ms (with
separate fits below and above a batch-size threshold) for each TP degree; a pipeline of `pp` stages splits that time
evenly over its stages and adds a fixed cost of `pp` ms per prefill stage (so one prompt's pass costs the TP-only
time plus pp² ms), and decode stages add nothing. Only the profiled TP degrees are offered, without SP.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from splitserve.placement.goodput import decode_goodput, prefill_goodput
from splitserve.placement.latency import LatencyModel
from splitserve.placement.memory import kv_capacity_tokens
from splitserve.placement.parallel import Parallel

DATA = Path(__file__).parent / "data" / "distserve_a100_80g.json"
# DistServe's Table 1 for ShareGPT on 4 nodes x 8 A100-80GB at 90 % attainment:
# model -> (TTFT SLO s, TPOT SLO s, prefill (tp, pp), decode (tp, pp)).
TABLE1 = {"opt-13b": (0.25, 0.1, (2, 1), (1, 1)),
          "opt-66b": (2.5, 0.15, (4, 1), (2, 2)),
          "opt-175b": (4.0, 0.2, (3, 3), (4, 3))}
TABLE1_CLUSTER = "4x8xA100-80GB"


@dataclass(frozen=True)
class _TPProfile:
    prefill: tuple[float, float, float]
    decode_small: tuple[float, float, float]
    decode_large: tuple[float, float, float]
    large_batch_from: int


def load_profiles(path: str | Path = DATA) -> dict[str, dict[int, _TPProfile]]:
    data = json.loads(Path(path).read_text())
    out: dict[str, dict[int, _TPProfile]] = {}
    for model, per_tp in data["models"].items():
        out[model] = {int(tp): _TPProfile(tuple(v["prefill"]), tuple(v["decode_small_batch"]),
                                          tuple(v["decode_large_batch"]), int(v["large_batch_from"]))
                      for tp, v in per_tp.items()}
    return out


class DistServeLatency:
    """Prefill and decode step times from DistServe's fits; KV transfer (which they do not profile) from
    `fallback`."""

    def __init__(self, model: str, fallback: LatencyModel, path: str | Path = DATA):
        profiles = load_profiles(path)
        if model not in profiles:
            raise ValueError(f"profile: DistServe published no profile for {model!r} (has: {sorted(profiles)})")
        self.model, self.fallback = model, fallback
        self.by_tp = profiles[model]
        self.stage_overhead_ms = 1.0

    def layout_problem(self, par: Parallel) -> str | None:
        """Why this model cannot time `par` (None if it can): unprofiled TP degrees and SP."""
        if par.sp > 1:
            return "DistServe's profiles have no sequence parallelism"
        if par.tp not in self.by_tp:
            return f"DistServe profiled TP {sorted(self.by_tp)} for {self.model}, not TP {par.tp}"
        return None

    def _tp(self, par: Parallel) -> _TPProfile:
        problem = self.layout_problem(par)
        if problem:
            raise ValueError(f"profile: {problem}")
        return self.by_tp[par.tp]

    def prefill_time(self, lengths: Sequence[int], par: Parallel, prefixes: Sequence[int] | None = None) -> float:
        a, b, c = self._tp(par).prefill
        prefixes = prefixes or [0] * len(lengths)
        square = sum(l * l + 2 * l * p for l, p in zip(lengths, prefixes))
        ms = a + b * sum(lengths) + c * square
        return (ms + par.pp * par.pp * self.stage_overhead_ms) / 1e3

    def decode_time(self, batch: int, total_context: int, par: Parallel) -> float:
        p = self._tp(par)
        a, b, c = p.decode_large if batch >= p.large_batch_from else p.decode_small
        return (a + b * total_context + c * batch) / 1e3

    def mixed_time(self, lengths: Sequence[int], prefixes: Sequence[int], batch: int, total_context: int,
                   par: Parallel) -> float:
        if not lengths:
            return self.decode_time(batch, total_context, par)
        prefill = self.prefill_time(lengths, par, prefixes)
        return prefill if batch == 0 else prefill + self.decode_time(batch, total_context, par) - \
            self._tp(par).prefill[0] / 1e3

    def kv_transfer_time(self, tokens: int, src: Parallel, dst: Parallel, same_node: bool) -> float:
        return self.fallback.kv_transfer_time(tokens, src, dst, same_node)


def layout_per_device(latency: LatencyModel, model, cluster, trace, slo, role: str, tp: int, pp: int) -> float | None:
    """The simulator's goodput per device of one prefill or decode layout, or None where `latency` cannot time it."""
    par = Parallel(tp=tp, pp=pp)
    problem = getattr(latency, "layout_problem", None)
    if problem and problem(par):
        return None
    if role == "prefill":
        result = prefill_goodput(latency, par, trace, slo)
    else:
        result = decode_goodput(latency, par, trace, slo, kv_capacity_tokens(model, cluster.hardware, par),
                                Parallel(), True)
    return result.rate / par.devices
