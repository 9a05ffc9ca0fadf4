"""The Python API of a running deployment: `Cluster(config).generate(...)`, async `stream(...)`, `abort(...)`.
It owns an asyncio loop in a background thread that dispatches requests and polls every instance leader."""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from splitserve.cluster.config import ClusterConfig, config_from_dict, load_config
from splitserve.cluster.launcher import Launcher
from splitserve.cluster.router import Request, RequestState, Router, StreamChunk
from splitserve.workers.config import load_config as load_model_config
from splitserve.workers.detokenizer import IncrementalDetokenizer
from splitserve.workers.instance_leader import DecodeTarget
from splitserve.workers.presets import resolve_model
from splitserve.workers.sampling_params import SamplingParams, pair_with_params
from splitserve.workers.stop import StopChecker
from splitserve.workers.tokenizer import encode_prompt, load_tokenizer

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The bounded admission queue is full; retry later."""


@dataclass
class GenerateOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    error: str | None
    metrics: dict | None


def _unwrap(exc: BaseException) -> BaseException:
    cause = getattr(exc, "cause", None)  # a RayTaskError carries the remote exception
    return cause if isinstance(cause, BaseException) else exc


class Cluster:
    POLL_COALESCE_S = 0.01  # at most ~100 event messages a second per instance; tokens still stream per step

    def __init__(self, config: ClusterConfig | dict | str | None = None):
        if isinstance(config, ClusterConfig):
            self.config = config
        elif isinstance(config, dict):
            self.config = config_from_dict(config)
        else:
            self.config = load_config(config)
        self.model_dir = str(resolve_model(self.config.model))
        self.model_config = load_model_config(self.model_dir)
        self.max_model_len = self.config.engine.max_model_len or self.model_config.max_position_embeddings
        try:
            self.tokenizer = load_tokenizer(self.model_dir)
        except FileNotFoundError:
            self.tokenizer = None
        self.launcher = Launcher(self.config, self.model_dir)
        if self.config.auto_placement is not None:
            from splitserve.cluster.auto_placement import plan_config

            ray = self.launcher.init_ray()
            self.config = self.launcher.config = plan_config(self.config, self.model_dir, ray.nodes())
        self.instances = {inst.name: inst for inst in self.launcher.start()}
        names = {role: [n for n, i in self.instances.items() if i.spec.role == role]
                 for role in ("prefill", "decode", "colocated")}
        self.router = Router(names["prefill"], names["decode"], names["colocated"])
        self.requests: dict[int, Request] = {}
        self.by_id: dict[str, Request] = {}
        self.instance_stats: dict[str, dict] = {}
        self._tids = itertools.count(1)
        self._running = True
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cluster-loop", daemon=True)
        self._thread.start()
        self._on_loop_sync(self._start_pollers())

    # ------------------------------------------------------------------------------------ public API
    def generate(self, prompts: str | Sequence, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 timeout: float | None = None) -> list[GenerateOutput]:
        prompts, plist = pair_with_params(prompts, params)

        async def run_all():
            reqs = [self._submit(p, sp) for p, sp in zip(prompts, plist)]  # validates all before any runs
            return await asyncio.gather(*(self._collect(r) for r in reqs))

        return self._on_loop_sync(run_all(), timeout)

    async def stream(self, prompt, params: SamplingParams | None = None,
                     request_id: str | None = None) -> AsyncIterator[StreamChunk]:
        """Chunks of one request as its tokens arrive; callable from any event loop. Leaving early aborts it."""
        req = await self._on_loop(self._submit_async(prompt, params or SamplingParams(), request_id))
        try:
            while True:
                chunk = await self._on_loop(req.chunks.get())
                yield chunk
                if chunk.finished:
                    return
        finally:
            if not req.state.final:
                await self._on_loop(self._abort(req))

    def submit(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Starts one request in the background and returns its id; read it with `stream` or watch its state."""
        req = self._on_loop_sync(self._submit_async(prompt, params or SamplingParams(), request_id))
        return req.request_id

    def request_state(self, request_id: str) -> RequestState | None:
        """The state of a request still in flight; None once it has finished (or was never submitted)."""
        req = self.by_id.get(request_id)
        return None if req is None else req.state

    @property
    def num_requests(self) -> int:
        """Requests admitted and not yet finished."""
        return len(self.by_id)

    @property
    def running(self) -> bool:
        return self._running

    @property
    def colocated(self) -> bool:
        return bool(self.router.colocated)

    def roles(self) -> dict[str, str]:
        """Instance name -> role (prefill | decode | colocated)."""
        return {name: inst.spec.role for name, inst in self.instances.items()}

    def abort(self, request_id: str) -> bool:
        return self._on_loop_sync(self._abort_id(request_id))

    async def abort_async(self, request_id: str) -> bool:
        return await self._on_loop(self._abort_id(request_id))

    def stats(self, timeout: float | None = None) -> dict:
        return self._on_loop_sync(self._stats(), timeout)

    async def stats_async(self) -> dict:
        return await self._on_loop(self._stats())

    def leader_call(self, instance: str, method: str, *args):
        """Calls a leader method directly (diagnostics and tests)."""
        import ray

        return ray.get(self.instances[instance].leader.lead.remote(method, *args))

    def rank_call(self, instance: str, rank: int, method: str, *args):
        import ray

        return ray.get(self.instances[instance].actors[rank].call.remote(method, *args))

    def shutdown(self) -> None:
        if not self._running:
            return
        self._running = False
        try:
            self._on_loop_sync(self._fail_all("cluster shut down"), timeout=10)
            self._on_loop_sync(self._stop_pollers(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            self.launcher.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # ----------------------------------------------------------------------------------- loop plumbing
    def _on_loop_sync(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _on_loop(self, coro):
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    # --------------------------------------------------------------------------------------- admission
    def encode(self, prompt) -> list[int]:
        return encode_prompt(prompt, self.tokenizer, self.model_config.vocab_size)

    async def _submit_async(self, prompt, params, request_id=None) -> Request:
        return self._submit(prompt, params, request_id)

    def _submit(self, prompt, params: SamplingParams, request_id: str | None = None) -> Request:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params: expected SamplingParams, got {type(params).__name__}")
        ids = self.encode(prompt)
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens: prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"the context length ({self.max_model_len})")
        queued = sum(1 for r in self.requests.values() if r.state is RequestState.QUEUED)
        if queued >= self.config.max_queued_requests:
            raise QueueFull(f"admission queue is full ({queued} requests waiting)")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.by_id:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        detok = IncrementalDetokenizer(self.tokenizer, ids) if self.tokenizer is not None else None
        if params.stop and detok is None:
            raise ValueError("stop: stop strings need a tokenizer")
        eos = self.model_config.eos_token_ids
        req = Request(next(self._tids), request_id, ids, params, dataclasses.replace(params, stop=()),
                      StopChecker(params, eos, detok), asyncio.Queue())
        self.requests[req.tid] = req
        self.by_id[request_id] = req
        asyncio.ensure_future(self._dispatch(req), loop=self.loop)
        return req

    async def _collect(self, req: Request) -> GenerateOutput:
        tokens, text, last = [], [], None
        while True:
            last = await req.chunks.get()
            tokens += last.token_ids
            text.append(last.text)
            if last.finished:
                break
        return GenerateOutput(req.request_id, req.prompt_ids, tokens, "".join(text), last.finish_reason,
                              last.error, last.metrics)

    # ---------------------------------------------------------------------------------------- dispatch
    async def _call(self, name: str, method: str, *args):
        try:
            return await self.instances[name].leader.lead.remote(method, *args)
        except Exception as e:
            raise _unwrap(e) from None

    def _tell(self, name: str | None, method: str, *args) -> None:
        """Fire-and-forget command to a leader (aborts, first tokens)."""
        if name is not None:
            self.instances[name].leader.lead.remote(method, *args)

    async def _dispatch(self, req: Request) -> None:
        try:
            await (self._dispatch_colocated(req) if self.router.colocated else self._dispatch_disaggregated(req))
        except Exception as e:  # never leave a caller waiting
            self._fail(req, f"{type(e).__name__}: {_unwrap(e)}")

    async def _dispatch_colocated(self, req: Request) -> None:
        name = self.router.pick_colocated()
        req.attempts += 1
        req.prefill = req.decode = name
        req.timing.dispatched = time.perf_counter()
        req.move(RequestState.PREFILLING)
        self.router.prompt_started(name, len(req.prompt_ids))
        await self._call(name, "submit", req.tid, req.prompt_ids, req.engine_params, None)

    async def _dispatch_disaggregated(self, req: Request) -> None:
        req.attempts += 1
        n = len(req.prompt_ids)
        need = -(-(n + 1) // self.config.engine.block_size)
        while not req.state.final:
            # Load is counted before awaiting, so concurrent dispatches spread over the instances.
            prefill = self.router.pick_prefill()
            self.router.prompt_started(prefill, n)
            table, decode = None, None
            for decode in self.router.decode_order():
                self.router.reserved(decode, need)
                table = await self._call(decode, "reserve", req.tid, req.prompt_ids, req.engine_params,
                                         self.instances[prefill].spec.tp)
                if table is not None:
                    break
                self.router.reserved(decode, -need)
            if table is None:
                self.router.prompt_done(prefill, n)
                await asyncio.sleep(0.01)  # no decode instance has room yet; they report free blocks as they go
                continue
            if req.state.final:  # aborted while reserving
                self.router.prompt_done(prefill, n)
                self._tell(decode, "abort", req.tid)
                return
            req.prefill, req.decode = prefill, decode
            req.timing.dispatched = time.perf_counter()
            req.move(RequestState.PREFILLING)
            target = DecodeTarget(decode, self.instances[decode].spec.tp, table, self.config.engine.block_size)
            await self._call(prefill, "submit", req.tid, req.prompt_ids, req.engine_params, target)
            return

    # ------------------------------------------------------------------------------------------ events
    async def _start_pollers(self) -> None:
        self._pollers = [asyncio.ensure_future(self._poll(name), loop=self.loop) for name in self.instances]

    async def _stop_pollers(self) -> None:
        # A poll returns within its 0.5 s wait: let the ones in flight finish (cancelling a Ray call makes Ray
        # Client log callback errors), and cancel only what is still waiting after that.
        _, pending = await asyncio.wait(self._pollers, timeout=2.0)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._pollers, return_exceptions=True)

    async def _poll(self, name: str) -> None:
        while self._running:
            try:
                result = await self._call(name, "poll", 0.5, self.POLL_COALESCE_S)
            except Exception as e:
                if self._running:
                    log.error("instance %s is unreachable: %s", name, e)
                    self._fail_instance(name, f"instance {name} is unreachable: {e}")
                return
            self.instance_stats[name] = result["stats"]
            self.router.report(name, result["stats"])
            for event in result["events"]:
                self._handle(name, event)

    def _handle(self, name: str, event: tuple) -> None:
        kind = event[0]
        if kind in ("prefilled", "tokens"):
            for tid, token, finished, reason in event[1]:
                req = self.requests.get(tid)
                if req is not None and not req.state.final:
                    self._on_token(req, name, token, finished, reason, first=kind == "prefilled")
        elif kind == "kv_ready":
            req = self.requests.get(event[1])
            if req is not None and req.state is RequestState.TRANSFERRING:
                req.timing.kv_ready = time.perf_counter()
                req.move(RequestState.DECODING)
        elif kind == "failed":
            req = self.requests.get(event[1])
            if req is not None and not req.state.final:
                self._on_failure(req, event[2])
        elif kind == "instance_failed":
            self._fail_instance(name, f"instance {name} failed: {event[1]}")

    def _on_token(self, req: Request, name: str, token: int, engine_finished: bool, reason, first: bool) -> None:
        if first and req.stop.token_ids:
            # A retried prefill: the client already has the first token, so decoding continues from it.
            req.move(RequestState.TRANSFERRING)
            self._tell(req.decode, "start_decode", req.tid, req.stop.token_ids[0])
            return
        now = time.perf_counter()
        if req.timing.first_token is None:
            req.timing.first_token = now
            self.router.prompt_done(req.prefill, len(req.prompt_ids))
        req.timing.last_token = now
        result = req.stop.append(token)
        text = result.text_delta
        if engine_finished and not result.finished:  # e.g. the context limit, which only the engine knows
            result = req.stop.finish(reason or "length")
            text += result.text_delta
        if result.finished:
            if not engine_finished:  # a stop string: the engine side is still running it
                self._tell(req.decode if not first else req.prefill, "abort", req.tid)
            if first and self.router.decode and req.decode:
                self._tell(req.decode, "abort", req.tid)  # release the reservation
            self._finish(req, RequestState.FINISHED, token, text, result.finish_reason)
            return
        req.chunks.put_nowait(StreamChunk(req.request_id, [token], text))
        if first and self.router.decode:
            req.move(RequestState.TRANSFERRING)
            self._tell(req.decode, "start_decode", req.tid, token)
        elif req.state is RequestState.PREFILLING:
            req.move(RequestState.DECODING)

    def _on_failure(self, req: Request, error: str) -> None:
        retryable = error.startswith("KV transfer failed")
        self._tell(req.prefill, "abort", req.tid)
        self._tell(req.decode, "abort", req.tid)
        if retryable and req.attempts <= self.config.kv_transfer.retries:
            log.warning("request %s: %s; retrying from prefill", req.request_id, error)
            # A fresh engine id per attempt: late events and aborts of the failed attempt cannot touch this one.
            del self.requests[req.tid]
            req.tid = next(self._tids)
            self.requests[req.tid] = req
            req.move(RequestState.QUEUED)
            asyncio.ensure_future(self._dispatch(req), loop=self.loop)
        else:
            attempts = f" after {req.attempts} attempts" if retryable else ""
            self._fail(req, f"{error}{attempts}")

    def _finish(self, req: Request, state: RequestState, token: int | None, text: str, reason: str | None,
                error: str | None = None) -> None:
        req.timing.finished = time.perf_counter()
        req.move(state)
        req.error = error
        metrics = req.timing.metrics(len(req.stop.token_ids))
        metrics.update(prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.stop.token_ids),
                       attempts=req.attempts, prefill_instance=req.prefill, decode_instance=req.decode)
        req.chunks.put_nowait(StreamChunk(req.request_id, [] if token is None else [token], text, True, reason,
                                          error, metrics))
        self.requests.pop(req.tid, None)
        self.by_id.pop(req.request_id, None)

    def _fail(self, req: Request, error: str) -> None:
        if not req.state.final:
            self._tell(req.prefill, "abort", req.tid)
            self._tell(req.decode, "abort", req.tid)
            self._finish(req, RequestState.FAILED, None, "", "error", error)

    def _fail_instance(self, name: str, error: str) -> None:
        for req in list(self.requests.values()):
            if name in (req.prefill, req.decode):
                self._fail(req, error)

    async def _fail_all(self, error: str) -> None:
        for req in list(self.requests.values()):
            self._fail(req, error)

    async def _abort_id(self, request_id: str) -> bool:
        req = self.by_id.get(request_id)
        if req is None:
            return False
        await self._abort(req)
        return True

    async def _abort(self, req: Request) -> None:
        if req.state.final:
            return
        self._tell(req.prefill, "abort", req.tid)
        self._tell(req.decode, "abort", req.tid)
        self._finish(req, RequestState.ABORTED, None, "", "abort")

    async def _stats(self) -> dict:
        states: dict[str, int] = {}
        for req in self.requests.values():
            states[req.state.value] = states.get(req.state.value, 0) + 1
        return {"instances": {n: {"role": i.spec.role, "tp": i.spec.tp, "sp": i.spec.sp,
                                  **self.instance_stats.get(n, {})}
                              for n, i in self.instances.items()}, "requests": states}
