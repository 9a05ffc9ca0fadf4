"""Pipeline-parallel instances produce exactly the transformers tokens: prefill PP2 -> decode PP1 (stages pinned to
the plan's nodes), PP1 -> PP2 (over shared memory), TP2·PP2 on both sides, PP3 on a 5-layer model into decode PP2,
sequence-parallel prefill SP2·PP2 into decode PP3,
each with a second turn served from both sides' prefix caches (delta transfer); colocated PP2 under a cache small
enough to preempt, with an abort mid-decode; a killed follower stage is relaunched and its requests migrate with
identical tokens."""
import os
import signal
import threading
import time

import pytest

from cluster_helpers import config, references, streaming_load, wait_for_idle, workload, write_checkpoint
from splitserve.cluster.cluster import Cluster
from splitserve.cluster.request import RequestState
from splitserve.workers.sampling_params import SamplingParams

# 5 layers: PP2 splits them 3 + 2, PP3 2 + 2 + 1. One block of one layer: K,V x 8 tokens x 2 KV heads x 16 x 4 bytes.
LAYERS = 5
LAYER_BLOCK_BYTES = 2 * 8 * 2 * 16 * 4
COLOCATED = {"prefill": {"instances": 0}, "decode": {"instances": 0}}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint("llama", tmp_path_factory.mktemp("llama5"), seed=23, num_hidden_layers=LAYERS)


@pytest.fixture(scope="module")
def expected(ckpt):
    prompts, params = workload(12, seed=3)
    return prompts, params, references(ckpt, prompts, params)


# What `splitserve plan` writes: each stage's node (index among the GPU nodes); the launcher pins stages there.
PLANNED = {"instances": [{"role": "prefill", "index": 0, "stages": [{"node": 0, "devices": [0]},
                                                                  {"node": 0, "devices": [1]}]},
                         {"role": "decode", "index": 0, "stages": [{"node": 0, "devices": [2]}]}]}

LAYOUTS = {
    "prefill_pp2_decode_pp1": {"prefill": {"pp": 2}, "placement": PLANNED},
    "prefill_pp1_decode_pp2_shm": {"decode": {"pp": 2}, "kv_transfer": {"transport": "shm"}},
    "tp2_pp2_both": {"prefill": {"tp": 2, "pp": 2}, "decode": {"tp": 2, "pp": 2}},
    "prefill_pp3_decode_pp2": {"prefill": {"pp": 3}, "decode": {"pp": 2}},
    # Each prefill stage runs its own SP ring; stages (2 + 3 layers) and decode stages (2 + 2 + 1) overlap unevenly.
    "prefill_sp2_pp2_decode_pp3": {"prefill": {"sp": 2, "pp": 2}, "decode": {"pp": 3}},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_layout_matches_transformers(ray_runtime, ckpt, expected, layout):
    prompts, params, reference = expected
    with Cluster(config(ckpt, **LAYOUTS[layout])) as cluster:
        outputs = cluster.generate(prompts, params, timeout=120)  # all at once: mixed lengths batched together
        assert [o.error for o in outputs] == [None] * len(prompts)
        assert [o.token_ids for o in outputs] == reference
        before = wait_for_idle(cluster)
        # A second turn resends the first request with its answer: both sides start on their cached blocks, and only
        # the blocks after the decode side's cached prefix move, each stage pair's layers on its own links.
        turn = prompts[0] + reference[0] + [5, 6, 7]
        again = cluster.generate([turn], [params[0]], timeout=60)[0]
        assert again.error is None and again.token_ids == references(ckpt, [turn], [params[0]])[0]
        stats = wait_for_idle(cluster)
        for name, s in stats.items():  # an SP prefill instance caches no prefixes (see workers/sp_block_manager.py)
            if s["sp"] == 1:
                assert s["prefix_hit_tokens"] > before[name]["prefix_hit_tokens"], (name, s)
        assert (again.metrics["cached_tokens"] > 0) == (stats["prefill-0"]["sp"] == 1)
        sections = LAYOUTS[layout]
        for name, s in stats.items():
            pp = sections.get(s["role"], {}).get("pp", 1)
            assert s["pp"] == pp, (name, s)
            handle = next(i for i in cluster.launcher.instances if i.name == name)
            assert len(handle.placement_groups) == pp  # one placement group per stage
            if "placement" in sections:
                assert all("node:127.0.0.1" in b for pg in handle.placement_groups for b in pg.bundle_specs)


def test_colocated_pp2_preempts_and_aborts(ray_runtime, ckpt):
    # Stage 0 holds 3 layers: 20 blocks of the budget there, so the 12 requests below cannot all keep their KV at
    # once and decodes are preempted (recomputed through both stages).
    cfg = config(ckpt, **COLOCATED, colocated={"instances": 1, "pp": 2},
                 engine={"kv_cache_bytes": 20 * 3 * LAYER_BLOCK_BYTES})
    prompts = [[(7 * i + 3 * j) % 500 + 2 for j in range(20 + 2 * i)] for i in range(12)]
    params = [SamplingParams(temperature=0.0, max_tokens=30 + i, ignore_eos=True) for i in range(12)]
    reference = references(ckpt, prompts, params)
    with Cluster(cfg) as cluster:
        # Abort mid-decode: the request's blocks are freed.
        long = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)  # 16 of the 20 blocks
        rid = cluster.submit(list(range(2, 30)), long)
        deadline = time.monotonic() + 60
        while cluster.request_state(rid) is not RequestState.DECODING:
            assert time.monotonic() < deadline, "the request never reached decoding"
            time.sleep(0.02)
        assert cluster.abort(rid)
        wait_for_idle(cluster)

        outputs = cluster.generate(prompts, params, timeout=180)
        assert [o.error for o in outputs] == [None] * len(prompts)
        assert [o.token_ids for o in outputs] == reference
        stats = wait_for_idle(cluster)
        assert stats["colocated-0"]["num_blocks"] == 20 and stats["colocated-0"]["preemptions"] > 0, stats


