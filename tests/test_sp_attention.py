"""Ring and TokenRing attention on 2–4 gloo processes equal single-process float64 attention; unit tests of the
(out, lse) merge, block attention and the zigzag layout."""
from __future__ import annotations

import functools
import io
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distributed import run_distributed
from splitserve.comm import sp_common
from splitserve.comm.sequence_parallel import ALGORITHMS, SINGLE, SPGroup, sp_attention
from splitserve.comm.sp_common import ZigzagLayout, block_attention, empty_result, merge

# float32 compute against a float64 reference on unit-normal inputs; observed errors are below 1e-6.
ATOL_F32, RTOL_F32 = 1e-5, 1e-5
# bfloat16 inputs and output (and bfloat16 partial outputs on the wire for TokenRing): one bf16 ulp near 1.
ATOL_BF16, RTOL_BF16 = 2e-2, 2e-2

# name: (prompt lengths, heads, kv_heads, head_dim, causal, dtype, sliding window). No length is a multiple of 2N for
# N = 2, 3, 4, and the 1-token prompt leaves whole chunks of padding.
CASES = {
    "mha_single": ((23,), 2, 2, 8, True, torch.float32, None),
    "gqa_batch": ((13, 1, 30, 7), 4, 2, 8, True, torch.float32, None),
    "mqa_batch": ((9, 17), 4, 1, 4, True, torch.float32, None),
    "noncausal_gqa_batch": ((11, 3, 25), 4, 2, 8, False, torch.float32, None),
    "bf16_gqa_batch": ((19, 6), 4, 2, 8, True, torch.bfloat16, None),
    "window_gqa_batch": ((29, 4, 15), 4, 2, 8, True, torch.float32, 5),
}


def _inputs(name):
    lens, heads, kv_heads, d, causal, dtype, window = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    total = sum(lens)
    q, k, v = (torch.randn(total, h, d, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads))
    return lens, q, k, v, causal, window


def _reference(q, k, v, lens, causal, window=None):
    """Whole-prompt attention in float64, prompt by prompt."""
    outs, start = [], 0
    for n in lens:
        qq, kk, vv = (t[start : start + n].double().transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        mask = None
        if window is not None:
            pos = torch.arange(n)
            mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)
        out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=causal and mask is None,
                                             enable_gqa=True)
        outs.append(out.squeeze(0).transpose(0, 1))
        start += n
    return torch.cat(outs)


def _assert_close(name, got, expected):
    dtype = CASES[name][5]
    atol, rtol = (ATOL_BF16, RTOL_BF16) if dtype == torch.bfloat16 else (ATOL_F32, RTOL_F32)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, atol=atol, rtol=rtol)


# SP groups built inside one spawned world of 4 (spawning dominates the run time): sizes 4, 3 (plus a lone rank)
# and 2 as two interleaved groups, the shape of SP 2 × TP 2.
RANK_SETS = {4: [[0, 1, 2, 3]], 3: [[0, 1, 2], [3]], 2: [[0, 2], [1, 3]]}


def _run_cases(rank, world, cases):
    per_size = {}
    for size, rank_sets in RANK_SETS.items():
        sp = SPGroup.create(rank_sets)
        results = {}
        for name, (lens, q, k, v, causal, window) in cases.items():
            layout = ZigzagLayout(lens, sp.size)
            for algorithm in ALGORITHMS:
                local = [layout.shard(t, sp.rank) for t in (q, k, v)]
                results[name, algorithm] = sp_attention(*local, layout, sp, algorithm, causal, window=window)
        per_size[size] = (sp.rank, results)
    # Tensors put on the result queue travel as shared-memory handles that die with this process, which may exit
    # before the parent reads them; bytes travel by value.
    buffer = io.BytesIO()
    torch.save(per_size, buffer)
    return buffer.getvalue()


@functools.lru_cache(maxsize=None)
def _distributed_results():
    per_rank = run_distributed(_run_cases, 4, {name: _inputs(name) for name in CASES})
    return [torch.load(io.BytesIO(data)) for data in per_rank]


def _group_shards(size, members, name, algorithm):
    """Outputs of one SP group, in SP-rank order."""
    per_rank = _distributed_results()
    return [s for _, s in sorted((per_rank[r][size][0], per_rank[r][size][1][name, algorithm]) for r in members)]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("size", [2, 3, 4])
def test_sp_attention_matches_full_attention(size, name, algorithm):
    lens, q, k, v, causal, window = _inputs(name)
    expected = _reference(q, k, v, lens, causal, window)
    for members in RANK_SETS[size]:  # size 2: both groups; size 3: the lone rank 3 runs as SP 1
        layout = ZigzagLayout(lens, len(members))
        shards = _group_shards(size, members, name, algorithm)
        assert all(s.shape == (layout.local_tokens, q.shape[1], q.shape[2]) for s in shards)
        _assert_close(name, layout.unshard(shards), expected)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("name", CASES)
