"""Per-request output state: decides when a request finishes (eos, stop ids, stop strings, max_tokens)
and streams text deltas that never show the beginning of a stop string that may still complete."""
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


class StopChecker:

    def __init__(self, params: SamplingParams, eos_token_ids: Iterable[int],
                 detokenizer: IncrementalDetokenizer | None):
        if params.stop and detokenizer is None:
            raise ValueError("stop strings need a detokenizer")
        self.params = params
        self.eos_token_ids = frozenset(eos_token_ids)
        self.detokenizer = detokenizer
        self.token_ids: list[int] = []
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self._emitted: list[str] = []  # deltas returned so far
        # Text not yet returned: the held-back suffix plus the newest text. A stop string can only
        # complete inside it, because any possible start of one is held back.
        self._pending = ""
        self._longest_stop = max((len(s) for s in params.stop), default=0)

    @property
    def text(self) -> str:
        """Output text so far, including any part still held back from the deltas."""
        if len(self._emitted) > 1:
            self._emitted = ["".join(self._emitted)]
        return "".join(self._emitted) + self._pending

    def append(self, token_id: int) -> StepResult:
        if self.finished:
            raise RuntimeError(f"request already finished ({self.finish_reason}); cannot append tokens")
        self.token_ids.append(token_id)
        if self._is_stop_token(token_id):
            self._finish("stop", token_id if token_id in self.params.stop_token_ids else None)
        elif token_id not in self.eos_token_ids:  # eos text never reaches the output
            self._add_text(self._detokenize(token_id))
        if not self.finished and len(self.token_ids) >= self.params.max_tokens:
            self._finish("length", None)
        return StepResult(self._take_delta(), self.finished, self.finish_reason, self.stop_reason)

    def finish(self, reason: str) -> StepResult:
        """Ends the request for a reason outside its own rules (the context limit, an abort) and releases
        any text still held back."""
        if not self.finished:
            self._finish(reason, None)
        return StepResult(self._take_delta(), True, self.finish_reason, self.stop_reason)

    def _is_stop_token(self, token_id: int) -> bool:
        if len(self.token_ids) < self.params.min_tokens:
            return False
        if token_id in self.eos_token_ids and not self.params.ignore_eos:
            return True
        return token_id in self.params.stop_token_ids

    def _detokenize(self, token_id: int) -> str:
        return "" if self.detokenizer is None else self.detokenizer.step([token_id])

    def _finish(self, reason: str, stop_reason: str | int | None) -> None:
        if self.detokenizer is not None:
            # Incomplete trailing bytes will never complete now; show them as the decoder does.
            self._add_text(self.detokenizer.flush())
        if not self.finished:
            self.finished, self.finish_reason, self.stop_reason = True, reason, stop_reason

    def _add_text(self, delta: str) -> None:
        if not delta or self.finished:
            return
        self._pending += delta
        found = self._find_stop()
        if found is not None:
            pos, stop = found
            self._pending = self._pending[:pos + (len(stop) if self.params.include_stop_str_in_output else 0)]
            self.finished, self.finish_reason, self.stop_reason = True, "stop", stop

    def _find_stop(self) -> tuple[int, str] | None:
        best = None
        for stop in self.params.stop:
            pos = self._pending.find(stop)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, stop)
        return best

    def _take_delta(self) -> str:
        held = 0 if self.finished else self._held_back()
        delta = self._pending[:len(self._pending) - held]
        self._pending = self._pending[len(delta):]
        if delta:
            self._emitted.append(delta)
        return delta

    def _held_back(self) -> int:
        """Length of the longest suffix of the pending text that could still grow into a stop string."""
        for n in range(min(self._longest_stop - 1, len(self._pending)), 0, -1):
            tail = self._pending[-n:]
            if any(stop.startswith(tail) for stop in self.params.stop):
                return n
        return 0
