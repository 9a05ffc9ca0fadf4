"""Cost of the gRPC front end: the same requests through the Python `Cluster` API and through the gRPC server
(protobuf, HTTP/2, one more event loop and the client's own timing), on one 1P1D cluster (local Ray, CPU).

For each batch size it alternates the two paths and keeps each one's best run, then reports the ratios
(gRPC / direct) of mean TTFT, mean TPOT and wall time; ratios in one run, since absolute CPU times drift.

    python benchmarks/grpc_overhead.py [--model small] [--batches 1,8] [--tokens 64] [--repeats 3]
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
from splitserve.cluster.server import BackgroundServer, ServerOptions
from splitserve.proto.client import AsyncClient
from splitserve.workers.sampling_params import SamplingParams


def _prompts(batch: int, prompt_tokens: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, 512) for _ in range(prompt_tokens)] for _ in range(batch)]


def direct(cluster: Cluster, prompts, tokens: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = cluster.generate(prompts, params)
    wall = time.perf_counter() - start
    assert all(o.error is None and len(o.token_ids) == tokens for o in outs)
    return {"ttft_s": statistics.mean(o.metrics["ttft_s"] for o in outs),
            "tpot_s": statistics.mean(o.metrics["mean_itl_s"] for o in outs), "wall_s": wall,
            "tokens": [o.token_ids for o in outs]}


def through_grpc(target: str, prompts, tokens: int) -> dict:
    async def run():
        async with AsyncClient(target, timeout=300) as c:
            start = time.perf_counter()
            outs = await asyncio.gather(*(c.generate(p, max_tokens=tokens, temperature=0.0, ignore_eos=True)
                                          for p in prompts))
            return outs, time.perf_counter() - start

    outs, wall = asyncio.run(run())
    assert all(len(o.token_ids) == tokens for o in outs)
    # Measured at the client: what a user sees, including serialisation and the extra hop.
    return {"ttft_s": statistics.mean(o.ttft_s for o in outs),
            "tpot_s": statistics.mean(statistics.mean(o.itl_s) for o in outs), "wall_s": wall,
            "tokens": [o.token_ids for o in outs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "grpc_overhead.json"))
    args = ap.parse_args()

    cfg = {"model": args.model, "device": "cpu", "engine": {"kv_cache_bytes": 256 << 20, "max_num_seqs": 32}}
    rows = []
    with Cluster(cfg) as cluster, BackgroundServer(options=ServerOptions(port=0), cluster=cluster).start() as srv:
        direct(cluster, _prompts(1, args.prompt_tokens, 99), 4)  # warm-up both paths
        through_grpc(srv.target, _prompts(1, args.prompt_tokens, 99), 4)
        for batch in [int(b) for b in args.batches.split(",")]:
            prompts = _prompts(batch, args.prompt_tokens, batch)
            best = {"direct": None, "grpc": None}
            for _ in range(args.repeats):
                for name, fn in (("direct", lambda: direct(cluster, prompts, args.tokens)),
                                 ("grpc", lambda: through_grpc(srv.target, prompts, args.tokens))):
                    r = fn()
                    if best[name] is None or r["wall_s"] < best[name]["wall_s"]:
                        best[name] = r
            d, g = best["direct"], best["grpc"]
            assert d["tokens"] == g["tokens"], "the two paths must produce the same tokens"
            row = {"batch": batch,
                   **{f"direct_{k}_ms": d[k] * 1e3 for k in ("ttft_s", "tpot_s", "wall_s")},
                   **{f"grpc_{k}_ms": g[k] * 1e3 for k in ("ttft_s", "tpot_s", "wall_s")},
                   **{f"{k}_ratio": g[k] / d[k] for k in ("ttft_s", "tpot_s", "wall_s")}}
            rows.append(row)
            print(f"batch {batch:3d}: TTFT {row['direct_ttft_s_ms']:.1f} -> {row['grpc_ttft_s_ms']:.1f} ms "
                  f"({row['ttft_s_ratio']:.2f}x), TPOT {row['direct_tpot_s_ms']:.2f} -> {row['grpc_tpot_s_ms']:.2f} ms "
                  f"({row['tpot_s_ratio']:.2f}x), wall {row['wall_s_ratio']:.2f}x", flush=True)
    result = {"benchmark": "grpc_overhead", "args": vars(args), "machine": platform.platform(),
              "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
