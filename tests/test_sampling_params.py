"""SamplingParams: defaults, every validation rule (with the field named), normalisation, from_dict."""
import dataclasses
import subprocess
import sys

import pytest

from splitserve.workers.sampling_params import SamplingParams

NAN, INF = float("nan"), float("inf")

# (field, bad value, exception type)
BAD = [
    ("max_tokens", 0, ValueError), ("max_tokens", -3, ValueError), ("max_tokens", 1.5, TypeError),
    ("max_tokens", True, TypeError),
    ("min_tokens", -1, ValueError), ("min_tokens", 17, ValueError), ("min_tokens", "2", TypeError),
    ("temperature", -0.1, ValueError), ("temperature", NAN, ValueError), ("temperature", INF, ValueError),
    ("temperature", "hot", TypeError), ("temperature", True, TypeError),
    ("top_p", 0.0, ValueError), ("top_p", 1.01, ValueError), ("top_p", NAN, ValueError),
    ("top_k", -2, ValueError), ("top_k", 2.0, TypeError), ("top_k", False, TypeError),
    ("min_p", -0.01, ValueError), ("min_p", 1.5, ValueError), ("min_p", INF, ValueError),
    ("repetition_penalty", 0.0, ValueError), ("repetition_penalty", -1.0, ValueError),
    ("repetition_penalty", INF, ValueError),
    ("presence_penalty", 2.5, ValueError), ("presence_penalty", -2.01, ValueError),
    ("presence_penalty", NAN, ValueError),
    ("frequency_penalty", -3.0, ValueError), ("frequency_penalty", 2.01, ValueError),
    ("frequency_penalty", -INF, ValueError),
    ("stop", ("ok", ""), ValueError), ("stop", "", ValueError), ("stop", ("ok", 3), TypeError),
    ("stop", 5, TypeError),
    ("stop_token_ids", (1, -1), ValueError), ("stop_token_ids", (1.0,), TypeError),
    ("stop_token_ids", (True,), TypeError), ("stop_token_ids", 7, TypeError),
    ("ignore_eos", 1, TypeError), ("include_stop_str_in_output", "yes", TypeError),
    ("seed", 1.0, TypeError), ("seed", True, TypeError),
]


@pytest.mark.parametrize("field,value,exc", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_invalid_value_names_the_field(field, value, exc):
    with pytest.raises(exc, match=field):
        SamplingParams(**{field: value})


GOOD = [
    ("max_tokens", 1), ("min_tokens", 16), ("temperature", 0.0), ("temperature", 0), ("temperature", 7.5),
    ("top_p", 1.0), ("top_p", 1e-6), ("top_k", 0), ("top_k", -1), ("top_k", 1), ("min_p", 0.0),
    ("min_p", 1.0), ("repetition_penalty", 1e-3), ("presence_penalty", -2.0), ("presence_penalty", 2.0),
    ("frequency_penalty", -2.0), ("frequency_penalty", 2.0), ("seed", 0), ("seed", -5), ("seed", None),
]


@pytest.mark.parametrize("field,value", GOOD, ids=[f"{f}={v!r}" for f, v in GOOD])
def test_boundary_values_are_accepted(field, value):
    assert getattr(SamplingParams(**{field: value}), field) == value


def test_defaults():
    p = SamplingParams()
    assert (p.max_tokens, p.min_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (16, 0, 1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.seed, p.include_stop_str_in_output) == \
        ((), (), False, None, False)
    assert not p.greedy


def test_min_tokens_is_bounded_by_max_tokens():
    assert SamplingParams(max_tokens=4, min_tokens=4).min_tokens == 4
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_greedy_and_float_normalisation():
    p = SamplingParams(temperature=0)
    assert p.greedy and isinstance(p.temperature, float)
    assert not SamplingParams(temperature=1e-3).greedy


def test_stop_and_stop_ids_normalised_to_tuples():
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(stop_token_ids=[3, 0]).stop_token_ids == (3, 0)
    hash(SamplingParams(stop=["x"], stop_token_ids=[1]))  # stays hashable once normalised


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SamplingParams().temperature = 0.5


def test_from_dict():
    p = SamplingParams.from_dict({"temperature": 0.0, "stop": ["x"], "max_tokens": 3})
    assert p == SamplingParams(temperature=0.0, stop=("x",), max_tokens=3)
    with pytest.raises(ValueError, match="top_q.*tempreature|tempreature.*top_q"):
        SamplingParams.from_dict({"top_q": 0.5, "tempreature": 1.0})
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_dict({"top_p": 0.0})


def test_module_does_not_import_torch():
    code = "import sys, splitserve.workers.sampling_params; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
