"""Offline batch inference through the disaggregated cluster: JSONL prompts in, one JSONL result per request out,
appended and flushed as each request completes, so a rerun with the same output picks up where the last one stopped.
`python -m splitserve.cluster.batch` or `splitserve batch`; also the entrypoint of a Ray job (docs/ray_jobs.md)."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from splitserve.workers.sampling_params import SamplingParams

TIMING_KEYS = ("queue_s", "ttft_s", "prefill_s", "kv_transfer_s", "tpot_s", "decode_s", "e2e_s")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class BadLine(ValueError):
    def __init__(self, message: str, request_id=None):
        super().__init__(message)
        self.request_id = request_id


@dataclass
class Item:
    """One valid input line, waiting to be sent."""

    line: int
    request_id: str | int
    prompt: str | list[int]
    params: SamplingParams


# ------------------------------------------------------------------------------------------------ output file
def _key(request_id) -> str:
    return json.dumps(request_id)  # 1 and "1" are different ids


def load_done(output: Path, retry_failed: bool = False, warn=print) -> set[str]:
    """Ids already in the output. A torn last line (a crash mid-write) is cut off so appends start on a fresh line;
    with `retry_failed`, failed results are dropped from the file so their ids run again."""
    if not output.exists():
        return set()
    done, kept, good_end, failed = set(), [], 0, 0
    with output.open("rb") as f:
        for number, raw in enumerate(f, 1):
            record = _parse_record(raw)
            if record is None:
                if raw.endswith(b"\n"):
                    warn(f"batch: output line {number} is not a result; ignored")
                    good_end += len(raw)
                    kept.append(raw)
                continue  # a torn last line: its request runs again
            good_end += len(raw)
            if retry_failed and record.get("error") is not None:
                failed += 1
                continue
            done.add(_key(record["id"]))
            kept.append(raw)
    if retry_failed and failed:
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_bytes(b"".join(kept))
        os.replace(tmp, output)
        warn(f"batch: {failed} failed results removed from {output}; those requests run again")
    elif good_end < output.stat().st_size:
        with output.open("r+b") as f:
            f.truncate(good_end)
        warn(f"batch: {output} ended in a partly written line; it was cut off and that request runs again")
    return done


def _parse_record(raw: bytes) -> dict | None:
    if not raw.endswith(b"\n"):
        return None
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and "id" in record else None


def result_record(request_id, token_ids: list[int], text: str, last) -> dict:
    """One output line from a request's tokens, text and last chunk (finish reason, error, metrics)."""
    metrics = dict(last.metrics or {})
    metrics["tpot_s"] = metrics.get("mean_itl_s")
    return {"id": request_id, "text": text, "token_ids": token_ids, "finish_reason": last.finish_reason,
            "usage": {"prompt_tokens": metrics.get("prompt_tokens"), "completion_tokens": len(token_ids)},
            "timing": {k: _round(metrics.get(k)) for k in TIMING_KEYS if k in metrics},
            "instances": {"prefill": metrics.get("prefill_instance"), "decode": metrics.get("decode_instance")},
            "error": last.error}


def _round(value):
    return round(value, 6) if isinstance(value, float) else value


