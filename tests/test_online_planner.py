"""The online planner: its choice is the cheapest (prefill, decode) count the simulator says meets the SLOs for the
observed workload; down-scaling waits for agreement and cooldowns hold; its latency model follows the step times
the instances report (live calibration); on a running cluster a step change of load adds a decode instance and,
once the load falls back, removes it, with every request finishing with its reference tokens and every instance's
steps reaching the planner."""
import asyncio
import json
import time

import pytest
from prometheus_client import generate_latest

from cluster_helpers import config, references, wait_for_idle, write_checkpoint
from hf_checkpoints import random_prompts
from splitserve.cluster.cluster import Cluster
from splitserve.cluster.config import config_from_dict
from splitserve.cluster.metrics import ServerMetrics
from splitserve.cluster.online_planner import OnlinePlannerLoop
from splitserve.placement.latency import ScaledLatency
from splitserve.placement.metrics import SLO
from splitserve.placement.parallel import Parallel
from splitserve.placement.simulator import simulate_disaggregated
from splitserve.placement.workload import Trace
from splitserve.workers.sampling_params import SamplingParams

OUTPUT = 16
# A synthetic fitted profile in which one decode instance holds about 5 req/s of 16-token outputs within a 60 ms
# TPOT, and prefill is never the bottleneck: the load steps of the test then cross exactly one decision boundary.
PROFILE = {"format": "splitserve-profile/1", "model": "tiny", "hardware": "cpu", "unit": "ms", "entries": [
    {"tp": 1, "pp": 1, "sp": 1, "sp_algorithm": "none", "prefill": {"a": 2.0, "b": 0.01, "c": 0.0},
     "decode": {"a": 10.0, "b": 0.0, "c": 10.0}}]}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint("llama", tmp_path_factory.mktemp("llama"), seed=37)


