"""The planner against DistServe's Table 1 (OPT on 4 nodes x 8 A100-80GB, ShareGPT, 90 % attainment, no SP): what it
chooses with DistServe's own published profiles and with the analytic model, next to what DistServe reported, and
the goodput per device the simulator gives DistServe's layouts (where their profiles can time them).

    python benchmarks/distserve_table1.py [--requests 400]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from splitserve.placement.distserve_profile import TABLE1, TABLE1_CLUSTER as CLUSTER, DistServeLatency
from splitserve.placement.distserve_profile import layout_per_device as per_device
from splitserve.placement.hardware import load_cluster
from splitserve.placement.latency import AnalyticLatency
from splitserve.placement.metrics import SLO
from splitserve.placement.search import Planner, SearchOptions
from splitserve.placement.specs import load_model
from splitserve.placement.workload import load_workload, make_trace


def row(name: str, requests: int) -> dict:
    ttft, tpot, ds_prefill, ds_decode = TABLE1[name]
    model, cluster = load_model(name), load_cluster(CLUSTER)
    slo = SLO(ttft, tpot, 0.9)
    trace = make_trace(load_workload("sharegpt"), requests, 0, "poisson", 1.0, model.max_positions)
    options = SearchOptions(num_requests=requests, sp_degrees=(1,))
    out = {"model": name, "slo": {"ttft_s": ttft, "tpot_s": tpot}, "distserve": {"prefill": ds_prefill,
                                                                                  "decode": ds_decode}}
    analytic = AnalyticLatency(model, cluster)
    for label, latency in (("distserve_profile", DistServeLatency(name, analytic)), ("analytic", analytic)):
        result = Planner(model, cluster, latency, trace, slo, options).search(None)
        out[label] = {
            "mode": result.mode, "algorithm": result.algorithm,
            "prefill": [result.prefill.par.tp, result.prefill.par.pp], "decode": [result.decode.par.tp,
                                                                                 result.decode.par.pp],
            "prefill_per_device": result.prefill.per_device, "decode_per_device": result.decode.per_device,
            "distserve_prefill_per_device": per_device(latency, model, cluster, trace, slo, "prefill", *ds_prefill),
            "distserve_decode_per_device": per_device(latency, model, cluster, trace, slo, "decode", *ds_decode),
        }
    return out


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "distserve_table1.json"))
    args = ap.parse_args()
    rows = [row(name, args.requests) for name in TABLE1]
    print(f"{'model':<9}{'latency model':<19}{'prefill':<10}{'decode':<10}{'P/dev':>7}{'D/dev':>7}"
          f"{'DistServe P':>13}{'D':>5}{'their P/dev':>13}{'their D/dev':>13}")
    for r in rows:
        for label in ("distserve_profile", "analytic"):
            x = r[label]
            print(f"{r['model']:<9}{label:<19}{'tp%d pp%d' % tuple(x['prefill']):<10}"
                  f"{'tp%d pp%d' % tuple(x['decode']):<10}{x['prefill_per_device']:>7.2f}"
                  f"{x['decode_per_device']:>7.2f}{'tp%d pp%d' % r['distserve']['prefill']:>13}"
                  f"{'tp%d pp%d' % r['distserve']['decode']:>13}"
                  f"{_fmt(x['distserve_prefill_per_device']):>13}{_fmt(x['distserve_decode_per_device']):>13}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"cluster": CLUSTER, "workload": "sharegpt", "attainment": 0.9,
                                             "requests": args.requests, "rows": rows}, indent=2) + "\n")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
