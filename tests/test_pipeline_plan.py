"""The transfer plan with pipeline stages on either side: balanced contiguous layer ranges, and for odd (TP, SP, PP)
pairs and random ones, every (layer, KV head) of every block the decode side lacks lands exactly once, on the decode
rank that holds that layer and head, from a prefill rank that holds them; one order per link. And a stage's
micro-batches: whole sequences covering the batch."""
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.comm.kv_plan import (DecodeTarget, PrefillLayout, links_needed_pp, local_kv_heads, sp_block_owners,
                                     stage_layers, transfer_orders)


@pytest.mark.parametrize("num_layers, pp, sizes", [(6, 3, [2, 2, 2]), (5, 3, [2, 2, 1]), (4, 3, [2, 1, 1]),
                                                   (7, 2, [4, 3]), (3, 3, [1, 1, 1]), (1, 1, [1])])
def test_stage_layers_are_contiguous_and_balanced(num_layers, pp, sizes):
    ranges = stage_layers(num_layers, pp)
    assert [len(r) for r in ranges] == sizes
    assert [i for r in ranges for i in r] == list(range(num_layers))


def test_more_stages_than_layers_is_refused():
    with pytest.raises(ValueError, match="pp: 3 stages cannot split 2 layers"):
        stage_layers(2, 3)


def check_plan(kv_heads, num_layers, p_tp, p_sp, p_pp, d_tp, d_pp, tokens, cached, block_size=4):
    """Simulates the plan cell by cell against the layouts' definitions of who holds what."""
    layout = PrefillLayout("p", p_tp, p_sp, kv_heads, block_size, p_pp, num_layers)
    num_blocks = -(-tokens // block_size)
    src = [100 + i for i in range(num_blocks + 1)]
    target = DecodeTarget("d", d_tp, tuple(300 + i for i in range(num_blocks)), 9, cached, d_pp)
    orders = transfer_orders(layout, tokens, src, target)
    links = [(o.link.prefill_rank, o.link.decode_rank) for o in orders]
    assert len(links) == len(set(links)), "two orders on one link"
    assert set(links) == links_needed_pp(kv_heads, num_layers, p_tp, p_sp, p_pp, d_tp, d_pp)
    p_stages, d_stages = stage_layers(num_layers, p_pp), stage_layers(num_layers, d_pp)
    owners = sp_block_owners(tokens, block_size, p_sp)
    landed = {}
    for o in orders:
        p_stage, rest = divmod(o.link.prefill_rank, p_sp * p_tp)
        sp_rank, p_rank = divmod(rest, p_tp)
        d_stage, d_rank = divmod(o.link.decode_rank, d_tp)
        p_first, p_count = local_kv_heads(kv_heads, p_tp, p_rank)
        d_first, d_count = local_kv_heads(kv_heads, d_tp, d_rank)
        span = o.layers
        if p_pp == 1 and d_pp == 1:
            assert span is None
            src_layers = dst_layers = range(num_layers)
        else:
            src_layers = range(span.src_first, span.src_first + span.count)
            dst_layers = range(span.dst_first, span.dst_first + span.count)
            assert src_layers.stop <= len(p_stages[p_stage]) and dst_layers.stop <= len(d_stages[d_stage])
        for s_local, d_local in zip(src_layers, dst_layers):
            layer = p_stages[p_stage][s_local]
            assert d_stages[d_stage][d_local] == layer, "a layer lands in another layer's cache"
            for s_block, d_block in zip(o.src_blocks, o.dst_blocks):
                block = d_block - 300
                assert s_block - 100 == block and block >= cached and owners[block] == sp_rank
                for h in o.slices:
                    assert h.src_rank == p_rank and h.dst_rank == d_rank
                    for k in range(h.num_heads):
                        head = p_first + h.src_head + k
                        assert h.src_head + k < p_count and h.dst_head + k < d_count
                        assert head == d_first + h.dst_head + k, "a head lands in another head's slot"
                        cell = (layer, head, block, o.link.decode_rank)
                        assert cell not in landed, f"{cell} sent twice"
                        landed[cell] = o.link.prefill_rank
    expected = {(layer, head, block, ds * d_tp + q)
                for ds, layers in enumerate(d_stages) for layer in layers for q in range(d_tp)
                for head in range(*_span(local_kv_heads(kv_heads, d_tp, q))) for block in range(cached, num_blocks)}
    assert set(landed) == expected


def _span(first_count):
    first, count = first_count
    return first, first + count


@pytest.mark.parametrize("kv_heads, num_layers, p_tp, p_sp, p_pp, d_tp, d_pp", [
    (2, 6, 2, 1, 3, 1, 2),  # the example: P TP2·PP3 -> D TP1·PP2 on six layers
    (4, 5, 1, 1, 2, 2, 3),
    (2, 4, 2, 1, 2, 2, 2),
    (1, 5, 2, 1, 3, 4, 1),  # one KV head replicated on both sides
    (4, 7, 4, 1, 1, 1, 4),
    (2, 4, 1, 2, 2, 2, 3),  # SP × PP: each SP rank of each stage pushes its blocks of its layers
    (8, 3, 2, 1, 3, 4, 3),
])
@pytest.mark.parametrize("cached", [0, 2])
def test_odd_layout_pairs(kv_heads, num_layers, p_tp, p_sp, p_pp, d_tp, d_pp, cached):
    check_plan(kv_heads, num_layers, p_tp, p_sp, p_pp, d_tp, d_pp, tokens=4 * 2 * p_sp * 2 - 1, cached=cached)


def _tp_for(kv_heads):
    """TP degrees that split or evenly replicate `kv_heads`."""
    return st.sampled_from([t for t in (1, 2, 3, 4, 6, 8) if (kv_heads % t == 0 if kv_heads >= t else t % kv_heads == 0)])


@st.composite
def layout_pairs(draw):
    kv_heads = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    num_layers = draw(st.integers(1, 9))
    p_sp = draw(st.sampled_from([1, 1, 2, 3]))
    return (kv_heads, num_layers, draw(_tp_for(kv_heads)), p_sp, draw(st.integers(1, num_layers)),
            draw(_tp_for(kv_heads)), draw(st.integers(1, num_layers)), draw(st.integers(1, 40)),
            draw(st.integers(0, 3)))


@settings(max_examples=150, deadline=None)
@given(layout_pairs())
def test_random_layout_pairs_land_every_layer_head_and_block_once(pair):
    kv_heads, num_layers, p_tp, p_sp, p_pp, d_tp, d_pp, tokens, cached = pair
    cached = min(cached, -(-tokens // 4) - 1)  # the last prompt block is never cached (decode side keeps it open)
    check_plan(kv_heads, num_layers, p_tp, p_sp, p_pp, d_tp, d_pp, tokens, max(cached, 0))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=12), st.integers(1, 6))
def test_micro_batches_cover_the_batch_in_whole_sequences(query_lens, pp):
    from splitserve.workers.pipeline import micro_batches

    parts = micro_batches(query_lens, pp)
    starts = {0}
    for n in query_lens:
        starts.add(max(starts) + n)
    assert len(parts) == min(pp, len(query_lens))
    assert parts[0][0] == 0 and parts[-1][1] == sum(query_lens)
    assert all(lo < hi and lo in starts and hi in starts for lo, hi in parts)  # non-empty, at sequence boundaries
    assert all(a[1] == b[0] for a, b in pairwise(parts))
