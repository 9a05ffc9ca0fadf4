"""`splitserve plan`: search a placement for a model, cluster, workload and SLOs, print the candidates and write the
plan YAML. `cluster/cli.py` wires `add_arguments` and `run`; `python -m splitserve.placement.cli` runs it alone."""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from splitserve.placement.hardware import load_cluster
from splitserve.placement.latency import AnalyticLatency
from splitserve.placement.metrics import SLO
from splitserve.placement.plan import plan_from_result
from splitserve.placement.profile import Profile, ProfileLatency
from splitserve.placement.search import NoFeasiblePlan, Planner, SearchOptions, SearchResult
from splitserve.placement.specs import load_model
from splitserve.placement.workload import ARRIVAL_PROCESSES, load_workload, make_trace

SEARCHES = ("splitserve", "distserve")


def _seconds(text: str) -> float:
    """`0.25`, `0.25s` or `250ms`."""
    raw = text.strip().lower()
    scale = 1e-3 if raw.endswith("ms") else 1.0
    raw = raw[:-2] if raw.endswith("ms") else raw[:-1] if raw.endswith("s") else raw
    try:
        value = float(raw) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 0.25, 250ms)") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _fraction(text: str) -> float:
    """`0.9` or `90` (percent)."""
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction (e.g. 0.9 or 90)") from None
    value = value / 100 if value > 1 else value
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1] or (0, 100]")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="preset name (tiny, small, opt-13b, ...) or config.json path")
    parser.add_argument("--dtype", default=None, help="override the model's dtype (float16, bfloat16, float32)")
    parser.add_argument("--cluster", required=True, help="NODESxDEVICESxHARDWARE (e.g. 4x8xA100-80GB) or YAML file")
    parser.add_argument("--workload", default="sharegpt",
                        help="sharegpt | humaneval | longbench | fixed:PROMPT:OUTPUT | trace.jsonl")
    parser.add_argument("--ttft", type=_seconds, required=True, help="TTFT SLO (seconds, or e.g. 250ms)")
    parser.add_argument("--tpot", type=_seconds, required=True, help="TPOT SLO (seconds, or e.g. 100ms)")
    parser.add_argument("--attainment", type=_fraction, default=0.9, help="share of requests meeting both SLOs")
    parser.add_argument("--rate", type=float, default=None,
                        help="target requests/s; without it the plan fills the cluster")
    parser.add_argument("--output", default=None, help="write the plan YAML here (default: print it)")
    parser.add_argument("--profile", default=None, help="fitted latency profile JSON to use over the analytic model, or `distserve` for DistServe's "
                             "published OPT-13B/66B/175B A100-80GB profiles")
    parser.add_argument("--arrival", choices=ARRIVAL_PROCESSES, default="poisson")
    parser.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of gamma arrivals")
    parser.add_argument("--requests", type=int, default=None,
                        help="simulated requests per goodput probe (default 400; 300 with --search distserve, as "
                             "DistServe's planner)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--affinity", choices=("auto", "high", "low"), default="auto",
                        help="DistServe algorithm 1 (high) or 2 (low); auto decides from inter-node bandwidth")
    parser.add_argument("--no-sp", action="store_true", help="leave prefill sequence parallelism out of the search")
    parser.add_argument("--max-pp", type=int, default=None, help="largest pipeline depth to consider")
    parser.add_argument("--search", choices=SEARCHES, default="splitserve",
                        help="splitserve: this project's planner; distserve: DistServe's own search (its planner "
                             "simulator and published OPT A100-80GB profiles, no SP)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


class _ProgressBar:
    """The search's progress as a tqdm bar on stderr; none when stderr is not a terminal."""

    def __init__(self):
        self.bar = tqdm(total=0, unit="layout", file=sys.stderr, disable=None, leave=False)

    def __call__(self, done: int, total: int, label: str) -> None:
        self.bar.total = total
        self.bar.n = done
        self.bar.set_description_str(label, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _table(result: SearchResult) -> str:
    rows = [("role", "layout", "devices", "goodput/inst", "per device", "note")]
    for c in sorted(result.candidates, key=lambda c: (c.role, -c.per_device)):
        chosen = c in (result.prefill, result.decode, result.colocated)
        rows.append((c.role, c.par.label(), str(c.devices), f"{c.goodput:.2f}", f"{c.per_device:.2f}",
                     "chosen" if chosen else (c.reason or "")[:70]))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r[:5], widths)) + "  " + r[5] for r in rows)


