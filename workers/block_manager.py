"""Paged-KV bookkeeping: fixed-size blocks, per-sequence block tables, capacity accounting and the prefix cache
(full blocks named by a chained hash of their tokens, shared by reference count, kept after use until evicted).

Pure Python (no torch) so schedulers can be unit-tested in microseconds; the KV tensors live elsewhere.
"""
import hashlib
import heapq
from array import array
from collections import OrderedDict


class NoFreeBlocksError(RuntimeError):
    """Not enough free blocks; the operation changed nothing."""


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def cache_salt(model_dir, dtype: str) -> str:
    """What, besides the tokens, decides a block's KV: the checkpoint and the dtype. The router hashes with it too."""
    return f"{model_dir}|{dtype}"


def block_hashes(token_ids, block_size: int, salt: str = "", start: int = 0, parent: int = 0) -> list[int]:
    """Chained hashes of the full blocks of `token_ids` from block `start` on (`parent`: the hash of block
    start - 1). A block's hash covers every token before it, and `salt` (the model), so equal hashes mean equal KV.
    blake2b, not hash(): processes (the router, every instance) must agree."""
    out = []
    for i in range(start, len(token_ids) // block_size):
        digest = hashlib.blake2b(parent.to_bytes(8, "little") + salt.encode()
                                 + array("q", token_ids[i * block_size:(i + 1) * block_size]).tobytes(),
                                 digest_size=8).digest()
        parent = int.from_bytes(digest, "little")
        out.append(parent)
    return out


class BlockTables:
    """Per-sequence block tables and token counts, and the lookups on them (shared by the block managers)."""

    prefix_caching = False

    def __init__(self):
        self._tables: dict[str, list[int]] = {}
        self._num_tokens: dict[str, int] = {}
        self.query_tokens = 0  # tokens looked up in the prefix cache, and of those the ones found
        self.hit_tokens = 0

    def count_lookup(self, num_tokens: int, cached_tokens: int) -> None:
        self.query_tokens += num_tokens
        self.hit_tokens += cached_tokens

    def has(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: str) -> list[int]:
        return list(self._table(seq_id))

    def num_tokens(self, seq_id: str) -> int:
        self._table(seq_id)
        return self._num_tokens[seq_id]

    def match(self, prefix) -> list[int]:
        return []

    def num_cached_tokens(self, seq_id: str) -> int:
        """Tokens at the start of `seq_id` whose KV was found in the cache when it was allocated."""
        return 0

    def commit(self, seq_id: str, token_ids) -> None:
        """`token_ids` (a prefix of the sequence) have their KV in its blocks: full blocks become reusable."""

    def take_events(self) -> list[tuple[bool, int]]:
        """(stored: True / evicted: False, block hash) in order since the last call: what a router mirrors."""
        return []

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
    """With `prefix_caching`, `allocate(..., prefix=token_ids)` starts a sequence on the cached blocks of the
    longest prefix of `prefix` whose full blocks were committed before (a hit takes a reference); `commit` names a
    sequence's full blocks by hash; a freed block that has a hash waits in an LRU queue, still reusable, until a
    new allocation evicts it. Blocks that are free or merely cached count as free. A hashed block is never written
    again: hits are whole blocks before the first token a sequence computes."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False, salt: str = ""):
        _check_count("num_blocks", num_blocks, 1)
        _check_count("block_size", block_size, 1)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.salt = salt
        # A sorted list is a valid min-heap, so the lowest free ids are handed out first.
        self._free: list[int] = list(range(num_blocks))  # free and holding nothing reusable
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # free but hashed: least recently used first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, int] = {}
        self._by_hash: dict[int, int] = {}
        self._seq_hashes: dict[str, list[int]] = {}  # chained hashes of each sequence's committed blocks
        self._cached_tokens: dict[str, int] = {}
        self._hash_memo: OrderedDict[tuple, list[int]] = OrderedDict()  # the last prompts looked up
        self.record_events = False  # an instance leader turns this on and takes the events for its router
        self._events: list[tuple[bool, int]] = []
        super().__init__()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._cached_free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._by_hash)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        _check_count("num_tokens", num_tokens, 0)
        return -(-num_tokens // self.block_size)

    def match(self, prefix) -> list[int]:
        """Cached blocks of the longest run of `prefix`'s full blocks (no reference taken)."""
        if not self.prefix_caching or not prefix:
            return []
        blocks = []
        for h in self._hashes(prefix):
            block = self._by_hash.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def _hashes(self, prefix) -> list[int]:
        # A waiting prompt is looked up at every scheduling attempt (and several times in one): hash it once.
        key = tuple(prefix)
        hashes = self._hash_memo.get(key)
        if hashes is None:
            hashes = self._hash_memo[key] = block_hashes(key, self.block_size, self.salt)
            if len(self._hash_memo) > 8:
                self._hash_memo.popitem(last=False)
        else:
            self._hash_memo.move_to_end(key)
        return hashes

    def can_allocate(self, num_tokens: int, prefix=None, reserve: int = 0) -> bool:
        return self._free_blocks_taken(num_tokens, self.match(prefix)) + reserve <= self.num_free_blocks

    def _free_blocks_taken(self, num_tokens: int, hits: list[int]) -> int:
        # New blocks, plus hits that sit in the free queue (taking them takes free capacity too).
        needed = self.blocks_needed(num_tokens)
        hits = hits[:needed]
        return needed - len(hits) + sum(1 for b in hits if self._refs[b] == 0)

    def allocate(self, seq_id: str, num_tokens: int, prefix=None) -> list[int]:
        """Blocks for `num_tokens`; with `prefix` (token ids, at most `num_tokens`), its cached full blocks first."""
        if seq_id in self._tables:
            raise KeyError(f"seq_id {seq_id!r} already has blocks")
        hits = self.match(prefix)[:self.blocks_needed(num_tokens)]
        self._reserve(self._free_blocks_taken(num_tokens, hits))
        for block in hits:
            self._ref(block)
        table = hits + [self._pop_free() for _ in range(self.blocks_needed(num_tokens) - len(hits))]
        self._tables[seq_id] = table
        self._num_tokens[seq_id] = num_tokens
        self._seq_hashes[seq_id] = [self._hash_of[b] for b in hits]
        self._cached_tokens[seq_id] = len(hits) * self.block_size
        return list(table)

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def block_hash(self, block: int) -> int | None:
        """The hash a block is cached under, if any (then its contents never change until it is evicted)."""
        return self._hash_of.get(block)

    def num_cached_tokens(self, seq_id: str) -> int:
        self._table(seq_id)
        return self._cached_tokens[seq_id]

    def can_append(self, seq_id: str, num_new_tokens: int = 1) -> bool:
        return self._extra_blocks(seq_id, num_new_tokens) <= self.num_free_blocks

    def append(self, seq_id: str, num_new_tokens: int = 1) -> list[int]:
        """Grow `seq_id` to hold `num_new_tokens` more tokens; returns its whole block table."""
        extra = self._extra_blocks(seq_id, num_new_tokens)
        self._reserve(extra)
        table = self._tables[seq_id]
        table.extend(self._pop_free() for _ in range(extra))
        self._num_tokens[seq_id] += num_new_tokens
        return list(table)

    def commit(self, seq_id: str, token_ids) -> None:
        if not self.prefix_caching:
            return
        table, hashes = self._table(seq_id), self._seq_hashes[seq_id]
        assert len(token_ids) <= self._num_tokens[seq_id]
        new = block_hashes(token_ids, self.block_size, self.salt, len(hashes), hashes[-1] if hashes else 0)
        for i, h in enumerate(new, start=len(hashes)):
            block = table[i]
            # Two sequences may have computed the same block: the first one's stays the cached copy.
            if h not in self._by_hash and block not in self._hash_of:
                self._by_hash[h], self._hash_of[block] = block, h
                if self.record_events:
                    self._events.append((True, h))
        hashes.extend(new)

    def take_events(self) -> list[tuple[bool, int]]:
        events, self._events = self._events, []
        return events

    def free(self, seq_id: str) -> int:
        # Unknown ids are not an error: an abort can race with a normal finish.
        table = self._tables.pop(seq_id, None)
        if table is None:
            return 0
        del self._num_tokens[seq_id], self._seq_hashes[seq_id], self._cached_tokens[seq_id]
        # Last blocks first into the LRU queue: a sequence's tail is evicted before the prefix others share.
        for block in reversed(table):
            self._refs[block] -= 1
            assert self._refs[block] >= 0
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._cached_free[block] = None
                else:
                    heapq.heappush(self._free, block)
        return len(table)

    def _ref(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._cached_free[block]
        self._refs[block] += 1

    def _pop_free(self) -> int:
        """A block for new KV: one holding nothing reusable if any, else the least recently used cached one."""
        if self._free:
            block = heapq.heappop(self._free)
        else:
            block, _ = self._cached_free.popitem(last=False)
            h = self._hash_of.pop(block)
            del self._by_hash[h]
            if self.record_events:
                self._events.append((False, h))
        self._refs[block] = 1
        return block

    def _extra_blocks(self, seq_id: str, num_new_tokens: int) -> int:
        _check_count("num_new_tokens", num_new_tokens, 0)
        table = self._table(seq_id)
        return self.blocks_needed(self._num_tokens[seq_id] + num_new_tokens) - len(table)

    def _reserve(self, needed: int) -> None:
        if needed > self.num_free_blocks:
            raise NoFreeBlocksError(f"need {needed} blocks, {self.num_free_blocks} free")
