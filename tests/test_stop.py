"""StopChecker: eos, stop token ids, stop strings across token boundaries, max/min tokens, and
streamed deltas that never show the start of a stop string."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from splitserve.workers.detokenizer import IncrementalDetokenizer
from splitserve.workers.sampling_params import SamplingParams
from splitserve.workers.stop import StopChecker

CORPUS = ["hello world, the quick brown fox jumps over the lazy dog. STOP here.",
          "你好世界你好世界", "naïve café", "ab 🙂🙂"] * 4


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<eos>", "<stop>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def ids_of(tok, *pieces):
    """Token ids with a token boundary forced between pieces (byte-level decoding concatenates)."""
    return [i for p in pieces for i in tok.encode(p).ids]


def checker(tok, skip_special_tokens=True, **params):
    eos = tok.token_to_id("<eos>")
    detok = IncrementalDetokenizer(tok, ids_of(tok, "prompt"), skip_special_tokens=skip_special_tokens)
    return StopChecker(SamplingParams(**{"max_tokens": 1000, **params}), [eos], detok)


def feed(check, ids):
    """Append ids until finished; returns the deltas."""
    deltas = []
    for i in ids:
        deltas.append(check.append(i).text_delta)
        if check.finished:
            break
    return deltas


def feed_pieces(tok, check, *pieces):
    """Deltas per piece of text (each piece may be several tokens)."""
    return ["".join(feed(check, ids_of(tok, p))) for p in pieces]


def test_stop_string_across_token_boundary(tok):
    check = checker(tok, stop=("STOP",))
    ids = ids_of(tok, "hello wor", "ld ST", "OP more")
    deltas = feed(check, ids)
    assert check.text == "hello world " == "".join(deltas)
    assert (check.finished, check.finish_reason) == (True, "stop")
    # Tokens stop at the one that completed the stop string.
    done = next(k for k in range(1, len(ids) + 1) if "STOP" in tok.decode(ids[:k]))
    assert check.token_ids == ids[:done]


def test_stop_string_prefix_is_held_back_then_cut(tok):
    check = checker(tok, stop=("STOP",))
    assert feed_pieces(tok, check, "hello wor", "ld ST") == ["hello wor", "ld "]
    assert feed_pieces(tok, check, "OP more") == [""]
    assert check.finished and check.text == "hello world "


def test_include_stop_str_in_output(tok):
    check = checker(tok, stop=("STOP",), include_stop_str_in_output=True)
    deltas = feed(check, ids_of(tok, "hello wor", "ld ST", "OP more"))
    assert check.text == "hello world STOP" == "".join(deltas)
    assert check.stop_reason == "STOP"


def test_text_after_stop_in_the_same_token_is_cut(tok):
    check = checker(tok, stop=("\n",))
    assert "".join(feed(check, ids_of(tok, "x", "y\nz"))) == "xy" == check.text


def test_earliest_stop_string_wins(tok):
    check = checker(tok, stop=("lazy", "fox"))
    feed(check, ids_of(tok, "the quick brown fox jumps over the lazy dog"))
    assert check.text == "the quick brown " and check.stop_reason == "fox"


def test_held_text_released_when_it_can_no_longer_match(tok):
    check = checker(tok, stop=("STOP",))
    assert feed_pieces(tok, check, "a S", "T", "x", " STO", "STOP") == ["a ", "", "STx", " ", "STO"]
    assert check.text == "a STx STO" and check.finish_reason == "stop"


@pytest.mark.parametrize("finish", ["length", "eos"])
def test_held_text_released_when_finishing_otherwise(tok, finish):
    ids = ids_of(tok, "fox ", "ST")
    if finish == "eos":
        ids.append(tok.token_to_id("<eos>"))
    check = checker(tok, stop=("STOP",), max_tokens=len(ids) if finish == "length" else 1000)
    deltas = feed(check, ids)
    assert check.finished and check.finish_reason == ("length" if finish == "length" else "stop")
    assert check.text == "fox ST" == "".join(deltas)
    assert deltas[-1].endswith("ST") and check.stop_reason is None


def test_eos_finishes_without_its_text(tok):
    eos = tok.token_to_id("<eos>")
    check = checker(tok, skip_special_tokens=False)
    ids = ids_of(tok, "the fox") + [eos]
    results = [check.append(i) for i in ids]
    assert [r.finished for r in results] == [False] * (len(ids) - 1) + [True]
    assert (results[-1].finish_reason, results[-1].stop_reason) == ("stop", None)
    assert check.text == "the fox" and check.token_ids == ids
    with pytest.raises(RuntimeError, match="finished"):
        check.append(eos)


def test_stop_token_id(tok):
    period = ids_of(tok, ".")[0]
    check = checker(tok, stop_token_ids=(period,))
    ids = ids_of(tok, "the fox", ".", " more")
    deltas = feed(check, ids)
    assert (check.finish_reason, check.stop_reason) == ("stop", period)
    assert check.text == "the fox" == "".join(deltas)
    assert check.token_ids[-1] == period


def test_max_tokens(tok):
    ids = ids_of(tok, "the quick brown fox jumps")
    check = checker(tok, max_tokens=3)
    results = [check.append(i) for i in ids[:3]]
    assert [r.finish_reason for r in results] == [None, None, "length"]
    assert check.token_ids == ids[:3] and check.text == tok.decode(ids[:3])


def test_min_tokens_delays_eos_and_stop_ids(tok):
    eos = tok.token_to_id("<eos>")
    period = ids_of(tok, ".")[0]
    fox = ids_of(tok, "fox")
    check = checker(tok, skip_special_tokens=False, min_tokens=4, stop_token_ids=(period,))
    feed(check, [eos, period, *fox])
    assert not check.finished
    assert check.text == "." + "fox"  # eos text never shows; an early stop id is an ordinary token
    n = len(check.token_ids)
    result = check.append(eos)
    assert n + 1 >= 4 and result.finished and result.finish_reason == "stop"


def test_ignore_eos(tok):
    eos = tok.token_to_id("<eos>")
    check = checker(tok, skip_special_tokens=False, ignore_eos=True, max_tokens=4)
    feed(check, [eos, *ids_of(tok, "ab"), eos, eos])
    assert check.finish_reason == "length" and len(check.token_ids) == 4
    assert "<eos>" not in check.text and check.token_ids[0] == eos


def test_without_detokenizer():
    with pytest.raises(ValueError, match="stop"):
        StopChecker(SamplingParams(stop=("x",)), [0], None)
    check = StopChecker(SamplingParams(max_tokens=3, stop_token_ids=(7,)), [0], None)
    assert check.append(5).text_delta == "" and check.append(7).finish_reason == "stop"
    assert check.text == "" and check.token_ids == [5, 7]


STOPS = ("STOP", "ab", "Té", "🙂你")  # no stop string is inside another


def longest_held_suffix(text: str) -> int:
    return max([n for n in range(1, len(text) + 1) if any(s.startswith(text[-n:]) and s != text[-n:]
                                                          for s in STOPS)], default=0)


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("abSTOP Té🙂你🎉")), min_size=1, max_size=30),
       data=st.data(), include=st.booleans())
def test_streaming_matches_reference(tok, text, data, include):
    cuts = sorted(data.draw(st.sets(st.integers(1, len(text)), max_size=len(text))) | {len(text)})
    pieces = [text[a:b] for a, b in zip([0, *cuts], cuts) if b > a]
    ids = ids_of(tok, *pieces) + [tok.token_to_id("<eos>")]
    check = checker(tok, stop=STOPS, include_stop_str_in_output=include)
    hits = [(text.find(s), s) for s in STOPS if s in text]
    if hits:
        pos, stop = min(hits)
        expected = text[:pos + (len(stop) if include else 0)]
    else:
        expected, stop = text, None
    emitted = ""
    for i in ids:
        result = check.append(i)
        emitted += result.text_delta
        assert expected.startswith(emitted), "a delta showed text past the stop point"
        if result.finished:
            break
        # Only the longest suffix that may still become a stop string is held back.
        assert emitted == check.text[:len(check.text) - longest_held_suffix(check.text)]
    assert check.finished and check.stop_reason == stop
    assert emitted == check.text == expected


def test_incomplete_character_is_flushed_at_finish(tok):
    party = ids_of(tok, "🎉")
    assert len(party) >= 3, "the emoji should be split into several tokens"
    ids = ids_of(tok, "fox ") + party[:2]
    check = checker(tok, max_tokens=len(ids))
    deltas = feed(check, ids)
    assert check.finish_reason == "length"
    assert check.text == "".join(deltas) == tok.decode(ids) and check.text.endswith("\ufffd")
