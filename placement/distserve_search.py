"""DistServe's own placement search, as its public planner simulator (`simdistserve`) runs it, on its published
A100-80GB OPT profiles: every (cross-node pp, prefill tp·pp, decode tp·pp) it enumerates is simulated as one prefill
instance feeding one decode instance (`distserve_sim.py`), the highest per-GPU rate whose P90 TTFT and P90 TPOT are
both under their SLOs is found by bisection, and the best per-GPU rate wins, fewer GPUs breaking ties.

`splitserve plan --search distserve` runs it; `search.py` is the project's own search.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Callable

from splitserve.placement.distserve_profile import DATA, load_profiles
from splitserve.placement.distserve_sim import PhaseProfile, pair_meets
from splitserve.placement.hardware import ClusterSpec
from splitserve.placement.metrics import SLO
from splitserve.placement.packing import pack_instances
from splitserve.placement.parallel import Parallel
from splitserve.placement.search import Candidate, NoFeasiblePlan, SearchResult
from splitserve.placement.specs import ModelSpec
from splitserve.placement.workload import Trace

Progress = Callable[[int, int, str], None]
KV_WATERMARK = 0.9  # the share of KV tokens their commented-out decode limit allowed


@dataclass(frozen=True)
class DistServeOptions:
    """Their planner's knobs, with the defaults of its command line: rates per GPU bisected in [0, 5] until the
    bracket is at most 0.25 wide."""

    affinity: str = "low"  # high | low: their is_high_affinity flag
    max_per_gpu_rate: float = 5.0
    bisect_width: float = 0.25
    decode_batch_limit: str = "fixed"  # fixed: their 50,000 tokens | kv: the decode instance's KV tokens x 0.9

    def __post_init__(self) -> None:
        if self.affinity not in ("high", "low"):
            raise ValueError(f"affinity: {self.affinity!r} is not high or low")
        if not self.max_per_gpu_rate > 0:
            raise ValueError(f"max_per_gpu_rate: must be positive, got {self.max_per_gpu_rate!r}")
        if self.decode_batch_limit not in ("fixed", "kv"):
            raise ValueError(f"decode_batch_limit: {self.decode_batch_limit!r} is not fixed or kv")
        if not 0 < self.bisect_width < self.max_per_gpu_rate:
            raise ValueError(f"bisect_width: must be in (0, max_per_gpu_rate), got {self.bisect_width!r}")


@dataclass(frozen=True)
class Config:
    """One point of their space: `cross` pipeline segments across nodes, each holding `prefill_pp` stages of tp
    `prefill_tp` and `decode_pp` stages of tp `decode_tp`."""

    cross: int
    prefill_tp: int
    prefill_pp: int
    decode_tp: int
    decode_pp: int

    @property
    def prefill(self) -> Parallel:
        return Parallel(tp=self.prefill_tp, pp=self.cross * self.prefill_pp)

    @property
    def decode(self) -> Parallel:
        return Parallel(tp=self.decode_tp, pp=self.cross * self.decode_pp)

    @property
    def gpus(self) -> int:
        return self.prefill.devices + self.decode.devices


@dataclass(frozen=True)
class Scored:
    config: Config
    per_gpu_rate: float | None  # None: their profiles cannot run it
    reason: str | None = None


@dataclass(frozen=True)
class DistServeChoice:
    best: Scored
    scored: tuple[Scored, ...]

    def ties(self) -> list[Config]:
        """Every config with the winning per-GPU rate and GPU count (their choice among these is arbitrary)."""
        b = self.best
        return [s.config for s in self.scored if s.per_gpu_rate == b.per_gpu_rate and s.config.gpus == b.config.gpus]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_configs(model: ModelSpec, cluster: ClusterSpec, affinity: str) -> list[Config]:
    """Their space: TP divides the heads and PP the layers; with low affinity a segment (both phases' stages of one
    cross-node slice) fits one node and the cross-node depth is at most the node count."""
    tps, pps = _divisors(model.num_heads), _divisors(model.num_layers)
    total, node = cluster.num_devices, cluster.devices_per_node
    limit = total if affinity == "high" else node
    tps, stage_pps = [t for t in tps if t <= limit], [p for p in pps if p <= limit]
    crosses = [1] if affinity == "high" else [p for p in pps if p <= cluster.nodes]
    out = []
    for cross, tp_p, pp_p, tp_d, pp_d in product(crosses, tps, stage_pps, tps, stage_pps):
        segment = tp_p * pp_p + tp_d * pp_d
        if (affinity == "low" and segment > node) or cross * segment > total:
            continue
        if cross * pp_p in pps and cross * pp_d in pps:
            out.append(Config(cross, tp_p, pp_p, tp_d, pp_d))
    return out


class DistServeProfiles:
    """Their step-time fits per TP degree and KV-cache tokens per (tp, pp), for one model."""

    def __init__(self, model: str, path: str | Path = DATA):
        per_model = load_profiles(path)
        if model not in per_model:
            raise ValueError(f"profile: DistServe published no profile for {model!r} (has: {sorted(per_model)})")
        self.by_tp = per_model[model]
        tokens = json.loads(Path(path).read_text())["max_num_tokens"]["models"].get(model, [])
        self.max_tokens = {(tp, pp): n for tp, pp, n in tokens}

    def phase(self, par: Parallel) -> PhaseProfile | str:
        """The phase's profile, or why their simulator refuses the layout."""
        if par.tp not in self.by_tp:
            return f"no TP {par.tp} fit (profiled: {sorted(self.by_tp)})"
        if (par.tp, par.pp) not in self.max_tokens:
            return f"no memory profile for tp{par.tp} pp{par.pp} (does not fit, or not profiled)"
        p = self.by_tp[par.tp]
        return PhaseProfile(p.prefill, p.decode_small, p.decode_large, p.large_batch_from,
                            self.max_tokens[(par.tp, par.pp)])


