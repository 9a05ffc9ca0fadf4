"""Routes admitted requests to instances and follows them to the end: dispatch (reserve on decode, then submit
to prefill; or one colocated instance), one poller per instance leader turning its batched events into request
updates, retries of failed transfers, migration off dead instances (the fleet reports deaths and relaunches),
aborts and failures. Runs on the cluster's event loop only."""
from __future__ import annotations

import asyncio
import logging
import time

from splitserve.cluster.config import ClusterConfig
from splitserve.cluster.fleet import Fleet
from splitserve.cluster.request import Request, RequestState, TokenEvent
from splitserve.cluster.router import Router
from splitserve.workers.block_manager import block_hashes, cache_salt

log = logging.getLogger(__name__)


def _unwrap(exc: BaseException) -> BaseException:
    cause = getattr(exc, "cause", None)  # a RayTaskError carries the remote exception
    return cause if isinstance(cause, BaseException) else exc


def _client_message(exc: BaseException) -> str:
    """What a client is told: our own errors as they are; anything else by kind only (Ray's text carries actor
    ids, pids and addresses, which go to the log)."""
    if isinstance(exc, (ValueError, InstanceUnavailable)):
        return str(exc)
    log.error("request failed: %r", exc)
    return f"internal error ({type(exc).__name__}); see the server log"


class InstanceUnavailable(RuntimeError):
    """A call to an instance that died (the details go to the log, not to clients)."""


