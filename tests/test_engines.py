"""Engine behaviour: preemption, context limits, stop rules, seeds, token validation, chunked attention."""
import pytest
import torch

from hf_checkpoints import random_prompts, write_checkpoint
from splitserve.workers.layers.attention import AttentionMetadata
from splitserve.workers.llm import LLM
from splitserve.workers.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(write_checkpoint("llama", tmp_path_factory.mktemp("llama"), seed=2))


@pytest.fixture(scope="module")
def llm(ckpt):
    return LLM(ckpt, device="cpu", block_size=8)


def test_preemption_recomputes_and_keeps_tokens(ckpt, llm):
    prompts = random_prompts([30, 12, 25, 7, 18, 22], seed=9)
    expected = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    # 18 blocks of 8 slots: the batch needs ~46 blocks at the end, so decodes must be preempted.
    per_block = 2 * 2 * 8 * 2 * 16 * 4
    small = LLM(ckpt, device="cpu", block_size=8, kv_cache_bytes=18 * per_block)
    assert small.blocks.num_blocks == 18
    outs = small.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert sum(o.num_preemptions for o in outs) > 0
    assert small.blocks.num_free_blocks == small.blocks.num_blocks


def test_prompt_larger_than_cache_is_refused(ckpt):
    per_block = 2 * 2 * 8 * 2 * 16 * 4
    small = LLM(ckpt, device="cpu", block_size=8, kv_cache_bytes=4 * per_block)
    with pytest.raises(ValueError, match=r"prompt: 40 tokens do not fit the KV cache \(32 token slots\)"):
        small.generate(random_prompts([40])[0], GREEDY)
    assert small.blocks.num_free_blocks == 4 and not small.has_unfinished()


def test_context_limit_finishes_with_length(ckpt):
    llm = LLM(ckpt, device="cpu", max_model_len=30)
    out = llm.generate(random_prompts([20])[0], GREEDY)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 10
    with pytest.raises(ValueError, match="max_model_len=30"):
        llm.generate(random_prompts([30])[0], GREEDY)


