"""`splitserve bench`: a serving benchmark against a running splitserve server. It sends a seeded workload at one
or more request rates, times every streamed token at the client and reports throughput, latency percentiles,
goodput and SLO attainment (a table on stdout, JSON with `--output`).

Workloads: `sharegpt`, `humaneval`, `longbench` draw prompt and output lengths from lognormals with the published
means and the planner's spreads (`placement/workload.py`), so a bench run and a `splitserve plan` simulation see the
same distributions; `random` draws lengths uniformly around `--input-len` / `--output-len`; `jsonl` replays a file.
Synthetic prompts are random token ids sent with `ignore_eos` and `max_tokens` = the sampled output length."""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Sequence

import grpc

from splitserve.placement.workload import DATASETS
from splitserve.proto.client import DEFAULT_TARGET, SERVICE_NAME, AsyncClient

SYNTHETIC_DATASETS = tuple(DATASETS)
ALL_DATASETS = SYNTHETIC_DATASETS + ("random", "jsonl")
CONTEXT_FRACTION = 0.5  # synthetic means are scaled down until prompt + output fits in this share of the context
LOW_TOKEN_ID = 10  # random prompt ids start here: low ids are often control tokens (bos, eos, pad)
PERCENTILES = (50, 90, 99)
TOKEN_ENV = "SPLITSERVE_AUTH_TOKEN"
SERVER_ENV = "SPLITSERVE_SERVER"


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload. `prompt_len` is 0 for text prompts (the server reports the real count)."""

    prompt: str | tuple[int, ...]
    prompt_len: int
    output_len: int


@dataclass
class RequestRecord:
    """What the client saw of one request. `error` is the gRPC status code name (or FINISH_ABORT / INCOMPLETE)."""

    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; 0 for a one-token output."""
        if not self.ok:
            return None
        if self.output_tokens <= 1:
            return 0.0
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


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


def build_workload(dataset: str, num: int, *, max_context: int, vocab_size: int, eos_token_ids: Sequence[int] = (),
                   has_tokenizer: bool = True, seed: int = 0, dataset_path: str | None = None, input_len: int = 512,
                   output_len: int = 128, range_ratio: float = 0.0) -> list[BenchRequest]:
    """The requests of one benchmark, deterministic under `seed`, fitted to the server's model."""
    if num < 1:
        raise ValueError(f"num_prompts: must be >= 1, got {num}")
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


# ---------------------------------------------------------------------------------------------------- statistics

def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def distribution_ms(values_s: Sequence[float]) -> dict:
    """mean and p50/p90/p99 in milliseconds (None with no samples)."""
    if not values_s:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}, "count": 0}
    ms = [v * 1e3 for v in values_s]
    return {"mean": sum(ms) / len(ms), **{f"p{q}": percentile(ms, q) for q in PERCENTILES}, "count": len(ms)}


def meets_slo(record: RequestRecord, slo_ttft_s: float | None, slo_tpot_s: float | None) -> bool:
    """Completed, and inside both targets (an unset target always holds)."""
    if not record.ok:
        return False
    return ((slo_ttft_s is None or record.ttft_s <= slo_ttft_s)
            and (slo_tpot_s is None or record.tpot_s <= slo_tpot_s))


def summarize(records: Sequence[RequestRecord], duration_s: float, slo_ttft_s: float | None = None,
              slo_tpot_s: float | None = None) -> dict:
    """The report of one run. TPOT statistics cover requests with more than one output token; ITLs are pooled
    over requests; attainment is over all requests, failed ones counting as missed."""
    done = [r for r in records if r.ok]
    good = sum(meets_slo(r, slo_ttft_s, slo_tpot_s) for r in records)
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    return {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": dict(Counter(r.error for r in records if not r.ok)),
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(out_tokens),
        "total_token_throughput": per_s(in_tokens + out_tokens),
        "slo_ttft_ms": None if slo_ttft_s is None else slo_ttft_s * 1e3,
        "slo_tpot_ms": None if slo_tpot_s is None else slo_tpot_s * 1e3,
        "good_requests": good,
        "goodput": per_s(good),
        "slo_attainment": good / len(records) if records else 0.0,
        "ttft_ms": distribution_ms([r.ttft_s for r in done]),
        "tpot_ms": distribution_ms([r.tpot_s for r in done if r.output_tokens > 1]),
        "itl_ms": distribution_ms([gap for r in done for gap in r.itl_s]),
        "e2e_ms": distribution_ms([r.e2e_s for r in done]),
    }


