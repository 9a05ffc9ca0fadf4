"""`splitserve profile`: measures this machine's prefill and decode step times for a model (TP 1, in-process, one
thread like every rank actor), fits DistServe's forms and writes a profile the planner loads (`--profile`). Every
shape is timed `--repeats` times; the fit uses each shape's median, down-weights shapes that stray (a busy
machine), and reports a bootstrap interval per coefficient, printed and saved with the profile.

With `--layouts 2x1x1,1x2x1,1x1x2` (TP x SP x PP; `--pp 1,2` is short for `--layouts 1x1x1,1x1x2`) the same shapes
also run through the real ranks of each layout (cluster/layout_profiler.py: one process per rank, each built as the
launcher builds an instance's rank), each layout saved as an entry of its own (an SP layout times prefill only: SP
runs prefill only). What the layout adds to TP 1 (fixed + per token) is fitted from paired forwards and printed
next to the analytic model's TP all-reduce, SP ring and pipeline-hop terms.

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
from dataclasses import dataclass

import torch

from splitserve.placement.parallel import Parallel
from splitserve.placement.profile import (Overhead, Profile, ProfileEntry, Uncertainty, fit_decode_report,
                                          fit_overhead, fit_pipeline_hop, fit_prefill_report)
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
            seqs = sequences(llm.blocks, shape_lengths((phase, shape)), computed_all_but_last=phase == "decode")
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
    """The entry of `par`; without decode shapes (an SP layout) it has a prefill fit only."""
    k_prefill, u_prefill = fit_prefill_report([(ls, t) for ls, ts in prefill for t in ts], resamples)
    if not decode:
        return ProfileEntry(par, k_prefill, None, {"prefill": u_prefill})
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


@dataclass(frozen=True)
class LayoutTiming:
    """One layout timed through its real ranks: its profile entry; the medians through its ranks and through the
    whole model at TP 1 alongside, as `profile_model` returns them; per shape, the median of what the layout added to
    the TP 1 forward timed right after it; that added time fitted as fixed + per token (per stage for a pipeline
    alone); and per shape, the median time the leader spent blocked in communication (cluster/comm_timer.py)."""

    entry: ProfileEntry
    timed: tuple[list, list]
    alongside: tuple[list, list]
    added: tuple[list[float], list[float]]
    overhead: Overhead
    blocked: tuple[list[float], list[float]]  # per shape, the median seconds the leader was blocked in communication
    calls: tuple[list[int], list[int]]  # per shape, the leader's communication calls in one forward


def _tokens(shape) -> int:
    """Query tokens of a shape's forward."""
    phase, value = shape
    return sum(value) if phase == "prefill" else value[0]


