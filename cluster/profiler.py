"""`splitserve profile`: measures this machine's prefill and decode step times for a model (TP 1, in-process, one
thread like every rank actor), fits DistServe's forms and writes a profile the planner loads (`--profile`). Every
shape is timed `--repeats` times; the fit uses each shape's median, down-weights shapes that stray (a busy
machine), and reports a bootstrap interval per coefficient, printed and saved with the profile.

With `--pp 1,2` the same shapes also run through real pipeline stages (cluster/pipeline_profiler.py: one process
per stage), each depth saved as an entry of its own, and the cost of one more stage (fixed + per token) is derived
from the single-sequence forwards and printed next to the analytic model's.

With `--server` the decode step is fitted through a running server instead: batches of requests decoding together
as the decode rank really runs them (mixed contexts, sampling, scheduling, events). The in-process fit covers the
forward only and underestimates steps under serving; see benchmarks/planner_validation.py."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import statistics
import time

import torch

from splitserve.placement.parallel import Parallel
from splitserve.placement.profile import (PipelineHop, Profile, ProfileEntry, Uncertainty, fit_decode_report,
                                          fit_pipeline_hop, fit_prefill_report)
from splitserve.workers.batch import build_batch
from splitserve.workers.block_manager import BlockManager
from splitserve.workers.llm import LLM
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.sequence import Sequence
from splitserve.workers.stop import StopChecker

PREFILL_BATCHES = ([64], [128], [256], [512], [1024], [128] * 4, [256] * 4, [512, 512], [64] * 16)
DECODE_POINTS = [(b, ctx) for b in (1, 2, 4, 8, 16) for ctx in (128, 512, 1024)]
SERVING_DECODE_BATCHES = (1, 2, 4, 6, 8, 12, 16, 20, 24)
SERVING_DECODE_OUTPUT = 64
SERVING_DECODE_ROUNDS = 3


def _times(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def _time(fn, repeats: int) -> float:
    return statistics.median(_times(fn, repeats))


_seq_ids = itertools.count()


def sequences(blocks: BlockManager, lengths: list[int], computed_all_but_last: bool) -> list[Sequence]:
    """Sequences of these lengths with their blocks allocated: a prompt to compute whole, or (decode) one whose
    tokens but the last are in the cache."""
    params = SamplingParams(max_tokens=1)
    seqs = []
    for n in lengths:
        seq = Sequence(f"profile-{next(_seq_ids)}", [2 + i % 500 for i in range(n)], params,
                       StopChecker(params, (), None))
        blocks.allocate(seq.seq_id, n)
        seq.num_computed_tokens = n - 1 if computed_all_but_last else 0
        seqs.append(seq)
    return seqs


def _sequences(llm: LLM, lengths: list[int], computed_all_but_last: bool):
    return sequences(llm.blocks, lengths, computed_all_but_last)


def _shapes(prefill_batches, decode_points) -> list[tuple]:
    return [("prefill", list(lengths)) for lengths in prefill_batches] + [("decode", p) for p in decode_points]


def _by_phase(shapes: list[tuple], times: list[list[float]]):
    """([(lengths, seconds per repeat)], [(batch, total context, seconds per repeat)])."""
    prefill = [(list(shape), t) for (phase, shape), t in zip(shapes, times) if phase == "prefill"]
    decode = [(shape[0], shape[0] * shape[1], t) for (phase, shape), t in zip(shapes, times) if phase == "decode"]
    return prefill, decode


def measure(llm: LLM, prefill_batches, decode_points, repeats: int = 5):
    """([(lengths, [seconds per repeat])], [(batch, total context, [seconds per repeat])]) for forwards that write
    into the real cache. The shapes are swept `repeats` times, one repeat of each per sweep, so that a minute in
    which the machine was busy touches one repeat of many shapes rather than every repeat of a few."""
    runner = llm.runner
    shapes = _shapes(prefill_batches, decode_points)
    times: list[list[float]] = [[] for _ in shapes]
    for sweep in range(repeats):
        for i, (phase, shape) in enumerate(shapes):
            lengths = list(shape) if phase == "prefill" else [shape[1]] * shape[0]
            seqs = sequences(llm.blocks, lengths, computed_all_but_last=phase == "decode")
            batch = build_batch(seqs, llm.blocks)
            if sweep == 0:
                runner.forward_logits(batch)  # warm-up
            start = time.perf_counter()
            runner.forward_logits(batch)
            times[i].append(time.perf_counter() - start)
            for s in seqs:
                llm.blocks.free(s.seq_id)
    return _by_phase(shapes, times)


def _fit_entry(par: Parallel, prefill, decode, resamples: int) -> ProfileEntry:
    k_prefill, u_prefill = fit_prefill_report([(ls, t) for ls, ts in prefill for t in ts], resamples)
    k_decode, u_decode = fit_decode_report([(b, c, t) for b, c, ts in decode for t in ts], resamples)
    return ProfileEntry(par, k_prefill, k_decode, {"prefill": u_prefill, "decode": u_decode})


def _medians(prefill, decode):
    return ([(ls, statistics.median(ts)) for ls, ts in prefill],
            [(b, c, statistics.median(ts)) for b, c, ts in decode])


def profile_model(model: str, dtype: str = "float32", device: str = "cpu", repeats: int = 5,
                  prefill_batches=PREFILL_BATCHES, decode_points=DECODE_POINTS, resamples: int = 200):
    """(profile, [(lengths, median seconds)], [(batch, total context, median seconds)]); the profile's entry
    carries each phase's uncertainty."""
    torch.set_num_threads(1)
    longest = max(max(sum(b) for b in prefill_batches), max(b * c for b, c in decode_points))
    llm = LLM(model, dtype=dtype, device=device, kv_cache_bytes=_cache_bytes(model, longest))
    prefill, decode = measure(llm, prefill_batches, decode_points, repeats)
    entry = _fit_entry(Parallel(), prefill, decode, resamples)
    hardware = "cpu" if llm.device.type == "cpu" else torch.cuda.get_device_name(llm.device)
    return (Profile(model=model, hardware=hardware, entries=(entry,)), *_medians(prefill, decode))


