"""Elastic prefill/decode: one seeded trace whose rate triples and then falls back, served three ways on a local
Ray with simulated GPUs (127.0.0.1, CPU ranks): fixed at the minimum (1P1D), fixed at the maximum (1P2D), and by
the online planner scaling decode between them. Reports SLO attainment per time window, device-seconds (instances
x devices, integrated while they exist, draining included), requests lost (goal: 0) and outputs that differ from
the fixed-minimum pass (goal: 0); saves JSON.

    python benchmarks/elastic.py [--model small] [--quick]

Each decode instance runs at most a few sequences at once (`--max-seqs`, the engine's max_num_seqs; the KV
cache holds many more, so nothing is preempted), so the load that triples outgrows one decode instance by a
per-instance limit that a second instance relieves; the planner's simulator models the same cap. The SLOs and
the rates come from fits through the running cluster (robust, with intervals): the prefill to unloaded TTFTs, the
decode step to batches decoding together (the in-process profile is kept for reference). The low rate is half
the rate at which the simulator predicts 90 % attainment for 1P1D, the high rate three times that.
On this machine the simulated GPUs share two CPU cores, so a second decode instance adds batch slots but no
compute; on GPUs each instance brings both.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch

from splitserve.cluster import profiler
from splitserve.cluster.cluster import Cluster
from splitserve.placement.goodput import max_rate
from splitserve.placement.metrics import SLO
from splitserve.placement.parallel import Parallel
from splitserve.placement.percentiles import percentile
from splitserve.placement.profile import (Profile, ProfileEntry, ProfileLatency, fit_decode_report,
                                          fit_prefill_report)
from splitserve.placement.simulator import simulate_disaggregated
from splitserve.placement.workload import Trace
from splitserve.workers.sampling_params import SamplingParams

RESULTS = Path(__file__).parent / "results" / "elastic.json"
ONE = Parallel()
BLOCK_SIZE = 16
PROMPTS = (32, 128)  # uniform prompt lengths
OUTPUTS = (32, 64)  # uniform output lengths
PREFILL_SHAPES = ([32], [64], [128], [256], [64, 64], [128, 128], [64] * 4, [128] * 4)
DECODE_SHAPES = [(b, ctx) for b in (1, 2, 4, 6, 8) for ctx in (64, 128, 192)]
CALIBRATION = [(p, 48) for p in (32, 64, 96, 128)] * 2


# ---------------------------------------------------------------------------------------------- trace

def make_trace(phases: list[tuple[float, float]], vocab: int, seed: int) -> list[dict]:
    """Poisson arrivals at each phase's rate for its duration; uniform prompt and output lengths."""
    rng = random.Random(seed)
    trace, start = [], 0.0
    for rate, seconds in phases:
        t = start
        while True:
            t += rng.expovariate(rate)
            if t >= start + seconds:
                break
            out = rng.randint(*OUTPUTS)
            trace.append({"at": t, "prompt": [rng.randrange(10, vocab) for _ in range(rng.randint(*PROMPTS))],
                          "output": out})
        start += seconds
    return trace


def params(out: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=out, min_tokens=out, ignore_eos=True)


# ---------------------------------------------------------------------------------------------- one pass

async def one_request(cluster: Cluster, start: float, item: dict) -> dict:
    await asyncio.sleep(max(0.0, start + item["at"] - time.monotonic()))
    sent = time.monotonic()
    tokens, first, error = [], None, None
    async for chunk in cluster.stream(item["prompt"], params(item["output"])):
        if chunk.token_ids and first is None:
            first = time.monotonic()
        tokens += chunk.token_ids
        error = chunk.error
    end = time.monotonic()
    ttft = first - sent if first is not None else None
    tpot = (end - first) / (len(tokens) - 1) if first is not None and len(tokens) > 1 else None
    return {"at": item["at"], "tokens": tokens, "error": error, "ttft_s": ttft, "tpot_s": tpot}


