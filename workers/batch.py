"""The metadata of one forward (token ids, positions, slots, block tables) as plain lists: what a leader
would send its followers. No torch."""
from __future__ import annotations

from dataclasses import dataclass

from splitserve.workers.block_manager import BlockManager
from splitserve.workers.sequence import Sequence


@dataclass
class ForwardBatch:
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    sample_rows: list[int]  # index into the packed tokens of each row whose logits are sampled
    completes: list[bool] | None = None  # per sequence: does this forward reach its last token (and sample)?
    micro_batches: int = 0  # pipeline stages: how many micro-batches it flows as (0: one per stage)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def build_batch(seqs: list[Sequence], blocks: BlockManager, num_new: list[int] | None = None) -> ForwardBatch:
    """Each sequence computes its tokens from `num_computed_tokens` on: to its end by default, else `num_new`
    of them (a prompt chunk); only sequences that reach their end sample a next token."""
    b = ForwardBatch([], [], [], [], [], [], [], [])
    for i, seq in enumerate(seqs):
        start = seq.num_computed_tokens
        end = seq.num_tokens if num_new is None else start + num_new[i]
        assert start < end <= seq.num_tokens
        b.input_ids += seq.token_ids[start:end]
        b.positions += range(start, end)
        b.slot_mapping += blocks.slot_mapping(seq.seq_id, start, end)
        b.query_lens.append(end - start)
        b.context_lens.append(end)
        b.block_tables.append(blocks.block_table(seq.seq_id))
        b.completes.append(end == seq.num_tokens)
        if end == seq.num_tokens:
            b.sample_rows.append(len(b.input_ids) - 1)
    return b
