"""Rank 0 of an instance: runs its scheduler in a loop thread, drives the followers, and talks to the frontend
through commands (submit, reserve, start_decode, abort) and batched events (one message per step)."""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from splitserve.comm.kv_plan import links_needed_sp, plan_heads, sp_block_owners
from splitserve.comm.kv_transfer import TransferOrder, transfer_key
from splitserve.comm.links import LinkId
from splitserve.workers.block_manager import BlockManager
from splitserve.workers.engine_core import EngineCore
from splitserve.workers.model_runner import ModelRunner
from splitserve.workers.prefill_engine import EngineOutput, PrefillEngine
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.sequence import Sequence
from splitserve.workers.splitfuse_engine import SplitFuseEngine
from splitserve.workers.sp_block_manager import SPBlockManager
from splitserve.workers.stop import StopChecker

log = logging.getLogger(__name__)


@dataclass
class DecodeTarget:
    """Where a prefilled request's KV goes: the decode instance, its layout and the blocks it reserved."""

    instance: str
    tp: int
    block_table: list[int]
    block_size: int


@dataclass
class Reservation:
    prompt_ids: list[int]
    params: SamplingParams
    keys: list[str]
    first_token: int | None = None


class LeaderRunner(ModelRunner):
    """Broadcasts each step (metadata and transfer orders, never tensors) before running its own shard."""

    def __init__(self, rank, orders_for=None):
        super().__init__(rank.model, rank.caches, rank.model.cfg.eos_token_ids, rank.device)
        self.rank, self.orders_for = rank, orders_for

    def execute(self, batch, seqs):
        orders = self.orders_for(seqs) if self.orders_for else []
        self.rank.broadcast(("step", batch, orders))
        return self.rank.forward(batch, orders)