def test_single_rank_needs_no_group(name, algorithm):
    lens, q, k, v, causal, window = _inputs(name)
    layout = ZigzagLayout(lens, 1)
    out = sp_attention(*(layout.shard(t, 0) for t in (q, k, v)), layout, SINGLE, algorithm, causal, window=window)
    _assert_close(name, layout.unshard([out]), _reference(q, k, v, lens, causal, window))


def test_sp_attention_rejects_bad_arguments():
    layout = ZigzagLayout((5,), 1)
    q, kv = torch.randn(2, 4, 8), torch.randn(2, 2, 8)
    with pytest.raises(ValueError, match="algorithm"):
        sp_attention(q, kv, kv, layout, SINGLE, "stripe")
    with pytest.raises(ValueError, match="q: layout gives 6"):
        sp_attention(q, kv, kv, layout, SINGLE)
    with pytest.raises(ValueError, match="layout: built for 2"):
        sp_attention(q, kv, kv, ZigzagLayout((3,), 2), SINGLE)
    with pytest.raises(ValueError, match="H a multiple of Hkv"):
        sp_attention(torch.randn(6, 3, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8), layout, SINGLE)
    with pytest.raises(ValueError, match="window: needs causal"):
        sp_attention(torch.randn(6, 4, 8), torch.randn(6, 2, 8), torch.randn(6, 2, 8), layout, SINGLE, causal=False,
                     window=3)
    with pytest.raises(ValueError, match="seq_lens"):
        ZigzagLayout((4, 0), 2)
    with pytest.raises(ValueError, match="sp: rank 2"):
        SPGroup(rank=2, size=2)


# ---------------------------------------------------------------- block attention


def _sdpa64(q, k, v, mask):
    out = F.scaled_dot_product_attention(*(t.double().transpose(0, 1).unsqueeze(0) for t in (q, k, v)),
                                         attn_mask=mask, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)


@pytest.mark.parametrize("tile_elements", [1 << 24, 40])  # 40 forces one query row per tile
@pytest.mark.parametrize("q_offset", [0, 3, -2])
def test_block_attention_gqa_causal_offset(monkeypatch, tile_elements, q_offset):
    monkeypatch.setattr(sp_common, "_TILE_ELEMENTS", tile_elements)
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(7, 6, 5, generator=g), torch.randn(9, 2, 5, generator=g), torch.randn(9, 2, 5, generator=g)
    out, lse = block_attention(q, k, v, 5**-0.5, causal=True, q_offset=q_offset)
    visible = torch.arange(9)[None, :] <= torch.arange(7)[:, None] + q_offset
    seen = visible.any(dim=1)
    torch.testing.assert_close(out[seen].double(), _sdpa64(q, k, v, visible)[seen], atol=1e-6, rtol=1e-6)
    assert torch.all(out[~seen] == 0) and torch.all(lse[~seen] == float("-inf"))  # q_offset = -2: rows 0, 1
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double().repeat_interleave(3, dim=1)) * 5**-0.5
    expected_lse = scores.masked_fill(~visible, float("-inf")).logsumexp(-1).T
    torch.testing.assert_close(lse[seen].double(), expected_lse[seen], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("tile_elements", [1 << 24, 40])
def test_block_attention_window_on_gapped_positions(monkeypatch, tile_elements):
    """Zigzag rows are two position ranges with a gap; the window follows positions, not row indices."""
    monkeypatch.setattr(sp_common, "_TILE_ELEMENTS", tile_elements)
    g = torch.Generator().manual_seed(8)
    q_pos = torch.tensor([2, 3, 4, 11, 12, 13])
    k_pos = torch.tensor([0, 1, 2, 3, 4, 9, 10, 11, 12, 13])
    q, k, v = torch.randn(6, 4, 5, generator=g), torch.randn(10, 2, 5, generator=g), torch.randn(10, 2, 5, generator=g)
    out, _ = block_attention(q, k, v, 0.5, causal=True, window=3, q_pos=q_pos, k_pos=k_pos)
    visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - 3)
    expected = F.scaled_dot_product_attention(*(t.double().transpose(0, 1).unsqueeze(0) for t in (q, k, v)),
                                              attn_mask=visible, scale=0.5, enable_gqa=True)
    torch.testing.assert_close(out.double(), expected.squeeze(0).transpose(0, 1), atol=1e-6, rtol=1e-6)


