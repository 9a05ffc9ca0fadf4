"""Prefill engine: batches prompts up to a token budget, writes their KV into the cache, samples first tokens."""
from __future__ import annotations

from dataclasses import dataclass

from splitserve.workers.batch import build_batch
from splitserve.workers.block_manager import BlockManager
from splitserve.workers.model_runner import ModelRunner
from splitserve.workers.sampler import FAILED_TOKEN
from splitserve.workers.scheduler import PrefillScheduler
from splitserve.workers.sequence import Sequence
from splitserve.workers.stop import StepResult


@dataclass
class EngineOutput:
    """One new token of one sequence, with its text delta and, if it ended the request, why."""

    seq: Sequence
    token_id: int
    result: StepResult
    position: int = -1  # the token's index among the sequence's outputs (a step may append two to one sequence)


def check_context(num_tokens: int, context_len: int) -> None:
    """The one context-length rule of the engines: a prompt must leave room for at least one new token."""
    if num_tokens >= context_len:
        raise ValueError(f"prompt: {num_tokens} tokens leave no room to generate within max_model_len={context_len}")


def append_and_check(seq: Sequence, token_id: int, max_model_len: int) -> EngineOutput:
    position = len(seq.output_token_ids)
    if token_id == FAILED_TOKEN:  # this request alone fails; its blocks are freed like any finished request's
        result = seq.stop.finish("error")
        seq.finish()
        return EngineOutput(seq, token_id, result, position)
    result = seq.append_token(token_id)
    if not result.finished and seq.num_tokens >= max_model_len:
        tail = seq.finish_length()
        result = StepResult(result.text_delta + tail.text_delta, True, "length", None)
    return EngineOutput(seq, token_id, result, position)


class PrefillEngine:
    def __init__(self, runner: ModelRunner, blocks: BlockManager, max_batched_tokens: int, max_seqs: int,
                 max_model_len: int):
        self.runner = runner
        self.blocks = blocks
        self.max_model_len = max_model_len
        self.scheduler = PrefillScheduler(blocks, max_batched_tokens, max_seqs)

    def add(self, seq: Sequence, front: bool = False) -> None:
        check_context(seq.num_tokens, self.max_model_len)
        self.scheduler.add(seq, front)  # which checks that the prompt fits the cache

    def check_fits(self, seq: Sequence) -> None:
        check_context(seq.num_tokens, self.max_model_len)
        self.scheduler.check_fits(seq)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return 0  # a prompt batch runs within one step

    def has_unfinished(self) -> bool:
        return self.num_waiting > 0

    def step(self, reserve_blocks: int = 0) -> list[EngineOutput]:
        """Prefills one batch; `reserve_blocks` stay free for sequences already decoding on this cache."""
        seqs = self.scheduler.schedule(reserve_blocks)
        if not seqs:
            return []
        tokens = self.runner.run(build_batch(seqs, self.blocks), seqs)
        outputs = []
        for seq, token in zip(seqs, tokens):
            seq.num_computed_tokens = seq.num_tokens
            self.blocks.commit(seq.seq_id, seq.token_ids)  # before the new token, whose KV is not computed yet
            out = append_and_check(seq, token, self.max_model_len)
            if out.result.finished:
                self.blocks.free(seq.seq_id)
            outputs.append(out)
        return outputs

    def abort(self, seq_id: str) -> Sequence | None:
        return self.scheduler.abort(seq_id)
