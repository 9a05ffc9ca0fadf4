"""The online planner: every interval it takes the arrival rate and the prompt/output lengths observed over a
window, simulates each (prefill, decode) instance count within the bounds for the current instance layouts with
the placement simulator, and scales towards the cheapest count that meets the SLOs at the attainment target.
Scaling up acts on the first interval that asks for it; scaling down waits for `down_intervals` agreeing intervals;
no change follows another within `cooldown_s`. Every decision is logged and kept for the metrics."""
from __future__ import annotations

import asyncio
import collections
import logging
import random
import statistics
import time
from dataclasses import dataclass, field

from splitserve.cluster.config import ClusterConfig, OnlinePlanner as PlannerConfig
from splitserve.placement.hardware import ClusterSpec, get_hardware
from splitserve.placement.latency import AnalyticLatency, ScaledLatency
from splitserve.placement.metrics import SLO
from splitserve.placement.parallel import Parallel
from splitserve.placement.profile import Profile, ProfileLatency
from splitserve.placement.simulator import simulate_disaggregated
from splitserve.placement.specs import load_model
from splitserve.placement.workload import Trace

log = logging.getLogger(__name__)


@dataclass
class Decision:
    at: float  # time.monotonic()
    rate: float  # observed requests/s
    current: tuple[int, int]  # (prefill, decode) instances
    target: tuple[int, int]  # the cheapest count meeting the SLOs (or the largest allowed)
    predicted: dict[tuple[int, int], float] = field(default_factory=dict)  # attainment per candidate
    action: str = "hold"  # hold | scale | wait (down, not yet agreed) | cooldown
    scales: tuple[float, float] = (1.0, 1.0)  # the latency model's (prefill, decode) calibration it used


class Observations:
    """Arrivals, finished requests' lengths and timed instance steps over a sliding window."""

    MAX_STEPS = 20_000  # per role: the newest steps within the window

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.started = time.monotonic()
        self.arrivals: collections.deque[float] = collections.deque()
        self.lengths: collections.deque[tuple[float, int, int]] = collections.deque()
        self.steps = {role: collections.deque(maxlen=self.MAX_STEPS) for role in ("prefill", "decode")}

    def stepped(self, now: float, role: str, samples) -> None:
        """Steps an instance of `role` timed: decode (seconds, batch, total context), prefill (seconds, chunk
        lengths, cached prefixes)."""
        if role in self.steps:
            self.steps[role].extend((now, s) for s in samples)

    def recent_steps(self, role: str, now: float) -> list[tuple]:
        steps = self.steps[role]
        while steps and steps[0][0] < now - self.window_s:
            steps.popleft()
        return [s for _, s in steps]

    def arrived(self, now: float) -> None:
        self.arrivals.append(now)

    def finished(self, now: float, prompt: int, output: int) -> None:
        self.lengths.append((now, prompt, output))

    def snapshot(self, now: float) -> tuple[float, list[tuple[int, int]]]:
        """(requests/s over the window, (prompt, output) lengths finished within it)."""
        start = now - self.window_s
        while self.arrivals and self.arrivals[0] < start:
            self.arrivals.popleft()
        while self.lengths and self.lengths[0][0] < start:
            self.lengths.popleft()
        span = max(1e-3, min(self.window_s, now - self.started))  # a young cluster has seen less than a window
        return len(self.arrivals) / span, [(p, o) for _, p, o in self.lengths]


