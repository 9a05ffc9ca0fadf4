"""Batch inference through the cluster: results equal transformers, at most --max-in-flight requests are in the
cluster at once, bad lines go to the errors file with their line numbers, an interrupted batch resumes with every
id exactly once, failed results can be retried, and a layout that cannot be placed says what is missing."""
import io
import json
import sys

import pytest
import yaml

from cluster_helpers import config, references, workload, write_checkpoint
from splitserve.cluster.batch import main, run_batch
from splitserve.cluster.batch_driver import Progress
from splitserve.cluster.batch_summary import Stats
from splitserve.cluster.cluster import Cluster


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint("llama", tmp_path_factory.mktemp("llama"), seed=51)


@pytest.fixture(scope="module")
def cluster(ray_runtime, ckpt):
    with Cluster(config(ckpt)) as c:
        yield c


@pytest.fixture(scope="module")
def requests(ckpt):
    """Ten valid input lines (ids of both kinds, one text prompt) and each id's transformers tokens."""
    prompts, params = workload(10, seed=5)
    lines = [{"id": i if i % 2 == 0 else f"r{i}", "prompt_token_ids": p,
              "sampling": {"temperature": 0.0, "max_tokens": sp.max_tokens, "ignore_eos": True}}
             for i, (p, sp) in enumerate(zip(prompts, params))]
    from splitserve.workers.tokenizer import load_tokenizer

    text = "Prefill and decode on separate GPUs"
    lines[3] = {"id": "r3", "prompt": text, "sampling": lines[3]["sampling"]}
    prompts[3] = load_tokenizer(ckpt).encode(text).ids
    expected = dict(zip((json.dumps(line["id"]) for line in lines), references(ckpt, prompts, params)))
    return lines, expected


class CountingCluster:
    """The cluster, counting how many requests it holds at once."""

    def __init__(self, cluster):
        self.cluster, self.config = cluster, cluster.config
        self.now = self.peak = 0

    async def stream(self, *args, **kwargs):
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            async for chunk in self.cluster.stream(*args, **kwargs):
                yield chunk
        finally:
            self.now -= 1


def _write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _results(path) -> dict:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {json.dumps(r["id"]): r for r in records}
    assert len(by_id) == len(records), "an id appears more than once"
    return by_id


def _assert_match(results: dict, expected: dict):
    assert set(results) == set(expected)
    for key, record in results.items():
        assert record["error"] is None, record
        assert record["token_ids"] == expected[key], key
        assert record["finish_reason"] == "length"
        assert record["usage"]["completion_tokens"] == len(expected[key])
        assert record["timing"]["ttft_s"] > 0 and record["timing"]["e2e_s"] >= record["timing"]["ttft_s"]


