"""`splitserve profile`: measures this machine's prefill and decode step times for a model (TP 1, in-process, one
thread like every rank actor), fits DistServe's forms and writes a profile the planner loads (`--profile`).

With `--server` the decode step is fitted through a running server instead: batches of requests decoding together
as the decode rank really runs them (mixed contexts, sampling, scheduling, events). The in-process fit covers the
forward only and underestimates steps under serving; see benchmarks/planner_validation.py."""
from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time

import torch

from splitserve.placement.parallel import Parallel
from splitserve.placement.profile import Profile, ProfileEntry, fit_decode, fit_prefill
from splitserve.workers.batch import build_batch
from splitserve.workers.llm import LLM
from splitserve.workers.sampling_params import SamplingParams

PREFILL_BATCHES = ([64], [128], [256], [512], [1024], [128] * 4, [256] * 4, [512, 512], [64] * 16)
DECODE_POINTS = [(b, ctx) for b in (1, 4, 16) for ctx in (128, 512, 1024)]
SERVING_DECODE_BATCHES = (1, 2, 4, 8, 12, 16, 20)
SERVING_DECODE_OUTPUT = 64


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _sequences(llm: LLM, lengths: list[int], computed_all_but_last: bool):
    seqs = []
    for n in lengths:
        seq = llm.make_sequence([2 + i % 500 for i in range(n)], SamplingParams(max_tokens=1))
        llm.blocks.allocate(seq.seq_id, n)
        seq.num_computed_tokens = n - 1 if computed_all_but_last else 0
        seqs.append(seq)
    return seqs


def measure(llm: LLM, prefill_batches, decode_points, repeats: int = 3):
    """([(lengths, seconds)], [(batch, total context, seconds)]) for forwards that write into the real cache."""
    runner = llm.runner
    prefill, decode = [], []
    for lengths in prefill_batches:
        seqs = _sequences(llm, lengths, computed_all_but_last=False)
        batch = build_batch(seqs, llm.blocks)
        prefill.append((list(lengths), _time(lambda: runner.forward_logits(batch), repeats)))
        for s in seqs:
            llm.blocks.free(s.seq_id)
    for size, ctx in decode_points:
        seqs = _sequences(llm, [ctx] * size, computed_all_but_last=True)
        batch = build_batch(seqs, llm.blocks)
        decode.append((size, size * ctx, _time(lambda: runner.forward_logits(batch), repeats)))
        for s in seqs:
            llm.blocks.free(s.seq_id)
    return prefill, decode


def profile_model(model: str, dtype: str = "float32", device: str = "cpu", repeats: int = 3,
                  prefill_batches=PREFILL_BATCHES, decode_points=DECODE_POINTS):
    torch.set_num_threads(1)
    longest = max(max(sum(b) for b in prefill_batches), max(b * c for b, c in decode_points))
    llm = LLM(model, dtype=dtype, device=device, kv_cache_bytes=_cache_bytes(model, longest))
    prefill, decode = measure(llm, prefill_batches, decode_points, repeats)
    entry = ProfileEntry(Parallel(), fit_prefill(prefill), fit_decode(decode))
    hardware = "cpu" if llm.device.type == "cpu" else torch.cuda.get_device_name(llm.device)
    return Profile(model=model, hardware=hardware, entries=(entry,)), prefill, decode


def _cache_bytes(model: str, tokens: int) -> int:
    from splitserve.workers.config import load_config
    from splitserve.workers.presets import resolve_model

    cfg = load_config(resolve_model(model))
    return 2 * (tokens + 64 * 16) * cfg.kv_bytes_per_token  # room for the largest point, with slack for blocks