# ------------------------------------------------------------------------------------------------- input lines
def parse_line(line: int, raw: bytes, default_sampling: dict) -> Item:
    """A valid request from input line number `line`, or BadLine naming the field at fault."""
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise BadLine("line is not valid UTF-8") from None
    except ValueError as e:
        raise BadLine(f"invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadLine(f"line must be a JSON object, got {type(data).__name__}")
    if "id" not in data:
        raise BadLine("id: missing")
    rid = data["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        raise BadLine(f"id: must be a non-empty string or an integer, got {rid!r}")
    unknown = sorted(set(data) - {"id", "prompt", "prompt_token_ids", "sampling"})
    if unknown:
        raise BadLine(f"{unknown[0]}: unknown field (known: id, prompt, prompt_token_ids, sampling)", rid)
    return Item(line, rid, _prompt(data, rid), _sampling(data, rid, default_sampling))


def _prompt(data: dict, rid):
    if ("prompt" in data) == ("prompt_token_ids" in data):
        raise BadLine("prompt: give exactly one of prompt (text) or prompt_token_ids (list of ints)", rid)
    if "prompt" in data:
        if not isinstance(data["prompt"], str) or not data["prompt"]:
            raise BadLine(f"prompt: must be a non-empty string, got {data['prompt']!r:.40}", rid)
        return data["prompt"]
    ids = data["prompt_token_ids"]
    if not isinstance(ids, list) or not ids or any(isinstance(t, bool) or not isinstance(t, int) for t in ids):
        raise BadLine(f"prompt_token_ids: must be a non-empty list of ints, got {ids!r:.40}", rid)
    return ids


def _sampling(data: dict, rid, default_sampling: dict) -> SamplingParams:
    sampling = data.get("sampling", {})
    if not isinstance(sampling, dict):
        raise BadLine(f"sampling: must be a JSON object, got {type(sampling).__name__}", rid)
    try:
        return SamplingParams.from_dict({**default_sampling, **sampling})
    except (TypeError, ValueError) as e:
        raise BadLine(f"sampling: {e}", rid) from None


# ---------------------------------------------------------------------------------------------------- progress
class Progress:
    """One line on stderr: redrawn in place on a terminal, printed every `every_s` seconds otherwise (job logs)."""

    def __init__(self, total: int, stream=None, enabled: bool = True, every_s: float = 10.0):
        self.total, self.stream, self.enabled = total, stream or sys.stderr, enabled
        self.tty = enabled and self.stream.isatty()
        self.every_s = 0.2 if self.tty else every_s
        self.last = 0.0
        self.shown = False

    def update(self, stats: "Stats", force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < self.every_s):
            return
        self.last = now
        seen = stats.done + stats.failed + stats.skipped + stats.invalid
        frac = seen / self.total if self.total else 1.0
        bar = "#" * int(frac * 24)
        rate = stats.output_tokens / max(now - stats.started, 1e-9)
        line = (f"[{bar:<24}] {seen}/{self.total} lines: {stats.done} done, {stats.failed} failed, "
                f"{stats.skipped} skipped, {stats.invalid} invalid, {stats.in_flight} in flight, {rate:.1f} tok/s")
        self.stream.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
        self.stream.flush()
        self.shown = self.tty

    def message(self, text: str) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.shown = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self, stats: "Stats") -> None:
        self.update(stats, force=True)
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------------------------------- summary
@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    failed: int = 0
    skipped: int = 0
    invalid: int = 0
    in_flight: int = 0
    output_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)

    def summary(self, interrupted: bool) -> dict:
        wall = time.monotonic() - self.started
        return {"requests": {"done": self.done, "failed": self.failed, "skipped": self.skipped,
                             "invalid_lines": self.invalid},
                "output_tokens": self.output_tokens, "wall_s": round(wall, 3),
                "output_tokens_per_s": round(self.output_tokens / wall, 2) if wall > 0 else 0.0,
                "ttft_s": _percentiles(self.ttft_s), "e2e_s": _percentiles(self.e2e_s), "interrupted": interrupted}


def _percentiles(values: list[float]) -> dict:
    """p50/p90/p99 by linear interpolation between the closest ranks; None without values."""
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    ordered = sorted(values)
    out = {}
    for q in (50, 90, 99):
        pos = (len(ordered) - 1) * q / 100
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        out[f"p{q}"] = round(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo), 6)
    return out


def format_summary(summary: dict, errors_path: Path) -> str:
    r = summary["requests"]

    def ms(p):
        return " / ".join("-" if p[k] is None else f"{p[k] * 1e3:.1f}" for k in ("p50", "p90", "p99"))

    lines = [f"batch: {r['done']} done, {r['failed']} failed, {r['skipped']} skipped (already in the output), "
             f"{r['invalid_lines']} invalid lines in {summary['wall_s']:.2f}s"
             + (" (interrupted)" if summary["interrupted"] else ""),
             f"batch: {summary['output_tokens']} output tokens, {summary['output_tokens_per_s']:.1f} tok/s",
             f"batch: TTFT p50 / p90 / p99 {ms(summary['ttft_s'])} ms; E2E p50 / p90 / p99 {ms(summary['e2e_s'])} ms"]
    if r["invalid_lines"]:
        lines.append(f"batch: invalid lines are listed in {errors_path}")
    if r["failed"]:
        lines.append("batch: failed requests are in the output with their error; rerun with --retry-failed to "
                     "run them again")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- the job
