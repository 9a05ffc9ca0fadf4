"""One rank's forward in a pipeline-parallel instance: the residual stream arrives from the previous stage, this
stage's layers run (their K/V into this stage's cache), the stream goes on to the next stage, and the last stage's
logits go back to the leader, which samples. Point-to-point on the instance's process group; each TP rank talks to
the same TP rank of the neighbouring stages (every TP rank holds the whole residual stream).

A batch of several sequences flows as up to PP micro-batches (cut at sequence boundaries, near-equal in tokens):
while a stage computes micro-batch i + 1, the next stage computes micro-batch i. A decode leader may launch the
next batch before the last one's logits are back (see decode_engine.PipelinedDecodeEngine).

Each step's metadata travels the pipeline too, not by a broadcast: a broadcast would hold the leader until the last
stage finished its earlier batch, and no two batches could be in flight. The leader sends it to the other ranks of
stage 0 and to its counterpart in stage 1; every other rank receives it from its counterpart in the stage before and
passes it on before it computes. No send waits for its receiver: each is completed later (a rank waits for its
oldest sends only when many are outstanding, and a receiver takes messages in order), so a stage never holds the one
before it."""
from __future__ import annotations

import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist

from splitserve.comm.overlap import restrict_rows
from splitserve.workers.batch import ForwardBatch
from splitserve.workers.model_runner import ModelRunner

LOGITS_TAG = 1 << 20  # apart from the micro-batch tags (0 .. pp - 1)
CONTROL_SIZE_TAG, CONTROL_TAG = LOGITS_TAG + 1, LOGITS_TAG + 2


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

    @property
    def control_source(self) -> int:
        """The rank this one receives each step's metadata from: the leader within stage 0, else its counterpart
        in the stage before."""
        return 0 if self.first else self.rank_of(self.stage - 1)

    @property
    def control_targets(self) -> list[int]:
        """The ranks this one passes each step's metadata to (see `control_source`)."""
        targets = list(range(1, self.sp * self.tp)) if self.leader else []
        return targets + ([] if self.last else [self.rank_of(self.stage + 1)])


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
        self._sends: list[tuple] = []  # activations and metadata on their way to later stages, not yet completed
        device = runner.device
        # Metadata moves as bytes on the group's device (NCCL moves device tensors only).
        self._control_device = device if device.type == "cuda" else torch.device("cpu")

    # --------------------------------------------------------------------------------------- metadata
    def send_control(self, message) -> None:
        """On the leader: one step's metadata (or the stop message) into the pipeline."""
        self._pass_on(pickle.dumps(message))

    def receive_control(self):
        """On every other rank: the next step's metadata, passed on to the next stage before it is returned."""
        src = self.pos.control_source
        size = torch.empty(1, dtype=torch.long, device=self._control_device)
        dist.recv(size, src=src, tag=CONTROL_SIZE_TAG)
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=self._control_device)
        dist.recv(data, src=src, tag=CONTROL_TAG)
        payload = data.cpu().numpy().tobytes()
        self._pass_on(payload)
        return pickle.loads(payload)

    def _pass_on(self, payload: bytes) -> None:
        if not self.pos.control_targets:
            return
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self._control_device)
        size = torch.tensor([data.numel()], dtype=torch.long, device=self._control_device)
        for dst in self.pos.control_targets:
            self._sending(dist.isend(size, dst=dst, tag=CONTROL_SIZE_TAG), size)
            self._sending(dist.isend(data, dst=dst, tag=CONTROL_TAG), data)

    def drain(self) -> None:
        """Waits for every send of this rank (the leader must have collected all logits first)."""
        for work, _ in self._sends + self._logit_sends:
            work.wait()
        self._sends, self._logit_sends = [], []

    def _sending(self, work, tensor) -> None:
        """Keeps a send's buffer until it completes. The receivers take messages in order and never wait for this
        rank, so waiting for the oldest of many outstanding sends cannot deadlock; finished ones are let go."""
        self._sends.append((work, tensor))
        while self._sends and self._sends[0][0].is_completed():
            self._sends.pop(0)
        while len(self._sends) > 8 * (self.pos.sp * self.pos.tp + 1) * self.pos.pp:
            self._sends.pop(0)[0].wait()

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
        outs = []
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
                self._sending(dist.isend(out, dst=next_, tag=i), out)
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
