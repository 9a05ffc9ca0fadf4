"""Fitted latency profiles: DistServe's functional forms fitted to repeated measurements (median per shape,
outlier-robust, non-negative; `robust_fit`), stored as JSON with each coefficient's bootstrap interval, used as a
LatencyModel in place of (or on top of) the analytic defaults.

prefill(ms) = a + b·Σl + c·Σl²     decode step(ms) = a + b·Σctx + c·batch

Entries are keyed by layout (tp, pp, sp); an SP layout (prefill only) has no decode fit. A pipeline depth the profile
did not time is derived from the depths it did (see `ProfileLatency`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from splitserve.placement.latency import LatencyModel
from splitserve.placement.linalg import least_squares
from splitserve.placement.parallel import Parallel
from splitserve.placement.robust_fit import FitReport, fit_shapes, group

FORMAT = "splitserve-profile/1"


@dataclass(frozen=True)
class Coefficients:
    """(a, b, c) in seconds; the JSON file stores milliseconds like DistServe's tables."""

    a: float
    b: float
    c: float

    def to_ms(self) -> dict[str, float]:
        return {"a": self.a * 1e3, "b": self.b * 1e3, "c": self.c * 1e3}

    @classmethod
    def from_ms(cls, data: Any, field: str) -> "Coefficients":
        if not isinstance(data, Mapping) or set(data) != {"a", "b", "c"}:
            raise ValueError(f"{field}: expected {{a, b, c}} in milliseconds, got {data!r}")
        for key in "abc":
            if not isinstance(data[key], (int, float)):
                raise ValueError(f"{field}.{key}: expected a number, got {data[key]!r}")
        return cls(data["a"] / 1e3, data["b"] / 1e3, data["c"] / 1e3)


def _prefill_features(lengths: Sequence[int], prefixes: Sequence[int] | None) -> list[float]:
    # A chunk after p cached tokens costs like the l² term of a prompt c²+2cp long: the same attention pairs.
    if prefixes is None:
        square = sum(l * l for l in lengths)
    else:
        square = sum(l * l + 2 * l * p for l, p in zip(lengths, prefixes))
    return [1.0, float(sum(lengths)), float(square)]


@dataclass(frozen=True)
class Uncertainty:
    """How well a phase's coefficients are known: a bootstrap interval per coefficient (seconds)."""

    low: Coefficients
    high: Coefficients
    level: float
    shapes: int
    samples: int
    relative_residual: float
    draws: tuple[Coefficients, ...] = field(default=(), compare=False, repr=False)  # bootstrap fits; not saved

    @classmethod
    def of(cls, report: FitReport) -> "Uncertainty":
        return cls(Coefficients(*report.low), Coefficients(*report.high), report.level, report.shapes,
                   report.samples, report.relative_residual, tuple(Coefficients(*d) for d in report.draws))

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.low.to_ms(), self.high.to_ms()
        return {"ci_ms": {k: [lo[k], hi[k]] for k in "abc"}, "level": self.level, "shapes": self.shapes,
                "samples": self.samples, "relative_residual": self.relative_residual}

    @classmethod
    def from_dict(cls, data: Any, field: str) -> "Uncertainty":
        try:
            ci = data["ci_ms"]
            low = Coefficients.from_ms({k: ci[k][0] for k in "abc"}, f"{field}.ci_ms")
            high = Coefficients.from_ms({k: ci[k][1] for k in "abc"}, f"{field}.ci_ms")
            return cls(low, high, float(data["level"]), int(data["shapes"]), int(data["samples"]),
                       float(data["relative_residual"]))
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(f"{field}: expected ci_ms {{a, b, c: [low, high]}}, level, shapes, samples and "
                             f"relative_residual ({exc!r})") from exc


def fit_prefill_report(samples: Sequence[tuple[Sequence[int], float]], resamples: int = 200,
                       seed: int = 0) -> tuple[Coefficients, Uncertainty]:
    """samples: (prompt lengths of one batch, measured seconds); repeats of a batch are separate samples."""
    rows = [_prefill_features(lengths, None) for lengths, _ in samples]
    report = fit_shapes(group(rows, [t for _, t in samples]), resamples, seed=seed)
    return Coefficients(*report.coefficients), Uncertainty.of(report)


