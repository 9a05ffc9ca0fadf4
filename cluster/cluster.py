"""The Python API of a running deployment: `Cluster(config).generate(...)`, async `stream(...)`, `abort(...)`.
It owns an asyncio loop in a background thread that dispatches requests and polls every instance leader."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from splitserve.cluster.config import ClusterConfig, config_from_dict, load_config
from splitserve.cluster.launcher import Launcher
from splitserve.cluster.request import Request, RequestState, StreamChunk, TokenEvent
from splitserve.cluster.router import Router
from splitserve.workers.config import load_config as load_model_config
from splitserve.workers.detokenizer import IncrementalDetokenizer
from splitserve.workers.presets import resolve_model
from splitserve.workers.sampling_params import SamplingParams, pair_with_params
from splitserve.workers.stop import TextStream
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
        self.max_model_len = self.config.engine.context_len(self.model_config.max_position_embeddings)
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
        self.by_id: dict[str, Request] = {}
        self.instance_stats: dict[str, dict] = {}
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
        queued = sum(1 for r in self.by_id.values() if r.state is RequestState.QUEUED)
        if queued >= self.config.max_queued_requests:
            raise QueueFull(f"admission queue is full ({queued} requests waiting)")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.by_id:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer")
        detok = IncrementalDetokenizer(self.tokenizer, ids) if self.tokenizer is not None else None
        req = Request(request_id, ids, params, dataclasses.replace(params, stop=()),
                      TextStream.for_params(params, detok), frozenset(self.model_config.eos_token_ids),
                      asyncio.Queue())
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
        """Fire-and-forget command to a leader (aborts)."""
        if name is not None:
            self.instances[name].leader.lead.remote(method, *args)

    def _abort_engines(self, req: Request) -> None:
        for name in {req.prefill, req.decode} - {None}:
            self._tell(name, "abort", req.request_id, req.attempt)

    async def _dispatch(self, req: Request) -> None:
        try:
            await (self._dispatch_colocated(req) if self.router.colocated else self._dispatch_disaggregated(req))
        except Exception as e:  # never leave a caller waiting
            self._fail(req, f"{type(e).__name__}: {_unwrap(e)}")

    async def _dispatch_colocated(self, req: Request) -> None:
        name = self.router.pick_colocated()
        req.attempt += 1
        req.prefill = req.decode = name
        req.timing.dispatched = time.perf_counter()
        req.move(RequestState.PREFILLING)
        self._prompt_started(req, name)
        await self._call(name, "submit", req.request_id, req.attempt, req.prompt_ids, req.engine_params, None)

    async def _dispatch_disaggregated(self, req: Request) -> None:
        req.attempt += 1
        n = len(req.prompt_ids)
        need = -(-(n + 1) // self.config.engine.block_size)
        first_token = req.token_ids[0] if req.token_ids else None  # a retry: the client already has it
        while not req.state.final:
            # Load is counted before awaiting, so concurrent dispatches spread over the instances.
            prefill = self.router.pick_prefill()
            self._prompt_started(req, prefill)
            target, decode = None, None
            for decode in self.router.decode_order():
                self.router.reserved(decode, need)
                target = await self._call(decode, "reserve", req.request_id, req.attempt, req.prompt_ids,
                                          req.engine_params, self.instances[prefill].spec.tp, first_token)
                if target is not None:
                    break
                self.router.reserved(decode, -need)
            if target is None:
                self._prompt_done(req)
                await asyncio.sleep(0.01)  # no decode instance has room yet; they report free blocks as they go
                continue
            if req.state.final:  # aborted while reserving
                self._tell(decode, "abort", req.request_id, req.attempt)
                return
            req.prefill, req.decode = prefill, decode
            req.timing.dispatched = time.perf_counter()
            req.move(RequestState.PREFILLING)
            await self._call(prefill, "submit", req.request_id, req.attempt, req.prompt_ids, req.engine_params,
                             target)
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

    def _current(self, request_id: str, attempt: int) -> Request | None:
        """The request an event is about, unless it has finished or the event is from an earlier attempt."""
        req = self.by_id.get(request_id)
        return req if req is not None and req.attempt == attempt and not req.state.final else None

    def _handle(self, name: str, event: tuple) -> None:
        kind = event[0]
        if kind == "tokens":
            for request_id, attempt, *token in event[1]:
                req = self._current(request_id, attempt)
                if req is not None:
                    self._on_token(req, name, TokenEvent(*token))
        elif kind == "kv_ready":
            req = self._current(event[1], event[2])
            if req is not None:
                req.timing.kv_ready = time.perf_counter()
                req.move(RequestState.DECODING)
                self._on_token(req, name, TokenEvent(0, event[3], False, None, None))
        elif kind == "failed":
            req = self._current(event[1], event[2])
            if req is not None:
                self._on_failure(req, event[3])
        elif kind == "instance_failed":
            self._fail_instance(name, f"instance {name} failed: {event[1]}")

    def _on_token(self, req: Request, name: str, event: TokenEvent) -> None:
        self._prompt_done(req)
        from_prefill = name == req.prefill and name != req.decode
        if from_prefill:
            if req.state is RequestState.PREFILLING and not event.finished:
                req.move(RequestState.TRANSFERRING)  # the decode side admits it once every layer is there
        elif req.state is RequestState.PREFILLING and name == req.decode:
            req.move(RequestState.DECODING)  # a colocated instance
        if req.on_token(event):  # a stop string: the engine that made the token is still running it
            self._tell(name, "abort", req.request_id, req.attempt)
            if from_prefill:
                self._tell(req.decode, "abort", req.request_id, req.attempt)  # its reservation
        if req.state.final:
            self._forget(req)

    def _on_failure(self, req: Request, error: str) -> None:
        retryable = error.startswith("KV transfer failed")
        self._abort_engines(req)
        if retryable and req.attempt <= self.config.kv_transfer.retries:
            log.warning("request %s: %s; retrying from prefill", req.request_id, error)
            req.move(RequestState.QUEUED)
            asyncio.ensure_future(self._dispatch(req), loop=self.loop)
        else:
            attempts = f" after {req.attempt} attempts" if retryable else ""
            self._fail(req, f"{error}{attempts}")

    def _prompt_started(self, req: Request, name: str) -> None:
        self.router.prompt_started(name, len(req.prompt_ids))
        req.prompt_on = name

    def _prompt_done(self, req: Request) -> None:
        if req.prompt_on is not None:
            self.router.prompt_done(req.prompt_on, len(req.prompt_ids))
            req.prompt_on = None

    def _forget(self, req: Request) -> None:
        self._prompt_done(req)
        self.by_id.pop(req.request_id, None)

    def _fail(self, req: Request, error: str) -> None:
        if not req.state.final:
            self._abort_engines(req)
            req.finish(RequestState.FAILED, "error", error=error)
            self._forget(req)

    def _fail_instance(self, name: str, error: str) -> None:
        for req in list(self.by_id.values()):
            if name in (req.prefill, req.decode):
                self._fail(req, error)

    async def _fail_all(self, error: str) -> None:
        for req in list(self.by_id.values()):
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
        self._abort_engines(req)
        req.finish(RequestState.ABORTED, "abort")
        self._forget(req)

    async def _stats(self) -> dict:
        states: dict[str, int] = {}
        for req in self.by_id.values():
            states[req.state.value] = states.get(req.state.value, 0) + 1
        return {"instances": {n: {"role": i.spec.role, "tp": i.spec.tp, "sp": i.spec.sp,
                                  **self.instance_stats.get(n, {})}
                              for n, i in self.instances.items()}, "requests": states}
