"""Paged-KV bookkeeping: fixed-size blocks, per-sequence block tables and capacity accounting.

Pure Python (no torch) so schedulers can be unit-tested in microseconds; the KV tensors live elsewhere.
"""
import heapq


class NoFreeBlocksError(RuntimeError):
    """Not enough free blocks; the operation changed nothing."""


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


class BlockTables:
    """Per-sequence block tables and token counts, and the lookups on them (shared by the block managers)."""

    def __init__(self):
        self._tables: dict[str, list[int]] = {}
        self._num_tokens: dict[str, int] = {}

    def has(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: str) -> list[int]:
        return list(self._table(seq_id))

    def num_tokens(self, seq_id: str) -> int:
        self._table(seq_id)
        return self._num_tokens[seq_id]

    def slot_mapping(self, seq_id: str, start: int, end: int) -> list[int]:
        """Flat KV slot (block * block_size + offset) of each token position in [start, end)."""
        table = self._table(seq_id)
        if not 0 <= start <= end <= self._num_tokens[seq_id]:
            raise ValueError(
                f"token range [start={start}, end={end}) is outside 0..{self._num_tokens[seq_id]} "
                f"for seq_id {seq_id!r}")
        bs = self.block_size
        return [table[pos // bs] * bs + pos % bs for pos in range(start, end)]

    def _table(self, seq_id: str) -> list[int]:
        try:
            return self._tables[seq_id]
        except KeyError:
            raise KeyError(f"unknown seq_id {seq_id!r}") from None


class BlockManager(BlockTables):

    def __init__(self, num_blocks: int, block_size: int):
        _check_count("num_blocks", num_blocks, 1)
        _check_count("block_size", block_size, 1)
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A sorted list is a valid min-heap, so the lowest free ids are handed out first.
        self._free: list[int] = list(range(num_blocks))
        super().__init__()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        _check_count("num_tokens", num_tokens, 0)
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= len(self._free)

    def allocate(self, seq_id: str, num_tokens: int) -> list[int]:
        if seq_id in self._tables:
            raise KeyError(f"seq_id {seq_id!r} already has blocks")
        needed = self.blocks_needed(num_tokens)
        self._reserve(needed)
        self._tables[seq_id] = [heapq.heappop(self._free) for _ in range(needed)]
        self._num_tokens[seq_id] = num_tokens
        return list(self._tables[seq_id])

    def can_append(self, seq_id: str, num_new_tokens: int = 1) -> bool:
        return self._extra_blocks(seq_id, num_new_tokens) <= len(self._free)

    def append(self, seq_id: str, num_new_tokens: int = 1) -> list[int]:
        """Grow `seq_id` to hold `num_new_tokens` more tokens; returns its whole block table."""
        extra = self._extra_blocks(seq_id, num_new_tokens)
        self._reserve(extra)
        table = self._tables[seq_id]
        table.extend(heapq.heappop(self._free) for _ in range(extra))
        self._num_tokens[seq_id] += num_new_tokens
        return list(table)

    def free(self, seq_id: str) -> int:
        # Unknown ids are not an error: an abort can race with a normal finish.
        table = self._tables.pop(seq_id, None)
        if table is None:
            return 0
        del self._num_tokens[seq_id]
        for block in table:
            heapq.heappush(self._free, block)
        return len(table)

    def _extra_blocks(self, seq_id: str, num_new_tokens: int) -> int:
        _check_count("num_new_tokens", num_new_tokens, 0)
        table = self._table(seq_id)
        return self.blocks_needed(self._num_tokens[seq_id] + num_new_tokens) - len(table)

    def _reserve(self, needed: int) -> None:
        if needed > len(self._free):
            raise NoFreeBlocksError(f"need {needed} blocks, {len(self._free)} free")
