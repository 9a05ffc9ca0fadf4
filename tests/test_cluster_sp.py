"""Sequence-parallel prefill in the cluster: prompts of up to 2.5k tokens prefilled over SP 2 / SP 4 ranks (ring and
TokenRing, with and without TP inside each SP rank, with a sliding window, layer-wise and after-prefill transfer),
decoded on TP1 and TP2 instances, give exactly the transformers tokens. Short prompts leave some SP ranks without a
KV block to push (empty transfers)."""
import random

import pytest

from cluster_helpers import config, references, wait_for_idle, write_checkpoint
from splitserve.cluster.cluster import Cluster
from splitserve.cluster.config import config_from_dict
from splitserve.comm.kv_plan import sp_block_owners, sp_padded_len
from splitserve.comm.sp_common import ZigzagLayout
from splitserve.workers.block_manager import BlockManager, NoFreeBlocksError
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.sp_block_manager import SPBlockManager

LAYOUTS = {
    "sp2_ring": ("llama", {"prefill": {"sp": 2, "sp_algorithm": "ring"}}),
    "sp2_token_ring": ("llama", {"prefill": {"sp": 2, "sp_algorithm": "token_ring"}}),
    "sp4_token_ring": ("llama", {"prefill": {"sp": 4, "sp_algorithm": "token_ring"}}),
    "sp4_ring_decode_tp2": ("llama", {"prefill": {"sp": 4, "sp_algorithm": "ring"}, "decode": {"tp": 2}}),
    "sp2_tp2_ring": ("llama", {"prefill": {"sp": 2, "tp": 2, "sp_algorithm": "ring"}}),
    "sp2_ring_decode_tp2_shm": ("llama", {"prefill": {"sp": 2, "sp_algorithm": "ring"}, "decode": {"tp": 2},
                                          "kv_transfer": {"transport": "shm"}}),
    "sp2_window_token_ring": ("mistral", {"prefill": {"sp": 2, "sp_algorithm": "token_ring"}}),
    "sp2_ring_after_prefill": ("llama", {"prefill": {"sp": 2}, "kv_transfer": {"mode": "after_prefill"}}),
}


@pytest.mark.parametrize("sp", [1, 2, 3, 4])
@pytest.mark.parametrize("block_size", [1, 8, 16])
def test_every_token_of_a_block_lives_on_its_owner(sp, block_size):
    """The invariant the whole-block transfer rests on: the padded zigzag puts all tokens of a block on one rank."""
    for n in (1, 7, 16, 17, 100, 129, 1000):
        padded = sp_padded_len(n, block_size, sp)
        assert padded >= n and padded % (2 * sp * block_size) == 0
        layout = ZigzagLayout((padded,), sp)
        owners = sp_block_owners(n, block_size, sp)
        assert len(owners) == -(-n // block_size)
        for pos in range(n):
            assert layout.locate(0, pos)[0] == owners[pos // block_size], (n, pos)


def test_sp_block_manager_holds_sp_times_one_rank():
    """Each block comes from its owner's pool; a prompt larger than one rank's cache fits over four ranks."""
    one, sp = BlockManager(10, 8), SPBlockManager(10, 8, 4)
    assert not one.can_allocate(300) and sp.can_allocate(300)
    table = sp.allocate("a", 300)
    owners = sp_block_owners(300, 8, 4)
    for rank in range(4):
        mine = [b for b, o in zip(table, owners) if o == rank]
        assert sorted(mine) == list(range(len(mine)))  # the lowest free blocks of that rank's own pool
    assert sp.slot_mapping("a", 8, 10) == [table[1] * 8, table[1] * 8 + 1]
    assert sp.num_free_blocks == 10 - max(owners.count(r) for r in range(4))
    with pytest.raises(NoFreeBlocksError):
        sp.allocate("b", 300)
    assert not sp.has("b") and sp.free("a") == len(table) and sp.num_free_blocks == 10 and sp.free("a") == 0


def test_config_accepts_sp_and_refuses_it_without_prefill_instances():
    cfg = config_from_dict({"prefill": {"sp": 4, "tp": 2, "sp_algorithm": "token_ring"}})
    assert cfg.prefill.world_size == 8 and cfg.num_devices == 9
    with pytest.raises(ValueError, match="'prefill.sp'"):
        config_from_dict({"prefill": {"instances": 0, "sp": 2}, "decode": {"instances": 0},
                          "colocated": {"instances": 1}})
    with pytest.raises(ValueError, match="'prefill.sp_algorithm'"):
        config_from_dict({"prefill": {"sp": 2, "sp_algorithm": "all_gather"}})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {kind: write_checkpoint(kind, tmp_path_factory.mktemp(kind), seed=41, max_position_embeddings=4096)
            for kind in ("llama", "mistral")}


@pytest.fixture(scope="module")
def expected(checkpoints):
    rng = random.Random(5)
    # A 10-token prompt is 2 blocks: under SP 4 ranks 2 and 3 own none of its blocks.
    prompts = [[rng.randrange(2, 512) for _ in range(n)] for n in (2500, 1203, 10, 77)]
    params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True) for _ in prompts]
    return {kind: (prompts, params, references(path, prompts, params)) for kind, path in checkpoints.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sp_prefill_matches_transformers(ray_runtime, checkpoints, expected, layout):
    kind, sections = LAYOUTS[layout]
    prompts, params, reference = expected[kind]
    sections = {"engine": {"block_size": 8, "kv_cache_bytes": 4 << 20, "max_num_batched_tokens": 4096}, **sections}
    with Cluster(config(checkpoints[kind], **sections)) as cluster:
        prefill = [i for i in cluster.instances.values() if i.spec.role == "prefill"]
        assert [len(i.actors) for i in prefill] == [sections["prefill"]["sp"] * sections["prefill"].get("tp", 1)]
        outputs = cluster.generate(prompts, params, timeout=180)
        assert [o.error for o in outputs] == [None] * len(prompts)
        assert [o.token_ids for o in outputs] == reference
        stats = wait_for_idle(cluster)
        assert all(s["free_blocks"] == s["num_blocks"] for s in stats.values()), stats