def test_block_attention_masks_invalid_keys():
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(4, 2, 3, generator=g), torch.randn(6, 1, 3, generator=g), torch.randn(6, 1, 3, generator=g)
    valid = torch.tensor([True, True, False, True, False, False])
    out, _ = block_attention(q, k, v, 3**-0.5, key_valid=valid)
    torch.testing.assert_close(out.double(), _sdpa64(q[:, :, :], k[valid], v[valid], None), atol=1e-6, rtol=1e-6)
    empty_out, empty_lse = block_attention(q, k, v, 1.0, key_valid=torch.zeros(6, dtype=torch.bool))
    assert torch.all(empty_out == 0) and torch.all(torch.isneginf(empty_lse))


# ---------------------------------------------------------------- merge


def _key_blocks(seed, cuts):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(5, 4, 6, generator=g), torch.randn(12, 2, 6, generator=g), torch.randn(12, 2, 6, generator=g)
    bounds = list(zip([0, *cuts], [*cuts, 12]))
    return q, k, v, [block_attention(q, k[a:b], v[a:b], 6**-0.5) for a, b in bounds]


def test_merge_is_order_independent_and_equals_whole_attention():
    q, k, v, parts = _key_blocks(5, [3, 4, 9])
    whole = block_attention(q, k, v, 6**-0.5)
    for order in itertools.permutations(range(len(parts))):
        acc = empty_result(5, 4, 6)
        for i in order:
            acc = merge(*acc, *parts[i])
        torch.testing.assert_close(acc[0], whole[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(acc[1], whole[1], atol=1e-6, rtol=1e-6)
    left = merge(*merge(*parts[0], *parts[1]), *merge(*parts[2], *parts[3]))  # a tree, not a chain
    torch.testing.assert_close(left[0], whole[0], atol=1e-6, rtol=1e-6)


def test_merge_with_empty_blocks_is_exact_and_nan_free():
    _, _, _, (part, _) = _key_blocks(6, [5])
    empty = empty_result(5, 4, 6)
    for out, lse in (merge(*empty, *part), merge(*part, *empty)):
        assert torch.equal(out, part[0]) and torch.equal(lse, part[1])
    out, lse = merge(*empty, *empty)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    # Row-wise mixture: some rows empty on one side only.
    half_lse = part[1].clone()
    half_lse[::2] = float("-inf")
    half_out = torch.where(torch.isneginf(half_lse)[..., None], 0.0, part[0])
    out, lse = merge(*empty, half_out, half_lse)
    assert not torch.isnan(out).any() and torch.equal(torch.isneginf(lse), torch.isneginf(half_lse))


def test_merge_is_stable_for_large_lse():
    out_a, out_b = torch.ones(1, 1, 2), torch.full((1, 1, 2), 3.0)
    out, lse = merge(out_a, torch.tensor([[1000.0]]), out_b, torch.tensor([[1000.0 + torch.log(torch.tensor(3.0))]]))
    torch.testing.assert_close(out, torch.full((1, 1, 2), 2.5))  # weights 1/4 and 3/4
    torch.testing.assert_close(lse, torch.tensor([[1000.0 + torch.log(torch.tensor(4.0)).item()]]))


# ---------------------------------------------------------------- zigzag layout


@settings(max_examples=60, deadline=None)
@given(lens=st.lists(st.integers(1, 40), min_size=1, max_size=5), world=st.integers(1, 5))
def test_zigzag_shard_unshard_round_trip(lens, world):
    layout = ZigzagLayout(tuple(lens), world)
    x = torch.arange(sum(lens) * 2, dtype=torch.float64).view(-1, 2)
    shards = [layout.shard(x, r) for r in range(world)]
    assert all(s.shape[0] == layout.local_tokens for s in shards)
    assert torch.equal(layout.unshard(shards), x)
    indices = torch.cat([layout.global_index(r) for r in range(world)])
    assert sorted(indices[indices >= 0].tolist()) == list(range(sum(lens)))  # every token exactly once
    assert layout.padded_total == sum(-(-n // (2 * world)) * 2 * world for n in lens)
    for rank in range(world):
        pos, seq = layout.positions(rank), layout.seq_ids(rank)
        chunk = pos // torch.tensor(layout.chunk_lens)[seq]
        assert set(chunk.tolist()) <= {rank, 2 * world - 1 - rank}
        assert torch.equal(layout.valid(rank), pos < torch.tensor(lens)[seq])
    for b, n in enumerate(lens):
        rank, index = layout.locate(b, n - 1)
        assert layout.global_index(rank)[index] == layout.cu_seqlens[b + 1] - 1


def test_zigzag_balances_causal_work():
    """Ranks hold chunks r and 2N−1−r, so each rank's causal (query, key) pair count is the same."""
    layout = ZigzagLayout((64,), 4)
    work = [int((layout.positions(r) + 1).sum()) for r in range(4)]
    assert len(set(work)) == 1
