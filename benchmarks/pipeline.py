"""Pipeline parallelism on CPU gloo ranks: 1P1D with both instances at PP1, PP2 and PP4 (TP1) on the same seeded
load (Poisson arrivals of fixed-length prompts and outputs); each PP > 1 layout twice, its decode instance keeping one
batch per stage in flight (DistServe's inter-op decode, the default) and one batch at a time (each step through every
stage, its sequences split into micro-batches within the step). Reported per layout: TTFT p50/p90, mean TPOT, decode
throughput (output tokens per second of the run) and whether the greedy tokens equal PP1's.

    python benchmarks/pipeline.py [--model small] [--requests 16] [--rate 2] [--input 256] [--output 32] [--pp 1,2,4]
                                  [--profile PROFILE.json]

Next to each layout: the planner's prediction for the same arrivals and lengths (its simulator with a latency profile
of this machine: `--profile`, else one timed first through the real stages of each depth, as `splitserve profile
--layouts 1x1x1,1x1x2,...` does). The planner assumes one device per rank and, with PP, one batch per stage in
flight; it predicts the in-flight rows.

What CPU timing can say: the cost of the pipeline's own machinery (stage hand-offs of the residual stream over gloo,
logits back to the leader, KV pushed per stage) against the layers it spreads. What it cannot: the ranks share this
machine's cores (and whatever else runs on it: load_avg is saved), so more stages add processes, not compute; and
a stage of one step waits for the previous stage unless several batches are in flight. PP here costs latency and buys
memory: a stage's KV cache holds only its layers, so the same per-rank budget holds pp times the blocks. On GPUs each stage has
its own device; the planner's model predicts those layouts.
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
from splitserve.placement.parallel import Parallel
from splitserve.placement.percentiles import percentile as np_percentile
from splitserve.placement.profile import Profile, ProfileLatency
from splitserve.placement.simulator import simulate_decode, simulate_prefill
from splitserve.workers.sampling_params import SamplingParams


def load(args, vocab: int):
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(10, vocab) for _ in range(args.input)] for _ in range(args.requests)]
    starts, now = [], 0.0
    for _ in range(args.requests):
        starts.append(now)
        now += rng.expovariate(args.rate)
    return prompts, starts


async def run_load(cluster: Cluster, prompts, starts, output_len: int) -> tuple[list[dict], float]:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    begin = time.monotonic()

    async def one(i: int) -> dict:
        await asyncio.sleep(max(0.0, begin + starts[i] - time.monotonic()))
        tokens, last = [], None
        async for chunk in cluster.stream(prompts[i], params):
            tokens += chunk.token_ids
            last = chunk
        m = last.metrics or {}
        return {"error": last.error, "ttft_s": m.get("ttft_s"), "tpot_s": m.get("mean_itl_s"), "tokens": tokens}

    rows = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return rows, time.monotonic() - begin


def percentile(values: list[float], q: float) -> float:
    return np_percentile(values, 100 * q)


def timed_profile(args, degrees: list[int]) -> Profile:
    """This machine's latency profile of each pipeline depth, timed through real stages (as `splitserve profile`)."""
    from splitserve.cluster.profiler import profile_layout, profile_model

    profile = profile_model(args.model, repeats=args.profile_repeats)[0]
    entries = list(profile.entries)
    for pp in degrees:
        if pp > 1:
            entries.append(profile_layout(args.model, Parallel(pp=pp), repeats=args.profile_repeats).entry)
    return Profile(profile.model, profile.hardware, tuple(entries))


def predict(latency: ProfileLatency, pp: int, starts: list[float], args, kv_tokens: int) -> dict:
    """The planner's simulator on the benchmark's own arrivals and lengths, for 1P1D with both sides at PP `pp`."""
    par = Parallel(pp=pp)
    n = len(starts)
    prompts, outputs = [args.input] * n, [args.output] * n
    first = simulate_prefill(latency, par, starts, prompts, 1, 4096)
    ready = [f + latency.kv_transfer_time(args.input, par, par, True) for f in first]
    finish = simulate_decode(latency, par, ready, prompts, outputs, 1, kv_tokens, 64)
    ttft = [f - a for f, a in zip(first, starts)]
    tpot = [(e - f) / (args.output - 1) for e, f in zip(finish, first)] if args.output > 1 else [0.0] * n
    return {"ttft_p50_ms": 1e3 * percentile(ttft, 0.5), "ttft_p90_ms": 1e3 * percentile(ttft, 0.9),
            "tpot_mean_ms": 1e3 * statistics.mean(tpot),
            "decode_tokens_per_s": n * args.output / (max(finish) - min(starts))}


