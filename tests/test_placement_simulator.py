"""Simulator behaviour: determinism, KV-capacity limits, batching, and the workload generator's means."""

import json
import math

import numpy as np
import pytest

from splitserve.placement.hardware import load_cluster
from splitserve.placement.latency import AnalyticLatency
from splitserve.placement.metrics import SLO, SimResult
from splitserve.placement.parallel import Parallel
from splitserve.placement.percentiles import percentile
from splitserve.placement.profile import Coefficients, Profile, ProfileEntry, ProfileLatency
from splitserve.placement.shared_host import SharedHost, simulate_shared_host
from splitserve.placement.simulator import (simulate_colocated_trace, simulate_decode, simulate_disaggregated,
                                            simulate_prefill)
from splitserve.placement.specs import load_model
from splitserve.placement.workload import load_workload, make_trace

OPT13B = ProfileLatency(Profile("opt-13b", "A100-80GB", (ProfileEntry(
    Parallel(), Coefficients(18.10e-3, 0.1019e-3, 7.12e-9), Coefficients(19.93e-3, 6.27e-7, 0.0385e-3)),)))


def test_deterministic_under_seed():
    trace_a = make_trace(load_workload("sharegpt"), 300, seed=7)
    trace_b = make_trace(load_workload("sharegpt"), 300, seed=7)
    assert trace_a == trace_b
    assert trace_a != make_trace(load_workload("sharegpt"), 300, seed=8)
    runs = [simulate_disaggregated(OPT13B, trace_a, 3.0, Parallel(), Parallel()) for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("name,prompt,output", [("sharegpt", 755, 200), ("humaneval", 171, 98),
                                                ("longbench", 1738, 91)])
def test_synthetic_workload_means(name, prompt, output):
    trace = make_trace(load_workload(name), 20_000, seed=1)
    assert sum(trace.prompts) / len(trace) == pytest.approx(prompt, rel=0.05)
    assert sum(trace.outputs) / len(trace) == pytest.approx(output, rel=0.05)


def test_gamma_arrivals_rate_and_burstiness():
    trace = make_trace(load_workload("fixed:10:10"), 20_000, seed=3, process="gamma", cv=2.0)
    gaps = [b - a for a, b in zip((0.0,) + trace.unit_arrivals, trace.unit_arrivals)]
    mean = sum(gaps) / len(gaps)
    var = sum((g - mean) ** 2 for g in gaps) / len(gaps)
    assert mean == pytest.approx(1.0, rel=0.05)
    assert var ** 0.5 / mean == pytest.approx(2.0, rel=0.1)


def test_trace_file(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"prompt_len": p, "output_len": 5}) for p in (10, 20, 30)) + "\n")
    w = load_workload(str(path))
    assert w.mean_prompt == 20
    trace = make_trace(w, 50, seed=0)
    assert set(trace.prompts) <= {10, 20, 30} and set(trace.outputs) == {5}
    path.write_text('{"prompt": 1}\n')
    with pytest.raises(ValueError, match="t.jsonl:1"):
        load_workload(str(path))


@pytest.mark.parametrize("spec", ["fixed:0:1", "fixed:12", "nope"])
def test_bad_workloads(spec):
    with pytest.raises(ValueError, match="workload"):
        load_workload(spec)


def test_batching_raises_prefill_throughput():
    trace = make_trace(load_workload("fixed:256:1"), 2000, seed=0)
    arrivals = trace.at_rate(25.0)  # above the unbatched capacity of ~1/0.0449 s = 22 req/s
    one = simulate_prefill(OPT13B, Parallel(), arrivals, trace.prompts, 1, token_budget=0)
    batched = simulate_prefill(OPT13B, Parallel(), arrivals, trace.prompts, 1, token_budget=2048)
    late_one = one[-1] - arrivals[-1]
    late_batched = batched[-1] - arrivals[-1]
    assert late_one > 5.0 and late_batched < 1.0