class BatchRun:
    """Feeds a running Cluster from the input file, at most `max_in_flight` requests at a time."""

    def __init__(self, cluster, input_path: Path, output: Path, errors: Path, max_in_flight: int,
                 default_sampling: dict, limit: int | None, retry_failed: bool, progress: bool):
        self.cluster = cluster
        self.input_path, self.output_path, self.errors_path = input_path, output, errors
        self.max_in_flight = max(1, min(max_in_flight, cluster.config.max_queued_requests))
        self.default_sampling = default_sampling
        self.limit = limit
        self.stats = Stats()
        self.progress = Progress(_count_lines(input_path), enabled=progress)
        self.done = load_done(output, retry_failed, warn=self.progress.message)
        self.seen: dict[str, int] = {}  # id -> line of its first occurrence (ids are all that is held per line)
        self.started = 0

    def run(self) -> dict:
        interrupted = False
        on_main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if on_main else None
        with self.output_path.open("a", encoding="utf-8") as out, self.errors_path.open("w", encoding="utf-8") as err:
            self.out, self.err = out, err
            try:
                asyncio.run(self._main(on_main))
            except (KeyboardInterrupt, asyncio.CancelledError):
                interrupted = True
            finally:
                if previous is not None:  # the loop leaves SIGTERM at its default; give back Ray's (or any) handler
                    signal.signal(signal.SIGTERM, previous)
        self.progress.close(self.stats)
        return self.stats.summary(interrupted)

    async def _main(self, on_main_thread: bool) -> None:
        if on_main_thread:  # `ray job stop` sends SIGTERM: stop sending, abort what is in flight, keep the output
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
        items = self._items()
        await asyncio.gather(*(self._worker(items) for _ in range(self.max_in_flight)))

    async def _worker(self, items: Iterator[Item]) -> None:
        for item in items:  # one shared generator; next() never awaits, so workers cannot take the same line
            self.stats.in_flight += 1
            try:
                await self._run_one(item)
            finally:
                self.stats.in_flight -= 1
            self.progress.update(self.stats)

    def _items(self) -> Iterator[Item]:
        with self.input_path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                item = self._check(number, raw)
                if item is None:
                    continue
                if self.limit is not None and self.started >= self.limit:
                    return
                self.started += 1
                yield item

    def _check(self, number: int, raw: bytes) -> Item | None:
        try:
            item = parse_line(number, raw, self.default_sampling)
        except BadLine as e:
            self._bad(number, e.request_id, str(e))
            return None
        key = _key(item.request_id)
        if key in self.seen:
            self._bad(number, item.request_id, f"id: duplicate of line {self.seen[key]}")
            return None
        self.seen[key] = number
        if key in self.done:
            self.stats.skipped += 1
            return None
        return item

    async def _run_one(self, item: Item) -> None:
        tokens, text, last = [], [], None
        stream = self.cluster.stream(item.prompt, item.params, request_id=f"batch-{item.line}")
        try:
            async with contextlib.aclosing(stream):
                async for last in stream:
                    tokens += last.token_ids
                    text.append(last.text)
        except Exception as e:
            if last is None and isinstance(e, (ValueError, TypeError)):
                # refused at admission, before any token: context length, vocabulary, stop strings without a tokenizer
                self._bad(item.line, item.request_id, str(e))
                return
            last = _Failed(f"{type(e).__name__}: {e}")
        self._write(result_record(item.request_id, tokens, "".join(text), last))

    def _write(self, record: dict) -> None:
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.out.flush()
        if record["error"] is None:
            self.stats.done += 1
            self.stats.output_tokens += len(record["token_ids"])
            timing = record["timing"]
            for name in ("ttft_s", "e2e_s"):
                if timing.get(name) is not None:
                    getattr(self.stats, name).append(timing[name])
        else:
            self.stats.failed += 1

    def _bad(self, line: int, request_id, message: str) -> None:
        self.stats.invalid += 1
        self.err.write(json.dumps({"line": line, "id": request_id, "error": message}, ensure_ascii=False) + "\n")
        self.err.flush()
        who = f" (id {request_id!r})" if request_id is not None else ""
        self.progress.message(f"batch: input line {line}{who}: {message}")


@dataclass
class _Failed:
    """The last chunk of a request that failed outside the cluster's own reporting."""

    error: str
    finish_reason: str = "error"
    metrics: dict | None = None


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for raw in f if raw.strip())


def default_errors_path(output: Path) -> Path:
    return output.with_name(output.name + ".errors.jsonl")


def run_batch(cluster, input_path, output_path, errors_path=None, max_in_flight: int = 64,
              default_sampling: dict | None = None, limit: int | None = None, retry_failed: bool = False,
              progress: bool = True) -> dict:
    """Runs every new line of `input_path` on `cluster` (a running Cluster); returns the summary."""
    output = Path(output_path)
    errors = Path(errors_path) if errors_path else default_errors_path(output)
    job = BatchRun(cluster, Path(input_path), output, errors, max_in_flight, dict(default_sampling or {}), limit,
                   retry_failed, progress)
    return job.run()


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