class InstanceLeader:
    def __init__(self, rank):
        self.rank, self.spec = rank, rank.spec
        eng = self.spec.engine
        cfg = rank.model.cfg
        self.block_size = eng.get("block_size", 16)
        if self.spec.sp > 1:  # each SP rank's cache is its own pool: the instance holds SP times the tokens
            self.blocks = SPBlockManager(rank.num_blocks, self.block_size, self.spec.sp)
        else:
            self.blocks = BlockManager(rank.num_blocks, self.block_size)
        self.max_model_len = eng.get("max_model_len") or cfg.max_position_embeddings
        self.eos = cfg.eos_token_ids
        self.num_kv_heads = cfg.num_kv_heads
        self.runner = LeaderRunner(rank, self._orders if self.spec.role == "prefill" else None)
        rank._runner = self.runner
        seqs, tokens = eng.get("max_num_seqs", 64), eng.get("max_num_batched_tokens", 4096)
        if self.spec.role == "prefill":
            self.prefill = PrefillEngine(self.runner, self.blocks, tokens, seqs, self.max_model_len)
            self.core = None
        elif self.spec.role == "decode":  # prompts here are only preempted sequences being recomputed
            self.core = EngineCore(self.runner, self.blocks, seqs, tokens, self.max_model_len)
            self.prefill = self.core.prefill
        else:  # colocated: chunked prefill fused with decodes (Dynamic SplitFuse)
            self.core = SplitFuseEngine(self.runner, self.blocks, seqs, tokens, self.max_model_len)
            self.prefill = self.core
        self.targets: dict[int, DecodeTarget] = {}
        self.pending: dict[int, Reservation] = {}
        self.draining: dict[int, list[str]] = {}
        self.commands: queue.Queue = queue.Queue()
        self.cond = threading.Condition()
        self.events: list[tuple] = []
        self.running = True
        self.paused = False  # test hook: commands are still taken, but no step runs
        self.error: str | None = None
        self._last_poll = 0.0

    def start(self) -> None:
        threading.Thread(target=self._loop, name=f"leader-{self.spec.name}", daemon=True).start()

    def pause(self, flag: bool) -> None:
        self.paused = flag

    def stop(self) -> None:
        self.running = False
        self.commands.put(None)

    # ---------------------------------------------------------------------------- commands (any thread)
    def _call(self, fn, *args, wait: bool = False):
        future: Future = Future()
        self.commands.put((fn, args, future))
        return future.result(timeout=60) if wait else None

    def submit(self, tid: int, prompt_ids: list[int], params: SamplingParams, target: DecodeTarget | None = None):
        self._call(self._submit, tid, prompt_ids, params, target)

    def reserve(self, tid: int, prompt_ids: list[int], params: SamplingParams, prefill_tp: int):
        """Blocks for a request's KV before its prefill starts; None when they are not free now."""
        return self._call(self._reserve, tid, prompt_ids, params, prefill_tp, wait=True)

    def start_decode(self, tid: int, first_token: int) -> None:
        self._call(self._start_decode, tid, first_token)

    def abort(self, tid: int) -> None:
        self._call(self._abort, tid)

    def poll(self, timeout: float, coalesce_s: float = 0.0) -> dict:
        """Events since the last poll. With `coalesce_s`, a poll that finds events waits until that long after the
        previous poll, so one round trip carries several steps (each RPC costs CPU that the steps compete for)."""
        with self.cond:
            self.cond.wait_for(lambda: self.events or not self.running, timeout)
        pause = self._last_poll + coalesce_s - time.monotonic()
        if pause > 0 and self.events:
            time.sleep(pause)
        with self.cond:
            events, self.events = self.events, []
        self._last_poll = time.monotonic()
        return {"events": events, "stats": self.stats()}

    def stats(self) -> dict:
        return {"free_blocks": self.blocks.num_free_blocks, "num_blocks": self.blocks.num_blocks,
                "usage": self.blocks.usage, "waiting": self.prefill.num_waiting,
                "running": self.core.num_running if self.core else 0,
                "pending_transfers": len(self.pending), "error": self.error}

    # ------------------------------------------------------------------------------ loop thread only
    def _emit(self, *events) -> None:
        if events:
            with self.cond:
                self.events.extend(events)
                self.cond.notify_all()

    def _sequence(self, tid, prompt_ids, params) -> Sequence:
        return Sequence(str(tid), prompt_ids, params, StopChecker(params, self.eos, None))

    def _submit(self, tid, prompt_ids, params, target):
        seq = self._sequence(tid, prompt_ids, params)
        try:
            self.prefill.add(seq)
        except ValueError as e:
            self._emit(("failed", tid, str(e)))
            return
        if target is not None:
            self.targets[tid] = target

    def _reserve(self, tid, prompt_ids, params, prefill_tp):
        n = len(prompt_ids)
        if self.blocks.blocks_needed(n + 1) > self.blocks.num_blocks:
            raise ValueError(f"prompt: {n} tokens do not fit the decode instance's KV cache "
                             f"({self.blocks.num_blocks * self.block_size} token slots)")
        if not self.blocks.can_allocate(n + 1):
            return None
        table = self.blocks.allocate(str(tid), n)
        links = links_needed_sp(self.num_kv_heads, prefill_tp, self.spec.tp, self.spec.prefill_sp)
        keys = [transfer_key(tid, q, p) for p, q in sorted(links)]
        self.rank.store.multi_set(keys, ["pending"] * len(keys))
        self.pending[tid] = Reservation(list(prompt_ids), params, keys)
        return table

    def _start_decode(self, tid, first_token):
        if tid in self.pending:
            self.pending[tid].first_token = first_token

    def _abort(self, tid):
        if tid in self.pending:
            keys = self.pending.pop(tid).keys
            for key in keys:
                self.rank.store.compare_set(key, "pending", "cancelled")
            self.draining[tid] = keys  # freed once no rank is still writing into the blocks
        elif self.core is not None:
            self.core.abort(str(tid))
        else:
            self.prefill.abort(str(tid))
            self.targets.pop(tid, None)

    def _check_transfers(self) -> None:
        """One store round trip per loop for every draining and pending reservation's completion flags."""
        store = self.rank.store
        draining, pending = list(self.draining.items()), list(self.pending.items())
        flat = [k for _, keys in draining for k in keys] + [k for _, res in pending for k in res.keys]
        if not flat:
            return
        values_of = iter(store.multi_get(flat))

        def take(n: int) -> list[bytes]:
            return [next(values_of) for _ in range(n)]

        for tid, keys in draining:
            if b"receiving" not in take(len(keys)):
                self._release(tid, keys)
                del self.draining[tid]
        for tid, res in pending:
            values = take(len(res.keys))
            if b"receiving" in values or b"pending" in values:
                continue
            failures = [v.decode() for v in values if v != b"done"]
            if failures:
                del self.pending[tid]
                self._release(tid, res.keys)
                self._emit(("failed", tid, f"KV transfer failed: {failures[0]}"))
            elif res.first_token is not None:
                del self.pending[tid]
                for key in res.keys:
                    store.delete_key(key)
                self._admit(tid, res)

    def _release(self, tid, keys) -> None:
        self.blocks.free(str(tid))
        for key in keys:
            self.rank.store.delete_key(key)

    def _admit(self, tid: int, res: Reservation) -> None:
        seq = self._sequence(tid, res.prompt_ids, res.params)
        seq.num_computed_tokens = len(res.prompt_ids)
        seq.append_token(res.first_token)
        self.core.decode.add(seq)
        self._emit(("kv_ready", tid))

    def _orders(self, seqs: list[Sequence]) -> list[TransferOrder]:
        orders = []
        for seq in seqs:
            target = self.targets.get(int(seq.seq_id))
            if target is None:
                continue
            assert target.block_size == self.block_size, "both phases use the configured block size"
            used = -(-seq.num_tokens // self.block_size)
            src = self.blocks.block_table(seq.seq_id)[:used]
            dst = target.block_table[:used]
            plan = plan_heads(self.num_kv_heads, self.spec.tp, target.tp)
            # Under SP each block was written by one SP rank, which pushes it; SP rank s owns global ranks s·TP + p.
            # A rank that owns no block of a short prompt still sends an empty order: the decode side expects
            # one completion per link.
            owners = sp_block_owners(seq.num_tokens, self.block_size, self.spec.sp)
            for s in range(self.spec.sp):
                mine = [i for i, owner in enumerate(owners) if owner == s]
                for p, q in sorted({(h.src_rank, h.dst_rank) for h in plan}):
                    link = LinkId(self.spec.name, s * self.spec.tp + p, target.instance, q)
                    slices = [h for h in plan if (h.src_rank, h.dst_rank) == (p, q)]
                    orders.append(TransferOrder(int(seq.seq_id), link, [src[i] for i in mine], [dst[i] for i in mine],
                                                slices))
        return orders

    def _step(self) -> list[EngineOutput]:
        if self.core is not None:
            return self.core.step() if self.core.has_unfinished() else []
        outputs = self.prefill.step()
        self._report(outputs)  # first tokens go out while the last layers are still being pushed
        self.rank.finish_sends()
        for out in outputs:  # this rank has pushed its share; followers finish theirs before their next forward
            self.blocks.free(out.seq.seq_id)
            self.targets.pop(int(out.seq.seq_id), None)
        return []

    def _report(self, outputs: list[EngineOutput]) -> None:
        kind = "prefilled" if self.spec.role == "prefill" else "tokens"
        items = [(int(o.seq.seq_id), o.token_id, o.result.finished, o.result.finish_reason) for o in outputs]
        if items:
            self._emit((kind, items))

    def _drain_commands(self, timeout: float) -> None:
        try:
            item = self.commands.get(timeout=timeout)
        except queue.Empty:
            return
        while item is not None:
            fn, args, future = item
            try:
                future.set_result(fn(*args))
            except Exception as e:  # the caller gets it
                future.set_exception(e)
            try:
                item = self.commands.get_nowait()
            except queue.Empty:
                return

    def _busy(self) -> bool:
        if self.core is not None:
            return self.core.has_unfinished()
        return self.prefill.num_waiting > 0

    def _loop(self) -> None:
        while self.running:
            waiting_on_transfers = bool(self.pending or self.draining)
            busy = self._busy() and not self.paused
            self._drain_commands(0 if busy else (0.002 if waiting_on_transfers else 0.05))
            try:
                if waiting_on_transfers:
                    self._check_transfers()
                outputs = [] if self.paused else self._step()
                if outputs:
                    self._report(outputs)
            except Exception as e:  # a broken instance reports, it does not hang its requests
                log.exception("instance %s failed", self.spec.name)
                self.error = f"{type(e).__name__}: {e}"
                self._emit(("instance_failed", self.error))
                self.running = False
        if self.spec.world_size > 1:
            self.rank.broadcast(("stop", None, None))
        with self.cond:
            self.cond.notify_all()