def test_decode_kv_capacity_limits_batch():
    # 10 identical requests arriving together, capacity for 2 at a time: 5 waves of 9 steps each.
    step = 0.01
    lat = ProfileLatency(Profile("m", "h", (ProfileEntry(Parallel(), None, Coefficients(step, 0, 0)),)))
    finish = simulate_decode(lat, Parallel(), [0.0] * 10, [90] * 10, [10] * 10, kv_capacity=200)
    assert sorted(finish) == pytest.approx(sorted([step * 9 * (1 + i // 2) for i in range(10)]))
    # A request larger than the whole cache can never run: reported as missing the SLO, not hanging.
    assert simulate_decode(lat, Parallel(), [0.0], [500], [10], kv_capacity=200) == [float("inf")]


def test_colocated_chunked_vs_prefill_priority():
    trace = make_trace(load_workload("fixed:512:64"), 600, seed=0)
    slo = SLO(0.4, 0.04, 0.9)
    chunked = simulate_colocated_trace(OPT13B, trace, 2.0, Parallel(), token_budget=512, chunked=True)
    whole = simulate_colocated_trace(OPT13B, trace, 2.0, Parallel(), token_budget=2048, chunked=False)
    assert min(chunked.tpot) > 0.019 and min(whole.ttft) >= 0.072 - 1e-9
    # Prefill priority stalls running decodes, so its worst TPOT is worse than SplitFuse's.
    assert max(whole.tpot) > max(chunked.tpot)
    assert 0.0 <= chunked.attainment(slo) <= 1.0


def test_pp_pipelines_prefill():
    lat = AnalyticLatency(load_model("llama-2-13b"), load_cluster("1x8xA100-80GB"))
    trace = make_trace(load_workload("fixed:1024:1"), 3000, seed=0)
    capacity = 1 / lat.prefill_time([1024], Parallel())
    arrivals = trace.at_rate(1.5 * capacity)  # overloads pp=1, not pp=2
    pp1 = simulate_prefill(lat, Parallel(), arrivals, trace.prompts, 1, token_budget=0)
    pp2 = simulate_prefill(lat, Parallel(pp=2), arrivals, trace.prompts, 1, token_budget=0)
    assert pp1[-1] - arrivals[-1] > 10 * (pp2[-1] - arrivals[-1])


def test_percentiles_interpolate_like_numpy_and_attainment_stays_a_fraction():
    values = [0.4, 0.1, 0.3, 0.2, 0.9, 0.5, 0.7]
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)  # between ranks: 0.9 * 3 = 2.7
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    result = SimResult(ttft=(1.0, 2.0, 3.0, 4.0), tpot=(0.1, 0.1, 0.3, 0.1))
    summary = result.summary()
    assert summary["p90_ttft_s"] == pytest.approx(3.7) and summary["p90_tpot_s"] == pytest.approx(0.24)
    assert result.attainment(SLO(ttft=3.0, tpot=0.2)) == 0.5  # requests 1 and 2 of 4 meet both targets
    assert math.isnan(SimResult((), ()).summary()["p90_ttft_s"])


# Constant-time forwards for hand-computed timelines: a prefill batch takes 0.1 s, a decode step 0.01 s.
CONSTANT = ProfileLatency(Profile("m", "h", (ProfileEntry(Parallel(), Coefficients(0.1, 0, 0),
                                                          Coefficients(0.01, 0, 0)),)))


def _shared(arrivals, outputs, host, handoff=0.0):
    return simulate_shared_host(CONSTANT, Parallel(), Parallel(), arrivals, [16] * len(arrivals), outputs, host,
                                handoff)


def test_shared_host_without_coupling_is_prefill_then_decode():
    trace = make_trace(load_workload("humaneval"), 400, seed=3)
    lat = ProfileLatency(Profile("m", "h", (ProfileEntry(Parallel(), Coefficients(0.03, 5e-4, 2e-7),
                                                         Coefficients(0.011, 3e-6, 6e-4)),)))
    for rate in (2.0, 7.0):
        arrivals = trace.at_rate(rate)
        first = simulate_prefill(lat, Parallel(), arrivals, trace.prompts, 1, 4096)
        finish = simulate_decode(lat, Parallel(), [f + 0.005 for f in first], trace.prompts, trace.outputs, 1,
                                 20_000, 64)
        first2, finish2 = simulate_shared_host(lat, Parallel(), Parallel(), arrivals, trace.prompts, trace.outputs,
                                               SharedHost(), 0.005, 20_000, 64, 4096)
        assert first2 == pytest.approx(first, abs=1e-12)
        assert [e for e, o in zip(finish2, trace.outputs) if o > 1] == pytest.approx(
            [e for e, o in zip(finish, trace.outputs) if o > 1], abs=1e-12)


def test_decode_steps_slow_while_a_prefill_computes():
    # A: prefilled 0-0.1 s, then 10 steps of 0.01 s. B's prefill (0.105-0.205 s) runs beside A's steps: at half
    # speed A has done 5.5 steps' work by 0.205 s, and its last step ends at 0.25 s instead of 0.2 s. B joins at
    # the step boundary after its KV is ready (0.21 s) for its 2 steps.
    assert _shared([0.0, 0.105], [11, 3], SharedHost())[1][0] == pytest.approx(0.2)
    first, finish = _shared([0.0, 0.105], [11, 3], SharedHost(decode_slowdown=1.0))
    assert first == pytest.approx([0.1, 0.205]) and finish == pytest.approx([0.25, 0.23])
    # The other way round: B's prefill at half speed while A decodes (until 0.2 s), then at full speed.
    first, finish = _shared([0.0, 0.105], [11, 3], SharedHost(prefill_slowdown=1.0))
    assert first == pytest.approx([0.1, 0.2525]) and finish == pytest.approx([0.2, 0.2725])


def test_reservation_waits_for_the_decode_step_and_prefill_for_its_push():
    # B arrives at 0.105 s, inside A's first step (0.1-0.11 s): its reservation, then its prefill, starts at 0.11 s.
    first, _ = _shared([0.0, 0.105], [11, 3], SharedHost(reserve_waits_for_step=True))
    assert first == pytest.approx([0.1, 0.21])
    assert _shared([0.0, 0.105], [11, 3], SharedHost())[0] == pytest.approx([0.1, 0.205])
    # B waits behind A's prefill; with the push holding the prefill leader it starts after A's 0.03 s hand-off.
    first, finish = _shared([0.0, 0.01], [2, 2], SharedHost(push_holds_prefill=True), handoff=0.03)
    assert first == pytest.approx([0.1, 0.23]) and finish == pytest.approx([0.14, 0.27])
    assert _shared([0.0, 0.01], [2, 2], SharedHost(), handoff=0.03)[0] == pytest.approx([0.1, 0.2])
    with pytest.raises(ValueError, match="decode_slowdown"):
        SharedHost(decode_slowdown=-0.1)


def test_shared_host_counts_busy_time_as_the_leaders_do():
    # The timeline above with decode at half speed beside B's prefill: the decode instance computes without a break
    # from 0.1 s to A's last step at 0.25 s (A's 10 steps; B's 2 ride in them), the prefill computes 2 x 0.1 s.
    usage = {}
    simulate_shared_host(CONSTANT, Parallel(), Parallel(), [0.0, 0.105], [16, 16], [11, 3],
                         SharedHost(decode_slowdown=1.0), usage=usage)
    assert usage == pytest.approx({"prefill_busy_s": 0.2, "prefill_batches": 2, "decode_busy_s": 0.15,
                                   "decode_steps": 10})
    # A prefill leader that waits for its pushes is busy for the hand-off too, as its timed step is.
    simulate_shared_host(CONSTANT, Parallel(), Parallel(), [0.0, 0.01], [16, 16], [2, 2],
                         SharedHost(push_holds_prefill=True), 0.03, usage=usage)
    assert usage["prefill_busy_s"] == pytest.approx(0.26) and usage["prefill_batches"] == 2
    assert usage["decode_busy_s"] == pytest.approx(0.02) and usage["decode_steps"] == 2
