"""Placement search: DistServe's Algorithm 1 (high node-affinity) and Algorithm 2 (low node-affinity) over
per-phase (TP, PP) plus prefill SP, the best colocated layout for comparison, and a brute force for tests."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

from splitserve.placement.goodput import (Goodput, SimSettings, colocated_goodput, decode_goodput, max_rate,
                                          prefill_goodput)
from splitserve.placement.hardware import ClusterSpec
from splitserve.placement.latency import LatencyModel, cheaper_sp_algorithm
from splitserve.placement.launch_checks import launch_shape_problem
from splitserve.placement.memory import kv_capacity_tokens, memory_problem
from splitserve.placement.metrics import SLO
from splitserve.placement.packing import InstancePlacement, pack_instances, pack_units
from splitserve.placement.parallel import Parallel, layout_problem
from splitserve.placement.simulator import simulate_decode, simulate_disaggregated, simulate_prefill
from splitserve.placement.specs import ModelSpec
from splitserve.placement.workload import Trace, extend_trace

# High node-affinity when a prefill device, running flat out, would fill at most this share of its
# inter-node link with KV: then moving KV across nodes is cheap and phases can be placed independently.
AFFINITY_LINK_SHARE = 0.5
VERIFY_MAX_REQUESTS = 8000
Progress = Callable[[int, int, str], None]


class NoFeasiblePlan(ValueError):
    """No layout meets the SLOs on this cluster; the message carries the reasons."""


@dataclass(frozen=True)
class Candidate:
    role: str  # prefill | decode | colocated
    par: Parallel
    goodput: float  # requests/s of one instance
    reason: str | None = None  # why it is infeasible (goodput 0)
    same_node_kv: bool = True

    @property
    def devices(self) -> int:
        return self.par.devices

    @property
    def per_device(self) -> float:
        return self.goodput / self.devices


@dataclass(frozen=True)
class SearchOptions:
    num_requests: int = 400
    seed: int = 0
    affinity: str = "auto"  # auto | high | low
    sp_degrees: tuple[int, ...] = (1, 2, 4, 8)
    max_pp: int | None = None
    settings: SimSettings = SimSettings()

    def __post_init__(self) -> None:
        if self.affinity not in ("auto", "high", "low"):
            raise ValueError(f"affinity: {self.affinity!r} is not auto, high or low")
        if self.num_requests < 20:
            raise ValueError(f"num_requests: need at least 20 simulated requests, got {self.num_requests}")


@dataclass(frozen=True)
class SearchResult:
    mode: str  # disaggregated | colocated: the better of the two per device
    algorithm: str  # high_affinity | low_affinity
    prefill: Candidate | None  # None only when no disaggregated plan is feasible and colocated is
    decode: Candidate | None
    prefill_instances: int
    decode_instances: int
    goodput: float  # requests/s of the disaggregated deployment: min over phases
    colocated: Candidate | None
    colocated_instances: int
    placements: tuple[InstancePlacement, ...]
    candidates: tuple[Candidate, ...] = field(repr=False)
    verified_attainment: float | None = None  # end-to-end simulation of the chosen deployment
    verified_rate: float | None = None

    @property
    def devices(self) -> int:
        """Devices of the disaggregated deployment."""
        if self.prefill is None or self.decode is None:
            return 0
        return self.prefill_instances * self.prefill.devices + self.decode_instances * self.decode.devices

    @property
    def goodput_per_device(self) -> float:
        return self.goodput / self.devices if self.devices else 0.0


class Planner:
    """Holds one model/cluster/workload/SLO question and caches per-layout goodputs across algorithms."""

    def __init__(self, model: ModelSpec, cluster: ClusterSpec, latency: LatencyModel, trace: Trace, slo: SLO,
                 options: SearchOptions = SearchOptions(), progress: Progress | None = None):
        self.model, self.cluster, self.latency, self.trace, self.slo = model, cluster, latency, trace, slo
        self.options = options
        self.progress = progress
        self._cache: dict[tuple, Candidate] = {}
        self._done = 0
        self._total = 0
        self._max_prompt = max(trace.prompts)
        self._max_request = max(p + o for p, o in zip(trace.prompts, trace.outputs))

    # -- the space ---------------------------------------------------------------------------------------
    def layouts(self, role: str) -> list[Parallel]:
        """Every layout of a role that fits the cluster and that an instance can launch with (`launch_checks`: TP
        over heads, MLP width and KV heads); memory is checked when it is evaluated, so it shows as a reason."""
        c, m = self.cluster, self.model
        max_pp = min(self.options.max_pp or m.num_layers, m.num_layers)
        out = []
        for tp in range(1, c.devices_per_node + 1):
            for pp in range(1, max_pp + 1):
                sps = self.options.sp_degrees if role == "prefill" else (1,)
                for sp in sps:
                    if tp * sp > c.devices_per_node or tp * sp * pp > c.num_devices:
                        continue
                    algorithm = cheaper_sp_algorithm(m, tp) if sp > 1 else "none"
                    par = Parallel(tp=tp, pp=pp, sp=sp, sp_algorithm=algorithm)
                    if (layout_problem(m, c, par) is None and launch_shape_problem(m, par) is None
                            and _power_of_two_or_divides(par, c)):
                        out.append(par)
        return out

    # -- evaluation --------------------------------------------------------------------------------------
    def _tick(self, label: str) -> None:
        self._done += 1
        if self.progress:
            self.progress(self._done, max(self._total, self._done), label)

    def evaluate(self, role: str, par: Parallel, same_node_kv: bool = True) -> Candidate:
        key = (role, par, same_node_kv if role == "decode" else True)
        if key in self._cache:
            return self._cache[key]
        hw = self.cluster.hardware
        need = self._max_prompt if role == "prefill" else self._max_request
        problem = memory_problem(self.model, hw, par, need)
        timing = getattr(self.latency, "layout_problem", None)  # a profile that times only some layouts
        problem = problem or (timing(par) if timing else None)
        if problem:
            result = Goodput(0.0, problem)
        elif role == "prefill":
            result = prefill_goodput(self.latency, par, self.trace, self.slo, self.options.settings)
        elif role == "decode":
            result = decode_goodput(self.latency, par, self.trace, self.slo, kv_capacity_tokens(self.model, hw, par),
                                    Parallel(), same_node_kv, self.options.settings)
        else:
            result = colocated_goodput(self.latency, par, self.trace, self.slo,
                                       kv_capacity_tokens(self.model, hw, par), self.options.settings)
        if result.rate == 0 and result.reason is None:
            result = Goodput(0.0, "SLO attainment not reached even at a very low rate")
        candidate = Candidate(role, par, result.rate, result.reason, key[2])
        self._cache[key] = candidate
        self._tick(f"{role} {par.label()}")
        return candidate

    def affinity(self) -> str:
        if self.options.affinity != "auto":
            return self.options.affinity
        if self.cluster.nodes == 1:
            return "high"  # one node: every KV transfer is intra-node anyway
        mean_prompt = int(sum(self.trace.prompts) / len(self.trace))
        try:
            seconds = self.latency.prefill_time([mean_prompt], Parallel())
        except ValueError:
            return "low"
        kv_rate = mean_prompt * self.model.kv_bytes_per_token() / seconds
        share = kv_rate / self.cluster.hardware.inter_node_bandwidth
        return "high" if share <= AFFINITY_LINK_SHARE else "low"

    # -- algorithms --------------------------------------------------------------------------------------
    def high_affinity(self, rate: float | None) -> SearchResult:
        """Algorithm 1: each phase's layout chosen independently. For a target rate, the layout needing the fewest
        devices for it (⌈R/goodput⌉ instances; for large R this is the best goodput per device); without one, the
        pair whose replicas fill the cluster with the most goodput."""
        same_node = self.cluster.nodes == 1
        prefills = [self.evaluate("prefill", p) for p in self.layouts("prefill")]
        decodes = [self.evaluate("decode", p, same_node) for p in self.layouts("decode")]
        ranked_p, ranked_d = _ranked(prefills, "prefill"), _ranked(decodes, "decode")
        if rate is not None:
            p, d = _fewest_devices(ranked_p, rate), _fewest_devices(ranked_d, rate)
            options = [(p, d, math.ceil(rate / p.goodput), math.ceil(rate / d.goodput))]
        else:
            options = self._fills(ranked_p, ranked_d)
        failure = None
        for p, d, n, m in options:
            used = n * p.devices + m * d.devices
            if used > self.cluster.num_devices:
                failure = (f"rate {rate:g} req/s needs {n} prefill x {p.devices} + {m} decode x {d.devices} = "
                           f"{used} devices; {self.cluster.name} has {self.cluster.num_devices}")
                continue
            try:
                placements = pack_instances(self.cluster, [("prefill", n, p.par), ("decode", m, d.par)])
            except ValueError as exc:
                failure = failure or str(exc)
                continue
            return SearchResult("disaggregated", "high_affinity", p, d, n, m, min(n * p.goodput, m * d.goodput),
                                None, 0, placements, tuple(prefills + decodes))
        raise NoFeasiblePlan(f"no feasible plan: {failure or 'no prefill and decode instance fit together'}")

    def _fills(self, ranked_p: list[Candidate], ranked_d: list[Candidate]) -> list[tuple]:
        """(prefill, decode, n, m) filling the cluster, best total goodput first; ties keep the ranking order."""
        total = self.cluster.num_devices
        options = []
        for i, p in enumerate(ranked_p):
            for j, d in enumerate(ranked_d):
                for n in range(1, (total - d.devices) // p.devices + 1):
                    m = (total - n * p.devices) // d.devices
                    goodput = min(n * p.goodput, m * d.goodput)
                    options.append((-round(goodput, 9), n * p.devices + m * d.devices, i, j, n, m))
        options.sort()
        return [(ranked_p[i], ranked_d[j], n, m) for _, _, i, j, n, m in options]

    def low_affinity(self, rate: float | None) -> SearchResult:
        """Algorithm 2: stage s of a unit's prefill and decode instances share a node, so KV moves inside it. A unit
        is n prefill and m decode instances of the same pp whose stage segments fit one node together."""
        node = self.cluster.devices_per_node
        evaluated: list[Candidate] = []
        best = None
        for p_par in self.layouts("prefill"):
            for d_par in self.layouts("decode"):
                if d_par.pp != p_par.pp or p_par.stage_devices + d_par.stage_devices > node:
                    continue
                p, d = self.evaluate("prefill", p_par), self.evaluate("decode", d_par, True)
                evaluated += [p, d]
                if not (p.goodput and d.goodput):
                    continue
                for n_u, m_u in _unit_shapes(p, d, node):
                    segment = n_u * p.par.stage_devices + m_u * d.par.stage_devices
                    capacity = self.cluster.nodes * (node // segment) // p.par.pp
                    unit_rate = min(n_u * p.goodput, m_u * d.goodput)
                    units = capacity if rate is None else math.ceil(rate / unit_rate)
                    if units == 0 or units > capacity:
                        continue
                    # Target rate: fewest devices; no target: most goodput from the cluster.
                    score = (units * segment * p.par.pp, -unit_rate) if rate else (-units * unit_rate, segment)
                    if best is None or score < best[0]:
                        best = (score, p, d, n_u, m_u, units, unit_rate)
        if best is None:
            reasons = _reasons("low node-affinity unit", evaluated)
            raise NoFeasiblePlan(reasons if rate is None else f"{reasons}; or rate {rate:g} needs more devices "
                                 f"than {self.cluster.name} has")
        _, p, d, n_u, m_u, units, unit_rate = best
        placements = pack_units(self.cluster, units, p.par, n_u, d.par, m_u)
        return SearchResult("disaggregated", "low_affinity", p, d, units * n_u, units * m_u, units * unit_rate,
                            None, 0, placements, tuple(dict.fromkeys(evaluated)))

    def best_colocated(self, rate: float | None) -> tuple[Candidate | None, int, list[Candidate]]:
        layouts = [p for p in self.layouts("decode") if p.pp == 1]
        evaluated = [self.evaluate("colocated", p) for p in layouts]
        feasible = [c for c in evaluated if c.goodput > 0]
        if not feasible:
            return None, 0, evaluated
        if rate is not None:
            best = _fewest_devices(_ranked(feasible, "colocated"), rate)
            return best, math.ceil(rate / best.goodput), evaluated
        total = self.cluster.num_devices
        best = max(feasible, key=lambda c: (round((total // c.devices) * c.goodput, 9), -c.devices))
        return best, total // best.devices, evaluated

    # -- the whole search -------------------------------------------------------------------------------
    def search(self, rate: float | None = None, verify: bool = True) -> SearchResult:
        """The disaggregated plan by the algorithm the cluster's affinity calls for, the best colocated plan on the
        same devices, and whichever serves the target with fewer devices (or, with no target, more goodput)."""
        if rate is not None and not rate > 0:
            raise ValueError(f"rate: must be positive, got {rate!r}")
        p_layouts, d_layouts = self.layouts("prefill"), self.layouts("decode")
        if not p_layouts or not d_layouts:
            raise NoFeasiblePlan(f"no feasible plan: no valid layout of {self.model.name} on {self.cluster.name} "
                                 f"({layout_problem(self.model, self.cluster, Parallel())})")
        self._total = len(p_layouts) + len(d_layouts) + sum(1 for p in d_layouts if p.pp == 1)
        colocated, colocated_n, colocated_eval = self.best_colocated(rate)
        try:
            result = self.high_affinity(rate) if self.affinity() == "high" else self.low_affinity(rate)
        except NoFeasiblePlan as exc:
            if colocated is None or colocated_n * colocated.devices > self.cluster.num_devices:
                raise
            placements = pack_instances(self.cluster, [("colocated", colocated_n, colocated.par)])
            return SearchResult("colocated", f"none ({exc})", None, None, 0, 0, 0.0, colocated, colocated_n,
                                placements, tuple(self._cache.values()))
        mode = "disaggregated"
        if colocated is not None and colocated_n * colocated.devices <= self.cluster.num_devices:
            colocated_total = colocated_n * colocated.goodput
            if (rate is None and colocated_total > result.goodput) or (
                    rate is not None and colocated_n * colocated.devices < result.devices):
                mode = "colocated"
        placements = result.placements
        if mode == "colocated":
            placements = pack_instances(self.cluster, [("colocated", colocated_n, colocated.par)])
        result = SearchResult(mode, result.algorithm, result.prefill, result.decode, result.prefill_instances,
                              result.decode_instances, result.goodput, colocated, colocated_n, placements,
                              result.candidates + tuple(colocated_eval))
        return self._verify(result, rate) if verify else result

    def _verify(self, result: SearchResult, rate: float | None) -> SearchResult:
        """Simulate the disaggregated deployment end to end: per-phase goodputs each ignore the other phase's SLO."""
        check_rate = rate if rate is not None else result.goodput
        hw = self.cluster.hardware
        same_node = result.algorithm == "low_affinity" or self.cluster.nodes == 1
        # Enough requests that every instance sees a queue's worth, resampled from the search trace.
        size = min(VERIFY_MAX_REQUESTS, len(self.trace) * max(result.prefill_instances, result.decode_instances))
        trace = self.trace if size <= len(self.trace) else extend_trace(self.trace, size, self.options.seed)
        sim = simulate_disaggregated(self.latency, trace, check_rate, result.prefill.par, result.decode.par,
                                     result.prefill_instances, result.decode_instances,
                                     kv_capacity_tokens(self.model, hw, result.decode.par), same_node,
                                     self.options.settings.prefill_token_budget, self.options.settings.max_batch)
        return dataclasses.replace(result, verified_attainment=sim.attainment(self.slo), verified_rate=check_rate)


