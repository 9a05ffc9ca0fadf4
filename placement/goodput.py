"""Goodput of one instance layout: the highest request rate whose SLO attainment reaches the target, found by
bracketing around a capacity estimate and bisecting in log space (attainment falls as the rate rises)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from splitserve.placement.latency import LatencyModel
from splitserve.placement.metrics import SLO
from splitserve.placement.parallel import Parallel
from splitserve.placement.simulator import (simulate_colocated_trace, simulate_decode, simulate_prefill)
from splitserve.placement.workload import Trace


@dataclass(frozen=True)
class Goodput:
    """Requests/s one instance sustains within the SLO; `reason` says why it is 0 when it is."""

    rate: float
    reason: str | None = None


@dataclass(frozen=True)
class SimSettings:
    prefill_token_budget: int = 4096
    colocated_token_budget: int = 512
    chunked_prefill: bool = True
    max_batch: int = 256
    rel_tol: float = 0.02


def max_rate(attainment: Callable[[float], float], target: float, guess: float, rel_tol: float = 0.02,
             ceiling: float = math.inf) -> float:
    """Largest rate <= ceiling with attainment(rate) >= target, to relative tolerance; 0 if even guess/2**12 fails.

    `ceiling` is the phase's throughput bound: above it the queue grows without limit in steady state, whatever
    a finite simulated burst says (a few hundred requests arriving at once can still mostly meet a TPOT SLO).
    """
    assert guess > 0 and rel_tol > 0
    guess = min(guess, ceiling)
    if attainment(guess) >= target:
        lo, hi = guess, guess * 2
        while hi <= ceiling and attainment(hi) >= target:
            lo, hi = hi, hi * 2
        if lo == ceiling:
            return lo
        hi = min(hi, ceiling)
        if attainment(hi) >= target:
            return hi
    else:
        lo, hi = guess / 2, guess
        while attainment(lo) < target:
            lo, hi = lo / 2, lo
            if lo < guess / 2 ** 12:
                return 0.0
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        if attainment(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo


def _unloaded_share(values: list[float], bound: float) -> float:
    return sum(1 for v in values if v <= bound) / len(values)


def prefill_goodput(latency: LatencyModel, par: Parallel, trace: Trace, slo: SLO,
                    settings: SimSettings = SimSettings()) -> Goodput:
    alone = [latency.prefill_time([p], par) for p in trace.prompts[:200]]
    if _unloaded_share(alone, slo.ttft) < slo.attainment:
        return Goodput(0.0, f"TTFT SLO {slo.ttft:g}s is below the unloaded prefill time of too many requests "
                            f"(median {sorted(alone)[len(alone) // 2]:.3g}s) with {par.label()}")
    guess = 0.5 * par.pp / (sum(alone) / len(alone))
    # Throughput bound: full token-budget batches back to back through the pipeline.
    mean_p = sum(trace.prompts) / len(trace)
    per_batch = max(1, int(settings.prefill_token_budget // mean_p))
    ceiling = par.pp * per_batch / latency.prefill_time([int(mean_p)] * per_batch, par)

    def attainment(rate: float) -> float:
        arrivals = trace.at_rate(rate)
        done = simulate_prefill(latency, par, arrivals, trace.prompts, 1, settings.prefill_token_budget)
        return sum(1 for d, a in zip(done, arrivals) if d - a <= slo.ttft) / len(arrivals)

    return Goodput(max_rate(attainment, slo.attainment, guess, settings.rel_tol, ceiling))


def decode_goodput(latency: LatencyModel, par: Parallel, trace: Trace, slo: SLO, kv_capacity: int,
                   transfer_from: Parallel, same_node: bool, settings: SimSettings = SimSettings()) -> Goodput:
    """Requests arrive at the decode instance at the rate, delayed by their KV transfer; TPOT counts from
    the first token (produced by prefill), so transfer time is charged to TPOT."""
    transfer = [latency.kv_transfer_time(p, transfer_from, par, same_node) for p in trace.prompts]
    sample = range(min(200, len(trace)))
    alone = [latency.decode_time(1, trace.prompts[i] + trace.outputs[i] // 2, par)
             + transfer[i] / max(1, trace.outputs[i] - 1) for i in sample]
    if _unloaded_share(alone, slo.tpot) < slo.attainment:
        return Goodput(0.0, f"TPOT SLO {slo.tpot:g}s is below the unloaded decode step of too many requests "
                            f"(median {sorted(alone)[len(alone) // 2]:.3g}s) with {par.label()}")
    mean_p = sum(trace.prompts) / len(trace)
    mean_o = sum(trace.outputs) / len(trace)
    steps = max(1.0, mean_o - 1)

    def throughput(batch: int) -> float:
        return par.pp * batch / (latency.decode_time(batch, int(batch * (mean_p + mean_o / 2)), par) * steps)

    largest = max(1, min(settings.max_batch, int(kv_capacity // par.pp // (mean_p + mean_o))))
    batch = 1
    while batch * 2 <= largest and latency.decode_time(batch * 2, int(batch * 2 * (mean_p + mean_o / 2)), par) <= slo.tpot:
        batch *= 2
    guess = 0.7 * throughput(batch)
    ceiling = throughput(largest)  # every engine full all the time

    def attainment(rate: float) -> float:
        arrivals = trace.at_rate(rate)
        ready = [a + t for a, t in zip(arrivals, transfer)]
        finish = simulate_decode(latency, par, ready, trace.prompts, trace.outputs, 1, kv_capacity, settings.max_batch)
        ok = 0
        for a, e, o in zip(arrivals, finish, trace.outputs):
            if o <= 1 or (e - a) / (o - 1) <= slo.tpot:
                ok += 1
        return ok / len(arrivals)

    return Goodput(max_rate(attainment, slo.attainment, guess, settings.rel_tol, ceiling))


def colocated_goodput(latency: LatencyModel, par: Parallel, trace: Trace, slo: SLO, kv_capacity: int,
                      settings: SimSettings = SimSettings()) -> Goodput:
    alone = [latency.prefill_time([p], par) for p in trace.prompts[:200]]
    if _unloaded_share(alone, slo.ttft) < slo.attainment:
        return Goodput(0.0, f"TTFT SLO {slo.ttft:g}s is below the unloaded prefill time with {par.label()}")
    mean_p = sum(trace.prompts) / len(trace)
    mean_o = sum(trace.outputs) / len(trace)
    per_request = latency.prefill_time([int(mean_p)], par) + max(0.0, mean_o - 1) * latency.decode_time(
        8, int(8 * (mean_p + mean_o / 2)), par) / 8
    guess = 0.5 / per_request
    largest = max(1, min(settings.max_batch, int(kv_capacity // (mean_p + mean_o))))
    # Bound: prompt work done alone plus decode steps at the largest batch, per request.
    ceiling = 1.0 / (latency.prefill_time([int(mean_p)], par)
                     + max(0.0, mean_o - 1) * latency.decode_time(largest, int(largest * (mean_p + mean_o / 2)), par)
                     / largest)

    def attainment(rate: float) -> float:
        result = simulate_colocated_trace(latency, trace, rate, par, 1, kv_capacity, settings.max_batch,
                                          settings.colocated_token_budget, settings.chunked_prefill)
        return result.attainment(slo)

    return Goodput(max_rate(attainment, slo.attainment, guess, settings.rel_tol, ceiling))
