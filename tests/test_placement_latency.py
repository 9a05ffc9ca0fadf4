"""Latency model: fits recover known coefficients, profiles round-trip, comm terms behave as their byte counts say."""

import dataclasses
import random
import subprocess
import sys

import pytest

from splitserve.placement.hardware import load_cluster
from splitserve.placement.latency import AnalyticLatency, cheaper_sp_algorithm, sp_step_bytes
from splitserve.placement.linalg import least_squares, solve
from splitserve.placement.parallel import Parallel
from splitserve.placement.profile import (Coefficients, Profile, ProfileEntry, ProfileLatency, fit_decode,
                                          fit_prefill)
from splitserve.placement.specs import load_model


def test_solve_known_system():
    x = solve([[2, 1, -1], [-3, -1, 2], [-2, 1, 2]], [8, -11, -3])
    assert x == pytest.approx([2, 3, -1], abs=1e-12)
    with pytest.raises(ValueError, match="singular"):
        solve([[1, 2], [2, 4]], [1, 2])
    with pytest.raises(ValueError, match="at least 3"):
        least_squares([[1, 2, 3]], [1])


def test_prefill_fit_recovers_coefficients():
    rng = random.Random(1)
    truth = (18.10e-3, 0.1019e-3, 7.12e-9)  # DistServe's OPT-13B A100 fit, seconds
    samples = []
    for _ in range(60):
        lengths = [rng.randint(16, 2048) for _ in range(rng.randint(1, 6))]
        t = truth[0] + truth[1] * sum(lengths) + truth[2] * sum(l * l for l in lengths)
        samples.append((lengths, t))
    k = fit_prefill(samples)
    assert (k.a, k.b, k.c) == pytest.approx(truth, rel=1e-6)
    # With 1% multiplicative noise the fit stays within a few percent on every coefficient.
    noisy = [(ls, t * (1 + rng.gauss(0, 0.01))) for ls, t in samples * 5]
    k = fit_prefill(noisy)
    assert k.a == pytest.approx(truth[0], rel=0.15)
    assert k.b == pytest.approx(truth[1], rel=0.05)
    assert k.c == pytest.approx(truth[2], rel=0.1)


def test_decode_fit_recovers_coefficients():
    rng = random.Random(2)
    truth = (19.93e-3, 6.27e-7, 0.0385e-3)
    samples = []
    for _ in range(50):
        batch = rng.randint(1, 128)
        ctx = batch * rng.randint(64, 2048)
        samples.append((batch, ctx, truth[0] + truth[1] * ctx + truth[2] * batch))
    k = fit_decode(samples)
    assert (k.a, k.b, k.c) == pytest.approx(truth, rel=1e-6)


def test_profile_json_round_trip_and_use(tmp_path):
    entry = ProfileEntry(Parallel(tp=2), Coefficients(0.01, 1e-4, 1e-8), Coefficients(0.02, 1e-6, 1e-4))
    profile = Profile("opt-13b", "A100-80GB", (entry,))
    path = tmp_path / "p.json"
    profile.save(str(path))
    loaded = Profile.load(str(path))
    assert loaded.entries[0].par == Parallel(tp=2)
    assert loaded.entries[0].prefill.b == pytest.approx(1e-4)
    lat = ProfileLatency(loaded)
    assert lat.prefill_time([100, 200], Parallel(tp=2)) == pytest.approx(0.01 + 1e-4 * 300 + 1e-8 * 50000)
    assert lat.decode_time(4, 1000, Parallel(tp=2)) == pytest.approx(0.02 + 1e-3 + 4e-4)
    with pytest.raises(ValueError, match="no prefill fit for tp1 pp1"):
        lat.prefill_time([1], Parallel())
    fallback = AnalyticLatency(load_model("opt-13b"), load_cluster("1x8xA100-80GB"))
    assert ProfileLatency(loaded, fallback).prefill_time([512], Parallel()) == fallback.prefill_time([512], Parallel())


@pytest.mark.parametrize("bad,field", [({"format": "x"}, "format"),
                                       ({"format": "splitserve-profile/1", "entries": []}, "entries"),
                                       ({"format": "splitserve-profile/1", "entries": [{"prefill": {"a": 1}}]},
                                        "prefill")])
