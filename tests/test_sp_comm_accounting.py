"""Messages and bytes each SP attention variant sends per layer, counted around the ring comm object on gloo,
equal the analytic formulas (`placement.sp_cost`), and the planner charges the same formula."""
from __future__ import annotations

import functools

import pytest
import torch

from distributed import run_distributed
from splitserve.comm.sequence_parallel import (ALGORITHMS, SPGroup, bytes_per_layer, fewer_bytes,
                                               messages_per_layer, sp_attention, step_link_bytes)
from splitserve.comm.sp_common import ZigzagLayout

LENS, HEADS, KV_HEADS, HEAD_DIM = (13, 5, 30), 4, 2, 8
# (causal, dtype): bfloat16 checks that lse travels as float32 next to 2-byte outputs.
MODES = [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16)]
# SP groups of every size inside one spawned world of 4 (spawning dominates the run time).
RANK_SETS = {4: [[0, 1, 2, 3]], 3: [[0, 1, 2], [3]], 2: [[0, 1], [2, 3]]}


def _count_layer(rank, world, lens, modes):
    from splitserve.comm import sp_common

    log = []  # (direction, bytes) of every message this rank queued
    send, recv = sp_common.RingComm.send, sp_common.RingComm.recv

    def counting_send(self, tensor, dst, tag=0):
        log.append(("send", tensor.numel() * tensor.element_size()))
        return send(self, tensor, dst, tag)

    def counting_recv(self, buffer, src, tag=0):
        log.append(("recv", buffer.numel() * buffer.element_size()))
        return recv(self, buffer, src, tag)

    sp_common.RingComm.send, sp_common.RingComm.recv = counting_send, counting_recv
    per_size = {}
    for size, rank_sets in RANK_SETS.items():
        sp = SPGroup.create(rank_sets)
        layout = ZigzagLayout(lens, sp.size)
        counts = {}
        for causal, dtype in modes:
            q, k, v = (torch.randn(layout.local_tokens, h, HEAD_DIM).to(dtype) for h in (HEADS, KV_HEADS, KV_HEADS))
            for algorithm in ALGORITHMS:
                log.clear()
                sp_attention(q, k, v, layout, sp, algorithm, causal)
                counts[algorithm, causal, dtype] = list(log)
        per_size[size] = (sp.rank, counts)
    return per_size


@functools.lru_cache(maxsize=None)
def _all_counts():
    return run_distributed(_count_layer, 4, LENS, MODES)


def _counts(size):
    """Per SP rank of the first group of this size: the (direction, bytes) log of each run."""
    per_rank = _all_counts()
    return [c for _, c in sorted(per_rank[r][size] for r in RANK_SETS[size][0])]


def _sent(log, direction="send"):
    return [n for kind, n in log if kind == direction]


@pytest.mark.parametrize("causal,dtype", MODES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_counts_match_formulas(world, algorithm, causal, dtype):
    per_rank = [counts[algorithm, causal, dtype] for counts in _counts(world)]
    layout = ZigzagLayout(LENS, world)
    shape = (world, layout.padded_total, HEADS, KV_HEADS, HEAD_DIM, dtype.itemsize, causal)
    sent = [_sent(log) for log in per_rank]
    assert sum(map(len, sent)) == messages_per_layer(algorithm, *shape)
    assert sum(map(sum, sent)) == bytes_per_layer(algorithm, *shape)
    # Every message sent is received once, with a buffer of the same size.
    assert sorted(n for log in sent for n in log) == sorted(n for log in per_rank for n in _sent(log, "recv"))
    assert max(n for log in sent for n in log) <= step_link_bytes(algorithm, *shape)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_token_ring_result_sizes_per_rank(world):
    """Causal zigzag: rank r sends N−1−r full-size results (owners after it) and r half-size ones."""
    layout = ZigzagLayout(LENS, world)
    t, row = layout.local_tokens, HEADS * (HEAD_DIM * 4 + 4)
    q_message = t * HEADS * HEAD_DIM * 4
    for rank, counts in enumerate(_counts(world)):
        sent = _sent(counts["token_ring", True, torch.float32])
        results = sorted(n for n in sent if n != q_message)
        assert sent.count(q_message) == world - 1
        assert results == sorted([t * row // 2] * rank + [t * row] * (world - 1 - rank))


def test_ring_sends_equal_messages_every_step():
    for counts in _counts(3):
        assert _sent(counts["ring", True, torch.float32]) == [2 * ZigzagLayout(LENS, 3).local_tokens * KV_HEADS *
                                                             HEAD_DIM * 4] * 2


def test_fewer_bytes_by_gqa_ratio():
    """bf16, head_dim 128: causal TokenRing moves fewer bytes only for MHA; ring wins from GQA 2 and non-causal."""
    n, s = 4, 4096
    assert fewer_bytes(n, s, 32, 32, 128, 2) == "token_ring"
    for kv_heads in (16, 8, 4, 1):
        assert fewer_bytes(n, s, 32, kv_heads, 128, 2) == "ring"
    assert fewer_bytes(n, s, 32, 32, 128, 2, causal=False) == "ring"
    assert bytes_per_layer("all_gather", n, s, 32, 8, 128, 2) == bytes_per_layer("ring", n, s, 32, 8, 128, 2)
    assert messages_per_layer("token_ring", n) == 2 * messages_per_layer("ring", n) == 24
    assert bytes_per_layer("ring", 1, s, 32, 8, 128, 2) == 0


def test_cost_formulas_reject_unpadded_lengths():
    with pytest.raises(ValueError, match="S: the padded batch"):
        bytes_per_layer("ring", 4, 4097, 8, 8, 64, 2)
    with pytest.raises(ValueError, match="algorithm"):
        messages_per_layer("stripe", 2)


@pytest.mark.parametrize("tp", [1, 2])
def test_planner_step_bytes_are_the_formula_counted_here(tp):
    """The latency model's busiest-direction bytes per ring step equal `step_link_bytes` for one TP rank's heads."""
    from splitserve.placement.latency import sp_step_bytes
    from splitserve.placement.specs import load_model

    model, n, t = load_model("llama-3-8b"), 4, 1024
    for algorithm in ALGORITHMS:
        want = step_link_bytes(algorithm, n, n * t, model.num_heads // tp, model.num_kv_heads // tp, model.head_dim,
                               model.dtype_bytes)
        assert max(sp_step_bytes(model, tp, algorithm, t)) == want
