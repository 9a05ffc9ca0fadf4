"""Prefix reuse in the in-process engines: a prompt whose prefix is cached computes only the rest, attending to the
cached KV through the paged cache, and the tokens still equal transformers (float32, CPU)."""
import pytest

from hf_checkpoints import hf_greedy, hf_model, random_prompts, write_checkpoint
from splitserve.workers.llm import LLM
from splitserve.workers.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
BS = 8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    # mistral: a sliding window (12) shorter than the cached prefixes
    return {k: write_checkpoint(k, tmp_path_factory.mktemp(k), seed=5) for k in ("llama", "mistral")}


def _computed_tokens(llm: LLM) -> list[int]:
    """Records how many tokens each forward computes."""
    seen, run = [], llm.runner.run

    def recording(batch, seqs):
        seen.append(batch.num_tokens)
        return run(batch, seqs)

    llm.runner.run = recording
    return seen


@pytest.mark.parametrize("backend", ["native", "transformers"])
@pytest.mark.parametrize("chunked", [False, True], ids=["alternating", "splitfuse"])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_multiturn_conversation_reuses_history_and_matches_transformers(checkpoints, kind, chunked, backend):
    hf = hf_model(checkpoints[kind])
    llm = LLM(str(checkpoints[kind]), device="cpu", block_size=BS, chunked_prefill=chunked,
              max_num_batched_tokens=24 if chunked else 4096, backend=backend)
    computed = _computed_tokens(llm)
    system, *messages = random_prompts([21, 6, 9, 5], seed=11)
    prompt, history_kv = system, 0  # tokens of the conversation whose KV the last turn computed
    for turn, message in enumerate(messages):
        prompt = prompt + message
        out = llm.generate(prompt, GREEDY)[0]
        assert out.token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens), f"turn {turn}"
        # The full blocks of the history (prompt and answer, but the last answer token was never fed), short of
        # the block that holds the new prompt's last token.
        assert out.cached_tokens == min(history_kv // BS, (len(prompt) - 1) // BS) * BS, f"turn {turn}"
        history_kv = len(prompt) + len(out.token_ids) - 1
        prompt = prompt + out.token_ids
        assert llm.blocks.num_used_blocks == 0 and llm.blocks.num_cached_blocks > 0
    # Fewer tokens computed than the prompts had: the later turns computed only their new messages.
    total_prompts = sum(len(system) + sum(len(m) + GREEDY.max_tokens for m in messages[:i + 1]) - GREEDY.max_tokens
                        for i in range(len(messages)))
    assert sum(computed) - len(messages) * (GREEDY.max_tokens - 1) < total_prompts / 2


def test_shared_system_prompt_in_one_batch_and_a_fully_cached_prompt(checkpoints):
    hf = hf_model(checkpoints["llama"])
    llm = LLM(str(checkpoints["llama"]), device="cpu", block_size=BS)
    system = random_prompts([24], seed=13)[0]
    first = llm.generate(system, GREEDY)[0]
    assert first.token_ids == hf_greedy(hf, system, GREEDY.max_tokens)
    # The same 24 tokens again: all 3 blocks are cached, yet the last one is recomputed for the logits.
    again = llm.generate(system, GREEDY)[0]
    assert again.token_ids == first.token_ids and again.cached_tokens == 16
    prompts = [system + tail for tail in random_prompts([3, 11, 1], seed=4)]
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens)
        assert out.cached_tokens == 24
    assert llm.blocks.num_used_blocks == 0


def test_caching_off_computes_everything_with_the_same_tokens(checkpoints):
    ckpt = str(checkpoints["llama"])
    prompts = [p + q for p, q in zip(random_prompts([17] * 3, seed=6)[:1] * 3, random_prompts([4, 9, 2], seed=7))]
    on, off = LLM(ckpt, device="cpu", block_size=BS), LLM(ckpt, device="cpu", block_size=BS, prefix_caching=False)
    for llm in (on, off):
        llm.generate(prompts[0], GREEDY)
    outs_on, outs_off = on.generate(prompts[1:], GREEDY), off.generate(prompts[1:], GREEDY)
    assert [o.token_ids for o in outs_on] == [o.token_ids for o in outs_off]
    assert [o.cached_tokens for o in outs_on] == [16, 16] and [o.cached_tokens for o in outs_off] == [0, 0]
    assert off.blocks.num_cached_blocks == 0


def test_prefix_caching_must_be_a_bool():
    with pytest.raises(ValueError, match="prefix_caching"):
        LLM("tiny", device="cpu", prefix_caching="yes")


def test_small_cache_evicts_and_preempts_without_stale_hits(checkpoints):
    """A cache of 10 blocks: conversations evict each other's history; preemption recomputes; tokens stay exact."""
    ckpt = str(checkpoints["llama"])
    per_block = 2 * 2 * BS * 2 * 16 * 4
    small = LLM(ckpt, device="cpu", block_size=BS, kv_cache_bytes=10 * per_block)
    big = LLM(ckpt, device="cpu", block_size=BS, prefix_caching=False)
    assert small.blocks.num_blocks == 10
    small.blocks.record_events = True
    heads = random_prompts([20, 18, 22], seed=8)
    preemptions = 0
    for round_ in range(2):
        prompts = [h + t for h, t in zip(heads, random_prompts([3, 5, 2], seed=20 + round_))]
        params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
        outs = small.generate(prompts, params)
        assert [o.token_ids for o in outs] == [o.token_ids for o in big.generate(prompts, params)]
        assert small.blocks.num_used_blocks == 0
        preemptions += sum(o.num_preemptions for o in outs)
    assert preemptions > 0, "nothing was preempted: the cache was not small enough to test preemption"
    assert sum(o.cached_tokens for o in outs) > 0  # the second round still found some of the heads cached
    evicted = [h for stored, h in small.blocks.take_events() if not stored]
    assert evicted, "nothing was evicted: the cache was not small enough to test eviction"
