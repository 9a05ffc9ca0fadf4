"""`splitserve profile` measures our own engine (in-process, and with `--layouts` through the real ranks of TP, SP
and PP layouts), fits DistServe's forms, and the planner accepts the result."""
import argparse
import math

import pytest
import yaml

from splitserve.cluster import profiler
from splitserve.cluster.cli import main
from splitserve.placement.latency import cheaper_sp_algorithm
from splitserve.placement.parallel import Parallel
from splitserve.placement.profile import Profile, ProfileLatency
from splitserve.placement.specs import load_model
from splitserve.workers.config import load_config
from splitserve.workers.presets import resolve_model


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


LAYOUT_PREFILL = ([64], [128], [64, 64], [256])  # multiples of 2·SP·block_size: no SP padding
LAYOUT_DECODE = [(1, 32), (4, 32), (1, 128)]


@pytest.mark.parametrize("par", [Parallel(tp=2), Parallel(sp=2, sp_algorithm="ring"), Parallel(pp=2)],
                         ids=["tp2", "sp2", "pp2"])
def test_layout_profile_times_real_ranks_and_feeds_the_planner(par, tmp_path, capsys):
    """A layout runs the TP 1 shapes through its ranks (one process each, built as the launcher builds them) and
    each through the whole model alongside; its entry is what the planner uses at that layout (SP: prefill only), and
    what it added to TP 1 is fitted (per stage for a pipeline)."""
    profile, prefill, decode = profiler.profile_model("tiny", repeats=1, prefill_batches=LAYOUT_PREFILL,
                                                      decode_points=LAYOUT_DECODE, resamples=20)
    timing = profiler.profile_layout("tiny", par, repeats=2, prefill_batches=LAYOUT_PREFILL,
                                     decode_points=LAYOUT_DECODE, resamples=20)
    entry = timing.entry
    assert entry.par == par
    timed_decode = [] if par.sp > 1 else [(b, c) for b, c, _ in decode]
    for medians in (timing.timed, timing.alongside):
        assert [ls for ls, _ in medians[0]] == [ls for ls, _ in prefill]
        assert [(b, c) for b, c, _ in medians[1]] == timed_decode
        assert all(t > 0 for *_, t in medians[0] + medians[1])
    assert [len(a) for a in timing.added] == [len(prefill), len(timed_decode)]
    assert (entry.decode is None) == (par.sp > 1) and set(entry.uncertainty) == {"prefill", "decode"} - (
        {"decode"} if par.sp > 1 else set())
    for c in (entry.prefill, entry.decode or entry.prefill):
        assert all(math.isfinite(v) and v >= 0 for v in (c.a, c.b, c.c))
    # The leader's communication, counted through torch.distributed: every TP layer all-reduces twice, every SP ring
    # step sends and receives once per layer, a pipeline sends the residual stream on and takes the logits back.
    calls = timing.calls[0] + timing.calls[1]
    least = {2 * 2: par.tp > 1, 2 * 2 * (par.sp - 1): par.sp > 1, 2: par.pp > 1}
    assert min(calls) >= max(n for n, applies in least.items() if applies)
    times = [t for _, t in timing.timed[0]] + [t for *_, t in timing.timed[1]]
    assert all(0 < b <= t for b, t in zip(timing.blocked[0] + timing.blocked[1], times))
    # Pipeline stages: the single-sequence shapes (3 prefill, 2 decode); otherwise every shape.
    assert timing.overhead.shapes == (5 if par.pp > 1 else len(prefill) + len(timed_decode))
    assert math.isfinite(timing.overhead.fixed) and math.isfinite(timing.overhead.per_token)

    profiler._print_layout(timing, "tiny", "float32", "cpu")
    printed = capsys.readouterr().out
    label = f"{par.tp}x{par.sp}x{par.pp}"
    if par.pp > 1:
        assert f"{label} added to tp 1 (per stage, 5 single-sequence shapes, fitted)" in printed
        assert "the analytic model (cpu): 3.0" in printed  # its forward overhead of 3 ms per stage
    else:
        assert f"{label} added to tp 1 ({timing.overhead.shapes} shapes, fitted)" in printed
    assert ("analytic TP all-reduces (2 per layer x 2 layers)" in printed) == (par.tp > 1)
    assert ("analytic SP ring (ring, 1 steps x 2 layers)" in printed) == (par.sp > 1)

    path = tmp_path / "profile.json"
    Profile(profile.model, profile.hardware, profile.entries + (entry,)).save(str(path))
    latency = ProfileLatency(Profile.load(str(path)))
    k = entry.prefill
    assert latency.prefill_time([64, 64], par) == pytest.approx(k.a + 128 * k.b + 2 * 64 * 64 * k.c, rel=1e-9)
    if entry.decode is not None:
        k = entry.decode
        assert latency.decode_time(4, 128, par) == pytest.approx(k.a + 128 * k.b + 4 * k.c, rel=1e-9)
    k = profile.entry(Parallel()).decode
    assert latency.decode_time(4, 128, Parallel()) == pytest.approx(k.a + 128 * k.b + 4 * k.c, rel=1e-9)


