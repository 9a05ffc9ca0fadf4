"""The decode side of the KV transfer protocol: reservations and their arrival flags.

Each reservation gets a transfer id and one flag per link in the decode instance's store. A flag moves
PENDING -> RECEIVING (a sender's handshake was accepted) -> DONE (every layer is in place) or FAILED, or
PENDING -> CANCELLED (the request was aborted before its transfer began, so nothing is ever written into its
blocks). The DONE flag of the link from prefill rank 0 carries the token prefill sampled, so the decode side admits the
request without waiting for the frontend. The leader reads every flag in one store round trip per loop (`check`);
this class only decides, the leader frees blocks and reports. Pure Python."""
from __future__ import annotations

import enum
import itertools
import random
from dataclasses import dataclass, field


class TransferState(enum.Enum):
    PENDING = "pending"
    RECEIVING = "receiving"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


def transfer_key(transfer_id: int, dst_rank: int, src_rank: int) -> str:
    return f"kv/{transfer_id}/{dst_rank}/{src_rank}"


def done_value(first_token: int | None, finished: bool) -> str:
    """The DONE flag; a sender that sampled the first token (the prefill leader) adds it and whether it ended
    the request (then there is nothing to decode)."""
    if first_token is None or (first_token < 0 and not finished):
        return "done"
    return f"done {first_token} {int(finished)}"


def parse_flag(value: bytes) -> tuple[TransferState, str]:
    """(state, detail): the first token and finished flag of DONE, the reason of FAILED."""
    text = value.decode()
    word, _, detail = text.partition(" ") if text.startswith("done") else text.partition(": ")
    return TransferState(word), detail


@dataclass
class Reservation:
    request_id: str
    attempt: int
    prompt_ids: list[int]
    params: object  # SamplingParams, passed through to the decode engine
    keys: list[str]
    resumed: int = 0  # the last prompt tokens are output of an earlier attempt (see workers.sequence)
    cached_blocks: int = 0  # leading blocks found in the decode side's prefix cache: not transferred


@dataclass
class CheckResult:
    ready: list[tuple[Reservation, int]] = field(default_factory=list)  # (reservation, new token): admit
    finished: list[Reservation] = field(default_factory=list)  # the first token ended the request: release
    failed: list[tuple[Reservation, str]] = field(default_factory=list)  # release and report
    drained: list[Reservation] = field(default_factory=list)  # cancelled and no longer written: release


class Reservations:
    def __init__(self, store):
        self.store = store
        self.pending: dict[int, Reservation] = {}
        self.draining: dict[int, Reservation] = {}
        # Ids differ between incarnations of an instance (a relaunch starts elsewhere in a 2^40 range), so nothing
        # addressed to a predecessor's transfer can be taken for a new one.
        self._ids = itertools.count(random.randrange(1, 1 << 40))

    def __len__(self) -> int:
        return len(self.pending) + len(self.draining)

    def holds(self, request_id: str) -> bool:
        """Whether any reservation (pending or still draining) of this request owns blocks here."""
        return any(r.request_id == request_id for r in itertools.chain(self.pending.values(), self.draining.values()))

    def find(self, request_id: str, attempt: int) -> int | None:
        for tid, res in self.pending.items():
            if res.request_id == request_id and res.attempt == attempt:
                return tid
        return None

    def open(self, res: Reservation, links) -> int:
        """Publishes PENDING flags for the (prefill rank, decode rank) links of a new reservation; its id."""
        transfer_id = next(self._ids)
        res.keys = [transfer_key(transfer_id, q, p) for p, q in sorted(links)]
        self.store.multi_set(res.keys, [TransferState.PENDING.value] * len(res.keys))
        self.pending[transfer_id] = res
        return transfer_id

    def cancel(self, transfer_id: int) -> None:
        """Flags not yet taken by a sender become CANCELLED; the blocks are released once no link is still
        RECEIVING into them."""
        res = self.pending.pop(transfer_id)
        for key in res.keys:
            self.store.compare_set(key, TransferState.PENDING.value, TransferState.CANCELLED.value)
        self.draining[transfer_id] = res

    def check(self) -> CheckResult:
        result = CheckResult()
        draining, pending = list(self.draining.items()), list(self.pending.items())
        flat = [k for _, r in draining for k in r.keys] + [k for _, r in pending for k in r.keys]
        if not flat:
            return result
        flags = iter([parse_flag(v) for v in self.store.multi_get(flat)])
        for tid, res in draining:
            states = [next(flags)[0] for _ in res.keys]
            if TransferState.RECEIVING not in states:
                self._close(self.draining, tid)
                result.drained.append(res)
        for tid, res in pending:
            self._decide(tid, res, [next(flags) for _ in res.keys], result)
        return result

    def _decide(self, tid: int, res: Reservation, flags, result: CheckResult) -> None:
        states = [state for state, _ in flags]
        if TransferState.PENDING in states or TransferState.RECEIVING in states:
            return
        failures = [detail or state.value for state, detail in flags if state is not TransferState.DONE]
        self._close(self.pending, tid)
        if failures:
            result.failed.append((res, failures[0]))
            return
        detail = next((d for s, d in flags if d), None)  # the leader's link always exists (plan_heads)
        if detail is None:
            result.failed.append((res, "no first token arrived with the KV"))
            return
        token, finished = (int(v) for v in detail.split())
        if finished:  # the first token ended the request, or the prefill side failed it: nothing to decode
            result.finished.append(res)
        else:
            result.ready.append((res, token))

    def _close(self, table: dict, tid: int) -> None:
        for key in table.pop(tid).keys:
            self.store.delete_key(key)