def test_batch_matches_transformers_and_reports_bad_lines(cluster, requests, tmp_path):
    lines, expected = requests
    long_prompt = {"id": "long", "prompt_token_ids": [5] * 1000, "sampling": {"max_tokens": 100}}
    bad = [  # (input line, error substring)
        ("{not json", "invalid JSON"),
        ({"prompt": "no id"}, "id: missing"),
        ({"id": 0, "prompt": "again"}, "id: duplicate of line 1"),
        ({"id": "t", "prompt": "x", "sampling": {"temperature": -1}}, "sampling: temperature must be in"),
        ({"id": "u", "prompt": "x", "sampling": {"tempreature": 0}}, "sampling: unknown sampling parameter(s)"),
        (long_prompt, "max_tokens: prompt (1000 tokens) + max_tokens (100) exceeds the context length (1024)"),
        ({"id": "v", "prompt_token_ids": [3, 512]}, "prompt_token_ids: 512 is not a token id in [0, 512)"),
        ({"id": "w"}, "prompt: give exactly one of prompt"),
        ({"id": True, "prompt": "x"}, "id: must be a non-empty string or an integer"),
        ({"id": "x", "promt": "typo"}, "promt: unknown field"),
    ]
    mixed, want_errors = [], []
    for i, line in enumerate(lines):  # a bad line after every valid one, and one blank line
        mixed.append(line)
        if i < len(bad):
            mixed.append(bad[i][0])
            want_errors.append((len(mixed), bad[i][1]))
    mixed.insert(4, "")
    want_errors = [(n + (n > 4), msg) for n, msg in want_errors]
    inp = _write_lines(tmp_path / "in.jsonl", mixed)
    counting = CountingCluster(cluster)

    summary = run_batch(counting, inp, tmp_path / "out.jsonl", max_in_flight=3, progress=False)

    _assert_match(_results(tmp_path / "out.jsonl"), expected)
    assert counting.peak == 3 and counting.now == 0
    errors = [json.loads(line) for line in (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines()]
    assert len(errors) == len(bad)
    by_line = {e["line"]: e["error"] for e in errors}
    for line, message in want_errors:
        assert message in by_line.get(line, ""), (line, message, by_line)
    assert {e["line"]: e["id"] for e in errors}[want_errors[2][0]] == 0  # the duplicate names its id
    assert summary["requests"] == {"done": 10, "failed": 0, "skipped": 0, "invalid_lines": len(bad)}
    assert summary["output_tokens"] == sum(len(t) for t in expected.values())
    assert 0 < summary["ttft_s"]["p50"] <= summary["ttft_s"]["p99"] <= summary["e2e_s"]["p99"]


def test_interrupted_batch_resumes_each_id_exactly_once(cluster, requests, tmp_path):
    lines, expected = requests
    inp, out = _write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"

    first = run_batch(cluster, inp, out, max_in_flight=2, limit=4, progress=False)
    assert first["requests"]["done"] == 4 and len(out.read_text().splitlines()) == 4
    done_ids = set(_results(out))
    torn = next(json.dumps(line) for line in lines if json.dumps(line["id"]) not in done_ids)
    with out.open("a") as f:  # a crash in the middle of writing the next result
        f.write(torn[: len(torn) // 2])

    second = run_batch(cluster, inp, out, max_in_flight=4, progress=False)

    assert second["requests"] == {"done": 6, "failed": 0, "skipped": 4, "invalid_lines": 0}
    _assert_match(_results(out), expected)


def test_failed_results_are_kept_unless_retried(cluster, requests, tmp_path):
    lines, expected = requests
    inp, out = _write_lines(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": 0, "text": "", "token_ids": [], "finish_reason": "error",
                               "error": "KV transfer failed"}) + "\n")

    kept = run_batch(cluster, inp, out, progress=False)
    assert kept["requests"]["skipped"] == 1 and _results(out)["0"]["error"] == "KV transfer failed"

    retried = run_batch(cluster, inp, out, retry_failed=True, progress=False)
    assert retried["requests"] == {"done": 1, "failed": 0, "skipped": 9, "invalid_lines": 0}
    _assert_match(_results(out), expected)


def test_command_line_exit_codes(ray_runtime, ckpt, requests, tmp_path, capsys):
    lines, expected = requests
    inp = _write_lines(tmp_path / "in.jsonl", lines[:3] + [{"id": "bad", "prompt": ""}])
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(yaml.safe_dump(config(ckpt)))
    out = tmp_path / "out.jsonl"
    assert main(["--input", str(tmp_path / "missing.jsonl"), "--output", str(out)]) == 2
    assert main(["--input", str(inp), "--output", str(out), "--max-in-flight", "0"]) == 2
    assert main(["--input", str(inp), "--output", str(out), "--sampling", '{"top_p": 2}']) == 2
    with pytest.raises(SystemExit) as exc:
        main(["--input", str(inp), "--output", str(out), "--sampling", "[1]"])
    assert exc.value.code == 2
    assert not out.exists()

    # ray is already initialized here, so the command attaches to it
    assert main(["--input", str(inp), "--output", str(out), "--config", str(cfg), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "batch: 3 done, 0 failed, 0 skipped" in captured.out and "1 invalid lines" in captured.out
    assert "input line 4 (id 'bad'): prompt: must be a non-empty string" in captured.err
    _assert_match(_results(out), {k: v for k, v in expected.items() if k in ('0', '"r1"', '2')})


def test_placement_timeout_names_what_is_missing(cluster, ckpt):
    # The module's cluster holds 2 of the 8 logical GPUs: of two 4-rank instances the first fits, the second not.
    message = (r"instance decode-0 needs 4 GPUs on one node \(STRICT_PACK\) and no node had them free within 1s "
               r"\(free GPUs per node: [\d.]+: [0-3]; instances placed before it: prefill-0\).*`ray status`")
    with pytest.raises(ValueError, match=message):
        Cluster(config(ckpt, prefill={"tp": 4}, decode={"tp": 4}, ray={"placement_timeout_s": 1}))


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("where", ["terminal", "log", "off"])
def test_progress_bar_only_on_a_terminal(where, monkeypatch):
    """A bar on a terminal; in job logs a status line every `every_s` seconds (and at the end); with progress off
    nothing; messages always."""
    stream = _Terminal() if where == "terminal" else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    stats = Stats(done=3, failed=1, output_tokens=10)
    progress = Progress(5, enabled=where != "off", every_s=60.0)
    progress.update(stats)
    progress.message("batch: input line 2: id: missing")
    progress.update(stats)
    progress.close(stats)
    out = stream.getvalue()
    assert "batch: input line 2: id: missing\n" in out
    status = "3 done, 1 failed, 0 skipped, 0 invalid, 0 in flight"
    if where == "terminal":
        assert "4/5" in out and status in out and "\r" in out
    elif where == "log":  # the first update and the close; the second update is within every_s
        lines = [line for line in out.splitlines() if line.startswith("4/5 lines: ")]
        assert len(lines) == 2 and all(status in line for line in lines) and "\r" not in out
    else:
        assert out == "batch: input line 2: id: missing\n"
