"""One GPU check, in a few minutes on one H100/H200 (torch >= 2.11, triton >= 3.6, no Ray):

1. correctness of every kernel in kernels/ (fused add + RMSNorm, AllReduce + add + RMSNorm in one-shot and
   reduce-scatter forms over simulated peers, paged attention for decode and cached-prefix prefill) against
   its torch twin on CUDA;
2. bandwidth of the fused add + RMSNorm and of paged-attention decode as a fraction of a measured
   device-to-device copy, and the kernels against the torch reference paths;
3. engine decode tokens/s on the `small` preset and on a bf16 Llama-3-8B-shaped model (random weights) at
   batch 1/16/64, with the Triton and the torch attention backends, against the memory-bandwidth roofline;
4. greedy tokens equal to transformers on CUDA (float32) with the Triton attention backend and chunked prefill.

Writes benchmarks/results/gpu_check.json and prints a short table. Exit status: 0 all correct, 1 a check
failed, 2 no CUDA device (nothing measured, nothing written).

    bash benchmarks/gpu_check.sh [--out PATH] [--skip-8b]
    python benchmarks/gpu_check.py --cpu-dry-run   # no GPU: every section on tiny shapes under Triton's
                                                   # interpreter; the numbers mean nothing
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

if "--cpu-dry-run" in sys.argv:  # must precede the first import of triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
MIN_VERSIONS = {"torch": (2, 11), "triton": (3, 6)}
EPS = 1e-5
# Against the float32 twin (as in tests/test_paged_attention_kernel.py): rtol, atol
ATTENTION_TOLERANCE = {torch.float32: (1e-5, 2e-6), torch.float16: (4e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2)}
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "hidden_act": "silu"}
LLAMA_MINI = {**LLAMA_8B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2}


@dataclass(frozen=True)
class Sizes:
    """What each section runs: full sizes on a GPU, tiny ones for the CPU dry run."""

    copy_bytes: int
    norm_shape: tuple
    attn_heads: tuple  # (heads, kv_heads, head_dim) of the bandwidth runs
    decode_contexts: dict  # name -> contexts of one decode batch
    prefill: tuple  # (sequences, new tokens, context)
    models: tuple  # (name, config dict or preset, dtype)
    batches: tuple
    prompt_len: int
    decode_steps: int
    parity_variants: tuple
    parity_tokens: int


GPU = Sizes(1 << 30, (8192, 8192), (32, 8, 128),
            {"B=1 ctx=32768": [32768], "B=16 ctx=4096": [4096] * 16, "B=64 ctx=512..4096": None},
            (4, 512, 4096), (("small", "small", "bfloat16"), ("llama-8b-shape", LLAMA_8B, "bfloat16")),
            (1, 16, 64), 512, 64, ("tiny", "llama", "llama3", "mistral", "llama_mqa"), 24)
DRY = Sizes(1 << 20, (64, 256), (4, 2, 16), {"B=1 ctx=300": [300], "B=3 ragged": [40, 7, 90]},
            (2, 9, 40), (("tiny", "tiny", "float32"), ("llama-mini-shape", LLAMA_MINI, "bfloat16")),
            (1, 2), 8, 3, ("tiny", "mistral"), 6)


def version_tuple(v: str) -> tuple:
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in v.split("+")[0].split(".")[:2])


def environment(device) -> dict:
    import triton

    versions = {"torch": torch.__version__, "triton": triton.__version__}
    old = [f"{k} {v} < {'.'.join(map(str, MIN_VERSIONS[k]))}" for k, v in versions.items()
           if version_tuple(v) < MIN_VERSIONS[k]]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter: timings meaningless)"
    return {"device": name, **versions, "python": sys.version.split()[0], "below_minimum": old}


# --- 1. correctness ----------------------------------------------------------------------------------------

def rand(shape, dtype, device, gen):
    """Never zero: magnitudes in [0.1, 1.1) with random signs (drawn on the CPU: the same inputs anywhere)."""
    mag = torch.rand(shape, generator=gen) + 0.1
    return (mag * (torch.randint(0, 2, shape, generator=gen) * 2 - 1)).to(dtype).to(device)


def paged_inputs(gen, dtype, device, heads, kv_heads, dim, block_size, contexts, query_lens=None):
    """Caches with unordered, non-adjacent blocks; table padding points at live blocks."""
    needed = [-(-c // block_size) for c in contexts]
    num_blocks = 2 * sum(needed) + 3
    k_cache = rand((num_blocks, block_size, kv_heads, dim), dtype, device, gen)
    v_cache = rand((num_blocks, block_size, kv_heads, dim), dtype, device, gen)
    order = torch.randperm(num_blocks, generator=gen)[::2].tolist()
    width, tables, used = max(needed) + 2, [], 0
    for n in needed:
        tables.append(order[used:used + n] + [order[(used + n + j) % len(order)] for j in range(width - n)])
        used += n
    tables = torch.tensor(tables, device=device)
    lens = torch.tensor(contexts, device=device)
    if query_lens is None:
        return rand((len(contexts), heads, dim), dtype, device, gen), k_cache, v_cache, tables, lens, None, 1
    starts = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), device=device)
    q = rand((sum(query_lens), heads, dim), dtype, device, gen)
    return q, k_cache, v_cache, tables, lens, starts, max(query_lens)


ATTENTION_CASES = [  # dtype, heads, kv_heads, dim, block_size, contexts, query_lens, window, splits
    (torch.float32, 4, 2, 16, 8, [1, 37, 5, 100, 16], None, None, None),
    (torch.float32, 4, 1, 24, 5, [3, 61, 12], None, None, None),
    (torch.float32, 8, 2, 16, 16, [300, 7, 129, 256], None, None, 4),
    (torch.float32, 4, 2, 16, 8, [12, 13, 11, 40, 1], None, 12, None),
    (torch.float32, 6, 2, 24, 8, [37, 5, 100, 20], [4, 5, 30, 1], None, None),
    (torch.float32, 6, 2, 24, 8, [37, 9, 100], [4, 9, 30], 7, 2),
    (torch.bfloat16, 32, 8, 128, 16, [4096, 17, 1000, 2049], None, None, None),
    (torch.bfloat16, 32, 8, 128, 16, [8000], None, 4096, None),
    (torch.float16, 28, 4, 128, 16, [700, 33], [300, 33], None, None),
    (torch.bfloat16, 32, 32, 64, 16, [513, 90], [200, 1], 256, 2),
    (torch.bfloat16, 16, 2, 256, 16, [300, 64], None, None, None),
    (torch.bfloat16, 12, 4, 80, 32, [257, 100], [57, 100], None, None),
]


def check_paged_attention(device, dry: bool) -> list[str]:
    from splitserve.kernels.paged_attention import paged_attention, paged_attention_torch

    failures = []
    gen = torch.Generator().manual_seed(0)
    cases = ATTENTION_CASES[:6] if dry else ATTENTION_CASES
    for dtype, heads, kv_heads, dim, bs, contexts, qlens, window, splits in cases:
        inputs = paged_inputs(gen, dtype, device, heads, kv_heads, dim, bs, contexts, qlens)
        got = paged_attention(*inputs, dim**-0.5, window, splits)
        want = paged_attention_torch(*inputs, dim**-0.5, window, splits)
        rtol, atol = ATTENTION_TOLERANCE[dtype]
        if not torch.allclose(got.float(), want.float(), rtol=rtol, atol=atol):
            err = (got.float() - want.float()).abs().max().item()
            failures.append(f"paged_attention {dtype} H{heads}/{kv_heads} d{dim} ctx {contexts} q {qlens} "
                            f"window {window} splits {splits}: max error {err:.2e}")
    return failures


def check_reduce_scatter(device) -> list[str]:
    import kernels_gpu  # beside this script: its comparison rule
    from splitserve.kernels.allreduce_rmsnorm import (MAX_PROGRAMS, SymmetricTensors,
                                                      reduce_scatter_allreduce_add_rmsnorm, reduce_scatter_torch)

    failures = []
    for dtype in (torch.float32, torch.bfloat16):
        for world, rows, hidden in ((2, 9, 40), (4, 10, 33), (8, 64, 4096)):
            gen = torch.Generator().manual_seed(world * 100 + rows)
            partial = [rand((rows, hidden), dtype, device, gen) for _ in range(world)]
            residual, weight = rand((rows, hidden), dtype, device, gen), rand((hidden,), dtype, device, gen)
            results = []
            for fn in (reduce_scatter_allreduce_add_rmsnorm, reduce_scatter_torch):
                peers = SymmetricTensors(0, [p.clone() for p in partial],
                                         [torch.zeros_like(partial[0]) for _ in range(world)],
                                         [torch.zeros_like(partial[0]) for _ in range(world)],
                                         [torch.zeros(MAX_PROGRAMS * world, dtype=torch.int32, device=device)
                                          for _ in range(world)])
                for rank in range(world):  # each simulated rank stores its rows into every peer
                    peers.rank = rank
                    fn(peers, rows, residual, weight, EPS, max_programs=2, sync=False)
                results.append((peers.normed, peers.summed))
            (normed, summed), (want_n, want_s) = results
            if not all(kernels_gpu.matches(got, want) for got, want in zip(zip(normed, summed), zip(want_n, want_s))):
                failures.append(f"reduce_scatter W={world} {dtype} {rows}x{hidden}")
    return failures


def correctness(device, dry: bool) -> list[str]:
    import kernels_gpu

    return kernels_gpu.correctness(device) + check_reduce_scatter(device) + check_paged_attention(device, dry)


# --- 2. bandwidth -------------------------------------------------------------------------------------------

def decode_contexts(contexts, gen) -> list[int]:
    """None: a ragged batch of 64 contexts between 512 and 4096."""
    if contexts is not None:
        return contexts
    return torch.randint(512, 4097, (64,), generator=gen).tolist()


def bench_paged_decode(bench, sizes: Sizes, device, copy_bw) -> list[dict]:
    from splitserve.kernels.paged_attention import paged_attention
    from splitserve.workers.layers.attention import AttentionMetadata, PagedAttention

    heads, kv_heads, dim = sizes.attn_heads
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    rows = []
    for name, contexts in sizes.decode_contexts.items():
        contexts = decode_contexts(contexts, gen)
        q, k_cache, v_cache, tables, lens, _, _ = paged_inputs(gen, dtype, device, heads, kv_heads, dim, 16, contexts)
        scale = dim**-0.5
        t_kernel = bench(lambda: paged_attention(q, k_cache, v_cache, tables, lens, None, 1, scale))
        reference = PagedAttention(heads, kv_heads, dim)
        cache = torch.stack([k_cache, v_cache])
        meta = AttentionMetadata(torch.empty(0, dtype=torch.long, device=device), [1] * len(contexts), contexts,
                                 tables, lens)
        t_torch = bench(lambda: reference._decode_batch(q, cache, meta))
        moved = 2 * sum(contexts) * kv_heads * dim * q.element_size() + 2 * q.numel() * q.element_size()
        rows.append({"kernel": f"paged decode {name}", "heads": list(sizes.attn_heads), "t_kernel_us": t_kernel * 1e6,
                     "t_torch_us": t_torch * 1e6, "speedup": t_torch / t_kernel, "GBps": moved / t_kernel / 1e9,
                     "fraction_of_copy_bw": moved / t_kernel / copy_bw})
    return rows


def bench_paged_prefill(bench, sizes: Sizes, device) -> dict:
    from splitserve.kernels.paged_attention import paged_attention
    from splitserve.workers.layers.attention import AttentionMetadata, PagedAttention

    heads, kv_heads, dim = sizes.attn_heads
    seqs, new, ctx = sizes.prefill
    gen = torch.Generator().manual_seed(2)
    q, k_cache, v_cache, tables, lens, starts, longest = paged_inputs(
        gen, torch.bfloat16, device, heads, kv_heads, dim, 16, [ctx] * seqs, [new] * seqs)
    scale = dim**-0.5
    t_kernel = bench(lambda: paged_attention(q, k_cache, v_cache, tables, lens, starts, longest, scale))
    reference = PagedAttention(heads, kv_heads, dim)
    cache = torch.stack([k_cache, v_cache])
    meta = AttentionMetadata(torch.empty(0, dtype=torch.long, device=device), [new] * seqs, [ctx] * seqs, tables, lens)
    t_torch = bench(lambda: reference._mixed(q, None, None, cache, meta))
    flops = 4 * seqs * new * (ctx - new / 2) * heads * dim  # QK^T and PV over the causal-visible keys
    return {"kernel": f"paged prefill {seqs}x{new} new over ctx {ctx}", "heads": list(sizes.attn_heads),
            "t_kernel_us": t_kernel * 1e6, "t_torch_us": t_torch * 1e6, "speedup": t_torch / t_kernel,
            "TFLOPs": flops / t_kernel / 1e12}


def bandwidth(bench, sizes: Sizes, device) -> tuple[float, list[dict]]:
    import kernels_gpu

    copy_bw = kernels_gpu.copy_bandwidth(bench, sizes.copy_bytes, device)
    norm = kernels_gpu.bench_add_rmsnorm(bench, *sizes.norm_shape, torch.bfloat16, device, copy_bw)
    norm["kernel"] = f"add_rmsnorm {'x'.join(map(str, sizes.norm_shape))}"
    norm["t_kernel_us"] = norm.pop("t_fused_us")
    rows = [norm]
    rows += bench_paged_decode(bench, sizes, device, copy_bw)
    rows.append(bench_paged_prefill(bench, sizes, device))
    return copy_bw, rows


# --- 3. engine decode ---------------------------------------------------------------------------------------

@contextmanager
def random_weights(directory: Path):
    """LLM loads `directory` (a config.json only) with random weights: no multi-GB checkpoint to write."""
    from splitserve.workers import llm as llm_module
    from splitserve.workers.loader import load_config, resolve_dtype
    from splitserve.workers.model import CausalLM

    def load_random(model_dir, dtype="float32", device="cpu", *_, **__):  # the native model: no tp, no backend
        cfg = load_config(model_dir)
        with torch.device(device):
            model = CausalLM(cfg, dtype=resolve_dtype(dtype), device=device)
        gen = torch.Generator(device=device).manual_seed(0)
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # norm weights
            else:
                p.normal_(0.0, 0.02, generator=gen)
        return model.eval()

    original = llm_module.load_model
    llm_module.load_model = load_random
    try:
        yield
    finally:
        llm_module.load_model = original


def make_llm(name, model, dtype, device, max_seqs):
    from splitserve.workers.llm import LLM

    kwargs = dict(dtype=dtype, device=str(device), block_size=16, max_num_seqs=max_seqs,
                  max_num_batched_tokens=8192, gpu_memory_fraction=0.6, kv_cache_bytes=256 << 20)
    if isinstance(model, str):
        return LLM(model, **kwargs)
    directory = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    (directory / "config.json").write_text(json.dumps(model))
    with random_weights(directory):
        return LLM(str(directory), **kwargs)


def roofline_step_bytes(llm, batch, context) -> int:
    """Bytes one decode step must move at least: every weight once (the embedding only its rows), the batch's
    K/V read once and the new token's written."""
    weights = sum(p.numel() * p.element_size() for n, p in llm.model.named_parameters() if "embed_tokens" not in n)
    cfg, elem = llm.model.cfg, next(llm.model.parameters()).element_size()
    kv_per_token = 2 * cfg.num_layers * llm.model.num_kv_heads * cfg.head_dim * elem
    return weights + batch * (context + 1) * kv_per_token


