"""Offline batch inference through the disaggregated cluster: JSONL prompts in, one JSONL result per request out,
appended and flushed as each request completes, so a rerun with the same output picks up where the last one stopped.
`python -m splitserve.cluster.batch` or `splitserve batch`; also the entrypoint of a Ray job (docs/ray_jobs.md).

This module is the command line; the files (`batch_jsonl`), the driver (`batch_driver`) and the summary
(`batch_summary`) live in their own modules. `run_batch` is importable from here too."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from splitserve.cluster.batch_driver import run_batch
from splitserve.cluster.batch_jsonl import default_errors_path
from splitserve.cluster.batch_summary import format_summary
from splitserve.workers.sampling_params import SamplingParams

__all__ = ["add_arguments", "main", "run", "run_batch"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# ------------------------------------------------------------------------------------------------ command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="JSONL: {id, prompt | prompt_token_ids, sampling?} per line")
    p.add_argument("--output", required=True, help="JSONL results, appended; ids already there are skipped")
    p.add_argument("--config", default=None, help="cluster YAML (default: tiny, 1 prefill + 1 decode)")
    p.add_argument("--address", default=None,
                   help="attach to this Ray cluster (auto, host:port, ray://host:port) instead of ray.address; "
                        "default: ray.address, else RAY_ADDRESS, else a local Ray")
    p.add_argument("--errors", default=None, help="JSONL of invalid lines (default: <output>.errors.jsonl)")
    p.add_argument("--max-in-flight", type=int, default=64, help="requests sent to the cluster at once (default 64)")
    p.add_argument("--sampling", default=None, type=_json_object,
                   help='default sampling for every line as JSON, e.g. \'{"temperature": 0, "max_tokens": 64}\'; '
                        "a line's own sampling keys override it")
    p.add_argument("--limit", type=int, default=None, help="send at most N new requests, then stop")
    p.add_argument("--retry-failed", action="store_true", help="run again the ids whose result has an error")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _check_args(args) -> None:
    if args.max_in_flight < 1:
        raise ValueError(f"--max-in-flight: must be >= 1, got {args.max_in_flight}")
    if args.limit is not None and args.limit < 0:
        raise ValueError(f"--limit: must be >= 0, got {args.limit}")
    if not Path(args.input).is_file():
        raise FileNotFoundError(f"--input: no such file {args.input}")
    if Path(args.input).resolve() == Path(args.output).resolve():
        raise ValueError("--output: must not be the input file")
    for flag, path in (("--output", args.output), ("--errors", args.errors)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise FileNotFoundError(f"{flag}: no such directory {Path(path).resolve().parent}")
    if args.sampling:
        try:
            SamplingParams.from_dict(args.sampling)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--sampling: {e}") from None


def _config(args):
    from splitserve.cluster.config import load_config

    config = load_config(args.config)
    if args.address:
        config = dataclasses.replace(config, ray=dataclasses.replace(config.ray, address=args.address))
    return config


def run(args) -> int:
    """`splitserve batch`: 0 when every line succeeded or was skipped, 1 when some failed or were invalid,
    2 on usage errors, 130 when interrupted."""
    from splitserve.cluster.cluster import Cluster

    try:
        _check_args(args)
        config = _config(args)
        start = time.perf_counter()
        cluster = Cluster(config)
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        print(f"splitserve batch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    try:
        layout = ", ".join(f"{n} (tp{i.spec.tp})" for n, i in cluster.instances.items())
        print(f"batch: cluster up in {time.perf_counter() - start:.1f}s: {layout}", file=sys.stderr)
        errors = Path(args.errors) if args.errors else default_errors_path(Path(args.output))
        summary = run_batch(cluster, args.input, args.output, errors, args.max_in_flight, args.sampling, args.limit,
                            args.retry_failed, not args.no_progress)
    finally:
        cluster.shutdown()
    print(format_summary(summary, errors))
    if summary["interrupted"]:
        return EXIT_INTERRUPTED
    r = summary["requests"]
    return EXIT_FAILED if r["failed"] or r["invalid_lines"] else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splitserve batch", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