def _actor_died(exc: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(exc, RayActorError)


def _awaiting_dispatch(req: Request) -> bool:
    """Queued or migrating: a dispatch for its next attempt is scheduled or running, and no engine holds it yet."""
    return req.state in (RequestState.QUEUED, RequestState.MIGRATING)


# Cumulative counters each instance reports; the frontend sums them per role over every incarnation.
INSTANCE_COUNTERS = ("prefix_hit_tokens", "prefix_query_tokens", "kv_received_bytes", "busy_s", "steps")


class Dispatcher:
    POLL_COALESCE_S = 0.01  # at most ~100 event messages a second per instance; tokens still stream per step

    def __init__(self, instances: dict, config: ClusterConfig, loop: asyncio.AbstractEventLoop, launcher):
        self.instances, self.config, self.loop = instances, config, loop
        names = {role: [n for n, i in instances.items() if i.spec.role == role]
                 for role in ("prefill", "decode", "colocated")}
        self.router = Router(names["prefill"], names["decode"], names["colocated"], config.routing.policy,
                             config.routing.overlap_weight)
        self.fleet = Fleet(instances, config.fault_tolerance, loop, launcher.replace, launcher.stop_instance,
                           self._on_dead, self._on_serving)
        self.by_id: dict[str, Request] = {}
        self.instance_stats: dict[str, dict] = {}
        self.migrations: dict[str, int] = {}  # reason -> requests moved off a failed instance
        self.counters: dict[str, dict[str, int]] = {c: {} for c in INSTANCE_COUNTERS}  # counter -> role -> total
        self._last_counts: dict[str, dict[str, int]] = {}  # instance -> its counters at its last report
        self.running = False
        self._pollers: dict[str, asyncio.Task] = {}
        self.planner = None  # the online planner, when on: it observes arrivals and finished requests

    def _observe_finished(self, req: Request) -> None:
        if self.planner is not None and req.state is RequestState.FINISHED:
            self.planner.observed.finished(time.monotonic(), len(req.prompt_ids), len(req.token_ids))

    def add(self, req: Request) -> None:
        if self.planner is not None:
            self.planner.observed.arrived(time.monotonic())
        self.by_id[req.request_id] = req
        asyncio.ensure_future(self._dispatch(req), loop=self.loop)

    async def start(self) -> None:
        self.running = True
        # Every instance's stats before the first long poll returns, so info and routing see the fleet at once.
        names = list(self.instances)
        stats = await asyncio.gather(*(self.instances[n].leader.lead.remote("stats") for n in names),
                                     return_exceptions=True)
        for name, first in zip(names, stats):
            if isinstance(first, dict):
                self.instance_stats[name] = first
                self.router.report(name, first)
        for name in self.instances:
            self._start_poller(name)
        await self.fleet.start()

    async def stop(self, error: str) -> None:
        """Fails what is in flight and stops polling and watching."""
        self.running = False
        await self.fleet.stop()
        for req in list(self.by_id.values()):
            self._fail(req, error)
        # A poll returns within its 0.5 s wait: let the ones in flight finish (cancelling a Ray call makes Ray
        # Client log callback errors), and cancel only what is still waiting after that.
        pollers = list(self._pollers.values())
        if pollers:
            _, pending = await asyncio.wait(pollers, timeout=2.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pollers, return_exceptions=True)

    async def _call(self, name: str, method: str, *args):
        handle = self.instances.get(name)
        if handle is None:  # removed (scaled down) since it was picked
            raise InstanceUnavailable(f"instance {name} was removed")
        try:
            return await handle.leader.lead.remote(method, *args)
        except Exception as e:
            if _actor_died(e):
                log.warning("call %s on instance %s failed: %s", method, name, e)
                self.fleet.died(name, "its leader's process died", handle)
                raise InstanceUnavailable(f"instance {name} is unavailable") from None
            raise _unwrap(e) from None

    def _tell(self, name: str | None, method: str, *args) -> None:
        """Fire-and-forget command to a serving leader (aborts); a dead one has nothing left to abort."""
        if name is not None and self.fleet.serving(name):
            self.instances[name].leader.lead.remote(method, *args)

    def _abort_engines(self, req: Request) -> None:
        for name in {req.prefill, req.decode} - {None}:
            self._tell(name, "abort", req.request_id, req.attempt)

    async def _dispatch(self, req: Request) -> None:
        try:
            await (self._dispatch_colocated(req) if self.router.colocated else self._dispatch_disaggregated(req))
        except Exception as e:  # never leave a caller waiting
            self._fail(req, _client_message(_unwrap(e)))

    async def _wait_for(self, req: Request, role: str, since: float) -> bool:
        """No serving instance of `role`: waits a little, or fails the request once it has waited too long."""
        waited = time.monotonic() - since
        if waited > self.config.fault_tolerance.unavailable_timeout_s:
            self._fail(req, f"no live {role} instance for {waited:.0f} s")
            return False
        await asyncio.sleep(0.05)
        return True

    def _engine_prompt(self, req: Request) -> tuple[list[int], int]:
        """What an attempt sends the engines: the prompt plus what earlier attempts already streamed."""
        return req.prompt_ids + req.token_ids, len(req.token_ids)

    def _prompt_hashes(self, prompt: list[int]) -> list[int]:
        """The prompt's block hashes as the instances' prefix caches name them (none unless routing uses them)."""
        if not (self.router.kv_aware and self.config.engine.prefix_caching) or not self.instances:
            return []
        spec = next(iter(self.instances.values())).spec
        return block_hashes(prompt, self.config.engine.block_size, cache_salt(spec.model_dir, spec.dtype))

    def _started(self, req: Request) -> None:
        req.timing.dispatched = req.timing.dispatched or time.perf_counter()
        req.move(RequestState.PREFILLING)

    async def _dispatch_colocated(self, req: Request) -> None:
        req.attempt += 1
        attempt, since = req.attempt, time.monotonic()
        prompt, resumed = self._engine_prompt(req)
        hashes = self._prompt_hashes(prompt)
        while (name := self.router.pick_colocated(hashes, self.config.engine.block_size)) is None:
            if req.state.final or not await self._wait_for(req, "colocated", since):
                return
        req.prefill = req.decode = name
        self._started(req)
        self._prompt_started(req, name)
        await self._submit(req, attempt, name, prompt, None, resumed)

    async def _submit(self, req: Request, attempt: int, name: str, prompt, target, resumed: int) -> None:
        try:
            await self._call(name, "submit", req.request_id, attempt, prompt, req.engine_params, target, resumed)
        except InstanceUnavailable:
            if req.attempt == attempt and not req.state.final:  # unless the death was handled already
                self._migrate(req, f"instance {name} died")

    async def _dispatch_disaggregated(self, req: Request) -> None:
        req.attempt += 1
        attempt, since = req.attempt, time.monotonic()
        prompt, resumed = self._engine_prompt(req)
        need = -(-(len(prompt) + 1) // self.config.engine.block_size)
        hashes = self._prompt_hashes(prompt)
        while not req.state.final and req.attempt == attempt:
            prefill = self.router.pick_prefill(hashes, self.config.engine.block_size)
            decodes = self.router.decode_order(hashes)
            if prefill is None or not decodes:
                if not await self._wait_for(req, "prefill" if prefill is None else "decode", since):
                    return
                continue
            # Load is counted before awaiting, so concurrent dispatches spread over the instances.
            self._prompt_started(req, prefill)
            target = await self._reserve(req, attempt, decodes, need, prompt, prefill, resumed)
            if target is None:
                self._prompt_done(req)
                await asyncio.sleep(0.01)  # no decode instance has room yet; they report free blocks as they go
                continue
            if req.state.final or req.attempt != attempt:  # aborted (or moved) while reserving
                self._tell(target.instance, "abort", req.request_id, attempt)
                return
            req.prefill, req.decode = prefill, target.instance
            self._started(req)
            await self._submit(req, attempt, prefill, prompt, target, resumed)
            return

    async def _reserve(self, req, attempt, decodes, need, prompt, prefill, resumed):
        for decode in decodes:
            self.router.reserved(decode, need)
            try:
                target = await self._call(decode, "reserve", req.request_id, attempt, prompt, req.engine_params,
                                          self.instances[prefill].spec.tp, resumed)
            except InstanceUnavailable:
                target = None
            if target is not None:
                return target
            self.router.reserved(decode, -need)
        return None

    # ------------------------------------------------------------------------------------------ events
    def _start_poller(self, name: str) -> None:
        self._pollers[name] = asyncio.ensure_future(self._poll(name, self.instances[name]), loop=self.loop)

    async def _poll(self, name: str, handle) -> None:
        while self.running and self.instances.get(name) is handle:
            try:
                result = await handle.leader.lead.remote("poll", 0.5, self.POLL_COALESCE_S)
            except Exception as e:
                if self.running:
                    log.error("instance %s is unreachable: %s", name, e)
                    self.fleet.died(name, "its leader stopped answering", handle)
                return
            self.instance_stats[name] = result["stats"]
            self._count(name, result["stats"])
            self.router.report(name, result["stats"])
            self.router.cache_events(name, result.get("cache_events", ()))
            if self.planner is not None and result.get("steps"):
                self.planner.observed.stepped(time.monotonic(), handle.spec.role, result["steps"])
            for event in result["events"]:
                try:
                    self._handle(name, handle, event)
                except Exception:  # a bug in handling one event must not stop the instance's poller
                    log.exception("instance %s: event %s could not be handled", name, event[:1])

    def _count(self, name: str, stats: dict) -> None:
        """Adds what an instance counted since its last report (a relaunched instance counts from zero)."""
        handle = self.instances.get(name)
        if handle is None:
            return
        role, last = handle.spec.role, self._last_counts.get(name, {})
        for key in INSTANCE_COUNTERS:
            now, before = stats.get(key, 0), last.get(key, 0)
            totals = self.counters[key]
            totals[role] = totals.get(role, 0) + (now - before if now >= before else now)
        self._last_counts[name] = {key: stats.get(key, 0) for key in INSTANCE_COUNTERS}

    # ------------------------------------------------------------------------------------ lifecycle
    def _on_dead(self, name: str, error: str) -> None:
        self.router.set_serving(name, False)
        self.instance_stats.pop(name, None)
        self._last_counts.pop(name, None)
        for req in list(self.by_id.values()):
            if req.state.final or name not in (req.prefill, req.decode) or _awaiting_dispatch(req):
                continue  # (one awaiting its next dispatch names the instances of an abandoned attempt)
            if req.prefill == name and req.decode != name and req.state is RequestState.DECODING:
                continue  # its KV already moved: the decode instance carries on
            try:
                self._migrate(req, f"instance {name} died")
            except Exception as e:  # one request's trouble must not leave the others on a dead instance
                log.exception("request %s could not be moved off %s", req.request_id, name)
                self._fail(req, _client_message(e))

    def requests_on(self, name: str) -> list[Request]:
        """Requests that still need instance `name`: a prefill instance until their KV reached decode."""
        return [r for r in self.by_id.values() if not r.state.final and (
            r.decode == name or (r.prefill == name and r.state is not RequestState.DECODING))]

    def instance_added(self, name: str, handle, stats: dict) -> None:
        self.instances[name] = handle
        self.fleet.add(name, handle.spec.role)
        self.router.add(handle.spec.role, name)
        self.instance_stats[name] = stats
        self._last_counts.pop(name, None)
        self._count(name, stats)
        self.router.report(name, stats)
        self._start_poller(name)

    def drain(self, name: str) -> None:
        """Stops routing to an instance that is being removed; what it has finishes (or moves, see `evacuate`)."""
        self.router.set_serving(name, False)
        self.fleet.drain(name)

    def evacuate(self, name: str) -> None:
        for req in self.requests_on(name):
            self._migrate(req, f"instance {name} was removed", reason="scale_down")

    def instance_removed(self, name: str) -> None:
        self.fleet.remove(name)
        self.router.remove(name)
        self.instance_stats.pop(name, None)
        self.instances.pop(name, None)  # its poller stops at its next turn

    def _on_serving(self, name: str) -> None:
        self.router.set_serving(name, True)
        self._start_poller(name)

    def _migrate(self, req: Request, why: str, reason: str = "instance_died") -> None:
        """Resumes a request whose instance died on a healthy pair: prefill of prompt + tokens streamed so far,
        then decoding goes on; the client's stream continues without a lost or repeated token. A request already
        awaiting its next dispatch (a retry, or a move reported twice: by a failed call and by the fleet) is left
        to that dispatch."""
        if req.state.final or _awaiting_dispatch(req):
            return
        self._abort_engines(req)
        self._prompt_done(req)
        limit = self.config.fault_tolerance.migration_limit
        if req.migrations >= limit:
            self._fail(req, f"{why}; the request was moved {req.migrations} times already "
                            f"(fault_tolerance.migration_limit = {limit})")
            return
        req.migrations += 1
        self.migrations[reason] = self.migrations.get(reason, 0) + 1
        log.warning("request %s: %s; resuming after %d tokens", req.request_id, why, len(req.token_ids))
        req.resume(RequestState.MIGRATING)
        asyncio.ensure_future(self._dispatch(req), loop=self.loop)

    # ------------------------------------------------------------------------------------------ events
    def _current(self, request_id: str, attempt: int) -> Request | None:
        """The request an event is about, unless it has finished or the event is from an earlier attempt."""
        req = self.by_id.get(request_id)
        if req is None or req.attempt != attempt or req.state.final or _awaiting_dispatch(req):
            return None  # (awaiting dispatch: its last attempt was abandoned, the next has not started)
        return req

    def _handle(self, name: str, handle, event: tuple) -> None:
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
                self._on_token(req, name, TokenEvent(event[3], event[4], False, None, None))
        elif kind == "cached":
            req = self._current(event[1], event[2])
            if req is not None and req.cached_tokens is None:  # a resumed attempt's prompt includes its output
                req.cached_tokens = event[3]
        elif kind == "failed":
            req = self._current(event[1], event[2])
            if req is not None:
                self._on_failure(req, event[3])
        elif kind == "instance_failed":
            log.error("instance %s stopped: %s", name, event[1])
            self.fleet.died(name, f"its loop stopped ({event[1].split(':')[0]})", handle)

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
            self._observe_finished(req)
            self._forget(req)

    def _on_failure(self, req: Request, error: str) -> None:
        if _awaiting_dispatch(req):  # a second report of the failure that already sent it back to dispatch
            return
        retryable = error.startswith("KV transfer failed")
        self._abort_engines(req)
        if retryable and req.retries < self.config.kv_transfer.retries:
            log.warning("request %s: %s; retrying from prefill", req.request_id, error)
            req.retries += 1
            self._prompt_done(req)
            req.resume(RequestState.QUEUED)
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
        return {"instances": {n: {"role": i.spec.role, "tp": i.spec.tp, "sp": i.spec.sp, "pp": i.spec.pp, **self.fleet.describe(n),
                                  **self.instance_stats.get(n, {})}
                              for n, i in self.instances.items() if n in self.fleet.records}, "requests": states,
                "restarts": dict(self.fleet.restarts_by_role), "migrations": dict(self.migrations),
                "counters": {k: dict(v) for k, v in self.counters.items()},
                **({"planner": self.planner.stats()} if self.planner is not None else {})}
