"""One SP rank's share of a sequence-parallel prefill: shards the leader's (whole-prompt) batch zigzag with chunks
of whole KV blocks, runs the model with ring / TokenRing attention, and brings the last prompt token's hidden state
of every sequence to all ranks so the leader samples the first tokens.

Padding: each prompt is padded to a multiple of 2·SP·block_size (`comm.kv_plan.sp_padded_len`), so each of its KV
blocks is written by exactly one SP rank and moves to decode as a whole block. Padding rows compute but are never
written to the cache, and under causal attention no real query sees them."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from splitserve.comm.kv_plan import sp_padded_len
from splitserve.comm.sequence_parallel import SPGroup
from splitserve.comm.sp_common import ZigzagLayout
from splitserve.workers.batch import ForwardBatch
from splitserve.workers.layers.attention import AttentionMetadata
from splitserve.workers.model import CausalLM


@dataclass(frozen=True)
class SPContext:
    """What attention needs under SP: the layout, the group, the algorithm, and which local rows are real tokens."""

    layout: ZigzagLayout
    group: SPGroup
    algorithm: str
    rows: torch.Tensor  # local rows whose K/V go into the cache (slot_mapping holds their slots, in this order)


@dataclass
class LocalShard:
    input_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    rows: torch.Tensor
    layout: ZigzagLayout
    last_rows: list[tuple[int, int]]  # per sequence: (SP rank, local row) of its last prompt token


def shard_batch(batch: ForwardBatch, sp: SPGroup, block_size: int, max_positions: int, device) -> LocalShard:
    """This SP rank's tokens of a batch of whole fresh prompts."""
    assert batch.query_lens == batch.context_lens, "SP prefill runs whole prompts (no cached prefix, no chunks)"
    lens = batch.query_lens
    layout = ZigzagLayout(tuple(sp_padded_len(n, block_size, sp.size) for n in lens), sp.size)
    pos = layout.positions(sp.rank)
    seq = layout.seq_ids(sp.rank)
    real = pos < torch.tensor(lens)[seq]
    starts = torch.tensor([0] + lens).cumsum(0)[:-1]
    index = torch.where(real, starts[seq] + pos, 0)
    ids = torch.where(real, torch.tensor(batch.input_ids)[index], 0)
    rows = real.nonzero().squeeze(1)
    slots = torch.tensor(batch.slot_mapping)[index[rows]]
    # Padding rows take a valid rotary position; their outputs are dropped and no real query sees their keys.
    positions = pos.clamp(max=max_positions - 1)
    last = [layout.locate(i, n - 1) for i, n in enumerate(lens)]
    to = dict(device=device)
    return LocalShard(ids.to(**to), positions.to(**to), slots.to(**to), rows.to(**to), layout, last)


class SPPrefillRunner:
    """The forward of one SP × TP rank; every rank of the instance runs it on the same broadcast batch. With pipeline
    stages (`stage`), each stage is SP × TP ranks with rings of its own: an SP rank's zigzag shard of the residual
    stream goes to the same SP and TP rank of the next stage, and the last stage's logits go to the leader."""

    def __init__(self, model: CausalLM, kv_caches: list[torch.Tensor], sp: SPGroup, algorithm: str, device,
                 stage=None):
        assert sp.size > 1
        self.model, self.kv_caches, self.sp, self.algorithm = model, kv_caches, sp, algorithm
        self.stage = stage  # workers.pipeline.StagePosition, or None without pipeline stages
        self.device = torch.device(device)
        self.block_size = kv_caches[0].shape[2]
        # Splitting the local tokens in two for TP overlap would split the SP attention call that needs them all.
        model.overlap_min_tokens = None

    @torch.inference_mode()
    def forward_logits(self, batch: ForwardBatch, on_kv_written=None) -> torch.Tensor | None:
        """Float32 logits [num sequences, vocab] of each sequence's last prompt token, on every rank (with pipeline
        stages: on the leader only, None elsewhere)."""
        shard = shard_batch(batch, self.sp, self.block_size, self.model.cfg.max_position_embeddings, self.device)
        lens = [2 * c for c in shard.layout.chunk_lens]
        meta = AttentionMetadata(slot_mapping=shard.slots, query_lens=lens, context_lens=lens, block_tables=None,
                                 on_kv_written=on_kv_written,
                                 sp=SPContext(shard.layout, self.sp, self.algorithm, shard.rows))
        stage, residual = self.stage, None
        if stage is not None and not stage.first:
            residual = torch.empty(len(shard.input_ids), self.model.cfg.hidden_size, device=self.device,
                                   dtype=next(self.model.parameters()).dtype)
            dist.recv(residual, src=stage.rank_of(stage.stage - 1))
        hidden = self.model(shard.input_ids, shard.positions, self.kv_caches, meta, residual)
        if stage is not None and not stage.last:
            dist.send(hidden.contiguous(), dst=stage.rank_of(stage.stage + 1))
            return self._leader_logits(len(shard.last_rows))
        last = hidden.new_zeros(len(shard.last_rows), hidden.shape[-1])
        for i, (owner, row) in enumerate(shard.last_rows):
            if owner == self.sp.rank:
                last[i] = hidden[row]
        # Exactly one SP rank contributes each row, so a sum moves the rows to every rank (small: one per sequence).
        dist.all_reduce(last, group=self.sp.group)
        logits = self.model.compute_logits(last)
        if stage is None:
            return logits
        if stage.sp_rank == 0 and stage.tp_rank == 0:
            dist.send(logits.contiguous(), dst=0)
        return None

    def _leader_logits(self, rows: int) -> torch.Tensor | None:
        """On the leader (stage 0), the logits the last stage sends; None on every other rank of an early stage."""
        if not self.stage.leader:
            return None
        logits = torch.empty(rows, self.model.cfg.vocab_size, dtype=torch.float32, device=self.device)
        dist.recv(logits, src=self.stage.rank_of(self.stage.pp - 1))
        return logits