def profile_layout(model: str, par: Parallel, dtype: str = "float32", device: str = "cpu", repeats: int = 5,
                   prefill_batches=PREFILL_BATCHES, decode_points=DECODE_POINTS, resamples: int = 200,
                   backend: str = "auto") -> LayoutTiming:
    """The shapes of `profile_model` through the ranks of layout `par` (one process per rank; prefill shapes only
    under SP), each forward followed by the same shape through the whole model at TP 1 in the leader's process."""
    from splitserve.cluster.layout_profiler import measure_layout
    from splitserve.workers.engine_config import EngineConfig
    from splitserve.workers.instance import InstanceSpec
    from splitserve.workers.presets import resolve_model

    if par.sp > 1:
        decode_points = []  # SP runs prefill only
    shapes = _shapes(prefill_batches, decode_points)
    longest = max(sum(shape_lengths(shape)) for shape in shapes)
    spec = InstanceSpec(cluster_id="profile", name=f"profile-{par.tp}x{par.sp}x{par.pp}",
                        role="prefill" if par.sp > 1 else "colocated", tp=par.tp, sp=par.sp, pp=par.pp,
                        sp_algorithm=par.sp_algorithm if par.sp > 1 else "ring",
                        model_dir=str(resolve_model(model)), dtype=dtype, device=device,
                        # On a GPU the leader's rank and the whole model alongside share device 0: half each.
                        engine=EngineConfig(kv_cache_bytes=_cache_bytes(model, longest), gpu_memory_fraction=0.45,
                                            backend=backend))
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # what the in-process profile held is the ranks' now
    timed, blocked, single = measure_layout(spec, shapes, repeats)
    added_by_shape = [statistics.median(t - u for t, u in zip(through, whole)) for through, whole in zip(timed, single)]
    # Under pipeline stages, single sequences only: a batch of several flows as overlapping micro-batches.
    samples = [(_tokens(shape), statistics.median(whole), added)
               for shape, whole, added in zip(shapes, single, added_by_shape)
               if par.pp == 1 or len(shape_lengths(shape)) == 1]
    pipeline_alone = par.pp > 1 and par.tp == par.sp == 1
    overhead = fit_pipeline_hop(samples, par.pp) if pipeline_alone else fit_overhead(samples)
    prefill, decode = _by_phase(shapes, timed)
    count = len(prefill)
    blocked_by_shape = [statistics.median(seconds for seconds, _ in b) for b in blocked]
    calls_by_shape = [max(calls for _, calls in b) for b in blocked]
    return LayoutTiming(_fit_entry(par, prefill, decode, resamples), _medians(prefill, decode),
                        _medians(*_by_phase(shapes, single)), (added_by_shape[:count], added_by_shape[count:]),
                        overhead, (blocked_by_shape[:count], blocked_by_shape[count:]),
                        (calls_by_shape[:count], calls_by_shape[count:]))


def shape_lengths(shape) -> list[int]:
    """The sequence lengths of a shape's batch: its prompts, or (decode) each sequence's context."""
    phase, value = shape
    return list(value) if phase == "prefill" else [value[1]] * value[0]


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
    p.add_argument("--layouts", type=layouts, default=None,
                   help="instance layouts to time through their real ranks, TPxSPxPP, e.g. 1x1x1,2x1x1,1x2x1,1x1x2 "
                        "(1x1x1 is always timed, in-process; each other layout runs the same shapes again through "
                        "one process per rank, about the TP 1 time each; an SP layout times prefill shapes only)")
    p.add_argument("--pp", type=pipeline_degrees, default=None,
                   help="short for --layouts 1x1x1,1x1xP,...: pipeline depths to time, e.g. 1,2")
    p.add_argument("--sp-algorithm", default="auto", choices=["auto", "ring", "token_ring"],
                   help="attention of the SP layouts (auto: the one the planner picks for the model and TP degree)")


def layouts(text: str) -> tuple[tuple[int, int, int], ...]:
    """`1x1x1,2x1x1` -> ((1, 1, 1), (2, 1, 1)) as (tp, sp, pp); 1x1x1 (the base of every other layout) always
    comes first."""
    values = {}  # in the order given
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        parts = item.lower().split("x")
        try:
            degrees = tuple(int(v) for v in parts)
        except ValueError:
            degrees = ()
        if len(degrees) != 3 or min(degrees) < 1:
            raise argparse.ArgumentTypeError(f"expected layouts TPxSPxPP of integers >= 1 like 2x1x1, got {item!r}")
        values[degrees] = None
    if not values:
        raise argparse.ArgumentTypeError(f"expected layouts TPxSPxPP like 1x1x1,2x1x1, got {text!r}")
    return ((1, 1, 1),) + tuple(v for v in values if v != (1, 1, 1))


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


def _label(par: Parallel) -> str:
    return f"{par.tp}x{par.sp}x{par.pp}"


def _analytic(model: str, dtype: str, device: str, par: Parallel):
    """(the analytic model of this device with the layout's ranks on one node, the catalog name), or None."""
    hardware = _analytic_hardware(device)
    if hardware is None:
        return None
    from splitserve.placement.hardware import ClusterSpec, get_hardware
    from splitserve.placement.latency import AnalyticLatency
    from splitserve.placement.specs import load_model
    from splitserve.workers.presets import resolve_model

    spec = load_model(str(resolve_model(model)), dtype)
    return AnalyticLatency(spec, ClusterSpec(1, par.devices, get_hardware(hardware))), hardware


