"""Decode with several batches in flight over pipeline stages (`PipelinedDecodeEngine`), in one process: a stand-in
pipeline runs each launched batch's forward and hands the logits back only when collected, in launch order. The
tokens equal the plain engine's under concurrency, preemption and aborts of sequences in flight; groups are
disjoint, fill the pipeline, and an abort frees its blocks only after no forward holds them."""
import pytest

from hf_checkpoints import random_prompts, write_checkpoint
from splitserve.workers.decode_engine import PipelinedDecodeEngine
from splitserve.workers.engine_builder import build_engine
from splitserve.workers.engine_config import EngineConfig
from splitserve.workers.llm import LLM
from splitserve.workers.sampling_params import SamplingParams

BLOCK = 8
PER_BLOCK = 2 * 2 * BLOCK * 2 * 16 * 4  # K,V x layers x slots x KV heads x head_dim x float32 (the test model)


class StandInPipeline:
    """Runs a launched batch at once and keeps its logits until collected; records what was in flight."""

    def __init__(self, runner):
        self.runner = runner
        self.queue = []  # (batch, seq ids, logits) in launch order
        self.max_in_flight = 0
        self.launches = 0

    def launch(self, batch, seqs):
        ids = {s.seq_id for s in seqs}
        for _, other, _ in self.queue:
            assert not ids & other, "a sequence in two batches in flight"
        assert batch.micro_batches == 1
        self.queue.append((batch, ids, self.runner.forward_logits(batch)))
        self.launches += 1
        self.max_in_flight = max(self.max_in_flight, len(self.queue))

    def collect(self, batch):
        launched, _, logits = self.queue.pop(0)
        assert launched is batch, "batches are collected in launch order"
        return logits


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(write_checkpoint("llama", tmp_path_factory.mktemp("llama"), seed=5))


def pipelined(ckpt, depth, kv_blocks=None):
    """An LLM whose engine is a decode instance's: prompts recomputed in place, decode pipelined `depth` deep."""
    llm = LLM(ckpt, device="cpu", block_size=BLOCK, **({"kv_cache_bytes": kv_blocks * PER_BLOCK} if kv_blocks else {}))
    stand_in = StandInPipeline(llm.runner)
    config = EngineConfig(block_size=BLOCK)
    llm.core = build_engine("decode", llm.runner, llm.blocks.num_blocks, config, llm.max_model_len,
                            pipeline=(stand_in.launch, stand_in.collect, depth))
    llm.blocks = llm.core.blocks
    assert isinstance(llm.core.decode, PipelinedDecodeEngine) and llm.core.decode.depth == depth
    return llm, stand_in


def workload(n, seed):
    prompts = random_prompts([5 + (7 * i) % 23 for i in range(n)], seed=seed)
    params = [SamplingParams(temperature=0.0, max_tokens=12 + (5 * i) % 17, ignore_eos=True) for i in range(n)]
    return prompts, params


@pytest.mark.parametrize("depth", [2, 3])
def test_groups_in_flight_give_the_plain_tokens(ckpt, depth):
    prompts, params = workload(9, seed=3)
    expected = [o.token_ids for o in LLM(ckpt, device="cpu", block_size=BLOCK).generate(prompts, params)]
    llm, stand_in = pipelined(ckpt, depth)
    assert [o.token_ids for o in llm.generate(prompts, params)] == expected
    assert stand_in.max_in_flight == depth  # the pipeline was full
    assert not stand_in.queue and llm.blocks.num_free_blocks == llm.blocks.num_blocks


def test_preemption_spares_sequences_in_flight(ckpt):
    prompts, params = workload(8, seed=11)
    expected = [o.token_ids for o in LLM(ckpt, device="cpu", block_size=BLOCK).generate(prompts, params)]
    llm, stand_in = pipelined(ckpt, 2, kv_blocks=14)  # ~24 blocks needed at the end: decodes are preempted
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == expected
    assert sum(o.num_preemptions for o in outs) > 0 and stand_in.max_in_flight == 2
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


def test_abort_in_flight_takes_the_pipeline_back_first(ckpt):
    prompts, params = workload(6, seed=21)
    expected = [o.token_ids for o in LLM(ckpt, device="cpu", block_size=BLOCK).generate(prompts, params)]
    llm, stand_in = pipelined(ckpt, 3)
    seqs = llm._admit(prompts, params)
    for _ in range(200):  # until decode groups are in flight
        llm.step()
        if len(llm.core.decode.groups) >= 2:
            break
    decode = llm.core.decode
    victim = next(s for s in seqs if decode.in_flight(s.seq_id))
    llm.core.abort(victim.seq_id)
    assert not decode.groups and not stand_in.queue  # every group came back before the blocks were freed
    assert not llm.blocks.has(victim.seq_id)
    llm.run_until_done()
    for seq, tokens in zip(seqs, expected):
        if seq is victim:
            assert len(seq.output_token_ids) < len(tokens)
        else:
            assert seq.output_token_ids == tokens, "a taken-back group's tokens were lost or changed"
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


def test_one_batch_in_flight_is_the_plain_engine(ckpt):
    llm = LLM(ckpt, device="cpu", block_size=BLOCK)
    config = EngineConfig(block_size=BLOCK, decode_batches_in_flight=1)
    core = build_engine("decode", llm.runner, llm.blocks.num_blocks, config, llm.max_model_len,
                        pipeline=(None, None, 4))
    assert not isinstance(core.decode, PipelinedDecodeEngine)
    with pytest.raises(ValueError, match="'engine.decode_batches_in_flight' must be an integer >= 1, got 0"):
        EngineConfig(decode_batches_in_flight=0).validate("engine")
