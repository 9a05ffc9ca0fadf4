"""What sequence-parallel attention sends (ring, TokenRing, all-gather): the one cost formula that the latency model
charges and that `comm.sequence_parallel`'s messages are tested against. Pure Python.

It lives in placement/ because placement is a leaf that imports neither torch nor ray (cluster -> placement):
comm importing this torch-free module adds no torch to the planner, whereas the planner importing comm would tie
its purity to the data-plane package.

Cost per attention layer (S = tokens of the packed batch after zigzag padding, T = S/N per rank, b = bytes per
element of q/k/v, lse always float32, all ranks together; a message is one isend):

    ring        bytes    (N−1)·S·2·Hkv·d·b                              messages N(N−1)   (K and V in one message)
    token_ring  bytes    (N−1)·S·H·d·b  +  f·(N−1)·S·H·(d·b + 4)       messages 2N(N−1)  (Q out, (out, lse) back)
                f = 3/4 causal (under zigzag half of the results cover only the Q back chunk), 1 non-causal
    all-gather  bytes    (N−1)·S·2·Hkv·d·b as a ring all-gather; no overlap with compute, full K/V held per rank

Per token and step, ring moves 2·Hkv·d·b while causal TokenRing moves H·d·b + ¾·H·(d·b + 4), so TokenRing moves
fewer bytes only when H/Hkv < 2·d·b / (1.75·d·b + 3) ≈ 8/7: plain multi-head attention. For any GQA ratio ≥ 2
(and always non-causal) ring moves fewer. On a full-duplex link TokenRing's busiest direction per step carries
T·H·(d·b + 4) against ring's T·2·Hkv·d·b, so its step is shorter only for MHA too; GQA 2 is roughly a tie.
"""
from __future__ import annotations

ALGORITHMS = ("ring", "token_ring")
COST_ALGORITHMS = ALGORITHMS + ("all_gather",)
LSE_BYTES = 4  # the log-sum-exp that TokenRing sends back is kept in float32


def result_bytes(rows: float, heads: float, head_dim: int, dtype_bytes: int) -> float:
    """TokenRing results of `rows` query tokens on the wire: their outputs plus one float32 lse per head."""
    return rows * heads * (head_dim * dtype_bytes + LSE_BYTES)


def step_bytes(algorithm: str, tokens: float, heads: float, kv_heads: float, head_dim: int,
               dtype_bytes: int) -> tuple[float, float]:
    """(forward, backward) bytes for `tokens` tokens of one rank's shard in one ring step of one layer.

    Ring (and a ring all-gather) rotates K and V one way; TokenRing keeps K/V put, sends Q one way and
    (out, lse) back the other, so it loads both directions of a full-duplex link.
    """
    if algorithm not in COST_ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {COST_ALGORITHMS}, got {algorithm!r}")
    if algorithm == "token_ring":
        return tokens * heads * head_dim * dtype_bytes, result_bytes(tokens, heads, head_dim, dtype_bytes)
    return tokens * 2 * kv_heads * head_dim * dtype_bytes, 0


def _check_layer_args(algorithm: str, n: int, s: int) -> None:
    if algorithm not in COST_ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {COST_ALGORITHMS}, got {algorithm!r}")
    if n < 1 or s < 0 or s % (2 * n):
        raise ValueError(f"S: the padded batch ({s} tokens) must be a multiple of 2·N = {2 * n}")


def bytes_per_layer(algorithm: str, N: int, S: int, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int,
                    causal: bool = True) -> int:
    """Bytes all N ranks send together in one attention layer; S counts the batch after zigzag padding."""
    _check_layer_args(algorithm, N, S)
    sent = (N - 1) * S  # every token's K/V (ring) or Q (TokenRing) visits the N − 1 other ranks
    forward, _ = step_bytes(algorithm, sent, heads, kv_heads, head_dim, dtype_bytes)
    if algorithm != "token_ring":
        return forward
    result_rows = sent * 3 // 4 if causal else sent
    return forward + result_bytes(result_rows, heads, head_dim, dtype_bytes)


def messages_per_layer(algorithm: str, N: int, S: int = 0, heads: int = 0, kv_heads: int = 0, head_dim: int = 0,
                       dtype_bytes: int = 0, causal: bool = True) -> int:
    """Point-to-point messages all ranks send in one layer (the shape arguments do not change the count)."""
    _check_layer_args(algorithm, N, S)
    return (2 if algorithm == "token_ring" else 1) * N * (N - 1)


def step_link_bytes(algorithm: str, N: int, S: int, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int,
                    causal: bool = True) -> int:
    """Bytes on the busiest one-way link in one ring step (what bounds a step's transfer time)."""
    _check_layer_args(algorithm, N, S)
    if N == 1:
        return 0
    # Under TokenRing some rank sends a full-size result in every step (rank 0 from step 1 on); Q goes the other way.
    return max(step_bytes(algorithm, S // N, heads, kv_heads, head_dim, dtype_bytes))


def fewer_bytes(N: int, S: int, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int,
                causal: bool = True) -> str:
    """The SP algorithm that moves fewer bytes per layer for this shape (ring on a tie)."""
    args = (N, S, heads, kv_heads, head_dim, dtype_bytes, causal)
    return min(ALGORITHMS, key=lambda a: bytes_per_layer(a, *args))


def shorter_step(heads: float, kv_heads: float, head_dim: int, dtype_bytes: int) -> str:
    """The SP algorithm whose busiest link direction carries fewer bytes per token (ring on a tie)."""
    return min(ALGORITHMS, key=lambda a: max(step_bytes(a, 1.0, heads, kv_heads, head_dim, dtype_bytes)))
