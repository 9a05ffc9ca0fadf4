"""Paged-KV block manager: allocation, exhaustion, append, free, slot mapping, no leaks, no torch."""
import subprocess
import sys

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from splitserve.workers.block_manager import BlockManager, NoFreeBlocksError


def test_constructor_rejects_bad_sizes_by_name():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
    with pytest.raises(TypeError, match="block_size"):
        BlockManager(4, 2.0)


def test_blocks_needed_rounds_up():
    bm = BlockManager(8, 4)
    assert [bm.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="num_tokens"):
        bm.blocks_needed(-1)


def test_allocate_lowest_ids_first_and_accounting():
    bm = BlockManager(8, 4)
    assert bm.allocate("a", 5) == [0, 1]
    assert bm.allocate("b", 4) == [2]
    assert (bm.num_used_blocks, bm.num_free_blocks, bm.usage) == (3, 5, 3 / 8)
    assert bm.free("a") == 2
    # Freed ids are reused lowest first.
    assert bm.allocate("c", 12) == [0, 1, 3]
    assert bm.block_table("b") == [2] and bm.num_tokens("c") == 12


def test_allocate_duplicate_seq_id_raises_key_error():
    bm = BlockManager(4, 2)
    bm.allocate("a", 1)
    with pytest.raises(KeyError, match="a"):
        bm.allocate("a", 1)
    assert bm.num_used_blocks == 1


def test_exhaustion_leaves_state_unchanged():
    bm = BlockManager(4, 2)
    bm.allocate("a", 5)  # 3 blocks
    assert not bm.can_allocate(3) and bm.can_allocate(2)
    with pytest.raises(NoFreeBlocksError):
        bm.allocate("b", 3)
    assert not bm.has("b") and bm.num_free_blocks == 1
    assert not bm.can_append("a", 4)
    with pytest.raises(NoFreeBlocksError):
        bm.append("a", 4)  # 9 tokens would need 5 blocks
    assert bm.block_table("a") == [0, 1, 2] and bm.num_tokens("a") == 5


def test_append_across_block_boundaries():
    bm = BlockManager(6, 4)
    bm.allocate("a", 3)
    assert bm.append("a") == [0]          # token 4 still fits block 0
    bm.allocate("b", 1)                   # takes block 1
    assert bm.append("a") == [0, 2]       # token 5 opens a new block, lowest free id
    assert bm.append("a", 6) == [0, 2, 3]  # 11 tokens
    assert bm.num_tokens("a") == 11
    assert bm.append("a", 0) == [0, 2, 3]


def test_free_unknown_returns_zero_and_lookups_raise():
    bm = BlockManager(4, 2)
    assert bm.free("missing") == 0
    bm.allocate("a", 3)
    assert bm.free("a") == 2 and bm.free("a") == 0
    assert not bm.has("a") and bm.num_free_blocks == 4
    for call in (bm.block_table, bm.num_tokens):
        with pytest.raises(KeyError, match="a"):
            call("a")
    with pytest.raises(KeyError):
        bm.append("a")


def test_slot_mapping():
    bm = BlockManager(8, 4)
    bm.allocate("x", 2)           # block 0
    bm.allocate("a", 6)           # blocks 1, 2
    assert bm.slot_mapping("a", 0, 6) == [4, 5, 6, 7, 8, 9]
    bm.append("a", 3)             # blocks 1, 2, 3
    assert bm.slot_mapping("a", 7, 9) == [11, 12]
    assert bm.slot_mapping("a", 3, 3) == []
    with pytest.raises(ValueError, match="end"):
        bm.slot_mapping("a", 0, 10)
    with pytest.raises(ValueError, match="start"):
        bm.slot_mapping("a", 5, 4)


def test_module_does_not_import_torch():
    code = ("import sys, splitserve.workers.block_manager;"
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / append / free sequences against a simple model of token counts."""

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_blocks=16, block_size=4)
        self.tokens: dict[str, int] = {}
        self.next_id = 0

    @rule(num_tokens=st.integers(0, 40))
    def allocate(self, num_tokens):
        seq_id = f"s{self.next_id}"
        self.next_id += 1
        free_before = self.bm.num_free_blocks
        if self.bm.can_allocate(num_tokens):
            table = self.bm.allocate(seq_id, num_tokens)
            assert len(table) == -(-num_tokens // 4)
            self.tokens[seq_id] = num_tokens
        else:
            with pytest.raises(NoFreeBlocksError):
                self.bm.allocate(seq_id, num_tokens)
            assert self.bm.num_free_blocks == free_before and not self.bm.has(seq_id)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), num_new=st.integers(0, 9))
    def append(self, data, num_new):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        old_table = self.bm.block_table(seq_id)
        if self.bm.can_append(seq_id, num_new):
            table = self.bm.append(seq_id, num_new)
            assert table[:len(old_table)] == old_table  # existing blocks never move
            self.tokens[seq_id] += num_new
        else:
            with pytest.raises(NoFreeBlocksError):
                self.bm.append(seq_id, num_new)
            assert self.bm.block_table(seq_id) == old_table

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        assert self.bm.free(seq_id) == -(-self.tokens.pop(seq_id) // 4)

    @invariant()
    def accounting_is_consistent(self):
        tables = {s: self.bm.block_table(s) for s in self.tokens}
        owned = [b for t in tables.values() for b in t]
        assert len(owned) == len(set(owned)), "a block is in two tables"
        assert all(0 <= b < 16 for b in owned)
        assert self.bm.num_used_blocks == len(owned)
        assert self.bm.num_free_blocks + self.bm.num_used_blocks == 16
        for s, n in self.tokens.items():
            assert self.bm.num_tokens(s) == n and len(tables[s]) == -(-n // 4)

    def teardown(self):
        for seq_id in list(self.tokens):
            self.bm.free(seq_id)
        assert self.bm.num_free_blocks == 16, "blocks leaked"
        assert self.bm.allocate("all", 64) == list(range(16))


BlockManagerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestBlockManagerMachine = BlockManagerMachine.TestCase
