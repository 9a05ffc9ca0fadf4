"""Analytic latency model: prefill and decode step times from FLOPs and bytes, plus TP / SP / PP / KV-transfer comm.

All times are seconds. `LatencyModel` is the interface the simulator uses; `profile.ProfileLatency` implements it
from fitted measurements instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol, Sequence

from splitserve.placement.hardware import ClusterSpec
from splitserve.placement.parallel import Parallel, pipeline_crosses_nodes, stage_crosses_nodes
from splitserve.placement.sp_cost import ALGORITHMS, shorter_step, step_bytes
from splitserve.placement.specs import ModelSpec


class LatencyModel(Protocol):
    def prefill_time(self, lengths: Sequence[int], par: Parallel, prefixes: Sequence[int] | None = None) -> float:
        """One forward over a batch of prompt chunks (`prefixes[i]` tokens of chunk i already cached)."""

    def decode_time(self, batch: int, total_context: int, par: Parallel) -> float:
        """One decode step of `batch` sequences holding `total_context` tokens of KV in all."""

    def mixed_time(self, lengths: Sequence[int], prefixes: Sequence[int], batch: int, total_context: int,
                   par: Parallel) -> float:
        """One colocated iteration: prefill chunks and decode tokens fused into one forward."""

    def kv_transfer_time(self, tokens: int, src: Parallel, dst: Parallel, same_node: bool) -> float:
        """Moving `tokens` of KV cache (all layers) from a prefill instance to a decode instance."""


@dataclass(frozen=True)
class ScaledLatency:
    """Another model's forwards times a factor per phase: the online planner's calibration to the step times its
    running instances report (the machine as it is now, with every per-step cost of the serving loop). Colocated
    iterations and KV transfers are the base model's."""

    base: LatencyModel
    prefill_scale: float = 1.0
    decode_scale: float = 1.0

    def prefill_time(self, lengths: Sequence[int], par: Parallel, prefixes: Sequence[int] | None = None) -> float:
        return self.prefill_scale * self.base.prefill_time(lengths, par, prefixes)

    def decode_time(self, batch: int, total_context: int, par: Parallel) -> float:
        return self.decode_scale * self.base.decode_time(batch, total_context, par)

    def mixed_time(self, lengths: Sequence[int], prefixes: Sequence[int], batch: int, total_context: int,
                   par: Parallel) -> float:
        return self.base.mixed_time(lengths, prefixes, batch, total_context, par)

    def kv_transfer_time(self, tokens: int, src: Parallel, dst: Parallel, same_node: bool) -> float:
        return self.base.kv_transfer_time(tokens, src, dst, same_node)


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak actually reached, and fixed per-forward costs; calibrated by a profile, not by hand."""

    prefill_compute: float = 0.8  # at full GEMM rows; see half_efficiency_rows
    decode_compute: float = 0.4
    memory: float = 0.75
    link: float = 0.8
    forward_overhead: float = 3e-3  # framework + launch overhead per forward (paid by every pipeline stage)
    layer_overhead: float = 30e-6  # kernel launches per layer
    tp_overlap: float = 0.0  # fraction of TP comm hidden behind compute (TokenWeave-style split); 0 = none
    # Prefill GEMMs reach half their peak efficiency at this many rows per rank (efficiency rows/(rows + this)):
    # short prompts, and SP's per-rank shards of them, do not fill the matrix units.
    half_efficiency_rows: float = 150.0
    # A TP shard of a layer runs below one device's efficiency (narrower GEMMs, synchronisation beyond the bytes of
    # its all-reduces): compute and weight-read time x (1 + this x (1 - 1/tp)). 0.7 matches DistServe's OPT-13B
    # A100 fits (TP 2: 1.35x the ideal per-token cost, TP 4: 1.49x).
    tp_penalty: float = 0.7

    def __post_init__(self) -> None:
        for field in ("prefill_compute", "decode_compute", "memory", "link"):
            if not 0 < getattr(self, field) <= 1:
                raise ValueError(f"{field}: efficiency must be in (0, 1], got {getattr(self, field)!r}")
        if not 0 <= self.tp_overlap <= 1:
            raise ValueError(f"tp_overlap: must be in [0, 1], got {self.tp_overlap!r}")
        if not self.tp_penalty >= 0:
            raise ValueError(f"tp_penalty: must be >= 0, got {self.tp_penalty!r}")
        if not self.half_efficiency_rows >= 0:
            raise ValueError(f"half_efficiency_rows: must be >= 0, got {self.half_efficiency_rows!r}")


def _local_heads(model: ModelSpec, tp: int) -> tuple[float, int]:
    """(query heads, KV heads) one TP rank holds; KV heads are replicated when TP exceeds them."""
    return model.num_heads / tp, -(-model.num_kv_heads // tp)


def sp_step_bytes(model: ModelSpec, tp: int, algorithm: str, tokens_per_rank: float) -> tuple[float, float]:
    """(forward, backward) bytes one rank sends per ring step per layer (`sp_cost.step_bytes` for its heads)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"sp_algorithm: {algorithm!r} is not ring or token_ring")
    return step_bytes(algorithm, tokens_per_rank, *_local_heads(model, tp), model.head_dim, model.dtype_bytes)


