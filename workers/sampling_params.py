"""Per-request sampling and stopping options, validated once at the edge (no torch import)."""
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence


def _check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError(f"{name} must be in [{lo}, {'inf' if hi is None else hi}], got {value}")


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0          # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 or -1 turns it off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        self._validate_lengths()
        self._validate_floats()
        self._validate_stops()
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.seed is not None:
            _check_int("seed", self.seed)

    def _validate_lengths(self) -> None:
        _check_int("max_tokens", self.max_tokens, 1)
        _check_int("min_tokens", self.min_tokens, 0, self.max_tokens)
        _check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be 0 or -1 (off) or >= 1, got {self.top_k}")

    def _validate_floats(self) -> None:
        ranges = {  # name: (low, high, low is inclusive)
            "temperature": (0.0, math.inf, True),
            "top_p": (0.0, 1.0, False),
            "min_p": (0.0, 1.0, True),
            "repetition_penalty": (0.0, math.inf, False),
            "presence_penalty": (-2.0, 2.0, True),
            "frequency_penalty": (-2.0, 2.0, True),
        }
        for name, (lo, hi, lo_inclusive) in ranges.items():
            value = _check_float(name, getattr(self, name))
            if value > hi or value < lo or (value == lo and not lo_inclusive):
                bracket = "[" if lo_inclusive else "("
                raise ValueError(f"{name} must be in {bracket}{lo}, {hi}], got {value}")
            object.__setattr__(self, name, value)

    def _validate_stops(self) -> None:
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)):
            raise TypeError(f"stop must be a str or a sequence of str, got {type(stop).__name__}")
        for s in stop:
            if not isinstance(s, str):
                raise TypeError(f"stop entries must be str, got {type(s).__name__}")
            if not s:
                raise ValueError("stop must not contain empty strings")
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)):
            raise TypeError(f"stop_token_ids must be a sequence of int, got {type(ids).__name__}")
        for i in ids:
            _check_int("stop_token_ids", i, 0)
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "stop_token_ids", tuple(ids))

    def check_for_model(self, vocab_size: int, eos_token_ids) -> None:
        """Rules that need the model: a request must be able to produce a token. With min_tokens > 0, eos and stop
        token ids are masked until then, so they must leave some token of the vocabulary."""
        if self.min_tokens == 0:
            return
        forbidden = {i for i in self.stop_token_ids if i < vocab_size}
        if not self.ignore_eos:
            forbidden |= {i for i in eos_token_ids if i < vocab_size}
        if len(forbidden) >= vocab_size:
            raise ValueError(f"stop_token_ids: with min_tokens={self.min_tokens} every token of the vocabulary "
                             f"({vocab_size}) is a stop or eos token, so no token can be sampled")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SamplingParams":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(d) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        return cls(**d)


def pair_with_params(prompts, params: "SamplingParams | Sequence[SamplingParams] | None"):
    """(prompts, one SamplingParams per prompt): a single prompt (text, ids or a chat's messages) becomes a list
    of one."""
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, dict))):
        prompts = [prompts]
    params = params or SamplingParams()
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(plist) != len(prompts):
        raise ValueError(f"params: {len(plist)} sampling params for {len(prompts)} prompts")
    return list(prompts), plist
