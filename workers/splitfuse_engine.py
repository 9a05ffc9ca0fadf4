"""The colocated engine with chunked prefill (Dynamic SplitFuse): one forward a step, mixing decode tokens and
prompt chunks under one token budget; the baseline that disaggregation is measured against."""
from __future__ import annotations

from splitserve.workers.batch import build_batch
from splitserve.workers.block_manager import BlockManager
from splitserve.workers.model_runner import ModelRunner
from splitserve.workers.prefill_engine import EngineOutput, append_and_check, check_context
from splitserve.workers.scheduler import SplitFuseScheduler
from splitserve.workers.sequence import Sequence


class SplitFuseEngine:
    def __init__(self, runner: ModelRunner, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int):
        self.runner = runner
        self.blocks = blocks
        self.max_model_len = max_model_len
        self.scheduler = SplitFuseScheduler(blocks, max_num_batched_tokens, max_num_seqs)
        self.num_preemptions = 0  # decodes sent back to be recomputed, for the instance's stats

    def add(self, seq: Sequence, front: bool = False) -> None:
        check_context(seq.num_tokens, self.max_model_len)
        self.scheduler.prompts.add(seq, front)  # which checks that the prompt fits the cache

    def check_fits(self, seq: Sequence) -> None:
        check_context(seq.num_tokens, self.max_model_len)
        self.scheduler.prompts.check_fits(seq)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def step(self) -> list[EngineOutput]:
        batch, preempted = self.scheduler.schedule()
        self.num_preemptions += len(preempted)
        if not batch:
            return []
        seqs = [seq for seq, _ in batch]
        forward = build_batch(seqs, self.blocks, [n for _, n in batch])
        tokens = iter(self.runner.run(forward, seqs))
        outputs = []
        for (seq, n), done in zip(batch, forward.completes):
            prompt = seq.num_computed_tokens + n >= seq.num_tokens and seq not in self.scheduler.running
            seq.num_computed_tokens += n
            self.blocks.commit(seq.seq_id, seq.token_ids if done else seq.token_ids[: seq.num_computed_tokens])
            if not done:
                continue
            out = append_and_check(seq, next(tokens), self.max_model_len)
            if out.result.finished:
                self.scheduler.retire(seq)
            elif prompt:
                self.scheduler.started(seq)
            outputs.append(out)
        return outputs

    def abort(self, seq_id: str) -> Sequence | None:
        return self.scheduler.abort(seq_id)
