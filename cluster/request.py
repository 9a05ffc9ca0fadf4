"""One request as the frontend sees it: its state machine (every allowed transition in one table), its output in
order (tokens by position, so a duplicate or early event cannot repeat or reorder a token), its text with the
stop strings applied (the only text-level stop rule; token rules ran in the engine), its timing, and the chunks
its caller reads. No Ray here."""
from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.stop import TextStream, makes_text


class RequestState(enum.Enum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    TRANSFERRING = "transferring"
    DECODING = "decoding"
    MIGRATING = "migrating"  # its instance died: it resumes on a healthy pair from prompt + tokens streamed
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (RequestState.FINISHED, RequestState.ABORTED, RequestState.FAILED)


_ENDS = {RequestState.FINISHED, RequestState.ABORTED, RequestState.FAILED}
ALLOWED = {
    RequestState.QUEUED: {RequestState.PREFILLING} | _ENDS,
    # PREFILLING -> DECODING: a colocated instance, or the decode side admitted before the first token arrived.
    # -> QUEUED: a failed transfer is retried from prefill.
    RequestState.PREFILLING: {RequestState.TRANSFERRING, RequestState.DECODING, RequestState.QUEUED,
                              RequestState.MIGRATING} | _ENDS,
    RequestState.TRANSFERRING: {RequestState.DECODING, RequestState.QUEUED, RequestState.MIGRATING} | _ENDS,
    RequestState.DECODING: {RequestState.MIGRATING} | _ENDS,
    RequestState.MIGRATING: {RequestState.PREFILLING} | _ENDS,
}


@dataclass
class StreamChunk:
    """What a caller receives: new tokens and text of one step, and at the end why the request finished."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None
    metrics: dict | None = None


@dataclass
class Timing:
    arrival: float = field(default_factory=time.perf_counter)
    dispatched: float | None = None
    first_token: float | None = None
    kv_ready: float | None = None
    last_token: float | None = None
    finished: float | None = None

    def metrics(self, num_output: int) -> dict:
        t = self
        ttft = (t.first_token - t.arrival) if t.first_token else None
        decode = (t.last_token - t.first_token) if t.first_token and t.last_token else 0.0
        # As the frontend sees it: the decode side may report ready before the prefill side's first-token event
        # reaches the frontend (the token rides on the done message), which shows as no exposed transfer at all.
        exposed = max(0.0, t.kv_ready - t.first_token) if t.kv_ready and t.first_token else None
        return {"queue_s": (t.dispatched - t.arrival) if t.dispatched else None, "ttft_s": ttft,
                "prefill_s": (t.first_token - t.dispatched) if t.first_token and t.dispatched else None,
                "kv_transfer_s": exposed,
                "mean_itl_s": decode / (num_output - 1) if num_output > 1 else 0.0, "decode_s": decode,
                "e2e_s": (t.finished - t.arrival) if t.finished else None}


@dataclass
class TokenEvent:
    """One sampled token as an engine reports it: its position in the output and what the engine's token rules
    decided."""

    position: int
    token: int
    finished: bool
    finish_reason: str | None
    stop_reason: int | None


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    engine_params: SamplingParams  # the engines get the token rules only; stop strings are applied here
    text: TextStream
    eos_token_ids: frozenset
    chunks: asyncio.Queue
    state: RequestState = RequestState.QUEUED
    prefill: str | None = None
    decode: str | None = None
    attempt: int = 0  # dispatches so far; engines tag their events with it
    retries: int = 0  # of failed KV transfers
    migrations: int = 0  # moves off a dead instance
    prompt_on: str | None = None  # the instance counting this prompt as pending work, until its first token
    cached_tokens: int | None = None  # prompt tokens its (first) prefill found in the prefix cache
    error: str | None = None
    timing: Timing = field(default_factory=Timing)
    token_ids: list[int] = field(default_factory=list)
    _early: dict[int, TokenEvent] = field(default_factory=dict)

    def move(self, new: RequestState) -> None:
        if new is self.state:
            return
        if self.state.final or new not in ALLOWED[self.state]:
            raise AssertionError(f"request {self.request_id}: {self.state.value} -> {new.value} is not a transition")
        self.state = new

    def resume(self, state: RequestState) -> None:
        """Back to dispatch (a retry or a migration): the next attempt continues from the tokens received so far;
        tokens that arrived early from the abandoned attempt are dropped."""
        self.move(state)
        self._early.clear()

    def on_token(self, event: TokenEvent) -> bool:
        """Takes one output token in order: a duplicate is ignored, one that arrives early waits for its turn.
        True when a stop string ended the request while the engine that produced it is still running."""
        if self.state.final or event.position < len(self.token_ids):
            return False
        self._early[event.position] = event
        engine_still_running = False
        while len(self.token_ids) in self._early and not self.state.final:
            engine_still_running |= self._take(self._early.pop(len(self.token_ids)))
        return engine_still_running

    def _take(self, e: TokenEvent) -> bool:
        now = time.perf_counter()
        self.timing.first_token = self.timing.first_token or now
        self.timing.last_token = now
        self.token_ids.append(e.token)
        if makes_text(e.token, self.eos_token_ids, e.finish_reason, e.stop_reason):
            self.text.add_token(e.token)
        if self.text.stopped_by is not None:
            self.finish(RequestState.FINISHED, "stop", [e.token])
            return not e.finished
        if e.finished:
            self.text.close()
            self.finish(RequestState.FINISHED, e.finish_reason, [e.token])
        else:
            self.chunks.put_nowait(StreamChunk(self.request_id, [e.token], self.text.take_delta()))
        return False

    def finish(self, state: RequestState, reason: str | None, tokens: list[int] = (),
               error: str | None = None) -> None:
        """Moves to a final state and sends the last chunk: the last tokens, the text held back, the metrics."""
        self.timing.finished = time.perf_counter()
        self.move(state)
        self.error = error
        metrics = self.timing.metrics(len(self.token_ids))
        metrics.update(prompt_tokens=len(self.prompt_ids), completion_tokens=len(self.token_ids),
                       cached_tokens=min(self.cached_tokens or 0, len(self.prompt_ids)),
                       attempts=self.attempt, migrations=self.migrations, prefill_instance=self.prefill,
                       decode_instance=self.decode)
        text = self.text.take_delta() if state is RequestState.FINISHED else ""
        self.chunks.put_nowait(StreamChunk(self.request_id, list(tokens), text, True, reason, error, metrics))
