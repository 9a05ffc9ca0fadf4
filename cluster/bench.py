"""`splitserve bench`: a serving benchmark against a running splitserve server. It sends a seeded workload at one
or more request rates, times every streamed token at the client and reports throughput, latency percentiles,
goodput and SLO attainment (a table on stdout, JSON with `--output`).

This module is the command line and the report table; the workload (`bench_workload`), the statistics
(`bench_stats`) and the driver (`bench_driver`) live in their own modules, and their public names are importable
from here too, as `splitserve.cluster.bench.<name>`."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import grpc

from splitserve.cluster import bench_openai
from splitserve.cluster.bench_driver import fetch_model_info, run_benchmark, wait_ready
from splitserve.cluster.bench_stats import PERCENTILES, RequestRecord, distribution_ms, meets_slo, summarize
from splitserve.cluster.bench_workload import (
    ALL_DATASETS, CONTEXT_FRACTION, LOW_TOKEN_ID, SYNTHETIC_DATASETS, BenchRequest, arrival_times, build_workload,
    clip_lengths, load_jsonl, parse_rates, random_lengths, random_token_ids, rate_label, scaled_means,
    synthetic_lengths)
from splitserve.proto.client import DEFAULT_TARGET

__all__ = [
    "ALL_DATASETS", "CONTEXT_FRACTION", "LOW_TOKEN_ID", "PERCENTILES", "SYNTHETIC_DATASETS", "BenchRequest",
    "RequestRecord", "add_arguments", "arrival_times", "build_workload", "clip_lengths", "distribution_ms",
    "fetch_model_info", "format_report", "load_jsonl", "meets_slo", "parse_rates", "random_lengths",
    "random_token_ids", "run", "run_benchmark", "scaled_means", "summarize", "synthetic_lengths", "wait_ready",
]

TOKEN_ENV = "SPLITSERVE_AUTH_TOKEN"
SERVER_ENV = "SPLITSERVE_SERVER"


# ---------------------------------------------------------------------------------------------------- report

def format_report(report: dict) -> str:
    """A readable table of one rate's report."""
    def num(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [f"{' rate ' + rate_label(report['rate']) + ' ':=^60}"]

    def row(name, value):
        lines.append(f"{name:<42}{value:>18}")

    row("Successful requests:", report["completed"])
    row("Failed requests:", report["failed"])
    for code, count in sorted(report["errors"].items()):
        row(f"  {code}:", count)
    row("Benchmark duration (s):", num(report["duration_s"]))
    row("Total input tokens:", report["total_input_tokens"])
    row("Total output tokens:", report["total_output_tokens"])
    row("Prefix cache hit rate (%):", num(100 * report.get("prefix_hit_rate", 0.0), 1))
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
    parser.add_argument("--backend", default="splitserve", choices=("splitserve", "openai"),
                        help="splitserve: the gRPC API at --server; openai: any OpenAI-compatible /v1/completions "
                             "at --base-url")
    parser.add_argument("--base-url", default=None, help="openai backend: e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=None, help="openai backend: the model name (default: the first listed)")
    parser.add_argument("--max-context", type=int, default=2048, help="openai backend: the model's context length")
    parser.add_argument("--vocab-size", type=int, default=32000,
                        help="openai backend: token ids of the random prompts are drawn below this")
    parser.add_argument("--server", default=os.environ.get(SERVER_ENV, DEFAULT_TARGET),
                        help=f"HOST:PORT of the API (default: ${SERVER_ENV} or {DEFAULT_TARGET})")
    parser.add_argument("--token", default=None, help=f"bearer token (default: ${TOKEN_ENV})")
    parser.add_argument("--tls-ca", default=None, help="PEM file of the CA that signed the server's certificate")
    parser.add_argument("--dataset", default="sharegpt", choices=ALL_DATASETS,
                        help="synthetic lengths with published means (sharegpt 755/200, humaneval 171/98, "
                             "longbench 1738/91 tokens in/out), random, jsonl (--dataset-path), multiturn "
                             "(--num-prompts conversations of --turns turns resending their history), or "
                             "shared-prefix (--num-prefixes prefixes of --input-len, suffixes of --message-len)")
    parser.add_argument("--dataset-path", default=None,
                        help="JSONL: `prompt` or `prompt_token_ids`, optional `max_tokens`/`output_len` per line")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--input-len", type=int, default=512,
                        help="random: mean prompt tokens; multiturn: the shared system prompt's tokens; "
                             "shared-prefix: each prefix's tokens")
    parser.add_argument("--output-len", type=int, default=128,
                        help="random: mean output tokens; jsonl: output of lines that give none; multiturn: "
                             "answer tokens per turn")
    parser.add_argument("--turns", type=int, default=4, help="multiturn: turns per conversation")
    parser.add_argument("--message-len", type=int, default=64,
                        help="multiturn: new message tokens per turn; shared-prefix: suffix tokens")
    parser.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: distinct prefixes")
    parser.add_argument("--range-ratio", type=float, default=0.0,
                        help="random: lengths uniform in [L*(1-r), L*(1+r)]")
    rates = parser.add_mutually_exclusive_group()
    rates.add_argument("--rate", default=None, help="requests (multiturn: conversations) per second, or inf (all "
                       "at once); default inf")
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
    if args.backend == "openai" and not args.base_url:
        raise ValueError("base_url: required with --backend openai (e.g. http://127.0.0.1:8000/v1)")
    if args.dataset == "jsonl" and not args.dataset_path:
        raise ValueError("dataset_path: required with --dataset jsonl")
    if args.dataset == "multiturn" and args.backend == "openai":
        raise ValueError("dataset: multiturn resends each answer's token ids, which the OpenAI completions API does "
                         "not return; use the splitserve backend (or --dataset shared-prefix)")
    return rates


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1e3


async def _main(args, rates: list[float], token: str | None) -> dict:
    factory = None
    if args.backend == "openai":
        if args.wait_ready > 0:
            await bench_openai.wait_ready(args.base_url, token, args.wait_ready)
        model = await bench_openai.model_info(args.base_url, token, args.model, args.max_context, args.vocab_size)

        def factory():
            return bench_openai.OpenAIClient(args.base_url, token, model["model"])
    else:
        if args.wait_ready > 0:
            await wait_ready(args.server, args.wait_ready, tls_ca=args.tls_ca)
        model = await fetch_model_info(args.server, token, tls_ca=args.tls_ca)
    workload = build_workload(args.dataset, args.num_prompts, max_context=model["max_context"],
                              vocab_size=model["vocab_size"], eos_token_ids=model["eos_token_ids"],
                              has_tokenizer=model["has_tokenizer"], seed=args.seed, dataset_path=args.dataset_path,
                              input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio,
                              turns=args.turns, message_len=args.message_len, num_prefixes=args.num_prefixes)
    results = []
    for rate in rates:
        report = await run_benchmark(
            args.server, workload, rate, burstiness=args.burstiness, slo_ttft_s=_seconds(args.slo_ttft_ms),
            slo_tpot_s=_seconds(args.slo_tpot_ms), token=token, max_concurrency=args.max_concurrency, seed=args.seed,
            progress=not args.no_progress, timeout=args.timeout, temperature=args.temperature,
            ignore_eos=not args.stop_at_eos, tls_ca=args.tls_ca, keep_records=args.save_requests,
            client_factory=factory)
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
    except (TimeoutError, bench_openai.HttpStatusError) as e:
        print(f"splitserve bench: {e}", file=sys.stderr)
        return 1
    if args.output:
        arguments = {k: v for k, v in vars(args).items() if not callable(v) and k != "token"}
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({"arguments": arguments, **outcome}, f, indent=2)
            f.write("\n")
    return 0 if all(r["completed"] > 0 for r in outcome["results"]) else 1
