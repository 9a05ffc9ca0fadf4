"""The frontend's request: tokens in order whatever order events arrive in, stop strings applied once (here),
engine-side finishes trusted, and only the transitions of the table allowed."""
import asyncio

import pytest

from splitserve.cluster.request import ALLOWED, Request, RequestState, TokenEvent
from splitserve.workers.detokenizer import IncrementalDetokenizer
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.stop import TextStream
from splitserve.workers.tokenizer import load_tokenizer
from splitserve.workers.presets import resolve_model

EOS = 2


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("tiny"))


def _request(params=None, tokenizer=None, prompt=(5, 6)):
    params = params or SamplingParams(max_tokens=8)
    detok = IncrementalDetokenizer(tokenizer, list(prompt)) if tokenizer is not None else None
    return Request("r", list(prompt), params, params, TextStream.for_params(params, detok), frozenset({EOS}),
                   asyncio.Queue())


def _chunks(req):
    out = []
    while not req.chunks.empty():
        out.append(req.chunks.get_nowait())
    return out


def _tok(position, token, finished=False, reason=None, stop_reason=None):
    return TokenEvent(position, token, finished, reason, stop_reason)


def test_duplicates_are_ignored_and_early_tokens_wait_their_turn():
    req = _request()
    req.move(RequestState.PREFILLING)
    assert not req.on_token(_tok(2, 30))  # arrives before positions 0 and 1
    assert req.token_ids == [] and _chunks(req) == []
    req.on_token(_tok(0, 10))
    req.on_token(_tok(0, 10))  # the same first token from the decode side
    assert req.token_ids == [10]
    req.on_token(_tok(1, 20))
    req.on_token(_tok(3, 40, True, "length"))
    assert req.token_ids == [10, 20, 30, 40]
    chunks = _chunks(req)
    assert [c.token_ids for c in chunks] == [[10], [20], [30], [40]] and chunks[-1].finished
    assert chunks[-1].finish_reason == "length" and chunks[-1].metrics["completion_tokens"] == 4
    assert req.state is RequestState.FINISHED
    req.on_token(_tok(4, 50))  # nothing after the end
    assert req.token_ids == [10, 20, 30, 40] and _chunks(req) == []


def test_stop_string_ends_the_request_here_and_asks_to_stop_the_engine(tokenizer):
    ids = tokenizer.encode("hello world again", add_special_tokens=False).ids
    text = tokenizer.decode(ids)
    stop = text.split()[1][:3]
    req = _request(SamplingParams(max_tokens=20, stop=(stop,)), tokenizer)
    req.move(RequestState.PREFILLING)
    engine_running = [req.on_token(_tok(i, t)) for i, t in enumerate(ids)]
    assert req.state is RequestState.FINISHED and engine_running[-1] is False
    assert any(engine_running), "the engine was still running when the stop string completed"
    chunks = _chunks(req)
    assert "".join(c.text for c in chunks) == text[:text.index(stop)]
    assert chunks[-1].finish_reason == "stop" and len(req.token_ids) < len(ids)


def test_eos_and_stop_tokens_show_no_text(tokenizer):
    req = _request(SamplingParams(max_tokens=5, stop_token_ids=(7,)), tokenizer)
    req.move(RequestState.PREFILLING)
    req.on_token(_tok(0, 7, True, "stop", 7))
    chunks = _chunks(req)
    assert chunks[-1].text == "" and chunks[-1].token_ids == [7] and chunks[-1].finish_reason == "stop"


def test_transitions_follow_the_table():
    for state in RequestState:
        assert state.final == (state not in ALLOWED)
    req = _request()
    with pytest.raises(AssertionError, match="queued -> decoding"):
        req.move(RequestState.DECODING)
    req.move(RequestState.PREFILLING)
    req.move(RequestState.TRANSFERRING)
    req.move(RequestState.QUEUED)  # a failed transfer, retried
    req.finish(RequestState.ABORTED, "abort")
    with pytest.raises(AssertionError, match="aborted -> queued"):
        req.move(RequestState.QUEUED)
    assert _chunks(req)[-1].finish_reason == "abort"