def _analytic_comm(lat, par: Parallel, lengths: list[int], tokens: int, prefill: bool) -> float:
    """The analytic model's communication of one forward: TP all-reduces, exposed SP ring steps, pipeline hops."""
    seconds = 0.0
    if par.tp > 1:
        fixed, per_token = lat.tp_allreduce(par, prefill)
        seconds += fixed + per_token * tokens
    if par.sp > 1 and prefill:
        seconds += lat.sp_ring_exposed(lengths, par)
    if par.pp > 1:
        fixed, per_token = lat.pipeline_hop(par, prefill)
        seconds += (par.pp - 1) * (fixed + per_token * tokens)
    return seconds


def _print_layout(timing: LayoutTiming, model: str, dtype: str, device: str) -> None:
    """Each shape at TP 1 (timed right after it) and through the layout's ranks, what the layout added, and the
    analytic model's view of the same: the whole difference, and its communication terms alone."""
    par, entry = timing.entry.par, timing.entry
    analytic = _analytic(model, dtype, device, par)
    lat = analytic[0] if analytic else None
    print(f"{_label(par):<8} {'shape':<16}{'tp 1 ms':>9}{'layout ms':>11}{'fitted ms':>11}{'added ms':>10}"
          f"{'comm ms':>9}{'analytic added':>16}{'analytic comm':>15}")
    analytic_added = []
    rows = ([("prefill", ls, t1, t, add, b) for (ls, t1), (_, t), add, b in
             zip(timing.alongside[0], timing.timed[0], timing.added[0], timing.blocked[0])]
            + [("decode", (bs, c), t1, t, add, b) for (bs, c, t1), (*_, t), add, b in
               zip(timing.alongside[1], timing.timed[1], timing.added[1], timing.blocked[1])])
    for phase, shape, t1, t, add, blocked in rows:
        if phase == "prefill":
            k, lengths, tokens = entry.prefill, list(shape), sum(shape)
            fit = k.a + k.b * tokens + k.c * sum(n * n for n in lengths)
            label = f"{len(lengths)} x {lengths[0]}"
        else:
            (batch, ctx), k = shape, entry.decode
            lengths, tokens = [ctx // batch] * batch, batch
            fit = k.a + k.b * ctx + k.c * batch
            label = f"{batch} x {ctx // batch}"
        line = (f"{phase:<8} {label:<16}{t1 * 1e3:>9.2f}{t * 1e3:>11.2f}{fit * 1e3:>11.2f}{add * 1e3:>10.2f}"
                f"{blocked * 1e3:>9.2f}")
        if lat is not None:
            if phase == "prefill":
                whole = lat.prefill_time(lengths, par) - lat.prefill_time(lengths, Parallel())
            else:
                whole = lat.decode_time(batch, ctx, par) - lat.decode_time(batch, ctx, Parallel())
            comm = _analytic_comm(lat, par, lengths, tokens, phase == "prefill")
            line += f"{whole * 1e3:>16.3f}{comm * 1e3:>15.3f}"
            if par.pp == 1 or len(lengths) == 1:  # the shapes the measured fit takes
                analytic_added.append((tokens, t1, whole))
        print(line)
    blocked = timing.blocked[0] + timing.blocked[1]
    calls = timing.calls[0] + timing.calls[1]
    each = statistics.median(b / c for b, c in zip(blocked, calls) if c)
    print(f"comm ms: the leader's time blocked in collectives and point-to-point waits (waiting for its peers "
          f"included{'; with stages, the logits of the last stage too' if par.pp > 1 else ''}): {min(calls)}-"
          f"{max(calls)} calls per forward, median {each * 1e6:.0f} us per call")
    o = timing.overhead
    per = "per stage, " if par.pp > 1 and par.tp == par.sp == 1 else ""
    which = "single-sequence " if par.pp > 1 else ""
    line = (f"{_label(par)} added to tp 1 ({per}{o.shapes} {which}shapes, fitted): {o.fixed * 1e3:.3f} ms + "
            f"{o.per_token * 1e6:.3f} us/token")
    if lat is None:
        print(line)
        return
    hardware = analytic[1]
    if per:
        fixed, per_token = lat.pipeline_hop(par)
        line += (f"; the analytic model ({hardware}): {fixed * 1e3:.3f} ms + {per_token * 1e6:.3f} us/token "
                 f"(forward_overhead {lat.eff.forward_overhead * 1e3:g} ms + link latency)")
    elif len({n for n, *_ in analytic_added}) > 1:
        fit = fit_overhead(analytic_added)
        line += (f"; the analytic model ({hardware}), whole forward: {fit.fixed * 1e3:.3f} ms + "
                 f"{fit.per_token * 1e6:.3f} us/token")
    print(line)
    if par.tp > 1:
        fixed, per_token = lat.tp_allreduce(par)
        print(f"  analytic TP all-reduces (2 per layer x {lat.model.num_layers} layers): {fixed * 1e3:.3f} ms + "
              f"{per_token * 1e6:.3f} us/token; compute x {1 + lat.eff.tp_penalty * (1 - 1 / par.tp):.2f} / {par.tp} "
              f"(tp_penalty {lat.eff.tp_penalty:g}), which needs a device per rank")
    if par.sp > 1:
        fixed, per_token = lat.sp_ring(par)
        print(f"  analytic SP ring ({par.sp_algorithm}, {par.sp - 1} steps x {lat.model.num_layers} layers): "
              f"{fixed * 1e3:.3f} ms + {per_token * 1e6:.3f} us/token before overlap; exposed beyond attention "
              "in the comm column")


def _layouts(args, model_config, spec) -> list[Parallel]:
    """The layouts to time through ranks (1x1x1 apart), validated as the launcher validates an instance."""
    from splitserve.cluster.auto_placement import launch_problem
    from splitserve.placement.latency import cheaper_sp_algorithm
    from splitserve.workers.hf_config import resolve_backend

    if args.layouts is not None and args.pp is not None:
        raise ValueError("--pp: short for --layouts 1x1xP; give one of them")
    flag = "--pp" if args.pp is not None else "--layouts"
    triples = [(1, 1, pp) for pp in args.pp] if args.pp is not None else list(args.layouts or [(1, 1, 1)])
    backend = resolve_backend("auto", model_config)
    out = []
    for tp, sp, pp in triples:
        if (tp, sp, pp) == (1, 1, 1):
            continue
        algorithm = "none" if sp == 1 else (cheaper_sp_algorithm(spec, tp) if args.sp_algorithm == "auto"
                                            else args.sp_algorithm)
        par = Parallel(tp=tp, pp=pp, sp=sp, sp_algorithm=algorithm)
        problem = launch_problem(spec, model_config, backend, par)
        if problem:
            raise ValueError(f"{flag}: {tp}x{sp}x{pp} cannot run {args.model}: {problem}")
        out.append(par)
    if out and args.server:
        raise ValueError(f"{flag}: layouts beyond 1x1x1 are timed in-process only; with --server only TP 1's decode "
                         "is refitted, so profile them apart")
    return out


def run(args) -> int:
    from splitserve.placement.specs import load_model
    from splitserve.workers.config import load_config
    from splitserve.workers.presets import resolve_model

    model_dir = resolve_model(args.model)
    layouts_to_time = _layouts(args, load_config(model_dir), load_model(str(model_dir), args.dtype))
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
    for par in layouts_to_time:
        timing = profile_layout(args.model, par, args.dtype, args.device, args.repeats)
        _print_layout(timing, args.model, args.dtype, args.device)
        for phase, u in timing.entry.uncertainty.items():
            print(uncertainty_line(f"{_label(par)} {phase}", getattr(timing.entry, phase), u))
        profile = dataclasses.replace(profile, entries=profile.entries + (timing.entry,))
    profile.save(args.output)
    print(f"wrote {args.output}; use it with `splitserve plan --profile {args.output} --model {args.model} ...`")
    return 0
