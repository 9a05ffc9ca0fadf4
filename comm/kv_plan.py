"""What moves where in a KV transfer: which slice of KV heads goes from which prefill rank to which decode rank
for any pair of TP degrees (KV heads split or replicated on either side), which SP rank holds which block, which
pipeline stage holds which layers, and the orders one prefill step gives its ranks. Pure Python.

Ranks of an instance: global rank = stage·(SP·TP) + sp_rank·TP + tp_rank (decode and colocated: SP = 1)."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise


@dataclass(frozen=True)
class LinkId:
    prefill_instance: str
    prefill_rank: int
    decode_instance: str
    decode_rank: int

    @property
    def key(self) -> str:
        return f"link/{self.prefill_instance}/{self.prefill_rank}/{self.decode_instance}/{self.decode_rank}"


def local_kv_heads(num_kv_heads: int, tp: int, rank: int) -> tuple[int, int]:
    """(first global KV head, count) held by `rank`: split when kv heads >= TP, else one replicated head."""
    if num_kv_heads >= tp:
        if num_kv_heads % tp:
            raise ValueError(f"tp: {num_kv_heads} KV heads do not split over {tp} ranks")
        per = num_kv_heads // tp
        return rank * per, per
    if tp % num_kv_heads:
        raise ValueError(f"tp: {tp} ranks cannot replicate {num_kv_heads} KV heads evenly")
    return rank // (tp // num_kv_heads), 1


@dataclass(frozen=True)
class HeadSlice:
    """Heads [src_head, src_head + num_heads) of the prefill rank's local heads land at
    [dst_head, dst_head + num_heads) of the decode rank's local heads."""

    src_rank: int
    dst_rank: int
    src_head: int
    dst_head: int
    num_heads: int


def plan_heads(num_kv_heads: int, src_tp: int, dst_tp: int) -> list[HeadSlice]:
    """Every decode rank gets each of its heads from exactly one prefill rank; replicas share the load."""
    slices: list[HeadSlice] = []
    for dst in range(dst_tp):
        d_start, d_count = local_kv_heads(num_kv_heads, dst_tp, dst)
        for head in range(d_start, d_start + d_count):
            owners = [p for p in range(src_tp) if _holds(num_kv_heads, src_tp, p, head)]
            src = owners[dst % len(owners)]
            s_start, _ = local_kv_heads(num_kv_heads, src_tp, src)
            last = slices[-1] if slices else None
            if (last and last.src_rank == src and last.dst_rank == dst and last.src_head + last.num_heads == head - s_start
                    and last.dst_head + last.num_heads == head - d_start):
                slices[-1] = HeadSlice(src, dst, last.src_head, last.dst_head, last.num_heads + 1)
            else:
                slices.append(HeadSlice(src, dst, head - s_start, head - d_start, 1))
    return slices


def _holds(num_kv_heads: int, tp: int, rank: int, head: int) -> bool:
    start, count = local_kv_heads(num_kv_heads, tp, rank)
    return start <= head < start + count


def links_needed(num_kv_heads: int, src_tp: int, dst_tp: int) -> set[tuple[int, int]]:
    return {(s.src_rank, s.dst_rank) for s in plan_heads(num_kv_heads, src_tp, dst_tp)}


def links_needed_sp(num_kv_heads: int, src_tp: int, dst_tp: int, src_sp: int) -> set[tuple[int, int]]:
    """Links of an SP × TP prefill instance: its rank sp_rank·TP + tp_rank plays the TP plan's prefill rank tp_rank
    once per SP rank (each SP rank holds different tokens of the same heads)."""
    pairs = links_needed(num_kv_heads, src_tp, dst_tp)
    return {(s * src_tp + p, q) for s in range(src_sp) for p, q in pairs}


# ------------------------------------------------------------------------------- pipeline stages: layer ranges

def stage_layers(num_layers: int, pp: int) -> list[range]:
    """The contiguous layers of each of `pp` stages, balanced: the first num_layers % pp stages take one more
    (the last stage also carries the LM head)."""
    if pp > num_layers:
        raise ValueError(f"pp: {pp} stages cannot split {num_layers} layers (each stage needs at least one)")
    per, extra = divmod(num_layers, pp)
    bounds = [0]
    for stage in range(pp):
        bounds.append(bounds[-1] + per + (stage < extra))
    return [range(a, b) for a, b in pairwise(bounds)]


@dataclass(frozen=True)
class LayerSpan:
    """`count` layers moving on one link: they start at index `src_first` of the prefill rank's cache layers and
    at `dst_first` of the decode rank's (each stage's cache holds only its own layers)."""

    src_first: int
    dst_first: int
    count: int


