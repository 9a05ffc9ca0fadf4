"""Sampler: greedy, seeds, top-k/top-p/min-p masks, penalties, min_tokens, dtypes."""
import math

import pytest
import torch

from splitserve.workers import sampler as sampler_mod
from splitserve.workers.sampler import (SampleRequest, Sampler, apply_min_p, apply_penalties, apply_top_k,
                                        apply_top_p, make_generator)
from splitserve.workers.sampling_params import SamplingParams

EOS = 3
NEG_INF = float("-inf")


def req(prompt=(1, 2), output=(), **params):
    p = SamplingParams(**params)
    return SampleRequest(p, list(prompt), list(output), make_generator(p.seed, "cpu"))


def random_logits(batch, vocab, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, vocab, generator=g) * 3).to(dtype)


def kept(logits):
    return torch.isfinite(logits)


def test_greedy_equals_argmax_and_breaks_ties_to_first():
    logits = random_logits(6, 101)
    logits[2, 7] = logits[2, 50] = logits[2].max() + 1  # a tie: the first index wins
    out = Sampler([EOS])(logits, [req(temperature=0.0) for _ in range(6)])
    assert out == logits.argmax(dim=-1).tolist()
    assert out[2] == 7


def test_all_greedy_batch_skips_row_processing(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("per-row path used for a plain greedy batch")
    monkeypatch.setattr(sampler_mod, "apply_penalties", boom)
    logits = random_logits(4, 33)
    assert Sampler([EOS])(logits, [req(temperature=0.0)] * 4) == logits.argmax(-1).tolist()


def test_greedy_rows_stay_argmax_in_a_mixed_batch():
    logits = random_logits(4, 64, seed=1)
    reqs = [req(temperature=0.0), req(temperature=1.0, seed=1), req(temperature=0.0), req(temperature=0.7)]
    out = Sampler([EOS])(logits, reqs)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="logits"):
        Sampler([EOS])(torch.zeros(2, 5), [req()])


def draw_sequence(seed, logits_row, batch_builder, steps=20):
    """Tokens drawn for one seeded request over `steps` steps, placed in a batch by batch_builder."""
    target = req(seed=seed, temperature=0.9, top_k=50)
    sampler, tokens = Sampler([EOS]), []
    for _ in range(steps):
        logits, reqs, index = batch_builder(logits_row, target)
        tokens.append(sampler(logits, reqs)[index])
    return tokens


def alone(row, target):
    return row.unsqueeze(0), [target], 0


def crowded(row, target):
    others = random_logits(3, row.shape[0], seed=9)
    logits = torch.cat([others[:1], others[1:2], row.unsqueeze(0), others[2:]])
    reqs = [req(temperature=1.0), req(temperature=1.0, seed=123), target, req(temperature=0.5, top_p=0.9)]
    return logits, reqs, 2


def test_seed_reproduces_and_is_independent_of_batch():
    row = random_logits(1, 200, seed=2)[0] / 3  # flat enough that draws vary
    first = draw_sequence(42, row, alone)
    assert draw_sequence(42, row, alone) == first
    assert draw_sequence(42, row, crowded) == first
    assert len(set(first)) > 3, "draws should vary from step to step"
    assert draw_sequence(43, row, alone) != first


def test_make_generator():
    assert make_generator(None, "cpu") is None
    a, b = make_generator(5, "cpu"), make_generator(5, "cpu")
    assert torch.rand(4, generator=a).tolist() == torch.rand(4, generator=b).tolist()
    make_generator(-1, "cpu")  # negative seeds are accepted


def test_top_k_mask():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0],
                           [1.0, 5.0, 3.0, 5.0, 2.0],
                           [1.0, 5.0, 3.0, 4.0, 2.0]])
    out = apply_top_k(logits, torch.tensor([2, 1, 0]))
    assert kept(out).tolist() == [[False, True, False, True, False],
                                  [False, True, False, True, False],  # ties with the k-th are kept
                                  [True] * 5]
    assert torch.equal(out[kept(out)], logits[kept(out)])
    assert kept(apply_top_k(logits[:1], 3)).tolist() == [[False, True, True, True, False]]
    assert torch.equal(apply_top_k(logits, -1), logits)


PROBS = [0.05, 0.5, 0.15, 0.3]  # sorted: 0.5, 0.3, 0.15, 0.05


@pytest.mark.parametrize("p,expected", [
    (0.45, [False, True, False, False]),
    (0.75, [False, True, False, True]),
    (0.9, [False, True, True, True]),
    (0.99, [True, True, True, True]),
    (1.0, [True, True, True, True]),
])
def test_top_p_mask(p, expected):
    logits = torch.tensor([PROBS]).log()
    assert kept(apply_top_p(logits, p)).tolist() == [expected]


def test_top_p_per_row():
    logits = torch.tensor([PROBS, PROBS]).log() + 7.0  # a shift keeps the softmax
    out = apply_top_p(logits, torch.tensor([0.6, 1.0]))
    assert kept(out).tolist() == [[False, True, False, True], [True] * 4]


@pytest.mark.parametrize("min_p,expected", [
    (0.0, [True, True, True, True]),
    (0.2, [False, True, True, True]),   # threshold 0.1
    (0.5, [False, True, False, True]),  # threshold 0.25
    (0.7, [False, True, False, False]),  # threshold 0.35
    (1.0, [False, True, False, False]),
])
def test_min_p_mask(min_p, expected):
    logits = torch.tensor([PROBS]).log() + 4.0
    assert kept(apply_min_p(logits, min_p)).tolist() == [expected]