def profile_pipeline(model: str, pp: int, dtype: str = "float32", device: str = "cpu", repeats: int = 5,
                     prefill_batches=PREFILL_BATCHES, decode_points=DECODE_POINTS, resamples: int = 200):
    """The same shapes as `profile_model` through `pp` real pipeline stages (one process each), each forward
    followed by the same batch through the whole model (PP 1) in the leader's process. Returns (entry for tp 1 pp
    `pp`, (prefill, decode) medians through the stages, (prefill, decode) medians of the PP 1 forwards alongside,
    the cost of one more stage), the medians as `profile_model` returns them."""
    from splitserve.cluster.pipeline_profiler import measure_pipeline
    from splitserve.workers.engine_config import EngineConfig
    from splitserve.workers.presets import resolve_model

    shapes = _shapes(prefill_batches, decode_points)
    staged, single = measure_pipeline(str(resolve_model(model)), pp, shapes, repeats, dtype, device,
                                      EngineConfig().block_size)
    prefill, decode = _by_phase(shapes, staged)
    # The hop from single sequences (a batch of several flows as overlapping micro-batches): per shape, the median
    # of each repeat's difference, PP 1 having run right after the stages.
    alone = []
    for (phase, shape), through_stages, whole in zip(shapes, staged, single):
        lengths = shape if phase == "prefill" else [1] * shape[0]
        if len(lengths) == 1:
            added = statistics.median(t - u for t, u in zip(through_stages, whole))
            alone.append((lengths[0], statistics.median(whole), added))
    return (_fit_entry(Parallel(pp=pp), prefill, decode, resamples), _medians(prefill, decode),
            _medians(*_by_phase(shapes, single)), fit_pipeline_hop(alone, pp))


def uncertainty_line(name: str, k, u: Uncertainty) -> str:
    """`decode (ms): a = 15.1 [14.2, 16.0], ...` with the interval level, shapes, samples and the residual."""
    v, lo, hi = k.to_ms(), u.low.to_ms(), u.high.to_ms()
    terms = ", ".join(f"{c} = {v[c]:.4g} [{lo[c]:.4g}, {hi[c]:.4g}]" for c in "abc")
    return (f"{name} (ms): {terms}  ({100 * u.level:.0f} % bootstrap intervals; {u.shapes} shapes, {u.samples} "
            f"samples; robust relative residual {100 * u.relative_residual:.1f} %)")


def _cache_bytes(model: str, tokens: int) -> int:
    from splitserve.workers.config import load_config
    from splitserve.workers.presets import resolve_model

    cfg = load_config(resolve_model(model))
    return 2 * (tokens + 64 * 16) * cfg.kv_bytes_per_token  # room for the largest point, with slack for blocks


def _rotated(q, shift: int):
    """The same request with its prompt ids rotated: another prompt of the same length (no cached prefix)."""
    if shift == 0 or not isinstance(q.prompt, tuple):
        return q
    shift %= len(q.prompt)
    return dataclasses.replace(q, prompt=q.prompt[shift:] + q.prompt[:shift])


