"""Aborts free KV on both sides in every state; a failing transfer is retried once, then reported; nothing hangs;
requests and layouts that cannot fit are refused with errors that say why."""
import asyncio
import time

import pytest

from cluster_helpers import config, references, wait_for_idle, write_checkpoint
from splitserve.cluster.cluster import Cluster
from splitserve.cluster.request import RequestState
from splitserve.workers.sampling_params import SamplingParams

TIMEOUT_S = 3.0
# tiny checkpoint: 2 layers x K,V x 2 KV heads x 16 dims x 4 bytes x 8 tokens = 4 KiB per block
BLOCK_BYTES = 2 * 2 * 2 * 16 * 4 * 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint("llama", tmp_path_factory.mktemp("llama"), seed=41)


@pytest.fixture(scope="module")
def cluster(ray_runtime, ckpt):
    # 12 blocks of 8 tokens per instance: small enough to fill on purpose.
    cfg = config(ckpt, engine={"kv_cache_bytes": 12 * BLOCK_BYTES},
                 kv_transfer={"timeout_s": TIMEOUT_S, "retries": 1})
    with Cluster(cfg) as c:
        yield c


def _wait_state(cluster, request_id, states, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = cluster.request_state(request_id)
        if state in states:
            return state
        time.sleep(0.01)
    raise AssertionError(f"{request_id} never reached {states}")


def _assert_idle(cluster):
    stats = wait_for_idle(cluster, timeout=TIMEOUT_S + 10)
    for name, s in stats.items():
        assert s["free_blocks"] == s["num_blocks"] and s["pending_transfers"] == 0, (name, s)


def test_transfer_failure_is_retried_then_succeeds(cluster, ckpt):
    prompt, params = [list(range(5, 30))], [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)]
    cluster.rank_call("prefill-0", 0, "inject_transfer_faults", 1)
    start = time.monotonic()
    out = cluster.generate(prompt, params, timeout=60)[0]
    assert out.error is None and out.metrics["attempts"] == 2
    assert out.token_ids == references(ckpt, prompt, params)[0]
    assert TIMEOUT_S <= time.monotonic() - start < TIMEOUT_S + 15
    _assert_idle(cluster)


def test_transfer_failing_twice_is_reported_not_hung(cluster):
    cluster.rank_call("prefill-0", 0, "inject_transfer_faults", 2)
    start = time.monotonic()
    out = cluster.generate([list(range(5, 30))], SamplingParams(temperature=0.0, max_tokens=6), timeout=60)[0]
    assert out.finish_reason == "error"
    assert "KV transfer failed" in out.error and "after 2 attempts" in out.error
    assert time.monotonic() - start < 2 * TIMEOUT_S + 15
    _assert_idle(cluster)


def test_abort_in_every_state_frees_both_sides(cluster):
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    # PREFILLING: the prefill leader is paused, so the request waits there with a decode reservation.
    cluster.leader_call("prefill-0", "pause", True)
    cluster.submit(list(range(5, 40)), long, "in-prefill")
    assert _wait_state(cluster, "in-prefill", {RequestState.PREFILLING}) is RequestState.PREFILLING
    assert cluster.leader_call("decode-0", "stats")["free_blocks"] < 12  # reserved before prefill
    assert cluster.abort("in-prefill")
    cluster.leader_call("prefill-0", "pause", False)
    _assert_idle(cluster)

    # QUEUED: a paused decode instance holds a long request; the next one finds no room to reserve.
    cluster.leader_call("decode-0", "pause", True)
    cluster.submit(list(range(5, 60)), long, "holder")  # 7 blocks of 12
    _wait_state(cluster, "holder", {RequestState.DECODING})
    # It needs 7 blocks and 5 are free, so it must stay QUEUED however long dispatch takes (other tokens than the
    # holder's: a shared prefix would be found in the decode side's cache and need fewer blocks).
    assert cluster.leader_call("decode-0", "stats")["free_blocks"] == 5
    cluster.submit(list(range(105, 160)), long, "queued")
    time.sleep(0.3)  # dispatch tries (and fails) to reserve meanwhile
    assert cluster.request_state("queued") is RequestState.QUEUED
    assert cluster.abort("queued")
    # DECODING (admitted, paused): aborting frees the decode side.
    assert cluster.request_state("holder") is RequestState.DECODING
    assert cluster.abort("holder")
    cluster.leader_call("decode-0", "pause", False)
    _assert_idle(cluster)

    # TRANSFERRING: the transfer stalls after the handshake; the blocks are freed once the receiver gives up.
    cluster.rank_call("prefill-0", 0, "inject_transfer_faults", 1)
    cluster.submit(list(range(5, 40)), long, "in-transfer")
    _wait_state(cluster, "in-transfer", {RequestState.TRANSFERRING})
    assert cluster.abort("in-transfer")
    _assert_idle(cluster)

    # DECODING while running.
    cluster.submit(list(range(5, 40)), SamplingParams(temperature=0.0, max_tokens=80, ignore_eos=True), "running")
    _wait_state(cluster, "running", {RequestState.DECODING})
    assert cluster.abort("running")
    _assert_idle(cluster)
    assert not cluster.abort("running")  # already gone


