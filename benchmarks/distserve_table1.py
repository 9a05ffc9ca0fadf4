"""Both searches against DistServe's Table 1 (OPT on 4 nodes x 8 A100-80GB, ShareGPT, 90 % attainment, no SP), next
to what DistServe reported:
- this project's planner (`--search splitserve`) with DistServe's published profiles and with the analytic model, and
  the goodput per device our simulator gives DistServe's layouts (where their profiles can time them);
- DistServe's own search (`--search distserve`: their planner simulator, configuration space and bisection on their
  profiles), its per-GPU rate, the rate it gives Table 1's layout and the layouts tied with its choice.

    python benchmarks/distserve_table1.py [--requests 400] [--distserve-requests 300]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from splitserve.placement.distserve_profile import TABLE1, TABLE1_CLUSTER as CLUSTER, DistServeLatency
from splitserve.placement.distserve_profile import layout_per_device as per_device
from splitserve.placement.distserve_search import DistServeSearch
from splitserve.placement.hardware import load_cluster
from splitserve.placement.latency import AnalyticLatency
from splitserve.placement.metrics import SLO
from splitserve.placement.search import Planner, SearchOptions
from splitserve.placement.specs import load_model
from splitserve.placement.workload import load_workload, make_trace


def _layout(config) -> dict:
    return {"cross_node_pp": config.cross, "prefill": [config.prefill.tp, config.prefill.pp],
            "decode": [config.decode.tp, config.decode.pp], "gpus": config.gpus}


def distserve_search(name: str, requests: int) -> dict:
    """DistServe's own search on its profiles, and where Table 1's layout stands in it."""
    ttft, tpot, ds_prefill, ds_decode = TABLE1[name]
    model = load_model(name)
    trace = make_trace(load_workload("sharegpt"), requests, 0, "poisson", 1.0, model.max_positions)
    start = time.perf_counter()
    choice = DistServeSearch(model, load_cluster(CLUSTER), trace, SLO(ttft, tpot, 0.9)).choose()
    seconds = time.perf_counter() - start
    theirs = [s for s in choice.scored
              if (s.config.prefill.tp, s.config.prefill.pp, s.config.decode.tp, s.config.decode.pp)
              == (*ds_prefill, *ds_decode)]
    table1 = theirs[0] if theirs else None
    return {**_layout(choice.best.config), "per_gpu_rate": choice.best.per_gpu_rate,
            "tied": [_layout(c) for c in choice.ties() if c != choice.best.config],
            "configurations": len(choice.scored), "seconds": round(seconds, 2),
            "table1_per_gpu_rate": table1.per_gpu_rate if table1 else None,
            "table1_refused": table1.reason if table1 else "not in DistServe's configuration space",
            "reproduced": [choice.best.config.prefill.tp, choice.best.config.prefill.pp] == list(ds_prefill)
            and [choice.best.config.decode.tp, choice.best.config.decode.pp] == list(ds_decode)}


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


def _pair(prefill, decode) -> str:
    return "P tp%d pp%d / D tp%d pp%d" % (*prefill, *decode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=400, help="simulated requests for this project's planner")
    ap.add_argument("--distserve-requests", type=int, default=300,
                    help="simulated requests for DistServe's search (its planner's default)")
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "distserve_table1.json"))
    args = ap.parse_args()
    rows = [row(name, args.requests) for name in TABLE1]
    for r in rows:
        r["distserve_search"] = distserve_search(r["model"], args.distserve_requests)
    print(f"{'model':<9}{'search':<30}{'choice':<30}{'per device / GPU':>18}")
    for r in rows:
        print(f"{r['model']:<9}{'DistServe Table 1':<30}{_pair(r['distserve']['prefill'], r['distserve']['decode']):<30}")
        for label in ("distserve_profile", "analytic"):
            x = r[label]
            theirs = f"(theirs {_fmt(x['distserve_prefill_per_device'])} / {_fmt(x['distserve_decode_per_device'])})"
            print(f"{'':<9}{'splitserve, ' + label:<30}{_pair(x['prefill'], x['decode']):<30}"
                  f"{x['prefill_per_device']:>8.2f} / {x['decode_per_device']:.2f} {theirs}")
        d = r["distserve_search"]
        note = "reproduced" if d["reproduced"] else (
            f"Table 1 layout: {d['table1_per_gpu_rate']:.3f}" if d["table1_per_gpu_rate"] is not None
            else f"Table 1 layout refused: {d['table1_refused']}")
        print(f"{'':<9}{'distserve (cross pp %d)' % d['cross_node_pp']:<30}{_pair(d['prefill'], d['decode']):<30}"
              f"{d['per_gpu_rate']:>8.3f}  {note}; {d['seconds']:.1f}s")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"cluster": CLUSTER, "workload": "sharegpt", "attainment": 0.9,
                                             "requests": args.requests,
                                             "distserve_requests": args.distserve_requests, "rows": rows},
                                            indent=2) + "\n")
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
