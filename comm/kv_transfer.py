"""Moves one request's KV from prefill ranks into blocks the decode side reserved, layer by layer.

KV moves in whole blocks (both sides use one block size; prompts start at position 0, so block i of the prompt
on one side is block i on the other). A sequence-parallel prefill pads each prompt so its zigzag chunks are whole
blocks (`kv_plan.sp_padded_len`): each block is then held by one SP rank, which pushes it, and an SP rank that holds
no block of a short prompt sends an order without blocks (handshake and done only). Per transfer on a link: header (+ decode blocks) -> the decode side answers go/skip (skip when the reservation
was cancelled, so nothing is ever written into freed blocks) -> per layer, K/V of the planned heads (p2p: one
message per layer; shm: written straight into the decode rank's cache, mapped from shared memory) -> done (with
the first token, from the prefill leader). Completion and failure are published in the decode instance's store
as the flags of `comm/kv_reservations.py`. Transfers are named by the transfer id the decode side issued."""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from splitserve.comm.kv_plan import LinkId, TransferOrder
from splitserve.comm.kv_reservations import TransferState, done_value, transfer_key
from splitserve.comm.links import Link, LinkBroken, LinkTimeout

log = logging.getLogger(__name__)

MAGIC = 0x5353_4B56
HEADER_TAG, ACK_TAG = 1, 2
_HEADER_FIELDS = 8
_HEADER_LEN = 512  # int64s: the fields, then the decode blocks and head slices inline when they fit
_TAG_STRIDE = 1024  # per-transfer tag space: one tag per layer, then slots and done
SHM_FENCE_S = 1.0  # longer than any one block copy: after it a timed-out shm writer can no longer be writing


def _tag(transfer_id: int, offset: int) -> int:
    return 16 + (transfer_id % 1_000_000) * _TAG_STRIDE + offset


@dataclass
class SendResult:
    transfer_id: int
    ok: bool
    error: str | None = None


# ----------------------------------------------------------------------------------------------- shared memory

def shm_path(cluster_id: str, instance: str, rank: int) -> str:
    return f"/dev/shm/splitserve-{cluster_id}-{instance}-{rank}.kv"


def map_shared_cache(path: str, num_layers: int, shape_per_layer: tuple, dtype: torch.dtype, create: bool):
    """The decode rank's cache as one shared file; peers on the host map the same pages."""
    numel = num_layers
    for d in shape_per_layer:
        numel *= d
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if create:
        remove_shared_cache(path)  # a predecessor's file (a relaunched rank) may still be mapped by peers
        with open(path, "wb") as f:
            f.truncate(nbytes)
    flat = torch.from_file(path, shared=True, size=numel, dtype=dtype)
    return list(flat.view(num_layers, *shape_per_layer).unbind(0))


# ----------------------------------------------------------------------------------------------------- sender

