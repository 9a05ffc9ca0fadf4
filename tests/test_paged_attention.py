"""Batched decode attention groups rows by context length (each group padded only to its own longest context) and
gives the same result as one batch padded to the longest context."""
import torch

from splitserve.workers.layers.attention import AttentionMetadata, PagedAttention, group_by_length


def test_group_by_length():
    assert group_by_length([10, 12, 11]) == [[1, 2, 0]]
    assert group_by_length([100, 10, 60, 45, 5]) == [[0, 2], [3], [1, 4]]
    assert group_by_length([1000, 400, 150, 60, 20, 8]) == [[0], [1], [2], [3, 4, 5]]  # at most 4 groups
    groups = group_by_length([5, 300, 7, 290, 90])
    assert sorted(i for g in groups for i in g) == list(range(5))


def test_grouped_decode_equals_one_padded_batch():
    torch.manual_seed(0)
    heads, kv_heads, dim, block_size, num_blocks = 4, 2, 16, 8, 64
    attn = PagedAttention(heads, kv_heads, dim)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, dim)
    context = [200, 9, 130, 17, 64, 3]
    perm = torch.randperm(num_blocks).tolist()
    tables, used = [], 0
    for ctx in context:
        n = -(-ctx // block_size)
        tables.append(perm[used:used + n])
        used += n
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(len(context), heads, dim)
    meta = AttentionMetadata(slot_mapping=torch.zeros(len(context), dtype=torch.long), query_lens=[1] * len(context),
                             context_lens=context, block_tables=bt, context_lens_t=torch.tensor(context))
    assert len(meta.decode_groups(block_size)) == 4
    grouped = attn._decode_batch(q, cache, meta)
    padded = attn._decode(q, cache, bt, meta.context_lens_t)
    torch.testing.assert_close(grouped, padded, rtol=1e-5, atol=1e-6)
    # and each row equals attention over exactly its own context
    for i, ctx in enumerate(context):
        k, v = attn._gather(cache, bt[i], ctx)
        own = attn._attend(q[i:i + 1], k, v, torch.ones(1, ctx, dtype=torch.bool))
        torch.testing.assert_close(grouped[i], own[0], rtol=1e-5, atol=1e-6)