def test_bad_profiles(bad, field):
    with pytest.raises(ValueError, match=field):
        Profile.from_dict(bad)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_analytic_model_tracks_distserve_opt13b_fits(tp):
    """The defaults land near DistServe's measured A100 fits for OPT-13B at every profiled TP degree: prefill
    within 12 % for 128-2000-token prompts, decode within 20 % for batches of 8-96 at 900 tokens of context."""
    from splitserve.placement.distserve_profile import load_profiles

    fits = load_profiles()["opt-13b"][tp]
    lat = AnalyticLatency(load_model("opt-13b"), load_cluster("1x8xA100-80GB"))
    for n in (128, 512, 755, 2000):
        a, b, c = fits.prefill
        assert lat.prefill_time([n], Parallel(tp=tp)) == pytest.approx((a + b * n + c * n * n) / 1e3, rel=0.12), n
    for batch in (8, 32, 96):
        a, b, c = fits.decode_large if batch >= fits.large_batch_from else fits.decode_small
        ctx = 900 * batch
        assert lat.decode_time(batch, ctx, Parallel(tp=tp)) == pytest.approx((a + b * ctx + c * batch) / 1e3,
                                                                            rel=0.2), batch


def test_pipeline_stages_cost_their_overhead_and_the_largest_stage():
    """A pp-stage pass pays every stage's forward overhead and runs at the pace of its largest stage (ceil(L/pp)
    layers), so PP is never free latency-wise; a prefill shard of a short prompt (SP) runs its GEMMs below full
    efficiency, so SP's speed-up on short prompts is well under its degree."""
    from splitserve.placement.latency import Efficiency

    model, cluster = load_model("opt-13b"), load_cluster("1x8xA100-80GB")  # 40 layers
    lat = AnalyticLatency(model, cluster)
    one, four, three = (lat.prefill_time([755], Parallel(pp=pp)) for pp in (1, 4, 3))
    assert four - one > 3 * Efficiency().forward_overhead
    assert three > one * 42 / 40  # 14 + 13 + 13 layers: the pipeline runs at the 14-layer stage's pace
    sp = lat.prefill_time([755], Parallel(sp=4, sp_algorithm="ring"))
    assert 2.0 < one / sp < 3.5
    assert 3.5 < lat.prefill_time([16000], Parallel()) / lat.prefill_time([16000], Parallel(sp=4, sp_algorithm="ring"))


def test_tp_speeds_up_prefill_sublinearly():
    lat = AnalyticLatency(load_model("llama-2-13b"), load_cluster("1x8xA100-80GB"))
    t1, t2, t4 = (lat.prefill_time([2048], Parallel(tp=tp)) for tp in (1, 2, 4))
    assert 1.3 < t1 / t2 < 2.0 and 1.3 < t2 / t4 < 2.0


def test_sp_bytes_ring_vs_token_ring():
    mha, gqa = load_model("opt-13b"), load_model("llama-3-8b")  # 40/40 and 32/8 heads
    ring, token = sp_step_bytes(mha, 1, "ring", 1000), sp_step_bytes(mha, 1, "token_ring", 1000)
    assert ring == (1000 * 2 * 40 * 128 * 2, 0.0)
    assert token[0] == 1000 * 40 * 128 * 2 and token[1] == 1000 * 40 * (128 * 2 + 4)
    assert cheaper_sp_algorithm(mha, 1) == "token_ring"  # MHA: heads·d per direction < 2·kv·d
    assert cheaper_sp_algorithm(gqa, 1) == "ring"  # GQA 4:1: K/V are 4x smaller than Q
    lat = AnalyticLatency(gqa, load_cluster("1x8xA100-80GB"))
    long = [32000]
    assert lat.prefill_time(long, Parallel(sp=4, sp_algorithm="ring")) < lat.prefill_time(long, Parallel())


