"""Per-layer time of a TP = 2 prefill forward on CPU/gloo with and without TokenWeave overlap, against its
compute alone (whole batch, and split in two parts) and its communication alone; overlap efficiency =
1 - (t_overlap - max(t_compute, t_comm)) / min(t_compute, t_comm) (1: the shorter one is fully hidden; 0: no
better than running them back to back). Prints a table and saves JSON.

    python benchmarks/tp_overlap.py [--hidden 256] [--intermediate 512] [--layers 4] [--seqs 32] [--seq-len 32]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp

RESULTS = Path(__file__).resolve().parent / "results" / "tp_overlap.json"


def _config(args):
    from splitserve.workers.config import ModelConfig

    heads = args.hidden // 64
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=1024, hidden_size=args.hidden,
                       intermediate_size=args.intermediate, num_layers=args.layers, num_heads=heads,
                       num_kv_heads=heads, head_dim=64, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       rope_theta=10000.0, rope_scaling=None, qkv_bias=False, o_proj_bias=False,
                       tie_word_embeddings=False, sliding_window=None, bos_token_id=0, eos_token_ids=(1,),
                       torch_dtype="float32")


def _interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median wall time of each function, measured round-robin so that load from other processes on a
    shared machine spreads over all of them alike; ranks start each measurement together."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for k, fn in fns.items():
            torch.distributed.barrier()
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _rank_main(rank, world, port, args, queue):
    import torch.distributed as dist

    from splitserve.comm.fused_norm import allreduce_add_rmsnorm
    from splitserve.comm.overlap import plan_parts, run_stages
    from splitserve.comm.tensor_parallel import SINGLE, TPGroup
    from splitserve.workers.layers.attention import AttentionMetadata
    from splitserve.workers.model import CausalLM

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    torch.manual_seed(rank)
    tp = TPGroup.from_group()
    model = CausalLM(_config(args), tp)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    tokens = args.seqs * args.seq_len
    positions = torch.arange(args.seq_len).repeat(args.seqs)
    lens = [args.seq_len] * args.seqs
    meta = AttentionMetadata(slot_mapping=torch.zeros(tokens, dtype=torch.long), query_lens=lens, context_lens=lens,
                             block_tables=None)
    hidden = torch.randn(tokens, args.hidden)
    stages = model.tp_stages(None)
    whole, halves = plan_parts(positions, meta, None, None), plan_parts(positions, meta, 2, None)
    row = {}
    with torch.inference_mode():
        for method in args.methods:
            def forward(parts, group=tp):
                run_stages(stages, hidden.clone(), hidden.clone(), parts, group, method)

            partials = [torch.randn(tokens, args.hidden) for _ in stages]
            t = _interleaved_medians({
                "t_compute": lambda: forward(whole, SINGLE),
                "t_compute_split": lambda: forward(halves, SINGLE),  # what splitting alone costs
                "t_comm": lambda: [allreduce_add_rmsnorm(x.clone(), hidden, st.weight, st.eps, tp, method)
                                   for x, st in zip(partials, stages)],
                "t_copies": lambda: [x.clone() for x in partials],  # taken off t_comm
                "t_sequential": lambda: forward(whole),
                "t_overlap": lambda: forward(halves),
            }, args.repeats)
            t["t_comm"] -= t.pop("t_copies")
            row[method] = t
    queue.put((rank, row, [p.rows.stop - p.rows.start for p in halves]))
    dist.destroy_process_group()


def efficiency(t_overlap: float, t_compute: float, t_comm: float) -> float:
    return 1 - (t_overlap - max(t_compute, t_comm)) / min(t_compute, t_comm)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--methods", nargs="+", default=["reference", "rs_ag"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (row, split)) for r, row, split in (queue.get(timeout=1800) for _ in procs))
    for p in procs:
        p.join()
    rows, split = results[0]
    layers = args.layers
    print(f"TP=2 gloo, {args.seqs}x{args.seq_len} tokens split {split}, hidden {args.hidden}, "
          f"intermediate {args.intermediate}; per-layer ms (median of {args.repeats}, rank 0)")
    print(f"{'method':<10} {'compute':>9} {'split':>9} {'comm':>9} {'sequential':>11} {'overlap':>9} {'speedup':>8} "
          f"{'efficiency':>11}")
    table = {}
    for method, t in rows.items():
        per = {k: 1e3 * v / layers for k, v in t.items()}
        eff = efficiency(per["t_overlap"], per["t_compute"], per["t_comm"])
        speedup = per["t_sequential"] / per["t_overlap"]
        table[method] = {**{k + "_ms_per_layer": round(v, 3) for k, v in per.items()},
                         "speedup": round(speedup, 3), "overlap_efficiency": round(eff, 3)}
        print(f"{method:<10} {per['t_compute']:9.2f} {per['t_compute_split']:9.2f} {per['t_comm']:9.2f} "
              f"{per['t_sequential']:11.2f} "
              f"{per['t_overlap']:9.2f} {speedup:7.2f}x {eff:11.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": mp.cpu_count(), "torch": torch.__version__,
                    "threads_per_rank": 1, "load_average_1m_at_end": os.getloadavg()[0]},
        "config": {k: v for k, v in vars(args).items() if k != "out"}, "split": split, "results": table,
    }, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