def stage_pairs(num_layers: int, src_pp: int, dst_pp: int) -> list[tuple[int, int, LayerSpan]]:
    """(prefill stage, decode stage, the layers they share) for every pair of stages whose layers overlap."""
    pairs = []
    for ps, src in enumerate(stage_layers(num_layers, src_pp)):
        for ds, dst in enumerate(stage_layers(num_layers, dst_pp)):
            lo, hi = max(src.start, dst.start), min(src.stop, dst.stop)
            if lo < hi:
                pairs.append((ps, ds, LayerSpan(lo - src.start, lo - dst.start, hi - lo)))
    return pairs


def links_needed_pp(num_kv_heads: int, num_layers: int, src_tp: int, src_sp: int, src_pp: int, dst_tp: int,
                    dst_pp: int) -> set[tuple[int, int]]:
    """Links of any (TP, SP, PP) prefill -> (TP, PP) decode pair: a prefill rank links to the decode ranks that
    hold some of its layers and heads."""
    if src_pp == 1 and dst_pp == 1:
        return links_needed_sp(num_kv_heads, src_tp, dst_tp, src_sp)
    pairs = links_needed_sp(num_kv_heads, src_tp, dst_tp, src_sp)
    return {(ps * src_sp * src_tp + p, ds * dst_tp + q) for ps, ds, _ in stage_pairs(num_layers, src_pp, dst_pp)
            for p, q in pairs}


# ---------------------------------------------------------------- sequence-parallel prefill: whole-block zigzag
# Under SP a prompt is padded to a multiple of 2·SP·block_size before zigzag sharding, so every zigzag chunk is a
# whole number of blocks and every KV block of the prompt is written by exactly one SP rank. The block-granular
# transfer then needs no token-level variant: each SP rank pushes its own blocks.


def sp_padded_len(num_tokens: int, block_size: int, sp: int) -> int:
    unit = 2 * sp * block_size
    return -(-num_tokens // unit) * unit


def sp_block_owners(num_tokens: int, block_size: int, sp: int) -> list[int]:
    """The SP rank that writes each of the prompt's ceil(num_tokens / block_size) blocks."""
    chunk_blocks = sp_padded_len(num_tokens, block_size, sp) // (2 * sp * block_size)
    owners = []
    for block in range(-(-num_tokens // block_size)):
        chunk = block // chunk_blocks
        owners.append(chunk if chunk < sp else 2 * sp - 1 - chunk)
    return owners


# ------------------------------------------------------------------------------------------ one step's orders

@dataclass(frozen=True)
class DecodeTarget:
    """Where one request's KV goes: the decode instance, its TP degree, the blocks it reserved, and the transfer
    id it issued for them (unique among that instance's transfers; it names the transfer on the wire).
    `cached_blocks`: the first blocks of the table already hold this prompt's KV (the decode side's prefix cache),
    so only the blocks after them are sent."""

    instance: str
    tp: int
    block_table: tuple[int, ...]
    transfer_id: int
    cached_blocks: int = 0
    pp: int = 1


@dataclass(frozen=True)
class PrefillLayout:
    name: str
    tp: int
    sp: int
    num_kv_heads: int
    block_size: int
    pp: int = 1
    num_layers: int = 0  # needed when either side is pipeline-parallel


@dataclass
class TransferOrder:
    """One request's KV from one prefill rank to one decode rank (metadata only)."""

    transfer_id: int
    link: LinkId
    src_blocks: list[int]
    dst_blocks: list[int]
    slices: list[HeadSlice]
    layers: LayerSpan | None = None  # None: every layer, when neither side is pipeline-parallel


def transfer_orders(layout: PrefillLayout, num_tokens: int, src_table: list[int],
                    target: DecodeTarget) -> list[TransferOrder]:
    """Every prefill rank's share of one request's KV: the blocks the decode side does not hold yet. Under SP each
    block was written by one SP rank, which pushes it; SP rank s owns global ranks s·TP + p. A rank that has no
    block to send (a short prompt, or a prefix cached on the decode side) still gets an empty order: the decode
    side expects one completion per link. With pipeline stages on either side, each pair of stages that share
    layers gets the same orders between their ranks, for the layers they share."""
    used = -(-num_tokens // layout.block_size)
    src, dst = src_table[:used], list(target.block_table[:used])
    plan = plan_heads(layout.num_kv_heads, layout.tp, target.tp)
    owners = sp_block_owners(num_tokens, layout.block_size, layout.sp)
    stages = ([(0, 0, None)] if layout.pp == 1 and target.pp == 1
              else stage_pairs(layout.num_layers, layout.pp, target.pp))
    orders = []
    for ps, ds, span in stages:
        for s in range(layout.sp):
            mine = [i for i, owner in enumerate(owners) if owner == s and i >= target.cached_blocks]
            for p, q in sorted({(h.src_rank, h.dst_rank) for h in plan}):
                link = LinkId(layout.name, (ps * layout.sp + s) * layout.tp + p, target.instance, ds * target.tp + q)
                slices = [h for h in plan if (h.src_rank, h.dst_rank) == (p, q)]
                orders.append(TransferOrder(target.transfer_id, link, [src[i] for i in mine],
                                            [dst[i] for i in mine], slices, span))
    return orders
