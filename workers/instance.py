"""One rank of an instance: its model shard, KV cache and process group; followers execute what rank 0 (the
leader) broadcasts, and every rank pushes (prefill) or accepts (decode) its share of each request's KV. With
pipeline stages each rank holds its stage's layers and only their KV (see workers/pipeline.py)."""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from splitserve.comm.kv_plan import LinkId, TransferOrder, stage_layers
from splitserve.comm.kv_transfer import KVReceiver, KVSender, map_shared_cache, remove_shared_cache, shm_path
from splitserve.comm.links import RECEIVER, SENDER, Link
from splitserve.comm.sequence_parallel import SPGroup
from splitserve.comm.tensor_parallel import TPGroup
from splitserve.workers.batch import ForwardBatch
from splitserve.workers.config import load_config
from splitserve.workers.engine_builder import ROLES, kv_cache_blocks
from splitserve.workers.engine_config import EngineConfig, TransferConfig
from splitserve.workers.kv_cache import allocate_kv_cache
from splitserve.workers.layers.attention_backend import configure_attention
from splitserve.workers.loader import load_model, resolve_device, resolve_dtype
from splitserve.workers.model_runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceSpec:
    """What every rank of an instance needs to build itself (picklable, sent once at start-up)."""

    cluster_id: str
    name: str
    role: str
    tp: int
    model_dir: str
    dtype: str = "float32"
    device: str = "cpu"
    engine: EngineConfig = field(default_factory=EngineConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    sp: int = 1  # prefill only: sequence-parallel ranks, each with `tp` ranks (global rank = sp_rank·tp + tp_rank)
    sp_algorithm: str = "ring"
    prefill_sp: int = 1  # decode only: the SP degree of the prefill instances that push KV here
    pp: int = 1  # pipeline stages, each `sp` x `tp` ranks (global rank = stage·sp·tp + sp_rank·tp + tp_rank)
    prefill_pp: int = 1  # decode only: the PP degree of the prefill instances that push KV here

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"role: must be one of {ROLES}, got {self.role!r}")
        if self.sp != 1 and self.role != "prefill":
            raise ValueError(f"sp: only prefill instances run sequence-parallel, got sp={self.sp} for {self.role}")

    @property
    def world_size(self) -> int:
        return self.tp * self.sp * self.pp


