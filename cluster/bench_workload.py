"""The workload of `splitserve bench`: request rates, seeded arrival times, and prompts with their output lengths.

`sharegpt`, `humaneval`, `longbench` draw prompt and output lengths from lognormals with the published means and the
planner's spreads (`placement/workload.py`), so a bench run and a `splitserve plan` simulation see the same
distributions; `random` draws lengths uniformly around `--input-len` / `--output-len`; `jsonl` replays a file;
`multiturn` is conversations whose every turn resends the whole history (a system prompt shared by all of them,
earlier messages and the server's own answers) plus a new message; `shared-prefix` is K prefixes x suffixes. The
last two are the prefix-reuse workloads.
Synthetic prompts are random token ids sent with `ignore_eos` and `max_tokens` = the sampled output length."""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from typing import Sequence

from splitserve.placement.workload import DATASETS

SYNTHETIC_DATASETS = tuple(DATASETS)
ALL_DATASETS = SYNTHETIC_DATASETS + ("random", "jsonl", "multiturn", "shared-prefix")
CONTEXT_FRACTION = 0.5  # synthetic means are scaled down until prompt + output fits in this share of the context
LOW_TOKEN_ID = 10  # random prompt ids start here: low ids are often control tokens (bos, eos, pad)


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload. `prompt_len` is 0 for text prompts (the server reports the real count)."""

    prompt: str | tuple[int, ...]
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class BenchConversation:
    """A multi-turn conversation: turn t sends system + (message, answer) of every earlier turn + messages[t]; the
    answers are the server's, so the driver sends the turns one after another."""

    system: tuple[int, ...]
    messages: tuple[tuple[int, ...], ...]
    output_len: int

    @property
    def turns(self) -> int:
        return len(self.messages)


# ---------------------------------------------------------------------------------------------------- arrivals

def parse_rates(text: str) -> list[float]:
    """`2`, `0.5,1,2` or `inf` (every request at once) -> rates in requests per second."""
    rates = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            rate = math.inf if part in ("inf", "infinity") else float(part)
        except ValueError:
            raise ValueError(f"rate: {part!r} is not a number or 'inf'") from None
        if not rate > 0:
            raise ValueError(f"rate: must be positive, got {part!r}")
        rates.append(rate)
    if not rates:
        raise ValueError("rate: no rates given")
    return rates


def rate_json(rate: float) -> float | str:
    """A rate as JSON has it: a number, or "inf"."""
    return "inf" if math.isinf(rate) else rate


def rate_label(rate: float | str) -> str:
    return "inf" if rate == "inf" or math.isinf(rate) else f"{rate:g} req/s"


