"""The driver of a batch job: feeds a running Cluster from the input file with a bounded number of requests in
flight, writes each result as it completes, and reports progress on stderr."""
from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from splitserve.cluster.batch_jsonl import (BadLine, Item, count_lines, default_errors_path, load_done, parse_line,
                                            request_key, result_record)
from splitserve.cluster.batch_summary import Stats


class Progress:
    """Progress on stderr. On a terminal, a tqdm bar over the input's lines; in job logs (stderr not a terminal) no
    bar, a status line every `every_s` seconds instead; nothing with progress off. Messages always print (above the
    bar when there is one)."""

    def __init__(self, total: int, enabled: bool = True, every_s: float = 10.0):
        self.stream = sys.stderr  # looked up now, not at import, so redirection (and pytest capture) applies
        self.total = total
        self.bar = tqdm(total=total, unit="line", file=self.stream, disable=None if enabled else True)
        self.log_every_s = every_s if enabled and self.bar.disable else None
        self.logged = 0.0

    def update(self, stats: Stats, force: bool = False) -> None:
        if self.bar.disable and self.log_every_s is None:
            return
        rate = stats.output_tokens / max(time.monotonic() - stats.started, 1e-9)
        status = (f"{stats.done} done, {stats.failed} failed, {stats.skipped} skipped, {stats.invalid} invalid, "
                  f"{stats.in_flight} in flight, {rate:.1f} tok/s")
        if not self.bar.disable:
            self.bar.set_postfix_str(status, refresh=False)
            self.bar.update(stats.lines_seen - self.bar.n)
            if force:
                self.bar.refresh()
        elif self.log_every_s is not None:
            now = time.monotonic()
            if force or now - self.logged >= self.log_every_s:
                self.logged = now
                self.stream.write(f"{stats.lines_seen}/{self.total} lines: {status}\n")
                self.stream.flush()

    def message(self, text: str) -> None:
        tqdm.write(text, file=self.stream)

    def close(self, stats: Stats) -> None:
        self.update(stats, force=True)
        self.bar.close()


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
        self.progress = Progress(count_lines(input_path), enabled=progress)
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
        key = request_key(item.request_id)
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


def run_batch(cluster, input_path, output_path, errors_path=None, max_in_flight: int = 64,
              default_sampling: dict | None = None, limit: int | None = None, retry_failed: bool = False,
              progress: bool = True) -> dict:
    """Runs every new line of `input_path` on `cluster` (a running Cluster); returns the summary."""
    output = Path(output_path)
    errors = Path(errors_path) if errors_path else default_errors_path(output)
    job = BatchRun(cluster, Path(input_path), output, errors, max_in_flight, dict(default_sampling or {}), limit,
                   retry_failed, progress)
    return job.run()
