"""KV transfer bandwidth of each transport (p2p over a gloo link, same-host shared memory) for one request's
KV, vs a plain memcpy of the same bytes and vs the same gather/scatter in one process. Two processes, no Ray.

    python benchmarks/kv_transfer.py [--model small] [--tokens 2048] [--reps 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from splitserve.comm.kv_plan import LinkId, TransferOrder, plan_heads
from splitserve.comm.kv_reservations import transfer_key
from splitserve.comm.kv_transfer import KVReceiver, KVSender, map_shared_cache, write_layer
from splitserve.comm.links import RECEIVER, SENDER, Link
from splitserve.workers.config import load_config
from splitserve.workers.presets import resolve_model

BLOCK = 16


def _shape(cfg, tokens):
    return (2, tokens // BLOCK + 8, BLOCK, cfg.num_kv_heads, cfg.head_dim)


def _receiver(port, cfg_dir, tokens, transport, shm_file, ready):
    torch.set_num_threads(1)
    cfg = load_config(cfg_dir)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    if transport == "shm":
        caches = map_shared_cache(shm_file, cfg.num_layers, _shape(cfg, tokens), torch.float32, create=True)
    else:
        caches = [torch.zeros(_shape(cfg, tokens)) for _ in range(cfg.num_layers)]
    ready.set()
    link = Link(LinkId("p", 0, "d", 0), RECEIVER, store, torch.device("cpu"))
    KVReceiver(link, caches, store, transport, timeout_s=60)
    # Poll: a blocking store.wait would hold the client that the receiver thread also uses.
    while not store.check(["bench/stop"]):
        time.sleep(0.05)


def _sender(port, cfg_dir, tokens, transport, shm_file, reps, ready, out):
    torch.set_num_threads(1)
    cfg = load_config(cfg_dir)
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    ready.wait()
    caches = [torch.randn(_shape(cfg, tokens)) for _ in range(cfg.num_layers)]
    peer = map_shared_cache(shm_file, cfg.num_layers, _shape(cfg, tokens), torch.float32, create=False) \
        if transport == "shm" else None
    link_id = LinkId("p", 0, "d", 0)
    link = Link(link_id, SENDER, store, torch.device("cpu"))
    sender = KVSender(caches, {link_id: link}, transport, 60, lambda _: peer)
    blocks = list(range(tokens // BLOCK))
    slices = plan_heads(cfg.num_kv_heads, 1, 1)
    times = []
    for rep in range(reps + 1):  # the first is warm-up
        key = transfer_key(rep, 0, 0)
        store.set(key, "pending")
        start = time.perf_counter()
        sender.begin([TransferOrder(rep, link_id, blocks, blocks, slices)])
        for layer in range(cfg.num_layers):
            sender.layer_done(layer)
        results = sender.end()
        while not store.get(key).startswith(b"done"):
            time.sleep(0.0001)
        if rep:
            times.append(time.perf_counter() - start)
        assert results[0].ok, results
    out.put(times)
    store.set("bench/stop", "1")


def run_transport(transport, cfg_dir, tokens, reps) -> float:
    ctx = mp.get_context("spawn")
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    shm_file = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
                            f"splitserve-bench-{os.getpid()}.kv")
    ready, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(master.port, cfg_dir, tokens, transport, shm_file, ready)),
             ctx.Process(target=_sender, args=(master.port, cfg_dir, tokens, transport, shm_file, reps, ready, out))]
    for p in procs:
        p.start()
    times = out.get(timeout=600)
    for p in procs:
        p.join(timeout=30)
    if os.path.exists(shm_file):
        os.unlink(shm_file)
    return sorted(times)[len(times) // 2]


def local_baselines(cfg, tokens, reps) -> tuple[float, float]:
    """(plain memcpy of the bytes, the transport's gather + scatter in one process), median seconds."""
    torch.set_num_threads(1)
    src = [torch.randn(_shape(cfg, tokens)) for _ in range(cfg.num_layers)]
    dst = [torch.zeros(_shape(cfg, tokens)) for _ in range(cfg.num_layers)]
    flat_src = torch.cat([c.view(2, -1)[:, : tokens * cfg.num_kv_heads * cfg.head_dim].reshape(-1) for c in src])
    flat_dst = torch.empty_like(flat_src)
    blocks = list(range(tokens // BLOCK))
    index = torch.tensor(blocks)
    heads = [(0, 0, cfg.num_kv_heads)]

    def memcpy():
        flat_dst.copy_(flat_src)

    def gather_scatter():
        for s, d in zip(src, dst):
            write_layer(d, s.index_select(1, index), blocks, heads)

    out = []
    for fn in (memcpy, gather_scatter):
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        out.append(sorted(ts)[len(ts) // 2])
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "kv_transfer.json"))
    args = ap.parse_args()
    cfg_dir = str(resolve_model(args.model))
    cfg = load_config(cfg_dir)
    nbytes = 2 * cfg.num_layers * args.tokens * cfg.num_kv_heads * cfg.head_dim * 4
    memcpy_s, local_s = local_baselines(cfg, args.tokens, args.reps)
    rows = [("memcpy (one process)", memcpy_s), ("gather+scatter (one process)", local_s)]
    for transport in ("shm", "p2p"):
        rows.append((f"{transport} (two processes)", run_transport(transport, cfg_dir, args.tokens, args.reps)))
    gbs = {name: nbytes / t / 1e9 for name, t in rows}
    print(f"KV of {args.tokens} tokens, {args.model}: {nbytes / 1e6:.1f} MB")
    print(f"{'path':<32}{'ms':>9}{'GB/s':>8}{'vs memcpy':>11}")
    for name, t in rows:
        print(f"{name:<32}{t * 1e3:>9.2f}{gbs[name]:>8.2f}{gbs[name] / gbs[rows[0][0]]:>11.2f}")
    result = dict(model=args.model, tokens=args.tokens, bytes=nbytes, reps=args.reps,
                  machine=platform.processor() or platform.machine(),
                  rows=[dict(path=n, seconds=t, gb_s=gbs[n], vs_memcpy=gbs[n] / gbs[rows[0][0]]) for n, t in rows])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
