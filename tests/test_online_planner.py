"""The online planner: its choice is the cheapest (prefill, decode) count the simulator says meets the SLOs for the
observed workload; down-scaling waits for agreement and cooldowns hold; on a running cluster a step change of load
adds a decode instance and, once the load falls back, removes it, with every request finishing with its reference
tokens."""
import asyncio
import json
import time

import pytest

from cluster_helpers import config, references, wait_for_idle, write_checkpoint
from hf_checkpoints import random_prompts
from splitserve.cluster.cluster import Cluster
from splitserve.cluster.config import config_from_dict
from splitserve.cluster.online_planner import OnlinePlannerLoop
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
    return {"ttft_s": 1.0, "tpot_s": 0.06, "attainment": 0.9, "interval_s": 1.0, "window_s": 4.0,
            "cooldown_s": 2.0, "down_intervals": 2, "min_requests": 3, "max_prefill": 1, "max_decode": 2,
            "profile": str(path), "requests": 200}


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
        wait_for_idle(cluster)
