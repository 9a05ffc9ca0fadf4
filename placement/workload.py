"""Workloads for the simulator: request lengths (synthetic with published dataset means, fixed, or a JSONL trace)
and arrival processes (Poisson, gamma), deterministic under a seed."""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass

# Published means (prompt, output) as reported by DistServe for its datasets. The spreads (lognormal sigma)
# are our choice: the papers give means, not distributions.
DATASETS = {
    "sharegpt": (755.0, 200.0, 1.0, 1.0),
    "humaneval": (171.0, 98.0, 0.4, 0.5),
    "longbench": (1738.0, 91.0, 0.5, 0.6),
}
ARRIVAL_PROCESSES = ("poisson", "gamma")


@dataclass(frozen=True)
class Workload:
    """Where request lengths come from: a named dataset, fixed lengths, or (prompt, output) pairs of a trace."""

    name: str
    mean_prompt: float
    mean_output: float
    prompt_sigma: float = 0.0  # 0 = every request has exactly the mean
    output_sigma: float = 0.0
    pairs: tuple[tuple[int, int], ...] = ()

    def sample(self, rng: random.Random, max_tokens: int) -> tuple[int, int]:
        if self.pairs:
            prompt, output = self.pairs[rng.randrange(len(self.pairs))]
        else:
            prompt = _lognormal(rng, self.mean_prompt, self.prompt_sigma)
            output = _lognormal(rng, self.mean_output, self.output_sigma)
        # Keep each request inside the model's context window; clipping the prompt first keeps outputs intact.
        output = min(output, max_tokens // 2)
        return max(1, min(prompt, max_tokens - output)), max(1, output)


def _lognormal(rng: random.Random, mean: float, sigma: float) -> int:
    if sigma == 0:
        return int(round(mean))
    mu = math.log(mean) - sigma * sigma / 2  # so that E[X] = mean
    return max(1, int(round(rng.lognormvariate(mu, sigma))))


def load_workload(spec: str) -> Workload:
    """`sharegpt`, `humaneval`, `longbench`, `fixed:PROMPT:OUTPUT`, or a JSONL trace path."""
    if spec in DATASETS:
        p, o, sp, so = DATASETS[spec]
        return Workload(spec, p, o, sp, so)
    if spec.startswith("fixed:"):
        parts = spec.split(":")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            raise ValueError(f"workload: {spec!r} is not fixed:PROMPT:OUTPUT (e.g. fixed:512:64)")
        prompt, output = int(parts[1]), int(parts[2])
        if prompt <= 0 or output <= 0:
            raise ValueError(f"workload: fixed lengths must be positive, got {spec!r}")
        return Workload(spec, prompt, output)
    if os.path.isfile(spec):
        return _load_trace(spec)
    raise ValueError(f"workload: {spec!r} is not one of {sorted(DATASETS)}, fixed:P:O, or a JSONL trace file")


_PROMPT_KEYS = ("prompt_len", "input_len", "prompt_tokens", "input_length")
_OUTPUT_KEYS = ("output_len", "output_tokens", "output_length")


def _load_trace(path: str) -> Workload:
    pairs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt = next(int(row[k]) for k in _PROMPT_KEYS if k in row)
                output = next(int(row[k]) for k in _OUTPUT_KEYS if k in row)
            except (json.JSONDecodeError, StopIteration, TypeError, ValueError):
                raise ValueError(f"workload: {path}:{number} needs a JSON object with one of {_PROMPT_KEYS} "
                                 f"and one of {_OUTPUT_KEYS}") from None
            if prompt <= 0 or output <= 0:
                raise ValueError(f"workload: {path}:{number} lengths must be positive")
            pairs.append((prompt, output))
    if not pairs:
        raise ValueError(f"workload: trace {path} has no requests")
    mean_p = sum(p for p, _ in pairs) / len(pairs)
    mean_o = sum(o for _, o in pairs) / len(pairs)
    return Workload(os.path.basename(path), mean_p, mean_o, pairs=tuple(pairs))


@dataclass(frozen=True)
class Trace:
    """A request stream with arrivals at rate 1; `at_rate` rescales time, so every rate sees the same requests
    in the same order (common random numbers: attainment then changes with the rate alone)."""

    unit_arrivals: tuple[float, ...]
    prompts: tuple[int, ...]
    outputs: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompts)

    def at_rate(self, rate: float) -> list[float]:
        if not rate > 0:
            raise ValueError(f"rate: must be positive, got {rate!r}")
        return [t / rate for t in self.unit_arrivals]


def make_trace(workload: Workload, num_requests: int, seed: int = 0, process: str = "poisson", cv: float = 1.0,
               max_tokens: int = 1 << 30) -> Trace:
    """Draw `num_requests` requests; gamma arrivals with coefficient of variation `cv` (cv=1 is Poisson)."""
    if num_requests <= 0:
        raise ValueError(f"num_requests: must be positive, got {num_requests!r}")
    if process not in ARRIVAL_PROCESSES:
        raise ValueError(f"arrival process: {process!r} is not one of {ARRIVAL_PROCESSES}")
    if not cv > 0:
        raise ValueError(f"cv: must be positive, got {cv!r}")
    rng = random.Random(seed)
    arrivals, prompts, outputs = [], [], []
    now = 0.0
    shape = 1.0 / (cv * cv)
    for _ in range(num_requests):
        now += rng.expovariate(1.0) if process == "poisson" else rng.gammavariate(shape, 1.0 / shape)
        prompt, output = workload.sample(rng, max_tokens)
        arrivals.append(now)
        prompts.append(prompt)
        outputs.append(output)
    return Trace(tuple(arrivals), tuple(prompts), tuple(outputs))


def extend_trace(trace: Trace, num_requests: int, seed: int = 0) -> Trace:
    """A longer stream at rate 1 whose lengths are resampled from `trace` (for simulating many instances)."""
    rng = random.Random(seed + 1)
    arrivals, now = [], 0.0
    for _ in range(num_requests):
        now += rng.expovariate(1.0)
        arrivals.append(now)
    picks = [rng.randrange(len(trace)) for _ in range(num_requests)]
    return Trace(tuple(arrivals), tuple(trace.prompts[i] for i in picks), tuple(trace.outputs[i] for i in picks))
