"""Scheduling decisions, without torch: prompt batching under a token budget, decode preemption order."""
import subprocess
import sys

import pytest

from splitserve.workers.block_manager import BlockManager
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.scheduler import DecodeScheduler, PrefillScheduler
from splitserve.workers.sequence import Sequence, SequenceStatus
from splitserve.workers.stop import StopChecker


def _seq(i, n):
    params = SamplingParams(max_tokens=100)
    return Sequence(str(i), list(range(2, 2 + n)), params, StopChecker(params, [1], None))


def test_prefill_batches_fcfs_under_token_budget():
    sched = PrefillScheduler(BlockManager(100, 4), max_batched_tokens=20, max_seqs=3)
    for i, n in enumerate([8, 8, 8, 2]):
        sched.add(_seq(i, n))
    assert [s.seq_id for s in sched.schedule()] == ["0", "1"]  # 8 + 8 <= 20 < 8 + 8 + 8
    assert [s.seq_id for s in sched.schedule()] == ["2", "3"]
    assert sched.schedule() == []


def test_long_prompt_runs_alone_and_max_seqs_caps_batch():
    sched = PrefillScheduler(BlockManager(100, 4), max_batched_tokens=10, max_seqs=2)
    for i, n in enumerate([30, 1, 1, 1]):
        sched.add(_seq(i, n))
    assert [s.seq_id for s in sched.schedule()] == ["0"]
    assert [s.seq_id for s in sched.schedule()] == ["1", "2"]


def test_prefill_waits_for_blocks_and_respects_reserve():
    blocks = BlockManager(4, 4)
    sched = PrefillScheduler(blocks, max_batched_tokens=100, max_seqs=8)
    sched.add(_seq(0, 12))
    assert sched.schedule(reserve_blocks=2) == []  # 3 blocks + 2 reserved > 4
    assert [s.seq_id for s in sched.schedule(reserve_blocks=1)] == ["0"]
    with pytest.raises(ValueError, match="do not fit the KV cache"):
        sched.add(_seq(1, 16))


def test_decode_preempts_newest_first_and_frees_its_blocks():
    blocks = BlockManager(4, 4)
    sched = DecodeScheduler(blocks, max_seqs=8)
    seqs = [_seq(i, 3) for i in range(3)]
    for s in seqs:
        blocks.allocate(s.seq_id, 4)  # each block is full: the next token needs a new block
        s.num_computed_tokens = 3
        sched.add(s)
    batch, preempted = sched.schedule()
    # One free block goes to the oldest; the newest is preempted so the second can grow.
    assert [s.seq_id for s in batch] == ["0", "1"]
    assert [s.seq_id for s in preempted] == ["2"]
    assert preempted[0].status is SequenceStatus.WAITING and preempted[0].num_computed_tokens == 0
    assert blocks.num_free_blocks == 0 and not blocks.has("2") and blocks.num_tokens("1") == 5


def test_decode_never_preempts_or_schedules_sequences_in_flight():
    blocks = BlockManager(4, 4)
    sched = DecodeScheduler(blocks, max_seqs=8)
    seqs = [_seq(i, 3) for i in range(3)]
    for s in seqs:
        blocks.allocate(s.seq_id, 4)
        s.num_computed_tokens = 3
        sched.add(s)
    # "2" (the newest) is in flight in a pipeline: "0" takes the free block; "1" finds none and, rather than give
    # up its own KV or take "2"'s, waits for the batch in flight to come back.
    batch, preempted = sched.schedule(busy=frozenset({"2"}))
    assert [s.seq_id for s in batch] == ["0"] and preempted == []
    assert blocks.has("1") and blocks.has("2")
    # With nothing in flight the usual rule holds again: the newest is preempted so "1" can grow.
    batch, preempted = sched.schedule()
    assert [s.seq_id for s in batch] == ["0", "1"] and [s.seq_id for s in preempted] == ["2"]
    # `limit` caps a group (a pipeline's batch in flight).
    sched2 = DecodeScheduler(BlockManager(40, 4), max_seqs=8)
    for s in [_seq(10 + i, 3) for i in range(5)]:
        sched2.blocks.allocate(s.seq_id, 3)
        s.num_computed_tokens = 3
        sched2.add(s)
    assert [s.seq_id for s in sched2.schedule(busy=frozenset({"10"}), limit=2)[0]] == ["11", "12"]


def test_bookkeeping_modules_do_not_import_torch():
    code = ("import sys; import splitserve.workers.scheduler, splitserve.workers.sequence, "
            "splitserve.workers.batch, splitserve.workers.block_manager; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