# ---------------------------------------------------------------------------------------------------- running

class ProgressBar:
    """A one-line bar on stderr, redrawn at most 10 times a second (and at the end)."""

    def __init__(self, total: int, label: str, enabled: bool = True, stream=None):
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.done = self.failed = 0
        self.start = time.perf_counter()
        self._drawn = 0.0

    def update(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        now = time.perf_counter()
        if self.enabled and (now - self._drawn >= 0.1 or self.done == self.total):
            self._drawn = now
            filled = int(30 * self.done / max(1, self.total))
            failed = f", {self.failed} failed" if self.failed else ""
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}"
                              f"{failed} {now - self.start:.1f}s")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.done:
            self.stream.write("\n")
            self.stream.flush()


async def _send(client: AsyncClient, request: BenchRequest, request_id: str, sampling: dict,
                timeout: float | None) -> RequestRecord:
    try:
        result = await client.generate(request.prompt, stream=True, request_id=request_id, timeout=timeout,
                                       **sampling, max_tokens=request.output_len)
    except grpc.RpcError as e:
        return RequestRecord(ok=False, error=e.code().name if callable(getattr(e, "code", None)) else "UNKNOWN")
    except Exception as e:  # one broken request must not end the run; it is counted under its error's type
        return RequestRecord(ok=False, error=f"CLIENT_{type(e).__name__}")
    if result.finish_reason is None or result.e2e_s is None:
        return RequestRecord(ok=False, error="INCOMPLETE")
    if result.finish_reason == "abort":
        return RequestRecord(ok=False, error="FINISH_ABORT")
    output_tokens = result.completion_tokens or len(result.token_ids)
    if output_tokens == 0 or result.ttft_s is None:
        return RequestRecord(ok=False, error="NO_OUTPUT")
    return RequestRecord(ok=True, prompt_tokens=result.prompt_tokens or request.prompt_len,
                         output_tokens=output_tokens, ttft_s=result.ttft_s, e2e_s=result.e2e_s,
                         itl_s=list(result.itl_s))


async def run_benchmark(target: str, workload: Sequence[BenchRequest], rate: float, *, burstiness: float = 1.0,
                        slo_ttft_s: float | None = None, slo_tpot_s: float | None = None, token: str | None = None,
                        max_concurrency: int | None = None, seed: int = 0, progress: bool = False,
                        timeout: float | None = None, temperature: float = 0.0, ignore_eos: bool = True,
                        tls_ca: str | None = None, keep_records: bool = False) -> dict:
    """Sends `workload` to the server at `target` with seeded arrivals at `rate` req/s and returns `summarize`'s
    report plus `rate` and `burstiness` (and `requests`, each record, with keep_records). Latencies are timed from
    the moment a request is sent, so with `max_concurrency` the wait for a free slot is not part of its TTFT."""
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency: must be >= 1, got {max_concurrency}")
    arrivals = arrival_times(len(workload), rate, burstiness, seed)
    sampling = {"temperature": temperature, "ignore_eos": ignore_eos}
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    bar = ProgressBar(len(workload), f"rate {_rate_label(rate)}", enabled=progress)

    async def one(index: int, request: BenchRequest) -> RequestRecord:
        if slots is None:
            record = await _send(client, request, f"{prefix}-{index}", sampling, timeout)
        else:
            async with slots:
                record = await _send(client, request, f"{prefix}-{index}", sampling, timeout)
        bar.update(record.ok)
        return record

    async with AsyncClient(target, token=token, tls_ca=tls_ca) as client:
        start = time.perf_counter()
        tasks = []
        for index, (at, request) in enumerate(zip(arrivals, workload)):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index, request)))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    bar.close()
    report = {"rate": _rate_json(rate), "burstiness": burstiness, "max_concurrency": max_concurrency,
              **summarize(records, duration, slo_ttft_s, slo_tpot_s)}
    if keep_records:
        report["requests"] = [asdict(r) | {"tpot_s": r.tpot_s} for r in records]
    return report