class KVSender:
    """Prefill side of one rank: a background thread that pushes the KV of one forward's orders."""

    def __init__(self, caches: list[torch.Tensor], links: dict[LinkId, Link], transport: str, timeout_s: float,
                 shm_caches=None):
        self.caches = caches
        self.links = links
        self.transport = transport
        self.timeout_s = timeout_s
        self.shm_caches = shm_caches  # callable LinkId -> the decode rank's mapped cache layers
        self.faults = 0  # transfers still to stall on purpose (tests of the failure path)
        self._jobs: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name="kv-sender", daemon=True).start()

    # Called from the forward thread.
    def begin(self, orders: list[TransferOrder]) -> None:
        self._jobs.put(("begin", orders))

    def layer_done(self, layer: int) -> None:
        self._jobs.put(("layer", layer))

    def end(self, first_tokens: dict[tuple[str, int], tuple[int, bool]] | None = None) -> list[SendResult]:
        """Finishes this forward's pushes; `first_tokens` ((decode instance, transfer id) -> (token, finished)),
        known to the prefill leader, ride on the done messages."""
        self._jobs.put(("end", first_tokens or {}))
        # Every wait in the sender thread has the transfer deadline; past twice that, the thread is gone and the
        # instance cannot go on (its loop stops and the instance is replaced).
        return self._results.get(timeout=2 * self.timeout_s + 30)

    def _run(self) -> None:
        active: list[dict] = []
        while True:
            kind, arg = self._jobs.get()
            if kind == "begin":
                deadline = time.monotonic() + self.timeout_s
                active = [self._start_guarded(order, deadline) for order in arg]
            elif kind == "layer":
                for job in active:
                    self._guard(job, self._send_layer, job, arg)
            else:
                for job in active:
                    order = job["order"]
                    first = arg.get((order.link.decode_instance, order.transfer_id), (-1, False))
                    self._guard(job, self._finish, job, first)
                self._results.put([SendResult(j["order"].transfer_id, j["error"] is None, j["error"])
                                   for j in active])
                active = []

    @staticmethod
    def _guard(job, fn, *args):
        if job["error"] is None and job["go"]:
            try:
                fn(*args)
            except Exception as e:  # LinkTimeout, LinkBroken, a backend error: this transfer fails, not the thread
                job["error"] = str(e)

    def _start_guarded(self, order: TransferOrder, deadline: float) -> dict:
        try:
            return self._start(order, deadline)
        except Exception as e:  # e.g. a send to a peer whose process died: this transfer fails, the thread goes on
            return {"order": order, "go": False, "error": f"{type(e).__name__}: {e}"}

    def _start(self, order: TransferOrder, deadline: float) -> dict:
        # The job keeps the link it started on: a link rebuilt to a relaunched peer must never carry its messages.
        link = self.links[order.link]
        job = {"order": order, "link": link, "deadline": deadline, "go": False, "error": None, "works": [],
               "stall": False}
        n = len(order.dst_blocks)
        meta = order.dst_blocks + [v for s in order.slices for v in (s.dst_head, s.num_heads)]
        inline = len(meta) <= _HEADER_LEN - _HEADER_FIELDS
        header = torch.zeros(_HEADER_LEN, dtype=torch.long)
        span = order.layers
        num_layers, dst_first = (len(self.caches), 0) if span is None else (span.count, span.dst_first)
        header[:_HEADER_FIELDS] = torch.tensor([MAGIC, order.transfer_id, n, num_layers, len(order.slices), int(inline),
                                                dst_first, 0])
        if inline:
            header[_HEADER_FIELDS : _HEADER_FIELDS + len(meta)] = torch.tensor(meta, dtype=torch.long)
        # Not waited for one by one: the ack proves they arrived; `_finish` collects them with the data.
        job["works"].append((link.isend(header, HEADER_TAG), header))
        if not inline:
            extra = torch.tensor(meta, dtype=torch.long)
            job["works"].append((link.isend(extra, _tag(order.transfer_id, _TAG_STRIDE - 2)), extra))
        try:
            ack = link.recv(torch.zeros(1, dtype=torch.long), ACK_TAG, deadline)
            job["go"] = bool(ack.item())
            if not job["go"]:
                job["error"] = "cancelled by the decode side"
        except (LinkTimeout, LinkBroken) as e:
            job["error"] = str(e)
            link.abandon(buf for _, buf in job["works"])
        if self.faults > 0 and job["go"]:
            self.faults -= 1
            job["stall"] = True  # handshake done, data never sent: the decode side must time out
        return job

    def _gather(self, layer: int, order: TransferOrder) -> torch.Tensor:
        """[2, blocks, block_size, heads, d] of the order's blocks and heads, packed."""
        cache = self.caches[layer]  # [2, blocks, block_size, kv_heads, d]
        index = torch.tensor(order.src_blocks, device=cache.device)
        if len(order.slices) == 1 and order.slices[0].num_heads == cache.shape[-2]:
            return cache.index_select(1, index)  # every local head: whole blocks, contiguous rows
        return torch.cat([cache[:, :, :, s.src_head : s.src_head + s.num_heads].index_select(1, index)
                          for s in order.slices], dim=3)

    def _send_layer(self, job: dict, layer: int) -> None:
        """`layer` indexes this rank's cache layers; a pipeline-parallel order moves only its span of them, as the
        span's i-th layer (tag i) into the decode rank's layer dst_first + i."""
        if job["stall"] or not job["order"].src_blocks:  # an SP rank that holds no block of this prompt
            return
        order = job["order"]
        span = order.layers
        index = layer if span is None else layer - span.src_first
        if span is not None and not 0 <= index < span.count:
            return  # a layer this decode rank does not hold
        dst_layer = index if span is None else span.dst_first + index
        data = self._gather(layer, order) if self.transport == "p2p" else None
        if self.transport == "shm":
            # The fence: no copy starts after the deadline. The decode side waits until its own (later) deadline
            # plus SHM_FENCE_S before it reports the transfer failed and frees the blocks.
            if time.monotonic() > job["deadline"]:
                raise LinkTimeout(f"{order.link.key}: transfer deadline passed; no late writes into the decode cache")
            copy_blocks(self.caches[layer], self.shm_caches(order.link)[dst_layer], order)
        else:
            job["works"].append((job["link"].isend(data, _tag(order.transfer_id, index)), data))

    def _finish(self, job: dict, first_token: tuple[int, bool]) -> None:
        if job["stall"]:
            job["error"] = "transfer stalled (fault injection)"
            return
        link = job["link"]
        for _ in link.completions(job["works"], job["deadline"]):
            pass
        done = torch.tensor([len(self.caches), first_token[0], int(first_token[1])])
        link.send(done, _tag(job["order"].transfer_id, _TAG_STRIDE - 1), job["deadline"])


