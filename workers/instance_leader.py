"""Rank 0 of an instance: runs its engine in a loop thread, drives the followers, and talks to the frontend
through commands (submit, reserve, abort) and batched events (one message per step).

A request is named by its request id everywhere; `attempt` counts its dispatches, so commands and events of an
earlier attempt never touch a later one. Prefill: a step's transfer orders are broadcast with its batch, every
rank pushes its share of KV while the next layer computes, and the first tokens ride on the leader's done
messages. Decode: reservations and their arrival flags live in `comm.kv_reservations`; a request is admitted
as soon as every link reports done, without a frontend round trip.

The loop thread owns the engine's state (blocks, reservations, attempts) and holds `state_lock` except while a
forward runs; commands wait in a queue for the loop, but a reservation (on the path of every request's TTFT) is
made at once under the lock, so it waits for no more than the bookkeeping between two forwards."""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time

from splitserve.comm.kv_plan import DecodeTarget, PrefillLayout, links_needed_pp, local_kv_heads, transfer_orders
from splitserve.comm.kv_reservations import Reservation, Reservations
from splitserve.workers.engine_builder import build_engine, cache_salt
from splitserve.workers.model_runner import ModelRunner
from splitserve.workers.prefill_engine import EngineOutput
from splitserve.workers.sampler import FAILED_TOKEN
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.sequence import Sequence
from splitserve.workers.stop import StopChecker

log = logging.getLogger(__name__)

STEP_SAMPLES = 1024  # step timings kept between two polls (the newest)