def fit_decode_report(samples: Sequence[tuple[int, int, float]], resamples: int = 200,
                      seed: int = 0) -> tuple[Coefficients, Uncertainty]:
    """samples: (batch size, total context tokens, measured seconds per step); repeats are separate samples."""
    rows = [[1.0, float(ctx), float(batch)] for batch, ctx, _ in samples]
    report = fit_shapes(group(rows, [t for *_, t in samples]), resamples, seed=seed)
    return Coefficients(*report.coefficients), Uncertainty.of(report)


def fit_prefill(samples: Sequence[tuple[Sequence[int], float]]) -> Coefficients:
    """The robust fit alone (no bootstrap)."""
    return fit_prefill_report(samples, resamples=0)[0]


def fit_decode(samples: Sequence[tuple[int, int, float]]) -> Coefficients:
    """The robust fit alone (no bootstrap)."""
    return fit_decode_report(samples, resamples=0)[0]


@dataclass(frozen=True)
class Overhead:
    """What a layout adds to a forward over the same forward at TP 1, SP 1, PP 1: `fixed` seconds (forward overheads,
    collective and point-to-point latency) plus `per_token` seconds (moving one token's activations, K/V or queries).
    For pipeline stages, `fit_pipeline_hop` gives one stage's share."""

    fixed: float
    per_token: float
    shapes: int

    def to_dict(self) -> dict[str, Any]:
        return {"fixed_ms": self.fixed * 1e3, "per_token_us": self.per_token * 1e6, "shapes": self.shapes}


def fit_overhead(samples: Sequence[tuple[int, float, float]]) -> Overhead:
    """The added cost from forwards timed at the base layout and at another: (tokens, base seconds, seconds the
    layout added) per shape, fitted as fixed + per_token·tokens by least squares on errors relative to the base
    time, so that a long forward's noise (a few % of it) does not swamp the overhead (a small part of it)."""
    if len({tokens for tokens, *_ in samples}) < 2:
        raise ValueError("samples: the overhead fit needs forwards of at least two token counts")
    if any(not base > 0 for _, base, _ in samples):
        raise ValueError("samples: base times must be positive")
    rows = [[1.0 / base, tokens / base] for tokens, base, _ in samples]
    fixed, per_token = least_squares(rows, [added / base for _, base, added in samples])
    return Overhead(fixed, per_token, len(samples))


def fit_pipeline_hop(samples: Sequence[tuple[int, float, float]], pp: int) -> Overhead:
    """The per-hop cost from single-sequence forwards timed at PP 1 and at `pp` stages: (tokens, PP 1 seconds,
    seconds the stages added) per shape, the added seconds / (pp − 1) fitted by `fit_overhead`. Single sequences,
    because a batch of several flows as micro-batches whose stages overlap."""
    if pp < 2:
        raise ValueError(f"pp: the hop cost needs at least 2 stages, got {pp}")
    if len({tokens for tokens, *_ in samples}) < 2:
        raise ValueError("samples: the hop fit needs single-sequence forwards of at least two token counts")
    return fit_overhead([(tokens, base, added / (pp - 1)) for tokens, base, added in samples])


@dataclass(frozen=True)
class ProfileEntry:
    """One layout's fits. Sequence parallelism runs prefill only, so an SP layout has no decode fit."""

    par: Parallel
    prefill: Coefficients | None
    decode: Coefficients | None
    uncertainty: Mapping[str, Uncertainty] | None = None  # phase -> how well its fit is known

    def __post_init__(self) -> None:
        if self.prefill is None and self.decode is None:
            raise ValueError("prefill: an entry needs prefill or decode coefficients")
        if self.par.sp > 1 and self.decode is not None:
            raise ValueError(f"decode: sequence parallelism runs prefill only; an sp {self.par.sp} layout has no "
                             "decode fit")
        for phase in self.uncertainty or {}:
            if phase not in ("prefill", "decode") or getattr(self, phase) is None:
                raise ValueError(f"uncertainty.{phase}: no {phase} fit to qualify")


