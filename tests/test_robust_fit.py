"""Latency fits from repeated noisy measurements: medians per shape, outliers down-weighted, bootstrap intervals
that hold the truth and narrow as measurements are added; the intervals travel with the profile JSON."""
import random

import pytest

from splitserve.placement.linalg import nonnegative_least_squares
from splitserve.placement.parallel import Parallel
from splitserve.placement.profile import (Coefficients, Profile, ProfileEntry, fit_decode, fit_decode_report,
                                          fit_prefill_report)
from splitserve.placement.robust_fit import group

TRUTH = (15e-3, 5e-6, 1.0e-3)  # decode step of a small model on a CPU core: a (s), b (s/token), c (s/sequence)


def _decode_samples(batches, contexts, repeats, seed, noise=0.05, outliers=0.15):
    """Every shape `repeats` times with multiplicative Gaussian noise; a share of the repeats 1.5-3x slower (the
    machine busy with something else)."""
    rng = random.Random(seed)
    samples = []
    for b in batches:
        for ctx in contexts:
            t = TRUTH[0] + TRUTH[1] * b * ctx + TRUTH[2] * b
            for _ in range(repeats):
                factor = 1 + rng.gauss(0, noise)
                if rng.random() < outliers:
                    factor *= rng.uniform(1.5, 3.0)
                samples.append((b, b * ctx, t * factor))
    return samples


def test_fit_with_outliers_recovers_coefficients():
    samples = _decode_samples((1, 2, 4, 8, 12, 16, 24, 32), (128, 256, 384), repeats=5, seed=3)
    k = fit_decode(samples)
    assert k.a == pytest.approx(TRUTH[0], rel=0.08)
    assert k.b == pytest.approx(TRUTH[1], rel=0.15)
    assert k.c == pytest.approx(TRUTH[2], rel=0.15)
    # A plain least-squares fit over every sample follows the slow repeats: it is farther off on each of a and c.
    plain = nonnegative_least_squares([[1.0, float(ctx), float(b)] for b, ctx, _ in samples],
                                      [t for *_, t in samples])
    assert abs(plain[0] - TRUTH[0]) > abs(k.a - TRUTH[0]) and abs(plain[2] - TRUTH[2]) > abs(k.c - TRUTH[2])


def test_single_outlier_shape_is_down_weighted():
    """Even with one repeat per shape (no medians to help), one shape measured 3x slow moves no coefficient by
    more than a few percent."""
    samples = _decode_samples((1, 2, 4, 8, 16, 32), (128, 256, 512), repeats=1, seed=4, noise=0.01, outliers=0)
    samples[7] = (samples[7][0], samples[7][1], samples[7][2] * 3)
    k = fit_decode(samples)
    assert (k.a, k.b, k.c) == pytest.approx(TRUTH, rel=0.05)


def test_intervals_hold_the_truth_and_narrow_with_more_measurements():
    few = _decode_samples((1, 4, 16), (128, 384), repeats=3, seed=5)
    many = _decode_samples((1, 2, 4, 6, 8, 12, 16, 20, 24, 32), (128, 192, 256, 384), repeats=9, seed=5)
    _, u_few = fit_decode_report(few, resamples=200, seed=1)
    k_many, u_many = fit_decode_report(many, resamples=200, seed=1)
    assert (u_few.shapes, u_few.samples, u_many.shapes, u_many.samples) == (6, 18, 40, 360)
    for name, truth in zip("abc", TRUTH):
        low, high = getattr(u_many.low, name), getattr(u_many.high, name)
        assert low <= truth <= high, name
        assert low <= getattr(k_many, name) <= high, name
        width_few = getattr(u_few.high, name) - getattr(u_few.low, name)
        assert high - low < 0.5 * width_few, name
    assert 0.02 < u_many.relative_residual < 0.1  # the 5 % noise, seen through medians of 9 repeats
    assert len(u_many.draws) == 200


def test_exact_measurements_give_point_intervals():
    samples = [([n], 2e-3 + 1e-5 * n + 1e-9 * n * n) for n in (32, 64, 128, 256, 512) for _ in range(2)]
    k, u = fit_prefill_report(samples, resamples=20)
    assert (k.a, k.b, k.c) == pytest.approx((2e-3, 1e-5, 1e-9), rel=1e-6)
    assert (u.low.a, u.high.a) == pytest.approx((2e-3, 2e-3), rel=1e-6)
    assert u.relative_residual == pytest.approx(0, abs=1e-9) and (u.shapes, u.samples) == (5, 10)


def test_repeats_of_a_shape_are_grouped():
    shapes = group([[1, 2], [3, 4], [1, 2]], [0.5, 0.7, 0.9])
    assert [(s.features, s.times) for s in shapes] == [((1.0, 2.0), (0.5, 0.9)), ((3.0, 4.0), (0.7,))]
    with pytest.raises(ValueError, match="positive"):
        fit_decode([(1, 10, 0.01), (2, 20, -0.01), (4, 40, 0.02)])


def test_uncertainty_round_trips_through_the_profile_json(tmp_path):
    k, u = fit_decode_report(_decode_samples((1, 4, 16), (128, 384), repeats=3, seed=6), resamples=50)
    entry = ProfileEntry(Parallel(), Coefficients(1e-3, 1e-5, 0.0), k, {"decode": u})
    path = tmp_path / "p.json"
    Profile("m", "cpu", (entry,)).save(str(path))
    loaded = Profile.load(str(path)).entries[0]
    got = loaded.uncertainty["decode"]
    assert (got.shapes, got.samples, got.level) == (u.shapes, u.samples, u.level)
    assert (got.low.a, got.high.c) == pytest.approx((u.low.a, u.high.c), rel=1e-12)
    raw = Profile("m", "cpu", (entry,)).to_dict()
    raw["entries"][0]["uncertainty"]["decode"] = {"ci_ms": {"a": [1, 2]}}
    with pytest.raises(ValueError, match="uncertainty.decode"):
        Profile.from_dict(raw)