def serving_decode_fit(target: str, workload, handoff_s: float, max_batched_tokens: int,
                       timeout: float | None = None, token: str | None = None, rounds: int = SERVING_DECODE_ROUNDS,
                       resamples: int = 200):
    """Decode steps as the client sees them: B requests (from `workload`, short and long prompts apart) sent at
    once, prefilled together and decoding together; the step is their median TPOT less the share of the hand-off
    (first token -> KV ready). No prefill runs meanwhile. Every batch is sent `rounds` times (its prompts rotated,
    the rounds apart in time) and the fit takes each batch's median. Returns (Coefficients, Uncertainty, info with
    the measured points)."""
    from splitserve.cluster import bench

    start = time.perf_counter()
    median = statistics.median(q.prompt_len for q in workload)
    pools = {"short": [q for q in workload if q.prompt_len < median],
             "long": [q for q in workload if q.prompt_len >= median]}
    batches = []
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
        batches.append(batch)
    steps: list[list[float]] = [[] for _ in batches]
    for round_ in range(rounds):
        for batch, times in zip(batches, steps):
            report = asyncio.run(bench.run_benchmark(target, [_rotated(q, round_) for q in batch], float("inf"),
                                                     timeout=timeout, token=token, keep_records=True))
            tpots = [r["tpot_s"] for r in report["requests"] if r["ok"]]
            if len(tpots) < len(batch):
                raise RuntimeError(f"serving decode profile: {len(batch) - len(tpots)} of {len(batch)} requests "
                                   "failed")
            times.append(statistics.median(tpots) - handoff_s / (SERVING_DECODE_OUTPUT - 1))
    samples, points = [], []
    for batch, times in zip(batches, steps):
        size = len(batch)
        context = sum(r.prompt_len for r in batch) + size * SERVING_DECODE_OUTPUT // 2
        samples += [(size, context, t) for t in times]
        points.append({"batch": size, "context": context, "longest": max(r.prompt_len for r in batch)
                       + SERVING_DECODE_OUTPUT // 2, "measured_ms": statistics.median(times) * 1e3,
                       "repeats_ms": [t * 1e3 for t in times]})
    k, u = fit_decode_report(samples, resamples)
    for p in points:
        p["fitted_ms"] = (k.a + k.b * p["context"] + k.c * p["batch"]) * 1e3
    return k, u, {"seconds": round(time.perf_counter() - start, 1), "decode_ms": k.to_ms(),
                  "uncertainty": u.to_dict(), "points": points}


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
    workload = bench.build_workload(args.workload, 400, max_context=info.max_context, vocab_size=info.vocab_size,
                                    eos_token_ids=list(info.eos_token_ids), has_tokenizer=info.has_tokenizer,
                                    seed=0)
    k, u, details = serving_decode_fit(args.server, workload, statistics.median(handoffs[1:]),
                                       args.max_batched_tokens, args.timeout, token)
    print(f"decode through {args.server} ({details['seconds']} s)  {'batch x context':<16}{'measured ms':>12}"
          f"{'fitted ms':>11}")
    for p in details["points"]:
        print(f"        {'':<32}{p['batch']:>3} x {p['context'] // p['batch']:<10}{p['measured_ms']:>12.2f}"
              f"{p['fitted_ms']:>11.2f}")
    print(f"decode fit (ms): in-process {decode_in_process.to_ms()} -> through the server {k.to_ms()}")
    return k, u


def add_arguments(p) -> None:
    p.add_argument("--model", default="small", help="preset or local HF checkpoint directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of every shape (the fit takes medians)")
    p.add_argument("--output", default="profile.json")
    p.add_argument("--server", default=None,
                   help="fit the decode step through this running server (HOST:PORT, serving the same model)")
    p.add_argument("--token", default=None, help="bearer token for --server")
    p.add_argument("--workload", default="humaneval", choices=["sharegpt", "humaneval", "longbench"],
                   help="with --server: prompt lengths of the decode batches")
    p.add_argument("--max-batched-tokens", type=int, default=4096,
                   help="with --server: prompt tokens per batch at most (the server's engine.max_num_batched_tokens)")
    p.add_argument("--timeout", type=float, default=300.0, help="with --server: per-request deadline (s)")
    p.add_argument("--pp", type=pipeline_degrees, default=(1,),
                   help="pipeline depths to time, e.g. 1,2 (default 1: in-process only; each deeper one runs the "
                        "same shapes again through that many stage processes, about the PP 1 time each)")


