"""Times forwards through real pipeline stages for `splitserve profile --pp`: `pp` processes on 127.0.0.1 joined in
one process group (gloo on CPU, NCCL on GPUs, one device per stage), each holding its stage's layers and their KV
cache and running `workers/pipeline.py`'s stage, as the ranks of a pipeline-parallel instance do. The leader (stage
0) times each forward from its start to the logits coming back from the last stage, and right after it the same
batch through the whole model in its own process: PP 1 and PP `pp` alternate shape by shape, so a busy moment on the
machine touches both sides of their difference (the cost of the extra stages) alike."""
from __future__ import annotations

import pickle
import socket
import time
import traceback
from datetime import timedelta

Shape = tuple  # ("prefill", [lengths]) or ("decode", (batch, context per sequence))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stage_times(rank: int, pp: int, model_dir: str, dtype: str, device: str, shapes: list[Shape], repeats: int,
                 block_size: int) -> tuple[list[list[float]], list[list[float]]] | None:
    """One stage's share of every shape, swept `repeats` times like the in-process profile. On the leader, the
    seconds of each forward through the stages (every stage enters it together, after a barrier) and of the same
    batch through the whole model in this process."""
    import torch.distributed as dist

    from splitserve.cluster.profiler import sequences
    from splitserve.comm.kv_plan import stage_layers
    from splitserve.workers.batch import build_batch
    from splitserve.workers.block_manager import BlockManager
    from splitserve.workers.config import load_config
    from splitserve.workers.kv_cache import allocate_kv_cache
    from splitserve.workers.loader import load_model, resolve_dtype
    from splitserve.workers.model_runner import ModelRunner
    from splitserve.workers.pipeline import PipelineStage, StagePosition, stage_groups

    cfg = load_config(model_dir)
    layers = stage_layers(cfg.num_layers, pp)[rank]
    model = load_model(model_dir, dtype, device, stage_groups(rank, pp, 1), "native", layers=layers)
    blocks_needed = max(sum(-(-n // block_size) for n in _lengths(shape)) for shape in shapes)
    caches = allocate_kv_cache(len(layers), blocks_needed + 1, block_size, model.num_kv_heads, cfg.head_dim,
                               resolve_dtype(dtype), device)
    stage = PipelineStage(ModelRunner(model, caches, cfg.eos_token_ids, device), StagePosition.of(rank, pp, 1))
    whole = None
    if rank == 0:
        full = load_model(model_dir, dtype, device, backend="native")
        whole = ModelRunner(full, allocate_kv_cache(cfg.num_layers, blocks_needed + 1, block_size, full.num_kv_heads,
                                                    cfg.head_dim, resolve_dtype(dtype), device),
                            cfg.eos_token_ids, device)
    blocks = BlockManager(blocks_needed + 1, block_size)
    staged: list[list[float]] = [[] for _ in shapes]
    single: list[list[float]] = [[] for _ in shapes]
    for sweep in range(repeats):
        for i, shape in enumerate(shapes):
            seqs = sequences(blocks, _lengths(shape), computed_all_but_last=shape[0] == "decode")
            batch = build_batch(seqs, blocks)
            if sweep == 0:  # warm-up
                stage.forward_logits(batch)
                if whole is not None:
                    whole.forward_logits(batch)
            dist.barrier()
            staged[i].append(_timed(stage.forward_logits, batch, device))
            if whole is not None:
                single[i].append(_timed(whole.forward_logits, batch, device))
            for s in seqs:
                blocks.free(s.seq_id)
    # The last stage hands its logits over without waiting for the leader to take them: leaving before the leader
    # has them would cut its receive short.
    dist.barrier()
    return (staged, single) if rank == 0 else None


def _timed(forward, batch, device: str) -> float:
    import torch

    start = time.perf_counter()
    forward(batch)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _lengths(shape: Shape) -> list[int]:
    phase, value = shape
    return list(value) if phase == "prefill" else [value[1]] * value[0]


def _entry(rank, pp, port, backend, args, queue):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # one thread per rank, as instance ranks run
    device = args[2]
    if device.startswith("cuda"):
        device = f"cuda:{rank}"
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=pp,
                                timeout=timedelta(seconds=600))
        queue.put((rank, "ok", pickle.dumps(_stage_times(rank, pp, args[0], args[1], device, *args[3:]))))
    except BaseException:  # report, never leave the parent waiting
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def measure_pipeline(model_dir: str, pp: int, shapes: list[Shape], repeats: int, dtype: str = "float32",
                     device: str = "cpu", block_size: int = 16, timeout: float = 1800.0
                     ) -> tuple[list[list[float]], list[list[float]]]:
    """(through `pp` stages, through the whole model alongside): seconds per repeat of each shape's forward
    (prefill: every prompt token; decode: one token per sequence over its context)."""
    import torch
    import torch.multiprocessing as mp

    if device.startswith("cuda") and torch.cuda.device_count() < pp:
        raise ValueError(f"--pp: {pp} stages need {pp} GPUs (one per stage), this machine has "
                         f"{torch.cuda.device_count()}")
    backend = "nccl" if device.startswith("cuda") else "gloo"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    args = (model_dir, dtype, device, shapes, repeats, block_size)
    procs = [ctx.Process(target=_entry, args=(r, pp, port, backend, args, queue), daemon=True) for r in range(pp)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(pp):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise RuntimeError(f"pipeline profile: stage {rank} of {pp} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return results[0]
