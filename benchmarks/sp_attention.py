"""Per-layer time, bytes and messages of ring vs TokenRing vs an all-gather-K/V baseline for causal prefill
attention on 2 and 4 gloo CPU processes. Prints a table and saves JSON.

    python benchmarks/sp_attention.py [--worlds 2 4] [--lengths 4096 8192 16384 32768] [--heads 1] [--kv-heads 1]
                                      [--head-dim 32] [--repeats 3] [--budget-s 150]

CPU times over gloo say little about NVLink: compute here is roughly 10^4 times slower than on an H100 while loopback
TCP is only roughly 10^2 times slower than NVLink, so transfers hide far more easily here than they will there. What carries over are the byte and message counts
(counted around the comm object and checked against the formulas) and the overlap structure.
"""
from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from splitserve.comm import sp_common
from splitserve.comm.sequence_parallel import SPGroup, bytes_per_layer, messages_per_layer, sp_attention, \
    step_link_bytes
from splitserve.comm.sp_common import ZigzagLayout, attend_blocks, block_attention, zigzag_blocks

ALGORITHMS = ("ring", "token_ring", "all_gather")
# Shapes for the formula table: (name, heads, kv_heads, head_dim), bf16 on the wire.
MODEL_SHAPES = [("MHA 32/32/128", 32, 32, 128), ("GQA-2 32/16/128", 32, 16, 128), ("GQA-4 32/8/128", 32, 8, 128),
                ("GQA-8 64/8/128", 64, 8, 128)]


def all_gather_attention(q, k, v, layout: ZigzagLayout, sp: SPGroup, scale: float) -> torch.Tensor:
    """Baseline: gather every rank's K/V, then attend causally with nothing overlapped."""
    kv = torch.stack([k, v])
    parts = [torch.empty_like(kv) for _ in range(sp.size)]
    dist.all_gather(parts, kv, group=sp.group)
    out = torch.empty_like(q)
    n = sp.size
    for lo, c in zip(layout.local_cu_seqlens, layout.chunk_lens):
        full = kv.new_empty((2, 2 * n * c, *k.shape[1:]))
        for rank, part in enumerate(parts):
            for half, chunk in enumerate(layout.chunks_of(rank)):
                full[:, chunk * c : (chunk + 1) * c] = part[:, lo + half * c : lo + (half + 1) * c]
        for half, chunk in enumerate(layout.chunks_of(sp.rank)):
            rows = slice(lo + half * c, lo + (half + 1) * c)
            end = (chunk + 1) * c
            out[rows] = block_attention(q[rows], full[0, :end], full[1, :end], scale, True, chunk * c)[0].to(q.dtype)
    return out


def compute_only(q, k, v, layout, sp, scale) -> None:
    """This rank's block attention with no transfer: the ring schedule on local tensors of the same shapes.

    Under zigzag every (q rank, kv rank) pair costs the same, so ring, TokenRing and the baseline share this figure.
    """
    for step in range(sp.size):
        attend_blocks(q, k, v, zigzag_blocks(layout, sp.rank, (sp.rank - step) % sp.size, True), scale)


def _timed(fn, group) -> float:
    dist.barrier(group=group)
    start = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)  # a layer ends when its slowest rank does
    return float(elapsed)


def bench(rank: int, world: int, cfg: dict) -> list[dict]:
    sent = []
    send = sp_common.RingComm.send

    def counting_send(self, tensor, dst, tag=0):
        sent.append(tensor.numel() * tensor.element_size())
        return send(self, tensor, dst, tag)

    sp_common.RingComm.send = counting_send
    sp = SPGroup.create()
    rows, started, last_cost = [], time.perf_counter(), 0.0
    for length in cfg["lengths"]:
        # Every rank must agree whether to run the next (about 4x dearer) length: rank 0 decides.
        go = torch.tensor([time.perf_counter() - started + 4 * last_cost <= cfg["budget_s"]], dtype=torch.int32)
        dist.broadcast(go, 0)
        if not go.item():
            break
        t0 = time.perf_counter()
        rows += _bench_length(sp, length, cfg, sent)
        last_cost = time.perf_counter() - t0
    return rows