def pipeline_degrees(text: str) -> tuple[int, ...]:
    """`1,2` -> (1, 2); PP 1 is always timed (the base of every other depth)."""
    try:
        values = {int(v) for v in text.split(",") if v.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected pipeline depths like 1,2, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"pipeline depths must be integers >= 1, got {text!r}")
    return tuple(sorted(values | {1}))


def _analytic_hardware(device: str) -> str | None:
    """The planner's catalog entry for this device, to compare the measured hop with; None if it has none."""
    from splitserve.placement.hardware import HARDWARE

    if device == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device))
    return next((h for h in HARDWARE if h != "cpu" and h.split("-")[0] in name), None)


def _print_pipeline(pp: int, entry: ProfileEntry, single, staged, hop: PipelineHop, model: str, dtype: str,
                    device: str):
    # PP 1 here is the whole model in the leader's process, timed right after each pipelined forward.
    print(f"pp {pp}    {'shape':<22}{'pp 1 ms':>10}{f'pp {pp} ms':>10}{'fitted ms':>11}")
    for (lengths, t1), (_, t) in zip(single[0], staged[0]):
        k = entry.prefill
        fit = k.a + k.b * sum(lengths) + k.c * sum(n * n for n in lengths)
        print(f"prefill  {f'{len(lengths)} x {lengths[0]}':<22}{t1 * 1e3:>10.2f}{t * 1e3:>10.2f}{fit * 1e3:>11.2f}")
    for (batch, ctx, t1), (*_, t) in zip(single[1], staged[1]):
        fit = entry.decode.a + entry.decode.b * ctx + entry.decode.c * batch
        print(f"decode   {f'{batch} x {ctx // batch}':<22}{t1 * 1e3:>10.2f}{t * 1e3:>10.2f}{fit * 1e3:>11.2f}")
    line = (f"one more stage (pp {pp} vs 1, {hop.shapes} single-sequence shapes): {hop.fixed * 1e3:.3f} ms + "
            f"{hop.per_token * 1e6:.3f} us/token")
    hardware = _analytic_hardware(device)
    if hardware:
        from splitserve.placement.hardware import ClusterSpec, get_hardware
        from splitserve.placement.latency import AnalyticLatency, Efficiency
        from splitserve.placement.specs import load_model
        from splitserve.workers.presets import resolve_model

        spec = load_model(str(resolve_model(model)), dtype)
        fixed, per_token = AnalyticLatency(spec, ClusterSpec(1, pp, get_hardware(hardware))).pipeline_hop(
            Parallel(pp=pp))
        line += (f"; the analytic model ({hardware}): {fixed * 1e3:.3f} ms + {per_token * 1e6:.3f} us/token "
                 f"(forward_overhead {Efficiency().forward_overhead * 1e3:g} ms + link latency)")
    print(line)


def run(args) -> int:
    from splitserve.workers.config import load_config
    from splitserve.workers.hf_config import resolve_backend
    from splitserve.workers.presets import resolve_model

    stages = [pp for pp in args.pp if pp > 1]
    if stages and args.server:
        raise ValueError("--pp: deeper pipelines are timed in-process only; with --server only PP 1's decode is "
                         "refitted, so profile them apart")
    model_config = load_config(resolve_model(args.model))
    if stages and max(stages) > model_config.num_layers:
        raise ValueError(f"--pp: {max(stages)} stages cannot split {args.model}'s {model_config.num_layers} layers")
    if stages and resolve_backend("auto", model_config.architecture) != "native":
        raise ValueError(f"--pp: pipeline stages run on the native model backend only ({model_config.architecture})")
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
        decode, uncertainty = _server_decode(args, entry.decode)
        entry = dataclasses.replace(entry, decode=decode, uncertainty={**entry.uncertainty, "decode": uncertainty})
        profile = dataclasses.replace(profile, entries=(entry,))
    for phase in ("prefill", "decode"):
        print(uncertainty_line(phase, getattr(entry, phase), entry.uncertainty[phase]))
    for pp in stages:
        staged_entry, staged, single, hop = profile_pipeline(args.model, pp, args.dtype, args.device, args.repeats)
        _print_pipeline(pp, staged_entry, single, staged, hop, args.model, args.dtype, args.device)
        for phase in ("prefill", "decode"):
            print(uncertainty_line(f"pp {pp} {phase}", getattr(staged_entry, phase), staged_entry.uncertainty[phase]))
        profile = dataclasses.replace(profile, entries=profile.entries + (staged_entry,))
    profile.save(args.output)
    print(f"wrote {args.output}; use it with `splitserve plan --profile {args.output} --model {args.model} ...`")
    return 0
