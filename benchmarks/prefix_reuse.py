"""Prefix reuse across disaggregation on a multi-turn trace: conversations that share a system prompt and resend
their whole history (earlier prompts and answers) with a new message each turn. Each layout runs the same seeded
trace with prefix caching off, on with least-loaded routing, and on with KV-aware routing; reported per run: p50/p90
TTFT (all turns, and turns after the first), mean TPOT, prefill and decode prefix-cache hit rates, KV bytes
transferred into decode, and whether the greedy tokens equal the caching-off run's.

    python benchmarks/prefix_reuse.py [--model small] [--conversations 8] [--turns 5] [--layouts 1P1D,2P2D]

The defaults give a trace whose prompts are ~90 % earlier history (512-token system prompt, 24-token messages and
answers, 5 turns).

Ratios come from one run of each configuration on this machine (CPU ranks sharing its cores): they show what reuse
saves in computed tokens and moved bytes, not GPU latencies.
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

LAYOUTS = {"1P1D": {"prefill": {"instances": 1}, "decode": {"instances": 1}},
           "2P2D": {"prefill": {"instances": 2}, "decode": {"instances": 2}}}
RUNS = {"off": ({"prefix_caching": False}, "least_loaded"),
        "on, least_loaded": ({"prefix_caching": True}, "least_loaded"),
        "on, kv_aware": ({"prefix_caching": True}, "kv_aware")}


def trace(args, vocab: int):
    """Seeded system prompt, per-conversation first messages and per-turn messages, and conversation start times."""
    rng = random.Random(args.seed)

    def tokens(n):
        return [rng.randrange(10, vocab) for _ in range(n)]

    system = tokens(args.system)
    messages = [[tokens(args.message) for _ in range(args.turns)] for _ in range(args.conversations)]
    starts, now = [], 0.0
    for _ in range(args.conversations):
        starts.append(now)
        now += rng.expovariate(args.rate)
    return system, messages, starts


async def run_trace(cluster: Cluster, system, messages, starts, output_len: int) -> list[dict]:
    """Every conversation sends its turns one after another (each needs the previous answer); conversations start
    at their seeded times and overlap."""
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    begin = time.monotonic()

    async def conversation(c: int) -> list[dict]:
        await asyncio.sleep(max(0.0, begin + starts[c] - time.monotonic()))
        history, rows = list(system), []
        for t, message in enumerate(messages[c]):
            prompt = history + message
            tokens, last = [], None
            async for chunk in cluster.stream(prompt, params):
                tokens += chunk.token_ids
                last = chunk
            m = last.metrics or {}
            rows.append({"conversation": c, "turn": t, "prompt_tokens": len(prompt), "error": last.error,
                         "ttft_s": m.get("ttft_s"), "tpot_s": m.get("mean_itl_s"),
                         "cached_tokens": m.get("cached_tokens", 0), "tokens": tokens})
            history = prompt + tokens
        return rows

    per_conversation = await asyncio.gather(*(conversation(c) for c in range(len(messages))))
    return [row for rows in per_conversation for row in rows]


def settled_counters(cluster: Cluster) -> dict:
    time.sleep(1.0)  # the next polls bring the instances' final counts
    return cluster.stats()["counters"]


def since(now: dict, before: dict) -> dict:
    return {key: {role: n - before.get(key, {}).get(role, 0) for role, n in roles.items()}
            for key, roles in now.items()}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(rows: list[dict], counters: dict) -> dict:
    ok = [r for r in rows if r["error"] is None]
    later = [r for r in ok if r["turn"] > 0]
    ttft, ttft_later = [r["ttft_s"] for r in ok], [r["ttft_s"] for r in later]
    hits, queries = counters["prefix_hit_tokens"], counters["prefix_query_tokens"]

    def rate(role):
        return hits.get(role, 0) / queries[role] if queries.get(role) else 0.0

    return {"requests": len(rows), "failed": len(rows) - len(ok),
            "ttft_p50_ms": 1e3 * percentile(ttft, 0.5), "ttft_p90_ms": 1e3 * percentile(ttft, 0.9),
            "later_turns_ttft_p50_ms": 1e3 * percentile(ttft_later, 0.5),
            "later_turns_ttft_p90_ms": 1e3 * percentile(ttft_later, 0.9),
            "tpot_mean_ms": 1e3 * statistics.mean(r["tpot_s"] for r in ok),
            "prefill_hit_rate": rate("prefill"), "decode_hit_rate": rate("decode"),
            "cached_prompt_share": sum(r["cached_tokens"] for r in ok) / sum(r["prompt_tokens"] for r in ok),
            "kv_transfer_bytes": sum(counters["kv_received_bytes"].values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--system", type=int, default=512, help="shared system prompt tokens")
    ap.add_argument("--message", type=int, default=24, help="new user tokens per turn")
    ap.add_argument("--output", type=int, default=24, help="answer tokens per turn")
    ap.add_argument("--rate", type=float, default=2.0, help="conversation starts per second (Poisson)")
    ap.add_argument("--layouts", default="1P1D,2P2D")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", default=str(Path(__file__).parent / "results" / "prefix_reuse.json"))
    args = ap.parse_args()
    for name in ("conversations", "turns", "system", "message", "output"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name}: must be >= 1")
    layouts = [name.strip() for name in args.layouts.split(",")]
    for name in layouts:
        if name not in LAYOUTS:
            raise SystemExit(f"--layouts: {name!r} is not one of {list(LAYOUTS)}")
    results = []
    for layout in layouts:
        reference = None
        for run, (engine, policy) in RUNS.items():
            if layout == "1P1D" and run == "on, least_loaded":
                continue  # one instance per role: routing has no choice to make
            cfg = {"model": args.model, "device": "cpu", "engine": {"kv_cache_bytes": 256 << 20, **engine},
                   "routing": {"policy": policy}, **LAYOUTS[layout]}
            with Cluster(cfg) as cluster:
                system, messages, starts = trace(args, cluster.model_config.vocab_size)
                warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
                cluster.generate([[11] * 16] * 4, warm, timeout=120)  # warm-up: every instance runs once
                before = settled_counters(cluster)
                rows = asyncio.run(run_trace(cluster, system, messages, starts, args.output))
                counters = since(settled_counters(cluster), before)
            summary = summarize(rows, counters)
            tokens = [(r["conversation"], r["turn"], r["tokens"]) for r in rows]
            reference = reference or sorted(tokens)
            summary["tokens_equal_caching_off"] = sorted(tokens) == reference
            results.append({"layout": layout, "run": run, **summary})
            print(f"{layout} {run}: {json.dumps(summary)}", flush=True)
    print(f"\n{args.model}, {args.conversations} conversations x {args.turns} turns, system {args.system}, "
          f"message {args.message}, answer {args.output} tokens")
    print(f"{'layout':<7}{'run':<18}{'TTFT p50':>9}{'p90':>8}{'later p50':>10}{'TPOT':>7}{'hit P':>7}{'hit D':>7}"
          f"{'KV MB':>8}{'same':>6}")
    for r in results:
        print(f"{r['layout']:<7}{r['run']:<18}{r['ttft_p50_ms']:>9.1f}{r['ttft_p90_ms']:>8.1f}"
              f"{r['later_turns_ttft_p50_ms']:>10.1f}{r['tpot_mean_ms']:>7.1f}{100 * r['prefill_hit_rate']:>6.0f}%"
              f"{100 * r['decode_hit_rate']:>6.0f}%{r['kv_transfer_bytes'] / 2**20:>8.1f}"
              f"{'yes' if r['tokens_equal_caching_off'] else 'NO':>6}")
    ratios = {}
    for layout in layouts:
        off = next(r for r in results if r["layout"] == layout and r["run"] == "off")
        for r in results:
            if r["layout"] == layout and r["run"] != "off":
                ratios[f"{layout} {r['run']}"] = {
                    "ttft_p50_speedup": off["ttft_p50_ms"] / r["ttft_p50_ms"],
                    "later_turns_ttft_p50_speedup": off["later_turns_ttft_p50_ms"] / r["later_turns_ttft_p50_ms"],
                    "kv_bytes_ratio": r["kv_transfer_bytes"] / off["kv_transfer_bytes"],
                    "tpot_ratio": r["tpot_mean_ms"] / off["tpot_mean_ms"]}
    for name, ratio in ratios.items():
        print(f"{name}: TTFT p50 {ratio['ttft_p50_speedup']:.2f}x better (later turns "
              f"{ratio['later_turns_ttft_p50_speedup']:.2f}x), KV bytes {ratio['kv_bytes_ratio']:.2f}x of off, "
              f"TPOT {ratio['tpot_ratio']:.2f}x")
    result = dict(model=args.model, args=vars(args), machine=platform.processor() or platform.machine(),
                  load_avg=os.getloadavg(), results=results, ratios=ratios)
    Path(args.save).parent.mkdir(parents=True, exist_ok=True)
    Path(args.save).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.save}")


if __name__ == "__main__":
    main()
