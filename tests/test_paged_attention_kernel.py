"""The Triton paged-attention kernel, run by Triton's interpreter on CPU, against its torch twin on random inputs
(never zero); and the twin against the engine's reference attention (`workers/layers/attention.py`).

Cases cover decode and prefill over a cached prefix, ragged batches, GQA/MQA/MHA, head_dim 16/24/64/128/256,
block sizes that are not powers of two, block tables whose blocks are unordered with holes between them and
padding that points at live blocks, sliding windows at their edges, and split-K with its merge.
Tolerances against the float32 twin: float32 within 2e-6 absolute + 1e-5 relative (another summation order);
float16 within 4e-3 and bfloat16 within 2e-2 absolute + relative (the probabilities are rounded to the cache
dtype before the P @ V product, as on GPUs; a few ulps of the output).
"""
import os
import subprocess
import sys

import pytest
import torch

from splitserve.kernels import backend
from splitserve.kernels.paged_attention import paged_attention, paged_attention_torch
from splitserve.workers.layers.attention import AttentionMetadata, PagedAttention

TOLERANCE = {torch.float32: (1e-5, 2e-6), torch.float16: (4e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2)}


def nonzero(shape, dtype, gen):
    mag = torch.rand(shape, generator=gen) + 0.1
    return (mag * (torch.randint(0, 2, shape, generator=gen) * 2 - 1)).to(dtype)


def paged_inputs(seed, dtype, heads, kv_heads, dim, block_size, contexts, query_lens=None, index_dtype=torch.long):
    """Random caches with more blocks than the batch uses; each sequence gets unordered, non-adjacent blocks and
    its table's padding points at other sequences' blocks, so reading past a context shows up as an error."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-c // block_size) for c in contexts]
    num_blocks = 2 * sum(needed) + 3
    k_cache = nonzero((num_blocks, block_size, kv_heads, dim), dtype, gen)
    v_cache = nonzero((num_blocks, block_size, kv_heads, dim), dtype, gen)
    order = torch.randperm(num_blocks, generator=gen)[::2].tolist()  # every other block: holes between
    width = max(needed) + 2
    tables, used = [], 0
    for n in needed:
        own = order[used:used + n]
        used += n
        tables.append(own + [order[(used + j) % len(order)] for j in range(width - n)])
    block_tables = torch.tensor(tables, dtype=index_dtype)
    context_lens = torch.tensor(contexts, dtype=index_dtype)
    if query_lens is None:
        q = nonzero((len(contexts), heads, dim), dtype, gen)
        return q, k_cache, v_cache, block_tables, context_lens, None, 1
    starts = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=index_dtype)
    q = nonzero((sum(query_lens), heads, dim), dtype, gen)
    return q, k_cache, v_cache, block_tables, context_lens, starts, max(query_lens)


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# name: (dtype, heads, kv_heads, head_dim, block_size, contexts, query_lens (None: decode), window, num_splits)
CASES = {
    "decode-gqa-d16-ragged": (F32, 4, 2, 16, 8, [1, 37, 5, 100, 16], None, None, None),
    "decode-mqa-d24-bs5": (F32, 4, 1, 24, 5, [3, 61, 12], None, None, None),
    "decode-split4-gqa": (F32, 8, 2, 16, 16, [300, 7, 129, 256], None, None, 4),
    "decode-split8-more-splits-than-keys": (F32, 2, 2, 16, 4, [9, 2], None, None, 8),
    "decode-window-edges": (F32, 4, 2, 16, 8, [12, 13, 11, 40, 1], None, 12, None),
    "decode-window-split2": (F32, 4, 2, 16, 8, [200, 30, 64], None, 48, 2),
    "decode-window-1": (F32, 2, 1, 16, 8, [20, 1], None, 1, None),
    "decode-mha-d128-f16": (F16, 4, 4, 128, 16, [70, 3], None, None, 2),
    "decode-gqa-d64-bf16": (BF16, 8, 2, 64, 16, [130, 17, 1], None, None, None),
    "decode-int32-indices": (F32, 4, 2, 16, 8, [37, 5], None, None, 2),
    "prefill-prefix-gqa3-d24": (F32, 6, 2, 24, 8, [37, 5, 100, 20], [4, 5, 30, 1], None, None),
    "prefill-long-chunk-tiles": (F32, 4, 4, 16, 8, [90, 40], [70, 1], None, None),
    "prefill-window-split2": (F32, 6, 2, 24, 8, [37, 9, 100], [4, 9, 30], 7, 2),
    "prefill-window-edges": (F32, 4, 2, 16, 8, [30, 33], [17, 16], 16, None),
    "prefill-mqa-bs5-split4": (F32, 4, 1, 16, 5, [130, 64], [20, 64], None, 4),
    "prefill-d64-bf16": (BF16, 8, 2, 64, 16, [70, 24], [6, 24], None, None),
    "prefill-d128-f16-window": (F16, 4, 2, 128, 16, [50, 18], [9, 3], 20, None),
    "prefill-d256-bf16": (BF16, 4, 2, 256, 16, [40, 20], [9, 20], None, None),
}


def make_cases() -> dict:
    cases = {}
    for i, (name, (dtype, heads, kv_heads, dim, block_size, contexts, qlens, window, splits)) in enumerate(
            sorted(CASES.items())):
        index = torch.int32 if "int32" in name else torch.long
        cases[name] = (paged_inputs(i, dtype, heads, kv_heads, dim, block_size, contexts, qlens, index),
                       dim**-0.5, window, splits)
    return cases


def run_triton(inputs, scale, window, splits):
    module = backend.triton_module("paged_attention_triton")
    return module.paged_attention_triton(*inputs, scale, window, splits)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    if not backend.HAS_TRITON:
        pytest.skip("triton is not installed")
    out = tmp_path_factory.mktemp("paged") / "triton.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out)


CASES_BUILT = make_cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_matches_twin(interpreted, case):
    inputs, scale, window, splits = CASES_BUILT[case]
    got = interpreted[case]
    want = paged_attention_torch(*inputs, scale, window, splits)
    assert got.dtype == want.dtype and got.shape == want.shape
    rtol, atol = TOLERANCE[want.dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def _engine_reference(inputs, window):
    """The engine's torch path on the same cache: batched decode, or the mixed path for prompt chunks."""
    q, k_cache, v_cache, tables, contexts, starts, _ = inputs
    heads, kv_heads, dim = q.shape[1], k_cache.shape[2], q.shape[2]
    attn = PagedAttention(heads, kv_heads, dim, window)
    cache = torch.stack([k_cache, v_cache])
    if starts is None:
        return attn._decode(q, cache, tables, contexts)
    qlens = (starts[1:] - starts[:-1]).tolist()
    meta = AttentionMetadata(torch.empty(0, dtype=torch.long), qlens, contexts.tolist(), tables, contexts)
    k_new = torch.cat([attn._gather(cache, tables[i], c)[0][c - n:] for i, (n, c) in enumerate(zip(qlens, contexts))])
    v_new = torch.cat([attn._gather(cache, tables[i], c)[1][c - n:] for i, (n, c) in enumerate(zip(qlens, contexts))])
    return attn._mixed(q, k_new, v_new, cache, meta)


