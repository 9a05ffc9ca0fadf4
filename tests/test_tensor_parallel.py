"""TP = 2 and 4 on gloo give the same greedy tokens as TP = 1 (and transformers), batch > 1."""
import pytest
import torch

from distributed import run_distributed
from hf_checkpoints import hf_greedy, hf_model, random_prompts, write_checkpoint
from splitserve.comm.kv_plan import local_kv_heads
from splitserve.comm.tensor_parallel import TPGroup
from splitserve.workers.layers.linear import QKVParallelLinear
from splitserve.workers.sampling_params import SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PROMPTS = random_prompts([9, 33, 4, 21], seed=5)


def _generate_tp(rank, world, model_dir, prompts, params):
    from splitserve.comm.tensor_parallel import TPGroup
    from splitserve.workers.llm import LLM

    tp = TPGroup.from_group()
    llm = LLM(str(model_dir), device="cpu", tp=tp, block_size=8)
    assert llm.model.layers[0].self_attn.num_heads * world == llm.model.cfg.num_heads
    return [o.token_ids for o in llm.generate(prompts, params)], llm.model.num_kv_heads


@pytest.mark.parametrize("kind,world", [("llama", 2), ("qwen2", 2), ("llama_mqa", 2), ("llama", 4)])
def test_tp_matches_reference(tmp_path, kind, world):
    directory = write_checkpoint(kind, tmp_path, seed=21)
    hf = hf_model(directory)
    reference = [hf_greedy(hf, p, PARAMS.max_tokens) for p in PROMPTS]
    results = run_distributed(_generate_tp, world, directory, PROMPTS, PARAMS)
    full_kv_heads = hf.config.num_key_value_heads
    for rank, (tokens, kv_heads) in enumerate(results):
        assert tokens == reference, f"{kind} TP={world} rank {rank}"
        assert kv_heads == max(1, full_kv_heads // world)  # replicated when TP > kv heads


@pytest.mark.parametrize("heads,kv_heads,tp", [(8, 8, 2), (8, 2, 2), (8, 2, 4), (8, 1, 4), (12, 4, 4), (8, 2, 8)])
def test_qkv_layer_loads_the_kv_heads_the_transfer_plan_routes(heads, kv_heads, tp):
    """Each rank's K rows are exactly the heads `kv_plan.local_kv_heads` says it holds (split or replicated)."""
    head_dim, hidden = 2, 4
    k_full = torch.arange(kv_heads, dtype=torch.float32).repeat_interleave(head_dim)[:, None].expand(-1, hidden)
    for rank in range(tp):
        layer = QKVParallelLinear(hidden, head_dim, heads, kv_heads, False, TPGroup(rank, tp, object()))
        start, count = local_kv_heads(kv_heads, tp, rank)
        assert (layer.kv_head_start, layer.num_kv_heads) == (start, count)
        layer.weight_loader(layer.weight, k_full, "k_proj.weight", "k")
        k_local = layer.weight.split(layer.split_sizes)[1][:, 0]
        assert k_local.tolist() == [float(h) for h in range(start, start + count) for _ in range(head_dim)]


def test_qkv_layer_rejects_kv_heads_that_do_not_shard():
    with pytest.raises(ValueError, match="tp: 3 KV heads do not split over 2 ranks"):
        QKVParallelLinear(4, 2, 8, 3, False, TPGroup(0, 2, object()))
    with pytest.raises(ValueError, match="tp: 4 ranks cannot replicate 3 KV heads"):
        QKVParallelLinear(4, 2, 12, 3, False, TPGroup(0, 4, object()))
