"""Changes how many instances each role has while the cluster serves: new instances are launched (placement group,
ranks, links to every peer) and join the router when ready; removed ones stop receiving requests, finish what they
have within a drain timeout, move the rest to the remaining instances, and free their GPUs. Runs on the cluster's
event loop; launches and teardowns run in a thread."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

ROLES = ("prefill", "decode", "colocated")


class ScaleError(ValueError):
    """A scale request that cannot be carried out; the message starts with the field at fault."""


class NotEnoughDevices(ScaleError):
    pass


class ScaleInProgress(RuntimeError):
    pass


@dataclass(frozen=True)
class ScaleResult:
    added: list[str]
    removed: list[str]
    instances: dict[str, int]  # role -> instances after the change


class Scaler:
    def __init__(self, dispatcher, launcher, loop: asyncio.AbstractEventLoop):
        self.dispatcher, self.launcher, self.loop = dispatcher, launcher, loop
        self._busy = False

    def counts(self) -> dict[str, list[str]]:
        """Instance names per role, dead or restarting ones included (they come back)."""
        names: dict[str, list[str]] = {role: [] for role in ROLES}
        for name, record in self.dispatcher.fleet.records.items():
            names[record.role].append(name)
        return names

    def check(self, targets: dict[str, int | None]) -> dict[str, int]:
        """The changes a request asks for, validated: role -> target count."""
        colocated = bool(self.dispatcher.router.colocated)
        wanted = {}
        for role, value in targets.items():
            if value is None:
                continue
            if role not in ROLES:
                raise ScaleError(f"scale: unknown role {role!r} (one of {list(ROLES)})")
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ScaleError(f"{role}: must be an integer >= 0, got {value!r}")
            if (role == "colocated") != colocated:
                kind = "colocated" if colocated else "disaggregated (prefill/decode)"
                raise ScaleError(f"{role}: this cluster is {kind}; it has no {role} instances to scale")
            if value == 0:
                raise ScaleError(f"{role}: at least one instance must stay; requests need a {role} instance")
            wanted[role] = value
        if not wanted:
            raise ScaleError("scale: give a target count for at least one role")
        self._check_devices(wanted)
        return wanted

    def _check_devices(self, wanted: dict[str, int]) -> None:
        current = self.counts()
        need = sum(max(0, n - len(current[role])) * self.launcher.spec_for(role, 0).world_size
                   for role, n in wanted.items())
        if not need or self.launcher.config.ray.autoscaler:  # the autoscaler adds the nodes the launch waits for
            return
        free = self.launcher.gpus_per_node(self.launcher.init_ray(), free=True)
        if free and sum(free.values()) < need:
            raise NotEnoughDevices(f"scale: the new instances need {need} GPUs but the Ray cluster has "
                                   f"{sum(free.values()):g} free; add GPUs (ray.num_gpus for a local Ray) or "
                                   "remove instances first")

    async def scale(self, targets: dict[str, int | None], drain_timeout_s: float = 30.0) -> ScaleResult:
        if self._busy:
            raise ScaleInProgress("scale: another scale operation is in progress")
        wanted = self.check(targets)
        self._busy = True
        try:
            added, removed = [], []
            current = self.counts()
            for role, target in wanted.items():
                for _ in range(target - len(current[role])):
                    added.append(await self._add(role))
                victims = self._victims(current[role], len(current[role]) - target)
                await asyncio.gather(*(self._remove(name, drain_timeout_s) for name in victims))
                removed += victims
            return ScaleResult(added, removed, {role: len(names) for role, names in self.counts().items() if names})
        finally:
            self._busy = False

    async def _add(self, role: str) -> str:
        handle = await asyncio.get_running_loop().run_in_executor(None, self._launch, role)
        self.dispatcher.instance_added(handle.name, handle, handle.first_stats)
        return handle.name

    def _launch(self, role: str):
        """Launches one instance and reads its first stats, so the router weighs it from the start (its poller
        reports only after its first poll)."""
        import ray

        handle = self.launcher.add_instance(role)
        handle.first_stats = ray.get(handle.leader.lead.remote("stats"), timeout=60)
        return handle

    def _victims(self, names: list[str], count: int) -> list[str]:
        """Instances that are down go first, then the newest."""
        if count <= 0:
            return []
        fleet = self.dispatcher.fleet
        down = [n for n in names if not fleet.serving(n)]
        up = sorted((n for n in names if fleet.serving(n)), key=lambda n: -int(n.rsplit("-", 1)[1]))
        return (down + up)[:count]

    async def _remove(self, name: str, drain_timeout_s: float) -> None:
        self.dispatcher.drain(name)
        deadline = time.monotonic() + drain_timeout_s
        while self.dispatcher.requests_on(name) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.dispatcher.evacuate(name)  # what did not finish in time moves to the remaining instances
        self.dispatcher.instance_removed(name)
        await asyncio.get_running_loop().run_in_executor(None, self.launcher.remove_instance, name)
