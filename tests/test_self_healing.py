"""A rank killed with SIGKILL under load costs no request: its instance is marked dead, requests on it migrate
(prefill of prompt + streamed tokens) and finish with exactly the tokens of an uninterrupted run, the instance is
relaunched and rejoins, and every KV block returns to idle."""
import os
import signal
import threading
import time

import pytest

from cluster_helpers import config, references, streaming_load, wait_for_idle, write_checkpoint
from hf_checkpoints import random_prompts
from splitserve.cluster.cluster import Cluster
from splitserve.workers.sampling_params import SamplingParams

FAST = {"restart_backoff_s": 0.1, "health_interval_s": 0.5}
RECOVERY_S = 90  # a relaunch loads the model and links on a busy 2-core machine


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint("llama", tmp_path_factory.mktemp("llama"), seed=17)


@pytest.fixture(scope="module")
def load(ckpt):
    return streaming_load(ckpt)


def _kill(cluster, instance: str, rank: int) -> None:
    os.kill(cluster.rank_call(instance, rank, "pid"), signal.SIGKILL)


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def _states(cluster) -> dict:
    return {n: s["state"] for n, s in cluster.stats()["instances"].items()}


def _generate_with_kill(cluster, prompts, params, victim, when=("decoding",), at_least=3):
    """Runs the load; kills `victim` (instance, rank) once `at_least` requests are in one of the states `when`."""
    outputs, readiness = [], []
    worker = threading.Thread(target=lambda: outputs.extend(cluster.generate(prompts, params, timeout=300)))
    worker.start()
    _wait(lambda: sum(cluster.stats()["requests"].get(s, 0) for s in when) >= at_least, 60, f"{when} requests")
    killed_at = time.monotonic()
    _kill(cluster, *victim)
    while worker.is_alive() or not cluster.ready:
        readiness.append(cluster.ready)
        assert time.monotonic() - killed_at < RECOVERY_S + 60, "neither finished nor recovered in time"
        time.sleep(0.05)
    worker.join()
    return outputs, readiness, time.monotonic() - killed_at


def _check(cluster, outputs, expected, victim, restarts=1):
    assert [o.error for o in outputs] == [None] * len(expected)
    assert [o.token_ids for o in outputs] == expected
    _wait(lambda: all(s == "serving" for s in _states(cluster).values()), RECOVERY_S, "every instance serving")
    stats = cluster.stats()
    assert stats["instances"][victim[0]]["restarts"] == restarts
    assert stats["instances"][victim[0]]["last_error"]
    wait_for_idle(cluster, timeout=30)


def test_decode_leader_killed_1p1d(ray_runtime, ckpt, load):
    prompts, params, expected = load
    with Cluster(config(ckpt, fault_tolerance=FAST)) as cluster:
        outputs, readiness, _ = _generate_with_kill(cluster, prompts, params, ("decode-0", 0))
        _check(cluster, outputs, expected, ("decode-0", 0))
        assert False in readiness, "readiness never reported the missing decode instance"
        assert sum(o.metrics["migrations"] for o in outputs) >= 1
        assert cluster.stats()["migrations"]["instance_died"] >= 1
        # The relaunched instance serves like the first one.
        again = cluster.generate(prompts[:4], params[:4], timeout=120)
        assert [o.token_ids for o in again] == expected[:4]


def test_decode_leader_killed_three_times_2p2d(ray_runtime, ckpt, load):
    prompts, params, expected = load
    cfg = config(ckpt, prefill={"instances": 2}, decode={"instances": 2}, fault_tolerance=FAST)
    with Cluster(cfg) as cluster:
        for round_ in range(1, 4):
            outputs, _, _ = _generate_with_kill(cluster, prompts, params, ("decode-0", 0))
            _check(cluster, outputs, expected, ("decode-0", 0), restarts=round_)
        assert cluster.stats()["instances"]["decode-1"]["restarts"] == 0


def test_decode_tp_follower_killed(ray_runtime, ckpt, load):
    prompts, params, expected = load
    with Cluster(config(ckpt, decode={"tp": 2}, fault_tolerance=FAST)) as cluster:
        outputs, _, _ = _generate_with_kill(cluster, prompts, params, ("decode-0", 1))
        _check(cluster, outputs, expected, ("decode-0", 1))


@pytest.fixture(scope="module")
def long_prompts(ckpt):
    """Prompts long enough that a kill can land while they are being prefilled or pushed."""
    prompts = random_prompts([150 + 23 * i for i in range(12)], seed=8)
    params = [SamplingParams(temperature=0.0, max_tokens=30, min_tokens=30) for _ in prompts]
    return prompts, params, references(ckpt, prompts, params)


