"""Output tokens/s of our engine (continuous batching, paged KV) against two transformers baselines on the same
requests, in one run: transformers' own continuous batching (`generate_batch`, paged cache) and `generate` in static
batches; plus batch 1 against plain `generate`. Our engine also runs on the transformers backend (`ours_transformers`:
the checkpoint's own modeling code on our paged cache), which shows what the native model buys. Greedy, every request
runs to max tokens (eos does not stop it) on every side, and the tokens are checked to be identical. Prefix caching is off: repeats resend the same prompts, and a cache hit would
measure the cache, not the engine. Prints a table and saves JSON.

    python benchmarks/engine_throughput.py [--model smollm2-135m] [--requests 32] [--batch1-requests 4]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import time
from pathlib import Path

import torch

from splitserve.workers.llm import LLM
from splitserve.workers.sampling_params import SamplingParams

WORDS = ("the cache moves from prefill to decode while tokens stream back and every request waits for its turn on "
         "a device that holds the weights of a small model trained to answer questions about cities rivers music "
         "history science and the weather of places people visit in summer or winter").split()


def make_prompts(llm: LLM, n: int, seed: int, words: tuple[int, int]) -> list[list[int]]:
    """n English-like prompts of `words` words (uniform), tokenised by the model's tokenizer."""
    rng = random.Random(seed)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(*words))).capitalize() + "." for _ in range(n)]
    return [llm.encode(t) for t in texts]


def run_ours(llm: LLM, prompts, max_tokens: int, batch: int) -> tuple[float, list[list[int]]]:
    start, tokens = time.perf_counter(), []
    for i in range(0, len(prompts), batch):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        tokens += [o.token_ids for o in llm.generate(prompts[i : i + batch], params)]
    return time.perf_counter() - start, tokens


def _config(max_tokens: int, pad: int):
    """Greedy, no stop at eos (what `ignore_eos` does on our side)."""
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=pad)


def run_hf_static(model, prompts, max_tokens: int, batch: int, pad: int) -> tuple[float, list[list[int]]]:
    """Static batches: left-padded prompts; each batch runs until all its requests are done."""
    config = _config(max_tokens, pad)
    start, tokens = time.perf_counter(), []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, generation_config=config)
        tokens += out[:, width:].tolist()
    return time.perf_counter() - start, tokens


def run_hf_continuous(model, prompts, max_tokens: int, pad: int) -> tuple[float, list[list[int]]]:
    """transformers' continuous batching with its paged cache (`generate_batch`)."""
    config = _config(max_tokens, pad)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate_batch(prompts, generation_config=config, progress_bar=False, warmup=False)
    elapsed = time.perf_counter() - start
    by_index = sorted(out.items(), key=lambda kv: int(kv[0].rsplit("_", 1)[1]))
    return elapsed, [list(v.generated_tokens) for _, v in by_index]


def _best(runs: dict[str, callable], repeats: int) -> dict[str, tuple[float, list]]:
    """The fastest of `repeats` runs per side, alternating sides so that machine noise hits them alike."""
    best: dict[str, tuple[float, list]] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            elapsed, tokens = run()
            if name not in best or elapsed < best[name][0]:
                best[name] = (elapsed, tokens)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--batch1-requests", type=int, default=4)
    ap.add_argument("--words", type=int, nargs=2, default=(24, 400), help="prompt length range in words")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--static-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the fastest counts")
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "engine_throughput.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)

    from transformers import AutoModelForCausalLM

    llm = LLM(args.model, device="cpu", kv_cache_bytes=2 << 30, max_num_seqs=args.requests, prefix_caching=False)
    # The same engine on the transformers backend (the checkpoint's own modeling code on our paged cache): what the
    # hand-written native model buys.
    llm_tf = LLM(args.model, device="cpu", kv_cache_bytes=2 << 30, max_num_seqs=args.requests, prefix_caching=False,
                 backend="transformers")
    hf = AutoModelForCausalLM.from_pretrained(llm.model_dir, dtype=torch.float32).eval()
    pad = llm.eos_token_ids[0] if llm.eos_token_ids else 0
    prompts = make_prompts(llm, args.requests, args.seed, tuple(args.words))
    warm = make_prompts(llm, 2, args.seed + 1, (8, 16))
    run_ours(llm, warm, 4, 2), run_hf_static(hf, warm, 4, 2, pad), run_hf_continuous(hf, warm, 4, pad)
    run_ours(llm_tf, warm, 4, 2)
    load_start = os.getloadavg()

    n, m = len(prompts), args.max_tokens
    b1 = prompts[: args.batch1_requests]
    concurrent = _best({"ours": lambda: run_ours(llm, prompts, m, n),
                        "ours_transformers": lambda: run_ours(llm_tf, prompts, m, n),
                        "hf_generate_batch": lambda: run_hf_continuous(hf, prompts, m, pad),
                        "hf_static": lambda: run_hf_static(hf, prompts, m, args.static_batch, pad)}, args.repeats)
    batch1 = _best({"ours": lambda: run_ours(llm, b1, m, 1),
                    "ours_transformers": lambda: run_ours(llm_tf, b1, m, 1),
                    "hf_generate": lambda: run_hf_static(hf, b1, m, 1, pad)}, args.repeats)
    rows = []
    for setting, results, reqs in (("concurrent", concurrent, prompts), ("batch 1", batch1, b1)):
        ours_s, ours_tokens = results["ours"]
        for name, (elapsed, tokens) in results.items():
            rows.append(dict(setting=setting, side=name, requests=len(reqs), output_tokens=len(reqs) * m,
                             prompt_tokens=sum(len(p) for p in reqs), seconds=elapsed,
                             tok_s=len(reqs) * m / elapsed, ours_speedup=elapsed / ours_s,
                             tokens_equal_ours=tokens == ours_tokens))
    print(f"{'setting':<12}{'side':<19}{'requests':>9}{'out tokens':>11}{'tok/s':>9}{'ours x':>8}{'same tokens':>13}")
    for r in rows:
        print(f"{r['setting']:<12}{r['side']:<19}{r['requests']:>9}{r['output_tokens']:>11}{r['tok_s']:>9.1f}"
              f"{r['ours_speedup']:>8.2f}{str(r['tokens_equal_ours']):>13}")
    result = dict(model=args.model, repeats=args.repeats, threads=torch.get_num_threads(), torch=torch.__version__,
                  machine=platform.processor() or platform.machine(), words=args.words, max_tokens=m,
                  static_batch=args.static_batch, loadavg_start=load_start, loadavg_end=os.getloadavg(), rows=rows)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
