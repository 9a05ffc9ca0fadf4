"""The files of a batch job, all JSONL: input lines (one request each, checked field by field), result lines
(appended one per finished request) and the ids already in an output, so a rerun skips them."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from splitserve.workers.sampling_params import SamplingParams

TIMING_KEYS = ("queue_s", "ttft_s", "prefill_s", "kv_transfer_s", "tpot_s", "decode_s", "e2e_s")


class BadLine(ValueError):
    """An input line that is not a valid request; `request_id` is its id when it had a usable one."""

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


# ------------------------------------------------------------------------------------------------ output file
def request_key(request_id) -> str:
    """An id as a set key that keeps its JSON type: 1 and "1" are different ids."""
    return json.dumps(request_id)


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
            done.add(request_key(record["id"]))
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
            "usage": {"prompt_tokens": metrics.get("prompt_tokens"), "completion_tokens": len(token_ids),
                      "cached_tokens": metrics.get("cached_tokens", 0)},
            "timing": {k: _round(metrics.get(k)) for k in TIMING_KEYS if k in metrics},
            "instances": {"prefill": metrics.get("prefill_instance"), "decode": metrics.get("decode_instance")},
            "error": last.error}


def _round(value):
    return round(value, 6) if isinstance(value, float) else value


def count_lines(path: Path) -> int:
    """Non-blank lines of a file (the progress bar's total)."""
    with path.open("rb") as f:
        return sum(1 for raw in f if raw.strip())


def default_errors_path(output: Path) -> Path:
    return output.with_name(output.name + ".errors.jsonl")
