"""Instances added and removed while requests stream: a new instance serves once up, a removed one drains (or moves
what it has left) and frees its GPUs, every request ends with its reference tokens and KV returns to idle; requests
for counts that cannot be are refused naming the field."""
import threading
import time

import pytest

from cluster_helpers import config, streaming_load, wait_for_idle, write_checkpoint
from splitserve.cluster.cluster import Cluster
from splitserve.cluster.scaling import NotEnoughDevices, ScaleError
from splitserve.workers.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint("llama", tmp_path_factory.mktemp("llama"), seed=23)


@pytest.fixture(scope="module")
def load(ckpt):
    return streaming_load(ckpt, seed=6, prompt_step=9, output_step=4)


def _decoding(cluster) -> bool:
    return cluster.stats()["requests"].get("decoding", 0) >= 3


def _while_streaming(cluster, prompts, params, action, ready=_decoding):
    """Runs `action` once `ready(cluster)` (default: a few of the requests are decoding); returns (outputs,
    action's result)."""
    outputs, result = [], []
    worker = threading.Thread(target=lambda: outputs.extend(cluster.generate(prompts, params, timeout=300)))
    worker.start()
    deadline = time.monotonic() + 60
    while not ready(cluster):
        assert time.monotonic() < deadline, "the load did not reach the state the action needs"
        time.sleep(0.02)
    result.append(action())
    worker.join(300)
    assert not worker.is_alive()
    return outputs, result[0]


def _roles(cluster) -> dict:
    return {n: s["state"] for n, s in cluster.stats()["instances"].items()}


def test_decode_scaled_up_then_down_under_load(ray_runtime, ckpt, load):
    prompts, params, expected = load
    with Cluster(config(ckpt)) as cluster:
        outputs, up = _while_streaming(cluster, prompts, params, lambda: cluster.scale(decode=2))
        assert up.added == ["decode-1"] and up.removed == [] and up.instances == {"prefill": 1, "decode": 2}
        assert [o.token_ids for o in outputs] == expected
        # The new instance takes requests.
        again = cluster.generate(prompts, params, timeout=300)
        assert [o.token_ids for o in again] == expected
        assert "decode-1" in {o.metrics["decode_instance"] for o in again}
        # Down again with a drain shorter than the requests: what decode-1 still has moves to decode-0.
        # Once decode-1 runs some of them (else the router may not have given it any yet, and nothing would move).
        outputs, down = _while_streaming(cluster, prompts, params,
                                         lambda: cluster.scale(decode=1, drain_timeout_s=0.2),
                                         ready=lambda c: c.stats()["instances"]["decode-1"].get("running", 0) >= 2)
        assert down.removed == ["decode-1"] and down.instances == {"prefill": 1, "decode": 1}
        assert [o.error for o in outputs] == [None] * len(prompts)
        assert [o.token_ids for o in outputs] == expected
        assert cluster.stats()["migrations"].get("scale_down", 0) >= 1
        assert _roles(cluster) == {"prefill-0": "serving", "decode-0": "serving"}
        wait_for_idle(cluster)


def test_prefill_scaled_with_tp2_instances(ray_runtime, ckpt, load):
    prompts, params, expected = load
    with Cluster(config(ckpt, prefill={"tp": 2}, decode={"tp": 2})) as cluster:
        outputs, up = _while_streaming(cluster, prompts, params, lambda: cluster.scale(prefill=2, decode=2))
        assert sorted(up.added) == ["decode-1", "prefill-1"]
        assert [o.token_ids for o in outputs] == expected
        again = cluster.generate(prompts, params, timeout=300)
        assert [o.token_ids for o in again] == expected
        assert {"prefill-0", "prefill-1"} == {o.metrics["prefill_instance"] for o in again}
        outputs, down = _while_streaming(cluster, prompts, params, lambda: cluster.scale(prefill=1, decode=1))
        assert sorted(down.removed) == ["decode-1", "prefill-1"]
        assert [o.token_ids for o in outputs] == expected
        wait_for_idle(cluster)


def test_scale_requests_that_cannot_be(ray_runtime, ckpt):
    with Cluster(config(ckpt)) as cluster:
        for kwargs, message in [
            ({"decode": -1}, "decode: must be an integer >= 0"),
            ({"decode": 0}, "decode: at least one instance must stay"),
            ({"prefill": 1.5}, "prefill: must be an integer"),
            ({"colocated": 2}, "colocated: this cluster is disaggregated"),
            ({}, "give a target count"),
        ]:
            with pytest.raises(ScaleError, match=message):
                cluster.scale(**kwargs)
        with pytest.raises(NotEnoughDevices, match="need 19 GPUs but the Ray cluster has 6 free"):
            cluster.scale(decode=20)  # the test Ray has 8 GPUs, 2 in use
        same = cluster.scale(decode=1)
        assert same.added == [] and same.removed == []
        assert len(cluster.generate([[3, 4, 5]], SamplingParams(max_tokens=3))[0].token_ids) == 3


def test_scaling_a_role_to_zero_is_refused_while_requests_stream(ray_runtime, ckpt, load):
    """Requests in flight need both roles: a request to remove the last instance of either is refused, names the
    role, and changes nothing; every streaming request still ends with its reference tokens."""
    prompts, params, expected = load

    def refuse_both():
        errors = []
        for role in ("prefill", "decode"):
            with pytest.raises(ScaleError) as err:
                cluster.scale(**{role: 0})
            errors.append(str(err.value))
        return errors

    with Cluster(config(ckpt)) as cluster:
        outputs, errors = _while_streaming(cluster, prompts, params, refuse_both)
        assert [e.split(":")[0] for e in errors] == ["prefill", "decode"]
        assert all("at least one instance must stay" in e for e in errors)
        assert [o.error for o in outputs] == [None] * len(prompts)
        assert [o.token_ids for o in outputs] == expected
        assert _roles(cluster) == {"prefill-0": "serving", "decode-0": "serving"}
        wait_for_idle(cluster)
