"""Disaggregated against colocated on the same devices: one seeded trace through a 1P1D cluster (2 ranks) and
through two colocated SplitFuse instances (2 ranks), at rates around the 1P1D knee the planner predicts, with SLOs
derived from this machine's fitted profile. Reports SLO attainment and goodput per device (requests/s that met
both SLOs, per device) for both, measured and as the planner's simulator predicts them.

    python benchmarks/pd_vs_colocated.py [--model small] [--requests 60] [--rates auto|R1,R2,...]

On this machine both layouts share 2 CPU cores, so the comparison is of scheduling (prompts and decodes on
separate ranks vs. chunked prefill fused with decodes), not of devices; treat absolute numbers as CPU figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

from splitserve.cluster.cluster import Cluster
from splitserve.cluster.profiler import profile_model
from splitserve.placement.metrics import SLO
from splitserve.placement.parallel import Parallel
from splitserve.placement.profile import ProfileLatency
from splitserve.placement.simulator import simulate_colocated_trace, simulate_disaggregated
from splitserve.placement.workload import load_workload, make_trace
from splitserve.workers.sampling_params import SamplingParams

LAYOUTS = {"1P1D": {"prefill": {"instances": 1}, "decode": {"instances": 1}},
           "2 colocated": {"prefill": {"instances": 0}, "decode": {"instances": 0}, "colocated": {"instances": 2}}}


def slos(latency, trace) -> SLO:
    """TTFT: 4x the prefill of the mean prompt alone; TPOT: 4x a batch-1 decode step at the mean context."""
    prompt = statistics.mean(trace.prompts)
    context = prompt + statistics.mean(trace.outputs) / 2
    return SLO(4 * latency.prefill_time([int(prompt)], Parallel()),
               4 * latency.decode_time(1, int(context), Parallel()), 0.9)


def predicted(latency, trace, rate: float, slo: SLO) -> dict[str, float]:
    disagg = simulate_disaggregated(latency, trace, rate, Parallel(), Parallel(), 1, 1)
    coloc = simulate_colocated_trace(latency, trace, rate, Parallel(), instances=2)
    return {"1P1D": disagg.attainment(slo), "2 colocated": coloc.attainment(slo)}


def knee(latency, trace, slo: SLO) -> float:
    """The highest rate at which the simulator gives 1P1D >= 90 % attainment (bisection)."""
    low, high = 0.05, 50.0
    for _ in range(30):
        mid = (low * high) ** 0.5
        if predicted(latency, trace, mid, slo)["1P1D"] >= slo.attainment:
            low = mid
        else:
            high = mid
    return low


async def run_trace(cluster: Cluster, trace, rate: float, vocab: int) -> list[dict]:
    rng = random.Random(1)
    start = time.monotonic()

    async def one(arrival, prompt_len, output_len):
        await asyncio.sleep(max(0.0, start + arrival - time.monotonic()))
        prompt = [rng.randrange(2, vocab) for _ in range(prompt_len)]
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        last = None
        async for chunk in cluster.stream(prompt, params):
            last = chunk
        return {"error": last.error, "ttft_s": last.metrics["ttft_s"], "tpot_s": last.metrics["mean_itl_s"]}

    return await asyncio.gather(*(one(a, p, o) for a, p, o in
                                  zip(trace.at_rate(rate), trace.prompts, trace.outputs)))


def measured_attainment(rows: list[dict], slo: SLO) -> float:
    ok = sum(1 for r in rows if r["error"] is None and r["ttft_s"] <= slo.ttft and r["tpot_s"] <= slo.tpot)
    return ok / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--rates", default="auto", help="auto (0.5x, 1x, 1.5x the predicted 1P1D knee) or R1,R2,...")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "pd_vs_colocated.json"))
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    profile, _, _ = profile_model(args.model, repeats=2)
    latency = ProfileLatency(profile)
    trace = make_trace(load_workload("humaneval"), args.requests, args.seed, max_tokens=512)
    slo = slos(latency, trace)
    k = knee(latency, trace, slo)
    rates = [0.5 * k, k, 1.5 * k] if args.rates == "auto" else [float(r) for r in args.rates.split(",")]
    rows = []
    for name, layout in LAYOUTS.items():
        cfg = {"model": args.model, "device": "cpu", "engine": {"kv_cache_bytes": 256 << 20}, **layout}
        with Cluster(cfg) as cluster:
            vocab = cluster.model_config.vocab_size
            asyncio.run(run_trace(cluster, make_trace(load_workload("fixed:16:4"), 4, 9), 4.0, vocab))  # warm-up
            for rate in rates:
                got = measured_attainment(asyncio.run(run_trace(cluster, trace, rate, vocab)), slo)
                pred = predicted(latency, trace, rate, slo)[name]
                rows.append({"layout": name, "rate": rate, "measured": got, "predicted": pred,
                             "goodput_per_device": rate * got / 2, "predicted_goodput_per_device": rate * pred / 2})
    print(f"{args.model}, humaneval-like, {args.requests} requests per rate; SLO TTFT {slo.ttft * 1e3:.0f} ms, "
          f"TPOT {slo.tpot * 1e3:.1f} ms (4x the fitted unloaded times); predicted 1P1D knee {k:.2f} req/s")
    print(f"{'layout':<13}{'rate':>6}{'attained':>10}{'predicted':>11}{'goodput/dev':>13}{'predicted':>11}")
    for r in rows:
        print(f"{r['layout']:<13}{r['rate']:>6.2f}{100 * r['measured']:>9.0f}%{100 * r['predicted']:>10.0f}%"
              f"{r['goodput_per_device']:>13.3f}{r['predicted_goodput_per_device']:>11.3f}")
    result = dict(model=args.model, requests=args.requests, slo={"ttft_s": slo.ttft, "tpot_s": slo.tpot},
                  knee=k, machine=platform.processor() or platform.machine(), load_avg=os.getloadavg(), rows=rows)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
