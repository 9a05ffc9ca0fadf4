"""Discrete-event simulation of one prefill and one decode instance that share a host's cores (CPU serving), with
the couplings the real leaders have there: each phase computes more slowly while the other computes, a request's
KV reservation on the decode leader waits for the step in flight, and the prefill leader waits for its KV pushes
before it starts its next batch. With all of those off it reproduces `simulate_prefill` then `simulate_decode`."""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass
from collections.abc import Sequence

from splitserve.placement.latency import LatencyModel
from splitserve.placement.parallel import Parallel

INF = math.inf


@dataclass(frozen=True)
class SharedHost:
    """How the two instances of a 1P1D deployment on one host's cores slow each other down."""

    decode_slowdown: float = 0.0   # a decode step runs 1/(1 + s) as fast while a prefill batch computes
    prefill_slowdown: float = 0.0  # a prefill batch runs 1/(1 + s) as fast while a decode step computes
    reserve_waits_for_step: bool = False  # dispatch reserves KV on the decode leader between its steps
    push_holds_prefill: bool = False      # the prefill leader starts its next batch once its KV pushes are done

    def __post_init__(self):
        for name in ("decode_slowdown", "prefill_slowdown"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name}: must be >= 0, got {value!r}")


class _Work:
    """A forward in progress: its remaining work in seconds at full speed, progressed at the current speed."""

    __slots__ = ("remaining", "speed")

    def __init__(self):
        self.remaining = INF  # INF: nothing computing
        self.speed = 1.0

    @property
    def active(self) -> bool:
        return self.remaining != INF

    def done_at(self, now: float) -> float:
        return now + self.remaining / self.speed if self.active else INF

    def advance(self, dt: float) -> None:
        if self.active:
            self.remaining = max(0.0, self.remaining - dt * self.speed)  # the one completing is ended by its caller


