"""Decode engine: continuous batching over the paged cache; preempts (recompute) rather than fail when out of blocks."""
from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.workers.batch import build_batch
from splitserve.workers.block_manager import BlockManager
from splitserve.workers.model_runner import ModelRunner
from splitserve.workers.prefill_engine import EngineOutput, append_and_check
from splitserve.workers.scheduler import DecodeScheduler
from splitserve.workers.sequence import Sequence


@dataclass
class DecodeStep:
    outputs: list[EngineOutput] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)  # lost their KV; must be prefilled again


class DecodeEngine:
    def __init__(self, runner: ModelRunner, blocks: BlockManager, max_seqs: int, max_model_len: int):
        self.runner = runner
        self.blocks = blocks
        self.max_model_len = max_model_len
        self.scheduler = DecodeScheduler(blocks, max_seqs)

    def add(self, seq: Sequence) -> None:
        """Admits a sequence whose KV (all tokens but the last sampled one) is in this engine's cache."""
        assert seq.num_computed_tokens == seq.num_tokens - 1
        self.scheduler.add(seq)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_unfinished(self) -> int:
        return self.scheduler.num_unfinished

    def step(self) -> DecodeStep:
        seqs, preempted = self.scheduler.schedule()
        step = DecodeStep(preempted=preempted)
        if not seqs:
            return step
        tokens = self.runner.run(build_batch(seqs, self.blocks), seqs)
        for seq, token in zip(seqs, tokens):
            seq.num_computed_tokens = seq.num_tokens
            self.blocks.commit(seq.seq_id, seq.token_ids)  # before the new token, whose KV is not computed yet
            out = append_and_check(seq, token, self.max_model_len)
            if out.result.finished:
                self.scheduler.retire(seq)
            step.outputs.append(out)
        return step

    def abort(self, seq_id: str) -> Sequence | None:
        return self.scheduler.abort(seq_id)