def decode_rate(llm, batch, prompt_len, steps, device) -> float:
    """Decode tokens/s of `batch` sequences once every one has its first token (no prefill inside the timing)."""
    from splitserve.workers.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(batch)
    vocab = llm.model.cfg.vocab_size
    warm = 2
    seqs = []
    for _ in range(batch):
        prompt = torch.randint(2, vocab, (prompt_len,), generator=gen).tolist()
        seq = llm.make_sequence(prompt, SamplingParams(temperature=0.0, max_tokens=warm + steps + 1, ignore_eos=True))
        llm.core.check_fits(seq)
        llm.core.add(seq)
        seqs.append(seq)
    while any(len(s.output_token_ids) < warm for s in seqs):
        llm.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        llm.step()
    elapsed = time.perf_counter() - start
    llm.run_until_done()
    return batch * steps / elapsed


def engine(sizes: Sizes, device, copy_bw, skip_8b: bool) -> list[dict]:
    from splitserve.workers.layers.attention_backend import configure_attention

    rows = []
    for name, model, dtype in sizes.models:
        if skip_8b and model is LLAMA_8B:
            continue
        llm = make_llm(name, model, dtype, device, max(sizes.batches))
        for backend in ("triton", "torch"):
            configure_attention(llm.model, backend, device)
            for batch in sizes.batches:
                rate = decode_rate(llm, batch, sizes.prompt_len, sizes.decode_steps, device)
                context = sizes.prompt_len + 2 + sizes.decode_steps // 2
                roofline = batch * copy_bw / roofline_step_bytes(llm, batch, context)
                rows.append({"model": name, "dtype": dtype, "attention": backend, "batch": batch,
                             "prompt_len": sizes.prompt_len, "decode_tokens_per_s": rate,
                             "roofline_tokens_per_s": roofline, "fraction_of_roofline": rate / roofline})
        del llm
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# --- 4. transformers parity ---------------------------------------------------------------------------------