class InstanceLeader:
    def __init__(self, rank):
        self.rank, self.spec = rank, rank.spec
        cfg = rank.model.cfg
        self.eos = cfg.eos_token_ids
        self.num_kv_heads = cfg.num_kv_heads
        self.num_layers = cfg.num_layers
        self.layout = PrefillLayout(self.spec.name, self.spec.tp, self.spec.sp, cfg.num_kv_heads,
                                    self.spec.engine.block_size, self.spec.pp, cfg.num_layers)
        runner = ModelRunner(rank.model, rank.caches, self.eos, rank.device, execute=self._execute)
        context_len = self.spec.engine.context_len(cfg.max_position_embeddings)
        pipeline = (self._launch, self._collect, self.spec.pp) if self.spec.pp > 1 else None
        self.engine = build_engine(self.spec.role, runner, rank.num_blocks, self.spec.engine, context_len,
                                   sp=self.spec.sp, cache_salt=cache_salt(self.spec.model_dir, self.spec.dtype),
                                   pipeline=pipeline)
        self.blocks = self.engine.blocks
        self.blocks.record_events = True
        self.attempts: dict[str, int] = {}  # request id -> the attempt this instance's engine holds
        self.targets: dict[str, DecodeTarget] = {}  # prefill: where each request's KV goes
        self.reservations = Reservations(rank.store)  # decode: KV on its way here
        self.commands: queue.Queue = queue.Queue()
        self.state_lock = threading.Lock()
        self._loop_holds_lock = False  # the loop thread holds state_lock (it lets go around each forward)
        self._in_forward = False
        self.reserved_during_forward = 0  # reservations made while a forward ran (the lock let them in)
        self.cond = threading.Condition()
        self.events: list[tuple] = []
        self.cache_events: list[tuple[bool, int]] = []  # prefix-cache blocks stored / evicted, for the router
        self.running = True
        self.paused = False  # test hook: commands are still taken, but no step runs
        self.error: str | None = None
        self._last_poll = 0.0
        self._cached_reported: set[str] = set()  # requests whose cached prompt tokens were reported
        self.kv_received_bytes = 0  # decode: KV bytes written into this instance's caches by transfers
        # Timed steps for the online planner's calibration: decode (seconds, batch, total context), prefill
        # (seconds, chunk lengths, cached prefixes); a step is timed whole (scheduling, forward, sampling, events).
        self.step_samples: collections.deque = collections.deque(maxlen=STEP_SAMPLES)
        self._forward: tuple | None = None  # the shape of the step's forward, set by _execute
        self.busy_s = 0.0  # seconds in steps that ran a forward (each timed whole, as above); and their count
        self.steps = 0
        cache = rank.caches[0]  # [2, blocks, block_size, local heads, head_dim], one per layer
        heads = sum(local_kv_heads(cfg.num_kv_heads, self.spec.tp, q)[1] for q in range(self.spec.tp))
        self._block_bytes = 2 * cache.shape[2] * heads * cache.shape[-1] * cache.element_size() * cfg.num_layers

    def start(self) -> None:
        threading.Thread(target=self._loop, name=f"leader-{self.spec.name}", daemon=True).start()

    def pause(self, flag: bool) -> None:
        self.paused = flag

    def stop(self) -> None:
        self.running = False
        self.commands.put(None)

    # ---------------------------------------------------------------------------- commands (any thread)
    def _call(self, fn, *args) -> None:
        """Queues a command for the loop thread (it runs between steps, under the state lock)."""
        self.commands.put((fn, args))

    def submit(self, request_id: str, attempt: int, prompt_ids: list[int], params: SamplingParams,
               target: DecodeTarget | None = None, resumed: int = 0) -> None:
        """`resumed`: the last `resumed` prompt tokens are output streamed by an earlier attempt."""
        self._call(self._submit, request_id, attempt, prompt_ids, params, target, resumed)

    def reserve(self, request_id: str, attempt: int, prompt_ids: list[int], params: SamplingParams,
                prefill_tp: int, resumed: int = 0) -> DecodeTarget | None:
        """Blocks for a request's KV before its prefill starts; None when they are not free now. Made at once (in
        the caller's thread), also while a forward runs."""
        with self.state_lock:
            self.reserved_during_forward += self._in_forward
            return self._reserve(request_id, attempt, prompt_ids, params, prefill_tp, resumed)

    def abort(self, request_id: str, attempt: int) -> None:
        self._call(self._abort, request_id, attempt)

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
            cache_events, self.cache_events = self.cache_events, []
            steps = list(self.step_samples)
            self.step_samples.clear()
        self._last_poll = time.monotonic()
        return {"events": events, "stats": self.stats(), "cache_events": cache_events, "steps": steps}

    def stats(self) -> dict:
        return {"free_blocks": self.blocks.num_free_blocks, "num_blocks": self.blocks.num_blocks,
                "usage": self.blocks.usage, "waiting": self.engine.num_waiting, "running": self.engine.num_running,
                "pending_transfers": len(self.reservations), "error": self.error,
                "cached_blocks": getattr(self.blocks, "num_cached_blocks", 0),
                "prefix_hit_tokens": self.blocks.hit_tokens, "prefix_query_tokens": self.blocks.query_tokens,
                "kv_received_bytes": self.kv_received_bytes,
                "preemptions": getattr(self.engine, "num_preemptions", 0),
                "max_batches_in_flight": getattr(getattr(self.engine, "decode", None), "max_in_flight", 0),
                "reserved_during_forward": self.reserved_during_forward, "busy_s": self.busy_s, "steps": self.steps}

    # ------------------------------------------------------------------------------ loop thread only
    def _emit(self, *events) -> None:
        """Queues events for the next poll, with the cache changes so far (so a finished request's blocks are
        known to the router by the time its last token is)."""
        cache_events = self.blocks.take_events()
        if events or cache_events:
            with self.cond:
                self.events.extend(events)
                self.cache_events.extend(cache_events)
                if events:
                    self.cond.notify_all()

    def _sequence(self, request_id, prompt_ids, params, resumed) -> Sequence:
        return Sequence(request_id, prompt_ids, params, StopChecker(params, self.eos, None), resumed)

    def _submit(self, request_id, attempt, prompt_ids, params, target, resumed):
        if request_id in self.attempts:  # an earlier attempt whose abort has not arrived yet
            self._abort(request_id, self.attempts[request_id])
        try:
            self.engine.add(self._sequence(request_id, prompt_ids, params, resumed))
        except ValueError as e:
            self._emit(("failed", request_id, attempt, str(e)))
            return
        self.attempts[request_id] = attempt
        if target is not None:
            self.targets[request_id] = target

    def _reserve(self, request_id, attempt, prompt_ids, params, prefill_tp, resumed):
        n = len(prompt_ids)
        if self.blocks.blocks_needed(n + 1) > self.blocks.num_blocks:
            raise ValueError(f"prompt: {n} tokens do not fit the decode instance's KV cache "
                             f"({self.blocks.num_blocks * self.blocks.block_size} token slots)")
        # Blocks are held under the request id: an earlier attempt must let go of its blocks first.
        if (self.reservations.holds(request_id) or request_id in self.attempts
                or not self.blocks.can_allocate(n + 1, prompt_ids)):
            return None
        # The prompt's longest cached prefix (earlier turns' prompts and answers) stays here; only the rest moves.
        table = self.blocks.allocate(request_id, n, prompt_ids)
        cached = self.blocks.num_cached_tokens(request_id)
        self.blocks.count_lookup(n, cached)
        spec = self.spec
        links = links_needed_pp(self.num_kv_heads, self.num_layers, prefill_tp, spec.prefill_sp, spec.prefill_pp,
                                spec.tp, spec.pp)
        res = Reservation(request_id, attempt, list(prompt_ids), params, [], resumed, cached // self.blocks.block_size)
        return DecodeTarget(self.spec.name, self.spec.tp, tuple(table), self.reservations.open(res, links),
                            res.cached_blocks, self.spec.pp)

    def _abort(self, request_id, attempt):
        transfer_id = self.reservations.find(request_id, attempt)
        if transfer_id is not None:
            self.reservations.cancel(transfer_id)  # blocks are freed once no rank is still writing into them
        elif self.attempts.get(request_id) == attempt:
            self.engine.abort(request_id)
            self.blocks.free(request_id)
            self._forget(request_id)

    def _forget(self, request_id) -> None:
        self._cached_reported.discard(request_id)
        self.attempts.pop(request_id, None)
        self.targets.pop(request_id, None)

    def _check_transfers(self) -> None:
        result = self.reservations.check()
        for res in result.finished + [r for r, _ in result.ready]:
            sent = self.blocks.blocks_needed(len(res.prompt_ids)) - res.cached_blocks
            self.kv_received_bytes += sent * self._block_bytes
        for res in result.drained + result.finished:
            self.blocks.free(res.request_id)
        for res, error in result.failed:
            self.blocks.free(res.request_id)
            self._emit(("failed", res.request_id, res.attempt, f"KV transfer failed: {error}"))
        for res, token in result.ready:
            self._admit(res, token)

    def _admit(self, res: Reservation, token: int) -> None:
        seq = self._sequence(res.request_id, res.prompt_ids, res.params, res.resumed)
        seq.num_computed_tokens = len(res.prompt_ids)
        self.blocks.commit(res.request_id, res.prompt_ids)  # the KV that arrived is reusable from now on
        seq.append_token(token)
        self.engine.admit(seq)
        self.attempts[res.request_id] = res.attempt
        self._emit(("kv_ready", res.request_id, res.attempt, res.resumed, token))

    def _execute(self, batch, seqs: list[Sequence]):
        """One step: the batch and its transfer orders to every rank (metadata only), then this rank's shard."""
        self._forward = (batch.query_lens, batch.context_lens)
        orders = [order for seq in seqs if seq.seq_id in self.targets
                  for order in transfer_orders(self.layout, seq.num_tokens, self.blocks.block_table(seq.seq_id),
                                               self.targets[seq.seq_id])]
        self.rank.broadcast(("step", batch, orders))
        return self._unlocked(self.rank.execute, batch, orders)

    def _collect(self, batch):
        """The logits of the oldest batch in flight through the pipeline (a wait on the last stage)."""
        return self._unlocked(self.rank.collect, batch)

    def _unlocked(self, fn, *args):
        """Runs a forward with the state lock let go, so reservations go on meanwhile (the forward reads only the
        batch built before it, and writes KV only into blocks its sequences own)."""
        if not self._loop_holds_lock:
            return fn(*args)
        self._loop_holds_lock, self._in_forward = False, True
        self.state_lock.release()
        try:
            return fn(*args)
        finally:
            self.state_lock.acquire()
            self._loop_holds_lock, self._in_forward = True, False

    def _launch(self, batch, seqs: list[Sequence]) -> None:
        """A decode batch into the pipeline; its logits are collected later (see PipelinedDecodeEngine)."""
        self.rank.broadcast(("step", batch, []))
        self.rank.launch(batch)

    def _step(self) -> None:
        self._forward = None
        started = time.perf_counter()
        outputs = self.engine.step() if self.engine.has_unfinished() else []
        self._report(outputs)  # first tokens go out while the last layers are still being pushed
        if self.spec.role == "prefill":
            targets = [(self.targets.get(o.seq.seq_id), o) for o in outputs]
            firsts = {(t.instance, t.transfer_id): (o.token_id, o.result.finished) for t, o in targets if t}
            self.rank.finish_sends(firsts)
        for out in outputs:  # a prefill instance is done with a request once its KV is pushed
            if out.result.finished or self.spec.role == "prefill":
                self.blocks.free(out.seq.seq_id)
                self._forget(out.seq.seq_id)
        if self._forward is not None:
            seconds = time.perf_counter() - started
            sample = self._step_sample(seconds, *self._forward)
            with self.cond:  # one acquisition per step: the frontend's stats poll reads these together
                self.busy_s += seconds
                self.steps += 1
                if sample is not None:
                    self.step_samples.append(sample)

    def _step_sample(self, seconds: float, queries: list[int], contexts: list[int]) -> tuple | None:
        """The step's timing for the planner: one forward of a prefill or decode instance without pipeline stages
        (with batches in flight, or SplitFuse's mixed batches, a step has no one shape); None for the others."""
        if self.spec.pp != 1 or self.spec.role not in ("prefill", "decode"):
            return None
        if self.spec.role == "decode":
            return (seconds, len(queries), sum(contexts))
        return (seconds, tuple(queries), tuple(c - q for q, c in zip(queries, contexts)))

    def _report(self, outputs: list[EngineOutput]) -> None:
        items, failures, cached = [], [], []
        for o in outputs:
            rid, attempt = o.seq.seq_id, self.attempts.get(o.seq.seq_id, 0)
            if self.spec.role != "decode" and rid not in self._cached_reported:  # with the prompt's first token
                self._cached_reported.add(rid)
                cached.append(("cached", rid, attempt, o.seq.num_cached_tokens))
            if o.token_id == FAILED_TOKEN:
                failures.append(("failed", rid, attempt, o.seq.error))
            else:
                # The output's own position: a decode instance that recomputes a preempted sequence appends its
                # recomputed token and, in the same step, the next one, so the sequence's length is past the first.
                items.append((rid, attempt, o.position, o.token_id, o.result.finished,
                              o.result.finish_reason, o.result.stop_reason))
        self._emit(*cached, *([("tokens", items)] if items else []), *failures)

    def _drain_commands(self, timeout: float) -> None:
        try:
            item = self.commands.get(timeout=timeout)
        except queue.Empty:
            return
        while item is not None:
            fn, args = item
            try:
                with self.state_lock:
                    fn(*args)
            except Exception:  # one bad command must not stop the instance
                log.exception("instance %s: command %s failed", self.spec.name, fn.__name__)
            try:
                item = self.commands.get_nowait()
            except queue.Empty:
                return

    def _loop(self) -> None:
        while self.running:
            waiting_on_transfers = len(self.reservations) > 0
            busy = self.engine.has_unfinished() and not self.paused
            self._drain_commands(0 if busy else (0.002 if waiting_on_transfers else 0.05))
            try:
                with self.state_lock:
                    self._loop_holds_lock = True
                    try:
                        if waiting_on_transfers:
                            self._check_transfers()
                        if not self.paused:
                            self._step()
                        self._emit()  # cache changes of commands and transfers (reservations, aborts)
                    finally:
                        self._loop_holds_lock = False
            except Exception as e:  # a broken instance reports, it does not hang its requests
                log.exception("instance %s failed", self.spec.name)
                self.error = f"{type(e).__name__}: {e}"
                self._emit(("instance_failed", self.error))
                self.running = False
        if self.spec.world_size > 1:
            self.rank.broadcast(("stop", None, None))
        with self.cond:
            self.cond.notify_all()
