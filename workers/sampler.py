"""Turns a batch of next-token logits into token ids: penalties, min_tokens masking, greedy or
temperature / top-k / top-p / min-p sampling with optional per-request seeds. Works in float32."""
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from splitserve.workers.sampling_params import SamplingParams

_NEG_INF = float("-inf")
FAILED_TOKEN = -1  # stands for a token that could not be sampled; the request fails, the batch goes on
_MASK64 = 0xFFFF_FFFF_FFFF_FFFF
_FLOAT32_MAX = torch.finfo(torch.float32).max
MIN_TEMPERATURE = 1e-6


@dataclass
class SampleRequest:
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None  # for a seeded request, seeded by (seed, position); None: the global RNG


def position_seed(seed: int, position: int) -> int:
    """A 64-bit seed for the draw at one output position (splitmix64 of seed and position): well spread, and the
    same in every process."""
    z = (seed * 0x9E37_79B9_7F4A_7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB) & _MASK64
    return z ^ (z >> 31)


def make_generator(seed: int | None, device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)  # negative seeds are valid user input
    return generator


def _per_row(value, logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=logits.device, dtype=dtype).reshape(-1)
    return torch.full((logits.shape[0],), value, device=logits.device, dtype=dtype)


def apply_top_k(logits: torch.Tensor, k) -> torch.Tensor:
    """Keep each row's k largest logits (ties with the k-th are kept); k <= 0 leaves a row as is."""
    k = _per_row(k, logits, torch.long)
    vocab = logits.shape[-1]
    off = (k <= 0) | (k >= vocab)
    if bool(off.all()):
        return logits
    ranked = logits.sort(dim=-1, descending=True).values
    kth = ranked.gather(-1, (k.clamp(1, vocab) - 1).unsqueeze(-1))
    kth = kth.masked_fill(off.unsqueeze(-1), _NEG_INF)
    return logits.masked_fill(logits < kth, _NEG_INF)


def apply_top_p(logits: torch.Tensor, p) -> torch.Tensor:
    """Keep the fewest top tokens whose probability mass reaches p (ties with the last kept token
    are kept); p >= 1 leaves a row as is."""
    p = _per_row(p, logits, torch.float32)
    off = p >= 1.0
    if bool(off.all()):
        return logits
    ranked = logits.sort(dim=-1, descending=True).values
    probs = ranked.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # mass_before is non-decreasing, so `keep` is a prefix; its first entry is always True (p > 0).
    num_keep = (mass_before < p.unsqueeze(-1)).sum(dim=-1).clamp(min=1)
    threshold = ranked.gather(-1, (num_keep - 1).unsqueeze(-1))
    threshold = threshold.masked_fill(off.unsqueeze(-1), _NEG_INF)
    return logits.masked_fill(logits < threshold, _NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability."""
    min_p = _per_row(min_p, logits, torch.float32)
    if not bool((min_p > 0).any()):
        return logits
    probs = logits.softmax(dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(-1)
    return logits.masked_fill(probs < threshold, _NEG_INF)


def apply_penalties(row: torch.Tensor, params: SamplingParams,
                    prompt_ids: Sequence[int], output_ids: Sequence[int]) -> None:
    """In place on one float32 row: HF-style repetition penalty over prompt + output, OpenAI-style
    presence / frequency penalties over the output."""
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(list(prompt_ids) + list(output_ids), dtype=torch.long, device=row.device)
        seen = seen.unique()
        values = row[seen]
        pen = params.repetition_penalty
        row[seen] = torch.where(values > 0, values / pen, values * pen)
    if output_ids and (params.presence_penalty != 0.0 or params.frequency_penalty != 0.0):
        out = torch.tensor(list(output_ids), dtype=torch.long, device=row.device)
        counts = torch.bincount(out, minlength=row.shape[0]).to(row.dtype)
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)


def _has_penalties(params: SamplingParams) -> bool:
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)


class Sampler:

    def __init__(self, eos_token_ids: Iterable[int]):
        self.eos_token_ids = tuple(eos_token_ids)

    def __call__(self, logits: torch.Tensor, requests: Sequence[SampleRequest]) -> list[int]:
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits must be [num_requests={len(requests)}, vocab], "
                             f"got {tuple(logits.shape)}")
        if all(r.params.greedy and not self._needs_row_edit(r) for r in requests):
            return logits.argmax(dim=-1).tolist()  # argmax is exact in any float dtype
        logits = logits.to(torch.float32, copy=True)
        for i, r in enumerate(requests):
            if self._needs_row_edit(r):
                apply_penalties(logits[i], r.params, r.prompt_token_ids, r.output_token_ids)
                # Extreme (valid) penalties can overflow: keep the row orderable and free of nan.
                logits[i].nan_to_num_(nan=_NEG_INF, posinf=_FLOAT32_MAX, neginf=_NEG_INF)
                self._mask_early_stop(logits[i], r)
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, r in enumerate(requests) if not r.params.greedy]
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            tokens[rows] = self._sample(logits[rows], [requests[i] for i in sampled])
        return tokens.tolist()

    def _needs_row_edit(self, r: SampleRequest) -> bool:
        return _has_penalties(r.params) or len(r.output_token_ids) < r.params.min_tokens

    def _mask_early_stop(self, row: torch.Tensor, r: SampleRequest) -> None:
        if len(r.output_token_ids) >= r.params.min_tokens:
            return
        ids = list(r.params.stop_token_ids)
        if not r.params.ignore_eos:
            ids += self.eos_token_ids
        ids = [i for i in ids if i < row.shape[0]]
        if ids:
            row[torch.tensor(ids, dtype=torch.long, device=row.device)] = _NEG_INF

    def _sample(self, logits: torch.Tensor, requests: list[SampleRequest]) -> torch.Tensor:
        def column(name, dtype, limit=None):
            values = [getattr(r.params, name) for r in requests]
            if limit is not None:
                values = [min(v, limit) for v in values]
            return torch.tensor(values, dtype=dtype, device=logits.device)
        # Shift by the row max first so a tiny temperature cannot overflow to inf - inf = nan.
        logits = logits - logits.max(dim=-1, keepdim=True).values
        # A temperature below MIN_TEMPERATURE (but above 0) samples as if it were MIN_TEMPERATURE: effectively
        # greedy, without dividing by a float32 zero.
        # One past float32's largest would become inf, and a masked -inf / inf is nan: cap it (the draw is then
        # uniform over the allowed tokens either way).
        temperature = column("temperature", torch.float32, limit=_FLOAT32_MAX)
        logits = logits / temperature.clamp(min=MIN_TEMPERATURE).unsqueeze(-1)
        logits = apply_top_k(logits, column("top_k", torch.long))
        logits = apply_top_p(logits, column("top_p", torch.float32))
        logits = apply_min_p(logits, column("min_p", torch.float32))
        probs = logits.softmax(dim=-1)
        out = torch.empty(len(requests), dtype=torch.long, device=logits.device)
        unseeded = [i for i, r in enumerate(requests) if r.generator is None]
        if unseeded:
            idx = torch.tensor(unseeded, device=logits.device)
            out[idx] = torch.multinomial(probs[idx], 1).squeeze(-1)
        for i, r in enumerate(requests):
            # One draw per seeded request, so its tokens do not depend on the rest of the batch.
            if r.generator is not None:
                out[i] = torch.multinomial(probs[i], 1, generator=r.generator)[0]
        return out