def test_streaming_client_that_leaves_aborts_the_request(cluster):
    async def read_two():
        chunks = []
        async for chunk in cluster.stream(list(range(5, 30)), SamplingParams(max_tokens=80, ignore_eos=True),
                                          request_id="leaver"):
            chunks.append(chunk)
            if len(chunks) == 2:
                break
        return chunks

    chunks = asyncio.run(read_two())
    assert len(chunks) == 2 and not chunks[-1].finished
    assert cluster.request_state("leaver") is None
    _assert_idle(cluster)


def test_prompt_larger_than_decode_cache_is_refused(cluster):
    out = cluster.generate([list(range(2, 120))], SamplingParams(max_tokens=4))[0]
    assert out.finish_reason == "error"
    assert "118 tokens do not fit the decode instance's KV cache (96 token slots)" in out.error
    _assert_idle(cluster)


def test_request_validation(cluster):
    with pytest.raises(ValueError, match="max_tokens: prompt"):
        cluster.generate([[3, 4]], SamplingParams(max_tokens=5000))
    with pytest.raises(ValueError, match=r"prompt_token_ids: 512 is not a token id"):
        cluster.generate([[3, 512]])
    with pytest.raises(ValueError, match="prompt: must not be empty"):
        cluster.generate([""])


def test_layout_needing_more_gpus_says_how_many(ray_runtime, ckpt):
    with pytest.raises(ValueError, match=r"needs 12 GPUs but the Ray cluster has 8"):
        Cluster(config(ckpt, prefill={"instances": 2, "tp": 4}, decode={"instances": 2, "tp": 2}))


def test_decode_instance_preempts_and_recomputes_without_losing_tokens(ray_runtime, tmp_path):
    """A decode cache too small for every running request: the decode instance preempts, recomputes the
    preempted requests from their tokens, and each one's stream still carries every position once (a recomputed
    token and the next decode token can come out of one step)."""
    ckpt = write_checkpoint("llama", tmp_path, seed=23, num_hidden_layers=5)
    prompts = [[(7 * i + 3 * j) % 500 + 2 for j in range(20 + 2 * i)] for i in range(12)]
    params = [SamplingParams(temperature=0.0, max_tokens=30 + i, ignore_eos=True) for i in range(12)]
    expected = references(ckpt, prompts, params)
    # 12 blocks of 8 tokens on each instance (5 layers x K,V x 2 KV heads x 16 dims x fp32 x 8 tokens per block)
    with Cluster(config(ckpt, engine={"kv_cache_bytes": 12 * 5 * 2 * 2 * 16 * 4 * 8})) as cluster:
        outputs = cluster.generate(prompts, params, timeout=120)
        assert [o.error for o in outputs] == [None] * 12
        assert [o.token_ids for o in outputs] == expected
        assert cluster.stats()["instances"]["decode-0"]["preemptions"] > 0
        wait_for_idle(cluster)