class DistServeSearch:
    """One model / cluster / trace / SLO question, answered by DistServe's algorithm."""

    def __init__(self, model: ModelSpec, cluster: ClusterSpec, trace: Trace, slo: SLO,
                 options: DistServeOptions = DistServeOptions(), profiles: DistServeProfiles | None = None,
                 progress: Progress | None = None):
        self.model, self.cluster, self.trace, self.slo, self.options = model, cluster, trace, slo, options
        self.profiles = profiles or DistServeProfiles(model.name)
        self.progress = progress

    def meets(self, config: Config, rate: float) -> bool:
        """P90 (their attainment) TTFT and TPOT both strictly under the SLOs at `rate` requests/s."""
        p, d = self.profiles.phase(config.prefill), self.profiles.phase(config.decode)
        if self.options.decode_batch_limit == "kv":
            d = dataclasses.replace(d, decode_batch_tokens=int(d.max_tokens * KV_WATERMARK))
        arrivals = [t * 1e3 for t in self.trace.at_rate(rate)]
        return pair_meets(p, config.prefill.pp, d, config.decode.pp, arrivals, self.trace.prompts, self.trace.outputs,
                          self.slo.ttft * 1e3, self.slo.tpot * 1e3, 100 * self.slo.attainment)

    def score(self, config: Config) -> Scored:
        for par in (config.prefill, config.decode):
            problem = self.profiles.phase(par)
            if isinstance(problem, str):
                return Scored(config, None, problem)
        low, high, best = 0.0, self.options.max_per_gpu_rate, 0.0
        while high - low > self.options.bisect_width:
            mid = (low + high) / 2
            if self.meets(config, mid * config.gpus):
                low = best = mid
            else:
                high = mid
        return Scored(config, best)

    def choose(self) -> DistServeChoice:
        configs = enumerate_configs(self.model, self.cluster, self.options.affinity)
        scored = []
        for i, config in enumerate(configs):
            scored.append(self.score(config))
            if self.progress:
                self.progress(i + 1, len(configs), f"p{config.prefill.label()} d{config.decode.label()}")
        runnable = [s for s in scored if s.per_gpu_rate]
        if not runnable:
            reasons = sorted({s.reason for s in scored if s.reason})
            raise NoFeasiblePlan(f"no feasible plan: no configuration of DistServe's search meets the SLOs at any "
                                 f"probed rate ({'; '.join(reasons[:4]) or 'every rate failed'})")
        best = runnable[0]
        for s in runnable[1:]:
            if s.per_gpu_rate > best.per_gpu_rate or (s.per_gpu_rate == best.per_gpu_rate
                                                      and s.config.gpus < best.config.gpus):
                best = s
        return DistServeChoice(best, tuple(scored))

    def search(self, rate: float | None = None) -> SearchResult:
        """The choice as a plan: the winning prefill/decode pair replicated to fill the cluster, or to serve `rate`."""
        return self.as_result(self.choose(), rate)

    def as_result(self, choice: DistServeChoice, rate: float | None = None) -> SearchResult:
        if rate is not None and not rate > 0:
            raise ValueError(f"rate: must be positive, got {rate!r}")
        c, per_gpu = choice.best.config, choice.best.per_gpu_rate
        pair_rate = per_gpu * c.gpus
        pairs = self.cluster.num_devices // c.gpus if rate is None else math.ceil(rate / pair_rate)
        if pairs * c.gpus > self.cluster.num_devices:
            raise NoFeasiblePlan(f"no feasible plan: rate {rate:g} req/s needs {pairs} x {c.gpus} GPUs at "
                                 f"{per_gpu:g} req/s per GPU; {self.cluster.name} has {self.cluster.num_devices}")
        placements = pack_instances(self.cluster, [("prefill", pairs, c.prefill), ("decode", pairs, c.decode)])
        prefill, decode = Candidate("prefill", c.prefill, pair_rate), Candidate("decode", c.decode, pair_rate)
        return SearchResult("disaggregated", f"distserve_{self.options.affinity}_affinity", prefill, decode, pairs,
                            pairs, pairs * pair_rate, None, 0, placements, (prefill, decode))
