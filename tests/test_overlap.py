"""TokenWeave overlap: where the batch is split, what each part's attention sees, and TP = 2 greedy tokens
for every tp_norm_method with overlap on and off equal to transformers (batch > 1 with mixed lengths, and one
long prompt that must be split inside the sequence)."""
import os

import pytest
import torch

from distributed import run_distributed
from hf_checkpoints import hf_greedy, hf_model, random_prompts, write_checkpoint
from splitserve.comm.overlap import choose_split, plan_parts
from splitserve.workers.layers.attention import AttentionMetadata
from splitserve.workers.sampling_params import SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
BATCH = random_prompts([9, 33, 4, 21, 17], seed=5)
LONG = random_prompts([150], seed=6)
OVERLAP_MIN_TOKENS = 4  # low enough that decode steps of the batch split too


def test_split_prefers_an_aligned_sequence_boundary_near_the_middle():
    assert choose_split([32, 32], can_cut_sequences=True) == 32
    assert choose_split([16, 20, 28], can_cut_sequences=True) == 36  # no aligned boundary near 32
    assert choose_split([1] * 20, can_cut_sequences=True) == 8  # decode: multiple of 8 within 1/8 of the middle


def test_split_cuts_a_sequence_only_with_a_paged_cache():
    assert choose_split([150], can_cut_sequences=True) == 80
    assert choose_split([150], can_cut_sequences=False) is None
    assert choose_split([140, 10], can_cut_sequences=False) == 140  # the only boundary


def test_second_part_of_a_cut_prompt_attends_to_the_first_through_the_cache():
    block_size, blocks = 8, [5, 2, 9, 7, 3]
    slots = torch.tensor([blocks[i // block_size] * block_size + i % block_size for i in range(36)])
    meta = AttentionMetadata(slot_mapping=slots, query_lens=[36], context_lens=[36], block_tables=None)
    first, second = plan_parts(torch.arange(36), meta, min_tokens=4, block_size=block_size)
    assert (first.rows, second.rows) == (slice(0, 16), slice(16, 36))
    assert first.meta.is_fresh_prefill and first.meta.query_lens == [16]
    assert (second.meta.query_lens, second.meta.context_lens) == ([20], [36])
    assert second.meta.block_tables.tolist() == [blocks]  # read off the slots of the whole prompt
    assert torch.equal(second.positions, torch.arange(16, 36))


def test_only_the_last_part_reports_a_written_layer():
    meta = AttentionMetadata(slot_mapping=torch.arange(40), query_lens=[20, 20], context_lens=[20, 20],
                             block_tables=None, on_kv_written=lambda cache: None)
    first, second = plan_parts(torch.arange(40), meta, min_tokens=4, block_size=8)
    assert first.meta.on_kv_written is None and second.meta.on_kv_written is meta.on_kv_written
    assert first.meta.is_fresh_prefill and second.meta.is_fresh_prefill  # a boundary split keeps both fresh


def test_below_the_threshold_nothing_is_split():
    meta = AttentionMetadata(slot_mapping=torch.arange(40), query_lens=[40], context_lens=[40], block_tables=None)
    assert len(plan_parts(torch.arange(40), meta, min_tokens=64, block_size=8)) == 1
    assert len(plan_parts(torch.arange(40), meta, min_tokens=None, block_size=8)) == 1


def _generate_all(rank, world, model_dir, configs):
    """Greedy tokens for each (tp_norm_method, overlap_min_tokens), and how each forward was split."""
    from splitserve.comm.tensor_parallel import TPGroup
    from splitserve.workers import model as model_module
    from splitserve.workers.llm import LLM

    splits = []
    plan = model_module.plan_parts

    def recording_plan(*args, **kwargs):
        parts = plan(*args, **kwargs)
        splits.append([(p.rows.stop - p.rows.start, p.meta.is_fresh_prefill) for p in parts])
        return parts

    model_module.plan_parts = recording_plan
    tp, out = TPGroup.from_group(), {}
    for method, min_tokens, interpret in configs:
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        splits.clear()
        llm = LLM(str(model_dir), device="cpu", tp=tp, block_size=8, tp_norm_method=method,
                  overlap_min_tokens=min_tokens)
        batch = [o.token_ids for o in llm.generate(BATCH, PARAMS)]
        long = [o.token_ids for o in llm.generate(LONG, PARAMS)]
        out[(method, min_tokens, interpret)] = (batch, long, list(splits))
    return out


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_tp2_tokens_match_transformers_for_every_method_with_and_without_overlap(tmp_path, kind):
    directory = write_checkpoint(kind, tmp_path, seed=21)
    hf = hf_model(directory)
    want_batch = [hf_greedy(hf, p, PARAMS.max_tokens) for p in BATCH]
    want_long = [hf_greedy(hf, p, PARAMS.max_tokens) for p in LONG]
    if kind == "llama":  # every method with overlap off and on, then the Triton kernels interpreted in the model
        methods = ("reference", "rs_ag", "symmetric", "auto")
        configs = [(m, n, False) for m in methods for n in (None, OVERLAP_MIN_TOKENS)]
        configs.append(("symmetric", OVERLAP_MIN_TOKENS, True))
    else:  # a sliding window shorter than the cut prompt's parts
        configs = [(m, OVERLAP_MIN_TOKENS, False) for m in ("reference", "symmetric_rs")]
    results = run_distributed(_generate_all, 2, directory, configs)
    for config in configs:
        batch, long, splits = results[0][config]
        assert batch == want_batch, f"{kind} {config}: batch"
        assert long == want_long, f"{kind} {config}: long prompt"
        assert results[1][config][:2] == (batch, long), f"{kind} {config}: ranks disagree"
        if config[1] is None:
            assert all(len(s) == 1 for s in splits)
        else:
            assert any(len(s) == 2 and not s[1][1] for s in splits), "the long prompt is cut inside the sequence"
            assert any(len(s) == 2 and s[0][0] + s[1][0] == len(BATCH) for s in splits), "decode steps split"


def test_llm_options_are_validated_by_name(tmp_path):
    from splitserve.workers.llm import LLM

    directory = write_checkpoint("llama", tmp_path, seed=1)
    with pytest.raises(ValueError, match="tp_norm_method"):
        LLM(str(directory), device="cpu", tp_norm_method="nccl")
    with pytest.raises(ValueError, match="overlap_min_tokens"):
        LLM(str(directory), device="cpu", overlap_min_tokens=0)
    llm = LLM(str(directory), device="cpu", tp_norm_method="symmetric", overlap_min_tokens=8)  # TP = 1: no-ops
    hf = hf_model(directory)
    assert llm.generate(BATCH[:2], PARAMS)[1].token_ids == hf_greedy(hf, BATCH[1], PARAMS.max_tokens)