def test_decode_pp2_in_flight_preempts_and_aborts(ray_runtime, ckpt):
    # Decode PP2 keeps two batches in flight. Stage 0 holds 3 layers: 20 blocks there, too few for the load below, so
    # decodes are preempted and recomputed through the pipeline (which first takes both batches back); an abort of
    # a request in mid-decode among them frees its blocks only after its batch is back.
    cfg = config(ckpt, decode={"pp": 2}, engine={"kv_cache_bytes": 20 * 3 * LAYER_BLOCK_BYTES})
    prompts = [[(7 * i + 3 * j) % 500 + 2 for j in range(20 + 2 * i)] for i in range(12)]
    params = [SamplingParams(temperature=0.0, max_tokens=30 + i, ignore_eos=True) for i in range(12)]
    reference = references(ckpt, prompts, params)
    with Cluster(cfg) as cluster:
        outputs = []
        worker = threading.Thread(target=lambda: outputs.extend(cluster.generate(prompts, params, timeout=240)))
        worker.start()
        rid = cluster.submit(list(range(2, 20)), SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))
        deadline = time.monotonic() + 60
        while cluster.request_state(rid) is not RequestState.DECODING:
            assert time.monotonic() < deadline, "the request never reached decoding"
            time.sleep(0.01)
        assert cluster.abort(rid)
        worker.join(timeout=240)
        assert not worker.is_alive(), "the load did not finish"
        assert [o.error for o in outputs] == [None] * len(prompts)
        assert [o.token_ids for o in outputs] == reference
        stats = wait_for_idle(cluster)
        decode = stats["decode-0"]
        assert decode["num_blocks"] == 20 and decode["preemptions"] > 0, decode
        assert decode["max_batches_in_flight"] == 2, decode


def test_killed_follower_stage_is_relaunched_and_requests_migrate(ray_runtime, ckpt):
    prompts, params, reference = streaming_load(ckpt, n=6)
    cfg = config(ckpt, prefill={"pp": 2}, decode={"pp": 2},
                 fault_tolerance={"restart_backoff_s": 0.1, "health_interval_s": 0.5})
    with Cluster(cfg) as cluster:
        outputs = []
        worker = threading.Thread(target=lambda: outputs.extend(cluster.generate(prompts, params, timeout=300)))
        worker.start()
        deadline = time.monotonic() + 60
        while cluster.stats()["requests"].get("decoding", 0) < 3:
            assert time.monotonic() < deadline, "requests never reached decoding"
            time.sleep(0.02)
        os.kill(cluster.rank_call("decode-0", 1, "pid"), signal.SIGKILL)  # the last stage of decode-0
        worker.join(timeout=240)
        assert not worker.is_alive(), "the load did not finish after the relaunch"
        assert [o.error for o in outputs] == [None] * len(prompts)
        assert [o.token_ids for o in outputs] == reference
        assert sum(o.metrics["migrations"] for o in outputs) >= 1
        deadline = time.monotonic() + 90
        while cluster.stats()["instances"]["decode-0"]["state"] != "serving":
            assert time.monotonic() < deadline, "decode-0 was not relaunched"
            time.sleep(0.1)
        assert cluster.stats()["instances"]["decode-0"]["restarts"] == 1
        again = cluster.generate(prompts[:2], params[:2], timeout=120)  # the relaunched pipeline serves
        assert [o.token_ids for o in again] == reference[:2]
        wait_for_idle(cluster, timeout=30)