def arrival_times(num: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times (s from the start) of `num` requests: gaps are gamma(shape=burstiness, scale=1/(rate*burstiness)),
    i.e. mean 1/rate and coefficient of variation 1/sqrt(burstiness); burstiness 1 is Poisson. rate=inf: all at 0.
    The same seed gives the same unit-rate stream at every rate (only the time scale changes)."""
    if not burstiness > 0:
        raise ValueError(f"burstiness: must be positive, got {burstiness!r}")
    if not rate > 0:
        raise ValueError(f"rate: must be positive, got {rate!r}")
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(num):
        now += rng.gammavariate(burstiness, 1.0 / burstiness) / rate
        times.append(now)
    return times


# ---------------------------------------------------------------------------------------------------- workloads

def scaled_means(mean_in: float, mean_out: float, max_context: int,
                 fraction: float = CONTEXT_FRACTION) -> tuple[float, float]:
    """Both means shrunk by one factor when their sum exceeds `fraction` of the context; unchanged otherwise."""
    budget = fraction * max_context
    if mean_in + mean_out <= budget:
        return mean_in, mean_out
    factor = budget / (mean_in + mean_out)
    return mean_in * factor, mean_out * factor


def clip_lengths(prompt: int, output: int, max_context: int) -> tuple[int, int]:
    """Lengths (each >= 1) with prompt + output <= max_context. The output keeps what fits beside the whole prompt,
    and is never cut below half the context; the prompt gets the rest."""
    if max_context < 2:
        raise ValueError(f"max_context: must be at least 2, got {max_context}")
    prompt, output = max(1, prompt), max(1, output)
    if prompt + output <= max_context:
        return prompt, output
    output = max(min(output, max_context - prompt), min(output, max_context // 2))
    return min(prompt, max_context - output), output


def _lognormal(rng: random.Random, mean: float, sigma: float) -> int:
    mu = math.log(mean) - sigma * sigma / 2  # so that E[X] = mean
    return max(1, round(rng.lognormvariate(mu, sigma)))


def synthetic_lengths(dataset: str, num: int, max_context: int, seed: int = 0,
                      fraction: float = CONTEXT_FRACTION) -> list[tuple[int, int]]:
    """(prompt, output) pairs from the dataset's lognormals, means scaled to the context, each clipped to it."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset: {dataset!r} is not one of {list(SYNTHETIC_DATASETS)}")
    mean_in, mean_out, sigma_in, sigma_out = DATASETS[dataset]
    mean_in, mean_out = scaled_means(mean_in, mean_out, max_context, fraction)
    rng = random.Random(seed)
    return [clip_lengths(_lognormal(rng, mean_in, sigma_in), _lognormal(rng, mean_out, sigma_out), max_context)
            for _ in range(num)]


def random_lengths(num: int, input_len: int, output_len: int, range_ratio: float, max_context: int,
                   seed: int = 0) -> list[tuple[int, int]]:
    """Lengths uniform in [L*(1-r), L*(1+r)] around the given ones, clipped to the context."""
    if input_len < 1 or output_len < 1:
        raise ValueError(f"input_len/output_len: must be >= 1, got {input_len}/{output_len}")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio: must be in [0, 1), got {range_ratio!r}")
    rng = random.Random(seed)

    def draw(length: int) -> int:
        return rng.randint(max(1, math.floor(length * (1 - range_ratio))), math.ceil(length * (1 + range_ratio)))

    return [clip_lengths(draw(input_len), draw(output_len), max_context) for _ in range(num)]


def random_token_ids(rng: random.Random, length: int, vocab_size: int, exclude: Sequence[int] = ()) -> tuple[int, ...]:
    """`length` ids in [LOW_TOKEN_ID, vocab_size) (all of [0, vocab) for a tiny vocab), none of them in `exclude`."""
    low = LOW_TOKEN_ID if vocab_size > 2 * LOW_TOKEN_ID else 0
    excluded = {t for t in exclude if low <= t < vocab_size}
    if vocab_size - low - len(excluded) < 1:
        raise ValueError(f"vocab_size: {vocab_size} leaves no token ids to sample")
    ids = []
    while len(ids) < length:
        t = rng.randrange(low, vocab_size)
        if t not in excluded:
            ids.append(t)
    return tuple(ids)


def load_jsonl(path: str, num: int, max_context: int, default_output_len: int,
               has_tokenizer: bool = True) -> list[BenchRequest]:
    """`num` requests from a JSONL file, in file order (cycling when it is shorter). Each line: `prompt` (text) or
    `prompt_token_ids`, and optionally `max_tokens` or `output_len`. Outputs are clipped to the context; text prompts
    cannot be measured here, so a text prompt that is too long fails at the server (INVALID_ARGUMENT)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                rows.append(_jsonl_request(f"{path}:{number}", line, max_context, default_output_len, has_tokenizer))
    if not rows:
        raise ValueError(f"dataset_path: {path} has no requests")
    return [rows[i % len(rows)] for i in range(num)]


def _jsonl_request(where: str, line: str, max_context: int, default_output_len: int,
                   has_tokenizer: bool) -> BenchRequest:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"dataset_path: {where} is not JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"dataset_path: {where} is not a JSON object")
    output = row.get("max_tokens", row.get("output_len", default_output_len))
    if not isinstance(output, int) or isinstance(output, bool) or output < 1:
        raise ValueError(f"dataset_path: {where}: max_tokens/output_len must be a positive integer, got {output!r}")
    if isinstance(row.get("prompt_token_ids"), list):
        ids = row["prompt_token_ids"]
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise ValueError(f"dataset_path: {where}: prompt_token_ids must be a non-empty list of token ids")
        if len(ids) >= max_context:
            raise ValueError(f"dataset_path: {where}: prompt of {len(ids)} tokens leaves no room for output in "
                             f"the context of {max_context}")
        return BenchRequest(tuple(ids), len(ids), min(output, max_context - len(ids)))
    if isinstance(row.get("prompt"), str) and row["prompt"]:
        if not has_tokenizer:
            raise ValueError(f"dataset_path: {where}: the server's model has no tokenizer; use prompt_token_ids")
        return BenchRequest(row["prompt"], 0, min(output, max_context - 1))
    raise ValueError(f"dataset_path: {where} needs a non-empty `prompt` string or `prompt_token_ids` list")


def multiturn_workload(num: int, turns: int, system_len: int, message_len: int, output_len: int, *,
                       max_context: int, vocab_size: int, eos_token_ids: Sequence[int] = (),
                       seed: int = 0) -> list[BenchConversation]:
    """`num` conversations of `turns` turns sharing one system prompt of `system_len` tokens; each turn adds a
    message of `message_len` tokens and an answer of `output_len`. The last turn must fit the context."""
    for name, value in (("turns", turns), ("input_len", system_len), ("message_len", message_len),
                        ("output_len", output_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
    longest = system_len + turns * (message_len + output_len)
    if longest > max_context:
        raise ValueError(f"input_len/message_len/output_len/turns: the last turn of a conversation reaches "
                         f"{longest} tokens, beyond the model's context of {max_context}")
    rng = random.Random(seed + 1)
    system = random_token_ids(rng, system_len, vocab_size, eos_token_ids)
    return [BenchConversation(system, tuple(random_token_ids(rng, message_len, vocab_size, eos_token_ids)
                                            for _ in range(turns)), output_len) for _ in range(num)]


def shared_prefix_workload(num: int, num_prefixes: int, prefix_len: int, suffix_len: int, output_len: int, *,
                           max_context: int, vocab_size: int, eos_token_ids: Sequence[int] = (),
                           seed: int = 0) -> list[BenchRequest]:
    """`num` requests, request i = prefix i mod `num_prefixes` (each `prefix_len` tokens) + its own suffix of
    `suffix_len` tokens (few-shot templates, agents' tool preambles)."""
    for name, value in (("num_prefixes", num_prefixes), ("input_len", prefix_len), ("message_len", suffix_len),
                        ("output_len", output_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
    if prefix_len + suffix_len + output_len > max_context:
        raise ValueError(f"input_len/message_len/output_len: {prefix_len + suffix_len + output_len} tokens exceed "
                         f"the model's context of {max_context}")
    rng = random.Random(seed + 1)
    prefixes = [random_token_ids(rng, prefix_len, vocab_size, eos_token_ids) for _ in range(num_prefixes)]
    return [BenchRequest(prefixes[i % num_prefixes] + random_token_ids(rng, suffix_len, vocab_size, eos_token_ids),
                         prefix_len + suffix_len, output_len) for i in range(num)]


def build_workload(dataset: str, num: int, *, max_context: int, vocab_size: int, eos_token_ids: Sequence[int] = (),
                   has_tokenizer: bool = True, seed: int = 0, dataset_path: str | None = None, input_len: int = 512,
                   output_len: int = 128, range_ratio: float = 0.0, turns: int = 4, message_len: int = 64,
                   num_prefixes: int = 4) -> list[BenchRequest] | list[BenchConversation]:
    """The requests of one benchmark, deterministic under `seed`, fitted to the server's model. `multiturn`:
    `num` conversations of `turns` turns, `input_len` the shared system prompt, `message_len` each new message.
    `shared-prefix`: `num` requests over `num_prefixes` prefixes of `input_len`, suffixes of `message_len`."""
    if num < 1:
        raise ValueError(f"num_prompts: must be >= 1, got {num}")
    if dataset == "multiturn":
        return multiturn_workload(num, turns, input_len, message_len, output_len, max_context=max_context,
                                  vocab_size=vocab_size, eos_token_ids=eos_token_ids, seed=seed)
    if dataset == "shared-prefix":
        return shared_prefix_workload(num, num_prefixes, input_len, message_len, output_len, max_context=max_context,
                                      vocab_size=vocab_size, eos_token_ids=eos_token_ids, seed=seed)
    if dataset == "jsonl":
        if not dataset_path:
            raise ValueError("dataset_path: required with --dataset jsonl")
        return load_jsonl(dataset_path, num, max_context, output_len, has_tokenizer)
    if dataset == "random":
        lengths = random_lengths(num, input_len, output_len, range_ratio, max_context, seed)
    elif dataset in DATASETS:
        lengths = synthetic_lengths(dataset, num, max_context, seed)
    else:
        raise ValueError(f"dataset: {dataset!r} is not one of {list(ALL_DATASETS)}")
    rng = random.Random(seed + 1)
    return [BenchRequest(random_token_ids(rng, p, vocab_size, eos_token_ids), p, o) for p, o in lengths]