@dataclass(frozen=True)
class Profile:
    model: str
    hardware: str
    entries: tuple[ProfileEntry, ...]

    def entry(self, par: Parallel) -> ProfileEntry | None:
        for entry in self.entries:
            if entry.par == par:
                return entry
        return None

    def to_dict(self) -> dict[str, Any]:
        def one(e: ProfileEntry) -> dict[str, Any]:
            out: dict[str, Any] = {"tp": e.par.tp, "pp": e.par.pp, "sp": e.par.sp, "sp_algorithm": e.par.sp_algorithm}
            if e.prefill:
                out["prefill"] = e.prefill.to_ms()
            if e.decode:
                out["decode"] = e.decode.to_ms()
            if e.uncertainty:
                out["uncertainty"] = {phase: u.to_dict() for phase, u in e.uncertainty.items()}
            return out

        return {"format": FORMAT, "model": self.model, "hardware": self.hardware, "unit": "ms",
                "entries": [one(e) for e in self.entries]}

    @classmethod
    def from_dict(cls, data: Any) -> "Profile":
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ValueError(f"profile: expected a JSON object with format {FORMAT!r}")
        if data.get("unit", "ms") != "ms":
            raise ValueError(f"profile.unit: only 'ms' is supported, got {data.get('unit')!r}")
        entries = []
        for i, raw in enumerate(data.get("entries") or []):
            field = f"profile.entries[{i}]"
            if not isinstance(raw, Mapping):
                raise ValueError(f"{field}: expected an object")
            try:
                par = Parallel(tp=raw.get("tp", 1), pp=raw.get("pp", 1), sp=raw.get("sp", 1),
                               sp_algorithm=raw.get("sp_algorithm", "none"))
            except ValueError as exc:
                raise ValueError(f"{field}.{exc}") from None
            prefill = Coefficients.from_ms(raw["prefill"], f"{field}.prefill") if "prefill" in raw else None
            decode = Coefficients.from_ms(raw["decode"], f"{field}.decode") if "decode" in raw else None
            raw_u = raw.get("uncertainty") or {}
            if not isinstance(raw_u, Mapping) or not set(raw_u) <= {"prefill", "decode"}:
                raise ValueError(f"{field}.uncertainty: expected an object with prefill and/or decode")
            uncertainty = {phase: Uncertainty.from_dict(u, f"{field}.uncertainty.{phase}")
                           for phase, u in raw_u.items()} or None
            try:
                entries.append(ProfileEntry(par, prefill, decode, uncertainty))
            except ValueError as exc:
                raise ValueError(f"{field}.{exc}") from None
        if not entries:
            raise ValueError("profile.entries: empty")
        return cls(model=str(data.get("model", "")), hardware=str(data.get("hardware", "")), entries=tuple(entries))

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "Profile":
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_dict(json.load(f))
        except FileNotFoundError as exc:
            raise ValueError(f"profile: file {path!r} not found") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"profile: {path} is not valid JSON ({exc})") from exc


def _abc(k: Coefficients) -> tuple[float, float, float]:
    return k.a, k.b, k.c


