"""Disaggregation costs on local Ray (CPU): (A) exposed KV transfer time, layer-wise push vs after-prefill
transfer, for a long prompt; (B) control overhead: TPOT of a 1P1D cluster vs the in-process engine (one torch thread each, as in the actors;
alternating runs, best of each).

    python benchmarks/disaggregation.py [--model small] [--prompt-tokens 2048] [--requests 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
from pathlib import Path

import torch

from splitserve.cluster.cluster import Cluster
from splitserve.workers.llm import LLM
from splitserve.workers.sampling_params import SamplingParams


def _cluster(model, **sections):
    cfg = {"model": model, "device": "cpu", "engine": {"kv_cache_bytes": 256 << 20, "max_num_seqs": 32}}
    cfg.update(sections)
    return Cluster(cfg)


def exposed_transfer(model, prompt_tokens, requests, transport, mode) -> dict:
    """Exposed = decode ready (KV in place, request admitted) minus first token, per request."""
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 512) for _ in range(prompt_tokens)] for _ in range(requests + 1)]
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    with _cluster(model, kv_transfer={"transport": transport, "mode": mode}) as cluster:
        rows = [cluster.generate([p], params)[0].metrics for p in prompts]  # one at a time
    rows = rows[1:]  # warm-up
    return {"transport": transport, "mode": mode,
            "exposed_ms": statistics.median(r["kv_transfer_s"] for r in rows) * 1e3,
            "ttft_ms": statistics.median(r["ttft_s"] for r in rows) * 1e3}


def control_overhead(cluster, llm, batch, tokens=64, prompt_tokens=128, repeats=3) -> dict:
    """Alternates the two sides and keeps each one's best run, so machine noise hits both alike."""
    rng = random.Random(batch)
    prompts = [[rng.randrange(2, 512) for _ in range(prompt_tokens)] for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    local, remote = float("inf"), float("inf")
    for _ in range(repeats):
        local = min(local, statistics.mean(o.tpot_s for o in llm.generate(prompts, params)))
        remote = min(remote, statistics.mean(o.metrics["mean_itl_s"] for o in cluster.generate(prompts, params)))
    return {"batch": batch, "in_process_tpot_ms": local * 1e3, "cluster_tpot_ms": remote * 1e3,
            "ratio": remote / local}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "disaggregation.json"))
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

    transfer = [exposed_transfer(args.model, args.prompt_tokens, args.requests, t, m)
                for t in ("p2p", "shm") for m in ("after_prefill", "layerwise")]
    torch.set_num_threads(1)  # as in every rank actor
    llm = LLM(args.model, device="cpu", kv_cache_bytes=256 << 20)
    with _cluster(args.model) as cluster:
        warm = [[5] * 16]
        llm.generate(warm, SamplingParams(max_tokens=4))
        cluster.generate(warm, SamplingParams(max_tokens=4))
        overhead = [control_overhead(cluster, llm, b) for b in (1, 16)]

    print(f"(A) exposed KV transfer, {args.model}, {args.prompt_tokens}-token prompt (median of {args.requests})")
    print(f"{'transport':<10}{'mode':<15}{'exposed ms':>11}{'TTFT ms':>9}")
    for r in transfer:
        print(f"{r['transport']:<10}{r['mode']:<15}{r['exposed_ms']:>11.1f}{r['ttft_ms']:>9.1f}")
    hidden = {}
    for t in ("p2p", "shm"):
        after, layer = (next(r for r in transfer if r["transport"] == t and r["mode"] == m)
                        for m in ("after_prefill", "layerwise"))
        hidden[t] = 1 - layer["exposed_ms"] / after["exposed_ms"]
        print(f"layer-wise hides {hidden[t] * 100:.0f}% of the {t} after-prefill exposed time")
    print(f"(B) control overhead, {args.model}: TPOT of 1P1D vs in-process engine")
    print(f"{'batch':>5}{'in-process ms':>15}{'cluster ms':>12}{'ratio':>7}")
    for r in overhead:
        print(f"{r['batch']:>5}{r['in_process_tpot_ms']:>15.2f}{r['cluster_tpot_ms']:>12.2f}{r['ratio']:>7.2f}")
    result = dict(model=args.model, prompt_tokens=args.prompt_tokens, machine=platform.processor() or platform.machine(),
                  load_avg=os.getloadavg(), transfer=transfer, hidden_fraction=hidden, control_overhead=overhead)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