class RankWorker:
    def __init__(self, spec: InstanceSpec, rank: int):
        self.spec, self.rank = spec, rank
        self.device = resolve_device(spec.device)
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # ranks share the host's cores
        self.store: dist.Store | None = None
        self.sender: KVSender | None = None
        self.receivers: list[KVReceiver] = []
        self.links: dict[LinkId, Link] = {}
        self._peer_caches: dict[LinkId, list[torch.Tensor]] = {}
        self.peer_cache_shapes: dict[LinkId, tuple] = {}
        self.leader = None
        self._sending = False  # pushes started by the last forward and not yet finished
        self._shm_file: str | None = None
        self._forward_delay = 0.0  # test hook: extra seconds per forward (`slow_forwards`)

    # ------------------------------------------------------------------------------------------- start-up
    def create_store(self, host: str) -> int:
        """Rank 0 hosts the instance's store: its process group and control flags live there."""
        self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60))
        return self.store.port

    def init(self, host: str, port: int) -> dict:
        spec = self.spec
        if self.store is None:
            self.store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=60))
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.PrefixStore("pg", self.store), rank=self.rank,
                                world_size=spec.world_size, timeout=timedelta(days=7))  # idle followers wait in broadcast
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if spec.sp > 1:
            self.tp, self.sp = sp_tp_groups(self.rank, spec.sp, spec.tp, spec.pp)
        elif spec.pp > 1:
            from splitserve.workers.pipeline import stage_groups

            self.tp = stage_groups(self.rank, spec.pp, spec.tp)
        else:
            self.tp = TPGroup.from_group()
        self.dtype = resolve_dtype(spec.dtype)
        num_layers = load_config(spec.model_dir).num_layers
        self.layers = stage_layers(num_layers, spec.pp)[self.rank // (spec.tp * spec.sp)] if spec.pp > 1 else None
        self.model = load_model(spec.model_dir, self.dtype, self.device, self.tp, spec.engine.backend,
                                layers=self.layers)
        if spec.pp > 1 and not hasattr(self.model, "layer_range"):
            raise ValueError("pp: pipeline stages run on the native model backend only")
        self.model.configure_tp(spec.engine.tp_norm_method, spec.engine.overlap_min_tokens)
        configure_attention(self.model, spec.engine.attention_backend, self.device)
        self._allocate_cache()
        self.runner = ModelRunner(self.model, self.caches, self.model.cfg.eos_token_ids, self.device)
        if spec.pp > 1:
            from splitserve.workers.pipeline import PipelineStage, StagePosition

            self.stage = StagePosition.of(self.rank, spec.pp, spec.tp, spec.sp)
            self.pipeline = PipelineStage(self.runner, self.stage)
        return {"num_blocks": self.num_blocks, "kv_heads": self.model.num_kv_heads}

    def _allocate_cache(self) -> None:
        cfg, block_size = self.model.cfg, self.spec.engine.block_size
        kv_heads = self.model.num_kv_heads
        blocks = kv_cache_blocks(self.spec.engine, self.model, self.device, self.dtype)
        # All ranks of an instance must agree on the block count: the leader's block manager governs them all.
        count = torch.tensor([blocks], dtype=torch.long, device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MIN)
        self.num_blocks = int(count.item())
        shape = (2, self.num_blocks, block_size, kv_heads, cfg.head_dim)
        num_layers = len(self.model.layers)  # a pipeline stage caches only its own layers
        if self.spec.role == "decode" and self.spec.transfer.transport == "shm" and self.device.type == "cpu":
            self._shm_file = shm_path(self.spec.cluster_id, self.spec.name, self.rank)
            self.caches = map_shared_cache(self._shm_file, num_layers, shape, self.dtype, create=True)
        else:
            self.caches = allocate_kv_cache(num_layers, self.num_blocks, block_size, kv_heads, cfg.head_dim,
                                            self.dtype, self.device)
        self._layer_of = {id(c): i for i, c in enumerate(self.caches)}

    def connect_links(self, host: str, port: int, link_ids: list[LinkId], generation: int = 0) -> int:
        """Builds links of this rank at once (each blocks until its peer joins): all of them at start-up, or those
        to a relaunched peer later (they replace the dead peer's). Starts the KV threads that serve them."""
        side = SENDER if self.spec.role == "prefill" else RECEIVER
        errors: list[BaseException] = []
        new: dict[LinkId, Link] = {}

        def connect(link_id):
            try:
                # One store client per link: a client blocked in one rendezvous's wait would hold back this
                # rank's writes for the others, and two ranks can then wait on each other for good.
                store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=60))
                new[link_id] = Link(link_id, side, store, self.device, generation)
            except BaseException as e:  # reported below, never lost in a thread
                errors.append(e)

        threads = [threading.Thread(target=connect, args=(lid,)) for lid in link_ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        for link_id in new:
            self._peer_caches.pop(link_id, None)  # a relaunched decode rank has a new cache file
        self.links.update(new)  # the sender reads this very dict
        transfer = self.spec.transfer
        if side == SENDER and self.sender is None:
            self.sender = KVSender(self.caches, self.links, transfer.transport, transfer.timeout_s, self._peer_cache)
        elif side == RECEIVER:
            self.receivers += [KVReceiver(link, self.caches, self.store, transfer.transport, transfer.timeout_s)
                               for link in new.values()]
        return len(new)

    def _peer_cache(self, link_id: LinkId) -> list[torch.Tensor]:
        """The decode rank's cache, mapped from shared memory (same host only)."""
        if link_id not in self._peer_caches:
            ref = self.caches[0]
            path = shm_path(self.spec.cluster_id, link_id.decode_instance, link_id.decode_rank)
            num_layers, *shape = self.peer_cache_shapes[link_id]
            self._peer_caches[link_id] = map_shared_cache(path, num_layers, tuple(shape), ref.dtype, create=False)
        return self._peer_caches[link_id]

    def set_peer_cache_shapes(self, shapes: dict) -> None:
        self.peer_cache_shapes.update(shapes)

    def cache_shape(self) -> tuple:
        """(cache layers of this rank, *one layer's shape)."""
        return (len(self.caches), *self.caches[0].shape)

    def start(self) -> None:
        if self.rank == 0:
            from splitserve.workers.instance_leader import InstanceLeader

            self.leader = InstanceLeader(self)
            self.leader.start()
        else:
            threading.Thread(target=self._follow, name="follower", daemon=True).start()

    # --------------------------------------------------------------------------------------- every step
    def broadcast(self, message) -> None:
        """One step's metadata from the leader to every follower (through the stages of a pipeline)."""
        if self.spec.pp > 1:
            self.pipeline.send_control(message)
        elif self.spec.world_size > 1:
            dist.broadcast_object_list([message], src=0)

    def _receive(self):
        if self.spec.pp > 1:
            return self.pipeline.receive_control()
        box = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _follow(self) -> None:
        while True:
            kind, batch, orders = self._receive()
            if kind == "stop":
                return
            self.execute(batch, orders)
            self.finish_sends()  # a follower reports nothing, so nothing is gained by finishing later

    def execute(self, batch: ForwardBatch, orders: list[TransferOrder]) -> torch.Tensor:
        """One step of this rank's shard, on the leader and on every follower; starts pushing this rank's share
        of the KV of `orders`. The pushes are finished by `finish_sends`, after the first tokens are out (TTFT
        does not wait for the last layer)."""
        self.finish_sends()  # earlier pushes read blocks that this forward may overwrite
        if self._forward_delay:
            time.sleep(self._forward_delay)
        mine = [o for o in orders if o.link.prefill_rank == self.rank]
        if not mine or self.sender is None:
            return self._forward_logits(batch)
        layerwise = self.spec.transfer.mode == "layerwise"
        if layerwise:
            self.sender.begin(mine)
            logits = self._forward_logits(batch, lambda cache: self.sender.layer_done(self._layer_of[id(cache)]))
        else:
            logits = self._forward_logits(batch)
            self.sender.begin(mine)
            for layer in range(len(self.caches)):
                self.sender.layer_done(layer)
        self._sending = True
        return logits

    def launch(self, batch: ForwardBatch) -> None:
        """On the leader of a pipeline: one decode batch through this stage now; its logits come back later, in
        launch order (`collect`), so later batches can enter the pipeline meanwhile (the followers run it through
        `execute` as usual)."""
        self.pipeline.launch(batch)

    def collect(self, batch: ForwardBatch) -> torch.Tensor:
        return self.pipeline.collect(batch)

    def finish_sends(self, first_tokens: dict[tuple[str, int], tuple[int, bool]] | None = None) -> None:
        """Waits for this rank's pushes; the leader passes the first tokens ((decode instance, transfer id) ->
        (token, finished))."""
        if self._sending:
            for result in self.sender.end(first_tokens):
                if not result.ok:  # the decode side decides the request's fate; this side only records why
                    log.warning("KV push of transfer %d from %s rank %d failed: %s", result.transfer_id,
                                self.spec.name, self.rank, result.error)
            self._sending = False

    def _forward_logits(self, batch: ForwardBatch, hook=None) -> torch.Tensor:
        if self.spec.sp > 1:
            return self.sp_runner.forward_logits(batch, hook)
        if self.spec.pp > 1:
            return self.pipeline.forward_logits(batch, hook)
        return self.runner.forward_logits(batch, hook)

    @property
    def sp_runner(self):
        if not hasattr(self, "_sp_runner"):
            from splitserve.workers.sp_prefill import SPPrefillRunner

            self._sp_runner = SPPrefillRunner(self.model, self.caches, self.sp, self.spec.sp_algorithm, self.device,
                                              getattr(self, "stage", None))
        return self._sp_runner

    # ------------------------------------------------------------------------------------------ control
    def inject_transfer_faults(self, count: int) -> None:
        """Test hook: the next `count` transfers from this rank stall after the handshake."""
        if self.sender is not None:
            self.sender.faults = count

    def slow_forwards(self, seconds: float) -> None:
        """Test hook: every forward of this rank takes `seconds` longer (a long step on a slow device)."""
        self._forward_delay = float(seconds)

    def pid(self) -> int:
        return os.getpid()

    def stop(self) -> None:
        if self.leader is not None:
            self.leader.stop()
        if self._shm_file:
            remove_shared_cache(self._shm_file)


def sp_tp_groups(rank: int, sp: int, tp: int, pp: int = 1) -> tuple[TPGroup, SPGroup]:
    """This rank's TP group (the TP ranks of its SP rank) and SP group (the same TP rank of every SP rank), within its
    pipeline stage (global rank = stage·SP·TP + sp_rank·TP + tp_rank). Collective: every rank of the instance creates
    every group, in the same order."""
    tp_group = None
    for base in range(0, pp * sp * tp, sp * tp):
        for s in range(sp):
            ranks = [base + s * tp + t for t in range(tp)]
            group = dist.new_group(ranks) if tp > 1 else None
            if rank in ranks:
                tp_group = TPGroup(ranks.index(rank), tp, group) if tp > 1 else TPGroup()
    sp_group = SPGroup.create([[base + s * tp + t for s in range(sp)] for base in range(0, pp * sp * tp, sp * tp)
                               for t in range(tp)])
    return tp_group, sp_group