def test_stop_token_id_cuts_output(llm):
    prompt = random_prompts([15], seed=4)[0]
    full = llm.generate(prompt, GREEDY)[0].token_ids
    stop_id = full[6]
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[stop_id]))[0]
    assert out.token_ids == full[: full.index(stop_id) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_stop_string_cuts_text():
    llm = LLM("tiny", device="cpu")
    full = llm.generate("Serving the prefill", GREEDY)[0]
    stop = full.text[10:14]
    assert len(stop) == 4 and "\ufffd" not in stop
    out = llm.generate("Serving the prefill", SamplingParams(temperature=0.0, max_tokens=40, stop=[stop]))[0]
    assert out.text == full.text[: full.text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == full.token_ids[: len(out.token_ids)] and len(out.token_ids) < len(full.token_ids)


def test_seeded_sampling_is_independent_of_batch(llm):
    prompts = random_prompts([11, 23, 5], seed=6)
    seeded = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=20, seed=1234, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    alone = llm.generate([prompts[0]], seeded)[0].token_ids
    together = llm.generate(prompts, [seeded, other, other])[0].token_ids
    assert alone == together and len(alone) == 20
    different = llm.generate([prompts[0]], SamplingParams(temperature=0.9, top_p=0.9, max_tokens=20, seed=99,
                                                         ignore_eos=True))[0].token_ids
    assert different != alone


def test_out_of_vocab_prompt_and_param_count(llm):
    with pytest.raises(ValueError, match=r"prompt_token_ids: 512 is not a token id in \[0, 512\)"):
        llm.generate([[3, 512]], GREEDY)
    with pytest.raises(ValueError, match="params: 2 sampling params for 1 prompts"):
        llm.generate([[3, 4]], [GREEDY, GREEDY])


def test_chunked_prefill_attention_equals_full_prefill(llm):
    """A prompt computed in two chunks (the second attending to the cached first) gives the same logits."""
    model, caches = llm.model, llm.runner.kv_caches
    ids = torch.tensor(random_prompts([37], seed=8)[0])
    blocks = llm.blocks
    table = blocks.allocate("chunk", 37)
    try:
        slots = torch.tensor(blocks.slot_mapping("chunk", 0, 37))
        bt = torch.tensor([table])
        with torch.inference_mode():
            full = model.compute_logits(model(ids, torch.arange(37), None,
                                              AttentionMetadata(slots, [37], [37], None)))
            model(ids[:20], torch.arange(20), caches, AttentionMetadata(slots[:20], [20], [20], bt))
            meta = AttentionMetadata(slots[20:], [17], [37], bt, torch.tensor([37]))
            assert not meta.is_fresh_prefill and not meta.is_decode
            second = model.compute_logits(model(ids[20:], torch.arange(20, 37), caches, meta))
        torch.testing.assert_close(second, full[20:], rtol=1e-5, atol=1e-5)
    finally:
        blocks.free("chunk")


def test_stream_deltas_add_up_to_text_and_context_limit_releases_held_text():
    llm = LLM("tiny", device="cpu", max_model_len=40)
    full = llm.generate("Stream the prefill", GREEDY)[0]
    assert full.finish_reason == "length"
    # A stop string that never matches but whose first character occurs in the text: held back, then released.
    stop = full.text[-1] + "\x00never"
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[stop])
    deltas, done = [], []
    for index, delta, out in llm.stream(["Stream the prefill"], params):
        assert index == 0
        deltas.append(delta)
        done += [out] if out is not None else []
    assert len(done) == 1 and done[0].finish_reason == "length"
    assert "".join(deltas) == done[0].text == full.text


@pytest.mark.parametrize("budget", [16, 64])
def test_chunked_prefill_splitfuse_matches_and_fuses(ckpt, llm, budget):
    """Prompts longer than the token budget are split over steps and fused with running decodes; same tokens."""
    prompts = random_prompts([50, 7, 33, 12, 70], seed=12)
    expected = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    fused = LLM(ckpt, device="cpu", block_size=8, chunked_prefill=True, max_num_batched_tokens=budget)
    seen_mixed = []
    step = fused.core.step

    def recording_step():
        before = [(s.seq_id, s.num_computed_tokens) for s in list(fused.core.scheduler.running)]
        outs = step()
        seen_mixed.append(bool(before) and any(o.seq.seq_id not in dict(before) for o in outs))
        return outs

    fused.core.step = recording_step
    outs = fused.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert any(seen_mixed)  # some step finished a prompt while other sequences were decoding
    assert fused.blocks.num_free_blocks == fused.blocks.num_blocks


def test_splitfuse_preempts_and_recomputes_under_a_small_cache(ckpt, llm):
    prompts = random_prompts([30, 12, 25, 7, 18, 22], seed=9)
    expected = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    per_block = 2 * 2 * 8 * 2 * 16 * 4
    small = LLM(ckpt, device="cpu", block_size=8, kv_cache_bytes=18 * per_block, chunked_prefill=True,
                max_num_batched_tokens=24)
    outs = small.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert sum(o.num_preemptions for o in outs) > 0
    assert small.blocks.num_free_blocks == small.blocks.num_blocks


def test_a_request_whose_sampling_fails_fails_alone(llm, monkeypatch):
    """Whatever slips past validation: the failing request finishes with an error, the batch goes on, KV is freed."""
    from splitserve.workers import sampler as sampler_module

    real = sampler_module.Sampler.__call__

    def poisoned(self, logits, requests):
        if any(r.params.seed == 666 for r in requests):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(self, logits, requests)

    prompts = random_prompts([9, 14, 11], seed=4)
    expected = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    monkeypatch.setattr(sampler_module.Sampler, "__call__", poisoned)
    bad = SamplingParams(temperature=1.0, seed=666, max_tokens=40)
    outs = llm.generate(prompts, [GREEDY, bad, GREEDY])
    assert [outs[0].token_ids, outs[2].token_ids] == [expected[0], expected[2]]
    assert outs[1].finish_reason == "error" and outs[1].token_ids == [] and "inf, nan" in outs[1].error
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


def test_requests_that_can_never_produce_a_token_are_refused(llm):
    vocab = llm.model.cfg.vocab_size
    with pytest.raises(ValueError, match="stop_token_ids: with min_tokens=1 every token of the vocabulary"):
        llm.generate([[3, 4]], SamplingParams(min_tokens=1, stop_token_ids=tuple(range(vocab))))
    # With ignore_eos the eos stays allowed... unless it is a stop id too; min_tokens=0 can always stop at once.
    assert llm.generate([[3, 4]], SamplingParams(max_tokens=2, stop_token_ids=tuple(range(vocab))))[0].token_ids