def cheaper_sp_algorithm(model: ModelSpec, tp: int) -> str:
    """The algorithm whose busiest link direction carries fewer bytes per step (ring on a tie)."""
    return shorter_step(*_local_heads(model, tp), model.head_dim, model.dtype_bytes)


@dataclass(frozen=True)
class _Linear:
    """Per-layout constants: every cost below is affine in (tokens, attention pairs, KV tokens read, logits)."""

    compute_token: float
    compute_fixed: float  # the rows a prefill GEMM would need to run at full efficiency (see Efficiency)
    compute_pair: float
    compute_logit: float
    memory_fixed: float
    memory_kv_token: float
    comm_token: float  # TP all-reduce + PP activation hops, per token
    comm_fixed: float  # their latency terms + per-forward overheads
    sp_token: float  # SP ring bytes time per token (all layers, all steps); 0 without SP
    sp_fixed: float
    sp_hidden: float  # share of attention time that overlaps the ring steps


class AnalyticLatency:
    """Roofline per forward (max of compute and memory time) plus exposed communication and fixed overheads.

    Every term is affine in four counts of the batch (tokens, causal attention pairs, KV tokens read, logits),
    so a layout's constants are computed once and each call is a few multiplications: the simulator calls this
    hundreds of thousands of times per search.
    """

    def __init__(self, model: ModelSpec, cluster: ClusterSpec, efficiency: Efficiency = Efficiency()):
        self.model = model
        self.cluster = cluster
        self.eff = efficiency
        self._peak = cluster.hardware.flops(model.dtype)
        self._constants: dict[tuple[Parallel, bool], _Linear] = {}
        self._last: list[tuple[Parallel, _Linear] | None] = [None, None]

    def _link(self, crosses_nodes: bool) -> tuple[float, float]:
        hw = self.cluster.hardware
        if crosses_nodes:
            return hw.inter_node_bandwidth * self.eff.link, hw.inter_node_latency
        return hw.intra_node_bandwidth * self.eff.link, hw.intra_node_latency

    def _linear(self, par: Parallel, prefill: bool) -> _Linear:
        last = self._last[prefill]
        if last is not None and last[0] is par:  # identity check: hashing a dataclass per call is costly
            return last[1]
        key = (par, prefill)
        if key not in self._constants:
            self._constants[key] = self._derive(par, prefill)
        self._last[prefill] = (par, self._constants[key])
        return self._constants[key]

    def _derive(self, par: Parallel, prefill: bool) -> _Linear:
        m, eff, layers = self.model, self.eff, self.model.num_layers
        ranks = par.tp * par.sp
        flops_rate = ranks * self._peak * (eff.prefill_compute if prefill else eff.decode_compute)
        act_bytes = m.hidden_size * m.dtype_bytes / par.sp  # one token's activation, per SP rank
        kv_per_token = m.kv_bytes_per_token() * max(1.0, par.tp / m.num_kv_heads) / par.tp / par.sp
        memory_rate = self.cluster.hardware.memory_bandwidth * eff.memory
        comm_token = comm_fixed = 0.0
        if par.tp > 1:
            # Two ring all-reduces per layer (= reduce-scatter + all-gather): 2(n-1)/n of the buffer each.
            bandwidth, latency = self._link(par.tp > self.cluster.devices_per_node)
            share = 2 * layers * (1 - eff.tp_overlap)
            comm_token += share * 2 * (par.tp - 1) / par.tp * act_bytes / bandwidth
            comm_fixed += share * 2 * (par.tp - 1) * latency
        if par.pp > 1:
            bandwidth, latency = self._link(pipeline_crosses_nodes(self.cluster, par))
            comm_token += (par.pp - 1) * act_bytes / bandwidth
            comm_fixed += (par.pp - 1) * latency
        # A pipeline runs as fast as its largest stage: ceil(L/pp) layers of L. Each stage is a forward of its own,
        # with its own framework overhead, one after another for a given batch.
        imbalance = -(-layers // par.pp) * par.pp / layers
        sharded = 1 + eff.tp_penalty * (1 - 1 / par.tp)
        comm_fixed += (par.pp - 1) * eff.forward_overhead
        sp_token = sp_fixed = 0.0
        if par.sp > 1:
            bandwidth, latency = self._link(stage_crosses_nodes(self.cluster, par))
            forward, backward = sp_step_bytes(m, par.tp, par.sp_algorithm, 1.0 / par.sp)
            sp_token = layers * (par.sp - 1) * max(forward, backward) / bandwidth
            sp_fixed = layers * (par.sp - 1) * latency
        compute_token = 2 * layers * m.layer_params() / flops_rate * imbalance * sharded
        return _Linear(
            compute_token=compute_token,
            compute_fixed=compute_token * eff.half_efficiency_rows * par.sp if prefill else 0.0,
            # Causal attention pairs: QK^T and PV at 2 FLOPs per multiply-add each.
            compute_pair=4 * layers * m.num_heads * m.head_dim / flops_rate,
            compute_logit=2 * m.hidden_size * m.vocab_size / flops_rate,
            memory_fixed=m.weight_bytes() / par.tp / memory_rate * imbalance * sharded,
            memory_kv_token=kv_per_token / memory_rate,
            comm_token=comm_token,
            comm_fixed=comm_fixed + eff.forward_overhead + eff.layer_overhead * layers,
            sp_token=sp_token, sp_fixed=sp_fixed, sp_hidden=(par.sp - 1) / par.sp,
        )

    def pipeline_hop(self, par: Parallel, prefill: bool = True) -> tuple[float, float]:
        """(fixed seconds, seconds per token) each stage beyond the first adds to a forward of layout `par`: its
        forward overhead and link latency, and one token's activations over the link (a stage imbalance, when
        `par.pp` does not divide the layers, is apart). What `splitserve profile --pp` measures, for comparison."""
        if par.pp < 2:
            raise ValueError(f"pp: a hop needs at least 2 stages, got {par.pp}")
        staged, single = self._derive(par, prefill), self._derive(dataclasses.replace(par, pp=1), prefill)
        hops = par.pp - 1
        return (staged.comm_fixed - single.comm_fixed) / hops, (staged.comm_token - single.comm_token) / hops

    def tp_allreduce(self, par: Parallel, prefill: bool = True) -> tuple[float, float]:
        """(fixed seconds, seconds per token) the TP all-reduces of layout `par` add to a forward: two per layer, the
        link latency of each ring step and one token's activations (less `tp_overlap`). The sharded compute (1/tp of
        the FLOPs at `tp_penalty` efficiency) is apart. What `splitserve profile` compares a TP layout with."""
        if par.tp < 2:
            raise ValueError(f"tp: an all-reduce needs at least 2 ranks, got {par.tp}")
        sharded, single = self._derive(par, prefill), self._derive(dataclasses.replace(par, tp=1), prefill)
        return sharded.comm_fixed - single.comm_fixed, sharded.comm_token - single.comm_token

    def sp_ring(self, par: Parallel) -> tuple[float, float]:
        """(fixed seconds, seconds per token) of the SP ring steps of a prefill of layout `par`, before any of it
        hides behind attention: (sp − 1) steps per layer of one rank's share of the K/V (ring) or Q and results
        (TokenRing) over the link."""
        if par.sp < 2:
            raise ValueError(f"sp: a ring needs at least 2 ranks, got {par.sp}")
        k = self._derive(par, True)
        return k.sp_fixed, k.sp_token

    def sp_ring_exposed(self, lengths: Sequence[int], par: Parallel) -> float:
        """Seconds of a prefill of `lengths` under layout `par` that its ring steps leave exposed: their time beyond
        the attention they overlap ((sp − 1)/sp of it). What `splitserve profile` compares an SP layout with."""
        if par.sp < 2:
            raise ValueError(f"sp: a ring needs at least 2 ranks, got {par.sp}")
        k = self._derive(par, True)
        return _exposed_ring(k, sum(lengths), k.compute_pair * sum(n * n for n in lengths) / 2)

    def _time(self, k: _Linear, tokens: float, pairs: float, kv_read: float, logits: int) -> float:
        attention = k.compute_pair * pairs
        compute = k.compute_token * tokens + k.compute_fixed + attention + k.compute_logit * logits
        memory = k.memory_fixed + k.memory_kv_token * (kv_read + tokens)
        time = (compute if compute > memory else memory) + k.comm_token * tokens + k.comm_fixed
        if k.sp_token:
            time += _exposed_ring(k, tokens, attention)
        return time

    def prefill_time(self, lengths: Sequence[int], par: Parallel, prefixes: Sequence[int] | None = None) -> float:
        if prefixes is None:
            pairs = sum(l * l for l in lengths) / 2
            kv_read = 0
        else:
            pairs = sum(l * (l / 2 + p) for l, p in zip(lengths, prefixes))
            kv_read = sum(prefixes)
        return self._time(self._linear(par, True), sum(lengths), pairs, kv_read, len(lengths))

    def decode_time(self, batch: int, total_context: int, par: Parallel) -> float:
        return self._time(self._linear(par, False), batch, total_context, total_context, batch)

    def mixed_time(self, lengths: Sequence[int], prefixes: Sequence[int], batch: int, total_context: int,
                   par: Parallel) -> float:
        pairs = sum(l * (l / 2 + p) for l, p in zip(lengths, prefixes)) + total_context
        k = self._linear(par, bool(lengths))
        return self._time(k, sum(lengths) + batch, pairs, sum(prefixes) + total_context, len(lengths) + batch)

    def kv_transfer_time(self, tokens: int, src: Parallel, dst: Parallel, same_node: bool) -> float:
        return kv_transfer_time(self.model, self.cluster, tokens, src, dst, same_node, self.eff.link)


def _exposed_ring(k: _Linear, tokens: float, attention: float) -> float:
    """Ring steps overlap with the attention of the step; only the excess is exposed."""
    exposed = k.sp_token * tokens + k.sp_fixed - attention * k.sp_hidden
    return exposed if exposed > 0 else 0.0


def kv_transfer_time(model: ModelSpec, cluster: ClusterSpec, tokens: int, src: Parallel, dst: Parallel,
                     same_node: bool, link_efficiency: float = 0.8) -> float:
    """KV bytes over the links; each prefill rank pushes its shard, so min(ranks) streams run in parallel."""
    hw = cluster.hardware
    if same_node:
        bandwidth, latency = hw.intra_node_bandwidth, hw.intra_node_latency
    else:
        bandwidth, latency = hw.inter_node_bandwidth, hw.inter_node_latency
    streams = min(src.devices, dst.devices)
    return tokens * model.kv_bytes_per_token() / (streams * bandwidth * link_efficiency) + latency
