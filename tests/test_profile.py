"""`splitserve profile` measures our own engine (in-process, and with `--pp` through real pipeline stages), fits
DistServe's forms, and the planner accepts the result."""
import math

import pytest
import yaml

from splitserve.cluster import profiler
from splitserve.cluster.cli import main
from splitserve.placement.parallel import Parallel
from splitserve.placement.profile import Profile, ProfileLatency


def test_profile_fits_and_feeds_the_planner(tmp_path, capsys):
    profile, prefill, decode = profiler.profile_model(
        "tiny", repeats=1, prefill_batches=([16], [64], [32, 32], [128]), decode_points=[(1, 32), (4, 32), (4, 128)])
    assert [lengths for lengths, _ in prefill] == [[16], [64], [32, 32], [128]]
    assert [(b, ctx) for b, ctx, _ in decode] == [(1, 32), (4, 128), (4, 512)]
    assert all(t > 0 for *_, t in prefill + decode)
    entry = profile.entry(Parallel())
    assert entry is not None and profile.hardware == "cpu"
    for c in (entry.prefill, entry.decode):
        assert all(math.isfinite(v) for v in (c.a, c.b, c.c))
    path = tmp_path / "profile.json"
    profile.save(str(path))
    loaded = Profile.load(str(path)).entry(Parallel())  # stored in ms: equal up to the last bit of the conversion
    for got, want in ((loaded.prefill, entry.prefill), (loaded.decode, entry.decode)):
        assert (got.a, got.b, got.c) == pytest.approx((want.a, want.b, want.c), rel=1e-12, abs=0)
    out = tmp_path / "plan.yaml"
    # SLOs far above any step time on the fitted profile: a plan must be found, and it must be the profile's.
    code = main(["plan", "--model", "tiny", "--cluster", "1x2xcpu", "--workload", "fixed:64:16", "--ttft", "60",
                 "--tpot", "10", "--attainment", "90", "--rate", "0.5", "--profile", str(path),
                 "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    plan = yaml.safe_load(out.read_text())
    assert plan["model"] == "tiny" and plan["placement"]["cluster"] == "1x2xcpu"
    # At 0.5 req/s one device suffices, so the cheaper colocated plan wins; the disaggregated one was simulated.
    assert plan["placement"]["mode"] == "colocated" and plan["colocated"]["instances"] == 1
    assert plan["placement"]["predicted"]["disaggregated"]["verified_attainment"] >= 0.9


PP_PREFILL = ([16], [64], [32, 32], [128])
PP_DECODE = [(1, 32), (4, 32), (1, 128)]


def test_pipeline_profile_times_real_stages_and_feeds_the_planner(tmp_path):
    """PP 2 runs the PP 1 shapes through two stage processes (and each through the whole model alongside); its
    entry is what the planner uses at pp 2, and the cost of the extra stage comes from the single-sequence shapes."""
    profile, prefill, decode = profiler.profile_model("tiny", repeats=1, prefill_batches=PP_PREFILL,
                                                      decode_points=PP_DECODE, resamples=20)
    entry, staged, alongside, hop = profiler.profile_pipeline("tiny", 2, repeats=2, prefill_batches=PP_PREFILL,
                                                              decode_points=PP_DECODE, resamples=20)
    assert entry.par == Parallel(pp=2)
    for medians in (staged, alongside):
        assert [ls for ls, _ in medians[0]] == [ls for ls, _ in prefill]
        assert [(b, c) for b, c, _ in medians[1]] == [(b, c) for b, c, _ in decode]
        assert all(t > 0 for *_, t in medians[0] + medians[1])
    for c in (entry.prefill, entry.decode):
        assert all(math.isfinite(v) and v >= 0 for v in (c.a, c.b, c.c))
    assert hop.shapes == 5 and math.isfinite(hop.fixed) and math.isfinite(hop.per_token)

    path = tmp_path / "profile.json"
    Profile(profile.model, profile.hardware, profile.entries + (entry,)).save(str(path))
    latency = ProfileLatency(Profile.load(str(path)))
    k = entry.decode
    assert latency.decode_time(4, 128, Parallel(pp=2)) == pytest.approx(k.a + 128 * k.b + 4 * k.c, rel=1e-9)
    k = profile.entry(Parallel()).decode
    assert latency.decode_time(4, 128, Parallel()) == pytest.approx(k.a + 128 * k.b + 4 * k.c, rel=1e-9)


def test_pipeline_profile_reports_a_stage_that_fails():
    with pytest.raises(RuntimeError, match=r"stage \d of 3 failed(.|\n)*3 stages cannot split 2 layers"):
        profiler.profile_pipeline("tiny", 3, repeats=1, prefill_batches=([16], [32]), decode_points=[(1, 16)])


def test_profile_command_with_pipeline_depths(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert main(["profile", "--model", "tiny", "--pp", "2", "--repeats", "1", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "one more stage (pp 2 vs 1, 8 single-sequence shapes)" in printed and "analytic model (cpu)" in printed
    saved = Profile.load(str(out))
    assert [e.par for e in saved.entries] == [Parallel(), Parallel(pp=2)]
    assert main(["profile", "--model", "tiny", "--pp", "1,3", "--output", str(out)]) == 2
    assert "--pp: 3 stages cannot split tiny's 2 layers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["profile", "--pp", "0"])
    assert "argument --pp: pipeline depths must be integers >= 1" in capsys.readouterr().err
