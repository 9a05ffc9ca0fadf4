"""A request's state inside an engine: its tokens, how many have KV in the cache, its output state. No torch."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.stop import StepResult, StopChecker


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SequenceTiming:
    arrival: float = field(default_factory=time.perf_counter)
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None


class Sequence:
    def __init__(self, seq_id: str, prompt_token_ids: list[int], params: SamplingParams, stop: StopChecker,
                 resumed: int = 0):
        """`resumed`: the last tokens of `prompt_token_ids` are output an earlier attempt already produced (a
        request moved off a failed instance); they count as output for stop rules, penalties and seeds."""
        if len(prompt_token_ids) <= resumed:
            raise ValueError("prompt: must contain at least one token")
        self.seq_id = seq_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids) - resumed
        self.params = params
        self.stop = stop
        self.num_computed_tokens = 0  # tokens whose K/V sit in the cache
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at the first prefill (not computed)
        self.status = SequenceStatus.WAITING
        self.num_preemptions = 0
        self.timing = SequenceTiming()
        if resumed:
            stop.resume(self.output_token_ids)
        self.error: str | None = None  # why the engine failed this request (it then finishes with reason "error")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def prompt_prefix(self) -> list[int]:
        """The tokens whose cached KV a prefill may reuse: all but the last, which is computed for its logits."""
        return self.token_ids[: self.num_tokens - 1]

    def start_from_cache(self, cached_tokens: int) -> None:
        """Its first `cached_tokens` tokens' KV was found in the cache: computing starts after them."""
        self.num_computed_tokens = cached_tokens
        if self.num_preemptions == 0:
            self.num_cached_tokens = cached_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> StepResult:
        now = time.perf_counter()
        if self.timing.first_token is None:
            self.timing.first_token = now
        self.token_ids.append(token_id)
        result = self.stop.append(token_id)
        if result.finished:
            self.finish(now)
        return result

    def finish_length(self) -> StepResult:
        """The context limit ends the request even though its stop rules did not."""
        result = self.stop.finish("length")
        self.finish()
        return result

    def finish(self, now: float | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.timing.finished = now if now is not None else time.perf_counter()
