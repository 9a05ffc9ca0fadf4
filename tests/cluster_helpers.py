"""Shared pieces of the cluster tests: configs, workloads, references from transformers, waiting for idle KV."""
from __future__ import annotations

import random
import time

from hf_checkpoints import hf_greedy, hf_model, write_checkpoint
from splitserve.workers.sampling_params import SamplingParams


def config(model_dir, **sections) -> dict:
    base = {"model": str(model_dir), "device": "cpu", "engine": {"block_size": 8, "kv_cache_bytes": 4 << 20},
            "prefill": {"instances": 1, "tp": 1}, "decode": {"instances": 1, "tp": 1}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return base


def workload(n: int, seed: int = 0, vocab: int = 512):
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, vocab) for _ in range(rng.randint(3, 60))] for _ in range(n)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(4, 12), ignore_eos=True) for _ in range(n)]
    return prompts, params


def streaming_load(model_dir, n: int = 20, seed: int = 5, prompt_step: int = 7, output_step: int = 3):
    """n greedy requests with long outputs (so an event during the load lands mid-decode) and their transformers
    references; min_tokens = max_tokens masks eos as transformers' reference (min_new_tokens) does."""
    from hf_checkpoints import random_prompts

    prompts = random_prompts([5 + prompt_step * i for i in range(n)], seed=seed)
    params = [SamplingParams(temperature=0.0, max_tokens=120 + output_step * i, min_tokens=120 + output_step * i)
              for i in range(n)]
    return prompts, params, references(model_dir, prompts, params)


def references(model_dir, prompts, params) -> list[list[int]]:
    hf = hf_model(model_dir)
    return [hf_greedy(hf, p, sp.max_tokens) for p, sp in zip(prompts, params)]


def wait_for_idle(cluster, timeout: float = 20.0) -> dict:
    """Until every instance reports all blocks free and no transfer pending; fails with the stats on timeout.
    Blocks kept in the prefix cache count as free: idle means no request references a block."""
    deadline = time.monotonic() + timeout
    while True:
        stats = cluster.stats()["instances"]
        idle = all("num_blocks" in s and s["free_blocks"] == s["num_blocks"] and not s["pending_transfers"]
                   for s in stats.values())
        if idle:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"instances not idle after {timeout} s: {stats}")
        time.sleep(0.1)


__all__ = ["config", "references", "streaming_load", "wait_for_idle", "workload", "write_checkpoint"]