def simulate_shared_host(latency: LatencyModel, prefill_par: Parallel, decode_par: Parallel,
                         arrivals: Sequence[float], prompts: Sequence[int], outputs: Sequence[int],
                         host: SharedHost = SharedHost(), handoff_s: float = 0.0, kv_capacity: int = 1 << 40,
                         max_batch: int = 256, token_budget: int = 4096,
                         usage: dict | None = None) -> tuple[list[float], list[float]]:
    """(first-token times, last-token times) of one prefill and one decode instance (no PP) on shared cores.

    Prefill: FCFS batches up to `token_budget` prompt tokens (a longer prompt runs alone). A request's KV is ready on
    the decode side `handoff_s` after its first token; with `push_holds_prefill` the prefill instance is busy until
    then. Decode: continuous batching of up to `max_batch` requests whose prompt + output fit `kv_capacity` (a
    request that never fits gets INF), admitted before each step, `outputs - 1` steps each.

    `usage`, if given, receives each instance's busy time as its leader counts it (`InstanceInfo.busy_seconds`:
    forwards at their shared-core speed, and the prefill leader's wait for its pushes) and its step count:
    prefill_busy_s, prefill_batches, decode_busy_s, decode_steps."""
    if prefill_par.pp != 1 or decode_par.pp != 1:
        raise ValueError("parallel: the shared-host simulation models instances without pipeline parallelism")
    n = len(arrivals)
    first = [INF] * n
    finish = [INF] * n
    prefill_queue: deque[int] = deque()
    reserving: list[int] = []  # arrived while a decode step ran: their reservation waits for its end
    batch: list[int] = []  # the prefill batch computing
    hold_until = -INF  # the prefill leader waits for its pushes until then
    ready: list[tuple[float, int]] = []  # (KV ready on the decode side, request)
    waiting: deque[int] = deque()
    running: list[tuple[int, int]] = []  # (step at which it finishes, request)
    state = {"steps": 0, "batch": 0, "context": 0, "reserved": 0}
    busy = {"prefill_busy_s": 0.0, "prefill_batches": 0, "decode_busy_s": 0.0, "decode_steps": 0}
    started = {"prefill": 0.0, "decode": 0.0}
    prefill, decode = _Work(), _Work()

    def set_speeds() -> None:
        prefill.speed = 1.0 / (1.0 + host.prefill_slowdown) if decode.active else 1.0
        decode.speed = 1.0 / (1.0 + host.decode_slowdown) if prefill.active else 1.0

    def start_prefill(now: float) -> None:
        if prefill.active or not prefill_queue or now < hold_until:
            return
        batch[:] = [prefill_queue.popleft()]
        tokens = prompts[batch[0]]
        while prefill_queue and tokens + prompts[prefill_queue[0]] <= token_budget:
            tokens += prompts[prefill_queue[0]]
            batch.append(prefill_queue.popleft())
        prefill.remaining = latency.prefill_time([prompts[r] for r in batch], prefill_par)
        started["prefill"] = now

    def start_step() -> None:
        s = state
        while (waiting and s["batch"] < max_batch
               and s["reserved"] + prompts[waiting[0]] + outputs[waiting[0]] <= kv_capacity):
            r = waiting.popleft()
            s["reserved"] += prompts[r] + outputs[r]
            s["context"] += prompts[r] + 1
            s["batch"] += 1
            heapq.heappush(running, (s["steps"] + outputs[r] - 1, r))
        decode.remaining = latency.decode_time(s["batch"], s["context"], decode_par) if s["batch"] else INF
        started["decode"] = now

    def finish_step(now: float) -> None:
        s = state
        s["steps"] += 1
        s["context"] += s["batch"]
        busy["decode_busy_s"] += now - started["decode"]
        busy["decode_steps"] += 1
        while running and running[0][0] <= s["steps"]:
            _, r = heapq.heappop(running)
            finish[r] = now
            s["batch"] -= 1
            s["context"] -= prompts[r] + outputs[r]
            s["reserved"] -= prompts[r] + outputs[r]

    def finish_prefill(now: float) -> None:
        nonlocal hold_until
        for r in batch:
            first[r] = now
            if outputs[r] <= 1:
                finish[r] = now
            elif prompts[r] + outputs[r] <= kv_capacity:
                heapq.heappush(ready, (now + handoff_s, r))
        batch.clear()
        prefill.remaining = INF
        busy["prefill_busy_s"] += now - started["prefill"] + (handoff_s if host.push_holds_prefill else 0.0)
        busy["prefill_batches"] += 1
        if host.push_holds_prefill:
            hold_until = now + handoff_s

    now, i = 0.0, 0
    while True:
        next_arrival = arrivals[i] if i < n else INF
        next_ready = ready[0][0] if ready else INF
        next_hold = hold_until if hold_until > now and prefill_queue and not prefill.active else INF
        prefill_done, decode_done = prefill.done_at(now), decode.done_at(now)
        t = min(next_arrival, next_ready, next_hold, prefill_done, decode_done)
        if t == INF:
            break
        prefill.advance(t - now)
        decode.advance(t - now)
        now = t
        # Completions first, so that requests arriving at the same instant can join what starts next.
        if decode_done == t:
            decode.remaining = INF
            finish_step(now)
            prefill_queue.extend(reserving)  # the leader takes the waiting reservations between steps
            reserving.clear()
        if prefill_done == t:
            finish_prefill(now)
        while i < n and arrivals[i] <= now:
            if host.reserve_waits_for_step and decode.active:
                reserving.append(i)
            else:
                prefill_queue.append(i)
            i += 1
        while ready and ready[0][0] <= now:
            waiting.append(heapq.heappop(ready)[1])
        start_prefill(now)
        if not decode.active:
            start_step()
            if not decode.active and reserving:  # nothing to step: the reservations are taken at once
                prefill_queue.extend(reserving)
                reserving.clear()
                start_prefill(now)
        set_speeds()
    if usage is not None:
        usage.update(busy)
    return first, finish
