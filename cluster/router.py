"""Request state and instance choice: the prefill instance with the fewest pending prompt tokens, the decode
instance with the most free KV blocks after the reservations made since its last report. No Ray here."""
from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.stop import StopChecker


class RequestState(enum.Enum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    TRANSFERRING = "transferring"
    DECODING = "decoding"
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (RequestState.FINISHED, RequestState.ABORTED, RequestState.FAILED)


ALLOWED = {
    RequestState.QUEUED: {RequestState.PREFILLING, RequestState.ABORTED, RequestState.FAILED},
    RequestState.PREFILLING: {RequestState.TRANSFERRING, RequestState.DECODING, RequestState.FINISHED,
                              RequestState.ABORTED, RequestState.FAILED, RequestState.QUEUED},
    RequestState.TRANSFERRING: {RequestState.DECODING, RequestState.FINISHED, RequestState.ABORTED,
                                RequestState.FAILED, RequestState.QUEUED},
    RequestState.DECODING: {RequestState.FINISHED, RequestState.ABORTED, RequestState.FAILED},
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
        return {"queue_s": (t.dispatched - t.arrival) if t.dispatched else None, "ttft_s": ttft,
                "prefill_s": (t.first_token - t.dispatched) if t.first_token and t.dispatched else None,
                "kv_transfer_s": (t.kv_ready - t.first_token) if t.kv_ready and t.first_token else None,
                "mean_itl_s": decode / (num_output - 1) if num_output > 1 else 0.0, "decode_s": decode,
                "e2e_s": (t.finished - t.arrival) if t.finished else None}


@dataclass(eq=False)
class Request:
    tid: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    engine_params: SamplingParams  # stop strings are checked here, on text; engines see token rules only
    stop: StopChecker
    chunks: asyncio.Queue
    state: RequestState = RequestState.QUEUED
    prefill: str | None = None
    decode: str | None = None
    attempts: int = 0
    error: str | None = None
    timing: Timing = field(default_factory=Timing)

    def move(self, new: RequestState) -> None:
        if new is self.state:
            return
        if self.state.final or new not in ALLOWED[self.state]:
            raise AssertionError(f"request {self.request_id}: {self.state.value} -> {new.value} is not a transition")
        self.state = new


class Router:
    def __init__(self, prefill: list[str], decode: list[str], colocated: list[str]):
        self.pending_tokens = {name: 0 for name in prefill + colocated}
        self.free_blocks = {name: 0 for name in decode + colocated}
        self.reserved_since_report = {name: 0 for name in decode + colocated}
        self.prefill, self.decode, self.colocated = prefill, decode, colocated

    def pick_prefill(self) -> str:
        return min(self.prefill, key=lambda n: (self.pending_tokens[n], n))

    def pick_colocated(self) -> str:
        return min(self.colocated, key=lambda n: (self.pending_tokens[n] - self.free_blocks[n], n))

    def decode_order(self) -> list[str]:
        return sorted(self.decode, key=lambda n: (-(self.free_blocks[n] - self.reserved_since_report[n]), n))

    def report(self, name: str, stats: dict) -> None:
        if name in self.free_blocks:
            self.free_blocks[name] = stats["free_blocks"]
            self.reserved_since_report[name] = 0

    def reserved(self, name: str, blocks: int) -> None:
        self.reserved_since_report[name] += blocks

    def prompt_started(self, name: str, tokens: int) -> None:
        self.pending_tokens[name] += tokens

    def prompt_done(self, name: str, tokens: int) -> None:
        self.pending_tokens[name] = max(0, self.pending_tokens[name] - tokens)