async def sample_devices(cluster: Cluster, start: float, stop: asyncio.Event, every: float = 0.25) -> list:
    """(t, prefill instances, decode instances) while the pass runs; removed instances count until freed."""
    samples = []
    while not stop.is_set():
        names = cluster.scaler.counts()
        samples.append((time.monotonic() - start, len(names["prefill"]), len(names["decode"])))
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass
    return samples


async def run_pass(cluster: Cluster, trace: list[dict], span: float) -> tuple[list[dict], list, float]:
    start = time.monotonic() + 0.5
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample_devices(cluster, start, stop))
    results = await asyncio.gather(*(one_request(cluster, start, item) for item in trace))
    await asyncio.sleep(max(0.0, start + span - time.monotonic()))  # the same span for every layout
    stop.set()
    return results, await sampler, start


def device_seconds(samples: list, span: float, prefill_devices: int, decode_devices: int) -> float:
    """Instances x devices integrated over [0, span] from the samples (each holds until the next)."""
    total = 0.0
    for (t, p, d), nxt in zip(samples, samples[1:] + [(span, 0, 0)]):
        lo, hi = max(0.0, t), min(span, nxt[0])
        if hi > lo:
            total += (hi - lo) * (p * prefill_devices + d * decode_devices)
    return total


def windows(results: list[dict], slo: SLO, width: float, span: float) -> list[dict]:
    """Per window of arrival time: requests, attainment (both SLOs; a failed request misses), TTFT/TPOT p90."""
    rows = []
    for k in range(int(span // width + (span % width > 1e-9))):
        lo, hi = k * width, (k + 1) * width
        inside = [r for r in results if lo <= r["at"] < hi]
        met = [ok(r, slo) for r in inside]
        ttft = [r["ttft_s"] for r in inside if r["ttft_s"] is not None]
        tpot = [r["tpot_s"] for r in inside if r["tpot_s"] is not None]
        rows.append({"from_s": lo, "to_s": hi, "requests": len(inside),
                     "attainment": sum(met) / len(met) if met else None,
                     "ttft_p90_ms": 1e3 * percentile(ttft, 90) if ttft else None,
                     "tpot_p90_ms": 1e3 * percentile(tpot, 90) if tpot else None})
    return rows


def ok(r: dict, slo: SLO) -> bool:
    return (r["error"] is None and r["ttft_s"] is not None and r["ttft_s"] <= slo.ttft
            and (r["tpot_s"] is None or r["tpot_s"] <= slo.tpot))


# ---------------------------------------------------------------------------------------------- profile + SLOs

def fitted_profile(model: str, repeats: int) -> ProfileEntry:
    profile, _, _ = profiler.profile_model(model, repeats=repeats, prefill_batches=PREFILL_SHAPES,
                                           decode_points=DECODE_SHAPES)
    return profile.entries[0]


def serving_prefill(cluster: Cluster, vocab: int, seed: int):
    """The prefill fitted to unloaded TTFTs through the running cluster (one request at a time, after a warm-up),
    as `benchmarks/planner_validation.py` fits it: the fixed term holds the RPC, polling and event costs, and the
    slope is timed in the ranks as they serve, minutes before the passes. Returns (Coefficients, Uncertainty)."""
    rng = random.Random(seed + 1)
    samples = []
    for i, (p, o) in enumerate([(32, 8)] + CALIBRATION):
        item = {"at": 0.0, "prompt": [rng.randrange(10, vocab) for _ in range(p)], "output": o}
        r = asyncio.run(one_request(cluster, time.monotonic(), item))
        if i > 0:  # the first is a warm-up
            samples.append(([p], r["ttft_s"]))
    return fit_prefill_report(samples)


def serving_decode(cluster: Cluster, vocab: int, max_seqs: int, seed: int, rounds: int):
    """Decode steps through the running cluster, as `splitserve profile --server` fits them: B requests sent at
    once decode together (B = 1..max_seqs), the step is their median TPOT; every batch `rounds` times; the robust
    fit with its intervals. Returns (Coefficients, Uncertainty)."""
    rng = random.Random(seed + 3)
    batches = [[(rng.randint(*PROMPTS), 48) for _ in range(b)] for b in range(1, max_seqs + 1)]
    samples = []

    async def together(items):
        start = time.monotonic()
        return await asyncio.gather(*(one_request(cluster, start, it) for it in items))

    for _ in range(rounds):
        for batch in batches:
            items = [{"at": 0.0, "prompt": [rng.randrange(10, vocab) for _ in range(p)], "output": o}
                     for p, o in batch]
            step = statistics.median(r["tpot_s"] for r in asyncio.run(together(items)))
            samples.append((len(batch), sum(p + o // 2 for p, o in batch), step))
    return fit_decode_report(samples)


def sim_trace(vocab: int, seed: int, n: int = 300) -> Trace:
    rng = random.Random(seed + 2)
    arrivals, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(1.0)
        arrivals.append(t)
    return Trace(tuple(arrivals), tuple(rng.randint(*PROMPTS) for _ in range(n)),
                 tuple(rng.randint(*OUTPUTS) for _ in range(n)))


def predicted(latency, trace: Trace, rate: float, decode: int, kv_tokens: int, slo: SLO, max_seqs: int) -> float:
    """As the online planner predicts it (same simulator, same batch cap)."""
    return simulate_disaggregated(latency, trace, rate, ONE, ONE, 1, decode, kv_capacity=kv_tokens,
                                  max_batch=max_seqs).attainment(slo)


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="preset or local HF checkpoint directory")
    ap.add_argument("--quick", action="store_true", help="short phases (a couple of minutes in all)")
    ap.add_argument("--phases", default=None, help="seconds of the low, high and low phases (default 30,40,50; "
                                                   "--quick 12,18,30)")
    ap.add_argument("--window", type=float, default=None, help="attainment window, s (default 10; --quick 6)")
    ap.add_argument("--max-seqs", type=int, default=4, help="sequences one instance runs at once (max_num_seqs)")
    ap.add_argument("--ttft-slo-scale", type=float, default=4.0, help="x the calibrated prefill of the longest prompt")
    ap.add_argument("--tpot-slo-scale", type=float, default=2.0,
                    help="x the served decode step of a full instance (max-seqs sequences)")
    ap.add_argument("--serving-rounds", type=int, default=3, help="times each decode batch of the serving fit runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per profile shape")
    ap.add_argument("--output", default=str(RESULTS))
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import ray
    from splitserve.workers.config import load_config
    from splitserve.workers.presets import resolve_model

    started, load_start = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    seconds = [float(s) for s in (args.phases or ("12,18,30" if args.quick else "30,40,50")).split(",")]
    if len(seconds) != 3 or min(seconds) <= 0:
        raise ValueError(f"phases: expected three positive durations, got {args.phases!r}")
    width = args.window or (6.0 if args.quick else 10.0)
    torch.set_num_threads(1)
    model_cfg = load_config(resolve_model(args.model))
    longest = PROMPTS[1] + OUTPUTS[1]
    kv_bytes = 64 * -(-longest // BLOCK_SIZE) * BLOCK_SIZE * model_cfg.kv_bytes_per_token  # 64 requests' KV
    entry = fitted_profile(args.model, args.repeats)
    print(profiler.uncertainty_line("prefill", entry.prefill, entry.uncertainty["prefill"]))
    print(profiler.uncertainty_line("decode", entry.decode, entry.uncertainty["decode"]), flush=True)

    ray.init(num_cpus=2, num_gpus=3, include_dashboard=False, log_to_driver=False, namespace="splitserve-elastic")
    with tempfile.TemporaryDirectory(prefix="elastic-") as workdir:
        profile_path = str(Path(workdir) / "profile.json")

        def config(decode: int, online: dict | None = None) -> dict:
            cfg = {"model": args.model, "device": "cpu", "prefill": {"instances": 1}, "decode": {"instances": decode},
                   "engine": {"block_size": BLOCK_SIZE, "kv_cache_bytes": kv_bytes, "max_num_seqs": args.max_seqs}}
            return cfg | ({"placement": {"online": online}} if online else {})

        try:
            result = run_all(args, config, entry, profile_path, model_cfg.vocab_size, seconds, width)
        finally:
            ray.shutdown()
    result = {"arguments": vars(args), "model": args.model,
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "processor": platform.processor() or platform.machine()},
              "load_avg_start": load_start, "load_avg_end": [round(x, 2) for x in os.getloadavg()],
              "total_seconds": round(time.perf_counter() - started, 1), "kv_cache_bytes_per_rank": kv_bytes,
              "profile": {"prefill_ms": entry.prefill.to_ms(), "decode_ms": entry.decode.to_ms(),
                          "uncertainty": {k: u.to_dict() for k, u in entry.uncertainty.items()}}, **result}
    print_table(result)
    print(f"total {result['total_seconds']:.0f} s; load average at start {load_start}, at end "
          f"{result['load_avg_end']}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.output}")
    return 0


def run_all(args, config, entry: ProfileEntry, profile_path: str, vocab: int, seconds: list[float],
            width: float) -> dict:
    span = sum(seconds)
    passes = {}
    with Cluster(config(1)) as cluster:
        # Both phases through the cluster: the in-process profile (forwards only) is kept for reference.
        prefill, prefill_u = serving_prefill(cluster, vocab, args.seed)
        print(profiler.uncertainty_line("prefill through the cluster (unloaded TTFT)", prefill, prefill_u))
        decode, decode_u = serving_decode(cluster, vocab, args.max_seqs, args.seed, args.serving_rounds)
        print(profiler.uncertainty_line("decode through the cluster", decode, decode_u), flush=True)
        fitted = ProfileEntry(ONE, prefill, decode, {"prefill": prefill_u, "decode": decode_u})
        Profile(args.model, "cpu", (fitted,)).save(profile_path)
        kv_tokens = min(s["num_blocks"] for n, s in cluster.dispatcher.instance_stats.items()
                        if n.startswith("decode-")) * BLOCK_SIZE
        latency = ProfileLatency(Profile(args.model, "cpu", (fitted,)))
        slo = SLO(ttft=args.ttft_slo_scale * latency.prefill_time([PROMPTS[1]], ONE),
                  tpot=args.tpot_slo_scale * latency.decode_time(args.max_seqs, args.max_seqs * sum(PROMPTS), ONE))
        sim = sim_trace(vocab, args.seed)
        knee = max_rate(lambda r: predicted(latency, sim, r, 1, kv_tokens, slo, args.max_seqs), 0.9, 1.0,
                        rel_tol=0.01)
        if knee == 0:
            raise ValueError("SLOs: the simulator meets them at no rate for 1P1D; raise --ttft-slo-scale or "
                             "--tpot-slo-scale")
        low = round(knee / 2, 2)
        high = 3 * low
        phases = list(zip((low, high, low), seconds))
        plan = {f"1P{d}D": {f"{r:g}": predicted(latency, sim, r, d, kv_tokens, slo, args.max_seqs) for r in (low, high)}
                for d in (1, 2)}
        print(f"KV {kv_tokens} tokens per instance; SLO TTFT {slo.ttft * 1e3:.0f} ms, TPOT {slo.tpot * 1e3:.1f} ms; "
              f"1P1D knee (90 %) {knee:.2f} req/s; phases {phases}; predicted attainment {plan}", flush=True)
        trace = make_trace(phases, vocab, args.seed)
        passes["fixed-min"] = measure(cluster, trace, span, slo, width, "fixed-min")
    with Cluster(config(2)) as cluster:
        passes["fixed-max"] = measure(cluster, trace, span, slo, width, "fixed-max")
    online = {"ttft_s": slo.ttft, "tpot_s": slo.tpot, "attainment": 0.9, "interval_s": 2.0,
              "window_s": width, "cooldown_s": 6.0, "down_intervals": 3, "min_requests": 5, "min_prefill": 1,
              "max_prefill": 1, "min_decode": 1, "max_decode": 2, "hardware": "cpu", "profile": profile_path,
              "seed": args.seed}
    with Cluster(config(1, online)) as cluster:
        passes["online"] = measure(cluster, trace, span, slo, width, "online")
        start = passes["online"]["_start"]
        passes["online"]["decisions"] = [
            {"t_s": round(d.at - start, 2), "rate": round(d.rate, 2),
             "current": list(d.current), "target": list(d.target), "action": d.action,
             "predicted": {f"{n}P{m}D": round(a, 3) for (n, m), a in d.predicted.items()},
             "latency_scale": {"prefill": round(d.scales[0], 3), "decode": round(d.scales[1], 3)}}
            for d in cluster.planner.decisions]
    reference = passes["fixed-min"].pop("_tokens")
    for p in passes.values():
        tokens = p.pop("_tokens", None)
        p.pop("_start", None)
        p["outputs_differing_from_fixed_min"] = 0 if tokens is None else sum(
            a != b for a, b in zip(tokens, reference))
    return {"slo": {"ttft_s": slo.ttft, "tpot_s": slo.tpot},
            "planner_profile": Profile(args.model, "cpu", (fitted,)).to_dict(),
            "kv_tokens_per_instance": kv_tokens, "knee_1p1d_rps": knee,
            "phases": [{"rate": r, "seconds": s} for r, s in phases], "requests": len(trace), "window_s": width,
            "span_s": span, "predicted_attainment": plan, "online_planner": online, "passes": passes}


def measure(cluster: Cluster, trace: list[dict], span: float, slo: SLO, width: float, name: str) -> dict:
    cluster.generate([[11] * 8], SamplingParams(max_tokens=4))  # warm-up
    results, samples, start = asyncio.run(run_pass(cluster, trace, span))
    lost = sum(r["error"] is not None for r in results)
    out = {"requests": len(results), "lost": lost, "attainment": sum(ok(r, slo) for r in results) / len(results),
           "device_seconds": device_seconds(samples, span, 1, 1), "windows": windows(results, slo, width, span),
           "instances": _changes(samples), "_tokens": [r["tokens"] for r in results], "_start": start}
    print(f"{name}: attainment {100 * out['attainment']:.1f} %, device-seconds {out['device_seconds']:.0f}, lost "
          f"{lost}, windows " + " ".join("-" if w["attainment"] is None else f"{100 * w['attainment']:.0f}"
                                         for w in out["windows"]), flush=True)
    return out


def _changes(samples: list) -> list[dict]:
    """The instance counts over time, one row per change."""
    rows, last = [], None
    for t, p, d in samples:
        if (p, d) != last:
            rows.append({"t_s": round(t, 2), "prefill": p, "decode": d})
            last = (p, d)
    return rows


def print_table(result: dict) -> None:
    slo = result["slo"]
    print(f"\n{result['model']}: phases " + ", ".join(f"{p['rate']:g} req/s x {p['seconds']:g} s"
                                                   for p in result["phases"])
          + f"; SLO TTFT {slo['ttft_s'] * 1e3:.0f} ms, TPOT {slo['tpot_s'] * 1e3:.1f} ms; windows of "
          f"{result['window_s']:g} s (attainment %)")
    width = result["window_s"]
    heads = "".join(f"{int(w['from_s']):>5}" for w in next(iter(result["passes"].values()))["windows"])
    print(f"{'layout':<11}{'attain %':>9}{'dev-s':>8}{'lost':>6}{'diff':>6}   t= {heads}")
    for name, p in result["passes"].items():
        cells = "".join(f"{'-' if w['attainment'] is None else round(100 * w['attainment']):>5}"
                        for w in p["windows"])
        print(f"{name:<11}{100 * p['attainment']:>9.1f}{p['device_seconds']:>8.0f}{p['lost']:>6}"
              f"{p['outputs_differing_from_fixed_min']:>6}      {cells}")
    changes = result["passes"]["online"]["instances"]
    print("online planner instances (t s: PxD): " + ", ".join(f"{c['t_s']:.0f}: {c['prefill']}P{c['decode']}D"
                                                             for c in changes) + f"  (window {width:g} s)")


if __name__ == "__main__":
    sys.exit(main())
