"""A rank killed with SIGKILL under load costs no request: its instance is marked dead, requests on it migrate
(prefill of prompt + streamed tokens) and finish with exactly the tokens of an uninterrupted run, the instance is
relaunched and rejoins, and every KV block returns to idle."""
import os
import signal
import threading
import time

import pytest

from cluster_helpers import config, references, wait_for_idle, write_checkpoint
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
    """20 greedy requests with long outputs (so a kill lands mid-decode) and their transformers references."""
    prompts = random_prompts([5 + 7 * i for i in range(20)], seed=5)
    # min_tokens = max_tokens masks eos as transformers' reference (min_new_tokens) does.
    params = [SamplingParams(temperature=0.0, max_tokens=120 + 3 * i, min_tokens=120 + 3 * i) for i in range(20)]
    return prompts, params, references(ckpt, prompts, params)


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