@pytest.mark.parametrize("layout, victim, when", [
    ({}, ("prefill-0", 0), ("prefilling",)),  # the prefill leader, mid-prefill
    ({"prefill": {"tp": 2}}, ("prefill-0", 1), ("prefilling", "transferring")),  # a rank pushing its KV share
    ({"prefill": {"sp": 2}}, ("prefill-0", 1), ("prefilling", "transferring")),  # a sequence-parallel rank
], ids=["prefill-leader", "prefill-tp-rank", "prefill-sp-rank"])
def test_prefill_rank_killed(ray_runtime, ckpt, long_prompts, layout, victim, when):
    prompts, params, expected = long_prompts
    with Cluster(config(ckpt, fault_tolerance=FAST, **layout)) as cluster:
        outputs, _, _ = _generate_with_kill(cluster, prompts, params, victim, when=when, at_least=1)
        _check(cluster, outputs, expected, victim)


def test_seeded_sampling_survives_migration(ray_runtime, ckpt, load):
    prompts, _, _ = load
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=100 + i, max_tokens=100, min_tokens=100)
              for i in range(len(prompts))]
    with Cluster(config(ckpt, fault_tolerance=FAST)) as cluster:
        uninterrupted = [o.token_ids for o in cluster.generate(prompts, params, timeout=120)]
        outputs, _, _ = _generate_with_kill(cluster, prompts, params, ("decode-0", 0))
        _check(cluster, outputs, uninterrupted, ("decode-0", 0))
        assert sum(o.metrics["migrations"] for o in outputs) >= 1


def test_poison_requests_fail_alone_and_the_instance_keeps_serving(ray_runtime, ckpt, load):
    prompts, params, expected = load
    vocab = 512
    with Cluster(config(ckpt, fault_tolerance=FAST)) as cluster:
        with pytest.raises(ValueError, match="stop_token_ids: with min_tokens=1 every token"):
            cluster.generate([[5, 6, 7]], SamplingParams(max_tokens=4, min_tokens=1, temperature=1.0,
                                                         stop_token_ids=tuple(range(vocab))))
        hot = cluster.generate([[5, 6, 7]], SamplingParams(max_tokens=4, min_tokens=1, temperature=1e300, seed=1))
        assert hot[0].error is None and len(hot[0].token_ids) == 4
        outputs = cluster.generate(prompts[:6], params[:6], timeout=120)
        assert [o.token_ids for o in outputs] == expected[:6]
        assert all(s["restarts"] == 0 and s["state"] == "serving" for s in cluster.stats()["instances"].values())
        wait_for_idle(cluster)


def test_only_colocated_instance_killed_requests_wait_for_its_relaunch(ray_runtime, ckpt, load):
    """With no live instance of a role, migrated requests wait for the relaunch (not fail) and then resume."""
    prompts, params, expected = load
    cfg = config(ckpt, prefill={"instances": 0}, decode={"instances": 0}, colocated={"instances": 1},
                 fault_tolerance=FAST)
    with Cluster(cfg) as cluster:
        outputs, readiness, _ = _generate_with_kill(cluster, prompts, params, ("colocated-0", 0))
        _check(cluster, outputs, expected, ("colocated-0", 0))
        assert False in readiness


def test_requests_fail_unavailable_when_no_instance_comes_back(ray_runtime, ckpt, load):
    prompts, params, _ = load
    cfg = config(ckpt, fault_tolerance={**FAST, "restart": False, "unavailable_timeout_s": 2.0})
    with Cluster(cfg) as cluster:
        outputs = []
        worker = threading.Thread(target=lambda: outputs.extend(cluster.generate(prompts[:6], params[:6], timeout=120)))
        worker.start()
        _wait(lambda: cluster.stats()["requests"].get("decoding", 0) >= 1, 60, "a decoding request")
        _kill(cluster, "decode-0", 0)
        worker.join(120)
        failed = [o for o in outputs if o.error is not None]
        assert len(outputs) == 6 and failed, "the requests in flight should have failed"
        assert all(o.finish_reason == "error" and "no live decode instance for 2 s" in o.error for o in failed)
        stats = cluster.stats()["instances"]
        assert stats["decode-0"]["state"] == "failed" and stats["decode-0"]["restarts"] == 0 and not cluster.ready
        prefill = cluster.leader_call("prefill-0", "stats")
        assert prefill["free_blocks"] == prefill["num_blocks"]