@pytest.fixture(scope="module")
def planner_options(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    path.write_text(json.dumps(PROFILE))
    # The synthetic profile stands for the machine here (the tiny model's real steps are far shorter), so the
    # live calibration is off; it is tested on its own below.
    return {"ttft_s": 1.0, "tpot_s": 0.06, "attainment": 0.9, "interval_s": 1.0, "window_s": 4.0,
            "cooldown_s": 2.0, "down_intervals": 2, "min_requests": 3, "max_prefill": 1, "max_decode": 2,
            "profile": str(path), "requests": 200, "live_calibration": False}


def _planner(ckpt, options) -> OnlinePlannerLoop:
    cfg = config_from_dict(config(ckpt, placement={"online": options}))
    return OnlinePlannerLoop(cfg, str(ckpt), scaler=None, cluster_devices=8)


def _simulated(planner, rate, lengths, counts) -> float:
    """The simulator run directly (not through the planner) on a trace of these lengths."""
    trace = Trace(tuple(i + 1.0 for i in range(len(lengths))), tuple(p for p, _ in lengths),
                  tuple(o for _, o in lengths))
    result = simulate_disaggregated(planner.latency, trace, rate, Parallel(), Parallel(), *counts,
                                    kv_capacity=1 << 20)
    return result.attainment(SLO(1.0, 0.06, 0.9))


def test_choice_is_the_cheapest_count_the_simulator_accepts(ckpt, planner_options):
    planner = _planner(ckpt, planner_options)
    lengths = [(20 + 3 * i, OUTPUT) for i in range(30)]
    low, low_pred = planner.choose(1.5, lengths, 1 << 20)
    high, high_pred = planner.choose(8.0, lengths, 1 << 20)
    assert low == (1, 1) and high == (1, 2)
    assert high_pred[(1, 1)] < 0.9 <= high_pred[(1, 2)] and low_pred[(1, 1)] >= 0.9
    many = [(p, o) for p, o in lengths for _ in range(7)]  # a longer trace of the same lengths
    assert _simulated(planner, 8.0, many, (1, 1)) < 0.9 <= _simulated(planner, 8.0, many, (1, 2))
    assert _simulated(planner, 1.5, many, (1, 1)) >= 0.9


def test_down_scaling_waits_for_agreement_and_cooldown(ckpt, planner_options):
    planner = _planner(ckpt, planner_options)
    now = time.monotonic()
    for _ in range(30):
        planner.observed.arrived(now)
        planner.observed.finished(now, 30, OUTPUT)
    planner.observed.started = now - 10
    # ~10 req/s observed with 2 decode instances: hold.
    assert planner.decide(now, (1, 2), 1 << 20).action == "hold"
    # The load falls: the target drops to 1 decode, but only the second agreeing interval acts.
    planner.observed.arrivals.clear()
    planner.observed.arrivals.extend([now] * 4)
    first, second = planner.decide(now, (1, 2), 1 << 20), planner.decide(now, (1, 2), 1 << 20)
    assert (first.target, first.action) == ((1, 1), "wait") and second.action == "scale"
    planner._last_change = now
    assert planner.decide(now + 1, (1, 1), 1 << 20).action == "hold"
    planner.observed.arrivals.extend([now] * 40)
    assert planner.decide(now + 1, (1, 1), 1 << 20).action == "cooldown"  # up again, but within the cooldown
    assert planner.decide(now + 3, (1, 1), 1 << 20).action == "scale"
    # A window without arrivals: down to the minimum, once the intervals agree.
    idle = now + 100
    assert planner.decide(idle, (1, 2), 1 << 20).action == "wait"
    decision = planner.decide(idle, (1, 2), 1 << 20)
    assert (decision.target, decision.action) == ((1, 1), "scale")


def _observe(planner, now, rate_requests=30):
    for _ in range(rate_requests):
        planner.observed.arrived(now)
        planner.observed.finished(now, 30, OUTPUT)
    planner.observed.started = now - 10


def test_live_calibration_scales_the_latency_model_to_the_timed_steps(ckpt, planner_options):
    planner = _planner(ckpt, planner_options | {"live_calibration": True, "calibration_steps": 40})
    base, decode_par, prefill_par = planner.base_latency, planner.decode_par, planner.prefill_par
    now = time.monotonic()
    _observe(planner, now, 8)  # 2 req/s over the 4 s window: one decode instance meets the SLOs as profiled
    assert planner.decide(now, (1, 1), 1 << 20).target == (1, 1) and planner.scales == (1.0, 1.0)
    # Too few decode steps: the decode factor waits; the prefill batches (a fifth as many needed) already count.
    prefill = [(1.5 * base.prefill_time([n], prefill_par, [0]), (n,), (0,)) for n in range(20, 30)]
    decode = [(2.0 * base.decode_time(b, 40 * b, decode_par), b, 40 * b) for b in range(1, 11)]
    planner.observed.stepped(now, "prefill", prefill)
    planner.observed.stepped(now, "decode", decode)
    assert planner.calibrate(now) == pytest.approx((1.5, 1.0))
    # Decode steps twice as long as the profile says (a slower machine than the one profiled): at the same load
    # one decode instance no longer meets the TPOT target, and the planner asks for two.
    planner.observed.stepped(now, "decode", decode * 3)
    decision = planner.decide(now, (1, 1), 1 << 20)
    assert decision.scales == pytest.approx((1.5, 2.0)) and decision.target == (1, 2)
    assert isinstance(planner.latency, ScaledLatency)
    lengths = [(30, OUTPUT)] * 200
    scaled = ScaledLatency(base, 1.5, 2.0)
    assert scaled.decode_time(4, 160, decode_par) == pytest.approx(2 * base.decode_time(4, 160, decode_par))
    rate = planner.observed.snapshot(now)[0]
    direct = simulate_disaggregated(scaled, planner.trace(lengths), rate, Parallel(), Parallel(), 1, 1,
                                    kv_capacity=1 << 20, max_batch=planner.config.engine.max_num_seqs,
                                    token_budget=planner.config.engine.max_num_batched_tokens)
    assert decision.predicted[(1, 1)] == pytest.approx(direct.attainment(planner.slo))
    assert decision.predicted[(1, 1)] < 0.9 <= decision.predicted[(1, 2)]
    # Exported with the decision.
    metrics = ServerMetrics("tiny", lambda: {"instances": {}, "planner": planner.stats()})
    text = generate_latest(metrics.registry).decode()
    assert 'splitserve_planner_latency_scale{model_name="tiny",phase="decode"} 2.0' in text
    # A window without steps (the steps aged out) keeps the last factors: idling says nothing about the machine.
    later = now + 100
    assert planner.calibrate(later) == pytest.approx((1.5, 2.0))
    # Off: the profile as it is, whatever was timed.
    off = _planner(ckpt, planner_options)
    off.observed.stepped(now, "decode", decode * 5)
    assert off.calibrate(now) == (1.0, 1.0) and off.latency is off.base_latency


@pytest.mark.parametrize("field, value, message", [
    ("live_calibration", "yes", "'placement.online.live_calibration' must be true or false"),
    ("calibration_steps", 0, "placement.online.calibration_steps"),
])
def test_calibration_options_are_validated(ckpt, planner_options, field, value, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(config(ckpt, placement={"online": planner_options | {field: value}}))


def test_step_change_of_load_scales_decode_up_then_down(ray_runtime, ckpt, planner_options):
    pool = random_prompts([10 + 4 * i for i in range(10)], seed=12)
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT, min_tokens=OUTPUT)
    expected = references(ckpt, pool, [params] * len(pool))
    phases = [(1.5, 4.0), (8.0, 5.0), (1.5, 9.0)]  # (req/s, seconds)
    with Cluster(config(ckpt, placement={"online": planner_options})) as cluster:
        async def drive():
            tasks, start, t, k = [], time.monotonic(), 0.0, 0
            for rate, seconds in phases:
                end = t + seconds
                while t < end:
                    t += 1.0 / rate
                    await asyncio.sleep(max(0.0, start + t - time.monotonic()))
                    tasks.append(asyncio.ensure_future(collect(k % len(pool))))
                    k += 1
            return await asyncio.gather(*tasks)

        async def collect(i):
            tokens, last = [], None
            async for chunk in cluster.stream(pool[i], params):
                tokens += chunk.token_ids
                last = chunk
            return i, tokens, last.error

        results = asyncio.run(drive())
        assert [e for _, _, e in results] == [None] * len(results)
        assert all(tokens == expected[i] for i, tokens, _ in results)
        deadline = time.monotonic() + 30
        while len([n for n in cluster.instances if n.startswith("decode-")]) != 1:
            assert time.monotonic() < deadline, "the planner never scaled back down"
            time.sleep(0.2)
        actions = [(d.target, d.action) for d in cluster.planner.decisions]
        assert ((1, 2), "scale") in actions and ((1, 1), "scale") in actions
        up = next(d for d in cluster.planner.decisions if d.action == "scale" and d.target == (1, 2))
        assert up.predicted[(1, 1)] < 0.9 <= up.predicted[(1, 2)]
        planner_stats = cluster.stats()["planner"]
        assert planner_stats["target"] == {"prefill": 1, "decode": 1} and "p1d2" in planner_stats["predicted"]
        # Every instance's timed steps reached the planner, shaped as the calibration reads them.
        decode_steps = list(cluster.planner.observed.steps["decode"])
        prefill_steps = list(cluster.planner.observed.steps["prefill"])
        assert len(decode_steps) >= len(results) and len(prefill_steps) >= 1
        assert all(t > 0 and 1 <= b <= len(results) and c >= b for _, (t, b, c) in decode_steps)
        assert all(t > 0 and len(q) == len(p) >= 1 and min(q) >= 1 for _, (t, q, p) in prefill_steps)
        wait_for_idle(cluster)
