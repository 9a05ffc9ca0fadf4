"""`splitserve profile` measures our own engine, fits DistServe's forms, and the planner accepts the result."""
import math

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
    assert Profile.load(str(path)).entry(Parallel()) == entry
    out = tmp_path / "plan.yaml"
    code = main(["plan", "--model", "tiny", "--cluster", "1x2xcpu", "--workload", "fixed:64:16", "--ttft", "5",
                 "--tpot", "1", "--attainment", "90", "--profile", str(path), "--output", str(out)])
    assert code in (0, 1), capsys.readouterr().err  # 1 is an explicit "no feasible plan"
    if code == 0:
        assert out.is_file()
