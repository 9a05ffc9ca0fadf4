"""Discrete-event simulation of prefill instances, decode instances and the colocated baseline.

Each function takes arrival times and lengths and returns per-request times; `simulate_disaggregated` and
`simulate_colocated_trace` wrap them into a SimResult. The only randomness is in the trace, so results are
deterministic under the trace's seed.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import Sequence

from splitserve.placement.latency import LatencyModel
from splitserve.placement.metrics import SimResult
from splitserve.placement.parallel import Parallel
from splitserve.placement.workload import Trace

INF = math.inf


def simulate_prefill(latency: LatencyModel, par: Parallel, arrivals: Sequence[float], prompts: Sequence[int],
                     instances: int = 1, token_budget: int = 4096) -> list[float]:
    """Time each request's prefill finishes (its first token). FCFS batches up to `token_budget` tokens (a prompt
    longer than the budget runs alone; budget 0 turns batching off). With PP a new batch enters the pipeline as
    soon as the first stage is free, i.e. after 1/pp of the batch latency."""
    n = len(arrivals)
    done = [0.0] * n
    queues = [deque() for _ in range(instances)]
    pending = [0] * instances
    busy = [False] * instances
    free_events: list[tuple[float, int]] = []

    def start(k: int, now: float) -> None:
        queue = queues[k]
        if not queue:
            return
        batch = [queue.popleft()]
        tokens = prompts[batch[0]]
        while queue and tokens + prompts[queue[0]] <= token_budget:
            tokens += prompts[queue[0]]
            batch.append(queue.popleft())
        elapsed = latency.prefill_time([prompts[r] for r in batch], par)
        for r in batch:
            done[r] = now + elapsed
        pending[k] -= tokens
        busy[k] = True
        heapq.heappush(free_events, (now + elapsed / par.pp, k))

    i = 0
    while i < n or free_events:
        # Arrivals at the same instant go first, so requests arriving together can share a batch.
        if free_events and (i == n or free_events[0][0] < arrivals[i]):
            now, k = heapq.heappop(free_events)
            busy[k] = False
            start(k, now)
            continue
        # The router sends a prompt to the instance with the fewest pending prompt tokens.
        k = min(range(instances), key=pending.__getitem__) if instances > 1 else 0
        queues[k].append(i)
        pending[k] += prompts[i]
        if not busy[k]:
            busy[k] = True
            heapq.heappush(free_events, (arrivals[i], k))  # wake now, after this instant's other arrivals
        i += 1
    return done


class _DecodeEngine:
    """Continuous batching over a KV budget; a request reserves prompt + output tokens when it is admitted
    (no preemption), and leaves after its last token."""

    __slots__ = ("waiting", "running", "steps", "batch", "context", "reserved", "queued", "capacity", "max_batch",
                 "busy")

    def __init__(self, capacity: int, max_batch: int):
        self.waiting: deque[int] = deque()
        self.running: list[tuple[int, int]] = []  # (step at which it finishes, request)
        self.steps = 0
        self.batch = 0
        self.context = 0
        self.reserved = 0
        self.queued = 0  # KV tokens the waiting requests will reserve
        self.capacity = capacity
        self.max_batch = max_batch
        self.busy = False


def simulate_decode(latency: LatencyModel, par: Parallel, ready: Sequence[float], prompts: Sequence[int],
                    outputs: Sequence[int], instances: int = 1, kv_capacity: int = 1 << 40,
                    max_batch: int = 256) -> list[float]:
    """Time each request emits its last token, given when its KV is ready on the decode side (`ready`, any order).
    The first token came from prefill, so a request needs outputs-1 steps. An instance with pp stages runs pp
    micro-batches in flight: modelled as pp engines, each with 1/pp of the KV and full-pipeline step latency."""
    n = len(ready)
    finish = [0.0] * n
    order = sorted(range(n), key=ready.__getitem__)
    for r in range(n):
        if prompts[r] + outputs[r] > kv_capacity // par.pp:
            finish[r] = INF  # can never be admitted: counts as a miss instead of blocking the queue forever
    engines = [_DecodeEngine(kv_capacity // par.pp, max_batch) for _ in range(instances * par.pp)]
    step_events: list[tuple[float, int, bool]] = []  # (time, engine, a step completes (else a wake-up))

    def step(k: int, now: float) -> None:
        e = engines[k]
        while e.waiting and e.batch < e.max_batch and e.reserved + prompts[e.waiting[0]] + outputs[e.waiting[0]] <= e.capacity:
            r = e.waiting.popleft()
            e.reserved += prompts[r] + outputs[r]
            e.queued -= prompts[r] + outputs[r]
            e.context += prompts[r] + 1
            e.batch += 1
            heapq.heappush(e.running, (e.steps + outputs[r] - 1, r))
        if e.batch == 0:
            e.busy = False
            return
        e.busy = True
        heapq.heappush(step_events, (now + latency.decode_time(e.batch, e.context, par), k, True))

    def finish_step(k: int, now: float) -> None:
        e = engines[k]
        e.steps += 1
        e.context += e.batch
        while e.running and e.running[0][0] <= e.steps:
            _, r = heapq.heappop(e.running)
            finish[r] = now
            e.batch -= 1
            e.context -= prompts[r] + outputs[r]
            e.reserved -= prompts[r] + outputs[r]

    i = 0
    while i < n or step_events:
        if step_events and (i == n or step_events[0][0] < ready[order[i]]):
            now, k, completed = heapq.heappop(step_events)
            if completed:
                finish_step(k, now)
            step(k, now)
            continue
        r = order[i]
        i += 1
        now = ready[r]
        if finish[r] == INF:
            continue
        if outputs[r] <= 1:
            finish[r] = now
            continue
        # The router picks the engine with the most KV left after reservations and queued requests.
        k = max(range(len(engines)), key=lambda j: engines[j].capacity - engines[j].reserved - engines[j].queued
                ) if len(engines) > 1 else 0
        engines[k].waiting.append(r)
        engines[k].queued += prompts[r] + outputs[r]
        if not engines[k].busy:
            engines[k].busy = True
            heapq.heappush(step_events, (now, k, False))
    return finish


def simulate_colocated(latency: LatencyModel, par: Parallel, arrivals: Sequence[float], prompts: Sequence[int],
                       outputs: Sequence[int], instances: int = 1, kv_capacity: int = 1 << 40,
                       max_batch: int = 256, token_budget: int = 512, chunked: bool = True
                       ) -> tuple[list[float], list[float]]:
    """(first-token times, last-token times) for colocated instances.

    chunked=True is Dynamic SplitFuse: every iteration carries all running decodes plus prompt chunks filling the
    token budget. chunked=False is vLLM-style prefill priority: whole prompts (up to the budget, at least one) run
    in their own iteration and decodes wait.
    """
    n = len(arrivals)
    first = [0.0] * n
    finish = [0.0] * n
    waiting = [deque() for _ in range(instances)]  # requests not yet fully prefilled, FCFS
    prefilled = [dict() for _ in range(instances)]  # request -> prompt tokens already computed
    running = [[] for _ in range(instances)]  # heap of (step at which it finishes, request)
    state = [[0, 0, 0, 0] for _ in range(instances)]  # steps, decode batch, decode context, reserved KV
    busy = [False] * instances
    events: list[tuple[float, int, tuple | None]] = []  # work None: a wake-up
    for r in range(n):
        if prompts[r] + outputs[r] > kv_capacity:
            first[r] = finish[r] = INF

    def admit_room(k: int, r: int) -> bool:
        return state[k][3] + prompts[r] + outputs[r] <= kv_capacity and state[k][1] + len(prefilled[k]) < max_batch

    def plan_chunks(k: int) -> list[tuple[int, int, int]]:
        """(request, chunk length, prefix) of this iteration's prefill work, reserving KV for new starters."""
        s, queue, started = state[k], waiting[k], prefilled[k]
        budget = token_budget - s[1] if chunked else max(token_budget, 1)
        chunks = []
        for r in queue:
            if budget <= 0:
                break
            if r not in started:
                if not admit_room(k, r):
                    break  # FCFS: a request that does not fit blocks those behind it
                started[r] = 0
                s[3] += prompts[r] + outputs[r]
            remaining = prompts[r] - started[r]
            if not chunked and chunks and remaining > budget:
                break
            size = remaining if not chunked else min(remaining, budget)
            chunks.append((r, size, started[r]))
            budget -= size
        return chunks

    def iterate(k: int, now: float) -> None:
        s = state[k]
        if not waiting[k]:  # fast path, most iterations: decode only
            if s[1] == 0:
                busy[k] = False
                return
            busy[k] = True
            heapq.heappush(events, (now + latency.decode_time(s[1], s[2], par), k, ((), True)))
            return
        chunks = plan_chunks(k)
        decode_batch, decode_context = (0, 0) if (chunks and not chunked) else (s[1], s[2])
        if not chunks and decode_batch == 0:
            busy[k] = False
            return
        busy[k] = True
        elapsed = latency.mixed_time([c for _, c, _ in chunks], [p for _, _, p in chunks], decode_batch,
                                     decode_context, par)
        heapq.heappush(events, (now + elapsed, k, (tuple(chunks), decode_batch > 0)))

    def complete(k: int, now: float, work: tuple) -> None:
        chunks, decoded = work
        s = state[k]
        if decoded:
            s[0] += 1
            s[2] += s[1]
            while running[k] and running[k][0][0] <= s[0]:
                _, r = heapq.heappop(running[k])
                finish[r] = now
                s[1] -= 1
                s[2] -= prompts[r] + outputs[r]
                s[3] -= prompts[r] + outputs[r]
        for r, size, _ in chunks:
            prefilled[k][r] += size
            if prefilled[k][r] == prompts[r]:
                del prefilled[k][r]
                assert waiting[k][0] == r, "completed prompts form a prefix of the queue"
                waiting[k].popleft()
                first[r] = now
                if outputs[r] <= 1:
                    finish[r] = now
                    s[3] -= prompts[r] + outputs[r]
                    continue
                s[1] += 1
                s[2] += prompts[r] + 1
                heapq.heappush(running[k], (s[0] + outputs[r] - 1, r))

    i = 0
    while i < n or events:
        if events and (i == n or events[0][0] < arrivals[i]):
            now, k, work = heapq.heappop(events)
            if work is not None:
                complete(k, now, work)
            iterate(k, now)
            continue
        r = i
        i += 1
        if first[r] == INF:
            continue
        k = min(range(instances), key=lambda j: state[j][3] + len(waiting[j])) if instances > 1 else 0
        waiting[k].append(r)
        if not busy[k]:
            busy[k] = True
            heapq.heappush(events, (arrivals[r], k, None))
    return first, finish


