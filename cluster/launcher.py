"""Starts (or attaches to) Ray, places each instance's ranks together in a STRICT_PACK placement group, builds
each instance's process group and the prefill -> decode links, and starts the instance loops."""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from splitserve.cluster.config import ClusterConfig
from splitserve.comm.kv_plan import links_needed_sp
from splitserve.comm.links import LinkId
from splitserve.workers.config import load_config as load_model_config
from splitserve.workers.instance import InstanceSpec


def _ray():
    # A local Ray must bind loopback only; this switch is read when ray is first imported.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    return ray


@dataclass
class InstanceHandle:
    spec: InstanceSpec
    actors: list
    placement_group: object

    @property
    def leader(self):
        return self.actors[0]

    @property
    def name(self) -> str:
        return self.spec.name


def layout_summary(config: ClusterConfig) -> str:
    parts = []
    for role, section in (("prefill", config.prefill), ("decode", config.decode), ("colocated", config.colocated)):
        if section.instances:
            parts.append(f"{role} {section.instances} x {section.world_size}")
    return ", ".join(parts)


class Launcher:
    STARTUP_TIMEOUT_S = 600.0  # model loading on a busy CPU machine can take minutes

    def __init__(self, config: ClusterConfig, model_dir: str):
        self.config = config
        self.model_dir = model_dir
        self.cluster_id = uuid.uuid4().hex[:8]
        self.instances: list[InstanceHandle] = []
        self.started_ray = False
        self.link_store = None

    # ----------------------------------------------------------------------------------------------- ray
    def _init_ray(self):
        ray = _ray()
        if ray.is_initialized():
            return ray
        cfg = self.config.ray
        if cfg.address:
            ray.init(address=cfg.address, namespace="splitserve", log_to_driver=False)
        else:
            ray.init(num_cpus=cfg.num_cpus or os.cpu_count(), num_gpus=cfg.num_gpus if cfg.num_gpus is not None
                     else self.config.num_devices, include_dashboard=False, namespace="splitserve",
                     log_to_driver=False)
            self.started_ray = True
        return ray

    def _check_resources(self, ray) -> None:
        need = self.config.num_devices
        have = int(ray.cluster_resources().get("GPU", 0))
        if have < need:
            raise ValueError(
                f"placement: the layout ({layout_summary(self.config)} ranks) needs {need} GPUs but the Ray cluster "
                f"has {have}; add GPUs, shrink the layout, or on a CPU-only machine set ray.num_gpus >= {need} "
                f"(logical GPUs). Check with `ray status`.")

    def _specs(self) -> list[InstanceSpec]:
        c = self.config
        engine = dict(c.engine.__dict__)
        transfer = dict(c.kv_transfer.__dict__)
        specs = []
        for role, section in (("prefill", c.prefill), ("decode", c.decode), ("colocated", c.colocated)):
            # Decode must know the prefill SP degree: every SP rank pushes its own blocks over its own links.
            extra = {"prefill": {"sp": c.prefill.sp, "sp_algorithm": c.prefill.sp_algorithm},
                     "decode": {"prefill_sp": c.prefill.sp}}.get(role, {})
            for i in range(section.instances):
                specs.append(InstanceSpec(self.cluster_id, f"{role}-{i}", role, section.tp, self.model_dir,
                                          c.dtype, c.device, engine, transfer, **extra))
        return specs

    def _place(self, ray, spec: InstanceSpec) -> InstanceHandle:
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from splitserve.workers.actor import RankActor

        pg = placement_group([{"GPU": 1}] * spec.world_size, strategy="STRICT_PACK",
                             name=f"{self.cluster_id}-{spec.name}")
        try:
            ray.get(pg.ready(), timeout=self.config.ray.placement_timeout_s)
        except Exception:
            remove_placement_group(pg)
            raise ValueError(
                f"placement: instance {spec.name} needs {spec.world_size} GPUs on one node (STRICT_PACK) and none was "
                f"free within {self.config.ray.placement_timeout_s:.0f}s; check `ray status` for free GPUs per node") from None
        actors = [RankActor.options(num_cpus=0, num_gpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=rank)).remote(spec, rank) for rank in range(spec.world_size)]
        return InstanceHandle(spec, actors, pg)

    # ----------------------------------------------------------------------------------------- start-up
    def start(self) -> list[InstanceHandle]:
        ray = self._init_ray()
        self._check_resources(ray)
        try:
            for spec in self._specs():
                self.instances.append(self._place(ray, spec))
            self._init_groups(ray)
            self._connect_links(ray)
            self._get(ray, [a.call.remote("start") for inst in self.instances for a in inst.actors], "starting")
        except BaseException:
            self.shutdown()
            raise
        return self.instances

    def _init_groups(self, ray) -> None:
        hosts = self._get(ray, [inst.leader.node_ip.remote() for inst in self.instances], "locating leaders")
        ports = self._get(ray, [inst.leader.call.remote("create_store", host)
                                for inst, host in zip(self.instances, hosts)], "creating stores")
        self._get(ray, [a.call.remote("init", host, port) for inst, host, port in zip(self.instances, hosts, ports)
                 for a in inst.actors], "loading models and forming process groups")

    def _get(self, ray, refs, what: str):
        """Start-up steps wait a bounded time: a rank that never joins fails the launch instead of hanging it."""
        try:
            return ray.get(refs, timeout=self.STARTUP_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"start-up: {what} took longer than {self.STARTUP_TIMEOUT_S:.0f}s; "
                               "check the actors' logs (`ray logs`)") from None

    def _connect_links(self, ray) -> None:
        prefills = [i for i in self.instances if i.spec.role == "prefill"]
        decodes = [i for i in self.instances if i.spec.role == "decode"]
        if not prefills:
            return
        host = ray.util.get_node_ip_address()
        self.link_store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
        kv_heads = load_model_config(self.model_dir).num_kv_heads
        per_actor: dict[tuple[str, int], list[LinkId]] = {}
        for p in prefills:
            for d in decodes:
                for pr, dr in sorted(links_needed_sp(kv_heads, p.spec.tp, d.spec.tp, p.spec.sp)):
                    link = LinkId(p.name, pr, d.name, dr)
                    per_actor.setdefault((p.name, pr), []).append(link)
                    per_actor.setdefault((d.name, dr), []).append(link)
        by_name = {i.name: i for i in self.instances}
        self._get(ray, [by_name[name].actors[rank].call.remote("connect_links", host, self.link_store.port, links)
                        for (name, rank), links in per_actor.items()], "connecting prefill -> decode links")
        if self.config.kv_transfer.transport == "shm":
            shapes = {d.name: self._get(ray, [a.call.remote("cache_shape") for a in d.actors], "reading cache shapes")
                      for d in decodes}
            calls = []
            for (name, rank), links in per_actor.items():
                if by_name[name].spec.role == "prefill":
                    peer = {lk: shapes[lk.decode_instance][lk.decode_rank] for lk in links}
                    calls.append(by_name[name].actors[rank].call.remote("set_peer_cache_shapes", peer))
            self._get(ray, calls, "mapping shared caches")

    def shutdown(self) -> None:
        ray = _ray()
        if not ray.is_initialized():
            return
        from ray.util.placement_group import remove_placement_group

        for inst in self.instances:
            try:
                ray.get([a.call.remote("stop") for a in inst.actors], timeout=10)
            except Exception:  # best effort: the actors are killed next
                pass
            for a in inst.actors:
                ray.kill(a)
            remove_placement_group(inst.placement_group)
        self.instances = []
        if self.started_ray:
            ray.shutdown()
