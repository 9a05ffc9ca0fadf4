"""`splitserve profile` measures our own engine, fits DistServe's forms, and the planner accepts the result."""
import math

import pytest
import yaml

from splitserve.cluster import profiler
from splitserve.cluster.cli import main
from splitserve.placement.parallel import Parallel
from splitserve.placement.profile import Profile


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