def _summary(result: SearchResult) -> str:
    lines = [f"mode: {result.mode}   algorithm: {result.algorithm}"]
    if result.prefill is not None:
        lines.append(f"disaggregated: {result.prefill_instances} x prefill [{result.prefill.par.label()}] + "
                     f"{result.decode_instances} x decode [{result.decode.par.label()}] on {result.devices} devices: "
                     f"{result.goodput:.2f} req/s, {result.goodput_per_device:.3f} req/s per device")
        if result.verified_attainment is not None:
            lines.append(f"  end-to-end simulation at {result.verified_rate:.2f} req/s: "
                         f"attainment {100 * result.verified_attainment:.1f}%")
    c = result.colocated
    if c is not None:
        lines.append(f"colocated:     {result.colocated_instances} x [{c.par.label()}] on "
                     f"{result.colocated_instances * c.devices} devices: {result.colocated_instances * c.goodput:.2f} "
                     f"req/s, {c.per_device:.3f} req/s per device")
        if result.prefill is not None and c.per_device > 0:
            lines.append(f"disaggregation gain per device: x{result.goodput_per_device / c.per_device:.2f}")
    return "\n".join(lines)


def _distserve_table(choice, shown: int = 15) -> str:
    ranked = sorted((s for s in choice.scored if s.per_gpu_rate is not None),
                    key=lambda s: (-s.per_gpu_rate, s.config.gpus))
    rows = [("cross-node pp", "prefill", "decode", "GPUs", "per GPU", "note")]
    for s in ranked[:shown]:
        c = s.config
        rows.append((str(c.cross), c.prefill.label(), c.decode.label(), str(c.gpus), f"{s.per_gpu_rate:.3f}",
                     "chosen" if s is choice.best else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r[:5], widths)) + "  " + r[5] for r in rows]
    refused = len(choice.scored) - len(ranked)
    lines.append(f"({len(ranked)} configurations scored, {refused} refused by DistServe's profiles)")
    return "\n".join(lines)


def _distserve_search(args: argparse.Namespace, model, cluster, trace, slo):
    """DistServe's search for this question; ValueError when DistServe published no profile for the model. Their
    planner's default is low node-affinity, so `auto` means low."""
    from splitserve.placement.distserve_search import DistServeOptions, DistServeProfiles, DistServeSearch

    options = DistServeOptions(affinity="high" if args.affinity == "high" else "low")
    return DistServeSearch(model, cluster, trace, slo, options, DistServeProfiles(model.name))


def _check_distserve_flags(args: argparse.Namespace) -> None:
    if args.search != "distserve":
        return
    if args.profile not in (None, "distserve"):
        raise ValueError(f"--profile: --search distserve runs on DistServe's published profiles; got "
                         f"{args.profile!r} (leave it out or pass distserve)")
    if args.max_pp is not None:
        raise ValueError("--max-pp: --search distserve searches DistServe's own space (PP dividing the layers)")


def run(args: argparse.Namespace) -> int:
    try:
        model = load_model(args.model, args.dtype)
        cluster = load_cluster(args.cluster)
        workload = load_workload(args.workload)
        slo = SLO(args.ttft, args.tpot, args.attainment)
        if args.rate is not None and not args.rate > 0:
            raise ValueError(f"rate: must be positive, got {args.rate!r}")
        _check_distserve_flags(args)
        if args.requests is None:
            args.requests = 300 if args.search == "distserve" else 400
        latency = AnalyticLatency(model, cluster)
        if args.profile == "distserve":  # DistServe's published OPT profiles (A100-80GB)
            from splitserve.placement.distserve_profile import DistServeLatency

            latency = DistServeLatency(args.model, fallback=latency)
        elif args.profile:
            latency = ProfileLatency(Profile.load(args.profile), fallback=latency)
        trace = make_trace(workload, args.requests, args.seed, args.arrival, args.cv, model.max_positions)
        options = SearchOptions(num_requests=args.requests, seed=args.seed, affinity=args.affinity,
                                sp_degrees=(1,) if args.no_sp else (1, 2, 4, 8), max_pp=args.max_pp)
        distserve = _distserve_search(args, model, cluster, trace, slo) if args.search == "distserve" else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bar = None if args.quiet else _ProgressBar()
    start = time.perf_counter()
    try:
        if distserve is not None:
            distserve.progress = bar
            choice = distserve.choose()
            result, table = distserve.as_result(choice, args.rate), _distserve_table(choice)
        else:
            result = Planner(model, cluster, latency, trace, slo, options, bar).search(args.rate)
            table = _table(result)
    except NoFeasiblePlan as exc:
        print(f"{exc}", file=sys.stderr)
        return 1
    finally:
        if bar:
            bar.close()
    print(table)
    print()
    print(_summary(result))
    searched = "DistServe configurations" if args.search == "distserve" else f"{len(result.candidates)} layouts"
    print(f"searched {searched} in {time.perf_counter() - start:.1f}s")
    plan = plan_from_result(result, args.model, model.dtype, cluster.name, slo, args.workload, args.rate)
    if args.output:
        plan.save(args.output)
        print(f"wrote {args.output}")
    else:
        print()
        print(plan.to_yaml(), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitserve plan", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
