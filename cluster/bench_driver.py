"""How `splitserve bench` drives a server: seeded arrivals of a workload over one async gRPC client, each request
timed at the client, plus the readiness wait and the model query that come before a run."""
from __future__ import annotations

import asyncio
import sys
import time
import uuid
from dataclasses import asdict
from typing import Sequence

import grpc
from tqdm import tqdm

from splitserve.cluster.bench_openai import HttpStatusError
from splitserve.cluster.bench_stats import RequestRecord, summarize
from splitserve.cluster.bench_workload import BenchConversation, BenchRequest, arrival_times, rate_json, rate_label
from splitserve.proto.client import SERVICE_NAME, AsyncClient


async def _send(client: AsyncClient, request: BenchRequest, request_id: str, sampling: dict,
                timeout: float | None) -> RequestRecord:
    return (await _request(client, request, request_id, sampling, timeout))[0]


async def _request(client, request: BenchRequest, request_id: str, sampling: dict,
                   timeout: float | None) -> tuple[RequestRecord, list[int]]:
    """The record of one request and its output token ids (empty unless it completed)."""
    try:
        result = await client.generate(request.prompt, stream=True, request_id=request_id, timeout=timeout,
                                       **sampling, max_tokens=request.output_len)
    except grpc.RpcError as e:
        return RequestRecord(ok=False, error=e.code().name if callable(getattr(e, "code", None)) else "UNKNOWN"), []
    except HttpStatusError as e:
        return RequestRecord(ok=False, error=f"HTTP_{e.status}"), []
    except Exception as e:  # one broken request must not end the run; it is counted under its error's type
        return RequestRecord(ok=False, error=f"CLIENT_{type(e).__name__}"), []
    if result.finish_reason is None or result.e2e_s is None:
        return RequestRecord(ok=False, error="INCOMPLETE"), []
    if result.finish_reason == "abort":
        return RequestRecord(ok=False, error="FINISH_ABORT"), []
    output_tokens = result.completion_tokens or len(result.token_ids)
    if output_tokens == 0 or result.ttft_s is None:
        return RequestRecord(ok=False, error="NO_OUTPUT"), []
    return RequestRecord(ok=True, prompt_tokens=result.prompt_tokens or request.prompt_len,
                         output_tokens=output_tokens, ttft_s=result.ttft_s, e2e_s=result.e2e_s,
                         itl_s=list(result.itl_s), cached_tokens=getattr(result, "cached_tokens", 0)), result.token_ids


async def _converse(client, conversation: BenchConversation, request_id: str, sampling: dict,
                    timeout: float | None, on_turn) -> list[RequestRecord]:
    """The turns of one conversation in order, each resending the history with the server's answers; a failed turn
    ends the conversation (its later turns count as failed: they have no history to send)."""
    history, records = list(conversation.system), []
    for turn, message in enumerate(conversation.messages):
        prompt = tuple(history) + message
        record, answer = await _request(client, BenchRequest(prompt, len(prompt), conversation.output_len),
                                        f"{request_id}-t{turn}", sampling, timeout)
        records.append(record)
        on_turn(record)
        if not record.ok:
            break
        history = list(prompt) + list(answer)
    for _ in range(conversation.turns - len(records)):
        records.append(RequestRecord(ok=False, error="CONVERSATION_ENDED"))
        on_turn(records[-1])
    return records


async def run_benchmark(target: str, workload: Sequence[BenchRequest], rate: float, *, burstiness: float = 1.0,
                        slo_ttft_s: float | None = None, slo_tpot_s: float | None = None, token: str | None = None,
                        max_concurrency: int | None = None, seed: int = 0, progress: bool = False,
                        timeout: float | None = None, temperature: float = 0.0, ignore_eos: bool = True,
                        tls_ca: str | None = None, keep_records: bool = False, client_factory=None) -> dict:
    """Sends `workload` to the server at `target` with seeded arrivals at `rate` req/s and returns `summarize`'s
    report plus `rate` and `burstiness` (and `requests`, each record, with keep_records). Latencies are timed from
    the moment a request is sent, so with `max_concurrency` the wait for a free slot is not part of its TTFT.
    A workload of conversations: `rate` is conversations per second, each sends its turns in order (one record per
    turn). `client_factory()`: another client (the OpenAI backend) instead of gRPC to `target`."""
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency: must be >= 1, got {max_concurrency}")
    arrivals = arrival_times(len(workload), rate, burstiness, seed)
    sampling = {"temperature": temperature, "ignore_eos": ignore_eos}
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    failed = 0

    def counted(record: RequestRecord) -> None:
        nonlocal failed
        if not record.ok:
            failed += 1
            bar.set_postfix_str(f"{failed} failed", refresh=False)
        bar.update()

    async def send(index: int, item) -> list[RequestRecord]:
        if isinstance(item, BenchConversation):
            return await _converse(client, item, f"{prefix}-{index}", sampling, timeout, counted)
        record = await _send(client, item, f"{prefix}-{index}", sampling, timeout)
        counted(record)
        return [record]

    async def one(index: int, item) -> list[RequestRecord]:
        if slots is None:
            return await send(index, item)
        async with slots:
            return await send(index, item)

    total = sum(item.turns if isinstance(item, BenchConversation) else 1 for item in workload)
    # No bar when progress is off or stderr is not a terminal (disable=None: tqdm checks isatty).
    with tqdm(total=total, desc=f"rate {rate_label(rate)}", unit="req", file=sys.stderr,
              disable=None if progress else True) as bar:
        factory = client_factory or (lambda: AsyncClient(target, token=token, tls_ca=tls_ca))
        async with factory() as client:
            start = time.perf_counter()
            tasks = []
            for index, (at, request) in enumerate(zip(arrivals, workload)):
                delay = start + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(index, request)))
            records = [r for records in await asyncio.gather(*tasks) for r in records]
            duration = time.perf_counter() - start
    report = {"rate": rate_json(rate), "burstiness": burstiness, "max_concurrency": max_concurrency,
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
