"""One rank's forward in a pipeline-parallel instance: the residual stream arrives from the previous stage, this
stage's layers run (their K/V into this stage's cache), the stream goes on to the next stage, and the last stage's
logits go back to the leader, which samples. Point-to-point on the instance's process group; each TP rank talks to
the same TP rank of the neighbouring stages (every TP rank holds the whole residual stream)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from splitserve.workers.batch import ForwardBatch
from splitserve.workers.model_runner import ModelRunner


@dataclass(frozen=True)
class StagePosition:
    """Where a rank sits: stage `stage` of `pp`, TP rank `tp_rank` of `tp` (global rank = stage·tp + tp_rank)."""

    stage: int
    pp: int
    tp_rank: int
    tp: int

    @classmethod
    def of(cls, rank: int, pp: int, tp: int) -> "StagePosition":
        return cls(rank // tp, pp, rank % tp, tp)

    def rank_of(self, stage: int) -> int:
        return stage * self.tp + self.tp_rank

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.pp - 1


def stage_groups(rank: int, pp: int, tp: int):
    """This rank's TP group (the TP ranks of its stage). Collective: every rank creates every stage's group, in
    the same order."""
    from splitserve.comm.tensor_parallel import TPGroup

    mine = TPGroup()
    for stage in range(pp):
        ranks = [stage * tp + t for t in range(tp)]
        group = dist.new_group(ranks) if tp > 1 else None
        if rank in ranks and tp > 1:
            mine = TPGroup(ranks.index(rank), tp, group)
    return mine


class PipelineStage:
    def __init__(self, runner: ModelRunner, position: StagePosition):
        self.runner, self.pos = runner, position
        cfg = runner.model.cfg
        self.hidden_size, self.vocab_size = cfg.hidden_size, cfg.vocab_size
        self.dtype = next(runner.model.parameters()).dtype

    @torch.inference_mode()
    def forward_logits(self, batch: ForwardBatch, on_kv_written=None) -> torch.Tensor | None:
        """Float32 logits [len(sample_rows), vocab] on the leader (global rank 0); None on every other rank."""
        runner, pos = self.runner, self.pos
        meta = runner._metadata(batch)
        meta.on_kv_written = on_kv_written
        ids, positions = runner._tensor(batch.input_ids), runner._tensor(batch.positions)
        residual = None
        if not pos.first:
            residual = torch.empty(len(batch.input_ids), self.hidden_size, dtype=self.dtype, device=runner.device)
            dist.recv(residual, src=pos.rank_of(pos.stage - 1))
        out = runner.model(ids, positions, runner.kv_caches, meta, residual)
        if not pos.last:
            dist.send(out.contiguous(), dst=pos.rank_of(pos.stage + 1))
        rows = batch.sample_rows
        leader = pos.first and pos.tp_rank == 0
        if pos.last:
            logits = runner.model.compute_logits(out[runner._tensor(rows)]) if rows else None
            if pos.tp_rank == 0 and rows:
                dist.send(logits.contiguous(), dst=0)
            return None
        if leader and rows:
            logits = torch.empty(len(rows), self.vocab_size, dtype=torch.float32, device=runner.device)
            dist.recv(logits, src=pos.rank_of(pos.pp - 1))
            return logits
        if leader:
            return torch.empty(0, self.vocab_size, dtype=torch.float32, device=runner.device)
        return None