def hf_greedy(model, prompt, n, device) -> list[int]:
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=1)
    return out[0, len(prompt):].tolist()


def parity(sizes: Sizes, device) -> list[dict]:
    """Our engine (Triton attention, chunked prefill so prompt chunks read a cached prefix) against transformers
    `generate`, float32, one prompt at a time on the HF side."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from hf_checkpoints import random_prompts, write_checkpoint
    from transformers import AutoModelForCausalLM

    from splitserve.workers.llm import LLM
    from splitserve.workers.presets import resolve_model
    from splitserve.workers.sampling_params import SamplingParams

    rows = []
    prompts = random_prompts([5, 17, 40, 3, 29], seed=3)
    for i, variant in enumerate(sizes.parity_variants):
        directory = (resolve_model("tiny") if variant == "tiny"
                     else write_checkpoint(variant, Path(tempfile.mkdtemp(prefix=f"{variant}-")), seed=i))
        llm = LLM(str(directory), device=str(device), block_size=8, chunked_prefill=True, max_num_batched_tokens=24,
                  attention_backend="triton")
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=sizes.parity_tokens, ignore_eos=True))
        hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device).eval()
        same = sum(o.token_ids == hf_greedy(hf, p, sizes.parity_tokens, device) for p, o in zip(prompts, outs))
        rows.append({"model": variant, "prompts": len(prompts), "identical": same})
        del llm, hf
    return rows


# --- the run ------------------------------------------------------------------------------------------------

def section(results: dict, name: str, fn):
    start = time.perf_counter()
    try:
        value = fn()
    except Exception as e:  # one broken section must not hide the others' results
        results["errors"].append(f"{name}: {type(e).__name__}: {e}")
        traceback.print_exc()
        value = None
    results["seconds"][name] = round(time.perf_counter() - start, 1)
    print(f"[{name}: {results['seconds'][name]} s]", flush=True)
    return value


def print_table(results: dict) -> None:
    print(f"\n{results['environment']['device']}; torch {results['environment']['torch']}, "
          f"triton {results['environment']['triton']}; copy {results.get('copy_bw_GBps', 0):.0f} GB/s")
    failures = results["correctness_failures"]
    print("kernels vs twins:", "ok" if failures == [] else f"FAILED {failures}")
    for row in results.get("bandwidth") or []:
        extra = (f"{row['fraction_of_copy_bw']:.2f} of copy" if "fraction_of_copy_bw" in row
                 else f"{row['TFLOPs']:.1f} TFLOP/s")
        print(f"  {row['kernel']:<44} {row['t_kernel_us']:9.1f} us  torch {row['t_torch_us']:9.1f} us  "
              f"{row['speedup']:5.2f}x  {extra}")
    for row in results.get("engine") or []:
        print(f"  decode {row['model']:<16} {row['attention']:<6} batch {row['batch']:>3}: "
              f"{row['decode_tokens_per_s']:9.1f} tok/s  roofline {row['roofline_tokens_per_s']:9.1f}  "
              f"({row['fraction_of_roofline']:.2f})")
    for row in results.get("parity") or []:
        print(f"  transformers parity {row['model']:<10} {row['identical']}/{row['prompts']} prompts identical")
    for error in results["errors"]:
        print("ERROR", error)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-dry-run", action="store_true", help="no GPU: tiny shapes under Triton's interpreter")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/gpu_check.json; "
                                                           "a dry run writes only when given)")
    ap.add_argument("--skip-8b", action="store_true", help="no Llama-8B-shaped engine run (16 GB of weights)")
    args = ap.parse_args()
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False), so nothing was measured "
              "and no results were written. Run it on a machine with an NVIDIA GPU, or pass --cpu-dry-run to "
              "exercise the script on CPU.", file=sys.stderr)
        return 2
    try:
        import triton.testing  # noqa: F401
    except ImportError as e:
        print(f"gpu_check: triton cannot be imported ({e}); install triton >= 3.6", file=sys.stderr)
        return 2
    import kernels_gpu

    device = torch.device("cpu") if args.cpu_dry_run else torch.device("cuda")
    sizes, bench = (DRY, kernels_gpu.cpu_bench) if args.cpu_dry_run else (GPU, kernels_gpu.gpu_bench)
    if args.cpu_dry_run:
        torch.set_num_threads(1)
    out = args.out or (None if args.cpu_dry_run else HERE / "results" / "gpu_check.json")
    start = time.perf_counter()
    results = {"environment": environment(device), "errors": [], "seconds": {}, "complete": False}

    def save():  # after every section, so a run cut short still leaves what it measured
        results["seconds"]["total"] = round(time.perf_counter() - start, 1)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n")

    results["correctness_failures"] = section(results, "correctness", lambda: correctness(device, args.cpu_dry_run))
    save()
    measured = section(results, "bandwidth", lambda: bandwidth(bench, sizes, device))
    copy_bw = measured[0] if measured else kernels_gpu.copy_bandwidth(bench, sizes.copy_bytes, device)
    results["copy_bw_GBps"] = copy_bw / 1e9
    results["bandwidth"] = measured[1] if measured else None
    save()
    results["engine"] = section(results, "engine", lambda: engine(sizes, device, copy_bw, args.skip_8b))
    save()
    results["parity"] = section(results, "parity", lambda: parity(sizes, device))
    results["complete"] = True
    save()
    print_table(results)
    if out is not None:
        print(f"saved {out}")
    parity_ok = all(r["identical"] == r["prompts"] for r in results["parity"] or [])
    ok = results["correctness_failures"] == [] and not results["errors"] and parity_ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))  # kernels_gpu: the shared bandwidth helpers
    sys.exit(main())