@pytest.mark.parametrize("case", [c for c in sorted(CASES) if CASES[c][0] == F32])
def test_twin_matches_engine_attention(case):
    inputs, scale, window, splits = CASES_BUILT[case]
    want = _engine_reference(inputs, window)
    torch.testing.assert_close(paged_attention_torch(*inputs, scale, window, splits), want, rtol=1e-5, atol=2e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_kernel_matches_twin_on_cuda(case):
    inputs, scale, window, splits = CASES_BUILT[case]
    inputs = tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in inputs)
    got = paged_attention(*inputs, scale, window, splits)
    want = paged_attention_torch(*inputs, scale, window, splits)
    rtol, atol = TOLERANCE[want.dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_twin_is_used_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    inputs, scale, window, splits = CASES_BUILT["decode-gqa-d16-ragged"]
    assert torch.equal(paged_attention(*inputs, scale, window, splits),
                       paged_attention_torch(*inputs, scale, window, splits))


def test_rejects_mismatched_inputs():
    q, k, v, tables, contexts, _, _ = CASES_BUILT["decode-gqa-d16-ragged"][0]
    with pytest.raises(ValueError, match="v_cache"):
        paged_attention_torch(q, k, v[:, :4], tables, contexts, None, 1, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        paged_attention_torch(q.half(), k, v, tables, contexts, None, 1, 1.0)
    with pytest.raises(ValueError, match="heads"):
        paged_attention_torch(q[:, :3], k, v, tables, contexts, None, 1, 1.0)
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention_torch(q, k, v, tables[:2], contexts, None, 1, 1.0)
    with pytest.raises(ValueError, match="query_starts"):
        paged_attention_torch(q, k, v, tables, contexts, torch.tensor([0, 1]), 1, 1.0)
    with pytest.raises(ValueError, match="one query per sequence"):
        paged_attention_torch(q[:2], k, v, tables, contexts, None, 1, 1.0)


if __name__ == "__main__":  # the interpreted side of `interpreted`
    assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules
    torch.set_num_threads(1)
    torch.save({name: run_triton(*case) for name, case in make_cases().items()}, sys.argv[1])
