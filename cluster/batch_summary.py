"""The counts and latencies a batch job collects as it runs, and the summary it prints at the end."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from splitserve.placement.percentiles import percentile

PERCENTILES = (50, 90, 99)


@dataclass
class Stats:
    """Running counts of a job (lines done, failed, skipped as already in the output, invalid) and the TTFT and
    end-to-end latencies of its successful requests."""

    started: float = field(default_factory=time.monotonic)
    done: int = 0
    failed: int = 0
    skipped: int = 0
    invalid: int = 0
    in_flight: int = 0
    output_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)

    @property
    def lines_seen(self) -> int:
        return self.done + self.failed + self.skipped + self.invalid

    def summary(self, interrupted: bool) -> dict:
        wall = time.monotonic() - self.started
        return {"requests": {"done": self.done, "failed": self.failed, "skipped": self.skipped,
                             "invalid_lines": self.invalid},
                "output_tokens": self.output_tokens, "wall_s": round(wall, 3),
                "output_tokens_per_s": round(self.output_tokens / wall, 2) if wall > 0 else 0.0,
                "ttft_s": _percentiles(self.ttft_s), "e2e_s": _percentiles(self.e2e_s), "interrupted": interrupted}


def _percentiles(values: list[float]) -> dict:
    """p50/p90/p99 in seconds, rounded to the microsecond; None without values."""
    if not values:
        return {f"p{q}": None for q in PERCENTILES}
    return {f"p{q}": round(percentile(values, q), 6) for q in PERCENTILES}


def format_summary(summary: dict, errors_path: Path) -> str:
    """The lines printed at the end of a job."""
    r = summary["requests"]

    def ms(p):
        return " / ".join("-" if p[k] is None else f"{p[k] * 1e3:.1f}" for k in ("p50", "p90", "p99"))

    lines = [f"batch: {r['done']} done, {r['failed']} failed, {r['skipped']} skipped (already in the output), "
             f"{r['invalid_lines']} invalid lines in {summary['wall_s']:.2f}s"
             + (" (interrupted)" if summary["interrupted"] else ""),
             f"batch: {summary['output_tokens']} output tokens, {summary['output_tokens_per_s']:.1f} tok/s",
             f"batch: TTFT p50 / p90 / p99 {ms(summary['ttft_s'])} ms; E2E p50 / p90 / p99 {ms(summary['e2e_s'])} ms"]
    if r["invalid_lines"]:
        lines.append(f"batch: invalid lines are listed in {errors_path}")
    if r["failed"]:
        lines.append("batch: failed requests are in the output with their error; rerun with --retry-failed to "
                     "run them again")
    return "\n".join(lines)
