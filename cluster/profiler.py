"""`splitserve profile`: measures this machine's prefill and decode step times for a model (TP 1, in-process, one
thread like every rank actor), fits DistServe's forms and writes a profile the planner loads (`--profile`)."""
from __future__ import annotations

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
    runner = llm.prefill.runner
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


def add_arguments(p) -> None:
    p.add_argument("--model", default="small", help="preset or local HF checkpoint directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", default="profile.json")


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
    coeffs = {k: v.to_ms() for k, v in (("prefill", entry.prefill), ("decode", entry.decode))}
    print(f"fitted (ms): {coeffs}")
    profile.save(args.output)
    print(f"wrote {args.output}; use it with `splitserve plan --profile {args.output} --model {args.model} ...`")
    return 0
