"""One rank's forward in a pipeline-parallel instance: the residual stream arrives from the previous stage, this
stage's layers run (their K/V into this stage's cache), the stream goes on to the next stage, and the last stage's
logits go back to the leader, which samples. Point-to-point on the instance's process group; each TP rank talks to
the same TP rank of the neighbouring stages (every TP rank holds the whole residual stream).

A batch of several sequences flows as up to PP micro-batches (cut at sequence boundaries, near-equal in tokens):
while a stage computes micro-batch i + 1, the next stage computes micro-batch i."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from splitserve.comm.overlap import restrict_rows
from splitserve.workers.batch import ForwardBatch
from splitserve.workers.model_runner import ModelRunner

LOGITS_TAG = 1 << 20  # apart from the micro-batch tags (0 .. pp - 1)


@dataclass(frozen=True)
class StagePosition:
    """Where a rank sits: stage `stage` of `pp`, SP rank `sp_rank` of `sp` and TP rank `tp_rank` of `tp` in it
    (global rank = stage·SP·TP + sp_rank·TP + tp_rank)."""

    stage: int
    pp: int
    tp_rank: int
    tp: int
    sp_rank: int = 0
    sp: int = 1

    @classmethod
    def of(cls, rank: int, pp: int, tp: int, sp: int = 1) -> StagePosition:
        stage, rest = divmod(rank, sp * tp)
        return cls(stage, pp, rest % tp, tp, rest // tp, sp)

    def rank_of(self, stage: int) -> int:
        """This rank's counterpart (same SP and TP rank) in `stage`."""
        return (stage * self.sp + self.sp_rank) * self.tp + self.tp_rank

    @property
    def leader(self) -> bool:
        return self.stage == 0 and self.sp_rank == 0 and self.tp_rank == 0

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
        self._logit_sends: list[tuple] = []  # last stage, TP rank 0: logits on their way to the leader

    @torch.inference_mode()
    def forward_logits(self, batch: ForwardBatch, on_kv_written=None) -> torch.Tensor | None:
        """Float32 logits [len(sample_rows), vocab] on the leader (global rank 0); None on every other rank."""
        self.launch(batch, on_kv_written)
        return self.collect(batch) if self.pos.leader else None

    @torch.inference_mode()
    def launch(self, batch: ForwardBatch, on_kv_written=None) -> None:
        """This stage's share of `batch`: its micro-batches in from the previous stage, through this stage's layers,
        on to the next; the last stage sends the logits to the leader without waiting for it to take them (the
        leader collects them after launching later batches: `collect`)."""
        runner, pos = self.runner, self.pos
        meta = runner._metadata(batch)
        ids, positions = runner._tensor(batch.input_ids), runner._tensor(batch.positions)
        parts = micro_batches(batch.query_lens, batch.micro_batches or pos.pp)
        block_size = runner.kv_caches[0].shape[2]
        prev, next_ = pos.rank_of(pos.stage - 1), pos.rank_of(pos.stage + 1)
        inbox = []
        if not pos.first:  # every micro-batch's receive is posted at once; each is waited for when its turn comes
            for i, (lo, hi) in enumerate(parts):
                buf = torch.empty(hi - lo, self.hidden_size, dtype=self.dtype, device=runner.device)
                inbox.append((dist.irecv(buf, src=prev, tag=i), buf))
        outs, sends = [], []
        for i, (lo, hi) in enumerate(parts):
            part = meta if len(parts) == 1 else restrict_rows(meta, lo, hi, block_size)
            # A layer's KV is complete (and may be pushed) once the last micro-batch has written it.
            part.on_kv_written = on_kv_written if i == len(parts) - 1 else None
            residual = None
            if inbox:
                inbox[i][0].wait()
                residual = inbox[i][1]
            out = runner.model(ids[lo:hi], positions[lo:hi], runner.kv_caches, part, residual)
            if pos.last:
                outs.append(out)
            else:
                out = out.contiguous()
                sends.append((dist.isend(out, dst=next_, tag=i), out))
        for work, _ in sends:
            work.wait()
        rows = batch.sample_rows
        if not (pos.last and rows):
            return
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        logits = runner.model.compute_logits(out[runner._tensor(rows)])  # every TP rank (the head may be sharded)
        if pos.tp_rank == 0:
            # The leader takes these after launching up to pp - 1 later batches, and it broadcasts each of those to
            # this rank first: a blocking send here would wait for the leader while the leader waits for this
            # rank. Sends older than that have been taken, so waiting for them never blocks.
            while len(self._logit_sends) >= pos.pp:
                self._logit_sends.pop(0)[0].wait()
            logits = logits.contiguous()
            self._logit_sends.append((dist.isend(logits, dst=0, tag=LOGITS_TAG), logits))

    @torch.inference_mode()
    def collect(self, batch: ForwardBatch) -> torch.Tensor:
        """On the leader: the logits of the oldest launched batch not collected yet (batches come back in launch
        order)."""
        rows = batch.sample_rows
        logits = torch.empty(len(rows), self.vocab_size, dtype=torch.float32, device=self.runner.device)
        if rows:
            dist.recv(logits, src=self.pos.rank_of(self.pos.pp - 1), tag=LOGITS_TAG)
        return logits


def micro_batches(query_lens: list[int], pp: int) -> list[tuple[int, int]]:
    """Token ranges [lo, hi) of up to `pp` micro-batches of whole sequences, each near total / pp tokens."""
    count = min(pp, len(query_lens))
    total = sum(query_lens)
    bounds, start, done = [], 0, 0
    for i, n in enumerate(query_lens):
        done += n
        left = len(query_lens) - i - 1  # sequences after this one
        cuts_needed = count - 1 - len(bounds)
        if cuts_needed and (done >= total * (len(bounds) + 1) / count or left == cuts_needed):
            bounds.append((start, done))
            start = done
    bounds.append((start, total))
    return bounds
