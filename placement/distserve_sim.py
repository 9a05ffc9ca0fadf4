"""A simulator of one prefill instance feeding one decode instance with the semantics of DistServe's own planner
simulator (`simdistserve` in the DistServe repository), so that its placement search can be replayed on its published
profiles. It differs from `simulator.py` where DistServe's differs from ours:

- a pipeline is `pp` workers in a ring, each with its own queue; a batch moves to the next stage when this stage
  is done with it, so up to `pp` batches are in flight; one stage takes 1/pp of the profiled TP time, plus `pp` ms
  on a prefill stage;
- the first stage adds a fixed 2 ms plus 0.1 ms per thousand context tokens to every step (their Ray overhead);
- prefill batches every queued prompt (FCFS) while their tokens fit the instance's KV-cache tokens;
- decode batches queued requests (FCFS) while their context fits 50,000 tokens (whatever the instance's KV
  capacity) with no preemption; a request finishes after `output` rounds through the ring;
- KV transfer costs nothing; TTFT ends when the last prefill stage finishes, TPOT is the time from there to the
  last round divided by the output length.

Times are in milliseconds, as in the profiles.
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass
from typing import Sequence

from splitserve.placement.percentiles import percentile

STAGE0_OVERHEAD_MS = 2.0
STAGE0_OVERHEAD_MS_PER_TOKEN = 1e-4
PREFILL_STAGE_MS = 1.0  # per stage of the pipeline, on every prefill stage


@dataclass(frozen=True)
class PhaseProfile:
    """One model at one TP degree: DistServe's fitted step times (ms) and the instance's KV-cache tokens."""

    prefill: tuple[float, float, float]  # a + b·Σl + c·Σl²
    decode_small: tuple[float, float, float]  # a + b·Σ(ctx + 1) + c·batch, batch < large_batch_from
    decode_large: tuple[float, float, float]
    large_batch_from: int
    max_tokens: int
    # Their simulator caps a decode batch at a fixed 50,000 context tokens whatever the instance's memory (its code
    # marks this a hack in place of the KV tokens x 0.9); `decode_batch_tokens` lets the search try the latter.
    decode_batch_tokens: int = 50_000


def _overhead(context_tokens: int) -> float:
    return STAGE0_OVERHEAD_MS + STAGE0_OVERHEAD_MS_PER_TOKEN * context_tokens


def simulate_prefill_ring(profile: PhaseProfile, pp: int, arrivals: Sequence[float], prompts: Sequence[int]
                          ) -> list[float]:
    """When each request's prefill leaves the last stage (ms). Stage 0 forms the batches; a later stage runs the
    batches in the order they reach it."""
    a, b, c = profile.prefill
    done = [0.0] * len(arrivals)
    stage_free = [0.0] * pp
    queue: deque[int] = deque()
    nxt, n = 0, len(arrivals)
    while nxt < n or queue:
        now = stage_free[0] if queue else max(stage_free[0], arrivals[nxt])
        while nxt < n and arrivals[nxt] <= now:
            queue.append(nxt)
            nxt += 1
        batch, tokens, budget = [], 0, profile.max_tokens
        while queue and prompts[queue[0]] <= budget:
            r = queue.popleft()
            batch.append(r)
            budget -= prompts[r]
            tokens += prompts[r]
        if not batch:
            raise ValueError(f"prefill: a {prompts[queue[0]]}-token prompt exceeds the instance's "
                             f"{profile.max_tokens} KV tokens")
        stage_ms = (a + b * tokens + c * sum(prompts[r] ** 2 for r in batch)) / pp + PREFILL_STAGE_MS * pp
        t = now + stage_ms + _overhead(tokens)
        stage_free[0] = t
        for k in range(1, pp):
            t = max(t, stage_free[k]) + stage_ms
            stage_free[k] = t
        for r in batch:
            done[r] = t
    return done


class _DecodeRing:
    """`pp` decode workers in a ring. A request enters stage 0's queue when its prefill is done and leaves after
    `output` rounds; each worker, when free, takes what its queue holds (FCFS) up to the batch token limit.

    Queues hold batches (requests, their total context) so a batch that passes a stage whole costs O(1)."""

    def __init__(self, profile: PhaseProfile, pp: int, prompts: Sequence[int], outputs: Sequence[int],
                 give_up: tuple[float, int] | None = None):
        self.profile, self.pp, self.prompts, self.outputs = profile, pp, prompts, outputs
        self.context = list(prompts)  # prompt + rounds done
        self.queues: list[deque[tuple[list[int], int]]] = [deque() for _ in range(pp)]
        self.busy = [False] * pp
        self.ready: Sequence[float] = ()
        self.finish = [0.0] * len(prompts)
        self.events: list = []  # (time, order, stage, batch, context): a stage finishes a step
        self.order = 0
        # Stop once more than `allowed` requests have a TPOT of at least `bound` ms: the percentile has failed.
        self.bound, self.allowed = give_up if give_up else (math.inf, len(prompts))
        self.failed = 0

    def step_ms(self, stage: int, size: int, context: int) -> float:
        p = self.profile
        a, b, c = p.decode_large if size >= p.large_batch_from else p.decode_small
        ms = (a + b * (context + size) + c * size) / self.pp
        return ms + _overhead(context) if stage == 0 else ms

    def start(self, stage: int, now: float) -> None:
        queue = self.queues[stage]
        batch: list[int] = []
        context, budget = 0, self.profile.decode_batch_tokens
        while queue:
            members, ctx = queue[0]
            if ctx + len(members) <= budget:  # the whole queued batch fits
                queue.popleft()
                batch += members
                context += ctx
                budget -= ctx + len(members)
                continue
            taken = 0
            for r in members:  # FCFS inside it up to the limit, the rest stays queued
                if self.context[r] + 1 > budget:
                    break
                budget -= self.context[r] + 1
                context += self.context[r]
                ctx -= self.context[r]
                taken += 1
            batch += members[:taken]
            queue[0] = (members[taken:], ctx)
            break
        if not batch:
            return
        self.busy[stage] = True
        self.order += 1
        heapq.heappush(self.events, (now + self.step_ms(stage, len(batch), context), self.order, stage, batch,
                                     context))

    def put(self, stage: int, members: list[int], context: int, now: float) -> None:
        if members:
            self.queues[stage].append((members, context))
        if not self.busy[stage]:
            self.start(stage, now)

    def finish_step(self, now: float, stage: int, batch: list[int], context: int) -> None:
        self.busy[stage] = False
        if stage < self.pp - 1:
            self.put(stage + 1, batch, context, now)
        else:
            going_on, context = [], 0
            for r in batch:
                self.context[r] += 1
                if self.context[r] - self.prompts[r] >= self.outputs[r]:
                    self.finish[r] = now
                    if (now - self.ready[r]) / self.outputs[r] >= self.bound:
                        self.failed += 1
                else:
                    going_on.append(r)
                    context += self.context[r]
            self.put(0, going_on, context, now)
        if not self.busy[stage]:
            self.start(stage, now)

    def run(self, ready: Sequence[float]) -> list[float] | None:
        """Each request's last round (ms), or None once the give-up bound is passed."""
        self.ready = ready
        order = sorted(range(len(ready)), key=ready.__getitem__)
        i = 0
        while i < len(order) or self.events:
            if self.failed > self.allowed:
                return None
            if self.events and (i == len(order) or self.events[0][0] <= ready[order[i]]):
                now, _, stage, batch, context = heapq.heappop(self.events)
                self.finish_step(now, stage, batch, context)
                continue
            now = ready[order[i]]
            arrived = []
            while i < len(order) and ready[order[i]] == now:
                arrived.append(order[i])
                i += 1
            self.put(0, arrived, sum(self.prompts[r] for r in arrived), now)
        return None if self.failed > self.allowed else self.finish