def test_repetition_penalty_like_hf():
    row = torch.tensor([2.0, -1.0, 0.5, 3.0, -4.0])
    apply_penalties(row, SamplingParams(repetition_penalty=2.0), prompt_ids=[0, 4], output_ids=[1, 1])
    assert row.tolist() == [1.0, -2.0, 0.5, 3.0, -8.0]


def test_presence_and_frequency_penalties_like_openai():
    row = torch.tensor([1.0, 1.0, 1.0, 1.0])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(row, params, prompt_ids=[0, 3], output_ids=[1, 1, 2])  # prompt is not penalised
    assert row.tolist() == pytest.approx([1.0, 1.0 - 0.5 - 0.5, 1.0 - 0.25 - 0.5, 1.0], abs=1e-7)


def test_penalty_changes_greedy_choice_and_input_is_untouched():
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]])
    original = logits.clone()
    assert Sampler([EOS])(logits, [req(prompt=[0], temperature=0.0, repetition_penalty=2.0)]) == [1]
    assert Sampler([EOS])(logits, [req(output=[0, 0, 0], temperature=0.0, frequency_penalty=1.0)]) == [1]
    assert torch.equal(logits, original)


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 1.0, 0.0, 9.0, 5.0, 8.0]])  # eos=3 best, then stop id 5
    sampler = Sampler([EOS])
    early = dict(output=[1], temperature=0.0, min_tokens=3, max_tokens=8, stop_token_ids=(5,))
    assert sampler(logits, [req(**early)]) == [4]
    assert sampler(logits, [req(**{**early, "ignore_eos": True})]) == [3]
    assert sampler(logits, [req(**{**early, "output": [1, 1, 1]})]) == [3]


def test_min_tokens_masks_eos_when_sampling():
    logits = torch.tensor([[0.0, 1.0, 0.0, 6.0]] * 200)
    reqs = [req(output=[], temperature=1.0, min_tokens=1, seed=i) for i in range(200)]
    out = Sampler([EOS])(logits, reqs)
    assert EOS not in out and set(out) == {0, 1, 2}


@pytest.mark.parametrize("params,allowed", [
    ({"top_k": 2}, {1, 3}),
    ({"top_p": 0.75}, {1, 3}),
    ({"min_p": 0.5}, {1, 3}),
    ({"top_k": 3, "top_p": 0.6}, {1, 3}),
    ({"top_p": 0.9, "min_p": 0.4}, {1, 3}),
    ({}, {0, 1, 2, 3}),
])
def test_samples_respect_masks(params, allowed):
    n = 400
    logits = torch.tensor([PROBS]).log().expand(n, -1)
    reqs = [req(temperature=1.0, seed=i, **params) for i in range(n)]
    assert set(Sampler([EOS])(logits, reqs)) == allowed


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sample_frequencies_follow_temperature(temperature):
    probs = torch.tensor([0.5, 0.3, 0.2])
    n = 4000
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = Sampler([EOS])(probs.log().expand(n, -1), [req(temperature=temperature)] * n)
    expected = probs ** (1 / temperature)
    expected = expected / expected.sum()
    freq = torch.bincount(torch.tensor(out), minlength=3).float() / n
    # Each frequency has std <= 0.008 at n=4000; 0.035 is over four sigma.
    assert torch.allclose(freq, expected, atol=0.035), (freq, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits(dtype):
    logits = random_logits(5, 97, seed=6, dtype=dtype)
    sampler = Sampler([EOS])
    assert sampler(logits, [req(temperature=0.0)] * 5) == logits.float().argmax(-1).tolist()
    def seeded():
        return [req(temperature=0.8, top_p=0.9, min_p=0.01, repetition_penalty=1.3, seed=i) for i in range(5)]
    # Low-precision values are exact in float32, so the same seeds give the same tokens.
    assert sampler(logits, seeded()) == sampler(logits.float(), seeded())
    out = sampler(logits, [req(temperature=0.0, presence_penalty=1.0, output=[0])] * 5)
    assert all(0 <= t < 97 for t in out)


def test_tiny_temperature_does_not_produce_nan():
    logits = random_logits(2, 40, seed=7)
    out = Sampler([EOS])(logits, [req(temperature=1e-30, seed=1), req(temperature=1e-30, seed=2)])
    assert out == logits.argmax(-1).tolist()
    assert not math.isnan(sum(out))


@pytest.mark.parametrize("params", [
    dict(temperature=1e-300, seed=3),                      # below float32's smallest number
    dict(temperature=1e300, seed=3),
    dict(temperature=1.0, repetition_penalty=1e-300, seed=3),  # divides seen logits to inf
    dict(temperature=1.0, repetition_penalty=1e300, seed=3),
    dict(temperature=0.0, repetition_penalty=1e-300),
    dict(temperature=0.7, top_k=2**31 - 1, top_p=1e-300, min_p=1.0, seed=3),
])
def test_extreme_valid_params_sample_a_token(params):
    logits = random_logits(1, 50, seed=9)
    out = Sampler([EOS])(logits, [req(prompt=range(10), **params)])
    assert len(out) == 1 and 0 <= out[0] < 50


def test_huge_temperature_with_min_tokens_masking_still_samples():
    # -inf (masked eos) / inf would be nan: the temperature is capped at float32's largest value.
    logits = random_logits(1, 50, seed=9)
    out = Sampler([EOS])(logits, [req(temperature=1e300, min_tokens=1, max_tokens=4, seed=3)])
    assert len(out) == 1 and 0 <= out[0] < 50 and out[0] != EOS


def test_position_seed_depends_on_seed_and_position_only():
    from splitserve.workers.sampler import position_seed

    seeds = {position_seed(seed, pos) for seed in (0, 1, -5, 2**40) for pos in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 2**64 for s in seeds)
    assert position_seed(7, 3) == position_seed(7, 3)
