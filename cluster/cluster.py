"""The Python API of a running deployment: `Cluster(config).generate(...)`, async `stream(...)`, `abort(...)`.
It starts the instances, validates and admits requests, and owns an asyncio loop in a background thread on which
the dispatcher (`cluster/dispatcher.py`) routes requests and follows every instance leader's events."""
from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from splitserve.cluster.config import ClusterConfig, config_from_dict, load_config
from splitserve.cluster.launcher import Launcher
from splitserve.cluster.dispatcher import Dispatcher
from splitserve.cluster.request import Request, RequestState, StreamChunk
from splitserve.cluster.scaling import Scaler, ScaleResult
from splitserve.workers.config import load_config as load_model_config
from splitserve.placement.specs import tp_split_problem
from splitserve.workers.hf_config import autotp_problem, resolve_backend
from splitserve.workers.chat_template import ChatTemplate, is_messages
from splitserve.workers.detokenizer import IncrementalDetokenizer
from splitserve.workers.presets import resolve_model
from splitserve.workers.sampling_params import SamplingParams, pair_with_params
from splitserve.workers.stop import TextStream
from splitserve.workers.tokenizer import encode_prompt, load_tokenizer


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


class Cluster:
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
        self.chat_template = ChatTemplate.load(self.model_dir)
        self.launcher = Launcher(self.config, self.model_dir)
        if self.config.auto_placement is not None:
            from splitserve.cluster.auto_placement import plan_config

            ray = self.launcher.init_ray()
            self.config = self.launcher.config = plan_config(self.config, self.model_dir, ray.nodes())
        self._check_tp()
        self._check_backend()
        self.instances = {inst.name: inst for inst in self.launcher.start()}
        self._running = True
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cluster-loop", daemon=True)
        self._thread.start()
        self.dispatcher = Dispatcher(self.instances, self.config, self.loop, self.launcher)
        self.scaler = Scaler(self.dispatcher, self.launcher, self.loop)
        self._on_loop_sync(self.dispatcher.start())
        self.planner = self._start_planner() if self.config.online_planner is not None else None

    def _start_planner(self):
        from splitserve.cluster.online_planner import OnlinePlannerLoop

        planner = OnlinePlannerLoop(self.config, self.model_dir, self.scaler, self.config.num_devices)
        self.dispatcher.planner = planner

        def counts():
            names = self.scaler.counts()
            return len(names["prefill"]), len(names["decode"])

        def kv_tokens():
            stats = [s for n, s in self.dispatcher.instance_stats.items() if n.startswith("decode-")]
            return min((s["num_blocks"] for s in stats), default=1 << 20) * self.config.engine.block_size

        self._planner_task = asyncio.run_coroutine_threadsafe(planner.run(counts, kv_tokens), self.loop)
        return planner

    # ------------------------------------------------------------------------------------ public API
    def generate(self, prompts: str | Sequence, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 timeout: float | None = None) -> list[GenerateOutput]:
        prompts, plist = pair_with_params(prompts, params)
        prepared = [self._prepare(p, sp) for p, sp in zip(prompts, plist)]  # validates all before any runs

        async def run_all():
            reqs = [self._admit(*args) for args in prepared]
            return await asyncio.gather(*(self._collect(r) for r in reqs))

        return self._on_loop_sync(run_all(), timeout)

    async def stream(self, prompt, params: SamplingParams | None = None,
                     request_id: str | None = None) -> AsyncIterator[StreamChunk]:
        """Chunks of one request as its tokens arrive; callable from any event loop. Leaving early aborts it."""
        # Tokenising runs in a worker thread: a huge prompt must not stall the caller's loop or the cluster's.
        ids, params = await asyncio.to_thread(self._prepare, prompt, params or SamplingParams())
        req = await self._on_loop(self._admit_async(ids, params, request_id))
        try:
            while True:
                chunk = await self._on_loop(req.chunks.get())
                yield chunk
                if chunk.finished:
                    return
        finally:
            if not req.state.final:
                await self._on_loop(self.dispatcher.abort(req))

    def submit(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> str:
        """Starts one request in the background and returns its id; read it with `stream` or watch its state."""
        ids, params = self._prepare(prompt, params or SamplingParams())
        return self._on_loop_sync(self._admit_async(ids, params, request_id)).request_id

    def scale(self, prefill: int | None = None, decode: int | None = None, colocated: int | None = None,
              drain_timeout_s: float = 30.0, timeout: float | None = None) -> ScaleResult:
        """Sets the number of instances of each role given (absolute counts) while serving. New instances join the
        router once up; removed ones get no new requests, finish theirs within `drain_timeout_s`, move the rest.
        ScaleError (a ValueError naming the field) for counts that cannot be, NotEnoughDevices when the GPUs are
        missing."""
        return self._on_loop_sync(self.scale_async(prefill, decode, colocated, drain_timeout_s), timeout)

    async def scale_async(self, prefill=None, decode=None, colocated=None, drain_timeout_s: float = 30.0):
        targets = {"prefill": prefill, "decode": decode, "colocated": colocated}
        return await self._on_loop(self.scaler.scale(targets, drain_timeout_s))

    def request_state(self, request_id: str) -> RequestState | None:
        """The state of a request still in flight; None once it has finished (or was never submitted)."""
        req = self.dispatcher.by_id.get(request_id)
        return None if req is None else req.state

    @property
    def num_requests(self) -> int:
        """Requests admitted and not yet finished."""
        return len(self.dispatcher.by_id)

    @property
    def running(self) -> bool:
        return self._running

    @property
    def ready(self) -> bool:
        """Every role has a serving instance: what readiness reports."""
        return self._running and self.dispatcher.fleet.ready()

    @property
    def colocated(self) -> bool:
        return bool(self.dispatcher.router.colocated)

    def roles(self) -> dict[str, str]:
        """Instance name -> role (prefill | decode | colocated)."""
        return {name: inst.spec.role for name, inst in self.instances.items()}

    def abort(self, request_id: str) -> bool:
        return self._on_loop_sync(self.dispatcher.abort_id(request_id))

    async def abort_async(self, request_id: str) -> bool:
        return await self._on_loop(self.dispatcher.abort_id(request_id))

    def stats(self, timeout: float | None = None) -> dict:
        return self._on_loop_sync(self.dispatcher.stats(), timeout)

    async def stats_async(self) -> dict:
        return await self._on_loop(self.dispatcher.stats())

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
        if self.planner is not None:
            self.planner.running = False
            self._planner_task.cancel()
        try:
            self._on_loop_sync(self.dispatcher.stop("cluster shut down"), timeout=10)
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

    def _check_tp(self) -> None:
        """Refuses, before any process starts, a TP degree the model's heads cannot be split over, and more pipeline
        stages than layers."""
        for role in ("prefill", "decode", "colocated"):
            section = getattr(self.config, role)
            mc = self.model_config
            problem = (tp_split_problem(mc.num_heads, mc.num_kv_heads, mc.intermediate_size, section.tp)
                       if section.instances else None)
            if problem:
                raise ValueError(f"{role}.tp: {problem}")
            layers = self.model_config.num_layers
            if section.instances and section.pp > layers:
                raise ValueError(f"{role}.pp: {section.pp} pipeline stages cannot split the model's {layers} layers "
                                 "(each stage needs at least one)")

    def _check_backend(self) -> None:
        """Refuses, before any process starts, a model backend that cannot run the model at the configured TP."""
        engine = self.config.engine
        backend = resolve_backend(engine.backend, self.model_config)
        if backend == "transformers" and (engine.overlap_min_tokens is not None
                                          or engine.tp_norm_method not in ("reference", "auto")):
            raise ValueError("engine.tp_norm_method / engine.overlap_min_tokens: the native model's fused TP "
                             "reduction and overlap are not available with the transformers backend (AutoTP reduces "
                             "in its own layers)")
        for role in ("prefill", "decode", "colocated"):
            section = getattr(self.config, role)
            problem = autotp_problem(self.model_config, section.tp) if backend == "transformers" else None
            if problem and section.instances:
                raise ValueError(f"{role}.tp: {problem}")
            if backend == "transformers" and section.instances and section.pp > 1:
                raise ValueError(f"{role}.pp: pipeline stages are not available with the transformers backend "
                                 f"({self.model_config.architecture})")

    # --------------------------------------------------------------------------------------- admission
    def encode(self, prompt) -> list[int]:
        """Token ids of a prompt: text, token ids, or a chat (a list of {role, content}, rendered with the model's
        chat template). Text longer than `max_prompt_bytes` (a chat: its contents together) is refused before
        tokenising."""
        text = prompt if isinstance(prompt, str) else None
        if is_messages(prompt):
            text = "".join(m.get("content") or "" for m in prompt if isinstance(m.get("content"), str))
        if text is not None and len(text) * 4 > self.config.max_prompt_bytes:  # UTF-8: <= 4 bytes a char
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > self.config.max_prompt_bytes:
                field = "prompt" if isinstance(prompt, str) else "messages"
                raise ValueError(f"{field}: {size} bytes exceed max_prompt_bytes ({self.config.max_prompt_bytes})")
        return encode_prompt(prompt, self.tokenizer, self.model_config.vocab_size, self.chat_template)

    def _prepare(self, prompt, params: SamplingParams) -> tuple[list[int], SamplingParams]:
        """Everything about a request that needs no cluster state (tokenising, limits): any thread."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params: expected SamplingParams, got {type(params).__name__}")
        ids = self.encode(prompt)
        params.check_for_model(self.model_config.vocab_size, self.model_config.eos_token_ids)
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens: prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"the context length ({self.max_model_len})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer")
        return ids, params

    async def _admit_async(self, ids, params, request_id=None) -> Request:
        return self._admit(ids, params, request_id)

    def _admit(self, ids: list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        """Admission on the cluster's loop: the queue bound and the request id."""
        queued = sum(1 for r in self.dispatcher.by_id.values() if r.state is RequestState.QUEUED)
        if queued >= self.config.max_queued_requests:
            raise QueueFull(f"admission queue is full ({queued} requests waiting)")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.dispatcher.by_id:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        detok = IncrementalDetokenizer(self.tokenizer, ids) if self.tokenizer is not None else None
        req = Request(request_id, ids, params, dataclasses.replace(params, stop=()),
                      TextStream.for_params(params, detok), frozenset(self.model_config.eos_token_ids),
                      asyncio.Queue())
        self.dispatcher.add(req)
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
