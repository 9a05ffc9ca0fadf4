"""TP = 2 and 4 on gloo give the same greedy tokens as TP = 1 (and transformers), batch > 1."""
import pytest

from distributed import run_distributed
from hf_checkpoints import hf_greedy, hf_model, random_prompts, write_checkpoint
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