class ProfileLatency:
    """Fitted times for the layouts the profile covers; `fallback` (usually the analytic model) for the rest
    and for KV transfer, which a compute profile does not measure.

    A pipeline depth the profile did not time, for a (tp, sp) whose PP 1 it did: with deeper pipelines timed too,
    PP 1's fit plus each extra stage's share of the timed difference (interpolated between timed depths; past the
    deepest, never less than that depth); with PP 1 alone, PP 1's time plus what the fallback says the stages add.
    """

    def __init__(self, profile: Profile, fallback: LatencyModel | None = None):
        self.profile = profile
        self.fallback = fallback
        self._fits: dict[tuple[Parallel, str], Coefficients | None] = {}

    def covers(self, par: Parallel, phase: str) -> bool:
        entry = self.profile.entry(par)
        return entry is not None and getattr(entry, phase) is not None

    def _measured(self, par: Parallel, phase: str) -> Coefficients | None:
        entry = self.profile.entry(par)
        return getattr(entry, phase) if entry else None

    def _derived(self, par: Parallel, phase: str) -> Coefficients | None:
        """Coefficients at an untimed pipeline depth from the timed ones of the same (tp, sp), or None."""
        base = self._measured(dataclasses.replace(par, pp=1), phase)
        timed = sorted((e.par.pp, getattr(e, phase)) for e in self.profile.entries
                       if e.par.pp > 1 and getattr(e, phase) is not None
                       and dataclasses.replace(e.par, pp=1) == dataclasses.replace(par, pp=1))
        if base is None or par.pp == 1 or not timed:
            return None
        low, k_low = max(((d, k) for d, k in timed if d < par.pp), default=(1, base), key=lambda t: t[0])
        above = [(d, k) for d, k in timed if d > par.pp]
        if above:  # between two timed depths (PP 1 the lowest)
            high, k_high = above[0]
            hop = [(x - y) / (high - low) for x, y in zip(_abc(k_high), _abc(k_low))]
        else:  # past the deepest: its stages' average cost, never a saving
            hop = [max(0.0, (x - y) / (low - 1)) for x, y in zip(_abc(k_low), _abc(base))]
        return Coefficients(*(x + (par.pp - low) * h for x, h in zip(_abc(k_low), hop)))

    def _coefficients(self, par: Parallel, phase: str) -> Coefficients | None:
        key = (par, phase)
        if key not in self._fits:
            self._fits[key] = self._measured(par, phase) or self._derived(par, phase)
        coefficients = self._fits[key]
        if coefficients is None and self.fallback is None:
            raise ValueError(f"profile: no {phase} fit for {par.label()} and no analytic fallback")
        return coefficients

    def _stages_from_fallback(self, par: Parallel, phases: tuple[str, ...]) -> Parallel | None:
        """PP 1 of `par` when the profile times it (each of `phases`) and only the stages must come from the
        fallback; None when the fallback answers for the whole layout."""
        single = dataclasses.replace(par, pp=1)
        if par.pp > 1 and all(self._measured(single, phase) for phase in phases):
            return single
        return None

    def prefill_time(self, lengths: Sequence[int], par: Parallel, prefixes: Sequence[int] | None = None) -> float:
        k = self._coefficients(par, "prefill")
        if k is None:
            single = self._stages_from_fallback(par, ("prefill",))
            if single is None:
                return self.fallback.prefill_time(lengths, par, prefixes)
            return (self.prefill_time(lengths, single, prefixes) + self.fallback.prefill_time(lengths, par, prefixes)
                    - self.fallback.prefill_time(lengths, single, prefixes))
        _, total, square = _prefill_features(lengths, prefixes)
        return k.a + k.b * total + k.c * square

    def decode_time(self, batch: int, total_context: int, par: Parallel) -> float:
        k = self._coefficients(par, "decode")
        if k is None:
            single = self._stages_from_fallback(par, ("decode",))
            if single is None:
                return self.fallback.decode_time(batch, total_context, par)
            stages = (self.fallback.decode_time(batch, total_context, par)
                      - self.fallback.decode_time(batch, total_context, single))
            return self.decode_time(batch, total_context, single) + stages
        return k.a + k.b * total_context + k.c * batch

    def mixed_time(self, lengths: Sequence[int], prefixes: Sequence[int], batch: int, total_context: int,
                   par: Parallel) -> float:
        if not lengths:
            return self.decode_time(batch, total_context, par)
        prefill = self.prefill_time(lengths, par, prefixes)
        if batch == 0:
            return prefill
        k_p, k_d = self._coefficients(par, "prefill"), self._coefficients(par, "decode")
        if k_p is None or k_d is None:
            single = self._stages_from_fallback(par, ("prefill", "decode"))
            if single is None:
                return self.fallback.mixed_time(lengths, prefixes, batch, total_context, par)
            return (self.mixed_time(lengths, prefixes, batch, total_context, single)
                    + self.fallback.mixed_time(lengths, prefixes, batch, total_context, par)
                    - self.fallback.mixed_time(lengths, prefixes, batch, total_context, single))
        # One fused forward pays the fixed per-forward cost once.
        return prefill + self.decode_time(batch, total_context, par) - min(k_p.a, k_d.a)

    def kv_transfer_time(self, tokens: int, src: Parallel, dst: Parallel, same_node: bool) -> float:
        if self.fallback is None:
            return 0.0
        return self.fallback.kv_transfer_time(tokens, src, dst, same_node)