def summarize(rows: list[dict], seconds: float) -> dict:
    ok = [r for r in rows if r["error"] is None]
    ttft = [r["ttft_s"] for r in ok]
    return {"requests": len(rows), "failed": len(rows) - len(ok),
            "ttft_p50_ms": 1e3 * percentile(ttft, 0.5), "ttft_p90_ms": 1e3 * percentile(ttft, 0.9),
            "tpot_mean_ms": 1e3 * statistics.mean(r["tpot_s"] for r in ok),
            "decode_tokens_per_s": sum(len(r["tokens"]) for r in ok) / seconds, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--rate", type=float, default=2.0, help="arrivals per second (Poisson)")
    ap.add_argument("--input", type=int, default=256, help="prompt tokens")
    ap.add_argument("--output", type=int, default=32, help="output tokens")
    ap.add_argument("--pp", default="1,2,4", help="pipeline degrees, used on both instances")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", help="latency profile JSON with an entry per depth (default: time one first)")
    ap.add_argument("--profile-repeats", type=int, default=3, help="repeats per shape when timing the profile")
    ap.add_argument("--save", default=str(Path(__file__).parent / "results" / "pipeline.json"))
    args = ap.parse_args()
    for name in ("requests", "input", "output"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name}: must be >= 1")
    degrees = [int(p) for p in args.pp.split(",")]
    if any(pp < 1 for pp in degrees):
        raise SystemExit("--pp: degrees must be >= 1")
    layouts = [(pp, depth) for pp in degrees for depth in ([pp, 1] if pp > 1 else [1])]
    profile = Profile.load(args.profile) if args.profile else timed_profile(args, degrees)
    latency = ProfileLatency(profile)
    results, reference = [], None
    for pp, depth in layouts:
        cfg = {"model": args.model, "device": "cpu",
               "engine": {"kv_cache_bytes": 64 << 20, "prefix_caching": False, "decode_batches_in_flight": depth},
               "prefill": {"instances": 1, "pp": pp}, "decode": {"instances": 1, "pp": pp},
               "ray": {"num_gpus": 2 * pp}}
        with Cluster(cfg) as cluster:
            prompts, starts = load(args, cluster.model_config.vocab_size)
            warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
            cluster.generate([[11] * 16] * 2, warm, timeout=300)  # warm-up: every rank runs once
            rows, seconds = asyncio.run(run_load(cluster, prompts, starts, args.output))
            stats = cluster.stats()["instances"]
            blocks = {n: s["num_blocks"] for n, s in stats.items()}
            in_flight = stats["decode-0"].get("max_batches_in_flight", 0)
        summary = summarize(rows, seconds)
        if depth == pp:  # the planner's model of a pipeline: one batch per stage in flight
            kv_tokens = blocks["decode-0"] * 16
            summary["predicted"] = predict(latency, pp, starts, args, kv_tokens)
        tokens = [r["tokens"] for r in rows]
        reference = reference or tokens
        summary.update(layout=f"P TP1·PP{pp} / D TP1·PP{pp}" + (f" ({depth} in flight)" if pp > 1 else ""), pp=pp,
                       decode_batches_in_flight=depth, max_batches_in_flight=in_flight, kv_blocks=blocks,
                       tokens_equal_pp1=tokens == reference)
        results.append(summary)
        print(json.dumps(summary), flush=True)
    print(f"\n{args.model}, {args.requests} requests at {args.rate}/s, {args.input} prompt + {args.output} output tokens")
    print("measured (predicted by the planner's simulator with this machine's profile)")
    print(f"{'layout':<38}{'TTFT p50':>18}{'TPOT':>18}{'tok/s':>16}{'blocks D':>9}{'same':>6}")

    def both(r, key):
        p = r.get("predicted")
        return f"{r[key]:.1f} ({p[key]:.1f})" if p else f"{r[key]:.1f}"

    for r in results:
        print(f"{r['layout']:<38}{both(r, 'ttft_p50_ms'):>18}{both(r, 'tpot_mean_ms'):>18}"
              f"{both(r, 'decode_tokens_per_s'):>16}{r['kv_blocks'].get('decode-0', 0):>9}"
              f"{'yes' if r['tokens_equal_pp1'] else 'NO':>6}")
    result = dict(model=args.model, args=vars(args), machine=platform.processor() or platform.machine(),
                  cpus=os.cpu_count(), load_avg=os.getloadavg(), profile=profile.to_dict(), results=results)
    Path(args.save).parent.mkdir(parents=True, exist_ok=True)
    Path(args.save).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.save}")


if __name__ == "__main__":
    main()