def test_kv_transfer_inter_node_is_slower():
    lat = AnalyticLatency(load_model("opt-13b"), load_cluster("2x8xA100-80GB"))
    intra = lat.kv_transfer_time(1000, Parallel(), Parallel(), True)
    inter = lat.kv_transfer_time(1000, Parallel(), Parallel(), False)
    assert inter / intra == pytest.approx(300e9 / 25e9, rel=0.05)
    assert lat.kv_transfer_time(1000, Parallel(tp=2), Parallel(tp=2), False) == pytest.approx(
        (inter - 10e-6) / 2 + 10e-6, rel=1e-6)


def test_planner_imports_neither_torch_nor_ray():
    """Every placement module, the shared SP cost formula included, imports without torch or ray."""
    code = ("import importlib, pkgutil, sys, splitserve.placement as p\n"
            "for m in pkgutil.iter_modules(p.__path__): importlib.import_module('splitserve.placement.' + m.name)\n"
            "print(sorted({'torch', 'ray'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_fits_never_give_negative_coefficients():
    """Noisy decode steps that a free fit would explain with a negative per-sequence cost (seen on this machine:
    c = -0.05 ms) are fitted with that term at 0, so no shape can get a negative or zero-capacity time."""
    samples = [(1, 32, 0.0102), (4, 128, 0.0101), (4, 512, 0.0112), (8, 256, 0.0100), (2, 1024, 0.0125)]
    from splitserve.placement.linalg import least_squares as free_fit

    free = free_fit([[1.0, float(c), float(b)] for b, c, _ in samples], [t for *_, t in samples])
    assert min(free) < 0  # the unconstrained fit goes negative on these points
    k = fit_decode(samples)
    assert min(k.a, k.b, k.c) >= 0 and k.c == 0.0
    assert all(k.a + k.b * c + k.c * b > 0 for b, c, _ in samples)


def _k(a, b, c):
    return Coefficients(a, b, c)


def test_profile_pipeline_depths_timed_and_derived():
    """A timed depth is used as measured; an untimed one comes from the timed depths of the same (tp, sp):
    interpolated between them, extrapolated past the deepest at that depth's per-stage cost (never a saving)."""
    entries = (ProfileEntry(Parallel(), _k(1e-3, 1e-5, 1e-9), _k(1e-3, 1e-7, 1e-5)),
               ProfileEntry(Parallel(pp=2), _k(3e-3, 1.2e-5, 1e-9), _k(4e-3, 0.5e-7, 2e-5)),
               ProfileEntry(Parallel(pp=4), _k(8e-3, 1.6e-5, 1e-9), None))
    lat = ProfileLatency(Profile("m", "cpu", entries))
    assert lat.prefill_time([100], Parallel(pp=2)) == pytest.approx(3e-3 + 1.2e-3 + 1e-5)
    assert lat.decode_time(4, 400, Parallel(pp=2)) == pytest.approx(4e-3 + 2e-5 + 8e-5)
    # pp 3 lies between the timed 2 and 4; pp 8 lies past 4, each stage adding (pp4 - pp1) / 3.
    assert lat.prefill_time([100], Parallel(pp=3)) == pytest.approx(5.5e-3 + 1.4e-3 + 1e-5)
    assert lat.prefill_time([100], Parallel(pp=8)) == pytest.approx((8e-3 + 4 * 7e-3 / 3) + (1.6e-3 + 4 * 0.2e-3)
                                                                     + 1e-5)
    # Decode was timed at pp 2 only, where its per-token term fell: past it that term stays, the others grow.
    assert lat.decode_time(4, 400, Parallel(pp=3)) == pytest.approx(7e-3 + 0.5e-7 * 400 + 3e-5 * 4)
    with pytest.raises(ValueError, match="no prefill fit for tp2 pp2"):
        lat.prefill_time([100], Parallel(tp=2, pp=2))  # no tp 2 timed at all, no fallback


def test_profile_of_pp1_alone_takes_the_stages_from_the_fallback():
    model, cluster = load_model("tiny", "float32"), load_cluster("1x4xcpu")
    analytic = AnalyticLatency(model, cluster)
    lat = ProfileLatency(Profile("tiny", "cpu", (ProfileEntry(Parallel(), _k(1e-3, 1e-5, 1e-9),
                                                              _k(1e-3, 1e-7, 1e-5)),)), analytic)
    for pp in (2, 4):
        par = Parallel(pp=pp)
        stages = analytic.prefill_time([300], par) - analytic.prefill_time([300], Parallel())
        assert lat.prefill_time([300], par) == pytest.approx(lat.prefill_time([300], Parallel()) + stages)
        stages = analytic.decode_time(8, 800, par) - analytic.decode_time(8, 800, Parallel())
        assert lat.decode_time(8, 800, par) == pytest.approx(lat.decode_time(8, 800, Parallel()) + stages)
        stages = (analytic.mixed_time([50], [0], 8, 800, par) - analytic.mixed_time([50], [0], 8, 800, Parallel()))
        assert lat.mixed_time([50], [0], 8, 800, par) == pytest.approx(lat.mixed_time([50], [0], 8, 800, Parallel())
                                                                      + stages)
    # A TP degree the profile never timed is the fallback's alone.
    assert lat.prefill_time([300], Parallel(tp=2, pp=2)) == analytic.prefill_time([300], Parallel(tp=2, pp=2))


def test_analytic_pipeline_hop_is_its_stage_overhead_and_activation_bytes():
    model, cluster = load_model("small", "float32"), load_cluster("1x4xcpu")
    lat = AnalyticLatency(model, cluster)
    hw, eff = cluster.hardware, lat.eff
    fixed, per_token = lat.pipeline_hop(Parallel(pp=4))
    assert fixed == pytest.approx(eff.forward_overhead + hw.intra_node_latency)
    assert per_token == pytest.approx(model.hidden_size * model.dtype_bytes / (hw.intra_node_bandwidth * eff.link))
    # Summed over the hops, the hop is the whole PP difference of a forward when pp divides the layers.
    assert lat.prefill_time([512], Parallel(pp=4)) - lat.prefill_time([512], Parallel()) == pytest.approx(
        3 * (fixed + 512 * per_token))
    with pytest.raises(ValueError, match="pp: a hop needs at least 2 stages"):
        lat.pipeline_hop(Parallel())


def test_pipeline_hop_fit_recovers_the_stage_cost():
    from splitserve.placement.profile import fit_pipeline_hop

    # pp 3: two hops of 0.4 ms + 0.5 us/token on top of PP 1 forwards of 1 ms + 2 us/token.
    samples = [(n, 1e-3 + 2e-6 * n, 2 * (0.4e-3 + 0.5e-6 * n)) for n in (1, 64, 256, 1024)]
    hop = fit_pipeline_hop(samples, 3)
    assert (hop.fixed, hop.per_token, hop.shapes) == pytest.approx((0.4e-3, 0.5e-6, 4))
    # 5 % noise on the longest forward (51 ms) shifts the fit less than the hop's own size: errors count relative.
    noisy = samples[:-1] + [(1024, samples[-1][1], samples[-1][2] + 0.05 * samples[-1][1])]
    assert fit_pipeline_hop(noisy, 3).fixed == pytest.approx(0.4e-3, abs=0.4e-3)
    with pytest.raises(ValueError, match="two token counts"):
        fit_pipeline_hop(samples[:1], 3)
    with pytest.raises(ValueError, match="pp: the hop cost needs at least 2 stages"):
        fit_pipeline_hop(samples, 1)


def test_analytic_tp_allreduce_is_two_ring_allreduces_per_layer():
    model, cluster = load_model("small", "float32"), load_cluster("1x4xcpu")
    lat = AnalyticLatency(model, cluster)
    hw, eff = cluster.hardware, lat.eff
    fixed, per_token = lat.tp_allreduce(Parallel(tp=4))
    steps = 2 * model.num_layers * 2 * 3  # two all-reduces per layer, 2(n-1) ring steps each
    assert fixed == pytest.approx(steps * hw.intra_node_latency)
    assert per_token == pytest.approx(2 * model.num_layers * 2 * 3 / 4 * model.hidden_size * model.dtype_bytes
                                      / (hw.intra_node_bandwidth * eff.link))
    # The sharded compute is apart: TP 4 is faster than TP 1 on a long prompt by more than it pays to communicate.
    assert lat.prefill_time([2048], Parallel(tp=4)) < lat.prefill_time([2048], Parallel()) - (fixed + 2048 * per_token)
    with pytest.raises(ValueError, match="tp: an all-reduce needs at least 2 ranks"):
        lat.tp_allreduce(Parallel())


def test_analytic_sp_ring_exposed_is_what_attention_does_not_hide():
    model = load_model("llama-3-8b")
    lat = AnalyticLatency(model, load_cluster("1x8xL40S"))
    par = Parallel(sp=4, sp_algorithm="ring")
    fixed, per_token = lat.sp_ring(par)
    forward, _ = sp_step_bytes(model, 1, "ring", 1 / 4)
    hw = lat.cluster.hardware
    assert per_token == pytest.approx(model.num_layers * 3 * forward / (hw.intra_node_bandwidth * lat.eff.link))
    assert fixed == pytest.approx(model.num_layers * 3 * hw.intra_node_latency)
    # Short prompts: little attention to hide behind, the ring shows; long ones: attention (quadratic) hides it.
    short, long = lat.sp_ring_exposed([512], par), lat.sp_ring_exposed([65536], par)
    assert 0 < short <= fixed + 512 * per_token
    assert long == 0.0
    # It is the SP part of a prefill's time: with the link twice as fast, the prefill is faster by its change.
    cluster = lat.cluster
    fast = AnalyticLatency(model, dataclasses.replace(cluster, hardware=dataclasses.replace(
        cluster.hardware, intra_node_bandwidth=2 * cluster.hardware.intra_node_bandwidth)))
    saved = lat.prefill_time([512], par) - fast.prefill_time([512], par)
    assert saved > 0 and saved == pytest.approx(short - fast.sp_ring_exposed([512], par))
    with pytest.raises(ValueError, match="sp: a ring needs at least 2 ranks"):
        lat.sp_ring_exposed([512], Parallel())


def test_overhead_fit_and_sp_entries_without_decode(tmp_path):
    from splitserve.placement.profile import fit_overhead

    samples = [(n, 1e-3 + 2e-6 * n, 0.7e-3 + 0.3e-6 * n) for n in (1, 64, 256, 1024)]
    fit = fit_overhead(samples)
    assert (fit.fixed, fit.per_token, fit.shapes) == pytest.approx((0.7e-3, 0.3e-6, 4))
    with pytest.raises(ValueError, match="two token counts"):
        fit_overhead(samples[:1])
    # SP runs prefill only: its entry has a prefill fit alone, and a decode fit for it is refused by field.
    sp = Parallel(sp=2, sp_algorithm="ring")
    entry = ProfileEntry(sp, Coefficients(2e-3, 1e-5, 1e-9), None)
    path = tmp_path / "p.json"
    Profile("tiny", "cpu", (ProfileEntry(Parallel(), Coefficients(1e-3, 1e-5, 1e-9), Coefficients(1e-3, 0, 0)),
                            entry)).save(str(path))
    lat = ProfileLatency(Profile.load(str(path)))
    assert lat.prefill_time([100], sp) == pytest.approx(2e-3 + 1e-3 + 1e-5)
    assert not lat.covers(sp, "decode")
    with pytest.raises(ValueError, match="decode: sequence parallelism runs prefill only"):
        ProfileEntry(sp, Coefficients(2e-3, 1e-5, 1e-9), Coefficients(1e-3, 0, 0))
    raw = Profile.load(str(path)).to_dict()
    raw["entries"][1]["decode"] = {"a": 1, "b": 0, "c": 0}
    with pytest.raises(ValueError, match=r"profile.entries\[1\].decode: sequence parallelism"):
        Profile.from_dict(raw)
    raw["entries"][1] = {"sp": 2, "prefill": {"a": 1, "b": 0, "c": 0}}
    with pytest.raises(ValueError, match=r"profile.entries\[1\].sp_algorithm"):
        Profile.from_dict(raw)
    known = {"ci_ms": {k: [0, 1] for k in "abc"}, "level": 0.95, "shapes": 4, "samples": 4, "relative_residual": 0}
    raw["entries"][1] = {"prefill": {"a": 1, "b": 0, "c": 0}, "uncertainty": {"prefill": known, "decode": known}}
    with pytest.raises(ValueError, match=r"profile.entries\[1\].uncertainty.decode: no decode fit"):
        Profile.from_dict(raw)
