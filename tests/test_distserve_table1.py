"""The planner with DistServe's own published A100-80GB OPT profiles, and against the placements DistServe reported
in its Table 1 (ShareGPT, 4 x 8 A100-80GB, 90 % attainment, no SP). The planner does not pick the same layouts (see
the README's Figures and benchmarks/distserve_table1.py); what must hold is that, under the same profiles and
simulator, its choice serves at least as much per device as DistServe's, and that it never offers a layout the
profiles cannot time."""
import pytest

from splitserve.placement import distserve_profile as table1
from splitserve.placement.distserve_profile import DistServeLatency, load_profiles
from splitserve.placement.hardware import load_cluster
from splitserve.placement.latency import AnalyticLatency
from splitserve.placement.metrics import SLO
from splitserve.placement.parallel import Parallel
from splitserve.placement.search import Planner, SearchOptions
from splitserve.placement.specs import load_model
from splitserve.placement.workload import load_workload, make_trace

REQUESTS = 200


def _latency(name):
    return DistServeLatency(name, AnalyticLatency(load_model(name), load_cluster(table1.TABLE1_CLUSTER)))


def test_profile_times_follow_distserves_forms():
    lat = _latency("opt-13b")
    tp2 = load_profiles()["opt-13b"][2]
    a, b, c = tp2.prefill
    # one prefill stage of pp costs 1/pp of the TP time plus pp ms: a whole pass, the TP time plus pp^2 ms
    assert lat.prefill_time([300, 500], Parallel(tp=2)) == pytest.approx(
        (a + b * 800 + c * (300**2 + 500**2) + 1) / 1e3)
    assert lat.prefill_time([300], Parallel(tp=2, pp=4)) - lat.prefill_time([300], Parallel(tp=2)) == \
        pytest.approx(15e-3)
    small, large = tp2.decode_small, tp2.decode_large
    assert lat.decode_time(8, 4000, Parallel(tp=2)) == pytest.approx((small[0] + small[1] * 4000 + small[2] * 8) / 1e3)
    assert lat.decode_time(tp2.large_batch_from, 90000, Parallel(tp=2, pp=2)) == pytest.approx(
        (large[0] + large[1] * 90000 + large[2] * tp2.large_batch_from) / 1e3)
    assert lat.layout_problem(Parallel(tp=8)) == "DistServe profiled TP [1, 2, 4] for opt-13b, not TP 8"
    assert "sequence parallelism" in lat.layout_problem(Parallel(tp=2, sp=2, sp_algorithm="ring"))
    with pytest.raises(ValueError, match="not TP 8"):
        lat.prefill_time([10], Parallel(tp=8))
    with pytest.raises(ValueError, match="no profile for 'llama-2-7b'"):
        _latency("llama-2-7b")


@pytest.mark.parametrize("name", sorted(table1.TABLE1))
def test_table1_row(name):
    ttft, tpot, ds_prefill, ds_decode = table1.TABLE1[name]
    model, cluster = load_model(name), load_cluster(table1.TABLE1_CLUSTER)
    latency, slo = _latency(name), SLO(ttft, tpot, 0.9)
    trace = make_trace(load_workload("sharegpt"), REQUESTS, 0, "poisson", 1.0, model.max_positions)
    result = Planner(model, cluster, latency, trace, slo, SearchOptions(num_requests=REQUESTS, sp_degrees=(1,))
                     ).search(None)
    assert result.mode == "disaggregated"
    for chosen in (result.prefill.par, result.decode.par):  # only layouts DistServe's profiles time, no SP
        assert chosen.sp == 1 and latency.layout_problem(chosen) is None
    assert result.devices <= cluster.num_devices
    for role, chosen, theirs in (("prefill", result.prefill, ds_prefill), ("decode", result.decode, ds_decode)):
        reported = table1.layout_per_device(latency, model, cluster, trace, slo, role, *theirs)
        if reported is None:  # OPT-175B at TP 3: their published profiles have no TP 3 curve
            assert name == "opt-175b" and theirs[0] == 3
            continue
        assert chosen.per_device >= reported * 0.98, (role, chosen.par.label(), reported)
