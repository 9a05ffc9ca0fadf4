"""Output tokens/s of our engine (continuous batching, paged KV) vs transformers `generate` in static batches,
on the same requests, in one run. Prints a table and saves JSON.

    python benchmarks/engine_throughput.py [--model small] [--requests 32] [--batch1-requests 8] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

from splitserve.workers.llm import LLM
from splitserve.workers.sampling_params import SamplingParams


def make_requests(n: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(2, vocab) for _ in range(rng.randint(32, 512))], rng.randint(16, 256)) for _ in range(n)]


def run_ours(llm: LLM, requests, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(requests), batch):
        chunk = requests[i : i + batch]
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in chunk]
        outs = llm.generate([p for p, _ in chunk], params)
        assert [len(o.token_ids) for o in outs] == [n for _, n in chunk]
    return time.perf_counter() - start


def run_hf(model, requests, batch: int) -> float:
    """Static batches: left-padded prompts; the batch runs until its longest request is done."""
    start = time.perf_counter()
    for i in range(0, len(requests), batch):
        chunk = requests[i : i + batch]
        width = max(len(p) for p, _ in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk])
        longest = max(n for _, n in chunk)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
                                 do_sample=False, pad_token_id=1)
        assert out.shape[1] == width + longest
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--batch1-requests", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the fastest counts")
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "engine_throughput.json"))
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    llm = LLM(args.model, device="cpu", kv_cache_bytes=1 << 30, max_num_seqs=args.requests)
    hf = AutoModelForCausalLM.from_pretrained(llm.model_dir, dtype=torch.float32).eval()
    vocab = llm.model.cfg.vocab_size
    requests = make_requests(args.requests, args.seed, vocab)
    run_ours(llm, make_requests(2, args.seed + 1, vocab), 2)  # warm-up both paths
    run_hf(hf, make_requests(2, args.seed + 1, vocab), 2)

    rows = []
    for label, reqs, batch in [("concurrent", requests, args.requests),
                               ("batch 1", requests[: args.batch1_requests], 1)]:
        tokens = sum(n for _, n in reqs)
        ours, ref = float("inf"), float("inf")
        for _ in range(args.repeats):  # alternate so that machine noise hits both sides alike
            ours = min(ours, run_ours(llm, reqs, batch))
            ref = min(ref, run_hf(hf, reqs, batch))
        rows.append(dict(setting=label, requests=len(reqs), batch=batch, output_tokens=tokens,
                         ours_tok_s=tokens / ours, hf_tok_s=tokens / ref, ratio=ref / ours))
    print(f"{'setting':<12}{'requests':>9}{'out tokens':>11}{'ours tok/s':>12}{'hf tok/s':>10}{'ratio':>7}")
    for r in rows:
        print(f"{r['setting']:<12}{r['requests']:>9}{r['output_tokens']:>11}{r['ours_tok_s']:>12.1f}"
              f"{r['hf_tok_s']:>10.1f}{r['ratio']:>7.2f}")
    result = dict(model=args.model, repeats=args.repeats, threads=torch.get_num_threads(), torch=torch.__version__,
                  machine=platform.processor() or platform.machine(), rows=rows)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