def _bench_length(sp, length, cfg, sent) -> list[dict]:
    layout = ZigzagLayout((length,), sp.size)
    g = torch.Generator().manual_seed(sp.rank)
    t = layout.local_tokens
    q = torch.randn(t, cfg["heads"], cfg["head_dim"], generator=g)
    k, v = (torch.randn(t, cfg["kv_heads"], cfg["head_dim"], generator=g) for _ in range(2))
    scale = cfg["head_dim"] ** -0.5
    shape = (sp.size, layout.padded_total, cfg["heads"], cfg["kv_heads"], cfg["head_dim"], 4)
    runs = {
        "compute_only": lambda: compute_only(q, k, v, layout, sp, scale),
        "ring": lambda: sp_attention(q, k, v, layout, sp, "ring"),
        "token_ring": lambda: sp_attention(q, k, v, layout, sp, "token_ring"),
        "all_gather": lambda: all_gather_attention(q, k, v, layout, sp, scale),
    }
    times = {name: [] for name in runs}
    counted = {}
    for _ in range(cfg["repeats"]):  # rounds over all variants, so load from other processes hits each alike
        for name, run in runs.items():
            sent.clear()
            times[name].append(_timed(run, sp.group))
            counted[name] = torch.tensor([len(sent), sum(sent)], dtype=torch.int64)
    rows = []
    for algorithm in ALGORITHMS:
        totals = counted[algorithm]
        dist.all_reduce(totals, group=sp.group)
        rows.append({
            "world": sp.size, "seq_len": length, "algorithm": algorithm, "time_s": statistics.median(times[algorithm]),
            "compute_only_s": statistics.median(times["compute_only"]),
            "messages": int(totals[0]) if algorithm != "all_gather" else messages_per_layer(algorithm, *shape),
            "bytes": int(totals[1]) if algorithm != "all_gather" else bytes_per_layer(algorithm, *shape),
            "counted": algorithm != "all_gather",
            "formula_bytes": bytes_per_layer(algorithm, *shape),
            "formula_messages": messages_per_layer(algorithm, *shape),
            "step_link_bytes": step_link_bytes(algorithm, *shape) if algorithm != "all_gather" else None,
        })
    return rows


def _entry(rank, world, port, cfg, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = bench(rank, world, cfg)
        if rank == 0:
            queue.put(rows)
    finally:
        dist.destroy_process_group()


def run_world(world: int, cfg: dict) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_entry, args=(r, world, port, cfg, queue)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a rank of world {world} failed (exit codes {[p.exitcode for p in procs]})")
    return queue.get()


def formula_table(worlds, lengths) -> list[dict]:
    """Bytes per layer (all ranks) and busiest link per step, bf16, for common model shapes."""
    rows = []
    for name, heads, kv_heads, d in MODEL_SHAPES:
        for n in worlds:
            s = max(lengths)
            shape = (n, s, heads, kv_heads, d, 2)
            rows.append({"shape": name, "world": n, "seq_len": s,
                         **{f"{a}_bytes": bytes_per_layer(a, *shape) for a in ("ring", "token_ring")},
                         **{f"{a}_step_link_bytes": step_link_bytes(a, *shape) for a in ("ring", "token_ring")}})
    return rows


def _mib(n) -> str:
    return f"{n / 2**20:9.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=150.0, help="per world; longer lengths are skipped")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sp_attention.json")
    args = parser.parse_args()
    cfg = {"lengths": args.lengths, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
           "repeats": args.repeats, "budget_s": args.budget_s}
    rows = [row for world in args.worlds for row in run_world(world, cfg)]
    print(f"causal, float32, heads={args.heads} kv_heads={args.kv_heads} head_dim={args.head_dim}; "
          "time = slowest rank, median of repeats")
    print(f"{'N':>2} {'S':>6} {'algorithm':>10} {'time s':>8} {'compute s':>9} {'MiB/layer':>9} {'msgs':>5}"
          f" {'MiB/link/step':>13}")
    for r in rows:
        link = "-" if r["step_link_bytes"] is None else _mib(r["step_link_bytes"])
        bytes_note = "" if r["counted"] else "  (analytic)"
        print(f"{r['world']:>2} {r['seq_len']:>6} {r['algorithm']:>10} {r['time_s']:8.2f} {r['compute_only_s']:9.2f}"
              f" {_mib(r['bytes'])} {r['messages']:>5} {link:>13}{bytes_note}")
    table = formula_table(args.worlds, args.lengths)
    print("\nformulas, bf16, S = longest length: MiB per layer (all ranks) | MiB on the busiest link per step")
    for r in table:
        print(f"{r['shape']:>16} N={r['world']}  ring {_mib(r['ring_bytes'])} | {_mib(r['ring_step_link_bytes'])}"
              f"   token_ring {_mib(r['token_ring_bytes'])} | {_mib(r['token_ring_step_link_bytes'])}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "config": vars(args) | {"out": args.out.name}, "machine": platform.platform(), "torch": torch.__version__,
        "threads_per_rank": 1, "formulas": {
            "ring": "(N-1)*S*2*Hkv*d*b bytes, N(N-1) messages",
            "token_ring": "(N-1)*S*H*d*b + f*(N-1)*S*H*(d*b+4) bytes, f=3/4 causal (1 non-causal), 2N(N-1) messages",
            "all_gather": "(N-1)*S*2*Hkv*d*b bytes as a ring all-gather, not overlapped",
            "per_step_busiest_link": "ring T*2*Hkv*d*b; token_ring max(T*H*d*b, T*H*(d*b+4)), T = S/N"},
        "measured": rows, "formula_table": table,
        "note": "CPU gloo times say little about NVLink; byte/message counts and the overlap structure carry over.",
    }, indent=2))
    print(f"\nsaved {args.out}")


if __name__ == "__main__":
    main()
