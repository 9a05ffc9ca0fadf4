"""When a request finishes, in two parts that run where their inputs are: `TokenRules` (eos, stop token ids,
min/max tokens) run in the engine that samples the tokens; `TextStream` (incremental text, stop strings, holding
back the start of a stop string that may still complete) runs where the text is made: the frontend of a cluster,
or the engine itself in-process (`StopChecker` joins the two there)."""
from dataclasses import dataclass
from typing import Iterable

from splitserve.workers.detokenizer import IncrementalDetokenizer
from splitserve.workers.sampling_params import SamplingParams


@dataclass
class StepResult:
    text_delta: str
    finished: bool
    finish_reason: str | None   # "stop" | "length" | None
    stop_reason: str | int | None  # the stop string or stop token id; None for eos and length


def makes_text(token_id: int, eos_token_ids, finish_reason: str | None, stop_reason) -> bool:
    """Whether a sampled token shows in the output text: eos never does, nor a stop token that ended the request."""
    return token_id not in eos_token_ids and not (finish_reason == "stop" and stop_reason == token_id)


class TokenRules:
    """The token-level stop rules of one request."""

    def __init__(self, params: SamplingParams, eos_token_ids: Iterable[int]):
        self.params = params
        self.eos_token_ids = frozenset(eos_token_ids)

    def check(self, token_ids: list[int]) -> tuple[str, int | None] | None:
        """(finish reason, stop reason) once the newest token ends the request, else None."""
        token = token_ids[-1]
        if len(token_ids) >= self.params.min_tokens:
            if token in self.eos_token_ids and not self.params.ignore_eos:
                return "stop", None
            if token in self.params.stop_token_ids:
                return "stop", token
        if len(token_ids) >= self.params.max_tokens:
            return "length", None
        return None


class TextStream:
    """Output text of one request, delta by delta, cut at the first stop string."""

    def __init__(self, stop: tuple[str, ...] = (), include_stop_str: bool = False,
                 detokenizer: IncrementalDetokenizer | None = None):
        if stop and detokenizer is None:
            raise ValueError("stop strings need a detokenizer")
        self.stop, self.include_stop_str, self.detokenizer = tuple(stop), include_stop_str, detokenizer
        self.stopped_by: str | None = None  # the stop string found, once found
        self.closed = False
        self._emitted: list[str] = []  # deltas returned so far
        # Text not yet returned: the held-back suffix plus the newest text. A stop string can only
        # complete inside it, because any possible start of one is held back.
        self._pending = ""
        self._longest_stop = max((len(s) for s in self.stop), default=0)

    @classmethod
    def for_params(cls, params: SamplingParams, detokenizer: IncrementalDetokenizer | None) -> "TextStream":
        return cls(params.stop, params.include_stop_str_in_output, detokenizer)

    @property
    def text(self) -> str:
        """Output text so far, including any part still held back from the deltas."""
        if len(self._emitted) > 1:
            self._emitted = ["".join(self._emitted)]
        return "".join(self._emitted) + self._pending

    def add_token(self, token_id: int) -> None:
        if self.detokenizer is not None and not self.closed:
            self._add(self.detokenizer.step([token_id]))

    def close(self) -> None:
        """No more tokens: incomplete trailing bytes will never complete, so show them as the decoder does."""
        if self.detokenizer is not None and not self.closed:
            self._add(self.detokenizer.flush())
        self.closed = True

    def take_delta(self) -> str:
        held = 0 if self.closed or self.stopped_by is not None else self._held_back()
        delta = self._pending[:len(self._pending) - held]
        self._pending = self._pending[len(delta):]
        if delta:
            self._emitted.append(delta)
        return delta

    def _add(self, delta: str) -> None:
        if not delta or self.stopped_by is not None:
            return
        self._pending += delta
        found = self._find_stop()
        if found is not None:
            pos, stop = found
            self._pending = self._pending[:pos + (len(stop) if self.include_stop_str else 0)]
            self.stopped_by = stop
            self.closed = True

    def _find_stop(self) -> tuple[int, str] | None:
        best = None
        for stop in self.stop:
            pos = self._pending.find(stop)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, stop)
        return best

    def _held_back(self) -> int:
        """Length of the longest suffix of the pending text that could still grow into a stop string."""
        for n in range(min(self._longest_stop - 1, len(self._pending)), 0, -1):
            tail = self._pending[-n:]
            if any(stop.startswith(tail) for stop in self.stop):
                return n
        return 0


class StopChecker:
    """An engine's view of one request: its token rules, and its text when the engine has a detokenizer."""

    def __init__(self, params: SamplingParams, eos_token_ids: Iterable[int],
                 detokenizer: IncrementalDetokenizer | None):
        self.params = params
        self.rules = TokenRules(params, eos_token_ids)
        self.eos_token_ids = self.rules.eos_token_ids
        self.stream = TextStream.for_params(params, detokenizer)
        self.token_ids: list[int] = []
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None

    @property
    def text(self) -> str:
        return self.stream.text

    def append(self, token_id: int) -> StepResult:
        if self.finished:
            raise RuntimeError(f"request already finished ({self.finish_reason}); cannot append tokens")
        self.token_ids.append(token_id)
        ended = self.rules.check(self.token_ids)
        reason, stop_reason = ended if ended else (None, None)
        if makes_text(token_id, self.eos_token_ids, reason, stop_reason):
            self.stream.add_token(token_id)
        if self.stream.stopped_by is not None:  # a stop string ends the request before any length limit
            reason, stop_reason = "stop", self.stream.stopped_by
        if reason is not None:
            self._finish(reason, stop_reason)
        return StepResult(self.stream.take_delta(), self.finished, self.finish_reason, self.stop_reason)

    def resume(self, token_ids: list[int]) -> None:
        """Output produced before this engine took the request over (its text, if any, was shown elsewhere)."""
        self.token_ids = list(token_ids)

    def finish(self, reason: str) -> StepResult:
        """Ends the request for a reason outside its own rules (the context limit, an abort) and releases
        any text still held back."""
        if not self.finished:
            self._finish(reason, None)
        return StepResult(self.stream.take_delta(), True, self.finish_reason, self.stop_reason)

    def _finish(self, reason: str, stop_reason: str | int | None) -> None:
        self.stream.close()
        self.finished, self.finish_reason, self.stop_reason = True, reason, stop_reason