def _most_at_or_over(n: int, q: float) -> int:
    """How many of n values may be at or over a bound while their q-th percentile (linear interpolation) can still
    be under it: the value at rank floor((n - 1)·q/100) must be under it."""
    return n - 1 - math.floor((n - 1) * q / 100)


def simulate_pair(prefill: PhaseProfile, prefill_pp: int, decode: PhaseProfile, decode_pp: int,
                  arrivals: Sequence[float], prompts: Sequence[int], outputs: Sequence[int]
                  ) -> tuple[list[float], list[float]]:
    """Per-request TTFT and TPOT (ms) of one prefill instance feeding one decode instance."""
    first = simulate_prefill_ring(prefill, prefill_pp, arrivals, prompts)
    last = _DecodeRing(decode, decode_pp, prompts, outputs).run(first)
    ttft = [f - a for f, a in zip(first, arrivals)]
    tpot = [(e - f) / o for f, e, o in zip(first, last, outputs)]
    return ttft, tpot


def pair_meets(prefill: PhaseProfile, prefill_pp: int, decode: PhaseProfile, decode_pp: int,
               arrivals: Sequence[float], prompts: Sequence[int], outputs: Sequence[int], ttft_ms: float,
               tpot_ms: float, q: float) -> bool:
    """Whether the q-th percentiles of TTFT and of TPOT are both strictly under their bounds (DistServe's test),
    stopping as soon as the answer is known: decode is not simulated when TTFT already fails, and stops once too
    many requests have finished over the TPOT bound."""
    first = simulate_prefill_ring(prefill, prefill_pp, arrivals, prompts)
    if percentile([f - a for f, a in zip(first, arrivals)], q) >= ttft_ms:
        return False
    ring = _DecodeRing(decode, decode_pp, prompts, outputs, (tpot_ms, _most_at_or_over(len(prompts), q)))
    last = ring.run(first)
    if last is None:
        return False
    return percentile([(e - f) / o for f, e, o in zip(first, last, outputs)], q) < tpot_ms
