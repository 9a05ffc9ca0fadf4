"""KV blocks of a sequence-parallel prefill instance: one pool per SP rank, so the instance holds SP times the
tokens of one rank. Pure Python.

Block i of a prompt is written by one SP rank (`comm.kv_plan.sp_block_owners`) and is taken from that rank's pool;
the table entry is that rank's local block id. Every rank receives the same slot mapping, but a rank writes only its
own tokens, so each slot is read on the rank whose cache it indexes.

No prefix caching here: which SP rank holds block i depends on the whole prompt's padded length, so a cached block of
one prompt sits in the wrong rank's pool for most others, and ring / TokenRing attention attends only within the
prompt's own shards (it has no path to a cached prefix). An SP prefill instance computes every prompt in full; the
decode instances it feeds still reuse their cache and receive only the blocks they lack.
"""
from __future__ import annotations

from collections import Counter

from splitserve.comm.kv_plan import sp_block_owners
from splitserve.workers.block_manager import BlockManager, BlockTables, NoFreeBlocksError


class SPBlockManager(BlockTables):
    """The `BlockManager` interface the prefill scheduler and leader use. Capacity is counted per rank: a prompt's
    `blocks_needed` is the most blocks any one SP rank holds of it, `num_free_blocks` the fewest free in any pool,
    so `blocks_needed(n) <= num_free_blocks` guarantees every pool can take its share."""

    def __init__(self, num_blocks: int, block_size: int, sp: int):
        assert sp > 1
        self.pools = [BlockManager(num_blocks, block_size) for _ in range(sp)]
        self.num_blocks, self.block_size, self.sp = num_blocks, block_size, sp
        super().__init__()

    @property
    def num_free_blocks(self) -> int:
        return min(p.num_free_blocks for p in self.pools)

    @property
    def usage(self) -> float:
        return max(p.usage for p in self.pools)

    def _counts(self, num_tokens: int) -> Counter:
        return Counter(sp_block_owners(num_tokens, self.block_size, self.sp))

    def blocks_needed(self, num_tokens: int) -> int:
        return max(self._counts(num_tokens).values(), default=0)

    def can_allocate(self, num_tokens: int, prefix=None, reserve: int = 0) -> bool:
        return all(n + reserve <= self.pools[s].num_free_blocks for s, n in self._counts(num_tokens).items())

    def allocate(self, seq_id: str, num_tokens: int, prefix=None) -> list[int]:
        """`prefix` is accepted for the common interface and ignored (see the module docstring)."""
        if seq_id in self._tables:
            raise KeyError(f"seq_id {seq_id!r} already has blocks")
        owners = sp_block_owners(num_tokens, self.block_size, self.sp)
        counts = Counter(owners)
        if not self.can_allocate(num_tokens):
            raise NoFreeBlocksError(f"need {dict(counts)} blocks per SP rank, "
                                    f"{[p.num_free_blocks for p in self.pools]} free")
        local = {s: iter(self.pools[s].allocate(seq_id, n * self.block_size)) for s, n in counts.items()}
        self._tables[seq_id] = [next(local[s]) for s in owners]
        self._num_tokens[seq_id] = num_tokens
        return list(self._tables[seq_id])

    def free(self, seq_id: str) -> int:
        if self._tables.pop(seq_id, None) is None:  # an abort can race with a normal finish
            return 0
        del self._num_tokens[seq_id]
        return sum(p.free(seq_id) for p in self.pools)

