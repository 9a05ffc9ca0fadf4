"""The lifecycle of every instance: `SERVING -> DEAD -> RESTARTING -> SERVING`, or `FAILED` once its restarts are
spent; `SERVING -> DRAINING -> (removed)` when it is scaled down; `STOPPED` at shutdown. It notices death (a poll
or a rank ping that fails, a leader loop that stopped), kills what is left of a dead instance, relaunches it
through the launcher with backoff, and tells the dispatcher when an instance leaves or rejoins service. Runs on the
cluster's event loop; launches run in a thread."""
from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from typing import Callable

from splitserve.cluster.config import FaultToleranceConfig

log = logging.getLogger(__name__)

PING_TIMEOUT_S = 10.0  # a rank that does not answer a ping for this long counts as dead (a hung process)


class InstanceState(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"  # being removed (scaled down): no new requests, the ones it has finish or move
    DEAD = "dead"
    RESTARTING = "restarting"
    FAILED = "failed"  # dead, and no restart is left (or restarts are off)
    STOPPED = "stopped"


@dataclass
class InstanceRecord:
    name: str
    role: str
    state: InstanceState = InstanceState.SERVING
    restarts: int = 0
    last_error: str | None = None


class Fleet:
    def __init__(self, instances: dict, config: FaultToleranceConfig, loop: asyncio.AbstractEventLoop,
                 relaunch: Callable[[str], object], stop_instance: Callable[[str], None],
                 on_dead: Callable[[str, str], None], on_serving: Callable[[str], None]):
        self.instances, self.config, self.loop = instances, config, loop
        self.relaunch, self.stop_instance = relaunch, stop_instance
        self.on_dead, self.on_serving = on_dead, on_serving
        self.records = {name: InstanceRecord(name, inst.spec.role) for name, inst in instances.items()}
        self.restarts_by_role: dict[str, int] = {}
        self._tasks: set[asyncio.Task] = set()
        self.running = False

    # ------------------------------------------------------------------------------------------ queries
    def serving(self, name: str) -> bool:
        record = self.records.get(name)
        return record is not None and record.state is InstanceState.SERVING

    def add(self, name: str, role: str) -> None:
        self.records[name] = InstanceRecord(name, role)

    def drain(self, name: str) -> None:
        self._set(self.records[name], InstanceState.DRAINING)

    def remove(self, name: str) -> None:
        self.records.pop(name, None)

    def ready(self) -> bool:
        """Every role has a serving instance (what readiness reports)."""
        roles = {r.role for r in self.records.values()}
        return all(any(r.role == role and r.state is InstanceState.SERVING for r in self.records.values())
                   for role in roles)

    def describe(self, name: str) -> dict:
        r = self.records[name]
        return {"state": r.state.value, "restarts": r.restarts, "last_error": r.last_error}

    # ------------------------------------------------------------------------------------ transitions
    async def start(self) -> None:
        self.running = True
        self._spawn(self._watch())

    async def stop(self) -> None:
        self.running = False
        for record in self.records.values():
            record.state = InstanceState.STOPPED
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def died(self, name: str, error: str, handle=None) -> None:
        """Reports an instance dead. `handle`: the one the failure was seen on; a failure of a predecessor that
        arrives after the relaunch is ignored."""
        record = self.records.get(name)
        if not self.running or record is None or record.state not in (InstanceState.SERVING, InstanceState.DRAINING):
            return
        if handle is not None and self.instances.get(name) is not handle:
            return
        log.error("instance %s is dead: %s", name, error)
        draining = record.state is InstanceState.DRAINING
        self._set(record, InstanceState.DEAD, error)
        try:
            self.on_dead(name, error)
        finally:  # the relaunch must not depend on moving its requests having gone well
            if not draining:  # one being scaled down is not relaunched: its removal completes
                self._spawn(self._replace(record))

    def _set(self, record: InstanceRecord, state: InstanceState, error: str | None = None) -> None:
        record.state = state
        if error is not None:
            record.last_error = error

    async def _replace(self, record: InstanceRecord) -> None:
        backoff = self.config.restart_backoff_s
        await asyncio.get_running_loop().run_in_executor(None, self.stop_instance, record.name)
        while self.running:
            if not self.config.restart or record.restarts >= self.config.max_restarts:
                self._set(record, InstanceState.FAILED)
                log.error("instance %s stays down (%d restarts)", record.name, record.restarts)
                return
            await asyncio.sleep(backoff)
            self._set(record, InstanceState.RESTARTING)
            record.restarts += 1
            self.restarts_by_role[record.role] = self.restarts_by_role.get(record.role, 0) + 1
            try:
                handle = await asyncio.get_running_loop().run_in_executor(None, self.relaunch, record.name)
            except Exception as e:  # try again, later
                log.error("relaunching instance %s failed: %s", record.name, e)
                self._set(record, InstanceState.DEAD, f"relaunch failed: {e}")
                backoff *= 2
                continue
            if not self.running:
                return
            self.instances[record.name] = handle
            self._set(record, InstanceState.SERVING)
            log.warning("instance %s is serving again (restart %d)", record.name, record.restarts)
            self.on_serving(record.name)
            return

    async def _watch(self) -> None:
        """Pings every rank of every serving instance: a killed follower is noticed even while its leader idles."""
        while self.running:
            await asyncio.sleep(self.config.health_interval_s)
            live = (InstanceState.SERVING, InstanceState.DRAINING)
            checks = [self._ping(name, handle) for name, handle in list(self.instances.items())
                      if name in self.records and self.records[name].state in live]
            await asyncio.gather(*checks)

    async def _ping(self, name: str, handle) -> None:
        for rank, actor in enumerate(handle.actors):
            try:
                await asyncio.wait_for(_resolve(actor.node_ip.remote()), PING_TIMEOUT_S)
            except asyncio.TimeoutError:
                self.died(name, f"rank {rank} did not answer for {PING_TIMEOUT_S:.0f} s", handle)
                return
            except Exception:
                self.died(name, f"rank {rank}'s process died", handle)
                return

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro, loop=self.loop)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _resolve(ref):
    return await ref
