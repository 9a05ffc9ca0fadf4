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


def test_bookkeeping_modules_do_not_import_torch():
    code = ("import sys; import splitserve.workers.scheduler, splitserve.workers.sequence, "
            "splitserve.workers.batch, splitserve.workers.block_manager; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