def _results(arrivals: Sequence[float], first: Sequence[float], finish: Sequence[float],
             outputs: Sequence[int]) -> SimResult:
    ttft = tuple(f - a for f, a in zip(first, arrivals))
    tpot = tuple(INF if e == INF else (e - f) / (o - 1) if o > 1 else 0.0
                 for f, e, o in zip(first, finish, outputs))
    return SimResult(ttft=ttft, tpot=tpot)


def simulate_disaggregated(latency: LatencyModel, trace: Trace, rate: float, prefill: Parallel,
                           decode: Parallel, prefill_instances: int = 1, decode_instances: int = 1,
                           kv_capacity: int = 1 << 40, same_node: bool = True, token_budget: int = 4096,
                           max_batch: int = 256) -> SimResult:
    """Prefill instances, KV transfer, decode instances, end to end at `rate` requests/s."""
    arrivals = trace.at_rate(rate)
    first = simulate_prefill(latency, prefill, arrivals, trace.prompts, prefill_instances, token_budget)
    ready = [f + latency.kv_transfer_time(p, prefill, decode, same_node) for f, p in zip(first, trace.prompts)]
    finish = simulate_decode(latency, decode, ready, trace.prompts, trace.outputs, decode_instances,
                             kv_capacity, max_batch)
    return _results(arrivals, first, finish, trace.outputs)


def simulate_colocated_trace(latency: LatencyModel, trace: Trace, rate: float, par: Parallel, instances: int = 1,
                             kv_capacity: int = 1 << 40, max_batch: int = 256, token_budget: int = 512,
                             chunked: bool = True) -> SimResult:
    arrivals = trace.at_rate(rate)
    first, finish = simulate_colocated(latency, par, arrivals, trace.prompts, trace.outputs, instances,
                                       kv_capacity, max_batch, token_budget, chunked)
    return _results(arrivals, first, finish, trace.outputs)