async def wait_ready(target: str, timeout_s: float, interval_s: float = 0.2, tls_ca: str | None = None) -> None:
    """Polls grpc.health.v1 readiness until SERVING; TimeoutError with the last status otherwise."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    async with AsyncClient(target, tls_ca=tls_ca) as client:
        while time.monotonic() < deadline:
            try:
                last = await client.health(SERVICE_NAME, timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
            await asyncio.sleep(interval_s)
    raise TimeoutError(f"server at {target} not ready after {timeout_s:g}s (last: {last})")


async def fetch_model_info(target: str, token: str | None, timeout_s: float = 30.0,
                           tls_ca: str | None = None) -> dict:
    async with AsyncClient(target, token=token, tls_ca=tls_ca) as client:
        info = await client.model_info(timeout=timeout_s)
    return {"model": info.model, "architecture": info.architecture, "max_context": info.max_context,
            "vocab_size": info.vocab_size, "eos_token_ids": list(info.eos_token_ids),
            "has_tokenizer": info.has_tokenizer, "dtype": info.dtype}


def _rate_json(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def _rate_label(rate: float | str) -> str:
    return "inf" if rate == "inf" or math.isinf(rate) else f"{rate:g} req/s"


# ---------------------------------------------------------------------------------------------------- report

def format_report(report: dict) -> str:
    """A readable table of one rate's report."""
    def num(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [f"{' rate ' + _rate_label(report['rate']) + ' ':=^60}"]

    def row(name, value):
        lines.append(f"{name:<42}{value:>18}")

    row("Successful requests:", report["completed"])
    row("Failed requests:", report["failed"])
    for code, count in sorted(report["errors"].items()):
        row(f"  {code}:", count)
    row("Benchmark duration (s):", num(report["duration_s"]))
    row("Total input tokens:", report["total_input_tokens"])
    row("Total output tokens:", report["total_output_tokens"])
    row("Request throughput (req/s):", num(report["request_throughput"]))
    row("Output token throughput (tok/s):", num(report["output_throughput"]))
    row("Total token throughput (tok/s):", num(report["total_token_throughput"]))
    slos = ", ".join(f"{k} <= {report[f'slo_{k.lower()}_ms']:g}" for k in ("TTFT", "TPOT")
                     if report[f"slo_{k.lower()}_ms"] is not None) or "none"
    row("SLOs (ms):", slos)
    row("Goodput (req/s):", num(report["goodput"]))
    row("SLO attainment (%):", num(100 * report["slo_attainment"], 1))
    for key, title in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E")):
        dist = report[key]
        lines.append(f"{' ' + title + ' (ms) ':-^60}")
        row(f"Mean {title} (ms):", num(dist["mean"]))
        for q in PERCENTILES:
            row(f"P{q} {title} (ms):", num(dist[f"p{q}"]))
    lines.append("=" * 60)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=os.environ.get(SERVER_ENV, DEFAULT_TARGET),
                        help=f"HOST:PORT of the API (default: ${SERVER_ENV} or {DEFAULT_TARGET})")
    parser.add_argument("--token", default=None, help=f"bearer token (default: ${TOKEN_ENV})")
    parser.add_argument("--tls-ca", default=None, help="PEM file of the CA that signed the server's certificate")
    parser.add_argument("--dataset", default="sharegpt", choices=ALL_DATASETS,
                        help="synthetic lengths with published means (sharegpt 755/200, humaneval 171/98, "
                             "longbench 1738/91 tokens in/out), random, or jsonl (--dataset-path)")
    parser.add_argument("--dataset-path", default=None,
                        help="JSONL: `prompt` or `prompt_token_ids`, optional `max_tokens`/`output_len` per line")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--input-len", type=int, default=512, help="random: mean prompt tokens")
    parser.add_argument("--output-len", type=int, default=128,
                        help="random: mean output tokens; jsonl: output of lines that give none")
    parser.add_argument("--range-ratio", type=float, default=0.0,
                        help="random: lengths uniform in [L*(1-r), L*(1+r)]")
    rates = parser.add_mutually_exclusive_group()
    rates.add_argument("--rate", default=None, help="requests per second, or inf (all at once); default inf")
    rates.add_argument("--rates", default=None, help="a sweep: r1,r2,... (one report per rate)")
    parser.add_argument("--burstiness", type=float, default=1.0,
                        help="gamma shape of the inter-arrival times (1 = Poisson, < 1 burstier)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    parser.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT target for goodput and attainment")
    parser.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT target for goodput and attainment")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--stop-at-eos", action="store_true",
                        help="let requests end at end-of-sequence (default: ignore_eos, outputs have their length)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=None, help="per-request deadline in seconds")
    parser.add_argument("--wait-ready", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to this long for the server's readiness (grpc.health.v1)")
    parser.add_argument("--output", default=None, help="write the reports and the arguments as JSON here")
    parser.add_argument("--save-requests", action="store_true", help="include every request's record in --output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _check_args(args) -> list[float]:
    rates = parse_rates(args.rates if args.rates is not None else (args.rate or "inf"))
    for name in ("slo_ttft_ms", "slo_tpot_ms", "timeout"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise ValueError(f"{name}: must be positive, got {value!r}")
    if args.temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {args.temperature!r}")
    if args.wait_ready < 0:
        raise ValueError(f"wait_ready: must be >= 0, got {args.wait_ready!r}")
    if args.dataset == "jsonl" and not args.dataset_path:
        raise ValueError("dataset_path: required with --dataset jsonl")
    return rates


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1e3


async def _main(args, rates: list[float], token: str | None) -> dict:
    if args.wait_ready > 0:
        await wait_ready(args.server, args.wait_ready, tls_ca=args.tls_ca)
    model = await fetch_model_info(args.server, token, tls_ca=args.tls_ca)
    workload = build_workload(args.dataset, args.num_prompts, max_context=model["max_context"],
                              vocab_size=model["vocab_size"], eos_token_ids=model["eos_token_ids"],
                              has_tokenizer=model["has_tokenizer"], seed=args.seed, dataset_path=args.dataset_path,
                              input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio)
    results = []
    for rate in rates:
        report = await run_benchmark(
            args.server, workload, rate, burstiness=args.burstiness, slo_ttft_s=_seconds(args.slo_ttft_ms),
            slo_tpot_s=_seconds(args.slo_tpot_ms), token=token, max_concurrency=args.max_concurrency, seed=args.seed,
            progress=not args.no_progress, timeout=args.timeout, temperature=args.temperature,
            ignore_eos=not args.stop_at_eos, tls_ca=args.tls_ca, keep_records=args.save_requests)
        print(format_report(report), flush=True)
        results.append(report)
    return {"model": model, "results": results}


def run(args) -> int:
    """`splitserve bench`: 0 when every rate completed at least one request, 1 otherwise or when the server cannot
    be reached; bad options raise ValueError (the CLI prints it and exits 2)."""
    rates = _check_args(args)
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    try:
        outcome = asyncio.run(_main(args, rates, token))
    except grpc.RpcError as e:
        print(f"splitserve bench: {args.server}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except TimeoutError as e:
        print(f"splitserve bench: {e}", file=sys.stderr)
        return 1
    if args.output:
        arguments = {k: v for k, v in vars(args).items() if not callable(v) and k != "token"}
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({"arguments": arguments, **outcome}, f, indent=2)
            f.write("\n")
    return 0 if all(r["completed"] > 0 for r in outcome["results"]) else 1