def _power_of_two_or_divides(par: Parallel, cluster: ClusterSpec) -> bool:
    # Stage sizes that neither divide a node nor are powers of two fragment nodes; the paper's space skips them.
    size = par.stage_devices
    return cluster.devices_per_node % size == 0 or size & (size - 1) == 0


def _ranked(candidates: list[Candidate], role: str) -> list[Candidate]:
    """Feasible layouts, best goodput per device first; ties go to the smaller instance, then fewer stages."""
    feasible = [c for c in candidates if c.goodput > 0]
    if not feasible:
        raise NoFeasiblePlan(_reasons(role, candidates))
    return sorted(feasible, key=lambda c: (-round(c.per_device, 9), c.devices, c.par.pp, c.par.sp, c.par.tp))


def _fewest_devices(ranked: list[Candidate], rate: float) -> Candidate:
    """The layout needing the fewest devices for `rate`; ties go to the better goodput per device (ranked order)."""
    return min(ranked, key=lambda c: math.ceil(rate / c.goodput) * c.devices)


def _unit_shapes(p: Candidate, d: Candidate, node: int) -> list[tuple[int, int]]:
    """(prefill count, decode count) whose stage segments fit one node together."""
    return [(n, m) for n in range(1, node // p.par.stage_devices + 1)
            for m in range(1, (node - n * p.par.stage_devices) // d.par.stage_devices + 1)]


def _reasons(what: str, candidates: list[Candidate]) -> str:
    reasons = sorted({f"{c.role} {c.par.label()}: {c.reason}" for c in candidates if c.reason})
    shown = "; ".join(reasons[:6]) + (f"; ... {len(reasons) - 6} more" if len(reasons) > 6 else "")
    return f"no feasible plan: no {what} layout meets the SLOs ({shown or 'goodput 0 everywhere'})"


def brute_force(planner: Planner, rate: float, start: float = 0.01, rate_grid: float = 1.02
                ) -> tuple[int, set[tuple[Parallel, Parallel]]]:
    """Fewest devices that serve `rate`, and every (prefill, decode) layout pair achieving it, by exhaustion: each
    phase's goodput by an upward scan over a geometric rate grid from `start` (no bracketing, no bisection), then
    every pair and every instance count. For tests on small spaces; it is slow."""
    same_node = planner.cluster.nodes == 1
    opts = planner.options.settings
    hw, trace, slo, lat = planner.cluster.hardware, planner.trace, planner.slo, planner.latency

    def prefill_ok(par: Parallel, r: float) -> float:
        arrivals = trace.at_rate(r)
        done = simulate_prefill(lat, par, arrivals, trace.prompts, 1, opts.prefill_token_budget)
        return sum(1 for e, a in zip(done, arrivals) if e - a <= slo.ttft) / len(arrivals)

    def decode_ok(par: Parallel, r: float) -> float:
        arrivals = trace.at_rate(r)
        ready = [a + lat.kv_transfer_time(p, Parallel(), par, same_node) for a, p in zip(arrivals, trace.prompts)]
        finish = simulate_decode(lat, par, ready, trace.prompts, trace.outputs, 1,
                                 kv_capacity_tokens(planner.model, hw, par), opts.max_batch)
        met = [o <= 1 or (e - a) / (o - 1) <= slo.tpot for a, e, o in zip(arrivals, finish, trace.outputs)]
        return sum(met) / len(met)

    def scan(role: str, par: Parallel) -> float:
        need = planner._max_prompt if role == "prefill" else planner._max_request
        if memory_problem(planner.model, hw, par, need):
            return 0.0
        attainment = prefill_ok if role == "prefill" else decode_ok
        r, best = start, 0.0
        while attainment(par, r) >= slo.attainment:
            best, r = r, r * rate_grid
            if r > start * 1e6:
                raise ValueError("brute force: attainment never drops; the trace is too short to load "
                                 f"{role} {par.label()} (use more requests than max_batch)")
        return best

    prefill_rates = {p: scan("prefill", p) for p in planner.layouts("prefill")}
    decode_rates = {d: scan("decode", d) for d in planner.layouts("decode")}
    total = planner.cluster.num_devices
    best, pairs = None, set()
    for p, gp in prefill_rates.items():
        for d, gd in decode_rates.items():
            for n in range(1, total + 1):
                for m in range(1, total + 1):
                    used = n * p.devices + m * d.devices
                    if used > total or n * gp < rate or m * gd < rate:
                        continue
                    if best is None or used < best:
                        best, pairs = used, set()
                    if used == best:
                        pairs.add((p, d))
    if best is None:
        raise NoFeasiblePlan(f"brute force: rate {rate} cannot be served on {planner.cluster.name}")
    return best, pairs
