"""Decode engine: continuous batching over the paged cache; preempts (recompute) rather than fail when out of blocks.
Over pipeline stages, several batches are in flight at once (`PipelinedDecodeEngine`)."""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from splitserve.workers.batch import ForwardBatch, build_batch
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
        self._advance(seqs, tokens, step)
        return step

    def _advance(self, seqs: list[Sequence], tokens: list[int], step: DecodeStep) -> None:
        for seq, token in zip(seqs, tokens):
            seq.num_computed_tokens = seq.num_tokens
            self.blocks.commit(seq.seq_id, seq.token_ids)  # before the new token, whose KV is not computed yet
            out = append_and_check(seq, token, self.max_model_len)
            if out.result.finished:
                self.scheduler.retire(seq)
            step.outputs.append(out)

    def abort(self, seq_id: str) -> Sequence | None:
        return self.scheduler.abort(seq_id)

    def in_flight(self, seq_id: str) -> bool:
        """Whether a forward still writes this sequence's KV (its blocks must not be freed yet)."""
        return False

    def flush(self) -> None:
        """Finishes every forward in flight (none here)."""


class PipelinedDecodeEngine(DecodeEngine):
    """Decode over `depth` pipeline stages with up to `depth` batches in flight (DistServe's inter-op decode).
    The running sequences form up to `depth` groups; a group's next step enters the first stage as soon as its
    tokens are sampled, while the other groups are in later stages, so every stage works on some group at once
    instead of each step paying the whole pipeline alone.

    `launch(batch, seqs)` starts a forward through the pipeline; `collect(batch) -> logits` returns the oldest
    launched batch's logits (batches come back in launch order). A sequence is in one group at a time and is not
    scheduled or preempted while its group is in flight. Whatever must not race with a forward in flight (an abort,
    which frees blocks; a prompt forward, which runs through the pipeline alone) first takes every group back with
    `flush`; their outputs come out of the next `step`."""

    def __init__(self, runner: ModelRunner, blocks: BlockManager, max_seqs: int, max_model_len: int, launch,
                 collect, depth: int):
        super().__init__(runner, blocks, max_seqs, max_model_len)
        self.launch, self.collect, self.depth = launch, collect, depth
        self.groups: deque[tuple[ForwardBatch, list[Sequence]]] = deque()
        self._busy: set[str] = set()
        self._done = DecodeStep()  # outputs of groups taken back by `flush`, not yet returned
        self.max_in_flight = 0  # the most groups in the pipeline at once so far (a stat)

    @property
    def num_unfinished(self) -> int:
        return self.scheduler.num_unfinished + (1 if self._done.outputs else 0)

    def in_flight(self, seq_id: str) -> bool:
        return seq_id in self._busy

    def step(self) -> DecodeStep:
        """Launches groups while a stage slot is free and sequences are idle, then takes back the oldest group."""
        step, self._done = self._done, DecodeStep()
        while len(self.groups) < self.depth:
            # Near-equal groups: each takes its share of all running sequences, in flight or not.
            share = math.ceil((len(self.scheduler.running) + len(self.scheduler.waiting)) / self.depth)
            seqs, preempted = self.scheduler.schedule(frozenset(self._busy), max(share, 1))
            step.preempted += preempted
            if not seqs:
                break
            batch = build_batch(seqs, self.blocks)
            batch.micro_batches = 1  # the groups are the pipeline's micro-batches
            self.launch(batch, seqs)
            self.groups.append((batch, seqs))
            self._busy.update(s.seq_id for s in seqs)
            self.max_in_flight = max(self.max_in_flight, len(self.groups))
        if self.groups:
            self._take_back(step)
        return step

    def flush(self) -> None:
        """Takes back every group in flight; their outputs come out of the next `step`."""
        while self.groups:
            self._take_back(self._done)

    def _take_back(self, step: DecodeStep) -> None:
        batch, seqs = self.groups.popleft()
        logits = self.collect(batch)
        self._busy.difference_update(s.seq_id for s in seqs)
        self._advance(seqs, self.runner.sample(logits, seqs), step)

    def abort(self, seq_id: str) -> Sequence | None:
        if seq_id in self._busy:
            self.flush()  # its blocks may be freed only once no stage writes them any more
            self._done.outputs = [o for o in self._done.outputs if o.seq.seq_id != seq_id]
        return self.scheduler.abort(seq_id)
