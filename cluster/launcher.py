"""Starts (or attaches to) Ray, places each instance's ranks together in a STRICT_PACK placement group (one per
pipeline stage, so stages may sit on different nodes), builds each instance's process group and the prefill ->
decode links, and starts the instance loops."""
from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from splitserve.cluster.config import ClusterConfig
from splitserve.comm.kv_plan import links_needed_pp
from splitserve.comm.links import LinkId
from splitserve.workers.config import load_config as load_model_config
from splitserve.workers.instance import InstanceSpec

log = logging.getLogger(__name__)


def _ray():
    # A local Ray must bind loopback only; this switch is read when ray is first imported.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    return ray


def resolve_address(config_address: str | None) -> str | None:
    """The Ray cluster to attach to: the configured address (`auto`, `host:port`, `ray://host:port`), else
    `RAY_ADDRESS` (which `ray job submit` sets for a job's driver), else None: start a local Ray on 127.0.0.1."""
    address = config_address or os.environ.get("RAY_ADDRESS") or None
    if address is not None and address.startswith(("http://", "https://")):
        source = "ray.address" if config_address else "RAY_ADDRESS"
        raise ValueError(
            f"{source}: {address!r} is a dashboard (job submission) address; attach with the cluster's GCS address "
            "(host:6379), `auto` on a node of the cluster, or `ray://host:10001`; to run there, submit a job with "
            "`ray job submit --address " + address + " -- ...`")
    return address


def role_resource(role: str) -> str:
    """The custom Ray resource a node advertises to host instances of a role (`ray.role_resources`)."""
    return f"splitserve_{role}"


def rank_bundle(role: str, role_resources: bool) -> dict:
    """One rank's placement-group bundle: a GPU, and with role resources one unit of its role's resource."""
    return {"GPU": 1, role_resource(role): 1} if role_resources else {"GPU": 1}