def block_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) of the runs that are consecutive on both sides."""
    runs: list[list[int]] = []
    for s, d in zip(src, dst):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1][2] += 1
        else:
            runs.append([s, d, 1])
    return [tuple(r) for r in runs]


def copy_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor, order: TransferOrder) -> None:
    """Same-host copy from the prefill rank's cache layer into the decode rank's mapped layer: one copy per
    consecutive run of blocks and per head slice, with no staging buffer."""
    for s0, d0, n in block_runs(order.src_blocks, order.dst_blocks):
        for sl in order.slices:
            src = src_cache[:, s0 : s0 + n, :, sl.src_head : sl.src_head + sl.num_heads]
            dst_cache[:, d0 : d0 + n, :, sl.dst_head : sl.dst_head + sl.num_heads].copy_(src)


def write_layer(layer_cache: torch.Tensor, data: torch.Tensor, dst_blocks: list[int], heads) -> None:
    """Scatters packed [2, blocks, block_size, heads, d] into a cache layer's blocks and local heads."""
    index = torch.tensor(dst_blocks, device=layer_cache.device)
    if len(heads) == 1 and heads[0][1] == 0 and heads[0][2] == layer_cache.shape[-2]:
        layer_cache.index_copy_(1, index, data)
        return
    for offset, head, count in heads:
        layer_cache[:, :, :, head : head + count].index_copy_(1, index, data[:, :, :, offset : offset + count])


# --------------------------------------------------------------------------------------------------- receiver

class KVReceiver:
    """Decode side of one link: a thread that accepts transfers into reserved blocks and reports in the store.
    The store client is shared with the leader, so no thread may block on it (`store.wait`)."""

    def __init__(self, link: Link, caches: list[torch.Tensor], store: dist.Store, transport: str, timeout_s: float):
        self.link = link
        self.caches = caches
        self.store = store
        self.transport = transport
        self.timeout_s = timeout_s
        self.broken: str | None = None
        threading.Thread(target=self._run, name=f"kv-recv-{link.id.prefill_rank}", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                header = self.link.recv(torch.zeros(_HEADER_LEN, dtype=torch.long), HEADER_TAG, None)
            except LinkBroken as e:
                self.broken = str(e)
                log.warning("link closed: %s", e)
                return
            try:
                self._receive(header)
            except Exception:  # one bad transfer must not stop this link's receiver (its flag stays, and times out)
                log.exception("link %s: a transfer could not be accepted", self.link.id.key)

    def _receive(self, header: torch.Tensor) -> None:
        """Handshake here; the data of an accepted transfer arrives in its own thread, so the next header (the
        sender handshakes every order of a forward before pushing layers) is taken at once."""
        magic, transfer_id, n, num_layers, num_slices, inline, dst_first = header[:7].tolist()
        assert magic == MAGIC and dst_first + num_layers <= len(self.caches), "peer speaks another protocol or model"
        deadline = time.monotonic() + self.timeout_s
        key = transfer_key(transfer_id, self.link.id.decode_rank, self.link.id.prefill_rank)
        size = n + 2 * num_slices
        try:
            if inline:
                meta = header[_HEADER_FIELDS : _HEADER_FIELDS + size].clone()
            else:
                meta = self.link.recv(torch.zeros(size, dtype=torch.long), _tag(transfer_id, _TAG_STRIDE - 2), deadline)
            receiving = TransferState.RECEIVING.value
            go = self.store.compare_set(key, TransferState.PENDING.value, receiving) == receiving.encode()
            self.link.send(torch.tensor([int(go)]), ACK_TAG, deadline)
        except Exception as e:  # LinkTimeout, LinkBroken, a backend error
            self._failed(key, e)
            return
        if go:
            threading.Thread(target=self._receive_data, args=(transfer_id, key, meta, n, range(dst_first,
                             dst_first + num_layers), deadline), daemon=True).start()

    def _receive_data(self, transfer_id: int, key: str, meta: torch.Tensor, n: int, layers: range,
                      deadline: float) -> None:
        blocks = meta[:n].tolist()
        heads, offset = [], 0
        for head, count in meta[n:].view(-1, 2).tolist():
            heads.append((offset, head, count))
            offset += count
        try:
            if self.transport == "p2p" and n:
                self._receive_layers(transfer_id, blocks, heads, offset, layers, deadline)
            done = self.link.recv(torch.zeros(3, dtype=torch.long), _tag(transfer_id, _TAG_STRIDE - 1), deadline)
            _, token, finished = done.tolist()
            self.store.set(key, done_value(token, bool(finished)))
        except Exception as e:  # LinkTimeout, LinkBroken, a backend error: the reservation fails and is released
            if self.transport == "shm":
                time.sleep(SHM_FENCE_S)  # a writer that passed its (earlier) deadline has stopped copying by now
            self._failed(key, e)

    def _failed(self, key: str, error: Exception) -> None:
        self.store.set(key, f"{TransferState.FAILED.value}: {error}")
        if isinstance(error, (LinkBroken, RuntimeError)):
            self.broken = str(error)

    def _receive_layers(self, transfer_id, blocks, heads, num_heads, layers: range, deadline) -> None:
        """`layers`: this rank's cache layers the transfer fills, the i-th from the message tagged i."""
        ref = self.caches[0]
        shape = (2, len(blocks), ref.shape[2], num_heads, ref.shape[-1])
        bufs = [torch.empty(shape, dtype=ref.dtype, device=ref.device) for _ in layers]
        items = [(self.link.irecv(buf, _tag(transfer_id, i)), buf) for i, buf in enumerate(bufs)]
        for i in self.link.completions(items, deadline):
            write_layer(self.caches[layers[i]], bufs[i], blocks, heads)


def remove_shared_cache(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