def serving_decode_fit(target: str, workload, handoff_s: float, max_batched_tokens: int,
                       timeout: float | None = None, token: str | None = None):
    """Decode steps as the client sees them: B requests (from `workload`, short and long prompts apart) sent at
    once, prefilled together and decoding together; the step is their median TPOT less the share of the hand-off
    (first token -> KV ready). No prefill runs meanwhile. Returns (Coefficients, info with the measured points)."""
    from splitserve.cluster import bench

    start = time.perf_counter()
    median = statistics.median(q.prompt_len for q in workload)
    pools = {"short": [q for q in workload if q.prompt_len < median],
             "long": [q for q in workload if q.prompt_len >= median]}
    samples, points = [], []
    for size, group in ((b, g) for b in SERVING_DECODE_BATCHES for g in pools):
        batch, rest, tokens = [], [], 0
        for q in pools[group]:  # the next prompts that fit one prefill batch; the others stay for later batches
            if len(batch) < size and tokens + q.prompt_len <= max_batched_tokens:
                batch.append(dataclasses.replace(q, output_len=SERVING_DECODE_OUTPUT))
                tokens += q.prompt_len
            else:
                rest.append(q)
        pools[group] = rest
        if not batch:
            raise ValueError(f"workload: too few prompts (or none under {max_batched_tokens} tokens) for a "
                             f"{group}-prompt decode batch of {size}")
        size = len(batch)
        report = asyncio.run(bench.run_benchmark(target, batch, float("inf"), timeout=timeout, token=token,
                                                 keep_records=True))
        tpots = [r["tpot_s"] for r in report["requests"] if r["ok"]]
        if len(tpots) < size:
            raise RuntimeError(f"serving decode profile: {size - len(tpots)} of {size} requests failed")
        step = statistics.median(tpots) - handoff_s / (SERVING_DECODE_OUTPUT - 1)
        context = sum(r.prompt_len for r in batch) + size * SERVING_DECODE_OUTPUT // 2
        samples.append((size, context, step))
        points.append({"batch": size, "context": context, "longest": max(r.prompt_len for r in batch)
                       + SERVING_DECODE_OUTPUT // 2, "measured_ms": step * 1e3})
    k = fit_decode(samples)
    for p in points:
        p["fitted_ms"] = (k.a + k.b * p["context"] + k.c * p["batch"]) * 1e3
    return k, {"seconds": round(time.perf_counter() - start, 1), "decode_ms": k.to_ms(), "points": points}


def _server_decode(args, decode_in_process):
    """The decode fit through `args.server` (the same model must be served there)."""
    from splitserve.cluster import bench
    from splitserve.proto.client import Client

    token = args.token
    with Client(args.server, token=token, timeout=args.timeout) as client:
        client.wait_ready(60)
        info = client.model_info()
        handoffs = []
        for i in range(4):  # unloaded requests: the hand-off each decode batch pays once
            r = client.generate([bench.LOW_TOKEN_ID + i] * 64, max_tokens=8, temperature=0.0, ignore_eos=True)
            handoffs.append(r.server_timing.get("kv_transfer_s") or 0.0)
    workload = bench.build_workload(args.workload, 200, max_context=info.max_context, vocab_size=info.vocab_size,
                                    eos_token_ids=list(info.eos_token_ids), has_tokenizer=info.has_tokenizer,
                                    seed=0)
    k, details = serving_decode_fit(args.server, workload, statistics.median(handoffs[1:]),
                                    args.max_batched_tokens, args.timeout, token)
    print(f"decode through {args.server} ({details['seconds']} s)  {'batch x context':<16}{'measured ms':>12}"
          f"{'fitted ms':>11}")
    for p in details["points"]:
        print(f"        {'':<32}{p['batch']:>3} x {p['context'] // p['batch']:<10}{p['measured_ms']:>12.2f}"
              f"{p['fitted_ms']:>11.2f}")
    print(f"decode fit (ms): in-process {decode_in_process.to_ms()} -> through the server {k.to_ms()}")
    return k


def add_arguments(p) -> None:
    p.add_argument("--model", default="small", help="preset or local HF checkpoint directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default="profile.json")
    p.add_argument("--server", default=None,
                   help="fit the decode step through this running server (HOST:PORT, serving the same model)")
    p.add_argument("--token", default=None, help="bearer token for --server")
    p.add_argument("--workload", default="humaneval", choices=["sharegpt", "humaneval", "longbench"],
                   help="with --server: prompt lengths of the decode batches")
    p.add_argument("--max-batched-tokens", type=int, default=4096,
                   help="with --server: prompt tokens per batch at most (the server's engine.max_num_batched_tokens)")
    p.add_argument("--timeout", type=float, default=300.0, help="with --server: per-request deadline (s)")


def run(args) -> int:
    profile, prefill, decode = profile_model(args.model, args.dtype, args.device, args.repeats)
    entry = profile.entries[0]
    print(f"prefill {'lengths':<24}{'measured ms':>12}{'fitted ms':>11}")
    for lengths, t in prefill:
        fit = entry.prefill.a + entry.prefill.b * sum(lengths) + entry.prefill.c * sum(n * n for n in lengths)
        label = f"{len(lengths)} x {lengths[0]}"
        print(f"        {label:<24}{t * 1e3:>12.2f}{fit * 1e3:>11.2f}")
    print(f"decode  {'batch x context':<24}{'measured ms':>12}{'fitted ms':>11}")
    for batch, ctx, t in decode:
        fit = entry.decode.a + entry.decode.b * ctx + entry.decode.c * batch
        print(f"        {f'{batch} x {ctx // batch}':<24}{t * 1e3:>12.2f}{fit * 1e3:>11.2f}")
    if args.server:
        entry = dataclasses.replace(entry, decode=_server_decode(args, entry.decode))
        profile = dataclasses.replace(profile, entries=(entry,))
    coeffs = {k: v.to_ms() for k, v in (("prefill", entry.prefill), ("decode", entry.decode))}
    print(f"fitted (ms): {coeffs}")
    profile.save(args.output)
    print(f"wrote {args.output}; use it with `splitserve plan --profile {args.output} --model {args.model} ...`")
    return 0
