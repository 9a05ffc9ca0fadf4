"""Pipeline stages on gloo processes (PP3, and TP2·PP2) against one process: a prompt batch that flows as
micro-batches and a decode step give the same logits on the leader, each stage's cache holds exactly that stage's
layers of the single-process K/V, and each layer's KV-written hook fires once, after its last micro-batch."""
import pytest
import torch

from distributed import run_distributed
from hf_checkpoints import random_prompts, write_checkpoint
from splitserve.workers.batch import ForwardBatch

BLOCK = 8
PROMPTS = random_prompts([9, 33, 4, 21], seed=7)


def _batches(next_tokens=None, which=None):
    """The prompt batch (fresh sequences on consecutive blocks), or one decode step appending `next_tokens` (to the
    sequences `which` only, when given)."""
    ids, positions, slots, query, context, tables, rows = [], [], [], [], [], [], []
    first = 0
    for i, prompt in enumerate(PROMPTS):
        table = list(range(first, first + len(prompt) // BLOCK + 1))
        first += len(table)
        if which is not None and i not in which:
            continue
        span = range(len(prompt)) if next_tokens is None else range(len(prompt), len(prompt) + 1)
        ids += prompt if next_tokens is None else [next_tokens[i]]
        positions += span
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in span]
        query.append(len(span))
        context.append(span.stop)
        tables.append(table)
        rows.append(len(ids) - 1)
    return ForwardBatch(ids, positions, slots, query, context, tables, rows)


def _run(model_dir, tp, pp, rank):
    """(leader logits of the prompt batch, of the decode step, this rank's caches by global layer, hook layers)."""
    from splitserve.comm.kv_plan import stage_layers
    from splitserve.workers.kv_cache import allocate_kv_cache
    from splitserve.workers.loader import load_model
    from splitserve.workers.model_runner import ModelRunner
    from splitserve.workers.pipeline import PipelineStage, StagePosition, stage_groups

    group = stage_groups(rank, pp, tp) if pp > 1 else None
    layers = stage_layers(5, pp)[rank // tp]
    model = load_model(model_dir, tp=group, layers=layers) if pp > 1 else load_model(model_dir)
    caches = allocate_kv_cache(len(layers), 16, BLOCK, model.num_kv_heads, model.cfg.head_dim, torch.float32, "cpu")
    runner = ModelRunner(model, caches, model.cfg.eos_token_ids, "cpu")
    forward = PipelineStage(runner, StagePosition.of(rank, pp, tp)).forward_logits if pp > 1 else runner.forward_logits
    hooked = []
    layer_of = {id(c): i for i, c in enumerate(caches)}
    prefill = forward(_batches(), lambda cache: hooked.append(layer_of[id(cache)]))
    tokens = prefill.argmax(-1).tolist() if prefill is not None else [2] * len(PROMPTS)
    if pp > 1:  # every rank decodes the leader's tokens
        box = [tokens]
        torch.distributed.broadcast_object_list(box, src=0)
        tokens = box[0]
    decode = forward(_batches(tokens))
    if pp > 1:
        forward.__self__.drain()
    return prefill, decode, {layers[i]: c for i, c in enumerate(caches)}, hooked


def _stages(rank, world, model_dir, tp, pp):
    return _run(model_dir, tp, pp, rank)


def _in_flight(rank, world, model_dir, tp, pp):
    """The prompt batch, then its decode step as two batches in the pipeline at once: the leader launches both
    before it collects either (the last stage's logits wait for it)."""
    from splitserve.comm.kv_plan import stage_layers
    from splitserve.workers.kv_cache import allocate_kv_cache
    from splitserve.workers.loader import load_model
    from splitserve.workers.model_runner import ModelRunner
    from splitserve.workers.pipeline import PipelineStage, StagePosition, stage_groups

    group = stage_groups(rank, pp, tp)
    model = load_model(model_dir, tp=group, layers=stage_layers(5, pp)[rank // tp])
    caches = allocate_kv_cache(len(model.layers), 16, BLOCK, model.num_kv_heads, model.cfg.head_dim, torch.float32,
                               "cpu")
    stage = PipelineStage(ModelRunner(model, caches, model.cfg.eos_token_ids, "cpu"), StagePosition.of(rank, pp, tp))
    prefill = stage.forward_logits(_batches())
    box = [prefill.argmax(-1).tolist() if prefill is not None else None]
    torch.distributed.broadcast_object_list(box, src=0)
    groups = [_batches(box[0], which={0, 2}), _batches(box[0], which={1, 3})]
    for batch in groups:
        batch.micro_batches = 1
        stage.launch(batch)
    logits = [stage.collect(batch) for batch in groups] if rank == 0 else None
    stage.drain()
    return logits


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_checkpoint("llama", tmp_path_factory.mktemp("llama5"), seed=29, num_hidden_layers=5)


@pytest.fixture(scope="module")
def single(model_dir):
    return _run(model_dir, 1, 1, 0)


@pytest.mark.parametrize("tp, pp", [(1, 3), (2, 2)])
def test_batches_in_flight_match_one_process(model_dir, single, tp, pp):
    first, second = run_distributed(_in_flight, tp * pp, model_dir, tp, pp)[0]
    ref_decode = single[1]
    torch.testing.assert_close(first, ref_decode[[0, 2]], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, ref_decode[[1, 3]], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tp, pp", [(1, 3), (2, 2)])
def test_stages_match_one_process(model_dir, single, tp, pp):
    ref_prefill, ref_decode, ref_caches, _ = single
    results = run_distributed(_stages, tp * pp, model_dir, tp, pp)
    prefill, decode = results[0][0], results[0][1]
    torch.testing.assert_close(prefill, ref_prefill, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decode, ref_decode, rtol=1e-4, atol=1e-4)
    assert all(r[0] is None and r[1] is None for r in results[1:])  # logits live on the leader only
    kv_heads_per_rank = ref_caches[0].shape[3] // tp if tp <= ref_caches[0].shape[3] else 1
    for rank, (_, _, caches, hooked) in enumerate(results):
        assert hooked == list(range(len(caches))), f"rank {rank}: each layer's hook once, in order"
        head0 = (rank % tp) * kv_heads_per_rank
        for layer, cache in caches.items():
            expected = ref_caches[layer][..., head0 : head0 + kv_heads_per_rank, :]
            torch.testing.assert_close(cache, expected, rtol=1e-4, atol=1e-5)
    assert sorted(layer for r in results for layer in r[2]) == sorted(list(range(5)) * tp)


@pytest.mark.parametrize("pp, sp, tp", [(2, 1, 1), (3, 1, 2), (2, 2, 2), (4, 2, 1)])
def test_step_metadata_reaches_every_rank_once(pp, sp, tp):
    """The metadata relay is a tree rooted at the leader: every other rank has one source, sources come before
    their targets (stage order), and following the targets from the leader reaches each rank exactly once."""
    from splitserve.workers.pipeline import StagePosition

    world = pp * sp * tp
    positions = [StagePosition.of(r, pp, tp, sp) for r in range(world)]
    reached, frontier = [0], [0]
    while frontier:
        rank = frontier.pop()
        for target in positions[rank].control_targets:
            assert positions[target].control_source == rank
            assert positions[target].stage >= positions[rank].stage
            reached.append(target)
            frontier.append(target)
    assert sorted(reached) == list(range(world))
