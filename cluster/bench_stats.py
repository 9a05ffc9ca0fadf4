"""What `splitserve bench` measures: one record per request as the client saw it, and the report of a run
(throughput, latency distributions, goodput and SLO attainment)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from splitserve.placement.percentiles import percentile

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What the client saw of one request. `error` is the gRPC status code name (or FINISH_ABORT / INCOMPLETE)."""

    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens the server found in its prefix cache

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; 0 for a one-token output."""
        if not self.ok:
            return None
        if self.output_tokens <= 1:
            return 0.0
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def distribution_ms(values_s: Sequence[float]) -> dict:
    """mean and p50/p90/p99 in milliseconds (None with no samples)."""
    if not values_s:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}, "count": 0}
    ms = [v * 1e3 for v in values_s]
    return {"mean": sum(ms) / len(ms), **{f"p{q}": percentile(ms, q) for q in PERCENTILES}, "count": len(ms)}


def meets_slo(record: RequestRecord, slo_ttft_s: float | None, slo_tpot_s: float | None) -> bool:
    """Completed, and inside both targets (an unset target always holds)."""
    if not record.ok:
        return False
    return ((slo_ttft_s is None or record.ttft_s <= slo_ttft_s)
            and (slo_tpot_s is None or record.tpot_s <= slo_tpot_s))


def summarize(records: Sequence[RequestRecord], duration_s: float, slo_ttft_s: float | None = None,
              slo_tpot_s: float | None = None) -> dict:
    """The report of one run. TPOT statistics cover requests with more than one output token; ITLs are pooled
    over requests; attainment is over all requests, failed ones counting as missed."""
    done = [r for r in records if r.ok]
    good = sum(meets_slo(r, slo_ttft_s, slo_tpot_s) for r in records)
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    return {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": dict(Counter(r.error for r in records if not r.ok)),
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "cached_input_tokens": sum(r.cached_tokens for r in done),
        "prefix_hit_rate": sum(r.cached_tokens for r in done) / in_tokens if in_tokens else 0.0,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(out_tokens),
        "total_token_throughput": per_s(in_tokens + out_tokens),
        "slo_ttft_ms": None if slo_ttft_s is None else slo_ttft_s * 1e3,
        "slo_tpot_ms": None if slo_tpot_s is None else slo_tpot_s * 1e3,
        "good_requests": good,
        "goodput": per_s(good),
        "slo_attainment": good / len(records) if records else 0.0,
        "ttft_ms": distribution_ms([r.ttft_s for r in done]),
        "tpot_ms": distribution_ms([r.tpot_s for r in done if r.output_tokens > 1]),
        "itl_ms": distribution_ms([gap for r in done for gap in r.itl_s]),
        "e2e_ms": distribution_ms([r.e2e_s for r in done]),
    }
