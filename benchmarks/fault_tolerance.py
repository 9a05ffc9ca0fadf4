"""Self-healing under load: a 2P2D cluster (local Ray, CPU) serves a seeded Poisson trace twice, once undisturbed
and once while rank processes are killed with SIGKILL (a decode leader, then a prefill leader, then the other
decode leader, ...). Reports requests lost (goal: 0), outputs that differ from the undisturbed pass (goal: 0),
the added end-to-end latency of the requests that were migrated (p50/p99, against the same request undisturbed),
and the time from each kill to the instance serving again.

    python benchmarks/fault_tolerance.py [--model small] [--requests 120] [--rate 4] [--kills 3]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import time
from pathlib import Path

from splitserve.cluster.cluster import Cluster
from splitserve.placement.percentiles import percentile
from splitserve.workers.sampling_params import SamplingParams

VICTIMS = [("decode-0", 0), ("prefill-1", 0), ("decode-1", 0), ("prefill-0", 0)]


def make_trace(n: int, rate: float, seed: int) -> list[tuple[float, list[int], SamplingParams]]:
    """(arrival s, prompt ids, greedy params): lengths uniform, arrivals Poisson."""
    rng = random.Random(seed)
    t, trace = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out = rng.randint(32, 128)
        prompt = [rng.randrange(2, 500) for _ in range(rng.randint(16, 256))]
        trace.append((t, prompt, SamplingParams(temperature=0.0, max_tokens=out, min_tokens=out)))
    return trace


async def run_trace(cluster: Cluster, trace) -> list[dict]:
    start = time.monotonic()

    async def one(arrival, prompt, params):
        await asyncio.sleep(max(0.0, start + arrival - time.monotonic()))
        tokens, last = [], None
        async for chunk in cluster.stream(prompt, params):
            tokens += chunk.token_ids
            last = chunk
        return {"tokens": tokens, "error": last.error, "e2e_s": last.metrics["e2e_s"],
                "migrations": last.metrics.get("migrations", 0)}

    return await asyncio.gather(*(one(*item) for item in trace))


async def kill_during(cluster: Cluster, duration: float, kills: int) -> list[dict]:
    """Kills one victim at evenly spaced times within the trace; measures kill -> serving again."""
    events = []
    for i in range(kills):
        await asyncio.sleep(duration / (kills + 1))
        name, rank = VICTIMS[i % len(VICTIMS)]
        pid = await asyncio.to_thread(cluster.rank_call, name, rank, "pid")
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        restored = None
        while restored is None and time.monotonic() - killed < 300:
            await asyncio.sleep(0.1)
            state = (await cluster.stats_async())["instances"][name]
            if state["state"] == "serving" and state["restarts"] > sum(e["victim"] == name for e in events):
                restored = time.monotonic() - killed
        events.append({"victim": name, "rank": rank, "restored_s": restored})
    return events


async def faulty_pass(cluster, trace, kills):
    duration = trace[-1][0]
    results, events = await asyncio.gather(run_trace(cluster, trace), kill_during(cluster, duration, kills))
    return results, events


def summarize(base: list[dict], faulty: list[dict], events: list[dict]) -> dict:
    lost = sum(r["error"] is not None for r in faulty)
    wrong = sum(r["error"] is None and r["tokens"] != b["tokens"] for r, b in zip(faulty, base))
    moved = [(r, b) for r, b in zip(faulty, base) if r["migrations"] and r["error"] is None]
    added = [r["e2e_s"] - b["e2e_s"] for r, b in moved]
    restored = [e["restored_s"] for e in events if e["restored_s"] is not None]
    return {"requests": len(faulty), "lost": lost, "wrong_tokens": wrong, "migrated": len(moved),
            "added_latency_p50_s": percentile(added, 50) if added else None,
            "added_latency_p99_s": percentile(added, 99) if added else None,
            "restore_s": restored, "restore_max_s": max(restored) if restored else None,
            "not_restored": sum(e["restored_s"] is None for e in events)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--rate", type=float, default=4.0, help="requests/s (Poisson)")
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "fault_tolerance.json"))
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    trace = make_trace(args.requests, args.rate, args.seed)
    cfg = {"model": args.model, "device": "cpu", "prefill": {"instances": 2}, "decode": {"instances": 2},
           "engine": {"kv_cache_bytes": 64 << 20}, "fault_tolerance": {"restart_backoff_s": 0.2}}
    with Cluster(cfg) as cluster:
        cluster.generate([[5] * 8], SamplingParams(max_tokens=4))  # warm-up
        base = asyncio.run(run_trace(cluster, trace))
        faulty, events = asyncio.run(faulty_pass(cluster, trace, args.kills))
    summary = summarize(base, faulty, events)
    print(f"{args.model} 2P2D, {args.requests} requests at {args.rate} req/s, {args.kills} kills (SIGKILL)")
    for e in events:
        shown = f"{e['restored_s']:.1f} s" if e["restored_s"] is not None else "not restored"
        print(f"  killed {e['victim']} rank {e['rank']}: serving again after {shown}")
    print(f"requests lost: {summary['lost']}   outputs different from the undisturbed pass: "
          f"{summary['wrong_tokens']}   migrated: {summary['migrated']}")
    if summary["migrated"]:
        print(f"added e2e latency of migrated requests: p50 {summary['added_latency_p50_s']:.2f} s, "
              f"p99 {summary['added_latency_p99_s']:.2f} s")
    result = dict(model=args.model, rate=args.rate, machine=platform.processor() or platform.machine(),
                  load_avg=os.getloadavg(), events=events, **summary)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