def test_layout_profile_runs_the_instances_model_code():
    """The ranks build the real TP shards: a degree the model code cannot split fails in the rank, reported."""
    with pytest.raises(RuntimeError, match=r"rank \d of 3 \(tp 3 sp 1 pp 1\) failed(.|\n)*num_attention_heads \(4\) "
                                           r"is not divisible by the tensor-parallel size \(3\)"):
        profiler.profile_layout("tiny", Parallel(tp=3), repeats=1, prefill_batches=([64], [128]),
                                decode_points=[(1, 16)])


def test_profile_command_with_layouts(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert main(["profile", "--model", "tiny", "--layouts", "1x2x1", "--repeats", "1", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    algorithm = cheaper_sp_algorithm(load_model("tiny", "float32"), 1)  # what the planner would ask the profile for
    assert "1x2x1 added to tp 1 (9 shapes, fitted)" in printed and "the analytic model (cpu)" in printed
    assert f"analytic SP ring ({algorithm}, 1 steps x 2 layers)" in printed
    saved = Profile.load(str(out))
    assert [e.par for e in saved.entries] == [Parallel(), Parallel(sp=2, sp_algorithm=algorithm)]
    assert saved.entries[1].decode is None


def _args(*argv):
    parser = argparse.ArgumentParser()
    profiler.add_arguments(parser)
    args = parser.parse_args(["--model", "tiny", *argv])
    return profiler._layouts(args, load_config(resolve_model("tiny")), load_model("tiny", "float32"))


def test_layouts_and_the_pp_shorthand():
    assert _args() == []
    assert _args("--pp", "1,2") == [Parallel(pp=2)]
    assert _args("--layouts", "1x1x1,1x1x2") == [Parallel(pp=2)]
    assert _args("--layouts", "2x1x2,1x2x1,2x1x2", "--sp-algorithm", "token_ring") == [
        Parallel(tp=2, pp=2), Parallel(sp=2, sp_algorithm="token_ring")]


@pytest.mark.parametrize("args,message", [
    (["--layouts", "3x1x1"], "--layouts: 3x1x1 cannot run tiny: tp: 3 ranks do not divide the model's 4 attention "
                             "heads"),
    (["--pp", "1,3"], "--pp: 1x1x3 cannot run tiny: pp: 3 stages for 2 layers"),
    (["--pp", "2", "--layouts", "2x1x1"], "--pp: short for --layouts 1x1xP; give one of them"),
    (["--layouts", "1x1x2", "--server", "127.0.0.1:1"], "--layouts: layouts beyond 1x1x1 are timed in-process only"),
])
def test_profile_command_refuses_layouts_by_flag(args, message, tmp_path, capsys):
    """Refused before anything is timed (these layouts would fail, or take minutes, if they ran)."""
    assert main(["profile", "--model", "tiny", *args, "--output", str(tmp_path / "p.json")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--layouts", "2x1", "argument --layouts: expected layouts TPxSPxPP of integers >= 1 like 2x1x1, got '2x1'"),
    ("--layouts", "2x0x1", "argument --layouts: expected layouts TPxSPxPP"),
    ("--pp", "0", "argument --pp: pipeline depths must be integers >= 1"),
])
def test_profile_layout_syntax(flag, value, message, capsys):
    with pytest.raises(SystemExit):
        main(["profile", flag, value])
    assert message in capsys.readouterr().err
