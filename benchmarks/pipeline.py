"""Pipeline parallelism on CPU gloo ranks: 1P1D with both instances at PP1, PP2 and PP4 (TP1) on the same seeded
load (Poisson arrivals of fixed-length prompts and outputs); each PP > 1 layout twice, its decode instance keeping one
batch per stage in flight (DistServe's inter-op decode, the default) and one batch at a time (each step through every
stage, its sequences split into micro-batches within the step). Reported per layout: TTFT p50/p90, mean TPOT, decode
throughput (output tokens per second of the run) and whether the greedy tokens equal PP1's.

    python benchmarks/pipeline.py [--model small] [--requests 16] [--rate 2] [--input 256] [--output 32] [--pp 1,2,4]

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
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


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
    ap.add_argument("--save", default=str(Path(__file__).parent / "results" / "pipeline.json"))
    args = ap.parse_args()
    for name in ("requests", "input", "output"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name}: must be >= 1")
    degrees = [int(p) for p in args.pp.split(",")]
    if any(pp < 1 for pp in degrees):
        raise SystemExit("--pp: degrees must be >= 1")
    layouts = [(pp, depth) for pp in degrees for depth in ([pp, 1] if pp > 1 else [1])]
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
        tokens = [r["tokens"] for r in rows]
        reference = reference or tokens
        summary.update(layout=f"P TP1·PP{pp} / D TP1·PP{pp}" + (f" ({depth} in flight)" if pp > 1 else ""), pp=pp,
                       decode_batches_in_flight=depth, max_batches_in_flight=in_flight, kv_blocks=blocks,
                       tokens_equal_pp1=tokens == reference)
        results.append(summary)
        print(json.dumps(summary), flush=True)
    print(f"\n{args.model}, {args.requests} requests at {args.rate}/s, {args.input} prompt + {args.output} output tokens")
    print(f"{'layout':<38}{'TTFT p50':>9}{'p90':>8}{'TPOT':>8}{'tok/s':>8}{'blocks D':>9}{'same':>6}")
    for r in results:
        print(f"{r['layout']:<38}{r['ttft_p50_ms']:>9.1f}{r['ttft_p90_ms']:>8.1f}{r['tpot_mean_ms']:>8.1f}"
              f"{r['decode_tokens_per_s']:>8.1f}{r['kv_blocks'].get('decode-0', 0):>9}"
              f"{'yes' if r['tokens_equal_pp1'] else 'NO':>6}")
    result = dict(model=args.model, args=vars(args), machine=platform.processor() or platform.machine(),
                  cpus=os.cpu_count(), load_avg=os.getloadavg(), results=results)
    Path(args.save).parent.mkdir(parents=True, exist_ok=True)
    Path(args.save).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.save}")


if __name__ == "__main__":
    main()
