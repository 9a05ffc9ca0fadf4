"""A decode instance takes a new request's KV reservation while a forward runs (not only between steps), so a
request's TTFT does not wait for the decode step in flight; the tokens, and the KV back to idle, are as before,
including a request aborted meanwhile."""
import threading
import time

import pytest

from cluster_helpers import config, references, wait_for_idle, write_checkpoint
from splitserve.cluster.cluster import Cluster
from splitserve.workers.sampling_params import SamplingParams

FORWARD_S = 0.4  # each decode forward takes this much longer: a reservation lands inside one almost surely


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint("llama", tmp_path_factory.mktemp("llama"), seed=43)


def _decode_stats(cluster) -> dict:
    return cluster.stats()["instances"]["decode-0"]


def test_reservations_are_taken_while_the_decode_forward_runs(ray_runtime, ckpt):
    prompts = [list(range(5 + i, 25 + 2 * i)) for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = references(ckpt, prompts, [params] * len(prompts))
    with Cluster(config(ckpt)) as cluster:
        cluster.rank_call("decode-0", 0, "slow_forwards", FORWARD_S)
        outputs = {}

        def run(i):
            outputs[i] = cluster.generate([prompts[i]], [params], timeout=120)[0]

        first = threading.Thread(target=run, args=(0,))
        first.start()
        deadline = time.monotonic() + 60
        while cluster.stats()["requests"].get("decoding", 0) < 1:  # the decode instance is stepping now
            assert time.monotonic() < deadline, "the first request never started decoding"
            time.sleep(0.01)
        later = [threading.Thread(target=run, args=(i,)) for i in range(1, len(prompts))]
        for t in later:
            t.start()
            time.sleep(0.05)
        # One more request, aborted while its reservation may be held: its blocks must come back too.
        aborted = cluster.submit(list(range(40, 70)), SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
        time.sleep(0.1)
        cluster.abort(aborted)
        for t in [first, *later]:
            t.join(timeout=120)
        assert sorted(outputs) == list(range(len(prompts)))
        assert all(outputs[i].error is None and outputs[i].token_ids == expected[i] for i in outputs)
        assert _decode_stats(cluster)["reserved_during_forward"] >= 1
        cluster.rank_call("decode-0", 0, "slow_forwards", 0.0)
        stats = wait_for_idle(cluster, timeout=30)
        for name, s in stats.items():
            assert s["free_blocks"] == s["num_blocks"] and s["pending_transfers"] == 0, (name, s)
