"""Every layout produces exactly the transformers tokens: 1P1D, 2P1D, 1P2D, prefill TP != decode TP, GQA with
kv_heads < TP, colocated TP1/TP2, layer-wise vs after-prefill transfer, p2p and shared-memory transports."""
import pytest

from cluster_helpers import config, references, wait_for_idle, workload, write_checkpoint
from splitserve.cluster.cluster import Cluster


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {"llama": write_checkpoint("llama", tmp_path_factory.mktemp("llama"), seed=31),
            "mqa": write_checkpoint("llama_mqa", tmp_path_factory.mktemp("mqa"), seed=32)}


@pytest.fixture(scope="module")
def expected(checkpoints):
    prompts, params = workload(16, seed=1)
    return {kind: (prompts, params, references(path, prompts, params)) for kind, path in checkpoints.items()}


LAYOUTS = {
    "1p1d": ("llama", {}),
    "2p1d": ("llama", {"prefill": {"instances": 2}}),
    "1p2d": ("llama", {"decode": {"instances": 2}}),
    "prefill_tp2_decode_tp1": ("llama", {"prefill": {"tp": 2}}),
    "prefill_tp1_decode_tp2": ("llama", {"decode": {"tp": 2}}),
    "mqa_tp2_both": ("mqa", {"prefill": {"tp": 2}, "decode": {"tp": 2}}),
    "after_prefill": ("llama", {"kv_transfer": {"mode": "after_prefill"}}),
    "shm": ("llama", {"kv_transfer": {"transport": "shm"}}),
    "shm_tp2_to_tp1": ("llama", {"prefill": {"tp": 2}, "kv_transfer": {"transport": "shm"}}),
    "colocated_tp1": ("llama", {"prefill": {"instances": 0}, "decode": {"instances": 0}, "colocated": {"instances": 1}}),
    "colocated_tp2": ("llama", {"prefill": {"instances": 0}, "decode": {"instances": 0},
                                "colocated": {"instances": 1, "tp": 2}}),
    # TP communication reordered (reduce-scatter -> add + RMSNorm -> all-gather) and split-batch overlap
    "tp2_rs_ag_overlap": ("llama", {"prefill": {"tp": 2}, "decode": {"tp": 2},
                                    "engine": {"tp_norm_method": "rs_ag", "overlap_min_tokens": 32}}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_transformers(ray_runtime, checkpoints, expected, layout):
    kind, sections = LAYOUTS[layout]
    prompts, params, reference = expected[kind]
    with Cluster(config(checkpoints[kind], **sections)) as cluster:
        outputs = cluster.generate(prompts, params, timeout=120)
        assert [o.error for o in outputs] == [None] * len(prompts)
        assert [o.token_ids for o in outputs] == reference
        assert all(o.finish_reason == "length" and o.metrics["attempts"] == 1 for o in outputs)
        roles = {"prefill_instance": "prefill", "decode_instance": "decode"}
        if "colocated" in layout:
            roles = {"prefill_instance": "colocated"}
        for key, role in roles.items():  # the router spreads 16 concurrent requests over every instance
            used = {o.metrics[key] for o in outputs}
            assert used == {n for n, i in cluster.instances.items() if i.spec.role == role}, (key, used)
        stats = wait_for_idle(cluster)
        assert all(s["free_blocks"] == s["num_blocks"] for s in stats.values()), stats
