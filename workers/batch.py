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

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


def build_batch(seqs: list[Sequence], blocks: BlockManager) -> ForwardBatch:
    """Every sequence computes its tokens from `num_computed_tokens` to its end and samples the next one."""
    b = ForwardBatch([], [], [], [], [], [], [])
    for seq in seqs:
        start, end = seq.num_computed_tokens, seq.num_tokens
        b.input_ids += seq.token_ids[start:end]
        b.positions += range(start, end)
        b.slot_mapping += blocks.slot_mapping(seq.seq_id, start, end)
        b.query_lens.append(end - start)
        b.context_lens.append(end)
        b.block_tables.append(blocks.block_table(seq.seq_id))
        b.sample_rows.append(len(b.input_ids) - 1)
    return b