@dataclass
class InstanceHandle:
    spec: InstanceSpec
    actors: list
    placement_groups: list  # one per pipeline stage
    first_stats: dict | None = None  # the leader's stats right after a runtime launch

    @property
    def placement_group(self):
        """The first stage's placement group (an instance without pipeline stages has only this one)."""
        return self.placement_groups[0]

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
        self.started_ray = False  # a local Ray this launcher started: shut down with it
        self.connected_ray = False  # an existing cluster this launcher connected to: disconnect, never stop it
        self.attached = False  # placing on an existing cluster's real resources
        self.link_store = None
        self._link_store_actor = None
        self._link_address: tuple[str, int] | None = None
        self._generation = 0  # link connections made so far: each gets fresh rendezvous keys
        self.closed = False

    # ----------------------------------------------------------------------------------------------- ray
    def init_ray(self):
        ray = _ray()
        if ray.is_initialized():
            # Either this launcher set it up already, or the caller (a driver script, a test) connected: use it as is.
            self.attached = self.attached or not self.started_ray
            return ray
        cfg = self.config.ray
        address = resolve_address(cfg.address)
        if address is None:
            ray.init(num_cpus=cfg.num_cpus or os.cpu_count(), num_gpus=cfg.num_gpus if cfg.num_gpus is not None
                     else self.config.num_devices, resources=self._role_resources_needed() or None,
                     include_dashboard=False, namespace="splitserve", log_to_driver=False)
            self.started_ray = True
            return ray
        if cfg.num_cpus is not None or cfg.num_gpus is not None:
            log.warning("ray.num_cpus / ray.num_gpus apply to a local Ray only; attaching to %s, whose own "
                        "resources are used", address)
        try:
            ray.init(address=address, namespace="splitserve", log_to_driver=False)
        except getattr(ray.exceptions, "AuthenticationError", ()) as e:  # Ray >= 2.52
            raise ConnectionError(
                f"ray: could not authenticate to the Ray cluster at {address}: {e}. With token authentication set "
                "RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                "~/.ray/auth_token; `ray get-auth-token` prints it on the head node)") from None
        except ConnectionError as e:
            raise ConnectionError(
                f"ray: could not connect to a Ray cluster at {address}: {e}. Is it running (`ray start --head` on "
                f"the head node)? Check with `ray status --address {address}`") from None
        self.connected_ray = self.attached = True
        return ray

    @staticmethod
    def gpus_per_node(ray, free: bool) -> dict[str, float]:
        """GPUs (total, or free now) of each live node, by node IP; free counts are best effort."""
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if not free:
            return {n["NodeManagerAddress"]: n["Resources"].get("GPU", 0) for n in nodes}
        try:
            from ray._private.state import available_resources_per_node

            per_node = available_resources_per_node()
        except Exception:  # e.g. through Ray Client: report without free counts
            return {}
        return {n["NodeManagerAddress"]: per_node.get(n["NodeID"], {}).get("GPU", 0) for n in nodes}

    def _role_resources_needed(self) -> dict[str, int]:
        """With ray.role_resources: units of each role's resource the layout needs (one per rank)."""
        if not self.config.ray.role_resources:
            return {}
        need: dict[str, int] = {}
        for spec in self._specs():
            key = role_resource(spec.role)
            need[key] = need.get(key, 0) + spec.world_size
        return need

    def _check_resources(self, ray) -> None:
        have_all = ray.cluster_resources()
        for key, units in self._role_resources_needed().items():
            if have_all.get(key, 0) < units:
                raise ValueError(
                    f"placement: ray.role_resources is on and the layout needs {units} units of {key!r} (one per "
                    f"rank) but the Ray cluster has {have_all.get(key, 0):g}; start the nodes for that role with "
                    f"`ray start --resources '{{\"{key}\": <GPUs>}}'`, or turn ray.role_resources off. "
                    "Check with `ray status`.")
        need = self.config.num_devices
        have = int(ray.cluster_resources().get("GPU", 0))
        if have < need:
            hint = ("add GPU nodes or shrink the layout (CPU-only nodes declare logical GPUs with "
                    "`ray start --num-gpus N`)" if self.attached else
                    f"add GPUs, shrink the layout, or on a CPU-only machine set ray.num_gpus >= {need} (logical GPUs)")
            raise ValueError(
                f"placement: the layout ({layout_summary(self.config)} ranks) needs {need} GPUs but the Ray cluster "
                f"has {have}; {hint}. Check with `ray status`.")
        per_node = self.gpus_per_node(ray, free=False)
        largest = max(per_node.values(), default=0)
        for spec in self._specs():
            if stage_size(spec) > largest:
                raise ValueError(
                    f"placement: instance {spec.name} needs {stage_size(spec)} GPUs on one node per pipeline stage "
                    f"(STRICT_PACK) but the largest node has {largest:g} (GPUs per node: {_format_nodes(per_node)}); "
                    f"lower its tp/sp, raise its pp, or add larger nodes. Check with `ray status`.")

    def _specs(self) -> list[InstanceSpec]:
        c = self.config
        return [self.spec_for(role, i) for role, section in (("prefill", c.prefill), ("decode", c.decode),
                                                            ("colocated", c.colocated))
                for i in range(section.instances)]

    def spec_for(self, role: str, index: int) -> InstanceSpec:
        c = self.config
        # Decode must know the prefill SP and PP degrees: every SP rank and stage pushes over its own links.
        extra = {"prefill": {"sp": c.prefill.sp, "sp_algorithm": c.prefill.sp_algorithm},
                 "decode": {"prefill_sp": c.prefill.sp, "prefill_pp": c.prefill.pp}}.get(role, {})
        section = {"prefill": c.prefill, "decode": c.decode, "colocated": c.colocated}[role]
        return InstanceSpec(self.cluster_id, f"{role}-{index}", role, section.tp, self.model_dir, c.dtype, c.device,
                            c.engine, c.kv_transfer, pp=section.pp, **extra)

    def _place(self, ray, spec: InstanceSpec) -> InstanceHandle:
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from splitserve.workers.actor import RankActor

        # A stage's ranks share a node (TP and SP collectives); stages need not, so each has its own group, on the
        # node the plan gives it when there is one.
        size = stage_size(spec)
        bundle = rank_bundle(spec.role, self.config.ray.role_resources)
        nodes = self.stage_nodes(ray, spec)
        pgs = [placement_group([{**bundle, **({f"node:{node}": 0.001} if node else {})}] * size,
                               strategy="STRICT_PACK",
                               name=f"{self.cluster_id}-{spec.name}" + (f"-stage{s}" if spec.pp > 1 else ""))
               for s, node in enumerate(nodes)]
        timeout = self.config.ray.placement_timeout_s
        try:
            ray.get([pg.ready() for pg in pgs], timeout=timeout)
        except Exception:
            for pg in pgs:
                remove_placement_group(pg)
            placed = ", ".join(i.name for i in self.instances) or "none"
            free = self.gpus_per_node(ray, free=True)
            per_stage = f" for each of its {spec.pp} stages" if spec.pp > 1 else ""
            raise ValueError(
                f"placement: instance {spec.name} needs {size} GPUs on one node{per_stage} (STRICT_PACK) and no node "
                f"had them free within {timeout:.0f}s (free GPUs per node: {_format_nodes(free) or 'unknown'}; "
                f"instances placed before it: {placed}). Free GPUs held by other jobs or actors, shrink the layout, "
                "or raise ray.placement_timeout_s; check with `ray status`.") from None
        actors = [RankActor.options(num_cpus=0, num_gpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
            pgs[rank // size], placement_group_bundle_index=rank % size)).remote(spec, rank)
            for rank in range(spec.world_size)]
        return InstanceHandle(spec, actors, pgs)

    def stage_nodes(self, ray, spec: InstanceSpec) -> list[str | None]:
        """The node (address) of each pipeline stage of `spec` where the config's `placement` section (what
        `splitserve plan` and `placement: auto` write: each instance's stages with a node index) places them; None
        where it says nothing. Node i is the i-th GPU node by address. A plan naming more nodes than the Ray cluster
        has GPU nodes was made for another cluster: it is not applied (with a warning)."""
        plan = self.config.placement
        index = int(spec.name.rsplit("-", 1)[1])
        found = [inst for inst in (plan.get("instances") or [] if isinstance(plan, dict) else [])
                 if isinstance(inst, dict) and inst.get("role") == spec.role and inst.get("index") == index]
        if not found:
            return [None] * spec.pp
        stages = found[0].get("stages") or []
        wanted = [stage.get("node") if isinstance(stage, dict) else None for stage in stages]
        if len(wanted) != spec.pp or not all(isinstance(n, int) and n >= 0 for n in wanted):
            raise ValueError(f"placement.instances: {spec.name} has stages {stages!r}; expected {spec.pp} stages "
                             f"({spec.role}.pp), each with a node index")
        gpu_nodes = sorted({n["NodeManagerAddress"] for n in ray.nodes()
                            if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) > 0})
        if max(wanted) >= len(gpu_nodes):
            log.warning("placement: the plan puts %s on node %d but the Ray cluster has %d GPU nodes; placing it "
                        "where Ray finds room", spec.name, max(wanted), len(gpu_nodes))
            return [None] * spec.pp
        return [gpu_nodes[n] for n in wanted]

    # ----------------------------------------------------------------------------------------- start-up
    def start(self) -> list[InstanceHandle]:
        ray = self.init_ray()
        try:
            self._check_resources(ray)
            for spec in self._specs():
                self.instances.append(self._place(ray, spec))
            self._bring_up(ray, self.instances)
        except BaseException:
            self.shutdown()
            raise
        return self.instances

    def replace(self, name: str) -> InstanceHandle:
        """Relaunches one instance (new ranks, placement group, process group, links to every live peer) after its
        predecessor died; blocking. The predecessor's actors are killed first."""
        ray = _ray()
        index = next(i for i, inst in enumerate(self.instances) if inst.name == name)
        self._remove(ray, self.instances[index])
        if self.closed:
            raise RuntimeError("the cluster is shutting down")
        handle = self._place(ray, self.instances[index].spec)
        self.instances[index] = handle
        try:
            self._bring_up(ray, [handle])
        except BaseException:
            self._remove(ray, handle)
            raise
        return handle

    def add_instance(self, role: str) -> InstanceHandle:
        """Launches one more instance of `role` at runtime (placement group, ranks, process group, links to every
        peer); blocking. ValueError, saying what is missing, when no node has the GPUs free."""
        ray = _ray()
        index = 1 + max((int(i.name.rsplit("-", 1)[1]) for i in self.instances if i.spec.role == role), default=-1)
        spec = self.spec_for(role, index)
        free = {} if self.config.ray.autoscaler else self.gpus_per_node(ray, free=True)
        if free and (max(free.values()) < stage_size(spec) or sum(free.values()) < spec.world_size):
            raise ValueError(f"scale: a new {role} instance needs {spec.world_size} free GPUs ({stage_size(spec)} "
                             f"on one node per pipeline stage) but the Ray "
                             f"cluster has {_format_nodes(free)} free (GPUs per node); add GPUs or remove instances. "
                             "Check with `ray status`.")
        handle = self._place(ray, spec)
        self.instances.append(handle)
        try:
            self._bring_up(ray, [handle])
        except BaseException:
            self._remove(ray, handle)
            self.instances.remove(handle)
            raise
        return handle

    def remove_instance(self, name: str) -> None:
        """Stops one instance and frees its GPUs (its requests must be gone: drained or moved)."""
        ray = _ray()
        inst = next(i for i in self.instances if i.name == name)
        try:
            ray.get([a.call.remote("stop") for a in inst.actors], timeout=10)
        except Exception:  # best effort: the actors are killed next
            pass
        self._remove(ray, inst)
        self.instances.remove(inst)

    def stop_instance(self, name: str) -> None:
        """Kills what is left of a dead instance (its surviving ranks, its placement group)."""
        for inst in self.instances:
            if inst.name == name:
                self._remove(_ray(), inst)

    def _bring_up(self, ray, new: list[InstanceHandle]) -> None:
        self._init_groups(ray, new)
        self._connect_links(ray, new)
        self._get(ray, [a.call.remote("start") for inst in new for a in inst.actors], "starting")

    def _init_groups(self, ray, instances: list[InstanceHandle]) -> None:
        hosts = self._get(ray, [inst.leader.node_ip.remote() for inst in instances], "locating leaders")
        ports = self._get(ray, [inst.leader.call.remote("create_store", host)
                                for inst, host in zip(instances, hosts)], "creating stores")
        self._get(ray, [a.call.remote("init", host, port) for inst, host, port in zip(instances, hosts, ports)
                 for a in inst.actors], "loading models and forming process groups")

    def _get(self, ray, refs, what: str):
        """Start-up steps wait a bounded time: a rank that never joins fails the launch instead of hanging it."""
        try:
            return ray.get(refs, timeout=self.STARTUP_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"start-up: {what} took longer than {self.STARTUP_TIMEOUT_S:.0f}s; "
                               "check the actors' logs (`ray logs`)") from None

    def _connect_links(self, ray, new: list[InstanceHandle]) -> None:
        """Links of every prefill -> decode pair in which at least one side is new."""
        fresh = {i.name for i in new}
        pairs = [(p, d) for p in self.instances if p.spec.role == "prefill"
                 for d in self.instances if d.spec.role == "decode" and {p.name, d.name} & fresh]
        if not pairs:
            return
        host, port = self._link_address or self._start_link_store(ray)
        self._link_address = (host, port)
        self._generation += 1
        model_config = load_model_config(self.model_dir)
        kv_heads, num_layers = model_config.num_kv_heads, model_config.num_layers
        per_actor: dict[tuple[str, int], list[LinkId]] = {}
        for p, d in pairs:
            for pr, dr in sorted(links_needed_pp(kv_heads, num_layers, p.spec.tp, p.spec.sp, p.spec.pp, d.spec.tp,
                                                 d.spec.pp)):
                link = LinkId(p.name, pr, d.name, dr)
                per_actor.setdefault((p.name, pr), []).append(link)
                per_actor.setdefault((d.name, dr), []).append(link)
        by_name = {i.name: i for i in self.instances}
        self._get(ray, [by_name[name].actors[rank].call.remote("connect_links", host, port, links, self._generation)
                        for (name, rank), links in per_actor.items()], "connecting prefill -> decode links")
        if self.config.kv_transfer.transport == "shm":
            decodes = {d.name: d for _, d in pairs}
            shapes = {name: self._get(ray, [a.call.remote("cache_shape") for a in d.actors], "reading cache shapes")
                      for name, d in decodes.items()}
            calls = []
            for (name, rank), links in per_actor.items():
                if by_name[name].spec.role == "prefill":
                    peer = {lk: shapes[lk.decode_instance][lk.decode_rank] for lk in links}
                    calls.append(by_name[name].actors[rank].call.remote("set_peer_cache_shapes", peer))
            self._get(ray, calls, "mapping shared caches")

    def _start_link_store(self, ray) -> tuple[str, int]:
        """The store where prefill and decode ranks meet to form their links. It lives in this process, unless
        this is a Ray Client (`ray://`) driver, which the cluster's nodes may not reach: then in a small actor."""
        from ray.util.client import ray as ray_client

        if not ray_client.is_connected():
            host = ray.util.get_node_ip_address()
            self.link_store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                                            timeout=timedelta(seconds=60))
            return host, self.link_store.port
        self._link_store_actor = ray.remote(num_cpus=0)(_LinkStoreHost).remote()
        return tuple(self._get(ray, self._link_store_actor.start.remote(), "starting the link store"))

    def _remove(self, ray, inst: InstanceHandle) -> None:
        from ray.util.placement_group import remove_placement_group

        for a in inst.actors:
            try:
                ray.kill(a)
            except Exception:  # already gone
                pass
        for pg in inst.placement_groups:
            try:
                remove_placement_group(pg)
            except Exception:  # already removed
                pass

    def shutdown(self) -> None:
        self.closed = True
        ray = _ray()
        if not ray.is_initialized():
            return
        for inst in self.instances:
            try:
                ray.get([a.call.remote("stop") for a in inst.actors], timeout=10)
            except Exception:  # best effort: the actors are killed next
                pass
            self._remove(ray, inst)
        self.instances = []
        if self._link_store_actor is not None:
            ray.kill(self._link_store_actor)
            self._link_store_actor = None
        if self.started_ray or self.connected_ray:  # disconnects from an attached cluster; never stops it
            ray.shutdown()
            self.started_ray = self.connected_ray = False


class _LinkStoreHost:
    def start(self) -> tuple[str, int]:
        import ray

        host = ray.util.get_node_ip_address()
        self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
        return host, self.store.port


def stage_size(spec: InstanceSpec) -> int:
    """Ranks of one pipeline stage: they must share a node."""
    return spec.world_size // spec.pp


def _format_nodes(gpus: dict[str, float]) -> str:
    return ", ".join(f"{ip}: {n:g}" for ip, n in sorted(gpus.items()))
