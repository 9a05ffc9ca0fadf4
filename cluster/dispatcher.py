"""Routes admitted requests to instances and follows them to the end: dispatch (reserve on decode, then submit
to prefill; or one colocated instance), one poller per instance leader turning its batched events into request
updates, retries of failed transfers, aborts and failures. Runs on the cluster's event loop only."""
from __future__ import annotations

import asyncio
import logging
import time

from splitserve.cluster.config import ClusterConfig
from splitserve.cluster.request import Request, RequestState, TokenEvent
from splitserve.cluster.router import Router

log = logging.getLogger(__name__)


def _unwrap(exc: BaseException) -> BaseException:
    cause = getattr(exc, "cause", None)  # a RayTaskError carries the remote exception
    return cause if isinstance(cause, BaseException) else exc


class Dispatcher:
    POLL_COALESCE_S = 0.01  # at most ~100 event messages a second per instance; tokens still stream per step

    def __init__(self, instances: dict, config: ClusterConfig, loop: asyncio.AbstractEventLoop):
        self.instances, self.config, self.loop = instances, config, loop
        names = {role: [n for n, i in instances.items() if i.spec.role == role]
                 for role in ("prefill", "decode", "colocated")}
        self.router = Router(names["prefill"], names["decode"], names["colocated"])
        self.by_id: dict[str, Request] = {}
        self.instance_stats: dict[str, dict] = {}
        self.running = False

    def add(self, req: Request) -> None:
        self.by_id[req.request_id] = req
        asyncio.ensure_future(self._dispatch(req), loop=self.loop)

    async def start(self) -> None:
        self.running = True
        self._pollers = [asyncio.ensure_future(self._poll(name), loop=self.loop) for name in self.instances]

    async def stop(self, error: str) -> None:
        """Fails what is in flight and stops polling."""
        self.running = False
        for req in list(self.by_id.values()):
            self._fail(req, error)
        # A poll returns within its 0.5 s wait: let the ones in flight finish (cancelling a Ray call makes Ray
        # Client log callback errors), and cancel only what is still waiting after that.
        _, pending = await asyncio.wait(self._pollers, timeout=2.0)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._pollers, return_exceptions=True)

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
    async def _poll(self, name: str) -> None:
        while self.running:
            try:
                result = await self._call(name, "poll", 0.5, self.POLL_COALESCE_S)
            except Exception as e:
                if self.running:
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

    async def abort_id(self, request_id: str) -> bool:
        req = self.by_id.get(request_id)
        if req is None:
            return False
        await self.abort(req)
        return True

    async def abort(self, req: Request) -> None:
        if req.state.final:
            return
        self._abort_engines(req)
        req.finish(RequestState.ABORTED, "abort")
        self._forget(req)

    async def stats(self) -> dict:
        states: dict[str, int] = {}
        for req in self.by_id.values():
            states[req.state.value] = states.get(req.state.value, 0) + 1
        return {"instances": {n: {"role": i.spec.role, "tp": i.spec.tp, "sp": i.spec.sp,
                                  **self.instance_stats.get(n, {})}
                              for n, i in self.instances.items()}, "requests": states}
