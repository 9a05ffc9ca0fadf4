"""Prefix caching in the block manager: chained hashes, shared blocks, LRU eviction, capacity, and a stateful
property test that no hit is ever served from a stale block. No torch."""
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from splitserve.workers.block_manager import BlockManager, NoFreeBlocksError, block_hashes


def test_hashes_are_chained_salted_and_per_full_block():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2  # the partial third block has no hash
    assert block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)[1] != a[1]  # block 1's hash depends on block 0's tokens
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, salt="other model") != a
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, start=1, parent=a[0]) == a[1:]


def test_freed_blocks_are_reused_by_a_later_prefix_and_shared():
    bm = BlockManager(8, 4, prefix_caching=True)
    prompt = list(range(10))
    bm.allocate("a", 10, prefix=prompt[:9])
    assert bm.num_cached_tokens("a") == 0
    bm.commit("a", prompt)
    table = bm.block_table("a")
    bm.free("a")
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 2  # cached blocks still count as free
    assert bm.allocate("b", 12, prefix=prompt + [50]) [:2] == table[:2]
    assert bm.num_cached_tokens("b") == 8
    assert bm.allocate("c", 9, prefix=prompt[:8]) [:2] == table[:2]
    assert [bm.ref_count(b) for b in table[:2]] == [2, 2]
    assert bm.free("b") == 3 and bm.free("c") == 3
    assert bm.num_used_blocks == 0


def test_a_prompt_never_hits_its_own_last_token_block_when_the_caller_keeps_it_out():
    bm = BlockManager(8, 4, prefix_caching=True)
    prompt = list(range(8))
    bm.allocate("a", 8, prefix=prompt[:7])
    bm.commit("a", prompt)
    bm.free("a")
    bm.allocate("b", 8, prefix=prompt[:7])  # the prefill rule: the last token is computed
    assert bm.num_cached_tokens("b") == 4
    bm.allocate("c", 8, prefix=prompt)  # the decode side needs all of it, computes none
    assert bm.num_cached_tokens("c") == 8


def test_eviction_is_least_recently_used_and_prefers_empty_blocks():
    bm = BlockManager(4, 2, prefix_caching=True)
    bm.record_events = True
    for name, toks in (("a", [1, 1]), ("b", [2, 2])):
        bm.allocate(name, 2)
        bm.commit(name, toks)
    assert bm.take_events() == [(True, block_hashes([1, 1], 2)[0]), (True, block_hashes([2, 2], 2)[0])]
    bm.free("a")
    bm.free("b")
    assert bm.num_cached_blocks == 2
    bm.allocate("x", 4)  # the two never-used blocks go first
    assert bm.num_cached_blocks == 2
    bm.allocate("y", 2)  # then the least recently freed cached block: a's
    assert bm.match([1, 1]) == [] and bm.match([2, 2]) != []
    assert [e for e in bm.take_events() if not e[0]] == [(False, h) for h in block_hashes([1, 1], 2)]
    with pytest.raises(NoFreeBlocksError):
        bm.allocate("z", 4)


def test_capacity_counts_hits_that_sit_in_the_free_queue():
    bm = BlockManager(4, 2, prefix_caching=True)
    bm.allocate("a", 4)
    bm.commit("a", [1, 2, 3, 4])
    # a's blocks are referenced: hitting them takes no free block.
    assert bm.can_allocate(6, prefix=[1, 2, 3, 4]) and not bm.can_allocate(6)
    assert not bm.can_allocate(6, prefix=[1, 2, 3, 4], reserve=2)
    bm.free("a")
    # Now they wait in the free queue: 2 hits + 2 new blocks take all 4 free blocks.
    assert bm.num_free_blocks == 4 and bm.can_allocate(8, prefix=[1, 2, 3, 4])
    assert not bm.can_allocate(8, prefix=[1, 2, 3, 4], reserve=1)
    bm.allocate("c", 8, prefix=[1, 2, 3, 4])
    assert bm.num_free_blocks == 0 and bm.num_cached_tokens("c") == 4