class OnlinePlannerLoop:
    def __init__(self, config: ClusterConfig, model_dir: str, scaler, cluster_devices: int):
        self.options: PlannerConfig = config.online_planner
        self.config, self.scaler = config, scaler
        opts = self.options
        self.slo = SLO(opts.ttft_s, opts.tpot_s, opts.attainment)
        model = load_model(model_dir, config.dtype)
        hardware = opts.hardware or ("cpu" if config.device == "cpu" else "H100-80GB")
        latency = AnalyticLatency(model, ClusterSpec(1, max(1, cluster_devices), get_hardware(hardware)))
        self.base_latency = ProfileLatency(Profile.load(opts.profile), fallback=latency) if opts.profile else latency
        self.latency = self.base_latency  # with the live calibration's factors once steps have been timed
        self.scales = (1.0, 1.0)  # (prefill, decode): timed / modelled step, medians over the window
        p = config.prefill
        self.prefill_par = Parallel(tp=p.tp, sp=p.sp, sp_algorithm=p.sp_algorithm if p.sp > 1 else "none")
        self.decode_par = Parallel(tp=config.decode.tp)
        self.observed = Observations(opts.window_s)
        self.decisions: collections.deque[Decision] = collections.deque(maxlen=100)
        self._down_votes = 0
        self._last_change = -float("inf")
        self.running = False

    # -------------------------------------------------------------------------------------- the decision
    def trace(self, lengths: list[tuple[int, int]]) -> Trace:
        """Poisson arrivals at rate 1 with the observed lengths resampled (seeded: the same observation always
        gives the same trace)."""
        rng = random.Random(self.options.seed)
        arrivals, now = [], 0.0
        for _ in range(self.options.requests):
            now += rng.expovariate(1.0)
            arrivals.append(now)
        picks = [lengths[rng.randrange(len(lengths))] for _ in range(self.options.requests)]
        return Trace(tuple(arrivals), tuple(p for p, _ in picks), tuple(max(1, o) for _, o in picks))

    def predict(self, rate: float, trace: Trace, counts: tuple[int, int], kv_tokens: int) -> float:
        # A decode instance runs at most max_num_seqs sequences at once, whatever its KV could hold.
        result = simulate_disaggregated(self.latency, trace, rate, self.prefill_par, self.decode_par, counts[0],
                                        counts[1], kv_capacity=kv_tokens, max_batch=self.config.engine.max_num_seqs,
                                        token_budget=self.config.engine.max_num_batched_tokens)
        return result.attainment(self.slo)

    def choose(self, rate: float, lengths: list[tuple[int, int]], kv_tokens: int) -> tuple[tuple[int, int], dict]:
        """The cheapest (prefill, decode) within the bounds whose predicted attainment meets the target (ties:
        higher attainment), else the largest; with every candidate's prediction."""
        o = self.options
        trace = self.trace(lengths)
        predicted = {(n, m): self.predict(rate, trace, (n, m), kv_tokens)
                     for n in range(o.min_prefill, o.max_prefill + 1) for m in range(o.min_decode, o.max_decode + 1)}

        def cost(c):
            return c[0] * self.prefill_par.devices + c[1] * self.decode_par.devices

        meeting = [c for c, a in predicted.items() if a >= self.slo.attainment]
        if meeting:
            return min(meeting, key=lambda c: (cost(c), -predicted[c], c)), predicted
        return (o.max_prefill, o.max_decode), predicted

    def calibrate(self, now: float) -> tuple[float, float]:
        """The latency model's factor per phase: the median of timed / modelled over the steps of the window, for a
        phase with enough of them (else its last factor: an idle minute says nothing about the machine)."""
        if not self.options.live_calibration:
            return self.scales
        base, need = self.base_latency, self.options.calibration_steps
        decode = [t / base.decode_time(b, c, self.decode_par) for t, b, c in self.observed.recent_steps("decode", now)]
        prefill = [t / base.prefill_time(list(q), self.prefill_par, list(p))
                   for t, q, p in self.observed.recent_steps("prefill", now)]
        ps, ds = self.scales
        if len(prefill) >= max(1, need // 5):
            ps = statistics.median(prefill)
        if len(decode) >= need:
            ds = statistics.median(decode)
        if (ps, ds) != self.scales:
            self.scales = (ps, ds)
            self.latency = ScaledLatency(base, ps, ds)
        return self.scales

    def decide(self, now: float, current: tuple[int, int], kv_tokens: int) -> Decision | None:
        scales = self.calibrate(now)
        rate, lengths = self.observed.snapshot(now)
        if rate == 0:  # nothing arrived for a whole window: the fewest instances will do
            target, predicted = (self.options.min_prefill, self.options.min_decode), {}
        elif len(lengths) < self.options.min_requests:
            return None  # too little seen to simulate
        else:
            target, predicted = self.choose(rate, lengths, kv_tokens)
        decision = Decision(now, rate, current, target, predicted, scales=scales)
        # Only a change that removes instances and adds none waits for agreement; anything that adds acts at once.
        down = target[0] <= current[0] and target[1] <= current[1] and target != current
        self._down_votes = self._down_votes + 1 if down else 0
        if target == current:
            decision.action = "hold"
        elif now - self._last_change < self.options.cooldown_s:
            decision.action = "cooldown"
        elif down and self._down_votes < self.options.down_intervals:
            decision.action = "wait"
        else:
            decision.action = "scale"
        self.decisions.append(decision)
        return decision

    # ----------------------------------------------------------------------------------------- the loop
    async def run(self, counts, kv_tokens) -> None:
        """`counts()` -> current (prefill, decode); `kv_tokens()` -> one decode instance's KV capacity in tokens."""
        self.running = True
        while self.running:
            await asyncio.sleep(self.options.interval_s)
            current = counts()
            decision = await asyncio.to_thread(self.decide, time.monotonic(), current, kv_tokens())
            if decision is None:
                continue
            best = decision.predicted.get(decision.target, 0.0)
            log.info("planner: %.2f req/s observed; (prefill, decode) now %s predicted %.0f%%, target %s predicted "
                     "%.0f%%: %s (latency model x%.2f prefill, x%.2f decode)", decision.rate, current,
                     100 * decision.predicted.get(current, 0.0), decision.target, 100 * best, decision.action,
                     *decision.scales)
            if decision.action == "scale":
                try:
                    await self.scaler.scale({"prefill": decision.target[0], "decode": decision.target[1]})
                    self._last_change = time.monotonic()
                    self._down_votes = 0
                except Exception as e:  # e.g. no free GPUs: keep serving as is and try again next interval
                    log.error("planner: scaling to %s failed: %s", decision.target, e)

    def stats(self) -> dict:
        last = self.decisions[-1] if self.decisions else None
        return {"observed_rate": last.rate if last else 0.0,
                "target": {"prefill": last.target[0], "decode": last.target[1]} if last else {},
                "predicted": {f"p{n}d{m}": a for (n, m), a in last.predicted.items()} if last else {},
                "latency_scale": {"prefill": self.scales[0], "decode": self.scales[1]},
                "decisions": len(self.decisions)}
