"""Times forwards through the real ranks of an instance layout (TP × SP × PP) for `splitserve profile --layouts`:
one process per rank on 127.0.0.1, each a `workers/instance.py` RankWorker built as the launcher builds it (its
process group and TP / SP / stage groups, its model shard and KV cache), running the instance's forward (TP layers,
the SP prefill runner, pipeline stages). The leader (rank 0) times each forward from its start (every rank enters it
together, after a barrier) to its logits, and the part of it spent blocked in communication (cluster/comm_timer.py),
and right after it the same shape through the whole model at TP 1 in its own process: the layout and TP 1 alternate shape by shape, so a busy moment on the machine touches both sides of
their difference (what the layout adds) alike."""
from __future__ import annotations

import pickle
import time
import traceback
from datetime import timedelta

from splitserve.cluster.comm_timer import CommTimer

Shape = tuple  # ("prefill", [lengths]) or ("decode", (batch, context per sequence))


def _rank_times(rank: int, spec, port: int, shapes: list[Shape], repeats: int, comm
                ) -> tuple[list[list[float]], list[list[float]], list[list[float]]] | None:
    """One rank's share of every shape, swept `repeats` times like the in-process profile. On the leader, the seconds
    of each forward through the layout's ranks, (of those the leader spent blocked in communication, its calls) (`comm`,
    a CommTimer), and of the same shape through the whole model in this process."""
    import torch.distributed as dist

    from splitserve.cluster.profiler import sequences, shape_lengths
    from splitserve.workers.batch import build_batch
    from splitserve.workers.block_manager import BlockManager
    from splitserve.workers.instance import RankWorker
    from splitserve.workers.llm import LLM
    from splitserve.workers.sp_block_manager import SPBlockManager

    worker = RankWorker(spec, rank)
    num_blocks = worker.init("127.0.0.1", port)["num_blocks"]
    block_size = spec.engine.block_size
    # The leader's bookkeeping, as the instance's: one pool per SP rank under SP.
    blocks = SPBlockManager(num_blocks, block_size, spec.sp) if spec.sp > 1 else BlockManager(num_blocks, block_size)
    whole = None
    if rank == 0:
        whole = LLM(spec.model_dir, spec.dtype, str(worker.device), block_size=block_size,
                    kv_cache_bytes=spec.engine.kv_cache_bytes, backend=spec.engine.backend)
    timed: list[list[float]] = [[] for _ in shapes]
    blocked: list[list[tuple[float, int]]] = [[] for _ in shapes]
    single: list[list[float]] = [[] for _ in shapes]
    for sweep in range(repeats):
        for i, shape in enumerate(shapes):
            decode = shape[0] == "decode"
            seqs = sequences(blocks, shape_lengths(shape), computed_all_but_last=decode)
            batch = build_batch(seqs, blocks)
            alone = None
            if whole is not None:
                alone_seqs = sequences(whole.blocks, shape_lengths(shape), computed_all_but_last=decode)
                alone = (alone_seqs, build_batch(alone_seqs, whole.blocks))
            if sweep == 0:  # warm-up
                worker.execute(batch, [])
                if alone is not None:
                    whole.runner.forward_logits(alone[1])
            dist.barrier()
            comm.seconds, comm.calls = 0.0, 0
            timed[i].append(_timed(lambda: worker.execute(batch, []), worker.device))
            blocked[i].append((comm.seconds, comm.calls))
            if alone is not None:
                single[i].append(_timed(lambda: whole.runner.forward_logits(alone[1]), worker.device))
                for s in alone[0]:
                    whole.blocks.free(s.seq_id)
            for s in seqs:
                blocks.free(s.seq_id)
    # A last stage hands its logits over without waiting for the leader to take them: leaving before the leader has
    # them would cut its receive short.
    dist.barrier()
    worker.stop()
    return (timed, blocked, single) if rank == 0 else None


def _timed(forward, device) -> float:
    import torch

    start = time.perf_counter()
    forward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _entry(rank: int, pickled_spec: bytes, port: int, shapes: list[Shape], repeats: int, queue) -> None:
    import dataclasses

    import torch.distributed as dist

    # Before the instance code is imported (unpickling the spec imports it): a module may bind a call at import.
    comm = CommTimer().install()
    spec = pickle.loads(pickled_spec)
    if spec.device.startswith("cuda"):
        spec = dataclasses.replace(spec, device=f"cuda:{rank}")  # one device per rank
    try:
        queue.put((rank, "ok", pickle.dumps(_rank_times(rank, spec, port, shapes, repeats, comm))))
    except BaseException:  # report, never leave the parent waiting
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def measure_layout(spec, shapes: list[Shape], repeats: int, timeout: float = 1800.0
                   ) -> tuple[list[list[float]], list[list[tuple[float, int]]], list[list[float]]]:
    """(through the ranks of `spec`, a `workers.instance.InstanceSpec`; of that, the leader's time blocked in
    communication and its communication calls; through the whole model at TP 1 alongside): seconds per repeat of each
    shape's forward (prefill: every prompt token; decode: one token per sequence over its context)."""
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    ranks = spec.world_size
    if spec.device.startswith("cuda") and torch.cuda.device_count() < ranks:
        raise ValueError(f"--layouts: {ranks} ranks need {ranks} GPUs (one per rank), this machine has "
                         f"{torch.cuda.device_count()}")
    # The instance's store, hosted here as rank 0's actor hosts it in a cluster; every rank joins it as a client.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(r, pickle.dumps(spec), store.port, shapes, repeats, queue), daemon=True)
             for r in range(ranks)]
    for p in procs:
        p.start()
    results, failed = {}, True
    try:
        for _ in range(ranks):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise RuntimeError(f"layout profile: rank {rank} of {ranks} (tp {spec.tp} sp {spec.sp} pp {spec.pp}) "
                                   f"failed:\n{value}")
            results[rank] = pickle.loads(value)
        failed = False
    finally:
        for p in procs:
            if failed:  # the other ranks wait for the failed one in a collective: nothing more will come
                p.kill()
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        del store
    return results[0]