def test_duplicate_computation_keeps_one_cached_copy():
    bm = BlockManager(8, 2, prefix_caching=True)
    for name in ("a", "b"):
        bm.allocate(name, 4)
        bm.commit(name, [7, 7, 8, 8])
    assert bm.num_cached_blocks == 2
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 2


def test_caching_off_matches_nothing():
    bm = BlockManager(4, 2)
    bm.allocate("a", 2)
    bm.commit("a", [1, 1])
    bm.free("a")
    assert bm.match([1, 1, 1]) == [] and bm.num_cached_blocks == 0


class PrefixCacheMachine(RuleBasedStateMachine):
    """Reuse, eviction, abort (free at any point) and preemption (free, then start again from the same tokens)
    against a model of what each block holds: a hit must hold exactly the tokens it is hit for, and no hashed
    block is ever written."""

    BS, N = 2, 10

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(self.N, self.BS, prefix_caching=True)
        self.contents: dict[int, list[int]] = {}  # block -> tokens its KV was computed from (by position)
        self.seqs: dict[str, list[int]] = {}  # seq -> its tokens (all computed)
        self.next_id = 0

    def _write(self, seq_id, tokens, start):
        table = self.bm.block_table(seq_id)
        for pos in range(start, len(tokens)):
            block = table[pos // self.BS]
            assert self.bm.block_hash(block) is None, "wrote into a cached block"
            assert self.bm.ref_count(block) == 1, "wrote into a shared block"
            self.contents.setdefault(block, [None] * self.BS)[pos % self.BS] = tuple(tokens[: pos + 1])

    def _start(self, tokens):
        seq_id = f"s{self.next_id}"
        self.next_id += 1
        if not self.bm.can_allocate(len(tokens), prefix=tokens[:-1]):
            with pytest.raises(NoFreeBlocksError):
                self.bm.allocate(seq_id, len(tokens), prefix=tokens[:-1])
            return
        self.bm.allocate(seq_id, len(tokens), prefix=tokens[:-1])
        cached = self.bm.num_cached_tokens(seq_id)
        assert cached % self.BS == 0 and cached < len(tokens)
        table = self.bm.block_table(seq_id)
        for pos in range(cached):  # every hit holds exactly this prefix's KV
            assert self.contents[table[pos // self.BS]][pos % self.BS] == tuple(tokens[: pos + 1]), "stale hit"
        self._write(seq_id, tokens, cached)
        self.bm.commit(seq_id, tokens)
        self.seqs[seq_id] = list(tokens)

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=9))
    def start(self, tokens):
        self._start(tokens)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), new=st.lists(st.integers(0, 2), min_size=1, max_size=3))
    def decode(self, data, new):
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        if not self.bm.can_append(seq_id, len(new)):
            return
        tokens = self.seqs[seq_id]
        self.bm.append(seq_id, len(new))
        self._write(seq_id, tokens + new, len(tokens))
        tokens += new
        self.bm.commit(seq_id, tokens)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def abort(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        assert self.bm.free(seq_id) == -(-len(self.seqs.pop(seq_id)) // self.BS)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def preempt_and_recompute(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.seqs)))
        self.bm.free(seq_id)
        self._start(self.seqs.pop(seq_id))

    @invariant()
    def references_and_capacity_agree(self):
        tables = [self.bm.block_table(s) for s in self.seqs]
        refs = [0] * self.N
        for t in tables:
            for b in t:
                refs[b] += 1
        assert refs == [self.bm.ref_count(b) for b in range(self.N)]
        assert self.bm.num_free_blocks == refs.count(0)
        for t in tables:
            assert len(t) == len(set(t)), "a block twice in one table"

    def teardown(self):
        for seq_id in list(self.seqs):
            self.bm.free(seq_id)
        assert self.bm.num_free_blocks == self.N and self.bm.num_used_blocks == 0, "blocks leaked"


PrefixCacheMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)
TestPrefixCacheMachine = PrefixCacheMachine.TestCase
